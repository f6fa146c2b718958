"""Running a real module on the meta device without touching it.

A module a caller hands over may be running forwards, or another build, in
other threads at the same time: nothing here writes to it, not even for the
duration of a call. Probes run on a *replica* instead: new module objects with
the source's classes, attributes and hooks, holding stand-in tensors (or the
source's own ones), in their own mode.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Callable, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import torch
from torch import Tensor, nn

M = TypeVar("M", bound=nn.Module)

# Filled anew for each copy, so never copied first.
_STORES = frozenset({"_parameters", "_buffers", "_modules", "_non_persistent_buffers_set"})


def _copied_dict(value: dict[Any, Any]) -> dict[Any, Any]:
    """A shallow copy of the same type: hook dicts are OrderedDicts that handles
    weak-reference. ``copy.copy`` goes through ``__reduce_ex__``, which was a third
    of copying a ViT-B; the dicts' own ``copy`` keeps their type."""
    if type(value) is dict or type(value) is OrderedDict:
        return value.copy()
    return copy.copy(value)


def replica(
    module: M,
    tensor: Callable[[Tensor], Tensor] = lambda t: t,
    *,
    memo: MutableMapping[int, nn.Module] | None = None,
) -> M:
    """A structural copy of ``module`` that holds ``tensor(t)`` for each of its
    parameters and buffers ``t``; writing to the copy never reaches ``module``.

    Every submodule is a new object of the same class with a shallow copy of its
    attributes (what ``forward`` reads) and its own ``_parameters``, ``_buffers``,
    ``_modules`` and hook dicts: switching the copy's mode, registering hooks on
    it or assigning its attributes leaves the source's objects as they are. A
    submodule registered twice is copied once. Tensors are not copied, only
    looked up: ``tensor`` is called once per parameter or buffer entry.
    ``memo`` maps ``id(source submodule)`` to its copy, for copying several
    structures that share submodules.
    """
    memo = {} if memo is None else memo
    found = memo.get(id(module))
    if found is not None:
        return found  # type: ignore[return-value]
    # No __init__ (it would build a fresh model) and no class __new__ (fx's
    # GraphModule makes a new class per instance, without the traced forward).
    copied = object.__new__(type(module))
    memo[id(module)] = copied
    state = {
        key: _copied_dict(value) if isinstance(value, dict) else value
        for key, value in module.__dict__.items()
        if key not in _STORES
    }
    state["_non_persistent_buffers_set"] = set(module._non_persistent_buffers_set)
    state["_parameters"] = {
        key: None if t is None else tensor(t) for key, t in module._parameters.items()
    }
    state["_buffers"] = {
        key: None if t is None else tensor(t) for key, t in module._buffers.items()
    }
    state["_modules"] = {
        key: None if child is None else replica(child, tensor, memo=memo)
        for key, child in module._modules.items()
    }
    # Modules held outside the stores (a feature model's root, whose stores it
    # shares; a classifier model's feature model) are copied with the same memo,
    # so that the copy runs on the copied tensors too.
    for key, value in module.__dict__.items():
        if isinstance(value, nn.Module) and key not in ("_modules",):
            state[key] = replica(value, tensor, memo=memo)
    root = state.get("_root")
    if isinstance(root, nn.Module):
        for store in ("_parameters", "_buffers", "_modules", "_non_persistent_buffers_set"):
            state[store] = root.__dict__[store]
    copied.__dict__.update(state)
    return copied


@dataclass(frozen=True)
class Weightless(Generic[M]):
    module: M
    """The replica to run."""
    stand_ins: dict[str, Tensor]
    """Its meta tensors by the source's parameter and buffer names (every name of
    a tied tensor maps to that tensor's one stand-in)."""


def weightless(
    module: M,
    *,
    trainable: bool = False,
    every_parameter: bool = False,
    memo: MutableMapping[int, nn.Module] | None = None,
    stand_ins_by_id: MutableMapping[int, Tensor] | None = None,
) -> Weightless[M]:
    """A replica of ``module`` with a meta stand-in for every parameter and buffer.

    A forward of the replica computes nothing and copies no weight (a fake-tensor
    copy of ResNet-50's weights cost 3x the rest of a build), and ``module`` is
    never written, so threads that run it, or build from it, at the same time are
    undisturbed. With ``trainable`` the stand-ins of trainable parameters require
    grad (to see which get one); with ``every_parameter``, of all parameters.
    ``memo`` and ``stand_ins_by_id`` (keyed by ``id`` of the source's modules and
    tensors) let a second structure over the same tensors read the same stand-ins.
    """
    copied = meta_replica(
        module,
        trainable=trainable,
        every_parameter=every_parameter,
        memo=memo,
        stand_ins_by_id=stand_ins_by_id,
    )
    names = [
        *copied.named_parameters(remove_duplicate=False),
        *copied.named_buffers(remove_duplicate=False),
    ]
    return Weightless(copied, dict(names))


def meta_replica(
    module: M,
    *,
    trainable: bool = False,
    every_parameter: bool = False,
    memo: MutableMapping[int, nn.Module] | None = None,
    stand_ins_by_id: MutableMapping[int, Tensor] | None = None,
) -> M:
    """:func:`weightless`'s replica alone, for a probe that reads no stand-in by name
    (the arguments mean the same)."""
    by_id: MutableMapping[int, Tensor] = {} if stand_ins_by_id is None else stand_ins_by_id

    def stand_in(t: Tensor) -> Tensor:
        found = by_id.get(id(t))
        if found is None:
            grad = isinstance(t, nn.Parameter) and (
                every_parameter or (trainable and t.requires_grad)
            )
            found = torch.empty_like(t, device="meta").requires_grad_(grad)
            by_id[id(t)] = found
        return found

    return replica(module, stand_in, memo=memo)


def meta_batch(module: nn.Module, input_size: Sequence[int], batch: int = 2) -> Tensor:
    """A meta-device batch of ``input_size`` in the dtype of ``module``'s floating
    parameters (a model built with ``dtype=torch.float64`` takes float64 input)."""
    dtype = next(
        (p.dtype for p in module.parameters() if p.is_floating_point()), torch.get_default_dtype()
    )
    return torch.empty(batch, *input_size, device="meta", dtype=dtype)
