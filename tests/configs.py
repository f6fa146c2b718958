"""Small model configurations (and a module of ones own) the tests share: fast on two
CPUs, random init."""

from __future__ import annotations

from itertools import pairwise

from torch import Tensor, nn

# A transformers ViT at 64x64 with 16-pixel patches: a 4x4 grid and a class token.
HF_VIT_64 = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    image_size=64,
    patch_size=16,
)

# A transformers ResNet with four one-block stages of 16-64 channels.
HF_RESNET_TINY = dict(embedding_size=8, hidden_sizes=[16, 32, 48, 64], depths=[1, 1, 1, 1])

# open_clip's ModifiedResNet ("RN50") with one block per stage at 64x64.
OC_RN50_TINY = dict(layers=(1, 1, 1, 1), width=16, head_width=16, image_size=64)

# A transformers DINOv2 with 16-pixel patches at 64x64 and four blocks: a plain ViT
# for the simple pyramid.
HF_DINOV2_64 = dict(
    hidden_size=32,
    num_hidden_layers=4,
    num_attention_heads=2,
    image_size=64,
    patch_size=16,
    mlp_ratio=2,
)


class FiveStageNet(nn.Module):
    """A module of one's own: five stride-2 stages (reductions 2 to 32) and a head."""

    def __init__(self) -> None:
        super().__init__()
        widths = [3, 8, 16, 24, 32, 48]
        self.stages = nn.ModuleList(
            nn.Sequential(nn.Conv2d(a, b, 3, 2, 1), nn.BatchNorm2d(b), nn.ReLU())
            for a, b in pairwise(widths)
        )
        self.head = nn.Linear(widths[-1], 10)

    def forward(self, x: Tensor) -> Tensor:
        for stage in self.stages:
            x = stage(x)
        return self.head(x.mean((2, 3)))
