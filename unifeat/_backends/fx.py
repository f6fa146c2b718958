"""The generic FX backend: any traceable ``nn.Module``, and the base of torchvision's.

Metadata comes from one eval-mode trace and a shape propagation that computes
nothing: on the meta device for models built by name, with fake tensors for a
module passed in. The feature model runs graph modules that end at the deepest
requested level (``unifeat._fx.FxFeatureModel``).
"""

from __future__ import annotations

import copy
from typing import Any, NamedTuple, cast

import torch
from torch import fx, nn

from unifeat import _fx
from unifeat._backends._base import Adapter
from unifeat._checkpoint import load_checkpoint
from unifeat._dilation import DilationChange, apply_dilation, plan_dilation
from unifeat._errors import UnsupportedOptionError, format_choices
from unifeat._feature_info import FeatureInfo
from unifeat._feature_model import share_parameters_copy
from unifeat._indices import normalize_indices
from unifeat._options import BuildPlan


class _Layout(NamedTuple):
    eval_trace: _fx.Trace
    shapes: dict[fx.Node, Any]
    levels: list[_fx.NodeLevel]
    info: FeatureInfo
    dilation: list[DilationChange]


class FxAdapter(Adapter):
    """Feature models cut from FX graphs; subclasses add names and native switches."""

    name = "fx"

    # -- what subclasses refine ------------------------------------------------------

    def has_model(self, name: str) -> bool:
        return False

    def model_names(self) -> list[str]:
        return []

    def head_modules(self, source: nn.Module) -> tuple[str, ...]:
        """Modules of ``source`` that belong to its head although the level rule
        would take them (per-family overrides)."""
        return ()

    def input_size(self, plan: BuildPlan) -> tuple[int, int]:
        size = plan.model_kwargs.get("input_size", 224)
        height, width = (size, size) if isinstance(size, int) else tuple(size)[-2:]
        return int(height), int(width)

    def stride_is_native(self, plan: BuildPlan) -> bool:
        return False

    def supported_strides(self, plan: BuildPlan, native: int) -> list[int]:
        return [native]

    def build(self, plan: BuildPlan, *, meta: bool) -> nn.Module:
        raise UnsupportedOptionError(
            f"the {self.name!r} backend builds nothing by name: pass an nn.Module instance"
        )

    # -- the Adapter interface ---------------------------------------------------------

    def describe(self, plan: BuildPlan) -> FeatureInfo:
        return self._layout(plan).info

    def create(self, plan: BuildPlan) -> nn.Module:
        # Everything that depends on the model is checked on a meta build first.
        needs_layout = plan.features_only or plan.output_stride is not None
        layout = self._layout(plan) if needs_layout else None
        dilation = layout.dilation if layout is not None else []
        if plan.module is not None:
            source = plan.module
            if plan.checkpoint_path is not None:
                # Loading writes into the tensors, which the caller's module owns.
                source = copy.deepcopy(source)
                load_checkpoint(source, plan.checkpoint_path, context=plan.label)
            elif plan.features_only or dilation:
                source = share_parameters_copy(source)
        else:
            source = self.build(plan, meta=False)
            if plan.checkpoint_path is not None:
                load_checkpoint(source, plan.checkpoint_path, context=plan.label)
        apply_dilation(source, dilation)
        if layout is None or not plan.features_only:
            if plan.module is None:
                cast(Any, source).backend = self.name
            return source
        evaluation = layout.eval_trace
        if _fx.lacks_graph_attributes(evaluation, source):
            # The layout's trace ran on the meta build, and the tracer stored the
            # tensor constants it met (MaxViT's) on that model: trace the real one.
            evaluation = _fx.trace(source, train=False, context=plan.label)
        return _fx.FxFeatureModel(
            source,
            (None, evaluation),
            layout.levels,
            layout.info,
            backend=plan.backend,
            output_type=plan.output_type or ("dict" if plan.return_nodes else "list"),
            output_fmt=plan.output_fmt,
            return_prefix_tokens=plan.return_prefix_tokens,
            context=plan.label,
        )

    def source_on_meta(self, plan: BuildPlan) -> nn.Module:
        return plan.module if plan.module is not None else self.build(plan, meta=True)

    # -- metadata -------------------------------------------------------------------

    def _layout(self, plan: BuildPlan) -> _Layout:
        generic_stride = (
            plan.output_stride is not None
            and plan.return_nodes is None
            and not self.stride_is_native(plan)
        )
        if generic_stride:
            return self._dilated_layout(plan)
        source = self.source_on_meta(plan)
        evaluation = _fx.trace(source, train=False, context=plan.label)
        shapes = self._shapes(source, evaluation, plan)
        if plan.return_nodes is not None:
            levels = _fx.node_levels(
                evaluation, shapes, plan.return_nodes, self.input_size(plan), context=plan.label
            )
        elif plan.output_stride is not None and self.stride_is_native(plan):
            # Dilated stages share one reduction; the levels are still the
            # architecture's, so find them undilated and read the new strides.
            native = self._layout(
                plan.model_copy(update={"output_stride": None, "out_indices": None})
            )
            levels = _fx.relevel(native.levels, evaluation, shapes, self.input_size(plan))
        else:
            levels = _fx.derive_levels(
                evaluation.graph,
                evaluation.names,
                shapes,
                self.input_size(plan),
                head_modules=self.head_modules(source),
            )
            if not levels:
                raise UnsupportedOptionError(
                    f"no feature levels found in {plan.label}: its graph has no spatial maps "
                    "or token blocks; pass return_nodes=[...] to choose nodes"
                )
        self._check_stride(plan, levels)
        if plan.return_prefix_tokens and not any(lv.layout == "tokens" for lv in levels):
            raise UnsupportedOptionError(
                f"return_prefix_tokens=True needs a token model with prefix tokens, but "
                f"{plan.label} returns plain feature maps"
            )
        return self._finish(plan, evaluation, shapes, levels, [])

    def _finish(
        self,
        plan: BuildPlan,
        evaluation: _fx.Trace,
        shapes: dict[fx.Node, Any],
        levels: list[_fx.NodeLevel],
        dilation: list[DilationChange],
    ) -> _Layout:
        indices = normalize_indices(plan.out_indices, len(levels), context=plan.label)
        info = FeatureInfo.from_dicts(_fx.level_dicts(levels), indices)
        return _Layout(evaluation, shapes, levels, info, dilation)

    def _dilated_layout(self, plan: BuildPlan) -> _Layout:
        """``output_stride`` without a native switch: dilate strided convs and pools."""
        assert plan.output_stride is not None
        native = self._layout(plan.model_copy(update={"output_stride": None}))
        reached = max(level.reduction for level in native.levels)
        if plan.output_stride == reached:
            return native
        if plan.output_stride > reached:
            raise UnsupportedOptionError(
                f"output_stride={plan.output_stride} is larger than the native stride "
                f"{reached} of {plan.label}: supported values are at most {reached}"
            )
        if any(level.layout == "tokens" for level in native.levels):
            raise UnsupportedOptionError(
                f"output_stride={plan.output_stride} is not supported by {plan.label}, a "
                f"token model: supported values are {reached} (its patch size)"
            )
        source = share_parameters_copy(self.source_on_meta(plan))
        size = self.input_size(plan)
        ops = _fx.spatial_ops(native.eval_trace, native.shapes, source, size)
        changes = plan_dilation(ops, plan.output_stride, context=plan.label)
        apply_dilation(source, changes)
        evaluation = _fx.trace(source, train=False, context=plan.label)
        try:
            shapes = self._shapes(source, evaluation, plan)
        except UnsupportedOptionError:
            raise UnsupportedOptionError(
                f"output_stride={plan.output_stride} is not supported by {plan.label}: once "
                "dilated, its branches no longer produce maps of matching sizes (valid "
                f"padding); supported values are {reached}"
            ) from None
        levels = _fx.relevel(native.levels, evaluation, shapes, size)
        deepest = max(level.reduction for level in levels)
        if deepest != plan.output_stride:
            raise UnsupportedOptionError(
                f"output_stride={plan.output_stride} is not supported by {plan.label}: it "
                f"downsamples outside conv and pool modules (reached {deepest}); supported "
                f"values are {reached}"
            )
        return self._finish(plan, evaluation, shapes, levels, changes)

    def _shapes(
        self, source: nn.Module, evaluation: _fx.Trace, plan: BuildPlan
    ) -> dict[fx.Node, Any]:
        graph_module = fx.GraphModule(source, evaluation.graph)
        height, width = self.input_size(plan)
        on_meta = next(iter(source.parameters()), torch.empty(0)).is_meta
        example = torch.empty(1, 3, height, width, device="meta" if on_meta else "cpu")
        try:
            return _fx.propagate_shapes(graph_module, example, fake=not on_meta)
        except Exception as exc:
            raise UnsupportedOptionError(
                f"could not run {plan.label} on a 1x3x{height}x{width} input to find its "
                f"levels ({type(exc).__name__}: {str(exc).strip().splitlines()[0]}); for a "
                "module of your own, pass input_size=(H, W)"
            ) from None

    def _check_stride(self, plan: BuildPlan, levels: list[_fx.NodeLevel]) -> None:
        if plan.output_stride is None or plan.return_nodes is not None:
            return
        reached = max(level.reduction for level in levels)
        if plan.output_stride == reached:
            return
        native = reached if not self.stride_is_native(plan) else 32
        raise UnsupportedOptionError(
            f"output_stride={plan.output_stride} is not supported by {plan.label}: supported "
            f"values are {format_choices(self.supported_strides(plan, native))}"
        )
