"""Small model configurations the tests share: fast on two CPUs, random init."""

from __future__ import annotations

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
