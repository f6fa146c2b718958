"""Training a backbone: which parameters feed a level, and which norm layers to hold.

Backend-neutral: the parameters a level depends on are found by autograd on the
meta device (stand-ins for every tensor, nothing computed), so the same rule
serves traced graphs, hooked block lists and libraries' own
``forward_intermediates``. See the docs page "Training and deployment".
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from unifeat._engine.meta import weightless

M = TypeVar("M", bound=nn.Module)

NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.LocalResponseNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)
"""Normalization layers; the BatchNorm family (``_NormBase``: batch and instance
norms, timm's ``BatchNormAct2d``) is what eval mode changes."""


def is_norm(module: nn.Module) -> bool:
    """A normalization layer, ours or a library's (``FrozenBatchNorm2d``, ``*Norm*``)."""
    return isinstance(module, NORM_TYPES) or "Norm" in type(module).__name__


def parameters_feeding(model: M, run: Callable[[M, Tensor], Any], example: Tensor) -> set[str]:
    """Names of ``model``'s parameters that ``run(replica, example)``'s tensors
    depend on, where ``replica`` is ``model``'s structure over meta stand-ins.

    ``example`` is a meta tensor; every parameter gets a meta stand-in that
    requires grad, so nothing is computed and nothing of ``model`` changes (nor
    looks changed to a forward in another thread).
    """
    names = [name for name, _ in model.named_parameters()]
    probe = weightless(model, every_parameter=True)
    with torch.enable_grad():
        found = run(probe.module, example)
        tensors = [t for t in _tensors(found) if t.requires_grad]
        if not tensors:
            return set()
        total = torch.stack([t.float().sum() for t in tensors]).sum()
        grads = torch.autograd.grad(
            total, [probe.stand_ins[name] for name in names], allow_unused=True
        )
    return {name for name, grad in zip(names, grads, strict=True) if grad is not None}


def parameters_per_output(
    model: M, run: Callable[[M, Tensor], Sequence[Any]], example: Tensor
) -> list[set[str]]:
    """For each item ``run(replica, example)`` returns, the names of ``model``'s
    parameters it depends on (``replica`` as in :func:`parameters_feeding`): one
    forward, and one backward per item, all on meta stand-ins."""
    names = [name for name, _ in model.named_parameters()]
    probe = weightless(model, every_parameter=True)
    inputs = [probe.stand_ins[name] for name in names]
    found: list[set[str]] = []
    with torch.enable_grad():
        for item in list(run(probe.module, example)):
            tensors = [t for t in _tensors(item) if t.requires_grad]
            if not tensors:
                found.append(set())
                continue
            total = torch.stack([t.float().sum() for t in tensors]).sum()
            grads = torch.autograd.grad(total, inputs, allow_unused=True, retain_graph=True)
            found.append({n for n, g in zip(names, grads, strict=True) if g is not None})
    return found


def _tensors(value: Any) -> Iterable[Tensor]:
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)


def subtrees_within(model: nn.Module, parameters: set[str]) -> list[str]:
    """Names of the outermost submodules whose parameters (their own and their
    children's, at least one) are all in ``parameters``: a frozen stage as a whole,
    its parameter-free children (dropout, activations) included."""
    found: list[str] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(f"{outer}.") for outer in found):
            continue
        own = [f"{name}.{p}" for p, _ in module.named_parameters()]
        if own and all(p in parameters for p in own):
            found.append(name)
    return found


# -- gradient checkpointing ---------------------------------------------------------------


class CheckpointedForward:
    """Stands in for a module's ``forward`` (an instance attribute): in training
    with grad enabled, the call runs under :func:`torch.utils.checkpoint.checkpoint`,
    so its inner activations are recomputed in backward instead of kept.

    Plain data holding its module, so deepcopy and pickle carry it; the module's
    hooks still run around the call (they see the same output).
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        forward = type(self.module).forward.__get__(self.module)
        if self.module.training and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint

            return checkpoint(forward, *args, use_reentrant=False, **kwargs)
        return forward(*args, **kwargs)


def checkpoint_modules(root: nn.Module, names: Iterable[str], enable: bool) -> int:
    """Turn checkpointing of the modules ``names`` of ``root`` on or off; returns how
    many modules it applies to (names that are not modules are skipped)."""
    count = 0
    for name in dict.fromkeys(names):
        try:
            module = root.get_submodule(name)
        except AttributeError:
            continue
        # A parameter-free level (timm's stem activation, often in place) keeps
        # nothing worth recomputing, and an in-place op would corrupt the saved input.
        if module is root or next(module.parameters(), None) is None:
            continue
        if enable:
            module.__dict__["forward"] = CheckpointedForward(module)
        else:
            module.__dict__.pop("forward", None)
        count += 1
    return count
