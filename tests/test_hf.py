"""The transformers backend: levels, parity with the models' own outputs, loading, work saved.

Every model is random-init from a tiny config; "pretrained" weights are files
the tests write with ``save_pretrained`` and load back through ``hf:<dir>``.
"""

from __future__ import annotations

import copy
import pickle
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import unifeat

transformers = pytest.importorskip("transformers")
from transformers import AutoConfig, AutoModel  # noqa: E402
from transformers.models.auto.modeling_auto import MODEL_FOR_BACKBONE_MAPPING_NAMES  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

hf_logging.set_verbosity_error()

_TOKENS = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=4,
    num_attention_heads=2,
    image_size=32,
    patch_size=8,
)
# DINOv2 and ViTDet size their MLP by mlp_ratio; an intermediate_size would be a
# keyword their configs do not take (refused, not silently ignored).
_DINO = {**{k: v for k, v in _TOKENS.items() if k != "intermediate_size"}, "mlp_ratio": 2}
_STAGES = dict(hidden_sizes=[16, 32, 48, 64], depths=[1, 1, 2, 1])
_SWIN = dict(embed_dim=16, depths=[1, 1, 2, 1], num_heads=[1, 2, 2, 4], image_size=64, patch_size=4)

# Tiny configs, and for each type the prefix tokens its token maps drop.
TOKEN_MODELS: dict[str, tuple[dict[str, Any], int]] = {
    "vit": (_TOKENS, 1),
    "deit": (_TOKENS, 2),
    "beit": (_TOKENS, 1),
    "data2vec-vision": (_TOKENS, 1),
    "vit_msn": (_TOKENS, 1),
    "ijepa": (_TOKENS, 0),
    "dinov2": (_DINO, 1),
    "dinov2_with_registers": ({**_DINO, "num_register_tokens": 4}, 5),
    "dinov3_vit": ({**_TOKENS, "num_register_tokens": 4}, 5),
    "clip_vision_model": (_TOKENS, 1),
    "siglip_vision_model": (_TOKENS, 0),
}
MAP_MODELS: dict[str, dict[str, Any]] = {
    "resnet": dict(embedding_size=8, layer_type="bottleneck", **_STAGES),
    "regnet": dict(embedding_size=8, groups_width=8, **_STAGES),
    "bit": dict(embedding_size=8, num_groups=4, **_STAGES),
    "convnext": dict(image_size=64, **_STAGES),
    "convnextv2": dict(image_size=64, **_STAGES),
    "swin": dict(window_size=2, **_SWIN),
    "swinv2": dict(window_size=2, **_SWIN),
    "vitdet": dict(_DINO, image_size=64, pretrain_image_size=64, patch_size=16),
    "pvt_v2": dict(_STAGES, num_attention_heads=[1, 1, 2, 2], image_size=64),
}
ALL_MODELS = {**{k: v[0] for k, v in TOKEN_MODELS.items()}, **MAP_MODELS}


def _native(model_type: str) -> nn.Module:
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **ALL_MODELS[model_type])
    return AutoModel.from_config(config).eval()


def _input(model: nn.Module, batch: int = 2, size: int | None = None) -> Tensor:
    config = model.config
    side = size or getattr(config, "image_size", None) or 64
    side = side if isinstance(side, int) else side[0]
    return torch.randn(batch, getattr(config, "num_channels", 3), side, side)


def _input_for(model: unifeat.FeatureModel, size: int | None = None) -> Tensor:
    channels, height, width = model.input_size
    return torch.randn(2, channels, size or height, size or width)


def _all(info: unifeat.FeatureInfo) -> list[int]:
    return list(range(len(info)))


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every tiny model, written once with ``save_pretrained``."""
    root = tmp_path_factory.mktemp("hf")
    paths = {}
    for model_type in ALL_MODELS:
        path = root / model_type
        _native(model_type).save_pretrained(path)
        paths[model_type] = path
    return paths


# -- levels -------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", sorted(ALL_MODELS))
def test_levels_match_output_shapes(model_type: str) -> None:
    kwargs = ALL_MODELS[model_type]
    info = unifeat.feature_info(f"hf:{model_type}", **kwargs)
    model = unifeat.create_model(
        f"hf:{model_type}", features_only=True, out_indices=_all(info), **kwargs
    ).eval()
    x = _input_for(model)
    with torch.no_grad():
        maps = model(x)
    assert len(maps) == len(info) >= 4
    for level, feature_map in zip(info.get_dicts(idx=_all(info)), maps, strict=True):
        assert feature_map.shape[1] == level["num_chs"]
        assert x.shape[-1] // feature_map.shape[-1] == level["reduction"]
    reductions = info.reduction(_all(info))
    assert reductions == sorted(reductions)


@pytest.mark.parametrize("model_type", sorted(TOKEN_MODELS))
def test_token_models_have_one_level_per_block_and_timm_default(model_type: str) -> None:
    info = unifeat.feature_info(f"hf:{model_type}", **ALL_MODELS[model_type])
    assert len(info) == _TOKENS["num_hidden_layers"]
    assert set(info.reduction(_all(info))) == {_TOKENS["patch_size"]}
    assert info.out_indices == (1, 2, 3)  # the last 3 blocks, as timm's ViTs


def test_resnet50_levels_are_the_common_ones() -> None:
    """docs/levels.md: transformers' ResNet-50 has the same levels as timm's and torchvision's."""
    info = unifeat.feature_info("hf:resnet")
    pairs = list(zip(info.channels(_all(info)), info.reduction(_all(info)), strict=True))
    assert pairs == [(64, 2), (256, 4), (512, 8), (1024, 16), (2048, 32)]
    assert info.out_indices == (0, 1, 2, 3, 4)
    assert info.module_name(0) == "embedder.embedder"


@pytest.mark.parametrize(
    "model_type,expected",
    [
        ("convnext", [(96, 4), (192, 8), (384, 16), (768, 32)]),
        ("swin", [(96, 4), (192, 8), (384, 16), (768, 32)]),
    ],
)
def test_default_configs_match_timm_levels(
    model_type: str, expected: list[tuple[int, int]]
) -> None:
    info = unifeat.feature_info(f"hf:{model_type}")
    assert list(zip(info.channels(), info.reduction(), strict=True)) == expected


def test_feature_info_of_a_giant_model_allocates_nothing() -> None:
    """DINOv2-giant's shape (1.1 B parameters) answers from the meta device."""
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    info = unifeat.feature_info(
        "hf:dinov2",
        hidden_size=1536,
        num_hidden_layers=40,
        num_attention_heads=24,
        mlp_ratio=4,
        patch_size=14,
        image_size=518,
    )
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert len(info) == 40 and info.channels() == [1536] * 3 and info.reduction() == [14] * 3
    assert grown_mib < 500  # the weights alone would be ~4.4 GB


# -- parity with the models' own outputs --------------------------------------------


@pytest.mark.parametrize("model_type", sorted(TOKEN_MODELS))
def test_token_maps_equal_the_models_hidden_states(model_type: str, saved: dict[str, Path]) -> None:
    native = AutoModel.from_pretrained(saved[model_type]).eval()
    model = unifeat.create_model(
        f"hf:{saved[model_type]}",
        pretrained=True,
        features_only=True,
        out_indices=(0, 1, 2, 3),
        return_prefix_tokens=True,
    ).eval()
    x = _input(native)
    with torch.no_grad():
        hidden = native(pixel_values=x, output_hidden_states=True).hidden_states
        maps = model(x)
    prefix = TOKEN_MODELS[model_type][1]
    grid = x.shape[-1] // _TOKENS["patch_size"]
    for block, (feature_map, prefix_tokens) in enumerate(maps):
        tokens = hidden[block + 1]  # hidden_states[0] is the embedding output
        expected = tokens[:, prefix:].reshape(2, grid, grid, -1).permute(0, 3, 1, 2)
        assert torch.equal(feature_map, expected), f"block {block}"
        assert torch.equal(prefix_tokens, tokens[:, :prefix])
        assert prefix_tokens.shape == (2, prefix, _TOKENS["hidden_size"])


def _reference_backbone(model_type: str, path: Path) -> nn.Module:
    """The model's own ``*Backbone`` with every stage out, without the per-stage
    norms it adds (they are not part of the base model the weights come from)."""
    name = MODEL_FOR_BACKBONE_MAPPING_NAMES[model_type]
    backbone = getattr(transformers, name).from_pretrained(path, out_indices=(1, 2, 3, 4))
    norms = getattr(backbone, "hidden_states_norms", None)
    if norms is not None:
        for name in list(norms.keys()):
            norms[name] = nn.Identity()
    return backbone.eval()


@pytest.mark.parametrize(
    "model_type", ["bit", "convnext", "convnextv2", "resnet", "swin", "swinv2"]
)
def test_stage_maps_equal_the_models_backbone(model_type: str, saved: dict[str, Path]) -> None:
    reference = _reference_backbone(model_type, saved[model_type])
    model = unifeat.create_model(
        f"hf:{saved[model_type]}", pretrained=True, features_only=True, out_indices=(-4, -3, -2, -1)
    ).eval()
    x = _input_for(model)
    with torch.no_grad():
        expected = reference(pixel_values=x).feature_maps
        maps = model(x)
    assert len(maps) == len(expected) == 4
    for stage, (ours, theirs) in enumerate(zip(maps, expected, strict=True)):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6, msg=f"stage {stage}")


@pytest.mark.parametrize("model_type", sorted(ALL_MODELS))
def test_final_output_is_the_models_last_hidden_state(model_type: str) -> None:
    """forward_intermediates' final output of a feature model that keeps the final norm
    (``norm=True``, where the model has one) is what the model itself gives as its
    unpooled output after its final norm (docs/levels.md): last_hidden_state, in
    the model's own layout (tokens for ViTs and Swin, maps for conv nets and PVT
    v2, BiT's pre-activation norm included)."""
    native = _native(model_type)
    try:
        model = unifeat.create_model(native, features_only=True, norm=True).eval()
    except unifeat.UnsupportedOptionError as refused:
        assert "no final norm" in str(refused), refused
        model = unifeat.create_model(native, features_only=True).eval()
    x = _input(native)
    with torch.no_grad():
        final, _ = model.forward_intermediates(x)
        expected = native(pixel_values=x).last_hidden_state
    torch.testing.assert_close(final, expected, rtol=0, atol=0)


def test_vitdet_blocks_equal_its_hidden_states(saved: dict[str, Path]) -> None:
    """ViTDet is a plain ViT whose blocks return maps: one level per block."""
    native = AutoModel.from_pretrained(saved["vitdet"]).eval()
    model = unifeat.create_model(f"hf:{saved['vitdet']}", pretrained=True, features_only=True)
    assert model.feature_info.out_indices == (1, 2, 3)
    x = _input(native)
    with torch.no_grad():
        hidden = native(pixel_values=x, output_hidden_states=True).hidden_states
        maps = model.eval()(x)
    for ours, theirs in zip(maps, hidden[2:], strict=True):
        assert torch.equal(ours, theirs)


@pytest.mark.parametrize("model_type", ["regnet", "pvt_v2"])
def test_stages_equal_the_models_hidden_states(model_type: str, saved: dict[str, Path]) -> None:
    """RegNet and PVT v2 have no ``*Backbone``: their hidden states are the stage maps
    (RegNet's also the stem's)."""
    native = AutoModel.from_pretrained(saved[model_type]).eval()
    model = unifeat.create_model(f"hf:{saved[model_type]}", pretrained=True, features_only=True)
    x = _input(native, size=64)
    with torch.no_grad():
        hidden = native(pixel_values=x, output_hidden_states=True).hidden_states
        maps = model.eval()(x)
    assert len(maps) == len(hidden) >= 4
    for ours, theirs in zip(maps, hidden, strict=True):
        assert torch.equal(ours, theirs)


def test_resnet_stem_level_is_the_stride_2_conv_output(saved: dict[str, Path]) -> None:
    native = AutoModel.from_pretrained(saved["resnet"]).eval()
    model = unifeat.create_model(
        f"hf:{saved['resnet']}", pretrained=True, features_only=True, out_indices=(0,)
    ).eval()
    x = _input(native, size=64)
    with torch.no_grad():
        (stem,) = model(x)
        assert torch.equal(stem, native.embedder.embedder(x))


def test_other_input_sizes_interpolate_position_embeddings() -> None:
    model = unifeat.create_model("hf:vit", features_only=True, out_indices=(-1,), **_TOKENS).eval()
    with torch.no_grad():
        (feature_map,) = model(torch.randn(1, 3, 48, 64))
    assert feature_map.shape == (1, 32, 6, 8)


# -- loading --------------------------------------------------------------------------


def test_pretrained_from_a_local_directory_loads_the_saved_weights(saved: dict[str, Path]) -> None:
    native = AutoModel.from_pretrained(saved["vit"])
    loaded = unifeat.create_model(f"hf:{saved['vit']}", pretrained=True, features_only=True)
    torch.manual_seed(1)
    random = unifeat.create_model(f"hf:{saved['vit']}", features_only=True)
    weight = "embeddings.patch_embeddings.projection.weight"
    assert torch.equal(loaded.state_dict()[weight], native.state_dict()[weight])
    assert not torch.equal(random.state_dict()[weight], native.state_dict()[weight])


def test_checkpoint_path_loads_a_state_dict_file(tmp_path: Path) -> None:
    native = _native("convnext")
    path = tmp_path / "convnext.pth"
    torch.save(native.state_dict(), path)
    model = unifeat.create_model(
        "hf:convnext", features_only=True, checkpoint_path=path, **MAP_MODELS["convnext"]
    ).eval()
    x = _input(native)
    with torch.no_grad():
        hidden = native(pixel_values=x, output_hidden_states=True).hidden_states
        maps = model(x)
    for ours, theirs in zip(maps, hidden[1:], strict=True):
        assert torch.equal(ours, theirs)


def test_config_keyword_takes_a_pretrained_config() -> None:
    config = AutoConfig.for_model("vit", **_TOKENS)
    info = unifeat.feature_info("hf:vit", config=config)
    assert len(info) == 4 and info.channels() == [32, 32, 32]


def test_image_text_models_use_their_vision_tower() -> None:
    vision = dict(_TOKENS)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    torch.manual_seed(0)
    clip = AutoModel.from_config(
        AutoConfig.for_model("clip", vision_config=vision, text_config=text)
    ).eval()
    model = unifeat.create_model(clip, features_only=True, out_indices=(-1,)).eval()
    x = _input(clip.vision_model)
    with torch.no_grad():
        hidden = clip.vision_model(pixel_values=x, output_hidden_states=True).hidden_states
        (feature_map,) = model(x)
    assert torch.equal(feature_map, hidden[4][:, 1:].reshape(2, 4, 4, 32).permute(0, 3, 1, 2))
    assert model.backend == "hf"
    info = unifeat.feature_info("hf:clip", vision_config=vision, text_config=text)
    assert info.module_name() == ["encoder.layers.1", "encoder.layers.2", "encoder.layers.3"]


# -- the user's model, and work saved ---------------------------------------------------


def test_a_task_model_passed_in_is_shared_not_mutated() -> None:
    torch.manual_seed(0)
    config = AutoConfig.for_model("vit", num_labels=5, **_TOKENS)
    source = transformers.ViTForImageClassification(config).eval()
    keys = list(source.state_dict())
    model = unifeat.create_model(source, features_only=True, out_indices=(1,)).eval()
    assert len(source.vit.layers) == 4 and isinstance(source.classifier, nn.Linear)
    assert list(source.state_dict()) == keys
    ours = dict(model.named_parameters())  # the source's names, no prefix of unifeat's
    assert ours["vit.embeddings.cls_token"] is source.vit.embeddings.cls_token
    # State-dict keys are the source's (what was cut off is ignored on load).
    assert set(model.state_dict()) <= set(keys)
    model.load_state_dict(source.state_dict())
    x = _input(source)
    with torch.no_grad():
        hidden = source.vit(pixel_values=x, output_hidden_states=True).hidden_states
        (feature_map,) = model(x)
    assert torch.equal(feature_map, hidden[2][:, 1:].reshape(2, 4, 4, 32).permute(0, 3, 1, 2))
    assert model.feature_info.module_name() == ["vit.layers.1"]


def test_level_2_of_a_12_layer_vit_runs_3_layers_and_a_quarter_of_the_flops() -> None:
    from torch.utils.flop_counter import FlopCounterMode

    kwargs = {**_TOKENS, "num_hidden_layers": 12, "image_size": 64}
    torch.manual_seed(0)
    native = AutoModel.from_config(AutoConfig.for_model("vit", **kwargs)).eval()
    model = unifeat.create_model(native, features_only=True, out_indices=(2,)).eval()
    ran: list[int] = []
    for layers in (native.layers, model.layers):  # the feature model's own copies
        for i, layer in enumerate(layers):
            layer.register_forward_hook(lambda *_, i=i: ran.append(i))
    x = _input(native)
    with torch.no_grad():
        with FlopCounterMode(display=False) as full:
            hidden = native(pixel_values=x, output_hidden_states=True).hidden_states
        native_ran, ran[:] = list(ran), []
        with FlopCounterMode(display=False) as truncated:
            (feature_map,) = model(x)
    assert native_ran == list(range(12))
    assert ran == [0, 1, 2]
    assert truncated.get_total_flops() < 0.3 * full.get_total_flops()
    assert torch.equal(feature_map, hidden[3][:, 1:].reshape(2, 8, 8, 32).permute(0, 3, 1, 2))


def test_prune_and_forward_intermediates() -> None:
    model = unifeat.create_model("hf:resnet", features_only=True, **MAP_MODELS["resnet"]).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        full = model(x)
        final, maps = model.forward_intermediates(x, indices=(1, -1))
        assert torch.equal(maps[0], full[1]) and torch.equal(maps[1], full[4])
        assert torch.equal(final, full[4])
        assert model.prune_intermediate_layers((-3, 1)) == [1, 2]
        pruned = model(x)
    assert [m.shape for m in pruned] == [full[1].shape, full[2].shape]
    assert torch.equal(pruned[1], full[2])
    assert len(model.encoder.stages) == 2
    with pytest.raises(unifeat.InvalidIndicesError, match="pruned after level 2"):
        model.forward_intermediates(x, indices=(3,))
    with pytest.raises(unifeat.UnsupportedOptionError, match="norm=True"):
        model.forward_intermediates(x, norm=True)


def test_dict_output_nhwc_and_gradients() -> None:
    model = unifeat.create_model(
        "hf:swin",
        features_only=True,
        out_indices=(0, 2),
        output_type="dict",
        output_fmt="NHWC",
        **MAP_MODELS["swin"],
    ).train()
    out = model(torch.randn(2, 3, 64, 64))
    assert list(out) == ["encoder.layers.0", "encoder.layers.2"]
    assert out["encoder.layers.2"].shape == (2, 4, 4, 64)
    sum(t.sum() for t in out.values()).backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    assert all(g is not None for n, g in grads.items() if ".layers.3." not in n)
    assert not any(".layers.3." in n for n in grads)  # the last stage was cut off


def test_deepcopy_pickle_and_modes() -> None:
    model = unifeat.create_model("hf:dinov2", features_only=True, **_DINO).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
            got = clone(x)
            assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
    assert model.train().training and not model.eval().training


def test_output_stride_dilates_conv_models() -> None:
    for stride, expected in ((16, [2, 4, 8, 16, 16]), (8, [2, 4, 8, 8, 8])):
        info = unifeat.feature_info("hf:resnet", output_stride=stride, **MAP_MODELS["resnet"])
        assert info.reduction() == expected
        model = unifeat.create_model(
            "hf:resnet", features_only=True, output_stride=stride, **MAP_MODELS["resnet"]
        ).eval()
        with torch.no_grad():
            maps = model(torch.randn(1, 3, 64, 64))
        assert [64 // m.shape[-1] for m in maps] == expected
    info = unifeat.feature_info("hf:convnext", output_stride=16, **MAP_MODELS["convnext"])
    assert info.reduction() == [4, 8, 16, 16]


def test_output_stride_of_token_models_is_their_patch_size() -> None:
    info = unifeat.feature_info("hf:vit", output_stride=8, **_TOKENS)
    assert info.reduction() == [8, 8, 8]
    with pytest.raises(unifeat.UnsupportedOptionError, match=r"output_stride=4 .*8 \(its patch"):
        unifeat.create_model("hf:vit", features_only=True, output_stride=4, **_TOKENS)


# -- names and errors ----------------------------------------------------------------------


def test_list_models_and_bare_names() -> None:
    listed = unifeat.list_models(backend="hf")
    assert set(ALL_MODELS) <= set(listed)
    assert unifeat.create_model("dinov2", features_only=True, **_DINO).backend == "hf"


def test_errors_name_the_bad_value() -> None:
    with pytest.raises(unifeat.UnknownModelError, match="hf:dinov2"):
        unifeat.create_model("hf:dinov3", features_only=True)
    with pytest.raises(unifeat.UnsupportedOptionError, match="hub id or a local directory"):
        unifeat.create_model("hf:vit", pretrained=True, features_only=True)
    with pytest.raises(unifeat.InvalidNodeError, match=r"unknown node 'layers\.99'"):
        unifeat.create_model("hf:vit", features_only=True, return_nodes=["layers.99"], **_TOKENS)
    with pytest.raises(unifeat.UnsupportedOptionError, match="'convnext' config"):
        unifeat.feature_info("hf:vit", config=AutoConfig.for_model("convnext"))
    with pytest.raises(unifeat.UnsupportedOptionError, match="return_prefix_tokens"):
        unifeat.create_model("hf:resnet", features_only=True, return_prefix_tokens=True)
    with pytest.raises(unifeat.InvalidIndicesError, match=r"0\.\.3 or -4\.\.-1"):
        unifeat.create_model("hf:vit", features_only=True, out_indices=(4,), **_TOKENS)
    with pytest.raises(unifeat.UnsupportedOptionError, match="no base model"):
        unifeat.feature_info("hf:vision-encoder-decoder")


@pytest.mark.parametrize("model_type", ["dinov2", "resnet"])
def test_torch_compile_gives_the_eager_maps(model_type: str) -> None:
    model = unifeat.create_model(
        f"hf:{model_type}", features_only=True, **ALL_MODELS[model_type]
    ).eval()
    x = _input_for(model, size=64 if model_type == "resnet" else None)
    with torch.no_grad():
        eager = model(x)
        compiled = torch.compile(model)(x)
    for ours, theirs in zip(compiled, eager, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


def test_node_names_are_module_paths_and_return_nodes_takes_them() -> None:
    """transformers models do not trace with FX: their node names are module paths,
    in the order the modules finish, and return_nodes takes them (full or truncated)
    with torchvision's key and order rules."""
    train, evaluation = unifeat.get_node_names("hf:vit", **_TOKENS)
    assert train == evaluation
    layers = [n for n in evaluation if re.fullmatch(r"(\w+\.)*layers?\.\d+", n)]
    assert len(layers) == _TOKENS["num_hidden_layers"]
    block, attention = layers[1], f"{layers[2]}.attention"
    assert attention in evaluation
    torch.manual_seed(0)
    native = AutoModel.from_config(AutoConfig.for_model("vit", **_TOKENS)).eval()
    model = unifeat.create_model(
        native, features_only=True, return_nodes={attention: "attn", block: "b1"}
    ).eval()
    x = _input(native)
    with torch.no_grad():
        out = model(x)
        hidden = native(pixel_values=x, output_hidden_states=True).hidden_states
    assert list(out) == ["b1", "attn"]  # depth order, keys from the dict
    torch.testing.assert_close(out["b1"], hidden[2], rtol=0, atol=0)
    assert model.feature_info.module_name() == ["b1", "attn"]
    with pytest.raises(unifeat.InvalidNodeError, match="close matches"):
        unifeat.create_model(native, features_only=True, return_nodes=[f"{block}x"])


def test_dtype_and_channels_last_inputs() -> None:
    model = unifeat.create_model("hf:dinov2", features_only=True, **_DINO).eval()
    with torch.no_grad():
        maps = model.to(torch.bfloat16)(torch.randn(2, 3, 32, 32, dtype=torch.bfloat16))
    assert [m.dtype for m in maps] == [torch.bfloat16] * 3
    resnet = unifeat.create_model("hf:resnet", features_only=True, **MAP_MODELS["resnet"]).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = resnet(x)
        got = resnet(x.to(memory_format=torch.channels_last))
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "names",
    [
        ("timm:resnet50", "tv:resnet50", "hf:resnet"),
        ("timm:convnext_tiny", "tv:convnext_tiny", "hf:convnext"),
        ("timm:swin_tiny_patch4_window7_224", "tv:swin_t", "hf:swin"),
        ("timm:vit_base_patch16_224", "tv:vit_b_16", "hf:vit"),
        ("timm:pvt_v2_b0", "hf:pvt_v2"),  # torchvision has no PVT
    ],
)
def test_the_same_architecture_has_the_same_levels_in_every_backend(names: tuple[str, ...]) -> None:
    """docs/levels.md, on metadata: transformers' default configs are these architectures."""
    level_lists = []
    for name in names:
        info = unifeat.feature_info(name)
        indices = _all(info)
        pairs = zip(info.channels(indices), info.reduction(indices), strict=True)
        level_lists.append(list(pairs))
    assert all(levels == level_lists[0] for levels in level_lists[1:])
