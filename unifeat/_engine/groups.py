"""Parameter groups by depth, in timm's ``group_matcher`` format, for any feature model.

timm's layer-wise learning-rate decay (``create_optimizer_v2(model,
layer_decay=...)``) asks ``model.group_matcher(coarse=False)`` for regexes over
parameter names: the stem first, then one group per block, deepest last. timm
models answer from hand-written tables; every other model is grouped here from
what the engine knows: which parameters each level depends on (autograd on the
meta device) and the module structure around each level. A parameter belongs to
the stage of the first level that needs it; a stage is split into the blocks of
its level's module where that module is a numbered container (``layer1.0``,
``stages.1.blocks.2``), and what a stage needs outside its level's module (the
stem before level 0, a downsampling layer between stages) is a group of its own
before its blocks. See the docs page "Training and deployment".
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from torch import nn

from unifeat._engine.meta import meta_batch
from unifeat._engine.training import parameters_per_output

GroupMatcher = dict[str, Any]


def _names_regex(names: Sequence[str]) -> str:
    return "^(?:" + "|".join(re.escape(name) for name in names) + ")$"


def _module_regex(path: str) -> str:
    return f"^{re.escape(path)}\\."


def _blocks_of(model: nn.Module, path: str) -> list[str]:
    """The blocks of a level's module: the children of the numbered container it is
    or holds (following single children), or the module itself."""
    try:
        module = model.get_submodule(path)
    except AttributeError:
        return []
    while True:
        holding = [
            (name, child)
            for name, child in module.named_children()
            if next(child.parameters(), None) is not None
        ]
        # Numbered composite children are blocks (ResNet's ``layer1.0``); numbered
        # leaves are the layers of one block (a conv and its norm), not blocks.
        if (
            len(holding) >= 2
            and all(name.isdigit() for name, _ in holding)
            and all(next(child.children(), None) is not None for _, child in holding)
        ):
            return [f"{path}.{name}" for name, _ in holding]
        if len(holding) != 1:
            return [path]
        name, module = holding[0]
        path = f"{path}.{name}"


def depth_groups(
    model: nn.Module,
    run: Any,
    level_modules: Sequence[str],
    input_size: Sequence[int],
) -> list[tuple[list[str], bool]]:
    """Parameter names in groups from the stem to the deepest level, each with whether
    it starts a new stage; ``run(replica, x)`` returns the levels ``level_modules``
    names, computed by ``model``'s weightless replica."""
    example = meta_batch(model, input_size)
    per_level = parameters_per_output(model, run, example)
    order = [name for name, _ in model.named_parameters()]
    claimed: set[str] = set()
    groups: list[tuple[list[str], bool]] = []
    for path, needed in zip(level_modules, per_level, strict=True):
        stage = [name for name in order if name in needed and name not in claimed]
        claimed.update(stage)
        if not stage:
            continue
        blocks = _blocks_of(model, path)
        inside = {block: [n for n in stage if n.startswith(f"{block}.")] for block in blocks}
        outside = [n for n in stage if not any(n in names for names in inside.values())]
        first = True
        for names in (outside, *inside.values()):
            if names:
                groups.append((names, first))
                first = False
    return groups


def as_group_matcher(
    model: nn.Module, groups: Sequence[tuple[list[str], bool]], *, coarse: bool
) -> GroupMatcher:
    """timm's ``{"stem": regex, "blocks": [(regex, (ordinal,)), ...]}``: one regex per
    group, a module prefix where the group is one module's parameters. Parameters of
    no group (a pyramid's, a final norm kept with ``norm=True``) are left unmatched,
    which timm puts in the top group."""
    if coarse:
        merged: list[tuple[list[str], bool]] = []
        for names, starts in groups:
            if starts or not merged:
                merged.append((list(names), True))
            else:
                merged[-1][0].extend(names)
        groups = merged
    modules = dict(model.named_modules())

    def regex(names: list[str]) -> str:
        prefix = _common_module(names)
        if prefix and prefix in modules:
            inside = [n for n, _ in modules[prefix].named_parameters()]
            if len(inside) == len(names):
                return _module_regex(prefix)
        return _names_regex(names)

    if not groups:
        return {}
    (stem, _), *rest = groups
    return {
        "stem": regex(stem),
        "blocks": [(regex(names), (k,)) for k, (names, _) in enumerate(rest)],
    }


def _common_module(names: Sequence[str]) -> str:
    parts = [name.split(".")[:-1] for name in names]
    common: list[str] = []
    for pieces in zip(*parts, strict=False):
        if len(set(pieces)) != 1:
            break
        common.append(pieces[0])
    return ".".join(common)


def prefixed(matcher: GroupMatcher, prefix: str) -> GroupMatcher:
    """``matcher`` for the same parameters held under ``prefix`` (a framework's
    wrapper: ``model.`` inside transformers' backbone)."""
    lead = "^" + re.escape(f"{prefix}.")

    def moved(regex: str) -> str:
        return lead + regex[1:] if regex.startswith("^") else lead + regex

    found: GroupMatcher = {}
    for name, spec in matcher.items():
        if isinstance(spec, str):
            found[name] = moved(spec)
        else:
            found[name] = [(moved(regex), suffix) for regex, suffix in spec]
    return found
