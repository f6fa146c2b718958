"""torchvision's feature-extraction tests (``test/test_backbone_utils.py`` of
pytorch/vision: ``TestFxFeatureExtraction``), ported to run against unifeat as a
black box on every backend they apply to.

torchvision builds its extractors with ``create_feature_extractor`` and names
nodes with ``get_graph_node_names``; here the nodes come from
``unifeat.get_node_names`` and go to ``create_model(..., return_nodes=...)``, and
torchvision's own extractor (or, for transformers models, which do not trace,
forward hooks on the source's modules) is the reference. unifeat takes one
``return_nodes`` for both modes (train-only nodes work in train mode) where
torchvision takes ``train_return_nodes`` / ``eval_return_nodes``.
"""

from __future__ import annotations

import copy
import pickle
import random
from collections.abc import Mapping, Sequence
from typing import Any

import pytest
import torch
import torchvision
from torch import Tensor, nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

import unifeat
from tests.peers._models import (
    CASES,
    SLOW_CASES,
    Case,
    capture,
    grad_numel,
    params,
    run_source,
    tv_small_vit,
)

# Node names whose values are not tensors, or that torchvision leaves out of its
# samples because backward through them fails; the same filter as its test.
_NON_TENSOR_NAMES = ("getitem", "floordiv", "size", "chunk", "_assert", "eq", "dim", "getattr")


HF_IDS = [c.id for c in [*CASES, *SLOW_CASES] if c.backend == "hf"]


# -- helpers -------------------------------------------------------------------------------


def _sample(names: Sequence[str], k: int = 10, seed: int = 0) -> list[str]:
    """torchvision's ``_get_return_nodes``: ``k`` random tensor nodes (all if fewer)."""
    tensors = [n for n in names if n != "x" and not any(bad in n for bad in _NON_TENSOR_NAMES)]
    return random.Random(seed).sample(tensors, min(k, len(tensors)))


def _assert_same(got: Any, expected: Any) -> None:
    """Nested equality of node values as they are (tensors, tuples, dicts, None)."""
    if isinstance(expected, Tensor):
        assert isinstance(got, Tensor)
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    elif isinstance(expected, Mapping):
        assert list(got) == list(expected)
        for key in expected:
            _assert_same(got[key], expected[key])
    elif isinstance(expected, (tuple, list)):
        assert len(got) == len(expected)
        for a, b in zip(got, expected, strict=True):
            _assert_same(a, b)
    else:
        assert got == expected


def _detached(value: Any) -> Any:
    """A node's value without its graph: a tensor, or a tuple of them (ViT's attention)."""
    if isinstance(value, tuple):
        return tuple(_detached(v) for v in value)
    return value.detach() if isinstance(value, Tensor) else value


def _aggregate(outputs: Mapping[str, Any]) -> Tensor:
    """torchvision's ``test_forward_backward`` sum of means over every output."""
    total: Any = 0
    for value in outputs.values():
        if isinstance(value, Sequence):
            total += sum(v.mean() for v in value if isinstance(v, Tensor))
        elif isinstance(value, Mapping):
            total += sum(v.mean() for v in value.values() if isinstance(v, Tensor))
        elif isinstance(value, Tensor):  # nodes may hold ints (Swin's shift sizes)
            total += value.mean()
    return total


def _reference(case: Case, source: nn.Module, nodes: Sequence[str], x: Tensor) -> dict[str, Any]:
    """The nodes' values by the peer's own means: torchvision's extractor, or hooks
    on the modules of a transformers model."""
    if case.traceable:
        extractor = create_feature_extractor(
            source, list(nodes), tracer_kwargs=_tracer_kwargs(case), suppress_diff_warning=True
        )
        return extractor(x)
    with capture(source, nodes) as seen:
        run_source(source, x)
    return {node: seen[node] for node in nodes}


def _as_nchw(value: Tensor, shape: Sequence[int]) -> Tensor:
    """A node's raw map in the levels' NCHW layout (Swin stages are NHWC inside)."""
    if value.shape != shape and value.dim() == 4:
        return value.permute(0, 3, 1, 2)
    return value


def _tracer_kwargs(case: Case) -> dict[str, Any] | None:
    """timm models trace with timm's do-not-trace modules and functions as leaves, as
    timm's own FX tests (and unifeat) trace them."""
    if case.backend != "timm":
        return None
    from timm.models import get_notrace_functions, get_notrace_modules

    return dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions())


def _hf_nodes_run_once(source: nn.Module, names: Sequence[str], x: Tensor) -> list[str]:
    """Module paths whose module runs exactly once in a forward (a hook reads it well)."""
    calls: dict[str, int] = {}
    handles = []
    for name in names:
        module = source.get_submodule(name)

        def hook(*_: Any, name: str = name) -> None:
            calls[name] = calls.get(name, 0) + 1

        handles.append(module.register_forward_hook(hook))
    with torch.no_grad():
        run_source(source, x)
    for handle in handles:
        handle.remove()
    return [n for n in names if calls.get(n) == 1]


# -- test_node_name_conventions -----------------------------------------------------------


class _Sub(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        x = x + 1
        x = x + 1
        x = self.relu(x)
        return self.relu(x)


class _Top(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.submodule = _Sub()
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        x = self.submodule(x)
        x = x + 1
        x = x + 1
        x = self.relu(x)
        return self.relu(x)


_GOLDEN = [
    "x",
    "submodule.add",
    "submodule.add_1",
    "submodule.relu",
    "submodule.relu_1",
    "add",
    "add_1",
    "relu",
    "relu_1",
]


def test_node_name_conventions() -> None:
    """Ports ``test_node_name_conventions``: module path, then the operation, with
    ``_N`` suffixes counting repeats within a parent scope, in both modes (torchvision
    compares the train names with ``zip``, which would pass on a prefix; here the
    lists are equal)."""
    train_nodes, eval_nodes = unifeat.get_node_names(_Top())
    assert train_nodes == _GOLDEN
    assert eval_nodes == _GOLDEN


@pytest.mark.parametrize(
    "case",
    params(
        where=lambda case: case.backend != "hf",
    ),
)
def test_node_names_equal_torchvisions(case: Case) -> None:
    """The node names of ``test_node_name_conventions`` on real models: exactly
    ``get_graph_node_names``'s, with timm's do-not-trace modules and functions as
    leaves for timm models (as timm's own FX tests trace them)."""
    source = case.source()
    expected = get_graph_node_names(
        source, tracer_kwargs=_tracer_kwargs(case), suppress_diff_warning=True
    )
    assert unifeat.get_node_names(source) == tuple(expected)
    if not callable(case.model):  # by name: built on the meta device, same names
        assert unifeat.get_node_names(case.model, **case.kwargs) == tuple(expected)


@pytest.mark.parametrize(
    "case",
    params(
        where=lambda case: case.backend == "hf",
    ),
)
def test_node_names_of_untraceable_models_are_module_paths(case: Case) -> None:
    """``test_node_name_conventions`` where FX cannot trace (every transformers model):
    the names are the source's module paths, the levels' modules among them, the
    same in both modes."""
    source = case.source()
    train_nodes, eval_nodes = unifeat.get_node_names(source)
    paths = [name for name, _ in source.named_modules() if name]
    assert train_nodes == eval_nodes
    assert set(eval_nodes) <= set(paths)
    assert set(case.info().module_name(list(range(len(case.info()))))) <= set(eval_nodes)


# -- test_build_fx_feature_extractor -------------------------------------------------------


@pytest.mark.parametrize(
    "case",
    params(),
)
def test_build_feature_extractor(case: Case) -> None:
    """Ports ``test_build_fx_feature_extractor``: ten random nodes as a ``{v: v}`` dict
    and as a list both build, and (beyond torchvision's test) give exactly the
    values torchvision's extractor gives for them, in depth order; a dict's values
    become the output keys."""
    source = case.source().eval()
    x = case.input(batch=1)
    _, eval_nodes = unifeat.get_node_names(source)
    if not case.traceable:
        eval_nodes = _hf_nodes_run_once(source, eval_nodes, x)
    nodes = _sample(eval_nodes)
    in_depth_order = [n for n in eval_nodes if n in nodes]
    with torch.no_grad():
        expected = _reference(case, source, nodes, x)
        keyed = case.build(source, return_nodes={v: v for v in nodes}).eval()(x)
        listed = case.build(source, return_nodes=nodes).eval()(x)
        renamed = case.build(source, return_nodes={v: f"key{i}" for i, v in enumerate(nodes)})
        renamed = renamed.eval()(x)
    assert list(keyed) == in_depth_order
    assert list(listed) == in_depth_order
    assert list(renamed) == [f"key{nodes.index(n)}" for n in in_depth_order]
    for node in nodes:
        _assert_same(keyed[node], expected[node])
        _assert_same(listed[node], expected[node])
        _assert_same(renamed[f"key{nodes.index(node)}"], expected[node])


@pytest.mark.parametrize(
    "case",
    params(
        where=lambda case: case.traceable,
    ),
)
def test_build_feature_extractor_failure_cases(case: Case) -> None:
    """Ports the failure checks of ``test_build_fx_feature_extractor``.

    - no return nodes: torchvision asserts an error; unifeat returns the automatic
      levels (docs/backends/torchvision.md#levels-without-reading-the-models-code);
    - ``train_return_nodes`` / ``eval_return_nodes`` (alone, or with
      ``return_nodes``): torchvision's split options, which unifeat does not have
      (one ``return_nodes`` serves both modes: docs/node-names.md), so they are
      refused with a unifeat error rather than silently ignored;
    - an unknown node ``"l"``: ``ValueError`` in both (unifeat's
      ``InvalidNodeError`` is one).
    """
    source = case.source().eval()
    train_nodes, eval_nodes = unifeat.get_node_names(source)
    automatic = case.build(source).eval()
    assert automatic.feature_info.out_indices == case.info().out_indices
    some = _sample(train_nodes, 2)
    with pytest.raises(unifeat.UnifeatError):
        case.build(source, return_nodes=some, train_return_nodes=some)
    with pytest.raises(unifeat.UnifeatError):
        case.build(source, train_return_nodes=some)
    with pytest.raises(unifeat.UnifeatError):
        case.build(source, train_return_nodes=some, eval_return_nodes=some)
    assert not any(n == "l" or n.startswith("l.") for n in [*train_nodes, *eval_nodes])
    with pytest.raises(ValueError) as error:
        case.build(source, return_nodes=["l"])
    assert isinstance(error.value, unifeat.InvalidNodeError)


# -- test_forward_backward -------------------------------------------------------------------


@pytest.mark.parametrize(
    "case",
    params(),
)
def test_forward_backward(case: Case) -> None:
    """Ports ``test_forward_backward``: a model in train mode, ten random train-graph
    nodes, a forward and a backward through the sum of their means; here also the
    values equal torchvision's extractor's in train mode (same seed for dropout)."""
    source = case.source().train()
    x = case.input()
    train_nodes, eval_nodes = unifeat.get_node_names(source)
    if not case.traceable:
        train_nodes = _hf_nodes_run_once(source, train_nodes, x)
    nodes = _sample(train_nodes)
    model = case.build(source, return_nodes=nodes).train()
    torch.manual_seed(1)
    outputs = model(x)
    _aggregate(outputs).backward()
    assert grad_numel(model.parameters()) > 0
    if case.traceable:
        # torchvision takes train-only nodes (Swin's drop_path mul) only in
        # train_return_nodes; unifeat's one list serves both modes.
        reference = create_feature_extractor(
            copy.deepcopy(source),
            train_return_nodes=nodes,
            eval_return_nodes=[n for n in nodes if n in eval_nodes] or eval_nodes[-1:],
            tracer_kwargs=_tracer_kwargs(case),
            suppress_diff_warning=True,
        ).train()
        torch.manual_seed(1)
        with torch.no_grad():
            expected = reference(x)
        for node in nodes:
            _assert_same(_detached(outputs[node]), expected[node])


# -- test_feature_extraction_methods_equivalence -----------------------------------------------

_LAYERS = {"layer1": "layer1", "layer2": "layer2", "layer3": "layer3", "layer4": "layer4"}


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: torchvision.models.resnet18(num_classes=1), id="tv-resnet18"),
        pytest.param(lambda: _timm("test_resnet"), id="timm-resnet"),
    ],
)
def test_feature_extraction_methods_equivalence(make: Any) -> None:
    """Ports ``test_feature_extraction_methods_equivalence``: torchvision's
    ``IntermediateLayerGetter`` and the FX extractor have the same parameters and
    give the same outputs. torchvision compares ``named_parameters()`` names, and so
    does this port (one name scheme: docs/training.md#one-name-scheme), then the
    ``state_dict`` keys and values. The same holds for levels picked with
    ``out_indices``, keyed by module name."""
    model = make().eval()
    getter = IntermediateLayerGetter(model, _LAYERS).eval()
    by_nodes = unifeat.create_model(model, features_only=True, return_nodes=_LAYERS).eval()
    by_levels = unifeat.create_model(
        model, features_only=True, out_indices=(1, 2, 3, 4), output_type="dict"
    ).eval()
    x = torch.rand(1, 3, 64, 64)
    for ours in (by_nodes, by_levels):
        assert [n for n, _ in ours.named_parameters()] == [n for n, _ in getter.named_parameters()]
        assert list(ours.state_dict()) == list(getter.state_dict())
        for (k1, v1), (k2, v2) in zip(
            getter.state_dict().items(), ours.state_dict().items(), strict=True
        ):
            assert k1 == k2 and torch.equal(v1, v2)
        with torch.no_grad():
            expected, got = getter(x), ours(x)
        assert list(got) == list(expected)
        for key in expected:
            assert torch.equal(got[key], expected[key])


def _timm(name: str) -> nn.Module:
    import timm

    return timm.create_model(name)


# -- test_jit_forward_backward -------------------------------------------------------------------


@pytest.mark.parametrize(
    "case",
    params(
        where=lambda case: case.traceable,
    ),
)
def test_scripting_is_refused(case: Case) -> None:
    """Ports ``test_jit_forward_backward``, which scripts the extractor and runs a
    forward and a backward. unifeat deliberately refuses ``torch.jit.script`` with
    an ``UnsupportedOptionError`` pointing to ``torch.compile`` / ``torch.export``
    (the decided contract of issue 12; a difference from torchvision). The
    extractor returns the output node, not ten random ones, so that the test is
    about scripting (random samples would meet other bugs first)."""
    train_nodes, _ = unifeat.get_node_names(case.source().train())
    model = case.build(return_nodes=[train_nodes[-1]]).train()
    with pytest.raises(unifeat.UnsupportedOptionError, match=r"torch\.(compile|export)"):
        torch.jit.script(model)


# -- test_train_eval -----------------------------------------------------------------------------


class _ModeModel(nn.Module):
    """torchvision's ``test_train_eval`` model: dropout, and control flow on the mode."""

    def __init__(self) -> None:
        super().__init__()
        self.dropout = nn.Dropout(p=1.0)

    def forward(self, x: Tensor) -> Tensor:
        x = x.mean()
        x = self.dropout(x)
        if self.training:
            x += 100  # add: a train-only node
        else:
            x *= 0  # mul: an eval-only node
        x -= 0  # sub
        return x


def _check_mode(model: nn.Module, mode: str) -> None:
    with torch.no_grad():
        out = model(torch.ones(10, 10))
    if mode == "train":
        assert out["dropout"].item() == 0  # dropout is respected
        assert out["sub"].item() == 100  # control flow on the mode is respected
    else:
        assert out["dropout"].item() == 1
        assert out["sub"].item() == 0


@pytest.mark.parametrize(
    "start",
    ["train", "eval"],
)
def test_train_eval(start: str) -> None:
    """Ports ``test_train_eval``: an extractor starts in its source's mode, leaves the
    source's mode alone, and follows ``.train()`` / ``.eval()`` both in its modules
    (dropout) and in mode-dependent control flow, whichever mode it was built in."""
    source = _ModeModel().train(start == "train")
    model = unifeat.create_model(source, features_only=True, return_nodes=["dropout", "sub"])
    assert source.training == (start == "train")
    assert model.training == (start == "train")
    _check_mode(model, start)
    other = "eval" if start == "train" else "train"
    model.train(other == "train")
    _check_mode(model, other)
    assert source.training == (start == "train")


def test_train_only_node_works_in_train_mode() -> None:
    """``test_train_eval``'s ``train_return_nodes=["dropout", "add", "sub"]``: unifeat
    takes one ``return_nodes``, and a node that exists only in the train graph
    works in train mode (torchvision needs it in ``train_return_nodes``)."""
    train_nodes, eval_nodes = unifeat.get_node_names(_ModeModel())
    assert "add" in train_nodes and "add" not in eval_nodes
    model = unifeat.create_model(
        _ModeModel().train(), features_only=True, return_nodes=["dropout", "add", "sub"]
    )
    with torch.no_grad():
        out = model(torch.ones(10, 10))
    assert list(out) == ["dropout", "add", "sub"]
    assert out["add"].item() == 100 and out["sub"].item() == 100


def test_eval_only_node_in_train_mode_is_a_unifeat_error() -> None:
    """``test_train_eval``'s ``eval_return_nodes=["dropout", "mul", "sub"]``: the
    eval-only node works in eval mode; in train mode, where the node does not
    exist, unifeat says so with its own error (torchvision would use the other list)."""
    model = unifeat.create_model(
        _ModeModel().eval(), features_only=True, return_nodes=["dropout", "mul", "sub"]
    )
    with torch.no_grad():
        out = model(torch.ones(10, 10))
    assert out["mul"].item() == 0 and out["sub"].item() == 0
    with pytest.raises(unifeat.UnifeatError, match="mul"):
        model.train()(torch.ones(10, 10))


@pytest.mark.parametrize(
    "case",
    params(
        where=lambda case: case.backend in ("torchvision", "fx") and not case.tokens,
    ),
)
def test_train_after_eval_build_equals_torchvisions_extractor(case: Case) -> None:
    """``test_train_eval``'s "starting from eval mode" half on real BatchNorm nets: a
    feature model built from an eval-mode model and then put in train mode gives
    what torchvision's extractor gives in train mode (batch statistics)."""
    source = case.source().eval()
    model = unifeat.create_model(source, features_only=True, out_indices=len(case.info()))
    assert not model.training
    model.train()
    nodes = model.feature_info.get("node")
    reference = create_feature_extractor(
        copy.deepcopy(source), {n: str(i) for i, n in enumerate(nodes)}
    ).train()
    x = case.input()
    with torch.no_grad():
        torch.manual_seed(1)
        expected = list(reference(x).values())
        torch.manual_seed(1)
        got = model.forward_intermediates(x, intermediates_only=True)
    for ours, theirs in zip(got, expected, strict=True):
        torch.testing.assert_close(ours, _as_nchw(theirs, ours.shape))


@pytest.mark.parametrize(
    "case",
    params(
        # SqueezeNet has no norm layers to freeze.
        where=lambda case: case.id != "tv-squeezenet",
    ),
)
def test_source_modes_and_state_are_untouched(case: Case) -> None:
    """``test_train_eval``'s "the models stay in their original training state", for
    every submodule: a model in train mode with frozen (eval-mode, no-grad) norm
    layers passed to ``get_node_names`` and ``create_model`` keeps every module's
    mode, every ``requires_grad``, every parameter and buffer, and its hooks."""
    source = case.source().train()
    for module in source.modules():
        if isinstance(module, (nn.BatchNorm2d, nn.LayerNorm)) or "Norm" in type(module).__name__:
            module.eval()
            for p in module.parameters(recurse=False):
                p.requires_grad_(False)
    modes = {n: m.training for n, m in source.named_modules()}
    grads = {n: p.requires_grad for n, p in source.named_parameters()}
    state = {k: v.clone() for k, v in source.state_dict().items()}
    hooks = {
        n: (len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in source.named_modules()
    }
    if case.traceable:
        unifeat.get_node_names(source)
    model = case.build(source)
    # Building changes nothing; a module passed in then shares its parameters and
    # buffers with the feature model (docs/api.md), so training forwards of the
    # feature model (which .train() puts wholly in train mode) update its statistics.
    assert all(torch.equal(state[k], v) for k, v in source.state_dict().items())
    model.train()(case.input())
    model.eval()(case.input())
    assert {n: m.training for n, m in source.named_modules()} == modes
    assert {n: p.requires_grad for n, p in source.named_parameters()} == grads
    if not callable(case.model):
        assert all(torch.equal(state[k], v) for k, v in source.state_dict().items())
    assert {
        n: (len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in source.named_modules()
    } == hooks


# -- test_leaf_module_and_function -----------------------------------------------------------------


# Public name: FX auto-wraps only functions whose global name has no leading underscore.
def leaf_function(x: Any) -> int:
    return int(x)


class _LeafModule(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        int(x.shape[0])  # a TypeError when traced through, not as a leaf
        return nn.functional.relu(x + 4)


class _WithLeaf(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 1, 3)
        self.leaf_module = _LeafModule()

    def forward(self, x: Tensor) -> Tensor:
        leaf_function(x.shape[0])
        return self.leaf_module(self.conv(x))


def test_leaf_module_and_function() -> None:
    """Ports ``test_leaf_module_and_function``: a module and a function FX cannot trace
    through, made a leaf module and an auto-wrapped function, give one node each
    (no ``relu`` inside the leaf), and the extractor runs forward and backward in
    train mode. unifeat's ``TracingError`` points to ``tracer_kwargs`` for this."""
    tracer_kwargs = {"leaf_modules": [_LeafModule], "autowrap_functions": [leaf_function]}
    _, eval_nodes = unifeat.get_node_names(_WithLeaf(), tracer_kwargs=tracer_kwargs)
    assert "relu" not in eval_nodes and "leaf_module" in eval_nodes
    model = unifeat.create_model(
        _WithLeaf(), features_only=True, return_nodes=["leaf_module"], tracer_kwargs=tracer_kwargs
    ).train()
    out = model(torch.rand(1, 3, 32, 32))
    out["leaf_module"].mean().backward()
    assert grad_numel(model.parameters()) == sum(p.numel() for p in model.parameters())


def test_untraceable_module_falls_back_to_module_paths() -> None:
    """The other half of ``test_leaf_module_and_function``: without the leaf
    declarations the module does not trace. Where torchvision stops, unifeat serves
    module paths by forward hooks (docs/node-names.md): ``leaf_module`` is one, and
    its output is what the module computes."""
    source = _WithLeaf().eval()
    train_nodes, eval_nodes = unifeat.get_node_names(source)
    assert train_nodes == eval_nodes and "leaf_module" in eval_nodes and "conv" in eval_nodes
    model = unifeat.create_model(source, features_only=True, return_nodes=["leaf_module"]).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x)["leaf_module"], source.leaf_module(source.conv(x)))
    with pytest.raises(unifeat.InvalidNodeError, match="relu"):
        unifeat.create_model(source, features_only=True, return_nodes=["relu"])


def test_library_leaf_modules_are_leaves() -> None:
    """torchvision's tracer keeps its ops' modules as leaves (``_get_leaf_modules_for_ops``)
    and timm registers its do-not-trace modules: their insides never become nodes,
    and a model using them traces and builds."""
    from torchvision.ops import StochasticDepth

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, 2, 1)
            self.drop = StochasticDepth(0.5, "row")

        def forward(self, x: Tensor) -> Tensor:
            return self.drop(self.conv(x))

    train_nodes, eval_nodes = unifeat.get_node_names(Net())
    assert train_nodes == eval_nodes == ["x", "conv", "drop"]
    model = unifeat.create_model(Net(), features_only=True, return_nodes=["drop"]).eval()
    assert model(torch.rand(1, 3, 16, 16))["drop"].shape == (1, 8, 8, 8)


# -- return_nodes forms and values ----------------------------------------------------------------


@pytest.mark.parametrize(
    "case",
    params(
        where=lambda case: case.backend in ("torchvision", "timm"),
    ),
)
def test_truncated_node_names(case: Case) -> None:
    """torchvision's ``return_nodes`` take truncated names: ``"layer4"`` (a module) is
    the last node inside it. unifeat does the same (matching at a ``.`` boundary,
    not as a regular expression: docs/backends/torchvision.md)."""
    source = case.source().eval()
    _, eval_nodes = unifeat.get_node_names(source)
    module = case.info().module_name(-1)
    inside = [n for n in eval_nodes if n == module or n.startswith(module + ".")]
    x = case.input(batch=1)
    with torch.no_grad():
        by_prefix = case.build(source, return_nodes={module: "out"}).eval()(x)
        by_full = case.build(source, return_nodes={inside[-1]: "out"}).eval()(x)
    assert torch.equal(by_prefix["out"], by_full["out"])


def test_non_tensor_node_is_returned_as_is() -> None:
    """``create_feature_extractor`` returns any node's value, tensor or not (ViT's
    ``self_attention`` gives a tuple); so does unifeat."""
    source = tv_small_vit().eval()
    node = "encoder.layers.encoder_layer_0.self_attention"
    x = torch.rand(1, 3, 224, 224)
    with torch.no_grad():
        expected = create_feature_extractor(source, [node])(x)
        got = unifeat.create_model(source, features_only=True, return_nodes=[node]).eval()(x)
    assert isinstance(expected[node], tuple)
    _assert_same(got[node], expected[node])


def test_googlenet_aux_nodes_in_train_mode() -> None:
    """``test_build_fx_feature_extractor`` / ``test_forward_backward`` over GoogLeNet,
    whose train graph has auxiliary heads: train-only nodes work in train mode and
    equal torchvision's extractor's values."""
    source = torchvision.models.googlenet(num_classes=1, aux_logits=True, init_weights=False)
    source.train()
    train_nodes, eval_nodes = unifeat.get_node_names(source)
    aux = [n for n in train_nodes if n.startswith("aux1") and n not in eval_nodes]
    assert aux
    nodes = [aux[-1], "inception5b"]
    model = unifeat.create_model(source, features_only=True, return_nodes=nodes).train()
    # torchvision needs the train-only node in train_return_nodes (one list would
    # fail on its eval graph); unifeat takes one list for both modes.
    reference = create_feature_extractor(
        copy.deepcopy(source), train_return_nodes=nodes, eval_return_nodes=["inception5b"]
    ).train()
    x = torch.rand(2, 3, 96, 96)
    torch.manual_seed(1)
    got = model(x)
    torch.manual_seed(1)
    expected = reference(x)
    for node in nodes:
        _assert_same(got[node].detach(), expected[node].detach())
    _aggregate(got).backward()


@pytest.mark.parametrize("by_name", [False, True], ids=["instance", "by-name"])
def test_inception_v3_train_return_nodes(by_name: bool) -> None:
    """``test_build_fx_feature_extractor`` / ``test_forward_backward`` over Inception v3,
    whose train graph has the auxiliary classifier: torchvision takes its nodes in
    ``train_return_nodes``; unifeat takes them in its one ``return_nodes`` and serves
    them in train mode, measured at the 299-pixel input Inception is made for (its
    auxiliary head's 5x5 conv does not fit the map of a 224 input), on a batch of
    two (one sample cannot train a BatchNorm after the auxiliary head's pool)."""
    torch.manual_seed(0)
    source = torchvision.models.inception_v3(num_classes=3, aux_logits=True, init_weights=False)
    source.train()
    train_nodes, eval_nodes = unifeat.get_node_names(source)
    aux = [n for n in train_nodes if n.startswith("AuxLogits") and n not in eval_nodes]
    nodes = [aux[-1], "Mixed_7c"]
    if by_name:
        model = unifeat.create_model(
            "tv:inception_v3",
            features_only=True,
            return_nodes=nodes,
            num_classes=3,
            aux_logits=True,
            init_weights=False,
        )
        model.load_state_dict(source.state_dict())
    else:
        model = unifeat.create_model(source, features_only=True, return_nodes=nodes)
    model.train()
    assert model.feature_info.channels() == [3, 2048]
    assert model.input_size == (3, 299, 299)
    reference = create_feature_extractor(
        copy.deepcopy(source), train_return_nodes=nodes, eval_return_nodes=["Mixed_7c"]
    ).train()
    x = torch.rand(2, 3, 299, 299)
    torch.manual_seed(1)
    got = model(x)
    torch.manual_seed(1)
    expected = reference(x)
    for node in nodes:
        _assert_same(got[node].detach(), expected[node].detach())
    _aggregate(got).backward()


# -- deepcopy and pickle (torchvision issue #8634's regression test; pytorch#82598) ---------------


@pytest.mark.parametrize(
    "case",
    params(),
)
def test_deepcopy_and_pickle_after_mode_switches(case: Case) -> None:
    """torchvision's deepcopy regression test (its extractor lost its eval graph in
    ``copy.deepcopy``): ``eval()``, ``train()``, a deepcopy, then ``eval()`` and
    ``train()`` again work, and the copy, like a pickled one, equals the original in
    both modes, with as many parameters (pytorch#82598: copies had twice as many)."""
    source = case.source().eval()
    model = case.build(source, out_indices=(0, -1))
    model.eval()
    model.train()
    x = case.input()
    for copier in (copy.deepcopy, lambda m: pickle.loads(pickle.dumps(m))):
        clone = copier(model)
        assert clone.training
        assert len(list(clone.parameters())) == len(list(model.parameters()))
        assert list(clone.state_dict()) == list(model.state_dict())
        for mode in (False, True):
            model.train(mode)
            clone.train(mode)
            assert [m.training for m in clone.modules()] == [m.training for m in model.modules()]
            # Train-mode forwards update BatchNorm statistics: both the same way.
            torch.manual_seed(1)
            with torch.no_grad():
                expected = model(x)
            torch.manual_seed(1)
            with torch.no_grad():
                got = clone(x)
            _assert_same(got, expected)
