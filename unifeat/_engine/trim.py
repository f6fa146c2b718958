"""A feature model holds only what its levels compute.

Runners cut what follows the deepest requested level (a traced graph keeps only
the nodes its outputs need; hooked block lists and libraries' own pruning drop
later blocks and the final norm). What they cannot see is what a library keeps
*inside* the part that runs: ConvNeXt's ``head.norm`` after timm's pruning,
DINOv2's ``mask_token`` in an embedding that runs. :func:`drop_unused` finds,
by autograd on the meta device, the parameters no requested level depends on
and takes them out: a layer all of whose parameters are unused (the module that
holds them, its children's included) is replaced by a parameter-free stand-in,
the containers around it staying as they are; a single unused parameter of a
layer that runs becomes a non-persistent buffer (its code may still read it; it is no longer
trained, saved or counted). So every parameter gets a gradient from the levels
(DDP needs no ignore list), and the parameter count is timm's own
``features_only`` count (docs/training.md, "What a feature model holds").
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from unifeat._engine.meta import meta_batch
from unifeat._engine.model import Runner
from unifeat._engine.training import parameters_feeding


class Unused(nn.Module):
    """Stands in for a submodule no level depends on: passes its first input on."""

    def forward(self, x: Any = None, *args: Any, **kwargs: Any) -> Any:
        return x


def _set_child(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def used_parameters(
    root: nn.Module, run: Callable[[nn.Module, Tensor], Any], input_size: Sequence[int]
) -> set[str]:
    """The names of ``root``'s parameters that ``run(replica, x)`` depends on, in train
    or in eval mode (a train-only branch counts), found on the meta device on
    replicas of ``root`` (``root`` itself is neither run nor switched)."""
    example = meta_batch(root, input_size)
    used: set[str] = set()
    for training in (False, True):

        def in_mode(module: nn.Module, x: Tensor, training: bool = training) -> Any:
            return run(module.train(training), x)

        used |= parameters_feeding(root, in_mode, example)
    return used


def trim(runner: Runner, root: nn.Module, input_size: Sequence[int], *, context: str) -> list[str]:
    """:func:`drop_unused` over what ``runner`` may be asked for: every level up to its
    deepest, and the final output (which a model built with ``norm=True`` computes
    through its final norm). Traced graphs need none: they hold only the nodes their
    outputs need."""
    if not runner.trims:
        return []
    indices = runner.computable()

    def run(module: nn.Module, x: Tensor) -> Any:
        return runner.run(
            module, x, indices, final=True, norm=False, prefix_tokens=False, context=context
        )

    return drop_unused(root, run, input_size)


def drop_unused(
    root: nn.Module, run: Callable[[nn.Module, Tensor], Any], input_size: Sequence[int]
) -> list[str]:
    """Take the parameters ``run`` does not depend on out of ``root`` (see the module
    docstring). Returns the names of what was taken out."""
    names = [name for name, _ in root.named_parameters()]
    if not names:
        return []
    used = used_parameters(root, run, input_size)
    unused = [name for name in names if name not in used]
    if not unused:
        return []
    removed: list[str] = []
    gone = set(unused)
    # The modules that hold parameters of their own get the stand-ins, not the
    # containers around them: a library's own code reaches into those (timm's
    # reset_classifier calls head.reset(); a transformers *Backbone indexes its
    # hidden_states_norms ModuleDict), while a layer with unused weights is a layer.
    for path, module in list(root.named_modules()):
        if not path or any(path.startswith(f"{done}.") for done in removed):
            continue
        if next(module.parameters(recurse=False), None) is None:
            continue
        inside = [f"{path}.{name}" for name, _ in module.named_parameters()]
        if all(name in gone for name in inside):
            _set_child(root, path, Unused())
            removed.append(path)
    covered = tuple(f"{path}." for path in removed)
    for name in unused:
        if name.startswith(covered):
            continue
        owner_path, _, attribute = name.rpartition(".")
        owner = root.get_submodule(owner_path) if owner_path else root
        parameter = owner._parameters.pop(attribute)
        assert parameter is not None
        owner.register_buffer(attribute, parameter.detach(), persistent=False)
        removed.append(name)
    return removed


def _called_modules(
    runner: Runner,
    root: nn.Module,
    indices: Sequence[int],
    size: Sequence[int],
    norm: bool,
    final: bool = False,
) -> list[str]:
    """The submodules of ``root`` that computing ``indices`` calls, in call order (on a
    weightless replica: ``root`` is not run)."""
    from unifeat._engine.meta import weightless

    probe = weightless(root).module
    called: list[str] = []
    for name, module in probe.named_modules():
        if name:
            module.register_forward_pre_hook(lambda *_, name=name: called.append(name))
    with torch.no_grad():
        runner.run(
            probe,
            meta_batch(probe, size),
            indices,
            final=final,
            norm=norm,
            prefix_tokens=False,
            context="",
        )
    return called


def check_norm(runner: Runner, root: nn.Module, layout: Any, *, context: str) -> None:
    """Refuse ``norm=True`` where it would change nothing: the model has no final norm,
    or the norm fits none of the requested levels (a ResNet; a Swin asked for an
    earlier stage). Told by behaviour, on the meta device: with ``norm=True`` the
    levels' computation must call a module it does not call without it."""
    from unifeat._errors import UnsupportedOptionError

    indices = list(layout.info.out_indices)
    if runner.final_norm is not None:
        raise UnsupportedOptionError(
            f"norm=True applies the final norm to the levels of {context}, but {runner.final_norm}"
        )
    size = layout.input_size
    plain = _called_modules(runner, root, indices, size, False)
    if _called_modules(runner, root, indices, size, True) != plain:
        return
    deepest = [runner.last_level]
    final_part = set(_called_modules(runner, root, deepest, size, False, final=True)) - set(
        _called_modules(runner, root, deepest, size, False)
    )
    why = (
        "its final norm fits none of them (it applies to the levels as wide as its last "
        "one, or to the last level only)"
        if final_part
        else "it has no final norm after its blocks"
    )
    raise UnsupportedOptionError(
        f"norm=True would change none of the levels {tuple(indices)} of {context}: {why}; "
        "leave norm out"
    )
