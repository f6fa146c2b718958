"""segmentation_models_pytorch's decoders on unifeat backbones (docs/heads.md).

Every check runs smp's own models, decoders and registry: the encoder is built
by smp's ``get_encoder`` from the entry :func:`register_encoder` adds, as for
any smp encoder. Numbers are compared with smp's own encoders (``tu-`` and its
torchvision ResNet) holding the same weights.
"""

from __future__ import annotations

import functools
import itertools
import json
import subprocess
import sys
import textwrap
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import unifeat
from tests.configs import HF_DINOV2_64, HF_RESNET_TINY, OC_RN50_TINY, FiveStageNet
from unifeat.integrations.smp import UnifeatEncoder, register_encoder

smp = pytest.importorskip("segmentation_models_pytorch")

_TIMM_VIT = dict(img_size=64, depth=4, pyramid="simple")
_OC_VIT = dict(layers=4, width=64, head_width=32, image_size=64, patch_size=16, pyramid="simple")
_HF_DINOV2 = {**HF_DINOV2_64, "pyramid": "simple"}

BACKBONES: dict[str, tuple[str, dict[str, Any]]] = {
    "timm": ("timm:test_resnet", {}),
    "torchvision": ("tv:resnet18", {}),
    "transformers": ("hf:resnet", HF_RESNET_TINY),
    # ModifiedResNet starts at stride 4: the encoder's stride-2 map is the placeholder.
    "open_clip": ("oc:RN50", OC_RN50_TINY),
    "module": (FiveStageNet, {}),
    "vit-pyramid": ("timm:vit_tiny_patch16_224", _TIMM_VIT),
    "open_clip-vit-pyramid": ("oc:ViT-B-32", _OC_VIT),
    "transformers-dinov2-pyramid": ("hf:dinov2", _HF_DINOV2),
}
DECODERS = ("Unet", "FPN", "DeepLabV3Plus", "UPerNet", "Segformer")

# open_clip's ModifiedResNet downsamples through average pools, which unifeat's
# output_stride cannot undo (docs/output-stride.md): DeepLabV3+ is refused on it.
_REFUSED_PAIRS = {("DeepLabV3Plus", "open_clip")}


def _pairs() -> Iterator[Any]:
    for decoder in DECODERS:
        for backbone in BACKBONES:
            if (decoder, backbone) in _REFUSED_PAIRS:
                continue
            yield pytest.param(decoder, backbone, id=f"{decoder}-{backbone}")


@pytest.fixture(autouse=True)
def _own_registry() -> Iterator[None]:
    """Entries a test registers are gone after it, as smp's registry is a global dict."""
    saved = dict(smp.encoders.encoders)
    yield
    smp.encoders.encoders.clear()
    smp.encoders.encoders.update(saved)


def _build(decoder: str, backbone: str, **kwargs: Any) -> nn.Module:
    source, options = BACKBONES[backbone]
    name = register_encoder(source() if isinstance(source, type) else source, **options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # smp's Segformer init notes
        return getattr(smp, decoder)(name, encoder_weights=None, classes=3, **kwargs)


def _decoder_inputs(model: nn.Module, x: Tensor) -> tuple[Tensor, list[Tensor]]:
    """The model's output and the maps its decoder received."""
    seen: list[list[Tensor]] = []
    handle = model.decoder.register_forward_pre_hook(
        lambda _, args: seen.append(list(args[0] if len(args) == 1 else args))
    )
    try:
        out = model(x)
    finally:
        handle.remove()
    return out, seen[0]


def _strides(maps: list[Tensor], size: int) -> list[float]:
    return [size / m.shape[-1] for m in maps]


# Parameters a decoder leaves without gradient: DeepLabV3+ reads strides 4 and the
# deepest only, so on a pyramid the stride-8 layer is unused (docs/heads.md).
_UNREAD = {("DeepLabV3Plus", True): {"encoder.model.pyramid.up2"}}


@pytest.mark.parametrize(("decoder", "backbone"), list(_pairs()))
def test_decoder_trains_on_backbone(decoder: str, backbone: str) -> None:
    model = _build(decoder, backbone).train()
    encoder = model.encoder
    assert isinstance(encoder, UnifeatEncoder)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(2, 3, 64, 64)
    target = torch.randint(0, 3, (2, 64, 64))

    logits, received = _decoder_inputs(model, x)
    loss = F.cross_entropy(logits, target)
    loss.backward()
    stem = next(p for p in encoder.model.parameters() if p.requires_grad)
    before = stem.detach().clone()
    optimizer.step()

    assert logits.shape == (2, 3, 64, 64) and torch.isfinite(loss)
    # What the decoder reads is what the encoder says it gives (channels and strides).
    assert [m.shape[1] for m in received] == encoder.out_channels
    expected = [min(2**k, encoder.output_stride) for k in range(6)]
    assert _strides(received, 64) == expected
    pyramid = any(n.startswith("pyramid.") for n, _ in encoder.model.named_parameters())
    no_grad = {
        n.rsplit(".", 1)[0]
        for n, p in model.named_parameters()
        if p.requires_grad and p.grad is None
    }
    assert no_grad == _UNREAD.get((decoder, pyramid), set())
    assert not torch.equal(stem, before)  # the backbone trains with the decoder


@pytest.mark.parametrize("decoder", ["DeepLabV3Plus", "DeepLabV3"])
def test_open_clip_modified_resnet_cannot_dilate(decoder: str) -> None:
    stride = 16 if decoder == "DeepLabV3Plus" else 8
    with pytest.raises(unifeat.UnsupportedOptionError, match=f"encoder_output_stride={stride}"):
        _build(decoder, "open_clip")


@pytest.mark.parametrize("decoder", ["UnetPlusPlus", "Linknet", "MAnet", "PSPNet"])
@pytest.mark.parametrize("backbone", ["torchvision", "open_clip", "vit-pyramid"])
def test_other_decoders(decoder: str, backbone: str) -> None:
    model = _build(decoder, backbone)
    logits, received = _decoder_inputs(model, torch.randn(2, 3, 64, 64))
    F.cross_entropy(logits, torch.randint(0, 3, (2, 64, 64))).backward()
    assert [m.shape[1] for m in received] == model.encoder.out_channels


@pytest.mark.parametrize("depth", [3, 4, 5])
def test_unetplusplus_skips_the_placeholder_at_every_depth(depth: int) -> None:
    # smp issue #1260 (UnetPlusPlus on encoders that start at stride 4), fixed in 0.6.
    channels = (64, 32, 16, 8, 4)[-depth:]
    model = _build("UnetPlusPlus", "vit-pyramid", encoder_depth=depth, decoder_channels=channels)
    assert model.encoder.out_channels[1] == 0
    logits, _ = _decoder_inputs(model, torch.randn(2, 3, 64, 64))
    F.cross_entropy(logits, torch.randint(0, 3, (2, 64, 64))).backward()


@pytest.mark.parametrize("backbone", ["torchvision", "vit-pyramid"])
def test_pan_at_its_input_size(backbone: str) -> None:
    # PAN's feature pyramid attention halves its deepest map three times: 8x8 or more.
    model = _build("PAN", backbone)
    logits, received = _decoder_inputs(model, torch.randn(2, 3, 128, 128))
    F.cross_entropy(logits, torch.randint(0, 3, (2, 128, 128))).backward()
    assert _strides(received, 128) == [1, 2, 4, 8, 16, 16]


def test_torch_export() -> None:
    model = _build("FPN", "vit-pyramid").eval()
    x = torch.randn(2, 3, 64, 64)
    exported = torch.export.export(model, (x,))
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x), model(x))


# -- the same numbers as smp's own encoders ---------------------------------------------


def _same_weights_as(ours: nn.Module, theirs: nn.Module, prefix: str = "") -> None:
    state = {k.replace("encoder.", prefix, 1): v for k, v in theirs.state_dict().items()}
    ours.load_state_dict(state, strict=True)


@pytest.mark.parametrize(
    ("decoder", "kwargs"),
    [("Unet", {}), ("DeepLabV3Plus", {"encoder_output_stride": 16})],
    ids=["Unet", "DeepLabV3Plus-os16"],
)
def test_equals_smp_timm_universal_encoder(decoder: str, kwargs: dict[str, Any]) -> None:
    """smp's own ``tu-`` encoder of the same timm model, with the same weights: the
    same logits, undilated and dilated (timm's output_stride on both sides); its
    checkpoint loads as it is (keys ``encoder.model.*`` on both)."""
    theirs = getattr(smp, decoder)("tu-test_resnet", encoder_weights=None, classes=3, **kwargs)
    ours = getattr(smp, decoder)(
        register_encoder("timm:test_resnet"), encoder_weights=None, classes=3, **kwargs
    )
    ours.load_state_dict(theirs.state_dict(), strict=True)
    assert ours.encoder.out_channels == theirs.encoder.out_channels
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), theirs.eval()(x))


def test_torchvision_resnet_equals_smp_encoders() -> None:
    """tv:resnet18 against smp's own ResNet-18 encoder (a torchvision ResNet) undilated,
    and against smp's tu-resnet18 at output stride 16 (torchvision's dilation rule,
    which timm's shares: the stage's first 3x3 conv keeps its dilation)."""
    x = torch.randn(2, 3, 64, 64)
    name = register_encoder("tv:resnet18")
    theirs = smp.Unet("resnet18", encoder_weights=None, classes=3).eval()
    ours = smp.Unet(name, encoder_weights=None, classes=3).eval()
    _same_weights_as(ours, theirs, prefix="encoder.model.")
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x))

    theirs = smp.DeepLabV3Plus("tu-resnet18", encoder_weights=None, classes=3).eval()
    ours = smp.DeepLabV3Plus(name, encoder_weights=None, classes=3).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x))


def test_in_channels_through_timm_in_chans() -> None:
    theirs = smp.FPN("tu-test_resnet", encoder_weights=None, in_channels=4, classes=3).eval()
    ours = smp.FPN(
        register_encoder("timm:test_resnet"), encoder_weights=None, in_channels=4, classes=3
    ).eval()
    assert ours.encoder.out_channels[0] == 4 and ours.encoder.model.input_size[0] == 4
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(2, 4, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x))


def test_in_channels_through_transformers_num_channels() -> None:
    model = smp.Unet(
        register_encoder("hf:resnet", **HF_RESNET_TINY), encoder_weights=None, in_channels=1
    )
    assert model.encoder.model.get_parameter("embedder.embedder.convolution.weight").shape[1] == 1
    assert model(torch.randn(2, 1, 64, 64)).shape == (2, 1, 64, 64)


def test_in_channels_refused_for_pretrained_transformers(tmp_path: Path) -> None:
    # transformers reinitializes (or refuses) a first conv of other channels.
    transformers = pytest.importorskip("transformers")
    config = transformers.ResNetConfig(**HF_RESNET_TINY)
    transformers.ResNetModel(config).save_pretrained(tmp_path)
    name = register_encoder(f"hf:{tmp_path}", pretrained=True)
    with pytest.raises(unifeat.UnsupportedOptionError, match=r"in_channels=4 .* adapt"):
        smp.Unet(name, encoder_weights=None, in_channels=4)


def test_in_channels_refused_where_the_library_has_no_option() -> None:
    with pytest.raises(unifeat.UnsupportedOptionError, match=r"in_channels=4 .* 3-channel"):
        smp.Unet(register_encoder("tv:resnet18"), encoder_weights=None, in_channels=4)


# -- depth, dilation, placeholders ------------------------------------------------------


def test_encoder_depth_computes_only_the_levels_it_gives() -> None:
    model = smp.Unet(
        register_encoder("tv:resnet18"),
        encoder_weights=None,
        encoder_depth=3,
        decoder_channels=(32, 16, 8),
    )
    assert model.encoder.out_channels == [3, 64, 64, 128]
    assert model.encoder.model.feature_info.module_name() == ["relu", "layer1", "layer2"]
    assert not any(n.startswith("layer3") for n, _ in model.encoder.named_parameters())
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 1, 64, 64)


def test_patch_8_pyramid_reaches_stride_16_only() -> None:
    name = register_encoder("timm:vit_tiny_patch16_224", img_size=64, depth=4, patch_size=8,
                            pyramid="simple")  # fmt: skip
    with pytest.raises(unifeat.UnsupportedOptionError, match=r"no level at stride 32.*depth=4"):
        smp.Unet(name, encoder_weights=None)
    model = smp.Unet(name, encoder_weights=None, encoder_depth=4, decoder_channels=(64, 32, 16, 8))
    # Levels at strides 2, 4, 8 and 16: no placeholder.
    assert model.encoder.out_channels == [3, 48, 96, 192, 192]
    _, received = _decoder_inputs(model, torch.randn(2, 3, 64, 64))
    assert _strides(received, 64) == [1, 2, 4, 8, 16]


def test_make_dilated_keeps_the_weights() -> None:
    encoder = UnifeatEncoder("tv:resnet18", {})
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    encoder.make_dilated(8)
    assert encoder.output_stride == 8
    assert encoder.model.feature_info.reduction() == [2, 4, 8, 8, 8]
    after = encoder.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in after)
    assert _strides(encoder(torch.randn(2, 3, 64, 64)), 64) == [1, 2, 4, 8, 8, 8]
    with pytest.raises(unifeat.UnsupportedOptionError, match="make_dilated"):
        encoder.get_stages()


def test_pyramid_output_stride_below_the_patch_is_refused() -> None:
    with pytest.raises(unifeat.UnsupportedOptionError, match="patch size \\(16\\)"):
        _build("DeepLabV3", "vit-pyramid")  # smp's DeepLabV3 dilates to 8


# -- registration -----------------------------------------------------------------------


def test_names_come_from_the_arguments() -> None:
    vit = register_encoder("timm:vit_tiny_patch16_224", **_TIMM_VIT)
    assert vit == register_encoder(
        "timm:vit_tiny_patch16_224", pyramid="simple", depth=4, img_size=64, pretrained=False
    )
    assert vit.startswith("unifeat:timm:vit_tiny_patch16_224@")
    assert vit != register_encoder("timm:vit_tiny_patch16_224", img_size=64, depth=4,
                                   pyramid="simple", frozen_levels=0)  # fmt: skip
    assert register_encoder("tv:resnet18") == "unifeat:torchvision:resnet18"
    assert vit in smp.encoders.get_encoder_names()


def test_smp_create_model_save_and_load_in_a_new_process(tmp_path: Path) -> None:
    name = register_encoder("timm:vit_tiny_patch16_224", **_TIMM_VIT)
    model = smp.create_model("fpn", name, encoder_weights=None, classes=2).eval()
    x = torch.randn(2, 3, 64, 64)
    torch.save(x, tmp_path / "x.pt")
    with torch.no_grad():
        torch.save(model(x), tmp_path / "y.pt")
    model.save_pretrained(tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "config.json").read_text())["encoder_name"] == name

    code = f"""
        import json, sys, torch
        import unifeat.integrations.smp as integration
        loaded = "segmentation_models_pytorch" in sys.modules
        import segmentation_models_pytorch as smp
        path = {str(tmp_path)!r}
        try:
            smp.from_pretrained(path + "/saved")
            before = "loaded"
        except KeyError:
            before = "unknown"
        name = integration.register_encoder("timm:vit_tiny_patch16_224", **{_TIMM_VIT!r})
        model = smp.from_pretrained(path + "/saved").eval()
        with torch.no_grad():
            same = torch.equal(model(torch.load(path + "/x.pt")), torch.load(path + "/y.pt"))
        print(json.dumps([loaded, before, name, same]))
    """
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    smp_on_import, before, name_there, same = json.loads(done.stdout.strip().splitlines()[-1])
    assert smp_on_import is False  # importing the integration does not import smp
    assert before == "unknown"  # smp needs the entry to rebuild the model
    assert name_there == name
    assert same is True


def test_a_module_of_your_own() -> None:
    def net() -> nn.Module:
        widths = (3, 8, 16, 24, 32, 40)
        return nn.Sequential(
            *(
                nn.Sequential(nn.Conv2d(a, b, 3, 2, 1), nn.ReLU())
                for a, b in itertools.pairwise(widths)
            )
        )

    source = net()
    name = register_encoder(source)
    assert name == register_encoder(net())  # the same architecture, the same name
    first = smp.Unet(name, encoder_weights=None)
    second = smp.Unet(name, encoder_weights=None)
    assert first.encoder.out_channels == [3, 8, 16, 24, 32, 40]
    # Each smp model holds its own copy of the module.
    ours = {p.data_ptr() for p in first.encoder.parameters()}
    assert ours.isdisjoint(p.data_ptr() for p in second.encoder.parameters())
    assert ours.isdisjoint(p.data_ptr() for p in source.parameters())
    assert first(torch.randn(2, 3, 64, 64)).shape == (2, 1, 64, 64)


# -- refusals ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "options", "error", "match"),
    [
        ("timm:no_such_net", {}, unifeat.UnknownModelError, "no_such_net"),
        ("tv:resnet18", {"pyramid": "simple"}, unifeat.UnsupportedOptionError, "hierarchical"),
        (
            "timm:vit_tiny_patch16_224",
            {"img_size": 64, "depth": 4},
            unifeat.UnsupportedOptionError,
            'plain model.*pyramid="simple"',
        ),
        (
            "hf:dinov2",
            {**_HF_DINOV2, "patch_size": 14, "image_size": 56},
            unifeat.UnsupportedOptionError,
            "3.5, 7, 14, 28.*not powers of two",
        ),
        ("tv:resnet18", {"out_indices": (1, 2)}, unifeat.UnsupportedOptionError, "by reduction"),
        (
            "tv:resnet18",
            {"output_stride": 16},
            unifeat.UnsupportedOptionError,
            "encoder_output_stride",
        ),
        ("timm:test_resnet", {"in_chans": 4}, unifeat.UnsupportedOptionError, "in_channels="),
        (
            "tv:resnet18",
            {"norm_layer": functools.partial(nn.BatchNorm2d, eps=1e-3)},
            unifeat.UnsupportedOptionError,
            "plain data",
        ),
    ],
    ids=[
        "unknown-name",
        "pyramid-on-resnet",
        "vit-without-pyramid",
        "patch-14-pyramid",
        "out_indices",
        "output_stride",
        "in_chans",
        "not-plain-data",
    ],
)
def test_register_refuses(model: str, options: dict[str, Any], error: type, match: str) -> None:
    before = dict(smp.encoders.encoders)
    with pytest.raises(error, match=match):
        register_encoder(model, **options)
    assert smp.encoders.encoders == before


def test_hub_weights_are_refused() -> None:
    # smp's default encoder_weights is "imagenet", which it would fetch from its hub.
    with pytest.raises(unifeat.UnsupportedOptionError, match="encoder_weights=None"):
        smp.Unet(register_encoder("tv:resnet18"))
