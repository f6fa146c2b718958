"""Token models at any input size that is a multiple of their patch size.

One contract for every backend's ViT (timm, torchvision, transformers,
open_clip): at other sizes than the built one the maps have the shapes
``feature_info``'s reductions predict; at the built size the outputs are
bit-identical to the library's own; at another size they equal the library's
own interpolating path (timm's ``dynamic_img_size``, transformers'
``interpolate_pos_encoding``, open_clip's ``resize_pos_embed``, torchvision's
``interpolate_embeddings``); a size that is not a multiple of the patch size
is refused before the model runs. Small random-init configs, built at 64x64
with 16x16 patches.
"""

from __future__ import annotations

import logging
import threading
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torchvision.models.feature_extraction import create_feature_extractor
from torchvision.models.vision_transformer import VisionTransformer, interpolate_embeddings

import unifeat
from tests.configs import HF_VIT_64
from unifeat import UnsupportedOptionError

open_clip = pytest.importorskip("open_clip")
transformers = pytest.importorskip("transformers")
logging.getLogger().setLevel(logging.ERROR)  # open_clip warns that random init is random

NATIVE = (64, 64)
OTHER_SIZES = [(48, 64), (80, 80)]
OFF_GRID = [(50, 64), (64, 72)]
TIMM_KWARGS = dict(img_size=64, depth=2)
TV_KWARGS = dict(image_size=64, patch_size=16, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64)
HF_KWARGS = HF_VIT_64
OC_KWARGS = dict(layers=2, width=64, head_width=32, image_size=64, patch_size=16)


def _grid_map(tokens: Tensor, size: tuple[int, int], patch: int = 16) -> Tensor:
    rows, cols = size[0] // patch, size[1] // patch
    grid = tokens[:, tokens.shape[1] - rows * cols :]
    return grid.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], rows, cols)


# -- each library's own path ------------------------------------------------------------


def _timm_build() -> nn.Module:
    torch.manual_seed(0)
    return unifeat.create_model("timm:vit_tiny_patch16_224", features_only=True, **TIMM_KWARGS)


def _timm_reference(model: Any, x: Tensor) -> list[Tensor]:
    """timm's forward_intermediates: as built at 64x64, dynamic_img_size=True elsewhere."""
    resized = tuple(x.shape[-2:]) != NATIVE
    reference = timm.create_model(
        "vit_tiny_patch16_224", dynamic_img_size=resized, **TIMM_KWARGS
    ).eval()
    reference.load_state_dict(model.state_dict(), strict=False)
    indices = list(model.feature_info.out_indices)
    return list(reference.forward_intermediates(x, indices=indices, intermediates_only=True))


def _tv_source() -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(**TV_KWARGS).eval()  # type: ignore[arg-type]


def _tv_build() -> nn.Module:
    return unifeat.create_model(_tv_source(), features_only=True)


def _tv_reference(model: Any, x: Tensor) -> list[Tensor]:
    """torchvision's create_feature_extractor: of the model as built at 64x64; at a
    square size, of a ViT built for it with torchvision's interpolate_embeddings;
    at a rectangular one (torchvision's ViT asserts a square), its layers by hand
    with the same bicubic, corners-aligned table."""
    source = _tv_source()
    nodes = model.feature_info.get("node")
    height, width = x.shape[-2:]
    if (height, width) == NATIVE or height == width:
        if height != NATIVE[0]:
            state = interpolate_embeddings(height, 16, source.state_dict())
            source = VisionTransformer(**{**TV_KWARGS, "image_size": height}).eval()  # type: ignore[arg-type]
            source.load_state_dict(state)
        found = create_feature_extractor(source, return_nodes=nodes)(x)
        return [_grid_map(t, (height, width)) for t in found.values()]
    pos = source.encoder.pos_embedding
    grid = pos[:, 1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(height // 16, width // 16), mode="bicubic", align_corners=True)
    pos = torch.cat([pos[:, :1], grid.flatten(2).transpose(1, 2)], dim=1)
    tokens = source.conv_proj(x).flatten(2).transpose(1, 2)
    tokens = torch.cat([source.class_token.expand(x.shape[0], -1, -1), tokens], dim=1) + pos
    tokens = source.encoder.dropout(tokens)
    outs = [tokens]
    for layer in source.encoder.layers:
        tokens = layer(tokens)
    outs += [tokens, source.encoder.ln(tokens)]
    return [_grid_map(t, (height, width)) for t in outs]


def _hf_build() -> nn.Module:
    torch.manual_seed(0)
    return unifeat.create_model("hf:vit", features_only=True, **HF_KWARGS)


def _hf_reference(model: Any, x: Tensor) -> list[Tensor]:
    """transformers' hidden states, with interpolate_pos_encoding=True at other sizes."""
    reference = transformers.ViTModel(transformers.ViTConfig(**HF_KWARGS)).eval()
    reference.load_state_dict(model.state_dict(), strict=False)
    resized = tuple(x.shape[-2:]) != NATIVE
    hidden = reference(
        pixel_values=x, output_hidden_states=True, interpolate_pos_encoding=resized
    ).hidden_states
    blocks = [int(name.rsplit(".", 1)[-1]) for name in model.feature_info.module_name()]
    return [_grid_map(hidden[b + 1], tuple(x.shape[-2:])) for b in blocks]


def _oc_build() -> nn.Module:
    torch.manual_seed(0)
    return unifeat.create_model("oc:ViT-B-32", features_only=True, **OC_KWARGS)


def _oc_reference(model: Any, x: Tensor) -> list[Tensor]:
    """open_clip's forward_intermediates of a tower built for the input's size, its
    weights loaded through open_clip's own resize_pos_embed."""
    from open_clip.model import _build_vision_tower, resize_pos_embed

    config = open_clip.get_model_config("ViT-B-32")
    size = tuple(int(s) for s in x.shape[-2:])
    vision = {**config["vision_cfg"], **OC_KWARGS, "image_size": size}
    tower = _build_vision_tower(config["embed_dim"], vision).eval()
    state = {f"visual.{k}": v for k, v in model.state_dict().items()}
    resize_pos_embed(state, types.SimpleNamespace(visual=tower))
    tower.load_state_dict({k.removeprefix("visual."): v for k, v in state.items()}, strict=False)
    indices = list(model.feature_info.out_indices)
    out = tower.forward_intermediates(x, indices=indices, intermediates_only=True)
    return list(out["image_intermediates"])


@dataclass(frozen=True)
class Case:
    id: str
    build: Callable[[], nn.Module]
    reference: Callable[[Any, Tensor], list[Tensor]]


CASES = [
    Case("timm", _timm_build, _timm_reference),
    Case("torchvision", _tv_build, _tv_reference),
    Case("hf", _hf_build, _hf_reference),
    Case("open_clip", _oc_build, _oc_reference),
]
_BUILT: dict[str, nn.Module] = {}


def _model(case: Case) -> Any:
    if case.id not in _BUILT:
        _BUILT[case.id] = case.build().eval()
    return _BUILT[case.id]


def _maps(model: Any, x: Tensor) -> list[Tensor]:
    with torch.no_grad():
        return list(model(x))


@pytest.mark.parametrize("size", OTHER_SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_other_sizes_give_the_maps_feature_info_predicts(case: Case, size: tuple[int, int]) -> None:
    model = _model(case)
    info = model.feature_info
    maps = _maps(model, torch.randn(2, 3, *size))
    for feature_map, reduction, channels in zip(
        maps, info.reduction(), info.channels(), strict=True
    ):
        assert tuple(feature_map.shape) == (2, channels, size[0] // reduction, size[1] // reduction)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_built_size_is_bit_identical_to_the_library(case: Case) -> None:
    model = _model(case)
    x = torch.randn(2, 3, *NATIVE)
    with torch.no_grad():
        theirs = case.reference(model, x)
    for ours, ref in zip(_maps(model, x), theirs, strict=True):
        torch.testing.assert_close(ours, ref, rtol=0, atol=0)


@pytest.mark.parametrize("size", OTHER_SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_other_sizes_equal_the_librarys_own_interpolation(
    case: Case, size: tuple[int, int]
) -> None:
    model = _model(case)
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        theirs = case.reference(model, x)
    for ours, ref in zip(_maps(model, x), theirs, strict=True):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("size", OFF_GRID, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_a_size_off_the_patch_grid_is_refused(case: Case, size: tuple[int, int]) -> None:
    model = _model(case)
    with pytest.raises(UnsupportedOptionError) as caught:
        model(torch.randn(1, 3, *size))
    message = str(caught.value)
    assert f"{size[0]}x{size[1]}" in message
    assert "multiples of 16" in message and "patch size 16" in message
    lower = (size[0] // 16 * 16, size[1] // 16 * 16)
    assert f"{lower[0]}x{lower[1]}" in message  # a valid size nearby
    with pytest.raises(UnsupportedOptionError):
        model.forward_intermediates(torch.randn(1, 3, *size))


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_sizes_at_once_from_several_threads(case: Case) -> None:
    """Resampling writes nothing: calls at different sizes do not disturb each other."""
    model = _model(case)
    inputs = [torch.randn(1, 3, *s) for s in (NATIVE, *OTHER_SIZES)] * 2
    expected = [_maps(model, x) for x in inputs]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    found: list[Any] = [None] * len(inputs)

    def work(i: int) -> None:
        found[i] = _maps(model, inputs[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for ours, theirs in zip(found, expected, strict=True):
        for a, b in zip(ours, theirs, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_a_copy_takes_other_sizes(case: Case) -> None:
    """Pickled (a traced graph is traced again) and deep-copied models resample too."""
    import copy
    import pickle

    model = _model(case)
    x = torch.randn(1, 3, 48, 64)
    for clone in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
        for a, b in zip(_maps(clone, x), _maps(model, x), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_position_embedding_learns_at_other_sizes(case: Case) -> None:
    model = case.build().train()
    sum(m.sum() for m in model(torch.randn(1, 3, 48, 64))).backward()
    grads = [
        p.grad
        for name, p in model.named_parameters()
        if "pos" in name and p.requires_grad and p.grad is not None
    ]
    assert grads and all(g.abs().sum() > 0 for g in grads)


# -- every ViT-family type of the transformers backend -----------------------------------

_HF_SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=64)
HF_TYPES = {
    "vit": dict(HF_KWARGS),
    "deit": dict(HF_KWARGS),
    "beit": dict(HF_KWARGS),
    "data2vec-vision": dict(HF_KWARGS),
    "vit_msn": dict(HF_KWARGS),
    "ijepa": dict(HF_KWARGS),
    "dinov2": dict(_HF_SMALL, mlp_ratio=2, patch_size=16),
    "clip_vision_model": dict(HF_KWARGS),
    "siglip_vision_model": dict(HF_KWARGS),
}


_HF_DEFAULT = {"vit", "dinov2", "siglip_vision_model"}  # the rest: behind the slow marker


@pytest.mark.parametrize(
    "model_type",
    [pytest.param(t, id=t) for t in sorted(HF_TYPES)],
)
def test_every_hf_vit_type_takes_other_multiples(model_type: str) -> None:
    torch.manual_seed(0)
    model = unifeat.create_model(
        f"hf:{model_type}", features_only=True, **HF_TYPES[model_type]
    ).eval()
    info = model.feature_info
    assert set(info.reduction()) == {16}
    for size in OTHER_SIZES:
        for feature_map in _maps(model, torch.randn(1, 3, *size)):
            assert tuple(feature_map.shape[-2:]) == (size[0] // 16, size[1] // 16)
    with pytest.raises(UnsupportedOptionError, match=r"multiples of 16"):
        model(torch.randn(1, 3, 50, 64))


# -- what stays at its built size -------------------------------------------------------


def test_a_fixed_size_timm_instance_is_refused_naming_its_size() -> None:
    """A timm ViT passed in as built (no dynamic_img_size) takes its size only."""
    source = timm.create_model("vit_tiny_patch16_224", **TIMM_KWARGS).eval()
    model = unifeat.create_model(source, features_only=True)
    assert model.fixed_input_size == (16, 64, 64)
    with pytest.raises(UnsupportedOptionError, match=r"built for 64x64.*dynamic_img_size=True"):
        model(torch.randn(1, 3, 48, 64))
    source = timm.create_model("vit_tiny_patch16_224", dynamic_img_size=True, **TIMM_KWARGS)
    model = unifeat.create_model(source.eval(), features_only=True)
    assert tuple(_maps(model, torch.randn(1, 3, 48, 64))[0].shape[-2:]) == (3, 4)


def test_timm_dynamic_img_size_is_the_callers_choice() -> None:
    """By name, a feature model takes any size unless dynamic_img_size=False was
    asked; the whole model (features_only=False) is timm's, as built."""
    fixed = unifeat.create_model(
        "timm:vit_tiny_patch16_224", features_only=True, dynamic_img_size=False, **TIMM_KWARGS
    )
    with pytest.raises(UnsupportedOptionError, match=r"built for 64x64"):
        fixed(torch.randn(1, 3, 48, 64))
    whole = unifeat.create_model("timm:vit_tiny_patch16_224", **TIMM_KWARGS)
    assert whole.dynamic_img_size is False
    # timm's dynamic_img_size: a patch embedding that takes any size, tokens as NHWC
    assert _model(CASES[0]).patch_embed.strict_img_size is False


def test_torchvision_vit_by_name_at_another_size() -> None:
    """torchvision's own builder (vit_b_16's graph, 224 built) at 240x160."""
    torch.manual_seed(0)
    source = torchvision.models.vit_b_16(num_classes=10).eval()
    source.encoder.layers = source.encoder.layers[:1]
    model = unifeat.create_model(source, features_only=True, out_indices=(-1,)).eval()
    with torch.no_grad():
        native = create_feature_extractor(source, model.feature_info.get("node"))(
            torch.zeros(1, 3, 224, 224)
        )
        ours = model(torch.zeros(1, 3, 224, 224))[0]
        torch.testing.assert_close(ours, _grid_map(next(iter(native.values())), (224, 224)))
        assert tuple(model(torch.randn(1, 3, 240, 160))[0].shape) == (1, 768, 15, 10)
