"""The ``unifeat`` command line (also ``python -m unifeat``)."""

from __future__ import annotations

import argparse
import json
import math
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

import torch

import unifeat
from unifeat._engines import engine_names, get_engine
from unifeat._errors import UnifeatError, UnsupportedOptionError
from unifeat._images import input_exists
from unifeat._show import MAX_CHANNELS
from unifeat._store import FORMATS

MAX_INPUT_SIZE = 8192
"""The largest --input-size side: a 3x8192x8192 float batch of one is 800 MB."""


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors on one line (exit code 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _int_range(low: int, high: int) -> Callable[[str], int]:
    """An argparse type: an integer from ``low`` to ``high``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid integer {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is out of range: expected {low} to {high}")
        return value

    parse.__name__ = "integer"
    return parse


def _part(text: str) -> tuple[int, int]:
    from unifeat._extract import parse_part

    try:
        part = parse_part(text)
    except UnsupportedOptionError:
        raise argparse.ArgumentTypeError(
            f"invalid value {text!r}: expected I/N with 0 <= I < N, e.g. 0/4"
        ) from None
    assert part is not None
    return part


def _debug_option(parser: argparse.ArgumentParser) -> None:
    # SUPPRESS: a subcommand's default must not hide a --debug given before it.
    parser.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks on errors"
    )


_EPILOG = """examples:
  unifeat info resnet50
  unifeat info timm:vit_small_patch16_224 --out-indices -1 -4 --json
  unifeat info convnext_tiny --output-stride 16 --input-size 512
  unifeat list 'convnext*' --backend timm
  unifeat nodes tv:resnet18 --filter 'layer4*'
  unifeat extract resnet50 photos/ --pretrained --output feats.parquet --pool avg
  unifeat extract resnet50 photos/ --pretrained -o feats.parquet --shard 0/4
  unifeat merge -o feats.parquet
  unifeat show convnext_tiny cat.jpg --output grid.png --channels 8
"""


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="unifeat",
        description="Intermediate features of timm, torchvision and transformers models, "
        "through one API.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"unifeat {unifeat.__version__}")
    parser.add_argument(
        "--debug", action="store_true", help="show tracebacks on errors (also after COMMAND)"
    )
    commands = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=_Parser
    )

    info = commands.add_parser(
        "info",
        help="print a model's feature levels as a table",
        description="Print a model's feature levels: index, module, channels, reduction and "
        "output shape. Nothing is downloaded or allocated: the model is built on the "
        "meta device. Levels marked * are the ones out_indices selects.",
    )
    info.add_argument("model", help='model name: "resnet50", "timm:convnext_tiny", ...')
    info.add_argument(
        "--out-indices",
        type=int,
        nargs="+",
        metavar="I",
        help="levels to select (negatives count from the end); default: the backend's default",
    )
    info.add_argument(
        "--output-stride", type=_int_range(1, 64), metavar="N", help="dilate to stride N"
    )
    info.add_argument(
        "--input-size",
        type=_int_range(1, MAX_INPUT_SIZE),
        nargs="+",
        metavar="S",
        help="input height [width] for the output shapes; default: the "
        "model's own input size, else 224",
    )
    info.add_argument("--backend", help="force a backend (timm, ...)")
    info.add_argument("--json", action="store_true", help="print JSON instead of a table")

    listing = commands.add_parser(
        "list", help="list model names", description="List model names matching a shell pattern."
    )
    listing.add_argument("pattern", nargs="?", default="*", help="shell pattern, e.g. 'resnet*'")
    listing.add_argument("--backend", help="only this backend (names are then bare)")

    nodes = commands.add_parser(
        "nodes",
        help="print a model's FX node names (for return_nodes=)",
        description="Print the FX node names of a model in torchvision's naming, as "
        "return_nodes= takes them. Train and eval names are printed once where equal.",
    )
    nodes.add_argument("model", help='model name: "tv:resnet50", "timm:resnet18", ...')
    nodes.add_argument("--filter", metavar="PATTERN", help="only names matching a shell pattern")
    nodes.add_argument("--mode", choices=("eval", "train"), default="eval", help="which graph")
    nodes.add_argument("--backend", help="force a backend")

    extract = commands.add_parser(
        "extract",
        help="write pooled features of image files to safetensors, Parquet or npy",
        description="Extract features of image files (folders are searched recursively, "
        "symlinks followed) with the model's own preprocessing, in batches, to a crash-safe "
        "store: shards plus an index (OUTPUT with .index.json) recording how the rows were "
        "computed. A rerun with the same --output adds only what is missing, and refuses "
        "to mix in rows computed differently; unreadable images are recorded and skipped. "
        "By name, the weights must be asked for: --pretrained, --checkpoint or --random-init.",
    )
    extract.add_argument("model", help="model name")
    extract.add_argument("images", nargs="+", help="image files or folders")
    extract.add_argument(
        "--output",
        "-o",
        required=True,
        help="output: feats.safetensors, feats.parquet, feats.npy, or a folder (an existing "
        "one, or a path ending in /) to hold features.*",
    )
    extract.add_argument(
        "--format", choices=FORMATS, help="output format; default: from the --output suffix"
    )
    extract.add_argument("--out-indices", type=int, nargs="+", metavar="I", help="levels")
    extract.add_argument(
        "--pool", choices=("avg", "max", "cls", "none"), default="avg", help="pooling per level"
    )
    extract.add_argument("--batch-size", type=_int_range(1, 65536), default=32, metavar="N")
    extract.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    extract.add_argument(
        "--num-workers",
        type=_int_range(0, 1024),
        default=0,
        metavar="N",
        help="processes decoding images",
    )
    extract.add_argument(
        "--flush-every",
        type=_int_range(1, 10_000_000),
        default=1024,
        metavar="N",
        help="rows per shard: at most this many finished rows are lost to a kill -9 (default 1024)",
    )
    extract.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    extract.add_argument(
        "--fast-decode", action="store_true", help="reduced-size JPEG decoding for large photos"
    )
    extract.add_argument("--overwrite", action="store_true", help="start the output over")
    extract.add_argument(
        "--retry-failed", action="store_true", help="retry images recorded as unreadable"
    )
    extract.add_argument(
        "--shard",
        type=_part,
        metavar="I/N",
        help="take part I of N (writes OUTPUT's stem + .partIofN; combine with unifeat merge)",
    )
    extract.add_argument("--engine", choices=engine_names(), default="local")
    extract.add_argument(
        "--address", help="Ray cluster for --engine ray: auto, ray://host:10001 (default: local)"
    )
    extract.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_weight_options(extract)
    extract.add_argument(
        "--random-init", action="store_true", help="extract with random weights on purpose"
    )
    extract.add_argument(
        "--seed", type=_int_range(0, 2**32 - 1), default=0, help="seed of --random-init"
    )
    _debug_option(extract)

    merge = commands.add_parser(
        "merge",
        help="combine the parts written with extract --shard I/N",
        description="Combine the parts of an extraction split with --shard I/N into one "
        "output, rows sorted by path. Every part must be complete and computed the same way.",
    )
    merge.add_argument(
        "parts", nargs="*", help="the parts' outputs; default: every OUTPUT.partIofN beside OUTPUT"
    )
    merge.add_argument("--output", "-o", required=True, help="the merged output")
    merge.add_argument("--format", choices=FORMATS, help="default: from the --output suffix")
    merge.add_argument("--overwrite", action="store_true", help="replace an existing output")
    _debug_option(merge)

    show = commands.add_parser(
        "show",
        help="save a PNG grid of feature maps for one image",
        description="Save a PNG with one row per level: the input image, then the "
        "channels with the largest mean activation.",
    )
    show.add_argument("model", help="model name")
    show.add_argument("image", help="an image file")
    show.add_argument("--output", "-o", required=True, help="PNG file to write")
    show.add_argument("--level", type=int, nargs="+", metavar="I", help="levels to show")
    show.add_argument(
        "--channels",
        type=_int_range(1, MAX_CHANNELS),
        default=8,
        metavar="K",
        help=f"maps per level (1 to {MAX_CHANNELS})",
    )
    _add_weight_options(show)
    _debug_option(show)
    for command in (info, listing, nodes):
        _debug_option(command)
    return parser


def _add_weight_options(command: argparse.ArgumentParser) -> None:
    """Options of the commands that run a model on images."""
    command.add_argument(
        "--input-size", type=_int_range(1, MAX_INPUT_SIZE), nargs="+", metavar="S", help="H [W]"
    )
    command.add_argument("--pretrained", action="store_true", help="load pretrained weights")
    command.add_argument("--checkpoint", metavar="FILE", help="a local state dict to load")


def _output_shapes(
    model_name: str, options: dict[str, Any], input_size: Sequence[int] | None
) -> tuple[tuple[int, int], list[tuple[int, ...]] | None, unifeat.FeatureInfo, str]:
    """Level metadata plus exact output shapes from a forward on the meta device."""
    with torch.device("meta"):
        model = unifeat.create_model(model_name, features_only=True, **options)
    assert isinstance(model, unifeat.FeatureModel)
    native = model.default_input_size
    given = _size(input_size)
    if given:
        size = given
    elif native:
        size = (native[-2], native[-1])
    else:
        size = (224, 224)
    try:
        # Eval mode and two samples: a train-mode BatchNorm cannot normalize one
        # sample's 1x1 map, and the shapes are those of inference anyway.
        with torch.no_grad():
            maps = model.eval()(torch.empty(2, model.input_size[0], *size, device="meta"))
        shapes = [tuple(m.shape[1:]) for m in (maps.values() if isinstance(maps, dict) else maps)]
    except Exception as exc:
        # e.g. a fixed-size ViT given another size: the table still shows nominal shapes.
        print(
            f"note: the model does not run at {size[0]}x{size[1]} ({exc}); shapes below are "
            "input size / reduction",
            file=sys.stderr,
        )
        shapes = None
    return size, shapes, model.feature_info, model.backend


def _info(args: argparse.Namespace) -> int:
    options: dict[str, Any] = {}
    if args.out_indices is not None:
        options["out_indices"] = tuple(args.out_indices)
    if args.output_stride is not None:
        options["output_stride"] = args.output_stride
    if args.backend is not None:
        options["backend"] = args.backend
    size, shapes, info, backend = _output_shapes(args.model, options, args.input_size)
    rows = []
    for level in info:
        if shapes is not None and level.index in info.out_indices:
            shape = shapes[info.out_indices.index(level.index)]
        else:
            shape = (level.num_chs, *(math.ceil(s / level.reduction) for s in size))
        rows.append(
            dict(level.model_dump(), selected=level.index in info.out_indices, shape=list(shape))
        )
    if args.json:
        print(
            json.dumps(
                dict(
                    model=args.model,
                    backend=backend,
                    input_size=list(size),
                    out_indices=list(info.out_indices),
                    levels=rows,
                ),
                indent=2,
            )
        )
        return 0
    print(
        f"{args.model} ({backend}): {len(info)} levels, input 3x{size[0]}x{size[1]}, "
        f"out_indices={info.out_indices}"
    )
    header = ("", "index", "module", "channels", "reduction", "output shape")
    table = [header] + [
        (
            "*" if r["selected"] else "",
            str(r["index"]),
            r["module"] or "(root)",
            str(r["num_chs"]),
            str(r["reduction"]),
            "x".join(map(str, r["shape"])),
        )
        for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    right = {1, 3, 4}
    for row in table:
        cells = [
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        print("  ".join(cells).rstrip())
    return 0


def _list(args: argparse.Namespace) -> int:
    for name in unifeat.list_models(args.pattern, backend=args.backend):
        print(name)
    return 0


def _nodes(args: argparse.Namespace) -> int:
    import fnmatch

    kwargs = {"backend": args.backend} if args.backend else {}
    train, evaluation = unifeat.get_node_names(args.model, **kwargs)
    names = train if args.mode == "train" else evaluation
    for name in names:
        if args.filter is None or fnmatch.fnmatch(name, args.filter):
            print(name)
    return 0


class _BadArgument(Exception):
    """A command-line argument that names nothing usable (exit code 2)."""


def _existing(paths: Sequence[str]) -> None:
    missing = [p for p in paths if not input_exists(p)]
    if missing:
        raise _BadArgument(f"no such image file or folder: {missing[0]!r}")


def _size(values: Sequence[int] | None) -> tuple[int, int] | None:
    if not values:
        return None
    if len(values) > 2:
        shown = " ".join(str(v) for v in values)
        raise _BadArgument(f"--input-size takes H [W], not {len(values)} values ({shown})")
    return (values[0], values[-1])


def _build_options(args: argparse.Namespace) -> dict[str, Any]:
    options: dict[str, Any] = {"pretrained": args.pretrained}
    if getattr(args, "out_indices", None) is not None:
        options["out_indices"] = tuple(args.out_indices)
    if args.checkpoint is not None:
        options["checkpoint_path"] = args.checkpoint
    return options


def _extract(args: argparse.Namespace) -> int:
    from unifeat._extract import parse_device

    _existing(args.images)
    engine = get_engine(args.engine)
    if args.address is not None and not engine.takes_address:
        raise _BadArgument("--address only applies with --engine ray")
    try:
        parse_device(args.device, here=engine.devices_here)
    except UnsupportedOptionError as exc:
        raise _BadArgument(f"--device: {exc}") from None
    size = _size(args.input_size)
    options = _build_options(args)
    result = unifeat.extract(
        args.model,
        args.images,
        args.output,
        pool=args.pool,
        batch_size=args.batch_size,
        device=args.device,
        num_workers=args.num_workers,
        format=args.format,
        flush_every=args.flush_every,
        input_size=size,
        overwrite=args.overwrite,
        retry_failed=args.retry_failed,
        fast_decode=args.fast_decode,
        dtype=args.dtype,
        shard=args.shard,
        engine=args.engine,
        address=args.address,
        progress=not args.no_progress,
        random_init=args.random_init,
        seed=args.seed,
        **options,
    )
    print(
        f"wrote {result.written} images ({result.skipped} already there, "
        f"{len(result.failed)} unreadable) to {result.index_path}"
    )
    return 0


def _merge(args: argparse.Namespace) -> int:
    result = unifeat.merge_features(
        args.parts, args.output, format=args.format, overwrite=args.overwrite
    )
    print(
        f"merged {result.written} images ({len(result.failed)} unreadable) into {result.index_path}"
    )
    return 0


def _interrupted(args: argparse.Namespace) -> str:
    """What Ctrl-C leaves: for extract, how many rows are safely stored."""
    if args.command != "extract":
        return ""
    from unifeat._store import StoreError, open_index, part_paths, store_paths

    try:
        paths = part_paths(store_paths(args.output, args.format), args.shard)
        _, index = open_index(paths.index)
    except (StoreError, UnsupportedOptionError):
        return "; nothing was written"
    rows = sum(int(shard.get("rows", 0)) for shard in index["shards"])
    return f"; {rows} images are safely in {paths.display}, rerun the same command to go on"


def _show(args: argparse.Namespace) -> int:
    _existing([args.image])
    model = unifeat.create_model(args.model, features_only=True, **_build_options(args))
    picture = unifeat.plot_feature_maps(
        model,
        args.image,
        args.output,
        levels=args.level,
        channels=args.channels,
        input_size=_size(args.input_size),
    )
    print(f"wrote {args.output} ({picture.size[0]}x{picture.size[1]})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``unifeat`` command; returns the exit code.

    Exit codes: 0 success, 2 bad arguments (including unknown models or
    invalid options), 1 anything that failed while running, 130 interrupted
    (Ctrl-C; what was finished is kept).
    """
    parser = _parser()
    args = parser.parse_args(argv)
    run = {
        "info": _info,
        "list": _list,
        "nodes": _nodes,
        "extract": _extract,
        "merge": _merge,
        "show": _show,
    }[args.command]
    debug = getattr(args, "debug", False)
    try:
        return run(args)
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        print(f"unifeat {args.command}: interrupted{_interrupted(args)}", file=sys.stderr)
        return 130
    except (UnifeatError, _BadArgument) as exc:
        if debug:
            traceback.print_exc()
        print(f"unifeat {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        if debug:
            traceback.print_exc()
        print(
            f"unifeat {args.command}: error: {type(exc).__name__}: {exc} "
            "(run with --debug for the traceback)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
