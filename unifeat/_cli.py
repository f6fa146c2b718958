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
from unifeat._errors import UnifeatError

_EPILOG = """examples:
  unifeat info resnet50
  unifeat info timm:vit_small_patch16_224 --out-indices -1 -4 --json
  unifeat info convnext_tiny --output-stride 16 --input-size 512
  unifeat list 'convnext*' --backend timm
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
    return parser


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


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``unifeat`` command; returns the exit code.

    Exit codes: 0 success, 2 bad arguments (including unknown models or
    invalid options), 1 anything that failed while running.
    """
    parser = _parser()
    args = parser.parse_args(argv)
    run = {"info": _info, "list": _list}[args.command]
    try:
        return run(args)
    except UnifeatError as exc:
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
