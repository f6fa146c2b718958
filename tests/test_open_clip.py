"""The open_clip backend against open_clip's own image towers: same weights, same maps.

Towers are built from open_clip's own model configs with small overrides
(``layers=4, width=64``), random init; no weights are downloaded.
"""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

import unifeat

open_clip = pytest.importorskip("open_clip")
logging.getLogger().setLevel(logging.ERROR)  # open_clip warns that random init is random

TINY_VIT = dict(layers=4, width=64, head_width=32, image_size=64, patch_size=16)
TINY_RESNET = dict(layers=(1, 1, 1, 1), width=16, head_width=16, image_size=64)


def _tower(name: str, **overrides: object) -> nn.Module:
    """The tower as open_clip builds it, with the same overrides unifeat takes."""
    from open_clip.model import _build_vision_tower

    config = open_clip.get_model_config(name)
    torch.manual_seed(0)
    return _build_vision_tower(config["embed_dim"], {**config["vision_cfg"], **overrides}).eval()


def test_vit_levels_equal_open_clips_forward_intermediates() -> None:
    tower = _tower("ViT-B-32", **TINY_VIT)
    model = unifeat.create_model(
        tower, features_only=True, out_indices=(0, 2, 3), return_prefix_tokens=True
    ).eval()
    assert model.backend == "open_clip"
    assert model.feature_info.module_name() == [f"transformer.resblocks.{i}" for i in (0, 2, 3)]
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ours = model(x)
        theirs = tower.forward_intermediates(
            x, indices=[0, 2, 3], intermediates_only=True, output_extra_tokens=True
        )
    for (feature_map, prefix), ref_map, ref_prefix in zip(
        ours, theirs["image_intermediates"], theirs["image_intermediates_prefix"], strict=True
    ):
        torch.testing.assert_close(feature_map, ref_map, rtol=0, atol=0)
        torch.testing.assert_close(prefix, ref_prefix, rtol=0, atol=0)
        assert feature_map.shape == (2, 64, 4, 4) and prefix.shape == (2, 1, 64)


def test_vit_final_output_is_the_normed_tokens_before_pooling() -> None:
    """With norm=True the final output is the tower's normed tokens before pooling (its
    forward_features); without it, the last block's tokens (docs/levels.md)."""
    tower = _tower("ViT-B-32", **TINY_VIT)
    model = unifeat.create_model(tower, features_only=True, norm=True).eval()
    plain = unifeat.create_model(tower, features_only=True).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        final, _ = model.forward_intermediates(x, indices=(1,))
        last_block, _ = plain.forward_intermediates(x, indices=(1,))
        blocks = tower.transformer(tower._embeds(x))
        tokens = tower.ln_post(blocks)
    torch.testing.assert_close(final, tokens, rtol=0, atol=0)
    torch.testing.assert_close(last_block, blocks, rtol=0, atol=0)
    assert final.shape == (2, 17, 64)  # class token + 4x4 patches, open_clip's own layout
    model.prune_intermediate_layers((1,))
    with torch.no_grad():
        final, _ = model.forward_intermediates(x, indices=(1,))
    assert final.shape == (2, 17, 64)  # block 1, normed: the norm fits every block


def test_resnet_levels_equal_open_clips_forward_intermediates() -> None:
    tower = _tower("RN50", **TINY_RESNET)
    model = unifeat.create_model(tower, features_only=True).eval()
    info = model.feature_info
    assert info.module_name() == ["avgpool", "layer1", "layer2", "layer3", "layer4"]
    assert info.reduction() == [4, 4, 8, 16, 32]
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ours = model(x)
        theirs = tower.forward_intermediates(x, intermediates_only=True)["image_intermediates"]
    for mine, ref in zip(ours, theirs, strict=True):
        torch.testing.assert_close(mine, ref, rtol=0, atol=0)
    pruned = unifeat.create_model(tower, features_only=True, out_indices=(1, 2)).eval()
    assert not any(
        key.startswith(("layer3.", "layer4.", "attnpool.")) for key in pruned.state_dict()
    )
    with torch.no_grad():
        for mine, ref in zip(pruned(x), theirs[1:3], strict=True):
            torch.testing.assert_close(mine, ref, rtol=0, atol=0)


def test_by_name_builds_open_clips_tower_with_its_own_init() -> None:
    torch.manual_seed(0)
    model = unifeat.create_model("oc:ViT-B-32", features_only=True, **TINY_VIT).eval()
    tower = _tower("ViT-B-32", **TINY_VIT)
    assert set(model.state_dict()) <= set(tower.state_dict())
    model.load_state_dict(tower.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ours = model(x)
        theirs = tower.forward_intermediates(x, indices=[1, 2, 3], intermediates_only=True)
    for mine, ref in zip(ours, theirs["image_intermediates"], strict=True):
        torch.testing.assert_close(mine, ref, rtol=0, atol=0)


def test_preprocessing_is_open_clips_own() -> None:
    from PIL import Image

    image = Image.new("RGB", (90, 70), (200, 30, 60))
    model = unifeat.create_model("oc:ViT-B-32", features_only=True, **TINY_VIT)
    from unifeat._feature_model import image_transform

    ours = image_transform(model)(image)
    _, _, preprocess = open_clip.create_model_and_transforms(
        "ViT-B-32", pretrained=None, force_image_size=64
    )
    torch.testing.assert_close(ours, preprocess(image), rtol=0, atol=0)


def test_names_and_errors() -> None:
    assert "open_clip:ViT-B-32" in unifeat.list_models("ViT-B-32")
    assert unifeat.feature_info("openclip:RN50").reduction() == [4, 4, 8, 16, 32]
    with pytest.raises(unifeat.UnsupportedOptionError, match=r"unknown keyword argument 'layer'"):
        unifeat.create_model("oc:ViT-B-32", features_only=True, layer=4)
    with pytest.raises(unifeat.UnsupportedOptionError, match="token model"):
        unifeat.feature_info("oc:ViT-B-32", output_stride=8, **TINY_VIT)


def test_timm_towers_use_the_timm_trunks_levels() -> None:
    model = unifeat.create_model("oc:convnext_base", features_only=True).eval()
    assert model.feature_info.module_name() == [f"trunk.stages.{i}" for i in range(4)]
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ours = model(x)
        theirs = model.trunk.forward_intermediates(x, intermediates_only=True)
    for mine, ref in zip(ours, theirs, strict=True):
        torch.testing.assert_close(mine, ref, rtol=0, atol=0)
