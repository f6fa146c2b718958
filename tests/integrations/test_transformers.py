"""transformers' heads (UperNet, Mask2Former, DPT) on unifeat backbones of every backend.

The heads are transformers' own, built from ``backbone_config`` through
``AutoBackbone``; backbones are tiny random models (no downloads). Where
transformers has a backbone of the same architecture (ResNet, DINOv2), the head
on the unifeat backbone is compared with the head on transformers' own, with
the same weights.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import (
    AutoBackbone,
    AutoConfig,
    DetrConfig,
    DetrForObjectDetection,
    Dinov2Config,
    DPTConfig,
    DPTForDepthEstimation,
    Mask2FormerConfig,
    Mask2FormerForUniversalSegmentation,
    ResNetConfig,
    UperNetConfig,
    UperNetForSemanticSegmentation,
)
from transformers.utils import logging as hf_logging

import unifeat
from tests.configs import HF_DINOV2_64, HF_RESNET_TINY
from unifeat.integrations import transformers as integration
from unifeat.integrations.transformers import (
    UnifeatBackbone,
    UnifeatBackboneConfig,
    check_head_config,
)

pytest.importorskip("scipy")  # Mask2Former's matcher
pytest.importorskip("open_clip")

HF_DINOV2 = {**HF_DINOV2_64, "image_size": 32}
OC_RN50 = dict(layers=[1, 1, 1, 1], width=16, head_width=16, image_size=64)
OC_VIT = dict(layers=4, width=64, head_width=32, image_size=32, patch_size=16)
TIMM_VIT = dict(img_size=32, depth=4)
TIMM_SWIN = dict(
    img_size=32, depths=[1, 1, 1, 1], embed_dim=32, num_heads=[1, 1, 2, 2], window_size=1
)

# One tiny backbone per backend, returning levels at strides 4, 8, 16 and 32.
BACKBONES: dict[str, dict[str, Any]] = {
    "timm": dict(model_name="timm:test_resnet", out_indices=(1, 2, 3, 4)),
    "torchvision": dict(model_name="tv:resnet18", out_indices=(1, 2, 3, 4)),
    "transformers": dict(
        model_name="hf:resnet", out_indices=(1, 2, 3, 4), model_kwargs=HF_RESNET_TINY
    ),
    "open_clip": dict(model_name="oc:RN50", out_indices=(1, 2, 3, 4), model_kwargs=OC_RN50),
    "vit-pyramid": dict(
        model_name="timm:vit_tiny_patch16_224", pyramid="simple", model_kwargs=TIMM_VIT
    ),
}
SIZE = 32


@pytest.fixture(autouse=True)
def _quiet() -> Any:
    """open_clip says that random init is random; Mask2Former warns about any backbone
    but a Swin; both are expected here."""
    root, verbosity = logging.getLogger().level, hf_logging.get_verbosity()
    logging.getLogger().setLevel(logging.ERROR)
    hf_logging.set_verbosity_error()
    yield
    logging.getLogger().setLevel(root)
    hf_logging.set_verbosity(verbosity)


def _upernet_config(backbone: UnifeatBackboneConfig, **extra: Any) -> UperNetConfig:
    return UperNetConfig(
        backbone_config=backbone,
        hidden_size=32,
        pool_scales=[1, 2],
        auxiliary_in_channels=backbone.channels[2],
        auxiliary_channels=16,
        num_labels=3,
        **extra,
    )


def _mask2former_config(backbone: UnifeatBackboneConfig) -> Mask2FormerConfig:
    return Mask2FormerConfig(
        backbone_config=backbone,
        feature_strides=backbone.feature_strides,
        feature_size=32,  # GroupNorm(32, ...) in its pixel decoder
        mask_feature_size=32,
        hidden_dim=32,
        encoder_feedforward_dim=32,
        dim_feedforward=32,
        encoder_layers=1,
        decoder_layers=2,
        num_attention_heads=2,
        num_queries=4,
        train_num_points=64,
        num_labels=3,
    )


def _dpt_config(backbone: UnifeatBackboneConfig) -> DPTConfig:
    return DPTConfig(
        backbone_config=backbone,
        neck_hidden_sizes=[8, 16, 32, 32],
        reassemble_factors=[4, 2, 1, 0.5],
        fusion_hidden_size=16,
        head_hidden_size=8,
    )


def _images(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, SIZE, SIZE)


def _segmentation_targets() -> dict[str, Any]:
    return dict(
        mask_labels=[(torch.rand(2, SIZE, SIZE) > 0.5).float() for _ in range(2)],
        class_labels=[torch.tensor([0, 2]), torch.tensor([1, 2])],
    )


def _train_step(model: torch.nn.Module, loss: torch.Tensor) -> None:
    """Backward and one optimizer step; every backbone parameter that trains must
    have a gradient (a feature model holds only what its levels compute) and move."""
    backbone = model.get_submodule(_backbone_path(model))
    before = {n: p.detach().clone() for n, p in backbone.named_parameters() if p.requires_grad}
    assert before, "the backbone has nothing to train"
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    optimizer.zero_grad()
    loss.backward()
    without = [n for n, p in backbone.named_parameters() if p.requires_grad and p.grad is None]
    assert not without, f"no gradient reached {without[:5]}"
    optimizer.step()
    moved = [n for n, p in backbone.named_parameters() if n in before and not p.equal(before[n])]
    assert moved, "the optimizer step changed no backbone parameter"


def _backbone_path(model: torch.nn.Module) -> str:
    return next(n for n, m in model.named_modules() if isinstance(m, UnifeatBackbone))


# -- training ---------------------------------------------------------------------------


@pytest.mark.parametrize("backend", list(BACKBONES))
def test_upernet_trains_on_a_unifeat_backbone(backend: str) -> None:
    backbone = UnifeatBackboneConfig(**BACKBONES[backend])
    config = _upernet_config(backbone)
    check_head_config(config)
    # BatchNorm on UperNet's pooled 1x1 maps needs more than one image in training.
    model = UperNetForSemanticSegmentation(config).train()
    assert model.backbone.channels == backbone.channels
    out = model(pixel_values=_images(), labels=torch.randint(0, 3, (2, SIZE, SIZE)))
    assert out.logits.shape == (2, 3, SIZE, SIZE)
    assert torch.isfinite(out.loss)
    _train_step(model, out.loss)


@pytest.mark.parametrize("backend", list(BACKBONES))
def test_mask2former_trains_on_a_unifeat_backbone(backend: str) -> None:
    backbone = UnifeatBackboneConfig(**BACKBONES[backend])
    assert backbone.feature_strides == [4, 8, 16, 32]
    config = _mask2former_config(backbone)
    check_head_config(config)
    model = Mask2FormerForUniversalSegmentation(config).train()
    out = model(pixel_values=_images(), **_segmentation_targets())
    assert out.masks_queries_logits.shape[:2] == (2, 4)
    assert torch.isfinite(out.loss)
    _train_step(model, out.loss)


def test_mask2former_trains_on_a_patch14_pyramid() -> None:
    """A patch-14 ViT's pyramid has reductions 3.5, 7, 14 and 28; Mask2Former counts
    its levels by the log2 of feature_strides, so it is told the nominal 4-32."""
    backbone = UnifeatBackboneConfig(
        model_name="hf:dinov2",
        pyramid="simple",
        model_kwargs=dict(HF_DINOV2, patch_size=14, image_size=56),
    )
    assert backbone.feature_info.reduction() == [3.5, 7, 14, 28]
    assert backbone.feature_strides == [4, 8, 16, 32]
    config = _mask2former_config(backbone)
    check_head_config(config)
    model = Mask2FormerForUniversalSegmentation(config).train()
    size = 56
    targets = dict(
        mask_labels=[(torch.rand(2, size, size) > 0.5).float() for _ in range(2)],
        class_labels=[torch.tensor([0, 2]), torch.tensor([1, 2])],
    )
    out = model(pixel_values=torch.randn(2, 3, size, size), **targets)
    assert out.masks_queries_logits.shape[-2:] == (16, 16)  # its stride-3.5 level
    _train_step(model, out.loss)


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("timm:vit_tiny_patch16_224", TIMM_VIT),
        ("hf:dinov2", HF_DINOV2),
        ("oc:ViT-B-32", OC_VIT),
    ],
    ids=["timm", "transformers", "open_clip"],
)
def test_dpt_trains_on_a_plain_vit_returning_tokens(name: str, kwargs: dict[str, Any]) -> None:
    """DPT reads [B, 1 + N, C] tokens, class token first, and the backbone config's
    hidden_size and patch_size (DPTForDepthEstimation has no loss of its own)."""
    backbone = UnifeatBackboneConfig(
        model_name=name, out_indices=4, reshape_hidden_states=False, model_kwargs=kwargs
    )
    assert backbone.patch_size == 16 and backbone.hidden_size == backbone.channels[0]
    config = _dpt_config(backbone)
    check_head_config(config)
    model = DPTForDepthEstimation(config).train()
    tokens = model.backbone(_images()).feature_maps
    assert [t.shape for t in tokens] == [(2, 1 + 4, backbone.hidden_size)] * 4
    depth = model(pixel_values=_images()).predicted_depth
    assert depth.shape == (2, SIZE, SIZE)
    _train_step(model, (depth - torch.rand_like(depth)).abs().mean())


def test_dpt_token_config_of_torchvisions_vit() -> None:
    """torchvision's ViT passes DPT's checks on the meta device (its depth is fixed,
    so no tiny one is trained here): one class token, patch 16, width 768."""
    backbone = UnifeatBackboneConfig(
        model_name="tv:vit_b_16", out_indices=(2, 5, 8, 11), reshape_hidden_states=False
    )
    assert (backbone.patch_size, backbone.hidden_size) == (16, 768)
    check_head_config(DPTConfig(backbone_config=backbone))


@pytest.mark.parametrize("backend", list(BACKBONES))
def test_detr_trains_on_a_unifeat_backbone(backend: str) -> None:
    """DETR reads the last level; it swaps the backbone's BatchNorms for frozen ones."""
    backbone = UnifeatBackboneConfig(**{**BACKBONES[backend], "out_indices": (-1,)})
    config = DetrConfig(
        backbone_config=backbone,
        use_timm_backbone=False,
        d_model=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        num_queries=5,
        num_labels=3,
    )
    model = DetrForObjectDetection(config).train()
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.3]])
    labels = [dict(class_labels=torch.tensor([1]), boxes=boxes) for _ in range(2)]
    out = model(pixel_values=_images(), labels=labels)
    assert torch.isfinite(out.loss)
    _train_step(model, out.loss)


# -- against transformers' own backbones ----------------------------------------------------


def _copy_backbone_weights(theirs: torch.nn.Module, ours: torch.nn.Module) -> None:
    """Give transformers' head model the unifeat head model's weights: the same
    names, except that unifeat's backbone holds the source model as ``model.``."""
    state = {k.replace("backbone.model.", "backbone."): v for k, v in ours.state_dict().items()}
    missing, unexpected = theirs.load_state_dict(state, strict=False)
    # Trained parameters and buffers all match; transformers' backbones also hold
    # what no level uses (DINOv2's mask token), which unifeat's feature model does not.
    assert not unexpected and all("mask_token" in key for key in missing), (missing, unexpected)


def test_upernet_equals_upernet_on_transformers_resnet_backbone() -> None:
    """unifeat's levels 1-4 of hf:resnet are ResNetBackbone's stage1-stage4: with the
    same weights the whole UperNet gives the same logits and loss, bit for bit."""
    ours = UperNetForSemanticSegmentation(
        _upernet_config(UnifeatBackboneConfig(**BACKBONES["transformers"]))
    ).eval()
    reference = ResNetConfig(
        **HF_RESNET_TINY, out_features=["stage1", "stage2", "stage3", "stage4"]
    )
    theirs = UperNetForSemanticSegmentation(_upernet_config_like(ours.config, reference)).eval()
    _copy_backbone_weights(theirs, ours)
    x, labels = _images(), torch.randint(0, 3, (2, SIZE, SIZE))
    with torch.no_grad():
        mine, reference_out = ours(x, labels=labels), theirs(x, labels=labels)
    torch.testing.assert_close(mine.logits, reference_out.logits, rtol=0, atol=0)
    torch.testing.assert_close(mine.loss, reference_out.loss, rtol=0, atol=0)


def _upernet_config_like(config: UperNetConfig, backbone: Any) -> UperNetConfig:
    values = config.to_dict()
    values["backbone_config"] = backbone
    return UperNetConfig(**{k: v for k, v in values.items() if k != "model_type"})


def test_dpt_equals_dpt_on_transformers_dinov2_backbone() -> None:
    """With norm=True, unifeat's DINOv2 tokens are Dinov2Backbone's with
    reshape_hidden_states=False and its layernorm: DPT's depth is the same, bit for
    bit. (transformers counts the embeddings as stage 0: its out_indices 1-4 are
    unifeat's blocks 0-3.)"""
    backbone = UnifeatBackboneConfig(
        model_name="hf:dinov2",
        out_indices=(0, 1, 2, 3),
        norm=True,
        reshape_hidden_states=False,
        model_kwargs=HF_DINOV2,
    )
    ours = DPTForDepthEstimation(_dpt_config(backbone)).eval()
    reference = Dinov2Config(
        **HF_DINOV2, out_indices=[1, 2, 3, 4], reshape_hidden_states=False, apply_layernorm=True
    )
    theirs = DPTForDepthEstimation(_dpt_config(reference)).eval()
    _copy_backbone_weights(theirs, ours)
    # A random DPT's depth is mostly the zeros of its final ReLU: compare what its neck
    # makes of the tokens too, as each model's own forward feeds it.
    necks: dict[str, list[torch.Tensor]] = {}
    for name, model in (("ours", ours), ("theirs", theirs)):
        model.neck.register_forward_hook(lambda _m, _i, out, name=name: necks.update({name: out}))
    x = _images()
    with torch.no_grad():
        depth, reference_depth = ours(x).predicted_depth, theirs(x).predicted_depth
    torch.testing.assert_close(depth, reference_depth, rtol=0, atol=0)
    for mine, their in zip(necks["ours"], necks["theirs"], strict=True):
        torch.testing.assert_close(mine, their, rtol=0, atol=0)


# -- save and load ------------------------------------------------------------------------


ROUND_TRIPS = {
    # A Swin holds its attention masks in buffers that are not saved; frozen levels must
    # stay frozen after loading (transformers loads every parameter as trainable).
    "upernet-timm-swin": (
        UperNetForSemanticSegmentation,
        _upernet_config,
        dict(
            model_name="timm:swin_tiny_patch4_window7_224",
            frozen_levels=1,
            norm_eval=True,
            model_kwargs=TIMM_SWIN,
        ),
    ),
    "mask2former-vit-pyramid": (
        Mask2FormerForUniversalSegmentation,
        _mask2former_config,
        BACKBONES["vit-pyramid"],
    ),
    "dpt-open_clip": (
        DPTForDepthEstimation,
        _dpt_config,
        dict(
            model_name="oc:ViT-B-32",
            out_indices=4,
            reshape_hidden_states=False,
            model_kwargs=OC_VIT,
        ),
    ),
}


def _outputs(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(pixel_values=x)
    for name in ("logits", "masks_queries_logits", "predicted_depth"):
        if getattr(out, name, None) is not None:
            return getattr(out, name)  # type: ignore[no-any-return]
    raise AssertionError(f"no output in {type(out).__name__}")


@pytest.mark.parametrize("case", list(ROUND_TRIPS))
def test_save_pretrained_from_pretrained_round_trip(case: str, tmp_path: Path) -> None:
    head, make_config, options = ROUND_TRIPS[case]
    model = head(make_config(UnifeatBackboneConfig(**options)))
    model.train()  # move BatchNorm statistics away from their initial values
    model(pixel_values=_images())
    model.eval()
    x = _images()
    expected = _outputs(model, x)
    model.save_pretrained(tmp_path)
    loaded = head.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(_outputs(loaded, x), expected, rtol=0, atol=0)
    assert isinstance(loaded.config.backbone_config, UnifeatBackboneConfig)
    theirs, ours = loaded.state_dict(), model.state_dict()
    assert theirs.keys() == ours.keys()
    assert all(theirs[k].equal(ours[k]) for k in ours)
    # Buffers that are not saved come back too, from the library's own code.
    for name, buffer in model.named_buffers():
        assert loaded.get_buffer(name).equal(buffer), name
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, p in loaded.named_parameters() if not p.requires_grad}
    if options.get("frozen_levels") is not None:
        assert frozen and all(n.startswith("backbone.model.") for n in frozen)


def test_import_unifeat_imports_no_integration() -> None:
    code = (
        "import sys, unifeat, unifeat.integrations; "
        "print(sorted(m for m in ('unifeat.integrations.transformers', 'transformers') "
        "if m in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True
    )
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_from_pretrained_in_a_fresh_process_reads_no_hub_and_no_checkpoint_file(
    tmp_path: Path,
) -> None:
    """Registration happens on import of the integration; from_pretrained then builds
    the backbone without reading its pretrained weights or checkpoint_path (the saved
    config says pretrained=True and names a file that does not exist, and the hub is
    offline): the head's checkpoint brings every weight. ``import unifeat`` imports
    neither the integration nor transformers, and the integration no head."""
    model = UperNetForSemanticSegmentation(
        _upernet_config(UnifeatBackboneConfig(**BACKBONES["timm"]))
    ).eval()
    x = _images()
    torch.save(x, tmp_path / "x.pt")
    torch.save(_outputs(model, x), tmp_path / "expected.pt")
    model.save_pretrained(tmp_path / "model")
    config_file = tmp_path / "model" / "config.json"
    saved = json.loads(config_file.read_text())
    saved["backbone_config"].update(pretrained=True, checkpoint_path=str(tmp_path / "gone.pth"))
    config_file.write_text(json.dumps(saved))
    code = f"""
import sys, torch, unifeat
heads = ("upernet", "mask2former", "dpt")
assert "unifeat.integrations.transformers" not in sys.modules
assert "transformers" not in sys.modules
import importlib, unifeat.integrations.transformers
loaded = [m.split(".")[2] for m in sys.modules if m.startswith("transformers.models.")]
assert not set(loaded) & set(heads), loaded
importlib.reload(unifeat.integrations.transformers)  # registers again: no error
from transformers import AutoModelForSemanticSegmentation
model = AutoModelForSemanticSegmentation.from_pretrained({str(tmp_path / "model")!r}).eval()
with torch.no_grad():
    logits = model(pixel_values=torch.load({str(tmp_path / "x.pt")!r})).logits
torch.testing.assert_close(logits, torch.load({str(tmp_path / "expected.pt")!r}), rtol=0, atol=0)
print("ok")
"""
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(Path(unifeat.__file__).parents[1]),
    }
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env
    )
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


@pytest.mark.parametrize("backend", ["torchvision", "vit-pyramid"])
def test_a_new_head_keeps_the_backbones_own_initialization(backend: str) -> None:
    """transformers initializes a new head model's weights; the backbone's stay as
    unifeat.create_model makes them (the library's init, the pyramid's), bit for bit."""
    options = dict(BACKBONES[backend])
    name, model_kwargs = options.pop("model_name"), options.pop("model_kwargs", {})
    torch.manual_seed(0)
    reference = unifeat.create_model(name, features_only=True, **options, **model_kwargs)
    torch.manual_seed(0)  # the backbone is the first thing UperNet builds
    head = UperNetForSemanticSegmentation(
        _upernet_config(UnifeatBackboneConfig(**BACKBONES[backend]))
    )
    ours, theirs = head.backbone.model.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(ours[key].equal(theirs[key]) for key in ours)


def test_backbone_keys_missing_from_a_checkpoint_get_the_library_initialization(
    tmp_path: Path,
) -> None:
    """A head checkpoint without the backbone's weights loads as transformers loads any
    checkpoint with missing keys (it reports them): the backbone gets its library's
    initialization, built for the purpose, not uninitialized memory."""
    model = UperNetForSemanticSegmentation(
        _upernet_config(UnifeatBackboneConfig(**BACKBONES["torchvision"]))
    )
    head_only = {k: v for k, v in model.state_dict().items() if not k.startswith("backbone.")}
    model.save_pretrained(tmp_path, state_dict=head_only)
    loaded = UperNetForSemanticSegmentation.from_pretrained(tmp_path)
    norm = loaded.backbone.model.bn1
    assert norm.running_var.eq(1).all() and norm.running_mean.eq(0).all()
    assert norm.weight.eq(1).all() and norm.bias.eq(0).all()
    conv = loaded.backbone.model.conv1.weight
    assert torch.isfinite(conv).all() and 0.01 < conv.std() < 1  # kaiming, as torchvision inits
    for key, value in head_only.items():
        assert loaded.state_dict()[key].equal(value), key


# -- weights into the backbone ---------------------------------------------------------------


@pytest.mark.parametrize("source", ["source model", "unifeat feature model"])
def test_checkpoint_path_loads_the_backbone_when_it_is_built(source: str, tmp_path: Path) -> None:
    """A state dict of the source model (torchvision's ResNet, with its classifier)
    or of a unifeat feature model loads into the backbone, whose names are the
    feature model's under ``model.``."""
    import torchvision

    weights = (
        torchvision.models.resnet18().state_dict()
        if source == "source model"
        else unifeat.create_model("tv:resnet18", features_only=True).state_dict()
    )
    torch.save(weights, tmp_path / "weights.pth")
    backbone = UnifeatBackbone(
        UnifeatBackboneConfig(
            model_name="tv:resnet18",
            out_indices=(1, 2, 3, 4),
            checkpoint_path=tmp_path / "weights.pth",
        )
    )
    state = backbone.state_dict()
    assert all(key.startswith("model.") for key in state)
    for key, value in state.items():
        assert value.equal(weights[key.removeprefix("model.")]), key
    fresh = UnifeatBackbone(UnifeatBackboneConfig(model_name="tv:resnet18"))
    fresh.model.load_state_dict(weights, strict=False)  # the classifier is not the backbone's
    assert fresh.model.conv1.weight.equal(weights["conv1.weight"])


# -- the config --------------------------------------------------------------------------------


def test_config_json_round_trip() -> None:
    config = UnifeatBackboneConfig(
        model_name="oc:RN50",
        out_features=["layer2", "layer4"],
        frozen_levels=0,
        model_kwargs=dict(OC_RN50, layers=(1, 1, 1, 1)),
    )
    assert config.stage_names == ["avgpool", "layer1", "layer2", "layer3", "layer4"]
    assert config.out_indices == [2, 4] and config.out_features == ["layer2", "layer4"]
    assert config.model_kwargs["layers"] == [1, 1, 1, 1]  # as JSON gives it back
    text = config.to_json_string()
    saved = json.loads(text)
    assert saved["model_type"] == "unifeat_backbone"
    assert saved["stage_names"] == config.stage_names and saved["out_indices"] == [2, 4]
    again = UnifeatBackboneConfig.from_dict(saved)
    assert again.to_json_string() == text
    assert again.channels == config.channels == [128, 512]
    # Inside a head's config, and through AutoConfig by model type.
    head = UperNetConfig(backbone_config=config, use_auxiliary_head=False)
    back = UperNetConfig.from_dict(json.loads(head.to_json_string()))
    assert isinstance(back.backbone_config, UnifeatBackboneConfig)
    assert back.backbone_config.to_dict() == config.to_dict()
    built = AutoConfig.for_model("unifeat_backbone", model_name="oc:RN50", model_kwargs=OC_RN50)
    assert isinstance(built, UnifeatBackboneConfig)
    assert isinstance(AutoBackbone.from_config(built), UnifeatBackbone)


def test_config_indices_follow_unifeats_rule() -> None:
    config = UnifeatBackboneConfig(model_name="timm:test_resnet")
    assert config.out_indices == [0, 1, 2, 3, 4]  # unifeat's default: every level
    config.out_indices = (-1, 1)  # negatives from the end, depth order
    assert config.out_indices == [1, 4] and config.out_features == ["layer1", "layer4"]
    config.out_features = ["layer3", "layer2"]
    assert config.out_indices == [2, 3]
    config.out_indices = None  # unifeat's default again
    assert config.out_indices == [0, 1, 2, 3, 4]
    with pytest.raises(unifeat.InvalidIndicesError, match=r"valid indices are 0\.\.4"):
        config.out_indices = (5,)
    plain = UnifeatBackboneConfig(model_name="timm:vit_tiny_patch16_224", model_kwargs=TIMM_VIT)
    assert plain.out_indices == [1, 2, 3]  # the last 3 blocks of a plain ViT
    plain.out_indices = 4
    plain.out_indices = None
    assert plain.out_indices == [1, 2, 3]
    pyramid = UnifeatBackboneConfig(**BACKBONES["vit-pyramid"])
    assert pyramid.stage_names == ["pyramid.up4", "pyramid.up2", "pyramid.same", "pyramid.down2"]
    assert pyramid.channels == [48, 96, 192, 192]


@pytest.mark.parametrize(
    "options, error, message",
    [
        (dict(model_name="timm:resnet_does_not_exist"), unifeat.UnknownModelError, "resnet"),
        (
            dict(model_name="timm:test_resnet", pyramid="simple"),
            unifeat.UnsupportedOptionError,
            "pyramid",
        ),
        (
            dict(model_name="timm:test_resnet", out_indices=(1, 5)),
            unifeat.InvalidIndicesError,
            r"valid indices are 0\.\.4",
        ),
        (
            dict(model_name="timm:test_resnet", out_features=["layer5"]),
            unifeat.InvalidIndicesError,
            "'layer5'",
        ),
        (
            dict(model_name="timm:test_resnet", out_indices=(1,), out_features=["layer2"]),
            unifeat.InvalidIndicesError,
            "different levels",
        ),
        (
            dict(model_name="timm:vit_tiny_patch16_224", depth=2),
            unifeat.UnsupportedOptionError,
            "model_kwargs",
        ),
        (
            dict(model_name="timm:test_resnet", model_kwargs=dict(act_layer=torch.nn.ReLU)),
            unifeat.UnsupportedOptionError,
            "JSON",
        ),
        (
            dict(model_name="timm:test_resnet", model_kwargs=dict(out_indices=(1,))),
            unifeat.UnsupportedOptionError,
            "UnifeatBackboneConfig\\(out_indices=...\\)",
        ),
        (
            dict(model_name="timm:test_resnet", model_kwargs=dict(output_fmt="NHWC")),
            unifeat.UnsupportedOptionError,
            "NCHW",
        ),
        (
            dict(model_name=torch.nn.Conv2d(3, 8, 3)),
            unifeat.UnsupportedOptionError,
            "names its model",
        ),
        (
            dict(model_name="timm:test_resnet", reshape_hidden_states=False),
            unifeat.UnsupportedOptionError,
            "token model",
        ),
        (
            dict(BACKBONES["vit-pyramid"], reshape_hidden_states=False),
            unifeat.UnsupportedOptionError,
            "pyramid",
        ),
        (
            dict(
                model_name="timm:vit_tiny_patch16_224",
                reshape_hidden_states=False,
                model_kwargs=dict(TIMM_VIT, reg_tokens=4),
            ),
            unifeat.UnsupportedOptionError,
            "5 prefix tokens",
        ),
        (
            dict(
                model_name="timm:vit_tiny_patch16_224",
                reshape_hidden_states=False,
                model_kwargs=dict(TIMM_VIT, class_token=False, global_pool="avg"),
            ),
            unifeat.UnsupportedOptionError,
            "0 prefix tokens",
        ),
    ],
    ids=[
        "unknown-model",
        "pyramid-on-a-resnet",
        "out-of-range",
        "unknown-stage",
        "indices-and-features-disagree",
        "model-kwarg-at-top-level",
        "not-json",
        "option-in-model-kwargs",
        "not-an-option",
        "a-module",
        "tokens-of-a-cnn",
        "tokens-of-a-pyramid",
        "tokens-with-registers",
        "tokens-without-class-token",
    ],
)
def test_bad_values_are_unifeat_errors_at_config_creation(
    options: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        UnifeatBackboneConfig(**options)


def test_a_config_changed_after_creation_is_refused_when_built() -> None:
    config = UnifeatBackboneConfig(model_name="hf:resnet", model_kwargs=HF_RESNET_TINY)
    config.model_kwargs = dict(HF_RESNET_TINY, hidden_sizes=[8, 8, 8, 8])
    with pytest.raises(unifeat.UnsupportedOptionError, match="changed after it was made"):
        UnifeatBackbone(config)


def test_a_saved_config_whose_model_now_has_other_levels_is_refused() -> None:
    saved = UnifeatBackboneConfig(model_name="timm:test_resnet").to_dict()
    saved["stage_names"] = ["stem", "stage1", "stage2", "stage3", "stage4"]
    with pytest.raises(unifeat.UnsupportedOptionError, match="saved with stage_names"):
        UnifeatBackboneConfig.from_dict(saved)


# -- what heads can take ---------------------------------------------------------------------


def test_check_head_config_refuses_what_a_head_cannot_take() -> None:
    every = UnifeatBackboneConfig(model_name="timm:test_resnet")  # strides 2, 4, 8, 16, 32
    four = UnifeatBackboneConfig(model_name="timm:test_resnet", out_indices=(1, 2, 3, 4))
    three = UnifeatBackboneConfig(model_name="timm:test_resnet", out_indices=(2, 3, 4))
    two = UnifeatBackboneConfig(model_name="timm:test_resnet", out_indices=(3, 4))
    tokens = UnifeatBackboneConfig(
        model_name="timm:vit_tiny_patch16_224",
        out_indices=(0, 1),
        reshape_hidden_states=False,
        model_kwargs=TIMM_VIT,
    )
    refused = {
        "match the levels": Mask2FormerConfig(backbone_config=every),
        "1 level\\(s\\) before them .* returns 0 before them": Mask2FormerConfig(
            backbone_config=three, feature_strides=three.feature_strides
        ),
        "1 level\\(s\\) before them .* returns 2 before them": Mask2FormerConfig(
            backbone_config=every, feature_strides=every.feature_strides
        ),
        "auxiliary head reads the third level, but": UperNetConfig(backbone_config=two),
        "auxiliary_in_channels=256": UperNetConfig(backbone_config=four, auxiliary_in_channels=256),
        "reads NCHW feature maps": UperNetConfig(backbone_config=tokens),
        "returns NCHW maps": DPTConfig(backbone_config=four),
        "neck_hidden_sizes has 4 entries": DPTConfig(backbone_config=tokens),
    }
    for message, config in refused.items():
        with pytest.raises(unifeat.UnsupportedOptionError, match=message):
            check_head_config(config)
    check_head_config(UperNetConfig(backbone_config=four))
    check_head_config(UperNetConfig(backbone_config=two, use_auxiliary_head=False))
    check_head_config(Mask2FormerConfig(backbone_config=four, feature_strides=[4, 8, 16, 32]))
    with pytest.raises(unifeat.UnsupportedOptionError, match="not UnifeatBackboneConfig"):
        check_head_config(UperNetConfig())


# -- the backbone's own interface ---------------------------------------------------------------


def test_backbone_forward_follows_transformers_backbone_interface() -> None:
    backbone = UnifeatBackbone(UnifeatBackboneConfig(**BACKBONES["timm"])).eval()
    x = _images()
    out = backbone(x)
    assert out.hidden_states is None and out.attentions is None
    assert [tuple(m.shape[1:]) for m in out.feature_maps] == [
        (c, SIZE // s, SIZE // s) for c, s in zip(backbone.channels, [4, 8, 16, 32], strict=True)
    ]
    assert backbone.num_features == [32, 32, 48, 192, 96]
    assert backbone.out_features == ["layer1", "layer2", "layer3", "layer4"]
    with_hidden = backbone(x, output_hidden_states=True)
    assert len(with_hidden.hidden_states) == 5  # every level, the stem too
    for ours, hidden in zip(out.feature_maps, with_hidden.hidden_states[1:], strict=True):
        torch.testing.assert_close(ours, hidden, rtol=0, atol=0)
    (maps,) = backbone(x, return_dict=False)
    assert len(maps) == 4
    # The heads call it so; attentions are dropped for a backbone without them.
    backbone.forward_with_filtered_kwargs(x, output_attentions=True, output_hidden_states=False)
    with pytest.raises(unifeat.UnsupportedOptionError, match="no attention maps"):
        backbone(x, output_attentions=True)
    with pytest.raises(unifeat.UnsupportedOptionError, match="'interpolate_pos_encoding'"):
        backbone(x, interpolate_pos_encoding=True)


def test_hidden_states_are_the_levels_forward_returns() -> None:
    """With output_hidden_states the levels come from every level the backbone
    computes, normed and laid out as forward returns them (DPT asks for them so)."""
    backbone = UnifeatBackbone(
        UnifeatBackboneConfig(
            model_name="hf:dinov2",
            out_indices=(1, 3),
            norm=True,
            reshape_hidden_states=False,
            model_kwargs=HF_DINOV2,
        )
    ).eval()
    x = _images()
    with torch.no_grad():
        plain, hidden = backbone(x), backbone(x, output_hidden_states=True)
    assert len(hidden.hidden_states) == 4
    for ours, theirs in zip(plain.feature_maps, hidden.feature_maps, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    torch.testing.assert_close(hidden.hidden_states[3], plain.feature_maps[1], rtol=0, atol=0)


def test_gradient_checkpointing_of_the_backbone_inside_a_head() -> None:
    """The feature model's own checkpointing works inside a head: the same gradients."""
    torch.manual_seed(0)
    model = UperNetForSemanticSegmentation(
        _upernet_config(
            UnifeatBackboneConfig(**BACKBONES["transformers"]), use_auxiliary_head=False
        )
    ).eval()  # BatchNorm in eval: a recomputed segment would update its statistics twice
    x, labels = _images(), torch.randint(0, 3, (2, SIZE, SIZE))
    grads = []
    for enable in (False, True):
        model.backbone.model.set_grad_checkpointing(enable)
        model.backbone.model.train()  # checkpointing runs while the backbone trains
        model.backbone.model.apply(
            lambda m: m.eval() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) else None
        )
        model.zero_grad()
        model(pixel_values=x, labels=labels).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.backbone.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=0, atol=0)


def test_registration_is_idempotent() -> None:
    """Registering again (what importing the module does in a process that
    registered already) does not fail; the fresh-process test also reloads it."""
    integration._register()
    importlib.import_module("unifeat.integrations.transformers")
    config = AutoConfig.for_model("unifeat_backbone", model_name="timm:test_resnet")
    assert type(config) is UnifeatBackboneConfig
    assert type(AutoBackbone.from_config(config)) is UnifeatBackbone
