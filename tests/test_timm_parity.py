"""unifeat over timm gives timm's own levels and, with the same weights, timm's own tensors."""

from __future__ import annotations

import pytest
import timm
import torch

import unifeat
from tests.conftest import copy_weights_into_timm_features

# (name, input size, constructor kwargs): one or more per family, small
# variants and small inputs so the default suite stays fast.
ARCHITECTURES = [
    ("resnet18", 64, {}),
    ("resnet26d", 64, {}),  # ResNet-D
    ("resnext26ts", 64, {}),
    ("convnext_atto", 64, {}),
    ("convnextv2_atto", 64, {}),
    ("efficientnet_b0", 64, {}),
    ("tf_efficientnet_b0", 64, {}),
    ("mixnet_s", 64, {}),
    ("mobilenetv3_small_050", 64, {}),
    ("mobilenetv4_conv_small", 64, {}),
    ("regnetx_002", 64, {}),
    ("densenet121", 64, {}),
    ("cspresnet50", 64, {}),
    ("cs3darknet_s", 64, {}),
    ("hrnet_w18_small", 64, {}),
    ("edgenext_xx_small", 64, {}),
    ("mobilevit_xxs", 64, {}),
    ("vit_tiny_patch16_224", 64, {"img_size": 64}),
    ("deit_tiny_distilled_patch16_224", 64, {"img_size": 64}),
    ("vit_small_patch14_reg4_dinov2", 56, {"img_size": 56}),
    ("swin_tiny_patch4_window7_224", 224, {}),
    ("dla34", 64, {}),
    ("vgg11", 64, {}),
    ("ghostnet_100", 64, {}),
    ("rexnet_100", 64, {}),
    ("nf_resnet26", 64, {}),
    ("poolformerv2_s12", 64, {}),
    ("pvt_v2_b0", 64, {}),
    ("fastvit_t8", 64, {}),
    ("repvit_m1", 64, {}),
    ("hgnetv2_b0", 64, {}),
    ("xception41", 64, {}),
    ("selecsls42b", 64, {}),
    ("vovnet39a", 64, {}),
    ("inception_v3", 96, {}),
]
SLOW_ARCHITECTURES = [
    ("resnet50", 224, {}),
    ("convnext_tiny", 224, {}),
    ("maxvit_nano_rw_256", 256, {}),
    ("efficientformer_l1", 224, {}),
    ("levit_128s", 224, {}),
    ("caformer_s18", 224, {}),
    ("eva02_tiny_patch14_224", 224, {}),
    ("coatnet_0_rw_224", 224, {}),
]


def _timm_reference(name: str, kwargs: dict, source: torch.nn.Module, out_indices):
    reference = timm.create_model(name, features_only=True, out_indices=out_indices, **kwargs)
    copy_weights_into_timm_features(reference, source)
    return reference.eval()


def _as_nchw(tensor: torch.Tensor, reference: torch.nn.Module) -> torch.Tensor:
    # timm's Swin-style feature models return NHWC; unifeat's default is NCHW.
    return (
        tensor.permute(0, 3, 1, 2)
        if str(getattr(reference, "output_fmt", "")).endswith("NHWC")
        else tensor
    )


def _check_parity(name: str, size: int, kwargs: dict) -> None:
    source = timm.create_model(name, **kwargs).eval()
    levels = list(range(len(source.feature_info)))
    model = unifeat.create_model(source, features_only=True, out_indices=levels).eval()

    # Levels are timm's own feature_info, level for level.
    reference = _timm_reference(name, kwargs, source, tuple(levels))
    expected = [(d["num_chs"], d["reduction"], d["module"]) for d in reference.feature_info.info]
    got = [(lv.num_chs, lv.reduction, lv.module) for lv in model.feature_info]
    assert got == expected

    # The default selection is timm's features_only default.
    default = unifeat.feature_info(f"timm:{name}", **kwargs).out_indices
    assert default == tuple(
        timm.create_model(name, features_only=True, **kwargs).feature_info.out_indices
    )

    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        ours = model(x)
        theirs = reference(x)
    assert len(ours) == len(theirs) == len(levels)
    for mine, ref in zip(ours, theirs, strict=True):
        torch.testing.assert_close(mine, _as_nchw(ref, reference))
    # Channels reported equal channels produced.
    assert [t.shape[1] for t in ours] == model.feature_info.channels()


@pytest.mark.parametrize(
    ("name", "size", "kwargs"), ARCHITECTURES, ids=[a[0] for a in ARCHITECTURES]
)
def test_levels_and_outputs_equal_timm_features_only(name, size, kwargs):
    _check_parity(name, size, kwargs)


@pytest.mark.parametrize(
    ("name", "size", "kwargs"), SLOW_ARCHITECTURES, ids=[a[0] for a in SLOW_ARCHITECTURES]
)
def test_levels_and_outputs_equal_timm_features_only_slow(name, size, kwargs):
    _check_parity(name, size, kwargs)


@pytest.mark.parametrize(
    ("name", "out_indices", "size", "kwargs"),
    [
        ("resnet18", (3, 1), 64, {}),
        ("convnext_atto", (-1,), 64, {}),
        ("efficientnet_b0", 2, 64, {}),
        ("vit_tiny_patch16_224", (2, -1), 64, {"img_size": 64}),
        ("swin_tiny_patch4_window7_224", (0, 2), 224, {}),
    ],
)
def test_subsets_and_pruned_model_equal_timm(name, out_indices, size, kwargs):
    """A subset of levels (unordered, negative or "last n") prunes and still matches timm."""
    source = timm.create_model(name, **kwargs).eval()
    model = unifeat.create_model(source, features_only=True, out_indices=out_indices).eval()
    levels = model.feature_info.out_indices
    assert list(levels) == sorted(levels)
    reference = _timm_reference(name, kwargs, source, levels)
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        for mine, ref in zip(model(x), reference(x), strict=True):
            torch.testing.assert_close(mine, _as_nchw(ref, reference))


def test_built_by_name_equals_timm_built_by_name():
    """The name path builds timm's model with timm's own init (same seed, same weights)."""
    torch.manual_seed(7)
    model = unifeat.create_model("timm:resnet18", features_only=True).eval()
    torch.manual_seed(7)
    reference = timm.create_model("resnet18", features_only=True).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for mine, ref in zip(model(x), reference(x), strict=True):
            torch.testing.assert_close(mine, ref)


@pytest.mark.parametrize(
    ("name", "stride"),
    [("resnet18", 16), ("resnet26d", 8), ("convnext_atto", 16), ("efficientnet_b0", 8)],
)
def test_output_stride_equals_timm(name, stride):
    source = timm.create_model(name, output_stride=stride).eval()
    reference = timm.create_model(name, output_stride=stride, features_only=True).eval()
    copy_weights_into_timm_features(reference, source)
    model = unifeat.create_model(f"timm:{name}", features_only=True, output_stride=stride).eval()
    model.load_state_dict(source.state_dict(), strict=False)
    assert model.feature_info.reduction() == reference.feature_info.reduction()
    assert max(model.feature_info.reduction()) == stride
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ours = model(x)
        for mine, ref in zip(ours, reference(x), strict=True):
            torch.testing.assert_close(mine, ref)
    assert ours[-1].shape[-1] == 64 // stride


@pytest.mark.parametrize("name", ["mobilenetv3_small_100", "mobilenetv4_conv_small"])
def test_output_stride_where_timm_dilates_only_the_feature_variant(name):
    """MobileNetV3/V4 take output_stride in features_only builds only: unifeat's model
    (whole, for forward_intermediates' final output) gives timm's dilated maps."""
    torch.manual_seed(0)
    reference = timm.create_model(name, output_stride=16, features_only=True).eval()
    model = unifeat.create_model(f"timm:{name}", features_only=True, output_stride=16).eval()
    assert unifeat.feature_info(f"timm:{name}", output_stride=16) == model.feature_info
    assert model.feature_info.reduction() == reference.feature_info.reduction()
    own = model.state_dict()
    reference.load_state_dict({k: v for k, v in own.items() if k in reference.state_dict()})
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for mine, ref in zip(model(x), reference(x), strict=True):
            assert torch.equal(mine, ref)
        final, _ = model.forward_intermediates(x, indices=(-1,))
    assert final.shape[-2:] == (4, 4)


def test_output_stride_equal_to_native_stride_is_accepted_everywhere():
    """timm refuses output_stride on ViTs even at the patch size; unifeat accepts the no-op."""
    info = unifeat.feature_info("timm:vit_tiny_patch16_224", output_stride=16)
    assert set(info.reduction()) == {16}


def test_prefix_tokens_match_timm_forward_intermediates():
    source = timm.create_model("deit_tiny_distilled_patch16_224", img_size=64).eval()
    model = unifeat.create_model(
        source, features_only=True, out_indices=(0, -1), return_prefix_tokens=True
    ).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ours = model(x)
        theirs = source.forward_intermediates(
            x, indices=[0, 11], return_prefix_tokens=True, intermediates_only=True
        )
    for (spatial, prefix), (ref_spatial, ref_prefix) in zip(ours, theirs, strict=True):
        assert prefix.shape == (1, 2, 192)  # class + distillation token
        assert spatial.shape == (1, 192, 4, 4)
        torch.testing.assert_close(spatial, ref_spatial)
        torch.testing.assert_close(prefix, ref_prefix)
