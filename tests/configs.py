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
