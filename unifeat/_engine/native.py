"""The pass-through runner for libraries with their own ``forward_intermediates``.

timm and open_clip compute intermediate maps themselves, prune themselves and
know their own final output. Their adapter hands the engine three module-level
functions (picklable) in a :class:`NativeSpec`; the engine runs them with its
own index rules, output layout and bookkeeping, like any other runner.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from unifeat._engine.levels import FeatureMap, Level, spatial
from unifeat._engine.meta import weightless
from unifeat._engine.model import Runner, final_norm_refusal

Intermediates = Callable[[nn.Module, Tensor, list[int], bool, bool], list[FeatureMap]]
"""``(model, x, indices, prefix_tokens, norm) -> maps`` (NCHW; ``(map, prefix)``
pairs when ``prefix_tokens``)."""
Final = Callable[[nn.Module, Tensor, list[int], bool, bool], tuple[Tensor, list[FeatureMap]]]
"""The same, also returning the final output: ``(final, maps)``."""
Prune = Callable[[nn.Module, int, bool], None]
"""``(model, last_level, keep_final)``: cut the model in place after ``last_level``;
``keep_final`` (False once the user pruned the norm) keeps what the final output
needs: all of it with the last level, the final norm where it fits otherwise."""


@dataclass(frozen=True)
class NativeSpec:
    intermediates: Intermediates
    final: Final
    prune: Prune
    wrap: Callable[[nn.Module, int], nn.Module] | None = None
    """``(model, last_level) -> root``, where the library runs a wrapper, not the model."""
    norm: str | None = None
    """Why ``norm=True`` is refused, or None where the library supports it."""


def _on(path: str, function: Any, model: nn.Module, *args: Any) -> Any:
    return function(model.get_submodule(path), *args)


def _wrap_on(path: str, wrap: Any, model: nn.Module, last_level: int) -> nn.Module:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent), name, wrap(model.get_submodule(path), last_level))
    return model


def at(spec: NativeSpec, path: str) -> NativeSpec:
    """``spec`` applied to the submodule at ``path`` (a library model wrapped in
    another: transformers' ``TimmWrapperModel.timm_model``, DETR's timm backbone);
    a wrapper the library runs takes that submodule's place."""
    if not path:
        return spec
    return NativeSpec(
        intermediates=functools.partial(_on, path, spec.intermediates),
        final=functools.partial(_on, path, spec.final),
        prune=functools.partial(_on, path, spec.prune),
        wrap=functools.partial(_wrap_on, path, spec.wrap) if spec.wrap else None,
        norm=spec.norm,
    )


class NativeRunner(Runner):
    """Runs a library's own ``forward_intermediates`` on the root (the source model)."""

    def __init__(
        self,
        spec: NativeSpec,
        levels: Sequence[Level],
        *,
        last_level: int,
        keep_final: bool = False,
    ) -> None:
        self._spec = spec
        self.levels = tuple(levels)
        self.last_level = last_level
        self.final_norm = spec.norm or final_norm_refusal(True, keep_final)
        self._keep_final = keep_final

    def make_root(self, source: nn.Module) -> nn.Module:
        root = self._spec.wrap(source, self.last_level) if self._spec.wrap else source
        self._spec.prune(root, self.last_level, self._keeps_final())
        return root

    def _keeps_final(self) -> bool:
        return self._keep_final

    def run(
        self,
        root: nn.Module,
        x: Tensor,
        indices: Sequence[int],
        *,
        final: bool,
        norm: bool,
        prefix_tokens: bool,
        context: str,
    ) -> tuple[list[FeatureMap], Tensor | None]:
        if final:
            output, maps = self._spec.final(root, x, list(indices), prefix_tokens, norm)
            return _paired(maps, prefix_tokens), output
        maps = self._spec.intermediates(root, x, list(indices), prefix_tokens, norm)
        return _paired(maps, prefix_tokens), None

    def prune(
        self,
        root: nn.Module,
        last_level: int,
        *,
        drop_final: bool,
        indices: Sequence[int] = (),
    ) -> nn.Module:
        self.last_level = last_level
        if drop_final:
            self._keep_final = False
            self.final_norm = self.final_norm or "its final norm was pruned"
        self._spec.prune(root, last_level, self._keeps_final())
        return root


def _paired(maps: list[FeatureMap], prefix_tokens: bool) -> list[FeatureMap]:
    """With prefix tokens asked for, every level is ``(map, prefix)``: a library that
    returns a bare map where a model has none (timm's ViT without a class token)
    gets an empty ``[N, 0, C]`` prefix, as the other runners give."""
    if not prefix_tokens:
        return maps
    return [
        item if isinstance(item, tuple) else (item, item.new_empty(item.shape[0], 0, item.shape[1]))
        for item in maps
    ]


def measure_levels(
    model: nn.Module,
    spec: NativeSpec,
    modules: Sequence[str],
    input_size: tuple[int, int, int],
    *,
    tokens: bool,
) -> list[Level]:
    """Levels read off the library's own intermediates on the meta device: one per
    entry of ``modules`` (their names), channels and reductions from the maps."""
    channels, height, width = input_size
    x = torch.empty(2, channels, height, width, device="meta")
    indices = list(range(len(modules)))
    with torch.no_grad():
        maps: list[Any] = spec.intermediates(weightless(model).module, x, indices, tokens, False)
    levels = []
    for name, item in zip(modules, maps, strict=True):
        feature_map, prefix = item if isinstance(item, tuple) else (item, None)
        found = spatial(tuple(feature_map.shape), (height, width))
        reduction = found[1] if found else 0
        levels.append(
            Level(
                name,
                int(feature_map.shape[1]),
                reduction,
                "NCHW",
                where=name,
                num_prefix_tokens=int(prefix.shape[1]) if prefix is not None else 0,
            )
        )
    return levels
