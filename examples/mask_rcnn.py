"""Mask R-CNN on a unifeat backbone: the same head for a timm, torchvision or transformers model.

Run: python examples/mask_rcnn.py [MODEL] [--size 320]
     python examples/mask_rcnn.py convnext_tiny
     python examples/mask_rcnn.py vit_small_patch16_224 --pyramid

``backbone_with_fpn`` gives the backbone torchvision's MaskRCNN expects: maps at
reductions 4, 8, 16 and 32 (keys "0" to "3") and "pool", all ``out_channels``
wide. Those are the levels torchvision's own ResNet-FPN returns, so MaskRCNN's
default anchors and RoI poolers fit as they are. A plain ViT gets them from
ViTDet's simple pyramid (``--pyramid``: ``pyramid="simple"``).
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
from torchvision.models.detection import MaskRCNN

from unifeat.integrations.torchvision import backbone_with_fpn


def mask_rcnn(model_name: str, num_classes: int = 3, **model_kwargs: Any) -> MaskRCNN:
    backbone = backbone_with_fpn(model_name, **model_kwargs)
    return MaskRCNN(backbone, num_classes=num_classes, min_size=64, max_size=512)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default="resnet18")
    parser.add_argument("--size", type=int, default=320)
    parser.add_argument("--pyramid", action="store_true", help="a plain ViT's simple pyramid")
    args = parser.parse_args()
    options: dict[str, Any] = {"pyramid": "simple"} if args.pyramid else {}
    if args.pyramid and args.model.startswith(("vit_", "timm:vit_")):
        options["dynamic_img_size"] = True  # timm ViTs take the detector's image sizes
    net = mask_rcnn(args.model, **options).eval()
    with torch.no_grad():
        (detections,) = net([torch.rand(3, args.size, args.size)])
    print(
        f"{args.model}: {len(detections['boxes'])} detections, "
        f"masks {tuple(detections['masks'].shape)}"
    )


if __name__ == "__main__":
    main()
