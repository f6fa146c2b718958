"""Mask R-CNN on a unifeat backbone: the same head for a timm, torchvision or transformers model.

Run: python examples/mask_rcnn.py [MODEL] [--size 320]

torchvision's MaskRCNN needs a backbone that returns a dict of maps with the
same channel count and says so in ``out_channels``; the FPN example's
``BackboneWithFPN`` is exactly that, configured from ``feature_info``.
"""

from __future__ import annotations

import argparse
import runpy
from pathlib import Path

import torch
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.ops import MultiScaleRoIAlign

_FPN = runpy.run_path(str(Path(__file__).with_name("fpn_head.py")))


def mask_rcnn(model_name: str, num_classes: int = 3, **model_kwargs) -> MaskRCNN:
    backbone = _FPN["BackboneWithFPN"](model_name, **model_kwargs)
    backbone.out_channels = 256
    names = list(backbone.body.feature_info.module_name())
    strides = backbone.strides
    anchors = AnchorGenerator(
        sizes=tuple((4 * s,) for s in strides), aspect_ratios=((0.5, 1.0, 2.0),) * len(strides)
    )
    return MaskRCNN(
        backbone,
        num_classes=num_classes,
        rpn_anchor_generator=anchors,
        box_roi_pool=MultiScaleRoIAlign(names, output_size=7, sampling_ratio=2),
        mask_roi_pool=MultiScaleRoIAlign(names, output_size=14, sampling_ratio=2),
        min_size=64,
        max_size=512,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default="resnet18")
    parser.add_argument("--size", type=int, default=320)
    args = parser.parse_args()
    net = mask_rcnn(args.model).eval()
    with torch.no_grad():
        (detections,) = net([torch.rand(3, args.size, args.size)])
    print(
        f"{args.model}: {len(detections['boxes'])} detections, "
        f"masks {tuple(detections['masks'].shape)}"
    )


if __name__ == "__main__":
    main()
