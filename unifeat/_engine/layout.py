"""What a build finds on the meta device, and how it becomes a runner.

A :class:`Layout` is the hand-over between the finders (graph, hooks, native)
and the feature model: the levels, the :class:`~unifeat.FeatureInfo`, the one
input size, the dilation to apply, and the runner to make once the real model
exists. :func:`apply_output_stride` is the one ``output_stride`` loop: a
library's own switch where it has one, the generic dilation otherwise, the
same errors everywhere.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from unifeat._engine.dilation import (
    DilationChange,
    apply_dilation,
    generic_dilation,
    supported_message,
)
from unifeat._engine.graph import (
    GraphFinder,
    GraphPlan,
    GraphRunner,
    lacks_graph_attributes,
    relevel,
    trace,
)
from unifeat._engine.hooks import HookFinder, HookPlan, HookRunner
from unifeat._engine.levels import Level
from unifeat._engine.meta import replica
from unifeat._engine.model import Runner, share_parameters_copy
from unifeat._engine.native import NativeRunner, NativeSpec
from unifeat._engine.pyramid import PyramidRunner, attach_pyramid
from unifeat._engine.trim import trim
from unifeat._errors import UnsupportedOptionError
from unifeat._feature_info import FeatureInfo


@dataclass
class Layout:
    """Levels and everything needed to build the feature model that returns them."""

    levels: list[Level]
    info: FeatureInfo
    input_size: tuple[int, int, int]
    plan: GraphPlan | HookPlan | NativeSpec
    dilation: list[DilationChange] = field(default_factory=list)
    dilation_root: str = ""
    """Where in the source the dilation's module names start (a transformers trunk)."""
    build_kwargs: dict[str, Any] = field(default_factory=dict)
    """Constructor arguments of the library's own ``output_stride`` switch."""
    pyramid: list[Level] | None = None
    """The levels of a simple pyramid on the last of ``levels``, which ``info``
    describes then (``levels`` stay the backbone's)."""

    def make_runner(
        self, source: nn.Module, *, context: str, keep_final: bool = False
    ) -> tuple[Runner, nn.Module]:
        """The runner over the real ``source`` (dilated already), and its root, holding
        only what the levels compute (and, with ``keep_final``, what maps the deepest
        block to the final output: the final norm)."""
        if self.pyramid is None:
            runner, root = self._runner(
                source, context=context, keep_final=keep_final, last=max(self.info.out_indices)
            )
        else:
            inner, root = self._runner(
                source, context=context, keep_final=keep_final, last=len(self.levels) - 1
            )
            kept = self.info.out_indices
            attach_pyramid(root, self.levels[-1], [self.pyramid[i] for i in kept])
            runner = PyramidRunner(inner, self.pyramid, kept)
        trim(runner, root, self.input_size, context=context)
        return runner, root

    def _runner(
        self, source: nn.Module, *, context: str, keep_final: bool, last: int
    ) -> tuple[Runner, nn.Module]:
        if isinstance(self.plan, GraphPlan):
            plan = self.plan
            traces = [t for t in (plan.evaluation, plan.train) if t is not None]
            if (
                plan.train is None
                and lacks_graph_attributes(plan.evaluation, source)
                and not any(c.is_meta for c in plan.evaluation.constants.values())
            ):
                # The tensor constants the tracer lifted from a module passed in (plain
                # tensor attributes, tensors its forward makes) are real ones: the build's
                # own copy gets them, where tracing it again would lift the same.
                plan.evaluation.attach_constants(source)
            if any(lacks_graph_attributes(t, source) for t in traces):
                # The tensor constants the tracer lifted (MaxViT's) belong to the model
                # the layout traced (the meta build, or a module passed in, which keeps
                # none): trace the real one, which this build owns, and give it its own.
                evaluation = trace(
                    source, train=False, context=context, extra_tracer_kwargs=plan.tracer_options
                )
                evaluation.attach_constants(source)
                plan = dataclasses.replace(plan, evaluation=evaluation, train=None)
            graph_runner = GraphRunner(
                source, plan, last_level=last, context=context, keep_final=keep_final
            )
            return graph_runner, graph_runner.make_root()
        if isinstance(self.plan, HookPlan):
            hook_runner = HookRunner(self.plan, last_level=last, keep_final=keep_final)
            return hook_runner, hook_runner.make_root(source)
        native = NativeRunner(self.plan, self.levels, last_level=last, keep_final=keep_final)
        return native, native.make_root(source)

    def copy_to_hold(self, source: nn.Module) -> nn.Module:
        """A structural copy of a module passed in, for the feature model to hold: its
        own module objects (their modes, hooks and pruning are the feature model's)
        over the caller's tensors (training it trains the caller's weights).

        A traced graph's root only calls the modules it holds, so new module objects
        over the same attributes do (:func:`~unifeat._engine.meta.replica`, a
        seventh of a deep copy's cost on ViT-B); hooked block lists and libraries'
        own pruning cut and rewire what they hold, so they get a deep copy."""
        if isinstance(self.plan, GraphPlan):
            return replica(source)
        return share_parameters_copy(source)

    def apply_dilation(self, source: nn.Module) -> None:
        if self.dilation:
            apply_dilation(source.get_submodule(self.dilation_root), self.dilation)


Finder = GraphFinder | HookFinder


def apply_output_stride(
    levels: Sequence[Level],
    output_stride: int | None,
    *,
    context: str,
    finder: Finder | None,
    native_switch: Callable[[int], Sequence[Level] | None],
    native_strides: Sequence[int] = (),
    tokens: bool = False,
) -> tuple[list[Level], list[DilationChange]]:
    """The levels at ``output_stride``, and the dilation that gives them.

    ``native_switch(stride)`` returns the levels of a build with the library's
    own switch (and remembers its arguments), or None where it has none for that
    stride; otherwise convs and pools are dilated (``finder`` lists them), unless
    the model is a token model or was found natively (``finder`` None).
    """
    native = max(level.reduction for level in levels)
    if output_stride is None or output_stride == native:
        return list(levels), []
    switched = native_switch(output_stride)
    if switched is not None:
        reached = max(level.reduction for level in switched)
        if reached != output_stride:
            raise UnsupportedOptionError(
                f"output_stride={output_stride} is not supported by {context}: its own switch "
                f"reached {reached}; {supported_message([native, *native_strides])}"
            )
        return list(switched), []
    if tokens or any(level.layout == "tokens" for level in levels):
        raise UnsupportedOptionError(
            f"output_stride={output_stride} is not supported by {context}: supported values "
            f"are {native} (its patch size: a token model)"
        )
    if finder is None:
        raise UnsupportedOptionError(
            f"output_stride={output_stride} is not supported by {context}: "
            f"{supported_message([native, *native_strides])}"
        )
    ops = finder.spatial_ops(finder.source) if isinstance(finder, GraphFinder) else finder.ops
    changes, dilated = generic_dilation(
        levels,
        ops,
        output_stride,
        remeasure=lambda changes: _remeasure(finder, levels, changes),
        context=context,
        also_supported=native_strides,
    )
    return dilated, changes


def _remeasure(
    finder: Finder, levels: Sequence[Level], changes: Sequence[DilationChange]
) -> list[Level]:
    """The levels of a weightless dilated copy: the same modules, new reductions."""
    if isinstance(finder, GraphFinder):
        variant = share_parameters_copy(finder.source)
        apply_dilation(variant, changes)
        return relevel(levels, finder.remeasure(variant, retrace=False), finder.size)
    trunk = share_parameters_copy(finder.trunk)
    apply_dilation(trunk, changes)
    shapes: Mapping[str, Any] = {r.path: r.output for r in finder.remeasure(trunk)}
    return relevel(
        levels,
        {level.where: shapes.get(level.where) for level in levels},
        finder.size,
    )
