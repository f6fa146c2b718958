"""torchvision's feature pyramid network on any unifeat backbone, in one call.

Run: python examples/fpn_head.py [MODEL] [--size 224] [--pyramid]

``backbone_with_fpn`` takes the backbone's levels at reductions 4, 8, 16 and 32
from its ``feature_info`` (never from a table of per-model constants) and puts
torchvision's own ``FeaturePyramidNetwork`` on them: the ``backbone`` that
torchvision's detectors take. A plain ViT has one map size; ``--pyramid`` adds
ViTDet's simple feature pyramid to it first (``pyramid="simple"``).
"""

from __future__ import annotations

import argparse

import torch

from unifeat.integrations.torchvision import backbone_with_fpn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default="resnet18")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--pyramid", action="store_true", help="a plain ViT: pyramid='simple'")
    args = parser.parse_args()
    options = {"pyramid": "simple"} if args.pyramid else {}
    net = backbone_with_fpn(args.model, **options).eval()
    with torch.no_grad():
        maps = net(torch.randn(1, 3, args.size, args.size))
    # The extra "pool" level halves the last one.
    strides = [*net.strides, 2 * net.strides[-1]]
    for (name, level), stride in zip(maps.items(), strides, strict=True):
        print(f"{name:>5}  stride {stride:>2}  {tuple(level.shape)}")


if __name__ == "__main__":
    main()
