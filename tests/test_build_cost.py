"""What a build from a traced model costs, and that the shortcuts change no result.

The meta shape pass runs each distinct node of repeated blocks once
(``unifeat._engine.shapes``): its shapes are checked here against torch's own
``ShapeProp`` running the same graph on real tensors, including graphs built to
trip a wrong shortcut (in-place ops that change shapes, hooks, a ``torch.nn``
subclass with its own forward, settings that differ between alike modules).
"""

from __future__ import annotations

import random
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp
from torchvision.models.convnext import CNBlockConfig, ConvNeXt
from torchvision.models.feature_extraction import create_feature_extractor
from torchvision.models.swin_transformer import SwinTransformer
from torchvision.models.vision_transformer import VisionTransformer

import unifeat
from unifeat._engine import graph as graph_module
from unifeat._engine.graph import shapes_of, trace, with_constants


def _tiny_vit() -> nn.Module:
    return VisionTransformer(
        image_size=32, patch_size=8, num_layers=3, num_heads=2, hidden_dim=16, mlp_dim=32
    )


def _tiny_convnext() -> nn.Module:
    return ConvNeXt([CNBlockConfig(8, 16, 2), CNBlockConfig(16, None, 3)])


def _tiny_swin() -> nn.Module:
    return SwinTransformer(
        patch_size=[4, 4], embed_dim=8, depths=[2, 2], num_heads=[1, 2], window_size=[2, 2]
    )


class Widening(nn.Linear):
    """A ``torch.nn`` subclass with its own forward: not torch's code."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([super().forward(x), x], dim=-1)


class RandomCrop(nn.Module):
    """A module whose output shape is decided by something outside itself (Python's
    random numbers): alike instances, alike inputs, other shapes. Traced as a leaf."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[..., : random.randint(1, x.shape[-1])]


LEAVES = {"leaf_modules": [RandomCrop]}


class Tricky(nn.Module):
    """Alike modules and ops whose results differ in ways a shortcut could miss."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.plain = nn.Linear(8, 8)
        self.widening = Widening(8, 8)
        self.hooked = nn.Linear(16, 16)
        self.again = nn.Linear(16, 16)
        self.hooked.register_forward_hook(lambda module, args, out: out.repeat(1, 1, 1, 2))
        self.flat_one = nn.Flatten(1)
        self.flat_two = nn.Flatten(2)
        self.crops = nn.Sequential(*(RandomCrop() for _ in range(4)))

    def forward(self, x: torch.Tensor) -> Any:
        x = self.stem(x).permute(0, 2, 3, 1)  # [N, H, W, 8]
        a = self.plain(x)
        b = self.widening(x)  # [N, H, W, 16] where a plain Linear gives 8
        c = self.hooked(b)  # [N, H, W, 32] by its hook
        d = self.again(b)  # [N, H, W, 16]: the same module class and shapes, no hook
        e = a.clone()
        e.unsqueeze_(0)  # in place, changes e's shape
        f = a.clone()
        f.unsqueeze_(0)
        g, h = torch.empty(0), torch.empty(0)  # constants of the graph
        torch.add(a, a, out=g)  # resized to a's shape
        torch.add(a, a, out=h)
        one = a.new_ones(())
        flat = [e.flatten(1), f.flatten(1), g * one, h * one]
        crops = [crop(d) for crop in self.crops]
        return c, self.flat_one(d), self.flat_two(d), flat, crops


MODELS = {
    "resnet18": lambda: torchvision.models.resnet18(),
    "vit": _tiny_vit,
    "convnext": _tiny_convnext,
    "swin": _tiny_swin,
    "tricky": Tricky,
}


def _reference_shapes(model: nn.Module, traced: Any, size: int) -> dict[str, tuple[int, ...]]:
    graph_module = torch.fx.GraphModule(with_constants(model, traced), traced.graph)
    random.seed(0)
    with torch.no_grad():
        ShapeProp(graph_module.eval()).propagate(torch.randn(2, 3, size, size))
    found = {}
    for node in graph_module.graph.nodes:
        meta = node.meta.pop("tensor_meta", None)
        if meta is not None and hasattr(meta, "shape"):
            found[traced.names.get(node, node.name)] = tuple(meta.shape)
    return found


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("on_meta", [False, True], ids=["real", "meta"])
def test_meta_shapes_equal_a_real_run(name: str, on_meta: bool) -> None:
    torch.manual_seed(0)
    if on_meta:
        with torch.device("meta"):
            model = MODELS[name]().eval()
        real = MODELS[name]().eval()
    else:
        model = real = MODELS[name]().eval()
    size = 32
    traced = trace(model, train=False, context=name, extra_tracer_kwargs=LEAVES)
    random.seed(0)
    ours = shapes_of(model, traced, (3, size, size), context=name)
    found = {traced.names.get(node, node.name): shape for node, shape in ours.items()}
    reference = trace(real, train=False, context=name, extra_tracer_kwargs=LEAVES)
    expected = _reference_shapes(real, reference, size)
    assert found == expected


# -- one trace per build, for the mode in use ---------------------------------------------


@pytest.fixture
def traces(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The mode of every FX trace unifeat makes (the real tracer runs; it is counted)."""
    made: list[str] = []
    original = graph_module._FastNodePathTracer.trace

    def counted(self: Any, root: nn.Module, concrete_args: Any = None) -> Any:
        # Read off the instance: an attribute read would count as the traced code's.
        made.append("train" if vars(root)["training"] else "eval")
        return original(self, root, concrete_args)

    monkeypatch.setattr(graph_module._FastNodePathTracer, "trace", counted)
    return made


def _levels_in_train_mode(source: nn.Module, x: torch.Tensor) -> tuple[list[Any], list[Any]]:
    """unifeat's levels and torchvision's extractor's, both in train mode, from the same
    random numbers (dropout)."""
    model = unifeat.create_model(source, features_only=True).train()
    nodes = model.feature_info.get("node")
    reference = create_feature_extractor(source, nodes).train()
    torch.manual_seed(1)
    ours = model.forward_intermediates(x, intermediates_only=True, output_fmt="NCHW")
    torch.manual_seed(1)
    theirs = list(reference(x).values())
    return ours, theirs


def _as_maps(theirs: list[torch.Tensor], ours: list[torch.Tensor]) -> list[torch.Tensor]:
    maps = []
    for ref, mine in zip(theirs, ours, strict=True):
        if ref.dim() == 3:  # ViT tokens: the class token dropped, laid out NCHW
            ref = ref[:, 1:].transpose(1, 2).reshape(mine.shape)
        elif ref.shape != mine.shape:  # Swin's NHWC stages
            ref = ref.permute(0, 3, 1, 2)
        maps.append(ref)
    return maps


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_a_build_traces_once_in_either_mode(traces: list[str], training: bool) -> None:
    """Code that reads no training flag traces to one graph in both modes: a build from a
    model in training mode traces once, and switching modes traces nothing. Its dropout
    layers still drop in training, exactly as torchvision's train graph does."""
    torch.manual_seed(0)
    source = VisionTransformer(
        image_size=32,
        patch_size=8,
        num_layers=2,
        num_heads=2,
        hidden_dim=16,
        mlp_dim=32,
        dropout=0.5,
        attention_dropout=0.5,
    ).train(training)
    model = unifeat.create_model(source, features_only=True)
    assert model.training == training
    model.train().eval().train()
    assert traces == ["eval"]
    traces.clear()
    ours, theirs = _levels_in_train_mode(source, torch.randn(2, 3, 32, 32))
    for mine, ref in zip(ours, _as_maps(theirs, ours), strict=True):
        torch.testing.assert_close(mine, ref, rtol=0, atol=0)
    assert source.training == training  # the caller's module keeps its mode


class DropsInCode(nn.Module):
    """Its graphs differ in an argument only: same node names in both modes."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.body = nn.Conv2d(4, 8, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.dropout(self.stem(x), 0.5, self.training)
        return self.body(x).mean((2, 3))


class ReadsALeafsFlag(DropsInCode):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        if self.body.training:
            x = x * 2
        return self.body(x).mean((2, 3))


class Wrapped(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


class HookReadsTheFlag(DropsInCode):
    """A hook of a module FX traces into runs while tracing (a leaf's runs with the graph)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = Wrapped(self.body)
        self.body.register_forward_pre_hook(
            lambda module, args: (args[0] * 2,) if module.training else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.stem(x)).mean((2, 3))


class OwnTrain(DropsInCode):
    """A mode of its own besides the flags: its forward reads no flag, but train()
    changes what it computes."""

    scale = 1.0

    def train(self, mode: bool = True) -> OwnTrain:
        super().train(mode)
        self.scale = 2.0 if mode else 1.0
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.stem(x) * self.scale).mean((2, 3))


def _tiny_swin_with_dropout() -> nn.Module:
    return SwinTransformer(
        patch_size=[4, 4],
        embed_dim=12,
        depths=[2, 2],
        num_heads=[1, 2],
        window_size=[2, 2],
        dropout=0.5,
        attention_dropout=0.5,
    )


@pytest.mark.parametrize(
    "make",
    [DropsInCode, ReadsALeafsFlag, HookReadsTheFlag, OwnTrain, _tiny_swin_with_dropout],
    ids=["dropout-argument", "leaf-flag", "hook", "own-train", "swin"],
)
def test_the_train_graph_is_traced_where_the_code_reads_the_mode(
    traces: list[str], make: Any
) -> None:
    """Wherever the traced code reads a training flag (its own, a leaf's, in a hook) or
    a class has a mode of its own, the train graph is traced on the first .train() and
    runs in training where it is another program, even where only an argument differs
    (torchvision's Swin passes training=self.training to its attention): the levels are
    torchvision's train graph's."""
    torch.manual_seed(0)
    source = make().eval()
    x = torch.randn(2, 3, 32, 32)
    model = unifeat.create_model(source, features_only=True)
    assert traces == ["eval"]
    model.train()
    assert traces == ["eval", "train"]
    ours, theirs = _levels_in_train_mode(source, x)
    for mine, ref in zip(ours, _as_maps(theirs, ours), strict=True):
        torch.testing.assert_close(mine, ref, rtol=0, atol=0)
    assert not source.training


def test_the_mode_watch_leaves_nn_module_as_it_was() -> None:
    """The watch's descriptor exists only while a trace runs, also where it fails."""

    class Untraceable(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x[: int(x.sum())]  # data-dependent

    with pytest.raises(unifeat.TracingError):
        unifeat.create_model(Untraceable(), features_only=True, feature_cls="fx")
    unifeat.create_model(DropsInCode(), features_only=True)
    assert "training" not in vars(nn.Module)
    module = nn.Linear(2, 2)
    assert module.training and "training" in vars(module)


class MakesAConstant(nn.Module):
    """Its forward makes a tensor: FX lifts it into a constant of the graph."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, 2, 1)
        self.stage = nn.Conv2d(8, 16, 3, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stage(self.stem(x) + torch.linspace(0.0, 1.0, 8).view(8, 1, 1))


def test_a_module_whose_trace_lifts_constants_is_traced_once(traces: list[str]) -> None:
    """The constants lifted from a module passed in are real tensors: the feature model's
    own copy gets them, where it was traced a second time for them."""
    source = MakesAConstant().eval()
    model = unifeat.create_model(source, features_only=True)
    assert traces == ["eval"]
    assert not any(name.startswith("_tensor_constant") for name in vars(source))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = source.stage(source.stem(x) + torch.linspace(0.0, 1.0, 8).view(8, 1, 1))
        torch.testing.assert_close(model(x)[-1], expected, rtol=0, atol=0)
