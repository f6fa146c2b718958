"""``pyramid="simple"``: ViTDet's simple feature pyramid on a plain model's last block,
for every backend's ViT (docs/levels.md, "A simple pyramid for plain models")."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torchvision
from torch import Tensor, nn

import unifeat
from tests.configs import HF_DINOV2_64, HF_VIT_64
from unifeat import UnsupportedOptionError

# One tiny ViT per backend, patch 16 (DINOv2: 14), all at 64 px (DINOv2: 56).
VITS: dict[str, tuple[Any, dict[str, Any]]] = {
    "timm": ("timm:vit_tiny_patch16_224", dict(img_size=64, depth=4)),
    "torchvision": (
        lambda: torchvision.models.VisionTransformer(
            image_size=64, patch_size=16, num_layers=4, num_heads=2, hidden_dim=32, mlp_dim=64
        ),
        {},
    ),
    "hf": ("hf:vit", {**HF_VIT_64, "num_hidden_layers": 4}),
    "hf-dinov2": (
        "hf:dinov2",
        {**HF_DINOV2_64, "image_size": 56, "patch_size": 14},
    ),
    "open_clip": (
        "oc:ViT-B-32",
        dict(layers=4, width=64, head_width=32, image_size=64, patch_size=16),
    ),
}


def _source(key: str) -> Any:
    """The model argument: a name, or a module built with seed 0."""
    name, _ = VITS[key]
    torch.manual_seed(0)
    return name() if callable(name) else name


def _build(key: str, **options: Any) -> Any:
    source, kwargs = _source(key), VITS[key][1]
    torch.manual_seed(0)
    return unifeat.create_model(source, features_only=True, pyramid="simple", **kwargs, **options)


def _plain(key: str) -> Any:
    source, kwargs = _source(key), VITS[key][1]
    torch.manual_seed(0)
    return unifeat.create_model(source, features_only=True, out_indices=(-1,), **kwargs)


@pytest.mark.parametrize("key", list(VITS))
def test_levels_follow_feature_info_at_two_sizes(key: str) -> None:
    """Four levels at a quarter, half, one and two patch sizes, C/4, C/2, C, C wide:
    the maps have the shapes feature_info says, at the built size and another."""
    name, kwargs = _source(key), VITS[key][1]
    info = unifeat.feature_info(name, pyramid="simple", **kwargs)
    block = unifeat.feature_info(name, out_indices=(-1,), **kwargs)
    dim, patch = block.channels()[0], block.reduction()[0]
    assert info.channels() == [dim // 4, dim // 2, dim, dim]
    assert info.reduction() == [patch / 4, patch / 2, patch, 2 * patch]
    assert info.module_name() == ["pyramid.up4", "pyramid.up2", "pyramid.same", "pyramid.down2"]
    model = _build(key).eval()
    assert model.feature_info == info
    _, height, width = model.input_size
    for rows, cols in ((height, width), (height + 2 * patch, height + 4 * patch)):
        with torch.no_grad():
            maps = model(torch.randn(2, 3, rows, cols))
        grid = (rows // patch, cols // patch)
        expected = [
            (grid[0] * 4, grid[1] * 4),
            (grid[0] * 2, grid[1] * 2),
            grid,
            (grid[0] // 2, grid[1] // 2),
        ]
        for feature_map, channels, size in zip(maps, info.channels(), expected, strict=True):
            assert tuple(feature_map.shape) == (2, channels, *size)


@pytest.mark.parametrize("key", list(VITS))
def test_the_pyramid_is_vitdets_scale_stage_on_the_last_block(key: str) -> None:
    """Level 2 is the last block's map itself, level 3 its 2x2 max-pool, levels 0 and 1
    the transposed convolutions (with LayerNorm and GELU between, for x4) of it."""
    model = _build(key).eval()
    plain = _plain(key).eval()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if k in plain.state_dict()})
    x = torch.randn(2, *model.input_size)
    with torch.no_grad():
        up4, up2, same, down2 = model(x)
        (block,) = plain(x)
        pyramid = model.get_submodule("pyramid")
        first, norm, act, second = pyramid.up4
    torch.testing.assert_close(same, block, rtol=0, atol=0)
    torch.testing.assert_close(down2, torch.nn.functional.max_pool2d(block, 2), rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(up2, pyramid.up2(block), rtol=0, atol=0)
        hidden = first(block).permute(0, 2, 3, 1)
        hidden = nn.functional.layer_norm(
            hidden, norm.normalized_shape, norm.weight, norm.bias, 1e-6
        )
        expected = second(nn.functional.gelu(hidden.permute(0, 3, 1, 2)))
    torch.testing.assert_close(up4, expected, rtol=1e-6, atol=1e-6)
    assert isinstance(first, nn.ConvTranspose2d) and first.stride == (2, 2)
    assert isinstance(act, nn.GELU) and norm.eps == 1e-6


def test_only_the_scales_asked_for_are_held() -> None:
    """out_indices picks pyramid levels; the layers of the others are not built."""
    model = _build("timm", out_indices=(2, 3))
    assert model.feature_info.out_indices == (2, 3)
    assert not any(name.startswith("pyramid.") for name, _ in model.named_parameters())
    with_up2 = _build("timm", out_indices=(1, 3))
    names = {name.split(".")[1] for name, _ in with_up2.named_parameters() if "pyramid" in name}
    assert names == {"up2"}
    assert with_up2.prune_intermediate_layers((3,)) == [3]
    assert not any("pyramid" in name for name, _ in with_up2.named_parameters())
    with pytest.raises(unifeat.InvalidIndicesError, match="pruned"):
        with_up2.forward_intermediates(torch.randn(1, 3, 64, 64), indices=(1,))


def test_parameters_it_adds_are_trainable_and_named_under_one_prefix() -> None:
    """The pyramid's layers are ordinary parameters under ``pyramid.``; every one gets a
    gradient, and the backbone's checkpoint (without them) loads as it is."""
    model = _build("timm").train()
    names = [name for name, _ in model.named_parameters() if name.startswith("pyramid.")]
    assert names and all(name.startswith(("pyramid.up4.", "pyramid.up2.")) for name in names)
    sum(m.mean() for m in model(torch.randn(2, 3, 64, 64))).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_checkpoints_load_with_and_without_the_pyramid(tmp_path: Any) -> None:
    """A backbone checkpoint has no pyramid layers: they keep their initial values. A
    pyramid model's own state_dict, as checkpoint_path, loads them too."""
    name, kwargs = VITS["timm"]
    torch.manual_seed(1)
    backbone = unifeat.create_model(name, **kwargs)
    torch.save(backbone.state_dict(), tmp_path / "backbone.pth")
    model = _build("timm", checkpoint_path=tmp_path / "backbone.pth")
    for key, value in backbone.state_dict().items():
        if key in model.state_dict():
            torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=0)
    with torch.no_grad():
        model.get_submodule("pyramid.up2").weight.add_(1.0)
    torch.save(model.state_dict(), tmp_path / "features.pth")
    again = _build("timm", checkpoint_path=tmp_path / "features.pth")
    for key, value in model.state_dict().items():
        torch.testing.assert_close(again.state_dict()[key], value, rtol=0, atol=0)
    assert (
        unifeat.feature_info(
            name, pyramid="simple", checkpoint_path=tmp_path / "features.pth", **kwargs
        )
        == model.feature_info
    )
    broken = {k: (v[:1] if k == "pyramid.up2.weight" else v) for k, v in model.state_dict().items()}
    torch.save(broken, tmp_path / "broken.pth")
    for call in (unifeat.create_model, unifeat.feature_info):
        with pytest.raises(unifeat.CheckpointError, match=r"pyramid|up2"):
            call(
                name,
                features_only=True,
                pyramid="simple",
                checkpoint_path=tmp_path / "broken.pth",
                **kwargs,
            )


def test_frozen_levels_checkpointing_and_layer_decay_treat_them_as_levels() -> None:
    """frozen_levels=k freezes what levels 0..k depend on: the backbone and the x4 and
    x2 layers for k=1; gradient checkpointing recomputes them and changes no number;
    group_matcher leaves them to timm's top group, as ViTDet's layer decay does."""
    from timm.optim import create_optimizer_v2

    frozen = _build("timm", frozen_levels=1)
    trainable = {n for n, p in frozen.named_parameters() if p.requires_grad}
    assert trainable == set()
    frozen = _build("timm", frozen_levels=0)
    trainable = {n for n, p in frozen.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("pyramid.up2.") for n in trainable)

    plain = _build("timm").train()
    checkpointed = copy.deepcopy(plain)
    checkpointed.set_grad_checkpointing(True)
    x = torch.randn(2, 3, 64, 64)
    results = []
    for model in (plain, checkpointed):
        torch.manual_seed(3)
        maps = model(x)
        sum(m.pow(2).mean() for m in maps).backward()
        results.append((maps, {n: p.grad for n, p in model.named_parameters()}))
    for a, b in zip(results[0][0], results[1][0], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for name, grad in results[0][1].items():
        torch.testing.assert_close(grad, results[1][1][name], rtol=0, atol=0, msg=name)

    optimizer = create_optimizer_v2(_build("hf"), "adamw", lr=1e-3, layer_decay=0.5)
    top = max(group["lr_scale"] for group in optimizer.param_groups)
    model = _build("hf")
    pyramid_ids = {id(p) for n, p in model.named_parameters() if n.startswith("pyramid.")}
    optimizer = create_optimizer_v2(model, "adamw", lr=1e-3, layer_decay=0.5)
    for group in optimizer.param_groups:
        if any(id(p) in pyramid_ids for p in group["params"]):
            assert group["lr_scale"] == top == 1.0


def test_norm_and_the_final_output() -> None:
    """norm=True normalizes the block the pyramid reads; the final output of
    forward_intermediates is the backbone's (its last block's tokens)."""
    model = _build("timm", norm=True).eval()
    plain = _plain("timm").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        final, raw = model.forward_intermediates(x)
        normed = model(x)  # forward applies the norm it was built with, as timm's getter
        (block,) = plain(x)
    assert final.dim() == 3 and final.shape[-1] == block.shape[1]
    torch.testing.assert_close(raw[2], block, rtol=0, atol=0)
    assert not torch.allclose(normed[2], block)  # normed by the final norm


def test_export_with_dynamic_height_and_width() -> None:
    model = _build("timm").eval()
    x = torch.randn(2, 3, 64, 64)
    # At least 4x4 patches: the x1/2 level max-pools the grid, and export specializes
    # a dimension that could be 1.
    height = torch.export.Dim("height", min=4, max=8)
    width = torch.export.Dim("width", min=4, max=8)
    program = torch.export.export(
        model, (x,), dynamic_shapes={"x": {2: 16 * height, 3: 16 * width}}
    )
    other = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        for ours, theirs in zip(program.module()(other), model(other), strict=True):
            torch.testing.assert_close(ours, theirs)


_VIT = "timm:vit_tiny_patch16_224"


@pytest.mark.parametrize(
    ("model", "options", "match"),
    [
        ("tv:resnet18", {"pyramid": "simple"}, "hierarchical"),
        ("timm:swin_tiny_patch4_window7_224", {"pyramid": "simple"}, "hierarchical"),
        ("tv:resnet18", {"pyramid": "fpn"}, "expected 'simple'"),
        ("tv:resnet18", {"pyramid": 1}, "expected 'simple'"),
        (
            "timm:vit_tiny_patch16_224",
            {"pyramid": "simple", "return_prefix_tokens": True},
            "combined",
        ),
        (
            "timm:vit_tiny_patch16_224",
            {"pyramid": "simple", "return_nodes": ["blocks.2"]},
            "combined",
        ),
        ("timm:vit_tiny_patch16_224", {"pyramid": "simple", "out_indices": (4,)}, "valid"),
    ],
)
def test_what_it_refuses(model: str, options: dict[str, Any], match: str) -> None:
    for call in (unifeat.feature_info, unifeat.create_model):
        extra = {} if call is unifeat.feature_info else {"features_only": True}
        with pytest.raises(unifeat.UnifeatError, match=match):
            call(model, **options, **extra)
    if "out_indices" not in options:
        with pytest.raises(UnsupportedOptionError):
            unifeat.create_model(model, features_only=True, **options)


def _tensors(output: Any) -> list[Tensor]:
    return list(output.values()) if isinstance(output, dict) else list(output)
