"""timm's classifier interface for torchvision and transformers models
(docs/training.md, "Classifier models").

With the same weights (timm's, mapped by ``tests/consistency/weights.py``),
``forward_features`` and ``forward_head(pre_logits=True)`` equal timm's; the
logits equal the library model's own, bit for bit; parameters are shared with
the library model and state-dict keys are its keys.
"""

from __future__ import annotations

import copy
import pickle
from collections.abc import Mapping
from typing import Any

import pytest
import timm
import torch
import torchvision
import transformers
from torch import Tensor, nn

import unifeat
from tests.configs import HF_VIT_64
from tests.consistency import weights as w
from tests.consistency.cases import _randomize
from tests.test_contract import _TwoStageNet

# -- the same weights in three libraries -------------------------------------------------

_SMALL_VIT = dict(image_size=64, patch_size=16, num_layers=2, num_heads=2, hidden_dim=32)


def _timm(name: str, **kwargs: Any) -> nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(name, **kwargs).eval()
    _randomize(model)
    return model


def _pair(arch: str) -> tuple[nn.Module, nn.Module, nn.Module, int]:
    """timm's model, torchvision's and transformers' base model with its weights, and
    the input size to compare them at."""
    if arch == "resnet50":
        source, tv, size = _timm("resnet50"), torchvision.models.resnet50(), 64
        tv_map, hf_config, hf_map = w.SAME_NAMES, transformers.ResNetConfig(), w.HF_RESNET
    elif arch == "convnext_tiny":
        source, tv, size = _timm("convnext_tiny"), torchvision.models.convnext_tiny(), 64
        tv_map, hf_config, hf_map = w.TV_CONVNEXT, transformers.ConvNextConfig(), w.HF_CONVNEXT
    elif arch == "vit_small":
        source = _timm(
            "vit_base_patch16_224", img_size=64, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2
        )
        tv = torchvision.models.VisionTransformer(mlp_dim=64, **_SMALL_VIT)
        size, tv_map, hf_map = 64, w.TV_VIT, w.HF_VIT
        hf_config = transformers.ViTConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            image_size=64,
            patch_size=16,
            layer_norm_eps=1e-6,
        )
    else:  # vit_b_16
        source, tv, size = _timm("vit_base_patch16_224"), torchvision.models.vit_b_16(), 224
        tv_map, hf_map = w.TV_VIT, w.HF_VIT
        hf_config = transformers.ViTConfig(layer_norm_eps=1e-6)
    state = source.state_dict()
    w.load_mapped(tv, state, tv_map)
    hf = transformers.AutoModel.from_config(hf_config)
    w.load_mapped(hf, state, hf_map)
    return source, tv.eval(), hf.eval(), size


@pytest.mark.parametrize(
    "arch",
    [
        "resnet50",
        "convnext_tiny",
        "vit_small",
        "vit_b_16",
    ],
)
def test_features_and_pre_logits_equal_timms(arch: str) -> None:
    source, tv, hf, size = _pair(arch)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        features = source.forward_features(x)
        pre_logits = source.forward_head(features, pre_logits=True)
        logits = source(x)
        for library in (tv, hf):
            model = _with_timms_interface(library).eval()
            ours = model.forward_features(x)
            torch.testing.assert_close(ours, features, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(
                model.forward_head(ours, pre_logits=True), pre_logits, rtol=1e-4, atol=1e-4
            )
            assert model.num_features == source.num_features
            assert model.head_hidden_size == pre_logits.shape[-1]
        # torchvision's classifier holds timm's (mapped) too: the same logits.
        torch.testing.assert_close(
            _with_timms_interface(tv).eval()(x), logits, rtol=1e-4, atol=1e-4
        )


# -- the library model's own logits, bit for bit -------------------------------------------

_HF_RESNET = dict(embedding_size=8, hidden_sizes=[16, 32, 48, 64], depths=[1, 1, 1, 1])
_HF_CONVNEXT = dict(hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1])
_HF_VIT = HF_VIT_64


def _tv(name: str, **kwargs: Any) -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.get_model(name, **kwargs).eval()


_HF_CLASSES = {
    "resnet": (transformers.ResNetConfig, transformers.ResNetForImageClassification),
    "convnext": (transformers.ConvNextConfig, transformers.ConvNextForImageClassification),
    "vit": (transformers.ViTConfig, transformers.ViTForImageClassification),
    "dinov2": (transformers.Dinov2Config, transformers.Dinov2ForImageClassification),
    "dinov2_with_registers": (
        transformers.Dinov2WithRegistersConfig,
        transformers.Dinov2WithRegistersForImageClassification,
    ),
    "swin": (transformers.SwinConfig, transformers.SwinForImageClassification),
    "swinv2": (transformers.Swinv2Config, transformers.Swinv2ForImageClassification),
    "deit": (transformers.DeiTConfig, transformers.DeiTForImageClassification),
    "beit": (transformers.BeitConfig, transformers.BeitForImageClassification),
    "data2vec-vision": (
        transformers.Data2VecVisionConfig,
        transformers.Data2VecVisionForImageClassification,
    ),
    "regnet": (transformers.RegNetConfig, transformers.RegNetForImageClassification),
    "bit": (transformers.BitConfig, transformers.BitForImageClassification),
    "convnextv2": (transformers.ConvNextV2Config, transformers.ConvNextV2ForImageClassification),
}
_HF_DINOV2 = dict(
    hidden_size=32,
    mlp_ratio=2,
    num_hidden_layers=2,
    num_attention_heads=2,
    image_size=64,
    patch_size=16,
)
_HF_SWIN = dict(
    embed_dim=8, depths=[1, 1], num_heads=[1, 2], image_size=64, patch_size=4, window_size=4
)
_HF_MAPS = dict(hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1])
_HF_BIT = dict(embedding_size=16, hidden_sizes=[16, 32, 48, 64], depths=[1, 1, 1, 1], num_groups=4)


def _hf(kind: str, config: dict[str, Any]) -> nn.Module:
    torch.manual_seed(0)
    config_class, model_class = _HF_CLASSES[kind]
    return model_class(config_class(**config, num_labels=7)).eval()


def _own_logits(library: nn.Module, x: Tensor) -> Tensor:
    out = library(x)
    return out.logits if isinstance(library, transformers.PreTrainedModel) else out


class _PooledNet(nn.Module):
    """A head of modules: pool, flatten, dropout, Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 16, 3, 2, 1)
        )
        self.pool, self.flat, self.drop = nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2)
        self.fc = nn.Linear(16, 5)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.drop(self.flat(self.pool(self.features(x)))))


class _FunctionalNet(nn.Module):
    """A head of functions: F.adaptive_avg_pool2d, torch.flatten, Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, 16, 3, 2, 1)
        )
        self.fc = nn.Linear(16, 5)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(self.features(x), 1), 1))


def _fx(make: Any) -> nn.Module:
    torch.manual_seed(0)
    return make().eval()


def _with_timms_interface(library: nn.Module) -> Any:
    """The classifier model over ``library`` with its own head: timm's options
    (here ``num_classes`` equal to the library's) ask for timm's interface."""
    config = getattr(library, "config", None)
    size = getattr(library, "image_size", None) or getattr(config, "image_size", 64)
    with torch.no_grad():  # at the model's own size: torchvision's ViT takes no other
        out = library.eval()(torch.zeros(1, 3, size, size))
    logits = getattr(out, "logits", None) if isinstance(out, Mapping) else out
    classes = 0 if logits is None else logits.shape[1]  # a transformers base model: none
    return unifeat.create_model(library, num_classes=classes)


LIBRARY_MODELS = [
    pytest.param(lambda: _tv("resnet18"), id="tv-resnet18"),
    pytest.param(
        lambda: torchvision.models.ConvNeXt(
            [
                torchvision.models.convnext.CNBlockConfig(8, 16, 1),
                torchvision.models.convnext.CNBlockConfig(16, None, 1),
            ]
        ).eval(),
        id="tv-convnext-small",
    ),
    pytest.param(lambda: _tv("mobilenet_v3_small"), id="tv-mobilenet_v3_small"),
    pytest.param(lambda: _tv("mobilenet_v2"), id="tv-mobilenet_v2"),
    pytest.param(lambda: _tv("regnet_x_400mf"), id="tv-regnet_x_400mf"),
    pytest.param(lambda: _tv("efficientnet_b0"), id="tv-efficientnet_b0"),
    pytest.param(
        lambda: torchvision.models.VisionTransformer(mlp_dim=64, **_SMALL_VIT).eval(),
        id="tv-vit-small",
    ),
    pytest.param(lambda: _hf("resnet", _HF_RESNET), id="hf-resnet"),
    pytest.param(lambda: _hf("convnext", _HF_CONVNEXT), id="hf-convnext"),
    pytest.param(lambda: _hf("vit", _HF_VIT), id="hf-vit"),
    pytest.param(
        lambda: torchvision.models.SwinTransformer(
            [4, 4], 16, [1, 1], [1, 2], [4, 4], num_classes=7
        ).eval(),
        id="tv-swin-small",
    ),
    pytest.param(
        lambda: torchvision.models.DenseNet(8, (1, 1), 8, num_classes=7).eval(),
        id="tv-densenet-small",
    ),
    pytest.param(lambda: _hf("dinov2", _HF_DINOV2), id="hf-dinov2"),
    pytest.param(
        lambda: _hf("dinov2_with_registers", {**_HF_DINOV2, "num_register_tokens": 2}),
        id="hf-dinov2_with_registers",
    ),
    pytest.param(lambda: _hf("swin", _HF_SWIN), id="hf-swin"),
    pytest.param(lambda: _hf("swinv2", _HF_SWIN), id="hf-swinv2"),
    pytest.param(lambda: _hf("deit", _HF_VIT), id="hf-deit"),
    pytest.param(lambda: _hf("beit", _HF_VIT), id="hf-beit-mean-pooling"),
    pytest.param(lambda: _hf("beit", {**_HF_VIT, "use_mean_pooling": False}), id="hf-beit-cls"),
    pytest.param(lambda: _hf("data2vec-vision", _HF_VIT), id="hf-data2vec-vision"),
    pytest.param(lambda: _hf("regnet", {**_HF_MAPS, "groups_width": 8}), id="hf-regnet"),
    pytest.param(lambda: _hf("bit", _HF_BIT), id="hf-bit-preactivation"),
    pytest.param(lambda: _hf("bit", {**_HF_BIT, "layer_type": "bottleneck"}), id="hf-bit"),
    pytest.param(lambda: _hf("convnextv2", _HF_MAPS), id="hf-convnextv2"),
    pytest.param(lambda: _fx(_TwoStageNet), id="fx-mean"),
    pytest.param(lambda: _fx(_PooledNet), id="fx-modules"),
    pytest.param(lambda: _fx(_FunctionalNet), id="fx-functional"),
]


@pytest.mark.parametrize("make", LIBRARY_MODELS)
def test_forward_is_the_library_models_logits(make: Any) -> None:
    library = make()
    keys = list(library.state_dict())
    model = _with_timms_interface(library).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = _own_logits(library, x)
        found = model(x)
        torch.testing.assert_close(found, expected, rtol=0, atol=0)
        features = model.forward_features(x)
        torch.testing.assert_close(model.forward_head(features), expected, rtol=0, atol=0)
        pooled = model.forward_head(features, pre_logits=True)
    assert model.num_classes == expected.shape[1] == model.get_classifier().out_features
    assert pooled.shape == (2, model.head_hidden_size)
    assert list(model.state_dict()) == keys
    assert list(library.state_dict()) == keys  # the module passed in is left as it was


# -- num_classes, global_pool, reset_classifier -----------------------------------------------


def test_num_classes_and_global_pool_by_name() -> None:
    x = torch.randn(2, 3, 64, 64)
    pooled = unifeat.create_model("tv:resnet18", num_classes=0).eval()
    unpooled = unifeat.create_model("tv:resnet18", num_classes=0, global_pool="").eval()
    ten = unifeat.create_model("tv:resnet18", num_classes=10).eval()
    with torch.no_grad():
        assert pooled(x).shape == (2, 512)
        assert unpooled(x).shape == (2, 512, 2, 2)
        assert ten(x).shape == (2, 10)
    assert isinstance(pooled.get_classifier(), nn.Identity) and pooled.num_classes == 0
    assert ten.get_classifier().out_features == 10 and ten.num_features == 512
    assert "fc.weight" not in pooled.state_dict()
    assert ten.state_dict()["fc.weight"].shape == (10, 512)
    # the library model is the wrapper's, head included
    assert isinstance(ten.library_model, torchvision.models.ResNet)
    assert ten.fc is ten.library_model.fc is ten.get_classifier()


def test_reset_classifier_and_pools_of_a_token_model() -> None:
    model = _with_timms_interface(
        torchvision.models.VisionTransformer(mlp_dim=64, **_SMALL_VIT)
    ).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        features = model.forward_features(x)
        assert features.shape == (2, 17, 32)
        model.reset_classifier(5)
        assert model(x).shape == (2, 5) and model.heads.head.out_features == 5
        model.reset_classifier(0, global_pool="avg")
        torch.testing.assert_close(model(x), features[:, 1:].mean(1))
        model.reset_classifier(0, global_pool="")
        assert torch.equal(model(x), features)
    with pytest.raises(unifeat.UnsupportedOptionError, match=r"num_classes=0 only"):
        model.reset_classifier(3)  # unpooled features take no classifier
    with pytest.raises(unifeat.UnsupportedOptionError, match=r"'token', 'avg'"):
        model.reset_classifier(3, global_pool="max")


def test_a_transformers_base_model_has_no_classifier_until_reset() -> None:
    model = unifeat.create_model("hf:convnext", num_classes=0, **_HF_CONVNEXT).eval()
    assert isinstance(model.library_model, transformers.ConvNextModel) and model.num_classes == 0
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        own = model.library_model(pixel_values=x).pooler_output
        torch.testing.assert_close(model(x), own, rtol=0, atol=0)
    keys = set(model.state_dict())
    model.reset_classifier(4)
    assert set(model.state_dict()) - keys == {"classifier.weight", "classifier.bias"}
    assert unifeat.create_model("hf:convnext", num_classes=3, **_HF_CONVNEXT)(x).shape == (2, 3)


# -- sharing, state dicts, copies, modes ---------------------------------------------------


def test_training_the_classifier_model_trains_the_library_model() -> None:
    library = _tv("resnet18")
    before = library.conv1.weight.detach().clone()
    model = unifeat.create_model(library, num_classes=3).train()
    assert library.fc.out_features == 1000  # reset_classifier does not reach it
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = nn.functional.cross_entropy(model(torch.randn(4, 3, 64, 64)), torch.tensor([0, 1, 2, 0]))
    loss.backward()
    optimizer.step()
    assert not torch.equal(library.conv1.weight, before)
    assert model.conv1.weight is library.conv1.weight
    assert not torch.equal(library.bn1.running_mean, torch.zeros(64))  # statistics shared


def test_state_dict_round_trips_and_copies() -> None:
    library = _hf("resnet", _HF_RESNET)
    model = _with_timms_interface(library).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
    other = _with_timms_interface(_hf("resnet", {**_HF_RESNET, "hidden_act": "relu"})).eval()
    for parameter in other.parameters():
        nn.init.normal_(parameter)
    other.load_state_dict(model.state_dict())
    library.load_state_dict(model.state_dict())  # a checkpoint of either fits the other
    with torch.no_grad():
        assert torch.equal(other(x), expected)
        for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
            assert torch.equal(clone(x), expected)
    assert "num_classes=7" in repr(model)


def test_to_dtype_and_modes_follow_the_wrapper() -> None:
    model = unifeat.create_model("tv:resnet18", num_classes=4).train()
    assert model.training and model.library_model.training
    model.eval().to(torch.float64)
    assert all(p.dtype == torch.float64 for p in model.parameters())
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64, dtype=torch.float64)).dtype == torch.float64
    # statistics stay shared after .to(): training updates what state_dict shows
    model.train()
    model(torch.randn(2, 3, 64, 64, dtype=torch.float64))
    assert not torch.equal(model.state_dict()["bn1.running_mean"], torch.zeros(64).double())


def test_a_classifier_model_passed_in_stands_for_its_library_model() -> None:
    model = unifeat.create_model("tv:resnet18", num_classes=4)
    features = unifeat.create_model(model, features_only=True, out_indices=(-1,)).eval()
    with torch.no_grad():
        x = torch.randn(1, 3, 64, 64)
        assert torch.equal(features(x)[0], model.eval().forward_features(x))


# -- what is refused ---------------------------------------------------------------------------


def test_refusals_name_the_model_and_what_works() -> None:
    with pytest.raises(unifeat.UnsupportedOptionError, match=r"head unifeat knows.*DenseNet"):
        unifeat.create_model(_tv("squeezenet1_1"), num_classes=3)
    with pytest.raises(unifeat.UnsupportedOptionError, match=r"VGG: .*7x7.*not a global pool"):
        unifeat.create_model("tv:vgg11", num_classes=3)
    with pytest.raises(unifeat.UnsupportedOptionError, match=r"global_pool='' .*1000 classes"):
        unifeat.create_model("tv:resnet18", global_pool="")
    with pytest.raises(unifeat.UnsupportedOptionError, match=r"global_pool=.*feature model"):
        unifeat.create_model("tv:resnet18", features_only=True, global_pool="")
    with pytest.raises(unifeat.UnsupportedOptionError, match=r"num_classes=-1"):
        unifeat.create_model("tv:resnet18", num_classes=-1)
    with pytest.raises(unifeat.UnsupportedOptionError, match=r"'avg', 'max' or ''"):
        unifeat.create_model("tv:resnet18", num_classes=0, global_pool="token")
    # without timm's options, the library's own model, as its own tools expect it
    densenet, resnet = _tv("squeezenet1_1"), _tv("resnet18")
    assert unifeat.create_model(densenet) is densenet
    assert unifeat.create_model(resnet) is resnet
    assert type(unifeat.create_model("tv:resnet18")) is torchvision.models.ResNet


# -- DINOv2's head: class token and mean of patch tokens -------------------------------------


def test_dinov2_pools_and_leaves_register_tokens_out_of_the_mean() -> None:
    library = _hf("dinov2_with_registers", {**_HF_DINOV2, "num_register_tokens": 2})
    model = _with_timms_interface(library).eval()
    x = torch.randn(2, 3, 64, 64)
    assert (model.global_pool, model.num_features, model.head_hidden_size) == ("token_avg", 32, 64)
    with torch.no_grad():
        tokens = model.forward_features(x)
        assert tokens.shape == (2, 1 + 2 + 16, 32)
        expected = torch.cat([tokens[:, 0], tokens[:, 3:].mean(dim=1)], dim=1)
        assert torch.equal(model.forward_head(tokens, pre_logits=True), expected)
        model.reset_classifier(0, global_pool="avg")
        assert model.head_hidden_size == 32
        assert torch.equal(model(x), tokens[:, 3:].mean(dim=1))
        model.reset_classifier(4, global_pool="token")
        assert model(x).shape == (2, 4) and model.get_classifier().in_features == 32
    # a pool of another width replaces the classifier (the old one does not fit)
    by_name = unifeat.create_model("hf:dinov2", global_pool="token", num_classes=3, **_HF_DINOV2)
    assert by_name.head_hidden_size == 32 and by_name.get_classifier().in_features == 32
    with pytest.raises(unifeat.UnsupportedOptionError, match=r"'token_avg', 'token', 'avg'"):
        model.reset_classifier(3, global_pool="max")


def test_transformers_heads_that_are_refused_say_why() -> None:
    config = transformers.DeiTConfig(**_HF_VIT, num_labels=3)
    teacher = transformers.DeiTForImageClassificationWithTeacher(config)
    with pytest.raises(unifeat.UnsupportedOptionError, match=r"average two classifiers"):
        unifeat.create_model(teacher, num_classes=3)
    # data2vec-vision's base model is built without the pooler holding its final norm
    with pytest.raises(unifeat.UnsupportedOptionError, match=r"add_pooling_layer=False"):
        unifeat.create_model("hf:data2vec-vision", num_classes=3, **_HF_VIT)
    base = unifeat.create_model("hf:swin", num_classes=0, **_HF_SWIN).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(base(x), base.library_model(pixel_values=x).pooler_output)


# -- open_clip towers: the projection is the classifier, as in timm -------------------------

_OC_VIT = dict(layers=2, width=64, head_width=32, image_size=64, patch_size=16)


def test_an_open_clip_tower_gives_its_embedding_and_its_projection_is_the_classifier() -> None:
    tower = unifeat.create_model("oc:ViT-B-32", **_OC_VIT).eval()
    assert type(tower).__module__.startswith("open_clip")  # no options: open_clip's own
    proj = tower.proj.detach().clone()
    model = unifeat.create_model(tower, num_classes=512).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = tower(x)
        assert torch.equal(model(x), expected)
        tokens = model.forward_features(x)
        assert torch.equal(tokens[:, 0], model.forward_head(tokens, pre_logits=True))
        pooled = model.forward_head(tokens, pre_logits=True)
        assert torch.equal(pooled @ tower.proj, expected)
    assert (model.num_classes, model.num_features, model.head_hidden_size) == (512, 64, 64)
    assert model.get_classifier().weight is model.proj
    assert list(model.state_dict()) == list(tower.state_dict())
    model.reset_classifier(10)
    with torch.no_grad():
        assert model(x).shape == (2, 10)
    assert {"proj.weight", "proj.bias"} <= set(model.state_dict())
    assert torch.equal(tower.proj, proj) and isinstance(tower.proj, nn.Parameter)
    model.reset_classifier(0, global_pool="avg")
    with torch.no_grad():
        assert torch.equal(model(x), tokens[:, 1:].mean(dim=1))


def test_open_clip_modified_resnet_is_refused_with_the_reason() -> None:
    with pytest.raises(unifeat.UnsupportedOptionError, match=r"ModifiedResNet.*c_proj"):
        unifeat.create_model(
            "oc:RN50", num_classes=0, layers=(1, 1, 1, 1), width=16, head_width=16, image_size=64
        )


# -- modules of other classes: the head read off the traced graph ------------------------------


class _NoPoolNet(_FunctionalNet):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16 * 16 * 16, 5)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.flatten(self.features(x), 1))


class _ScaledNet(_FunctionalNet):
    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x) * 2


class _TwoUsesNet(_FunctionalNet):
    def forward(self, x: Tensor) -> Tensor:
        pooled = self.features(x).mean((2, 3))
        return self.fc(pooled + pooled.mean())


@pytest.mark.parametrize(
    "make,match",
    [
        (_NoPoolNet, r"0 global pools"),
        (_ScaledNet, r"'mul'.*not an nn.Linear"),
        (_TwoUsesNet, r"'add'.*lies between|reads 2 values"),
    ],
)
def test_a_module_whose_head_is_not_plain_is_refused(make: Any, match: str) -> None:
    module = _fx(make)
    with pytest.raises(unifeat.UnsupportedOptionError, match=match):
        unifeat.create_model(module, num_classes=5, input_size=(64, 64))
    assert unifeat.create_model(module) is module


def test_a_modules_head_is_its_own_and_resets() -> None:
    module = _fx(_PooledNet)
    model = unifeat.create_model(module, num_classes=3).train()
    assert model.get_classifier().out_features == 3 and module.fc.out_features == 5
    assert model.features[0].weight is module.features[0].weight
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 3)


# -- checkpoints: the head is built for num_classes first, as timm does ---------------------


def test_a_fine_tuned_checkpoint_loads_with_its_num_classes(tmp_path: Any) -> None:
    model = unifeat.create_model("tv:resnet18", num_classes=1000)
    model.reset_classifier(10)
    nn.init.normal_(model.get_classifier().weight)
    path = tmp_path / "fine_tuned.pth"
    torch.save(model.state_dict(), path)
    loaded = unifeat.create_model("tv:resnet18", num_classes=10, checkpoint_path=path).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))
    # a module passed in is not written
    library = _tv("resnet18")
    before = library.conv1.weight.detach().clone()
    again = unifeat.create_model(library, num_classes=10, checkpoint_path=path).eval()
    assert torch.equal(library.conv1.weight, before) and library.fc.out_features == 1000
    with torch.no_grad():
        assert torch.equal(again(x), model(x))
    with pytest.raises(unifeat.CheckpointError):
        unifeat.create_model("tv:resnet18", num_classes=7, checkpoint_path=path)


# -- DistributedDataParallel: what forward does not use ---------------------------------------


def test_parameters_the_head_does_not_use_are_left_to_ddp() -> None:
    # a transformers ViT base model's pooler (dense + tanh) is not part of timm's head
    model = unifeat.create_model("hf:vit", num_classes=3, **_HF_VIT)
    assert sorted(model._ddp_params_and_buffers_to_ignore) == [
        "pooler.dense.bias",
        "pooler.dense.weight",
    ]
    assert all(p.device.type == "cpu" for p in model.parameters())  # found on meta only
    used = unifeat.create_model("tv:resnet18", num_classes=3)
    assert used._ddp_params_and_buffers_to_ignore == []
    # every name is one of the model's own
    names = {name for name, _ in model.named_parameters()}
    assert set(model._ddp_params_and_buffers_to_ignore) <= names
    loss = model(torch.randn(2, 3, 64, 64)).sum()
    loss.backward()
    unused = {name for name, p in model.named_parameters() if p.grad is None}
    assert unused == set(model._ddp_params_and_buffers_to_ignore)
