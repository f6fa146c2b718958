"""transformers model types beyond the ones with a plain layout: token models whose
stages change the token count, stages held as block lists, windowed ViTs, models
that take patches or wrap a timm model. Each is checked against the model's own
outputs (hidden states, its ``*Backbone``'s maps, or the timm model inside), and
default configs against timm's levels where the architectures match.
"""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import unifeat

transformers = pytest.importorskip("transformers")
from transformers import AutoConfig, AutoModel  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

hf_logging.set_verbosity_error()

_SWINLIKE = dict(embed_dim=16, depths=[1, 1, 1, 1], image_size=64)
TINY: dict[str, dict[str, Any]] = {
    "focalnet": _SWINLIKE,
    "maskformer-swin": dict(_SWINLIKE, num_heads=[1, 1, 2, 2], window_size=2),
    "hiera": dict(_SWINLIKE, num_heads=[1, 1, 2, 2], image_size=[64, 64]),
    "levit": dict(
        hidden_sizes=[16, 32, 48],
        num_attention_heads=[1, 2, 2],
        depths=[1, 1, 1],
        key_dim=[8, 8, 8],
        image_size=64,
    ),
    "pvt": dict(
        hidden_sizes=[16, 32, 48, 64],
        depths=[1, 2, 1, 1],
        num_attention_heads=[1, 1, 2, 2],
        image_size=64,
    ),
    "poolformer": dict(hidden_sizes=[16, 32, 48, 64], depths=[1, 2, 1, 1]),
    "metaclip_2": dict(
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=4,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        )
    ),
    "siglip2": dict(
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=4,
            num_attention_heads=2,
            patch_size=8,
            num_patches=16,
        )
    ),
    "rf_detr_dinov2": dict(
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        image_size=64,
        patch_size=8,
        num_windows=2,
        window_block_indexes=[0, 2],
    ),
    "lw_detr_vit": dict(
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        image_size=64,
        patch_size=8,
        num_windows=4,
        window_block_indices=[0, 2],
    ),
    "timm_wrapper": dict(architecture="resnet18"),
    "efficientnet": dict(width_coefficient=0.25, depth_coefficient=0.25, hidden_dim=320),
    "pp_lcnet": dict(scale=0.25),
    # Configs without num_channels: their forward's pixel_values makes them vision models.
    "textnet": dict(stem_out_channels=8, hidden_sizes=[8, 8, 16, 24, 32], depths=[1, 1, 1, 1]),
    "pp_lcnet_v3": dict(scale=0.25),
}
_SIZES = {"siglip2": 32, "metaclip_2": 32}


def _size(model_type: str) -> int:
    return _SIZES.get(model_type, 64)


def _levels(model_type: str) -> unifeat.FeatureInfo:
    return unifeat.feature_info(
        f"hf:{model_type}", input_size=_size(model_type), **TINY[model_type]
    )


def _native(model_type: str) -> nn.Module:
    torch.manual_seed(0)
    return AutoModel.from_config(AutoConfig.for_model(model_type, **TINY[model_type])).eval()


def _features(native: nn.Module, model_type: str) -> tuple[nn.Module, Tensor]:
    info = _levels(model_type)
    model = unifeat.create_model(
        native,
        features_only=True,
        out_indices=list(range(len(info))),
        input_size=_size(model_type),
    ).eval()
    size = _size(model_type)
    return model, torch.randn(2, 3, size, size)


@pytest.mark.parametrize("model_type", sorted(TINY))
def test_levels_match_the_maps_of_a_real_forward(model_type: str) -> None:
    info = _levels(model_type)
    size = _size(model_type)
    every = list(range(len(info)))
    model = unifeat.create_model(
        f"hf:{model_type}",
        features_only=True,
        out_indices=every,
        input_size=size,
        **TINY[model_type],
    ).eval()
    with torch.no_grad():
        maps = model(torch.randn(2, 3, size, size))
    reductions = info.reduction(every)
    assert reductions == sorted(reductions) and len(maps) == len(info)
    for feature_map, level in zip(maps, info.get_dicts(idx=every), strict=True):
        assert feature_map.shape[1] == level["num_chs"]
        assert -(-size // level["reduction"]) == feature_map.shape[-1]


def _tokens_to_map(tokens: Tensor, rows: int) -> Tensor:
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], rows, -1)


def test_focalnet_stages_equal_its_maps_before_downsampling() -> None:
    """Each stage returns its tokens before downsampling (the encoder's own switch for
    them reshapes them with the dimensions after it, so the stages are run here)."""
    native = _native("focalnet")
    model, x = _features(native, "focalnet")
    with torch.no_grad():
        ours = model(x)
        hidden, dims = native.embeddings(x)
        theirs = []
        for stage in native.encoder.stages:
            after, before, _ = stage(hidden, dims)
            theirs.append(_tokens_to_map(before, dims[0]))
            hidden, dims = after, (-(-dims[0] // 2), -(-dims[1] // 2))
    for mine, ref in zip(ours, theirs, strict=True):
        torch.testing.assert_close(mine, ref, rtol=0, atol=0)


def test_hiera_stages_equal_its_rerolled_hidden_states() -> None:
    native = _native("hiera")
    model, x = _features(native, "hiera")
    with torch.no_grad():
        ours = model(x)
        theirs = native(pixel_values=x, output_hidden_states=True).reshaped_hidden_states[1:]
    for mine, ref in zip(ours, theirs, strict=True):
        torch.testing.assert_close(mine, ref.permute(0, 3, 1, 2), rtol=0, atol=0)


def test_poolformer_and_pvt_stages_held_as_block_lists() -> None:
    poolformer = _native("poolformer")
    model, x = _features(poolformer, "poolformer")
    with torch.no_grad():
        ours = model(x)
        theirs = poolformer(pixel_values=x, output_hidden_states=True).hidden_states
    for mine, ref in zip(ours, theirs, strict=True):
        torch.testing.assert_close(mine, ref, rtol=0, atol=0)

    pvt = _native("pvt")
    model, x = _features(pvt, "pvt")
    with torch.no_grad():
        ours = model(x)
        hidden = pvt(pixel_values=x, output_hidden_states=True).hidden_states
    # One hidden state per block (depths 1-2-1-1), then the final norm; the level of a
    # stage is its last block's output, and of the last stage the normed one.
    picks = [hidden[0], hidden[2], hidden[3], hidden[5]]
    for mine, ref, rows in zip(ours, picks, [16, 8, 4, 2], strict=True):
        prefix = ref.shape[1] - rows * rows  # the last stage carries a class token
        torch.testing.assert_close(mine, _tokens_to_map(ref[:, prefix:], rows), rtol=0, atol=0)


def test_maskformer_swin_stages_equal_its_backbone() -> None:
    from transformers import MaskFormerSwinBackbone

    torch.manual_seed(0)
    config = AutoConfig.for_model("maskformer-swin", **TINY["maskformer-swin"])
    config.out_features = ["stage1", "stage2", "stage3", "stage4"]
    backbone = MaskFormerSwinBackbone(config).eval()
    for index in range(len(backbone.hidden_states_norms)):
        backbone.hidden_states_norms[index] = nn.Identity()  # not in the base model
    native = _native("maskformer-swin")
    native.load_state_dict(backbone.model.state_dict())  # its Swin, under `model`
    model, x = _features(native, "maskformer-swin")
    with torch.no_grad():
        for mine, ref in zip(model(x), backbone(x).feature_maps, strict=True):
            torch.testing.assert_close(mine, ref, rtol=0, atol=0)


@pytest.mark.parametrize("model_type", ["rf_detr_dinov2", "lw_detr_vit"])
def test_windowed_vits_equal_their_backbones_maps(model_type: str) -> None:
    from transformers import AutoBackbone

    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **TINY[model_type])
    config.out_features = [f"stage{i}" for i in range(1, 5)]
    if hasattr(config, "apply_layernorm"):
        config.apply_layernorm = False
    backbone = AutoBackbone.from_config(config).eval()
    model, x = _features(backbone, model_type)
    with torch.no_grad():
        for mine, ref in zip(model(x), backbone(x).feature_maps, strict=True):
            torch.testing.assert_close(mine, ref, rtol=0, atol=0)


def test_siglip2_takes_pixels_and_equals_its_hidden_states() -> None:
    native = _native("siglip2").vision_model
    model, x = _features(native, "siglip2")
    patches = x.reshape(2, 3, 4, 8, 4, 8).permute(0, 2, 4, 3, 5, 1).reshape(2, 16, 192)
    with torch.no_grad():
        ours = model(x)
        theirs = native(
            pixel_values=patches,
            pixel_attention_mask=torch.ones(2, 16, dtype=torch.long),
            spatial_shapes=torch.tensor([[4, 4], [4, 4]]),
            output_hidden_states=True,
        ).hidden_states[1:]
    for mine, ref in zip(ours, theirs, strict=True):
        torch.testing.assert_close(mine, _tokens_to_map(ref, 4), rtol=1e-5, atol=1e-5)


def test_metaclip2_vision_tower_equals_its_hidden_states() -> None:
    native = _native("metaclip_2")
    model, x = _features(native, "metaclip_2")
    x = x[..., :32, :32]
    with torch.no_grad():
        ours = model(x)
        theirs = native.vision_model(pixel_values=x, output_hidden_states=True).hidden_states[1:]
    for mine, ref in zip(ours, theirs, strict=True):
        torch.testing.assert_close(mine, _tokens_to_map(ref[:, 1:], 4), rtol=0, atol=0)


def test_a_timm_model_inside_transformers_runs_timms_intermediates() -> None:
    native = _native("timm_wrapper")
    model, x = _features(native, "timm_wrapper")
    assert model.feature_info.module_name()[0] == "timm_model.act1"
    with torch.no_grad():
        ours = model(x)
        theirs = native.timm_model.forward_intermediates(x, intermediates_only=True)
    for mine, ref in zip(ours, theirs, strict=True):
        torch.testing.assert_close(mine, ref, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("model_type", "timm_name"),
    [
        ("levit", "levit_128s"),
        ("efficientnet", "efficientnet_b7"),
        ("pp_lcnet", "lcnet_100"),
        ("poolformer", "poolformer_s12"),
        ("focalnet", "focalnet_tiny_srf"),
        ("hiera", "hiera_tiny_224"),
        ("maskformer-swin", "swin_tiny_patch4_window7_224"),
    ],
)
def test_default_configs_have_timms_levels(model_type: str, timm_name: str) -> None:
    """Where transformers' default config is an architecture timm has, the levels are
    the same (channels, reductions)."""
    ours = unifeat.feature_info(f"hf:{model_type}")
    theirs = unifeat.feature_info(f"timm:{timm_name}")
    every = list(range(len(theirs)))
    assert list(zip(ours.channels(every), ours.reduction(every), strict=True)) == list(
        zip(theirs.channels(every), theirs.reduction(every), strict=True)
    )


def test_input_channels_where_the_config_names_none_are_the_first_convs() -> None:
    """TextNet's config has ``stem_num_channels``, not ``num_channels``."""
    model = unifeat.create_model(
        "hf:textnet", features_only=True, input_size=64, stem_num_channels=1, **TINY["textnet"]
    ).eval()
    assert model.input_size == (1, 64, 64)
    with torch.no_grad():
        maps = model(torch.randn(2, 1, 64, 64))
    assert [m.shape[1] for m in maps] == model.feature_info.channels()


@pytest.mark.parametrize(
    ("model_type", "takes"), [("imagegpt", "input_ids"), ("perceiver", "inputs")]
)
def test_a_model_that_takes_no_pixel_values_is_refused_naming_what_it_takes(
    model_type: str, takes: str
) -> None:
    with pytest.raises(unifeat.UnsupportedOptionError, match=rf"takes {takes}, not pixel_values"):
        unifeat.feature_info(f"hf:{model_type}")


def test_uvdoc_backbone_runs() -> None:
    """UVDocBackbone's own code reads fields of its bridge's output, after the blocks:
    a call ends once the deepest level is captured, so nothing after it runs."""
    model = unifeat.create_model("hf:uvdoc_backbone", features_only=True, input_size=64).eval()
    with torch.no_grad():
        maps = model(torch.randn(1, 3, 64, 64))
    assert [m.shape[1] for m in maps] == model.feature_info.channels()


def test_survey_of_every_vision_model_type() -> None:
    """Every transformers model type with an image-classification head or a backbone:
    53 of 58 get levels from their default config; the others say why."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_BACKBONE_MAPPING_NAMES,
        MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES,
    )

    types = set(MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES) | set(
        MODEL_FOR_BACKBONE_MAPPING_NAMES
    )
    refused = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for model_type in sorted(types):
            try:
                unifeat.feature_info(f"hf:{model_type}")
            except unifeat.UnifeatError as error:
                refused[model_type] = str(error)
    assert len(types) == 58
    reasons = {
        "dinat": "requires the natten library",
        "imagegpt": "takes input_ids, not pixel_values",  # color-cluster ids
        "perceiver": "takes inputs, not pixel_values",  # a task preprocessor's output
        "pp_lcnet_v4": "reduce height and width by different factors",  # text lines
        "timm_backbone": "backbone is not set in the config",  # no timm model named
    }
    assert sorted(refused) == sorted(reasons)
    for model_type, reason in reasons.items():
        assert reason in refused[model_type], (model_type, refused[model_type])
