"""Fine-tune a segmentation head on a partly frozen backbone, from any backend.

    python examples/train_frozen_backbone.py tv:resnet50 --frozen-levels 1 --steps 3

The backbone's stem and first stage stop learning (and their BatchNorm
statistics stay as loaded), gradient checkpointing trades compute for memory,
and the same lines work for timm, torchvision, transformers or open_clip
backbones (docs/training.md).
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import unifeat


class Segmenter(nn.Module):
    """A backbone's deepest two levels, fused by a 1x1 conv head, upsampled to the input."""

    def __init__(self, backbone: str, classes: int, frozen_levels: int, **kwargs: object) -> None:
        super().__init__()
        self.backbone = unifeat.create_model(
            backbone,
            features_only=True,
            out_indices=(-2, -1),
            frozen_levels=frozen_levels,
            norm_eval=True,
            **kwargs,
        )
        self.backbone.set_grad_checkpointing(True)
        channels = sum(self.backbone.feature_info.channels())
        self.head = nn.Conv2d(channels, classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        finer, coarser = self.backbone(x)  # levels -2 and -1, in depth order
        upsampled = nn.functional.interpolate(coarser, size=finer.shape[-2:])
        fused = torch.cat([finer, upsampled], dim=1)
        logits = self.head(fused)
        return nn.functional.interpolate(logits, size=x.shape[-2:], mode="bilinear")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("backbone", nargs="?", default="tv:resnet50")
    parser.add_argument("--frozen-levels", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--size", type=int, default=128)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = Segmenter(args.backbone, classes=5, frozen_levels=args.frozen_levels).train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    images = torch.randn(2, 3, args.size, args.size)
    masks = torch.randint(0, 5, (2, args.size, args.size))
    for step in range(args.steps):
        loss = nn.functional.cross_entropy(model(images), masks)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        print(f"step {step}: loss {loss.item():.4f}")
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    print(f"frozen {frozen} of {total} parameters")


if __name__ == "__main__":
    main()
