"""The ``unifeat`` command line (also ``python -m unifeat``)."""

from __future__ import annotations

import argparse
import json
import math
import sys
import traceback
from collections.abc import Sequence
from typing import Any

import torch

import unifeat
from unifeat._errors import UnifeatError, UnsupportedOptionError

_EPILOG = """examples:
  unifeat info resnet50
  unifeat info timm:vit_small_patch16_224 --out-indices -1 -4 --json
  unifeat info convnext_tiny --output-stride 16 --input-size 512
  unifeat list 'convnext*' --backend timm
  unifeat nodes tv:resnet18 --filter 'layer4*'
  unifeat extract resnet50 photos/ --output feats.safetensors --pool avg
  unifeat show convnext_tiny cat.jpg --output grid.png --channels 8
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="unifeat",
        description="Intermediate features of timm, torchvision and transformers models, "
        "through one API.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"unifeat {unifeat.__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

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
    info.add_argument("--output-stride", type=int, metavar="N", help="dilate to stride N")
    info.add_argument(
        "--input-size",
        type=int,
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
        help="write pooled features of image files to safetensors",
        description="Extract features of image files (folders are searched recursively) "
        "with the model's own preprocessing, in batches, to safetensors shards plus an "
        "index (OUTPUT with .index.json). A rerun with the same --output skips images "
        "already written; unreadable images are reported and skipped.",
    )
    extract.add_argument("model", help="model name")
    extract.add_argument("images", nargs="+", help="image files or folders")
    extract.add_argument(
        "--output", "-o", required=True, help="output file, e.g. feats.safetensors"
    )
    extract.add_argument("--out-indices", type=int, nargs="+", metavar="I", help="levels")
    extract.add_argument(
        "--pool", choices=("avg", "max", "cls", "none"), default="avg", help="pooling per level"
    )
    extract.add_argument("--batch-size", type=int, default=32, metavar="N")
    extract.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    extract.add_argument("--num-workers", type=int, default=0, metavar="N")
    extract.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_weight_options(extract)

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
    show.add_argument("--channels", type=int, default=8, metavar="K", help="maps per level")
    _add_weight_options(show)
    return parser


def _add_weight_options(command: argparse.ArgumentParser) -> None:
    """Options of the commands that run a model on images."""
    command.add_argument("--input-size", type=int, nargs="+", metavar="S", help="H [W]")
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
    if input_size:
        size = (input_size[0], input_size[-1])
    elif native:
        size = (native[-2], native[-1])
    else:
        size = (224, 224)
    try:
        with torch.no_grad():
            maps = model(torch.empty(1, 3, *size, device="meta"))
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
    from pathlib import Path

    missing = [p for p in paths if not Path(p).exists()]
    if missing:
        raise _BadArgument(f"no such image file or folder: {missing[0]!r}")


def _size(values: Sequence[int] | None) -> tuple[int, int] | None:
    if not values:
        return None
    if len(values) > 2 or min(values) < 1:
        raise UnsupportedOptionError(f"--input-size takes H [W] > 0, not {list(values)}")
    return (values[0], values[-1])


def _build_options(args: argparse.Namespace) -> dict[str, Any]:
    options: dict[str, Any] = {"pretrained": args.pretrained}
    if getattr(args, "out_indices", None) is not None:
        options["out_indices"] = tuple(args.out_indices)
    if args.checkpoint is not None:
        options["checkpoint_path"] = args.checkpoint
    return options


def _extract(args: argparse.Namespace) -> int:
    _existing(args.images)
    options = _build_options(args)
    if args.pool == "cls":
        options["return_prefix_tokens"] = True
    model = unifeat.create_model(args.model, features_only=True, **options)
    result = unifeat.extract(
        model,
        args.images,
        args.output,
        pool=args.pool,
        batch_size=args.batch_size,
        device=args.device,
        num_workers=args.num_workers,
        input_size=_size(args.input_size),
        progress=not args.no_progress,
    )
    print(
        f"wrote {result.written} images ({result.skipped} already there, "
        f"{len(result.failed)} unreadable) to {result.index_path}"
    )
    return 0


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
    invalid options), 1 anything that failed while running.
    """
    parser = _parser()
    args = parser.parse_args(argv)
    run = {
        "info": _info,
        "list": _list,
        "nodes": _nodes,
        "extract": _extract,
        "show": _show,
    }[args.command]
    try:
        return run(args)
    except (UnifeatError, _BadArgument) as exc:
        if args.debug:
            traceback.print_exc()
        print(f"unifeat {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        if args.debug:
            traceback.print_exc()
        print(
            f"unifeat {args.command}: error: {type(exc).__name__}: {exc} "
            "(run with --debug for the traceback)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
