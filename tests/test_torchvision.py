"""The torchvision backend and the generic FX backend, against torchvision's own tools."""

from __future__ import annotations

import copy
import pickle

import pytest
import timm
import torch
import torchvision
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

import unifeat
from unifeat import InvalidIndicesError, InvalidNodeError, TracingError, UnsupportedOptionError

ALL_MODELS = sorted(torchvision.models.list_models(module=torchvision.models))
# RegNet's constructor reads tensor values, so it cannot be built on the meta device.
META_UNBUILDABLE = {name for name in ALL_MODELS if name.startswith("regnet")}


def _reference(model: nn.Module, nodes: list[str]) -> nn.Module:
    return create_feature_extractor(model, {n: str(i) for i, n in enumerate(nodes)}).eval()


@pytest.mark.parametrize(
    ("name", "size"),
    [
        ("resnet50", 64),
        ("convnext_tiny", 64),
        ("efficientnet_b0", 64),
        ("mobilenet_v3_large", 64),
        ("regnet_y_400mf", 64),
        ("densenet121", 64),
        ("swin_t", 112),
        ("vit_b_16", 224),
    ],
)
def test_outputs_equal_create_feature_extractor(name, size):
    source = torchvision.models.get_model(name).eval()
    model = unifeat.create_model(source, features_only=True).eval()
    assert model.backend == "torchvision"
    nodes = model.feature_info.get("node")
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        ours = model(x)
        theirs = list(_reference(source, nodes)(x).values())
    selected = [model.feature_info[i] for i in model.feature_info.out_indices]
    for mine, ref, level in zip(ours, theirs, selected, strict=True):
        if ref.dim() == 3:  # ViT tokens: class token dropped, patches laid out NCHW
            ref = ref[:, 1:].transpose(1, 2).reshape(mine.shape)
        elif ref.shape != mine.shape:  # Swin stages are NHWC inside the model
            ref = ref.permute(0, 3, 1, 2)
        torch.testing.assert_close(mine, ref, rtol=0, atol=0)
        assert mine.shape[1] == level.num_chs
        assert mine.shape[-1] == pytest.approx(size / level.reduction, abs=1)


def _check_levels_against_forward(model: nn.Module, x: torch.Tensor) -> None:
    info = model.feature_info
    reductions = info.reduction()
    assert reductions == sorted(reductions), reductions
    outputs = model(x)
    assert len(outputs) == len(info)
    for out, level in zip(outputs, info, strict=True):
        assert out.shape[1] == level.num_chs
        # Nominal reductions: exact where the map divides the input, else the
        # nearest power of two (valid-padding nets: Inception 299 -> 147 at 2).
        ratio = x.shape[-1] / out.shape[-1]
        assert level.reduction * 0.8 <= ratio <= level.reduction * 1.25, (level, out.shape)


def _input_size(name: str) -> int:
    return 299 if name == "inception_v3" else 224


@pytest.mark.parametrize("name", ALL_MODELS)
def test_every_classification_model_has_levels_that_match_its_outputs(name):
    """All of torchvision.models: levels exist, strides grow, and forwards agree with them.

    Forwards run on the meta device (no compute, no weights); RegNets, which
    cannot be built there, run their smallest variants for real.
    """
    info = unifeat.feature_info(f"tv:{name}")
    n = len(info)
    # The one default policy: a plain ViT (one reduction throughout) gives its last
    # 3 blocks, as in timm and transformers; a hierarchical net every level.
    plain = len(set(info.reduction(list(range(n))))) == 1 and n > 3
    assert n >= 3 and info.out_indices == (tuple(range(n - 3, n)) if plain else tuple(range(n)))
    every = list(range(n))
    size = _input_size(name)
    if name in META_UNBUILDABLE:
        if not name.endswith(("400mf", "800mf")):
            return  # checked through feature_info above; building it is the slow part
        model = unifeat.create_model(f"tv:{name}", features_only=True, out_indices=every).eval()
        with torch.no_grad():
            _check_levels_against_forward(model, torch.randn(1, 3, 96, 96))
        return
    with torch.device("meta"):
        model = unifeat.create_model(f"tv:{name}", features_only=True, out_indices=every).eval()
        _check_levels_against_forward(model, torch.empty(1, 3, size, size))
    assert model.feature_info == info.from_other(every)


# (torchvision name, timm name): the same architecture in both zoos.
SHARED_ARCHITECTURES = [
    ("resnet18", "resnet18"),
    ("resnet34", "resnet34"),
    ("resnet50", "resnet50"),
    ("resnet101", "resnet101"),
    ("resnext50_32x4d", "resnext50_32x4d"),
    ("wide_resnet50_2", "wide_resnet50_2"),
    ("convnext_tiny", "convnext_tiny"),
    ("convnext_base", "convnext_base"),
    ("efficientnet_b0", "efficientnet_b0"),
    ("efficientnet_b3", "efficientnet_b3"),
    ("efficientnet_v2_s", "tf_efficientnetv2_s"),
    ("mobilenet_v2", "mobilenetv2_100"),
    ("mobilenet_v3_large", "mobilenetv3_large_100"),
    ("mobilenet_v3_small", "mobilenetv3_small_100"),
    ("mnasnet1_0", "mnasnet_100"),
    ("regnet_y_400mf", "regnety_004"),
    ("densenet121", "densenet121"),
    ("inception_v3", "inception_v3"),
    ("vgg11", "vgg11"),
    ("vgg16_bn", "vgg16_bn"),
    ("vit_b_16", "vit_base_patch16_224"),
    ("swin_t", "swin_tiny_patch4_window7_224"),
    ("swin_v2_t", "swinv2_tiny_window8_256"),
    ("maxvit_t", "maxvit_tiny_tf_224"),
]


@pytest.mark.parametrize(
    ("tv_name", "timm_name"), SHARED_ARCHITECTURES, ids=[a[0] for a in SHARED_ARCHITECTURES]
)
def test_torchvision_levels_equal_timm_levels(tv_name, timm_name):
    ours = unifeat.feature_info(f"tv:{tv_name}")
    theirs = unifeat.feature_info(f"timm:{timm_name}")
    assert list(
        zip(ours.channels(range(len(ours))), ours.reduction(range(len(ours))), strict=True)
    ) == list(
        zip(theirs.channels(range(len(theirs))), theirs.reduction(range(len(theirs))), strict=True)
    )


def test_same_weights_same_numbers_in_timm_and_torchvision():
    """ResNet-50 shares parameter names across the two zoos: same weights, same maps."""
    timm_model = unifeat.create_model("timm:resnet50", features_only=True).eval()
    tv_model = unifeat.create_model("tv:resnet50", features_only=True).eval()
    tv_model.load_state_dict(
        timm.create_model("resnet50").state_dict()
        | {k: v for k, v in timm_model.state_dict().items()},
        strict=True,
    )
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(timm_model(x), tv_model(x), strict=True):
            torch.testing.assert_close(a, b)


def test_output_stride_uses_torchvisions_own_dilation():
    source = torchvision.models.resnet50(replace_stride_with_dilation=[False, True, True]).eval()
    model = unifeat.create_model("tv:resnet50", features_only=True, output_stride=8).eval()
    model.load_state_dict(source.state_dict())
    assert model.feature_info.reduction() == [2, 4, 8, 8, 8]
    x = torch.randn(1, 3, 64, 64)
    reference = _reference(source, model.feature_info.get("node"))
    with torch.no_grad():
        for mine, ref in zip(model(x), reference(x).values(), strict=True):
            torch.testing.assert_close(mine, ref, rtol=0, atol=0)
    assert unifeat.feature_info("tv:mobilenet_v3_large", output_stride=16).reduction() == [
        2,
        4,
        8,
        16,
        16,
    ]
    # torchvision's own switch refuses BasicBlock ResNets; the generic conversion does not.
    with pytest.raises(NotImplementedError):
        torchvision.models.resnet18(replace_stride_with_dilation=[False, True, True])
    small = unifeat.create_model("tv:resnet18", features_only=True, output_stride=8)
    assert [m.shape[-1] for m in small(torch.randn(1, 3, 64, 64))] == [32, 16, 8, 8, 8]


class TwoLevel(nn.Module):
    """Repeated modules and functions inside nested scopes, for the _N suffix rules."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
        self.inner = nn.ModuleDict({"conv": nn.Conv2d(4, 4, 3, stride=2, padding=1)})
        self.act = nn.ReLU()

    def forward(self, x):
        x = self.block(x)
        y = self.act(self.inner["conv"](x))
        y = self.act(y + 1)
        return torch.relu(y) + torch.relu(y)


def test_node_names_are_torchvisions_exactly():
    golden = [
        "x",
        "block.0",
        "block.1",
        "inner.conv",
        "act",
        "add",
        "act_1",
        "relu",
        "relu_1",
        "add_1",
    ]
    train, evaluation = unifeat.get_node_names(TwoLevel())
    assert train == evaluation == golden
    assert (train, evaluation) == get_graph_node_names(TwoLevel())
    for name in ["resnet18", "convnext_tiny", "vit_b_16", "swin_t"]:
        assert unifeat.get_node_names(f"tv:{name}") == get_graph_node_names(
            torchvision.models.get_model(name)
        )


class ModeDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.body = nn.Conv2d(4, 8, 3, stride=2, padding=1)

    def forward(self, x):
        x = self.stem(x)
        if self.training:
            x = x * 2
        return self.body(x).mean((2, 3))


def test_train_and_eval_graphs_differ_where_the_model_does():
    train, evaluation = unifeat.get_node_names(ModeDependent())
    assert "mul" in train and "mul" not in evaluation
    source = ModeDependent()
    model = unifeat.create_model(source, features_only=True)
    x = torch.randn(1, 3, 32, 32)
    stem = source.stem(x)
    torch.testing.assert_close(model.eval()(x)[1], source.body(stem))
    torch.testing.assert_close(model.train()(x)[1], source.body(stem * 2))
    assert source.training  # the caller's module keeps its own mode


def test_a_model_built_in_eval_mode_traces_its_train_graph_when_trained():
    """One trace for inference; the train graph comes with the first .train(),
    also after a deepcopy, a pickle round trip or pruning."""
    source = ModeDependent().eval()
    x = torch.randn(1, 3, 32, 32)
    stem = source.stem(x)
    for model in (
        unifeat.create_model(source, features_only=True),
        copy.deepcopy(unifeat.create_model(source, features_only=True)),
        pickle.loads(pickle.dumps(unifeat.create_model(source, features_only=True))),
    ):
        assert not model.training and model._runner.train_trace is None
        torch.testing.assert_close(model(x)[1], source.body(stem))
        model.prune_intermediate_layers((0, 1))
        torch.testing.assert_close(model.train()(x)[1], source.body(stem * 2))
        torch.testing.assert_close(model.eval()(x)[1], source.body(stem))
    assert not source.training


def test_return_nodes_full_truncated_and_keyed():
    source = torchvision.models.resnet18().eval()
    x = torch.randn(1, 3, 64, 64)
    reference = create_feature_extractor(source, {"layer4": "c", "layer2.1.relu_1": "b"}).eval()
    model = unifeat.create_model(
        source, features_only=True, return_nodes={"layer4": "c", "layer2.1.relu_1": "b"}
    ).eval()
    ours = model(x)
    assert list(ours) == ["b", "c"]  # depth order, keys from the dict's values
    for key, value in reference(x).items():
        torch.testing.assert_close(ours[key], value, rtol=0, atol=0)
    listed = unifeat.create_model(
        "tv:resnet18", features_only=True, return_nodes=["layer3", "layer1"], output_type="list"
    )
    assert [t.shape[1] for t in listed(x)] == [64, 256]


def test_bad_return_nodes():
    with pytest.raises(InvalidNodeError, match=r"unknown node 'layer5'.*close matches: layer4"):
        unifeat.create_model("tv:resnet18", features_only=True, return_nodes=["layer5"])
    with pytest.raises(InvalidNodeError, match=r"'layer4' and 'layer4.1.relu_1' both name node"):
        unifeat.create_model(
            "tv:resnet18", features_only=True, return_nodes=["layer4", "layer4.1.relu_1"]
        )
    with pytest.raises(InvalidNodeError, match="return_nodes is empty"):
        unifeat.create_model("tv:resnet18", features_only=True, return_nodes=[])
    with pytest.raises(UnsupportedOptionError, match="out_indices cannot be combined"):
        unifeat.create_model(
            "tv:resnet18", features_only=True, return_nodes=["layer1"], out_indices=(1,)
        )


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        x = self.conv(x)
        if x.sum() > 0:
            return x
        return -x


def test_untraceable_model_raises_tracing_error_with_the_way_out():
    source = DataDependent().train()
    with pytest.raises(
        TracingError,
        match=r"FX could not trace module DataDependent.*"
        r"symbolically traced variables.*backend=",
    ):
        unifeat.create_model(source, features_only=True)
    assert source.training  # mode restored on failure, unlike torchvision's


def test_generic_module_levels_and_input_size():
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, 2, 1),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, 2, 1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, 2, 1),
    )
    model = unifeat.create_model(net, features_only=True, input_size=(64, 96))
    assert model.backend == "fx"
    assert model.feature_info.channels() == [8, 16, 32]
    assert model.feature_info.reduction() == [2, 4, 8]
    outputs = model(torch.randn(2, 3, 64, 96))
    assert [tuple(o.shape) for o in outputs] == [(2, 8, 32, 48), (2, 16, 16, 24), (2, 32, 8, 12)]


def test_fx_feature_model_module_behaviour():
    source = torchvision.models.resnet18().eval()
    model = unifeat.create_model(source, features_only=True, out_indices=(1, 2)).eval()
    keys = list(model.state_dict())
    assert keys == [k for k in source.state_dict() if not k.startswith(("layer3", "layer4", "fc"))]
    other = torchvision.models.resnet18().eval()
    model.load_state_dict(other.state_dict(), strict=True)
    x = torch.randn(1, 3, 64, 64)
    expected = list(_reference(other, ["layer1", "layer2"])(x).values())
    for clone in (model, copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        for a, b in zip(clone(x), expected, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    # Gradients reach every parameter that feeds a level.
    model.train()
    sum((f * torch.randn_like(f)).sum() for f in model(x)).backward()
    assert all(p.grad is not None for p in model.parameters())
    # The caller's module is untouched and its parameters are shared.
    assert source.fc.out_features == 1000 and len(source.layer4) == 2
    assert model.conv1.weight is not other.conv1.weight


def test_fx_forward_intermediates_and_pruning():
    source = torchvision.models.resnet18().eval()
    model = unifeat.create_model(source, features_only=True).eval()
    x = torch.randn(1, 3, 64, 64)
    final, maps = model.forward_intermediates(x, indices=(3, 1))
    assert [m.shape[1] for m in maps] == [64, 256]
    assert final.shape[1] == 512
    assert model.prune_intermediate_layers((-4, 2)) == [1, 2]
    assert [t.shape[1] for t in model(x)] == [64, 128]
    assert not any(k.startswith("layer3") for k in model.state_dict())
    with pytest.raises(InvalidIndicesError, match="pruned after level 2"):
        model.forward_intermediates(x, indices=(4,))


def test_timm_models_take_return_nodes_too():
    source = timm.create_model("resnet18").eval()
    model = unifeat.create_model(source, features_only=True, return_nodes={"layer2": "mid"})
    x = torch.randn(1, 3, 64, 64)
    expected = source.forward_intermediates(x, indices=[2], intermediates_only=True)[0]
    torch.testing.assert_close(model(x)["mid"], expected)
    assert model.backend == "timm"
    names = unifeat.get_node_names("timm:resnet18")[1]
    assert "layer2.1.act2" in names


@pytest.mark.parametrize("stride", [8, 16])
def test_generic_dilation_equals_torchvisions_own(stride):
    """A ResNet-50 *instance* has no constructor switch left, so the generic
    conversion runs; it must give exactly torchvision's replace_stride_with_dilation."""
    flags = [False, stride == 8, True]
    native = torchvision.models.resnet50(replace_stride_with_dilation=flags).eval()
    source = torchvision.models.resnet50().eval()
    source.load_state_dict(native.state_dict())
    model = unifeat.create_model(source, features_only=True, output_stride=stride).eval()
    assert max(model.feature_info.reduction()) == stride
    x = torch.randn(1, 3, 64, 64)
    reference = _reference(native, model.feature_info.get("node"))
    with torch.no_grad():
        for mine, ref in zip(model(x), reference(x).values(), strict=True):
            torch.testing.assert_close(mine, ref, rtol=0, atol=0)
    assert source.layer4[0].conv2.stride == (2, 2)  # the caller's module is untouched


@pytest.mark.parametrize(
    ("name", "stride", "reductions"),
    [
        ("convnext_tiny", 16, [4, 8, 16, 16]),
        ("convnext_tiny", 8, [4, 8, 8, 8]),
        ("efficientnet_b0", 16, [2, 4, 8, 16, 16]),
        ("efficientnet_b0", 8, [2, 4, 8, 8, 8]),
        ("mobilenet_v2", 8, [2, 4, 8, 8, 8]),
        ("regnet_y_400mf", 16, [2, 4, 8, 16, 16]),
    ],
)
def test_generic_dilation_gives_exact_map_sizes(name, stride, reductions):
    model = unifeat.create_model(f"tv:{name}", features_only=True, output_stride=stride).eval()
    assert model.feature_info.reduction() == reductions
    x = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        maps = model(x)
    assert [tuple(m.shape[-2:]) for m in maps] == [(96 // r, 128 // r) for r in reductions]


@pytest.mark.parametrize(
    ("name", "stride", "message"),
    [
        ("vit_b_16", 8, r"supported values are 16 \(its patch size: a token model"),
        ("swin_t", 16, r"downsamples outside conv and pool modules"),
        ("densenet121", 16, r"AvgPool2d\(2\) 'features.transition3.pool'"),
        ("vgg11", 16, r"MaxPool2d\(2\) 'features.20'"),
        ("inception_v3", 16, r"branches no longer produce maps of matching sizes"),
        ("resnet50", 64, r"larger than the native stride 32"),
    ],
)
def test_undilatable_models_say_why(name, stride, message):
    with pytest.raises(UnsupportedOptionError, match=message):
        unifeat.feature_info(f"tv:{name}", output_stride=stride)


def test_pretrained_uses_torchvisions_weights_loading(tmp_path, monkeypatch):
    """weights="DEFAULT" through torchvision's own loader, served from its local cache."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    weights = torchvision.models.ResNet18_Weights.DEFAULT
    trained = torchvision.models.resnet18()
    torch.nn.init.normal_(trained.conv1.weight)
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(trained.state_dict(), cache / weights.url.rsplit("/", 1)[-1])
    model = unifeat.create_model("tv:resnet18", pretrained=True, features_only=True)
    assert torch.equal(model.conv1.weight, trained.conv1.weight)
    path = tmp_path / "ckpt.pth"
    torch.save({"model": trained.state_dict()}, path)
    model = unifeat.create_model("tv:resnet18", features_only=True, checkpoint_path=path)
    assert torch.equal(model.conv1.weight, trained.conv1.weight)


def test_mobilenet_v3_config_keywords_are_accepted():
    """MobileNetV3's builder passes reduced_tail and dilated to its config function, not
    to the class: they are the model's keywords too (a typo still is not)."""
    reduced = unifeat.feature_info("tv:mobilenet_v3_large", reduced_tail=True)
    assert reduced.channels()[-1] == 480  # the last stage halved (960 otherwise)
    with pytest.raises(unifeat.UnsupportedOptionError, match="reduced_tail"):
        unifeat.feature_info("tv:mobilenet_v3_large", reduced_tal=True)
