"""A feature model is an ordinary nn.Module (docs/api.md), with timm's methods."""

from __future__ import annotations

import copy
import pickle

import pytest
import timm
import torch
from safetensors.torch import save_file

import unifeat
from unifeat import FeatureModel, InvalidIndicesError


def _resnet18_features(**kwargs):
    source = timm.create_model("resnet18").eval()
    return source, unifeat.create_model(source, features_only=True, **kwargs).eval()


def _outputs_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_model_records_its_backend_and_is_a_feature_model():
    model = unifeat.create_model("resnet18", features_only=True)
    assert isinstance(model, FeatureModel) and model.backend == "timm"
    assert unifeat.create_model("resnet18").backend == "timm"


def test_deepcopy_and_pickle_give_equal_independent_models():
    _, model = _resnet18_features(out_indices=(1, 3))
    x = torch.randn(1, 3, 64, 64)
    expected = model(x)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        _outputs_equal(clone(x), expected)
        assert clone.feature_info == model.feature_info
        assert all(
            p.data_ptr() != q.data_ptr()
            for p, q in zip(clone.parameters(), model.parameters(), strict=True)
        )
        assert list(clone.state_dict()) == list(model.state_dict())


def test_gradients_reach_every_parameter_that_feeds_a_level():
    # timm zero-initialises each block's last BN, which would zero the branch's gradients.
    source = timm.create_model("resnet18", zero_init_last=False)
    model = unifeat.create_model(source, features_only=True, out_indices=(1, 3)).train()
    sum((f * torch.randn_like(f)).sum() for f in model(torch.randn(2, 3, 64, 64))).backward()
    names = [n for n, p in model.named_parameters()]
    assert not any(".layer4." in n or n.startswith("model.fc") for n in names)  # pruned
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_vit_gradients_reach_every_block_up_to_the_last_level():
    model = unifeat.create_model(
        "vit_tiny_patch16_224", features_only=True, img_size=32, out_indices=(0, 5)
    ).train()
    sum(f.mean() for f in model(torch.randn(2, 3, 32, 32))).backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert {n for n, _ in model.named_parameters() if ".blocks.5." in n} <= with_grad
    assert not any(".blocks.6." in n for n, _ in model.named_parameters())  # pruned
    # It holds only what its levels compute (no final norm): every parameter learns.
    assert {n for n, _ in model.named_parameters()} == with_grad
    assert not any(n.startswith("norm.") for n in with_grad)


def test_state_dict_keys_are_the_source_models():
    source, model = _resnet18_features(out_indices=(1, 2))
    source_keys = list(source.state_dict())
    ours = list(model.state_dict())
    pruned = [k for k in source_keys if k.startswith(("layer3.", "layer4.", "fc."))]
    assert ours == [k for k in source_keys if k not in pruned]
    # The source's checkpoint loads strictly, pruned keys and all ...
    other = timm.create_model("resnet18").eval()
    model.load_state_dict(other.state_dict(), strict=True)
    x = torch.randn(1, 3, 64, 64)
    _outputs_equal(
        model(x), other.forward_intermediates(x, indices=[1, 2], intermediates_only=True)
    )
    # ... and the feature model's state dict loads back into a source model.
    fresh = timm.create_model("resnet18")
    missing, unexpected = fresh.load_state_dict(model.state_dict(), strict=False)
    # torch's BatchNorm fills in num_batches_tracked itself when it is absent.
    assert sorted(missing) == sorted(k for k in pruned if "num_batches_tracked" not in k)
    assert unexpected == []


def test_state_dict_keys_when_nested_in_a_larger_module():
    _, backbone = _resnet18_features(out_indices=(1, 2))
    detector = torch.nn.Module()
    detector.backbone = backbone
    detector.head = torch.nn.Conv2d(128, 4, 1)
    keys = list(detector.state_dict())
    assert "backbone.conv1.weight" in keys and "head.weight" in keys
    assert not any(k.startswith("backbone.model.") for k in keys)
    clone = copy.deepcopy(detector)
    torch.nn.init.zeros_(clone.backbone.conv1.weight)
    clone.load_state_dict(detector.state_dict(), strict=True)
    assert torch.equal(clone.backbone.conv1.weight, backbone.conv1.weight)


def test_the_module_passed_in_is_never_mutated_and_shares_parameters():
    source = timm.create_model("vit_tiny_patch16_224", img_size=32).train()
    x = torch.randn(1, 3, 32, 32)
    source.eval()
    with torch.no_grad():
        logits = source(x)
    source.train()
    children = [(n, type(m)) for n, m in source.named_modules()]
    model = unifeat.create_model(source, features_only=True, out_indices=(1,))
    model.eval()
    model.prune_intermediate_layers((0,))
    assert source.training
    assert [(n, type(m)) for n, m in source.named_modules()] == children
    assert len(source.blocks) == 12 and source.head.out_features == 1000
    with torch.no_grad():
        torch.testing.assert_close(source.eval()(x), logits)
    # Parameters are shared, as torchvision's extractor shares them.
    assert model.cls_token is source.cls_token
    assert model.blocks[0].attn.qkv.weight is source.blocks[0].attn.qkv.weight


class _LiftedConstant(torch.nn.Module):
    """A forward that makes a tensor while it runs: FX lifts it into a constant of the
    graph (``_tensor_constant0``), as it does timm Swin's masks."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 3, 2, 1)
        self.stage = torch.nn.Conv2d(8, 16, 3, 2, 1)

    def forward(self, x):
        return self.stage(self.stem(x) + torch.ones(8, 1, 1))


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_a_traced_module_is_not_given_the_constants_fx_lifts_from_it(mode):
    source = _LiftedConstant().train(mode == "train")
    attributes = sorted(vars(source))
    model = unifeat.create_model(source, features_only=True).train(mode == "train")
    assert sorted(vars(source)) == attributes
    assert unifeat.get_node_names(source) and sorted(vars(source)) == attributes
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        _outputs_equal(model(x)[-1:], [source.stage(source.stem(x) + 1)])


def test_checkpoint_path_loads_pth_and_safetensors(tmp_path):
    trained = timm.create_model("resnet18")
    torch.nn.init.normal_(trained.conv1.weight)
    state = trained.state_dict()
    files = {
        "plain.pth": lambda p: torch.save(state, p),
        "nested.pt": lambda p: torch.save({"epoch": 3, "state_dict": state}, p),
        "ddp.pth": lambda p: torch.save({f"module.{k}": v for k, v in state.items()}, p),
        "weights.safetensors": lambda p: save_file(
            {k: v.contiguous() for k, v in state.items()}, str(p)
        ),
    }
    x = torch.randn(1, 3, 64, 64)
    expected = trained.eval().forward_intermediates(x, indices=[2, 4], intermediates_only=True)
    for filename, write in files.items():
        path = tmp_path / filename
        write(path)
        model = unifeat.create_model(
            "resnet18", features_only=True, out_indices=(2, 4), checkpoint_path=path
        ).eval()
        _outputs_equal(model(x), expected)
        full = unifeat.create_model("resnet18", checkpoint_path=path)
        assert torch.equal(full.fc.weight, trained.fc.weight)


def test_checkpoint_with_a_module_does_not_write_into_the_callers_tensors(tmp_path):
    source = timm.create_model("resnet18")
    before = source.conv1.weight.clone()
    other = timm.create_model("resnet18")
    path = tmp_path / "other.pth"
    torch.save(other.state_dict(), path)
    model = unifeat.create_model(source, features_only=True, checkpoint_path=path)
    assert torch.equal(source.conv1.weight, before)
    assert torch.equal(model.conv1.weight, other.conv1.weight)


def test_pretrained_uses_timms_own_loading(tmp_path):
    """pretrained=True goes through timm's loader; pointed at a local file it needs no hub."""
    trained = timm.create_model("resnet18")
    torch.nn.init.normal_(trained.conv1.weight)
    path = tmp_path / "pretrained.pth"
    torch.save(trained.state_dict(), path)
    model = unifeat.create_model(
        "resnet18", pretrained=True, features_only=True, pretrained_cfg_overlay={"file": str(path)}
    )
    assert torch.equal(model.conv1.weight, trained.conv1.weight)


def test_features_only_false_is_timms_own_model():
    pooled = unifeat.create_model("resnet18", num_classes=0).eval()
    assert isinstance(pooled, timm.models.ResNet)
    x = torch.randn(2, 3, 64, 64)
    assert pooled(x).shape == (2, 512)
    unpooled = unifeat.create_model("resnet18", num_classes=0, global_pool="").eval()
    assert unpooled(x).shape == (2, 512, 2, 2)
    full = unifeat.create_model("timm:resnet18").eval()
    features = full.forward_features(x)
    assert full.forward_head(features).shape == (2, 1000)
    full.reset_classifier(10)
    assert full(x).shape == (2, 10)


def test_dict_output_and_nhwc():
    source, model = _resnet18_features(out_indices=(1, -1))
    x = torch.randn(1, 3, 64, 64)
    nchw = model(x)
    as_dict = unifeat.create_model(
        source, backend="timm", features_only=True, out_indices=(1, -1), output_type="dict"
    ).eval()(x)
    assert list(as_dict) == ["layer1", "layer4"]
    _outputs_equal(list(as_dict.values()), nchw)
    model.output_fmt = "NHWC"
    nhwc = model(x)
    assert nhwc[0].shape == (1, 16, 16, 64)
    _outputs_equal([t.permute(0, 3, 1, 2) for t in nhwc], nchw)


def test_swin_nhwc_is_timms_native_layout():
    source = timm.create_model("swin_tiny_patch4_window7_224").eval()
    model = unifeat.create_model(source, features_only=True, output_fmt="NHWC").eval()
    reference = timm.create_model("swin_tiny_patch4_window7_224", features_only=True).eval()
    from tests.conftest import copy_weights_into_timm_features

    copy_weights_into_timm_features(reference, source)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        _outputs_equal(model(x), reference(x))  # timm's Swin features are NHWC already


def test_dtype_channels_last_and_autocast():
    _, model = _resnet18_features(out_indices=(2,))
    x = torch.randn(1, 3, 64, 64)
    reference = model(x)[0]
    channels_last = model(x.contiguous(memory_format=torch.channels_last))[0]
    torch.testing.assert_close(channels_last, reference, rtol=1e-4, atol=1e-4)
    double = copy.deepcopy(model).to(torch.float64)
    assert double(x.double())[0].dtype == torch.float64
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(x)[0]
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), reference, rtol=0.1, atol=0.1)


def test_forward_intermediates_matches_timm():
    source, model = _resnet18_features(out_indices=(1, 2, 3))
    x = torch.randn(1, 3, 64, 64)
    maps = model.forward_intermediates(x, indices=(3, 1), intermediates_only=True)
    expected = source.forward_intermediates(x, indices=[1, 3], intermediates_only=True)
    _outputs_equal(maps, expected)
    final, maps = model.forward_intermediates(x, indices=(2, 3), output_fmt="NHWC")
    assert final.shape == (1, 256, 4, 4)  # the pruned trunk ends at layer3
    assert [tuple(m.shape) for m in maps] == [(1, 8, 8, 128), (1, 4, 4, 256)]
    with pytest.raises(
        InvalidIndicesError,
        match=r"pruned after level 3: valid indices are "
        r"0\.\.3",
    ):
        model.forward_intermediates(x, indices=(4,))


def test_vit_forward_intermediates_norm_and_prefix_tokens():
    source = timm.create_model("vit_tiny_patch16_224", img_size=32).eval()
    model = unifeat.create_model(
        source, features_only=True, out_indices=(2, 5), return_prefix_tokens=True, norm=True
    ).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        ours = model.forward_intermediates(x, indices=(5,), norm=True, intermediates_only=True)
        theirs = source.forward_intermediates(
            x, indices=[5], norm=True, return_prefix_tokens=True, intermediates_only=True
        )
        normed = model(x)  # norm=True at creation: the levels come normed, as timm's getter
        raw = source.forward_intermediates(
            x, indices=[2, 5], norm=True, return_prefix_tokens=True, intermediates_only=True
        )
    torch.testing.assert_close(ours[0][0], theirs[0][0])
    torch.testing.assert_close(ours[0][1], theirs[0][1])
    for (ours_map, ours_prefix), (their_map, their_prefix) in zip(normed, raw, strict=True):
        torch.testing.assert_close(ours_map, their_map, rtol=0, atol=0)
        torch.testing.assert_close(ours_prefix, their_prefix, rtol=0, atol=0)
    # Without norm=True the model holds no final norm: asking for it is refused,
    # not answered with un-normed maps (timm's pruned model would return them).
    plain = unifeat.create_model(source, features_only=True, out_indices=(2, 5)).eval()
    with pytest.raises(unifeat.UnsupportedOptionError, match="norm=True"):
        plain.forward_intermediates(x, norm=True)


def test_prune_intermediate_layers_removes_work_and_returns_normalized_indices():
    _, model = _resnet18_features()
    assert len(list(model.parameters())) > 0
    params_before = sum(p.numel() for p in model.parameters())
    assert model.prune_intermediate_layers((-3, 1)) == [1, 2]
    assert model.feature_info.out_indices == (1, 2)
    assert sum(p.numel() for p in model.parameters()) < params_before / 4
    x = torch.randn(1, 3, 64, 64)
    assert [f.shape[1] for f in model(x)] == [64, 128]
    assert "layer3.0.conv1.weight" not in model.state_dict()
    with pytest.raises(
        InvalidIndicesError,
        match=r"ask for level 4, but .* was pruned after "
        r"level 2",
    ):
        model.prune_intermediate_layers((4,))
    assert model.feature_info.out_indices == (1, 2)  # a failed call changes nothing


def test_models_without_forward_intermediates_use_timms_hooks():
    """Older or third-party timm models lack forward_intermediates: timm's FeatureListNet runs."""

    class LegacyResNet(timm.models.ResNet):
        forward_intermediates = None
        prune_intermediate_layers = None

    legacy = LegacyResNet(block=timm.models.resnet.BasicBlock, layers=(1, 1, 1, 1)).eval()
    modern = timm.models.ResNet(block=timm.models.resnet.BasicBlock, layers=(1, 1, 1, 1)).eval()
    modern.load_state_dict(legacy.state_dict())
    model = unifeat.create_model(legacy, features_only=True, out_indices=(1, 3)).eval()
    x = torch.randn(1, 3, 64, 64)
    _outputs_equal(
        model(x), modern.forward_intermediates(x, indices=[1, 3], intermediates_only=True)
    )
    assert list(model.state_dict()) == [
        k for k in legacy.state_dict() if not k.startswith(("layer4.", "fc."))
    ]
    assert model.prune_intermediate_layers((1,)) == [1]
    _outputs_equal(model(x), modern.forward_intermediates(x, indices=[1], intermediates_only=True))
    assert not any(k.startswith("layer3.") for k in model.state_dict())


def test_torch_compile_gives_the_same_features():
    _, model = _resnet18_features(out_indices=(1, 4))
    x = torch.randn(1, 3, 64, 64)
    compiled = torch.compile(model)
    for a, b in zip(compiled(x), model(x), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_a_module_with_features_only_false_comes_back_as_is():
    source = timm.create_model("resnet18")
    assert unifeat.create_model(source) is source
    assert unifeat.create_model(source, output_stride=32) is source  # its native stride
    with pytest.raises(unifeat.UnsupportedOptionError, match="cannot be applied to an already"):
        unifeat.create_model(source, output_stride=16)
    assert not hasattr(source, "backend")  # nothing was written onto it


def test_prefix_tokens_of_a_model_without_any_are_empty():
    """return_prefix_tokens=True gives every level as (map, prefix), on every runner:
    a token model without prefix tokens (no class token) gives an empty prefix."""
    timm_vit = unifeat.create_model(
        "timm:vit_tiny_patch16_224",
        features_only=True,
        return_prefix_tokens=True,
        img_size=32,
        depth=2,
        class_token=False,
        global_pool="avg",
    )
    hf_siglip = unifeat.create_model(
        "hf:siglip_vision_model",
        features_only=True,
        return_prefix_tokens=True,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=16,
    )
    for model in (timm_vit, hf_siglip):
        for level in model(torch.randn(2, 3, 32, 32)):
            feature_map, prefix = level
            assert prefix.shape == (2, 0, feature_map.shape[1])


def test_a_build_under_a_device_context_is_made_there():
    """Under ``with torch.device("meta")`` every backend builds on the meta device (an
    open_clip tower was made on the CPU with real random weights)."""
    with torch.device("meta"):
        for name, kwargs in [
            ("timm:resnet18", {}),
            ("tv:resnet18", {}),
            ("oc:ViT-B-32", dict(layers=2, width=64, head_width=32, image_size=32, patch_size=16)),
        ]:
            model = unifeat.create_model(name, features_only=True, **kwargs)
            assert all(p.is_meta for p in model.parameters()), name
