"""Category (f): modes, and a module passed in left exactly as it was.

A snapshot of a module (every submodule's class, ``training`` flag, attribute
names, children and registered hooks; every parameter's ``requires_grad``,
dtype, device, identity and values; every buffer) is taken before a public
call and compared after it, for every public call that takes a module and
every backend. The module comes in a state a fine-tuning script leaves: in
train mode with its BatchNorm layers (or, without any, its first child) frozen
in eval mode with ``requires_grad=False``, and hooks registered.

Then the modes of the feature models themselves: one built from an eval-mode
module really trains after ``.train()`` (BatchNorm statistics move, Dropout
drops); a module in train mode with BatchNorm after global pooling (LeViT's
layout) can be built; TorchScript is refused with a pointer to
``torch.compile``/``torch.export``.
"""

from __future__ import annotations

import copy
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import unifeat
from unifeat import InvalidIndicesError, UnsupportedOptionError

from ._support import BACKENDS, Backend, TinyNet, maps_of, param, refused

_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)


def snapshot(module: nn.Module) -> dict[str, tuple[Any, ...]]:
    """Everything a call could change about ``module``, keyed for a readable diff."""
    found: dict[str, tuple[Any, ...]] = {}
    for name, sub in module.named_modules(remove_duplicate=False):
        hooks = tuple(tuple(getattr(sub, h, {}).items()) for h in _HOOK_DICTS)
        found[f"module {name!r}"] = (
            type(sub).__name__,
            sub.training,
            tuple(sorted(sub.__dict__)),
            hooks,
            tuple(sub._modules),
            tuple(sub._parameters),
            tuple(sub._buffers),
        )
    for name, tensor in module.named_parameters(remove_duplicate=False):
        found[f"parameter {name!r}"] = (
            tensor.requires_grad,
            tensor.dtype,
            tensor.device,
            id(tensor),
            tensor.detach().clone(),
        )
    for name, tensor in module.named_buffers(remove_duplicate=False):
        found[f"buffer {name!r}"] = (tensor.dtype, tensor.device, id(tensor), tensor.clone())
    return found


_FIELDS = {
    "module": ("class", "training", "attributes", "hooks", "children", "parameters", "buffers"),
    "parameter": ("requires_grad", "dtype", "device", "identity", "values"),
    "buffer": ("dtype", "device", "identity", "values"),
}


def differences(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    found = []
    for key in sorted(set(before) | set(after)):
        if key not in before or key not in after:
            found.append(f"{key} {'appeared' if key in after else 'disappeared'}")
            continue
        names = _FIELDS[key.split()[0]]
        for field, old, new in zip(names, before[key], after[key], strict=True):
            same = torch.equal(old, new) if isinstance(old, torch.Tensor) else old == new
            if not same:
                shown = "" if field == "values" else f": {old} -> {new}"
                found.append(f"{key} {field}{shown}")
    return found


def _frozen(module: nn.Module) -> nn.Module:
    """Train mode, BatchNorm (else the first child) frozen in eval, hooks registered."""
    module.train()
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for frozen in norms or [next(module.children())]:
        frozen.eval()
        frozen.requires_grad_(False)
    _add_hooks(module)
    return module


def _eval_with_an_active_child(module: nn.Module) -> nn.Module:
    """Eval mode with the first child left training (the mirror image)."""
    module.eval()
    next(module.children()).train()
    _add_hooks(module)
    return module


def _caller_hook(*args: Any) -> None:
    """A hook of the caller's (module level, so feature models stay picklable)."""


def _add_hooks(module: nn.Module) -> None:
    module.register_forward_hook(_caller_hook)
    module.register_forward_pre_hook(_caller_hook)
    module.register_state_dict_post_hook(_caller_hook)
    next(module.children()).register_forward_hook(_caller_hook)
    module.user_note = "set by the caller"


def _source(backend: Backend, state: str) -> nn.Module:
    torch.manual_seed(0)
    module = backend.source()
    return _frozen(module) if state == "frozen" else _eval_with_an_active_child(module)


# -- every public call that takes a module ------------------------------------------------

_X = torch.randn(1, 3, 32, 32)


def _call_with_checkpoint(source: nn.Module, tmp_path: Path) -> Any:
    torch.save(source.state_dict(), tmp_path / "own.pth")
    return unifeat.create_model(source, features_only=True, checkpoint_path=tmp_path / "own.pth")


def _refused_build(source: nn.Module, tmp_path: Path) -> Any:
    with pytest.raises(InvalidIndicesError):
        unifeat.create_model(source, features_only=True, out_indices=(99,))


def _node_names(source: nn.Module, tmp_path: Path) -> Any:
    try:
        return unifeat.get_node_names(source)
    except unifeat.TracingError:
        return None  # transformers models have none; the module must still be untouched


SOURCE_CALLS: dict[str, Callable[[nn.Module, Path], Any]] = {
    "feature_info": lambda source, _: unifeat.feature_info(source),
    "get_node_names": _node_names,
    "create_model": lambda source, _: unifeat.create_model(source),
    "create_model-features": lambda source, _: unifeat.create_model(source, features_only=True),
    "create_model-refused": _refused_build,
    "create_model-checkpoint": _call_with_checkpoint,
}


def _copies(model: Any) -> None:
    copy.deepcopy(model)
    pickle.loads(pickle.dumps(model))
    model.load_state_dict(model.state_dict())


def _forward(model: Any) -> None:
    with torch.no_grad():
        model.eval()(_X)


def _intermediates(model: Any) -> None:
    with torch.no_grad():
        model.eval().forward_intermediates(_X, indices=(0, -1))


FEATURE_MODEL_CALLS: dict[str, Callable[[Any], Any]] = {
    "forward": _forward,
    "forward_intermediates": _intermediates,
    "prune_intermediate_layers": lambda model: model.prune_intermediate_layers((0,)),
    "train-then-eval": lambda model: model.train().eval(),
    "deepcopy-pickle-state_dict": _copies,
}


def _source_params(states: tuple[str, ...]) -> list[Any]:
    params = []
    for state in states:
        for backend in BACKENDS:
            for call in SOURCE_CALLS:
                marks: list[Any] = []
                params.append(
                    pytest.param(
                        backend,
                        state,
                        call,
                        id=f"{backend.id}-{state}-{call}",
                        marks=marks,
                    )
                )
    return params


@pytest.mark.parametrize(("backend", "state", "call"), _source_params(("frozen", "eval")))
def test_public_call_leaves_the_module_as_it_was(
    backend: Backend, state: str, call: str, tmp_path: Path
) -> None:
    source = _source(backend, state)
    before = snapshot(source)
    SOURCE_CALLS[call](source, tmp_path)
    changed = differences(before, snapshot(source))
    assert not changed, f"{len(changed)} changes, e.g. {changed[:4]}"


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b.id)
def test_feature_model_calls_leave_the_source_as_it_was(backend: Backend) -> None:
    """Running, pruning, moding and copying a feature model leave its source alone.

    One feature model goes through every call in turn, with a snapshot of the
    source around each; what building it does is checked above (the first
    snapshot is taken after the build).
    """
    source = _source(backend, "frozen")
    model = unifeat.create_model(source, features_only=True)
    changed = {}
    for call, run in FEATURE_MODEL_CALLS.items():
        before = snapshot(source)
        run(model)
        found = differences(before, snapshot(source))
        if found:
            changed[call] = found[:3]
    assert not changed, f"calls that changed the source: {changed}"


# -- the feature model's own modes --------------------------------------------------------


@pytest.mark.parametrize(
    "backend",
    [param(b, id=b.id) for b in BACKENDS],
)
def test_built_in_eval_then_train_really_trains(backend: Backend) -> None:
    torch.manual_seed(0)
    source = backend.source().eval()
    model = unifeat.create_model(source, features_only=True)
    assert not model.training
    model.train()
    assert model.training
    lazy = [name for name, m in model.named_modules() if not m.training]
    assert not lazy, f"still in eval mode after .train(): {lazy[:5]}"
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    before = [m.running_mean.clone() for m in norms]
    model(torch.randn(4, 3, 32, 32))
    assert all(not torch.equal(b, m.running_mean) for b, m in zip(before, norms, strict=True))


def test_built_in_eval_then_train_drops_out() -> None:
    """TinyNet has Dropout(0.5) after stage1: in training, two calls differ."""
    model = unifeat.create_model(TinyNet().eval(), features_only=True, out_indices=(1,)).train()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert not torch.equal(model(x)[0], model(x)[0])


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b.id)
def test_built_in_train_then_eval_is_deterministic(backend: Backend) -> None:
    torch.manual_seed(0)
    model = unifeat.create_model(backend.source().train(), features_only=True)
    assert model.training
    model.eval()
    assert not any(m.training for m in model.modules())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        first, second = maps_of(model(x)), maps_of(model(x))
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


class PooledNormNet(nn.Module):
    """BatchNorm after global pooling (LeViT's head): a batch of 1 cannot train it."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU())
        self.stage1 = nn.Sequential(nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.norm = nn.BatchNorm1d(16)
        self.fc = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage1(self.stem(x))
        return self.fc(self.norm(self.pool(x).flatten(1)))


def test_train_mode_module_with_norm_after_pooling(capfd: pytest.CaptureFixture[str]) -> None:
    model = unifeat.create_model(PooledNormNet().train(), features_only=True)
    assert model.feature_info.channels() == [8, 16]
    assert capfd.readouterr().err == ""


@pytest.mark.parametrize("backend", [param(b, id=b.id) for b in BACKENDS])
def test_torchscript_is_refused_with_the_alternatives(
    backend: Backend, capfd: pytest.CaptureFixture[str]
) -> None:
    model = backend.create().eval()
    refused(
        lambda: torch.jit.script(model),
        UnsupportedOptionError,
        [r"TorchScript|torch\.jit", r"torch\.compile", r"torch\.export", backend.named],
    )
    assert "Traceback" not in capfd.readouterr().err
