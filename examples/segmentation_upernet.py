"""Semantic segmentation: transformers' UperNet on a DINOv2-style ViT through a simple pyramid.

Run: python examples/segmentation_upernet.py [MODEL] [--size 224] [--steps 2]
     python examples/segmentation_upernet.py hf:facebook/dinov2-small --pretrained

A plain ViT gives one map size; ``pyramid="simple"`` (ViTDet's scale stage) turns its
last block into four levels at strides 3.5-28 (patch 14) or 4-32 (patch 16), which
UperNet's pyramid pooling and FPN take as they take a ConvNeXt's stages. The
backbone is any model unifeat builds: the default is a small random DINOv2 (no
download); name a hub model with ``--pretrained`` where the hub is reachable.
Layer-wise learning-rate decay comes from timm's optimizer factory, which reads
the backbone's ``group_matcher`` (docs/training.md).
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from transformers import UperNetConfig, UperNetForSemanticSegmentation

from unifeat.integrations.transformers import UnifeatBackboneConfig, check_head_config

# A DINOv2-style ViT small enough to train a step on a laptop CPU.
SMALL_DINOV2 = dict(
    hidden_size=96, num_hidden_layers=4, num_attention_heads=3, patch_size=14, image_size=224
)


def upernet(
    model_name: str,
    num_labels: int = 21,
    *,
    pretrained: bool = False,
    head_width: int = 128,
    **model_kwargs: Any,
) -> UperNetForSemanticSegmentation:
    """UperNet over ``model_name``'s simple pyramid (four levels from its last block);
    ``model_kwargs`` go to the model's constructor (its config for transformers)."""
    backbone = UnifeatBackboneConfig(
        model_name=model_name, pyramid="simple", pretrained=pretrained, model_kwargs=model_kwargs
    )
    config = UperNetConfig(
        backbone_config=backbone,
        num_labels=num_labels,
        hidden_size=head_width,
        auxiliary_channels=head_width // 2,
        auxiliary_in_channels=backbone.channels[2],
    )
    check_head_config(config)
    return UperNetForSemanticSegmentation(config)


def train(
    model: UperNetForSemanticSegmentation, size: int, steps: int, num_labels: int = 21
) -> list[float]:
    """A few training steps on random images and masks (batch 2: UperNet's pooled
    BatchNorm needs two samples), with layer-wise decay on the backbone."""
    optimizer = create_optimizer_v2(model.backbone, "adamw", lr=1e-4, layer_decay=0.75)
    head = [p for n, p in model.named_parameters() if not n.startswith("backbone.")]
    optimizer.add_param_group({"params": head, "lr": 1e-3, "lr_scale": 1.0})
    scheduler, _ = create_scheduler_v2(optimizer, "cosine", num_epochs=steps)
    losses = []
    model.train()
    for step in range(steps):
        images = torch.randn(2, 3, size, size)
        labels = torch.randint(0, num_labels, (2, size, size))
        loss = model(pixel_values=images, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step(step + 1)  # timm's schedulers apply each group's lr_scale
        losses.append(loss.item())
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default="hf:dinov2")
    parser.add_argument("--pretrained", action="store_true")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()
    kwargs = SMALL_DINOV2 if args.model == "hf:dinov2" and not args.pretrained else {}
    model = upernet(args.model, pretrained=args.pretrained, **kwargs)
    losses = train(model, args.size, args.steps)
    model.eval()
    with torch.no_grad():
        logits = model(pixel_values=torch.randn(1, 3, args.size, args.size)).logits
    levels = model.config.backbone_config.feature_info
    print(
        f"{args.model}: pyramid channels {levels.channels()}, reductions {levels.reduction()}; "
        f"losses {', '.join(f'{v:.3f}' for v in losses)}; logits {tuple(logits.shape)}"
    )


if __name__ == "__main__":
    main()
