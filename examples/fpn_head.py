"""A feature pyramid network on a unifeat backbone, configured from its FeatureInfo.

Run: python examples/fpn_head.py [MODEL] [--size 224]

Works with any backbone unifeat can build: channels and strides come from
``backbone.feature_info``, never from a table of per-model constants.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn
from torchvision.ops import FeaturePyramidNetwork

import unifeat


class BackboneWithFPN(nn.Module):
    def __init__(
        self, model_name: str, out_indices=(-3, -2, -1), fpn_channels: int = 256, **model_kwargs
    ) -> None:
        super().__init__()
        self.body = unifeat.create_model(
            model_name,
            features_only=True,
            out_indices=out_indices,
            output_type="dict",
            **model_kwargs,
        )
        self.fpn = FeaturePyramidNetwork(self.body.feature_info.channels(), fpn_channels)
        self.strides = self.body.feature_info.reduction()

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.fpn(self.body(images))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default="resnet18")
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args()
    net = BackboneWithFPN(args.model).eval()
    with torch.no_grad():
        pyramid = net(torch.randn(1, 3, args.size, args.size))
    for (name, level), stride in zip(pyramid.items(), net.strides, strict=True):
        print(f"{name:>12}  stride {stride:>2}  {tuple(level.shape)}")


if __name__ == "__main__":
    main()
