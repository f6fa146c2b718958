"""The timm backend: timm's own ``forward_intermediates`` and pruning.

Levels are timm's ``feature_info`` list, unchanged, and the default selection
is what ``timm.create_model(name, features_only=True)`` would return. The
feature model keeps timm's full model (so the source's state-dict keys and
checkpoints fit), prunes what comes after the deepest requested level (head,
trailing blocks) and calls ``forward_intermediates``. For a model without that
method, timm's own ``FeatureListNet`` hooks do the work.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple, cast

import timm
import torch
from timm.models import FeatureListNet
from torch import Tensor, nn

from unifeat._backends._base import Adapter
from unifeat._backends.fx import FxAdapter
from unifeat._checkpoint import load_checkpoint
from unifeat._errors import UnsupportedOptionError, format_choices
from unifeat._feature_info import FeatureInfo
from unifeat._feature_model import FeatureMap, FeatureModel, Features, share_parameters_copy
from unifeat._indices import IndexSpec, normalize_indices
from unifeat._options import BuildPlan

# Errors timm raises when a model does not take an option: an unexpected
# keyword (TypeError), or a bare assert / ValueError in the constructor.
_OPTION_ERRORS = (TypeError, AssertionError, ValueError, NotImplementedError)
_PROBED_STRIDES = (8, 16, 32)


def _has_native_intermediates(model: nn.Module) -> bool:
    return callable(getattr(model, "forward_intermediates", None)) and callable(
        getattr(model, "prune_intermediate_layers", None)
    )


def _build_on_meta(name: str, **kwargs: Any) -> Any:
    """``timm.create_model(name, features_only=True)`` without allocating weights.

    A few constructors compute on tensors (``.item()``), which the meta device
    refuses; those are built on CPU instead, which is slower but correct.
    """
    try:
        with torch.device("meta"):
            return timm.create_model(name, pretrained=False, features_only=True, **kwargs)
    except _OPTION_ERRORS:
        raise
    except Exception:
        return timm.create_model(name, pretrained=False, features_only=True, **kwargs)


def _levels_and_default(features: Any) -> tuple[list[dict[str, Any]], tuple[int, ...]]:
    info = features.feature_info
    levels = [dict(level) for level in info.info]
    return levels, tuple(info.out_indices)


class _Layout(NamedTuple):
    info: FeatureInfo
    timm_kwargs: dict[str, Any]


class TimmAdapter(Adapter):
    name = "timm"

    def has_model(self, name: str) -> bool:
        return name.startswith(("hf-hub:", "local-dir:")) or timm.is_model(name)

    def model_names(self) -> list[str]:
        return list(timm.list_models())

    def describe(self, plan: BuildPlan) -> FeatureInfo:
        if plan.return_nodes is not None:
            return FxAdapter().describe(self._as_module_plan(plan, self.source_on_meta(plan)))
        return self._layout(plan).info

    def source_on_meta(self, plan: BuildPlan) -> nn.Module:
        if plan.module is not None:
            return plan.module
        assert plan.model_name is not None
        with torch.device("meta"):
            return timm.create_model(plan.model_name, pretrained=False, **plan.model_kwargs)

    def _as_module_plan(self, plan: BuildPlan, module: nn.Module) -> BuildPlan:
        """``return_nodes`` on a timm model: FX over timm's model, as for any module."""
        size = (getattr(module, "pretrained_cfg", None) or {}).get("input_size", (3, 224, 224))
        kwargs = {"input_size": tuple(size[-2:])}
        return plan.model_copy(
            update={
                "module": module,
                "model_name": None,
                "checkpoint_path": None,
                "model_kwargs": kwargs,
            }
        )

    def create(self, plan: BuildPlan) -> nn.Module:
        if plan.return_nodes is not None and plan.features_only:
            FxAdapter().describe(self._as_module_plan(plan, self.source_on_meta(plan)))
            source = self.create(
                plan.model_copy(
                    update={"features_only": False, "return_nodes": None, "output_type": None}
                )
            )
            return FxAdapter().create(self._as_module_plan(plan, source))

        # Every check that depends on the model runs first, on the meta device,
        # so that a failing call builds nothing and touches nothing.
        layout = self._layout(plan) if plan.features_only else None
        model: Any
        if plan.module is not None:
            if layout is None:
                self._check_instance_stride(plan)
            model = plan.module
            if plan.checkpoint_path is not None:
                # Loading writes into the tensors, which the caller's module owns.
                model = copy.deepcopy(model)
                load_checkpoint(model, plan.checkpoint_path, context=plan.label)
            elif plan.features_only:
                model = share_parameters_copy(model)
        else:
            assert plan.model_name is not None
            kwargs = layout.timm_kwargs if layout else self._stride_kwargs(plan)[1]
            model = timm.create_model(
                plan.model_name, pretrained=plan.pretrained, **plan.model_kwargs, **kwargs
            )
            if plan.checkpoint_path is not None:
                load_checkpoint(model, plan.checkpoint_path, context=plan.label)
        if layout is None:
            if plan.module is None:
                cast(Any, model).backend = self.name
            return model
        return TimmFeatureModel(
            model,
            feature_info=layout.info,
            output_type=plan.output_type or "list",
            output_fmt=plan.output_fmt,
            return_prefix_tokens=plan.return_prefix_tokens,
            context=plan.label,
        )

    # -- metadata -------------------------------------------------------------

    def _layout(self, plan: BuildPlan) -> _Layout:
        if plan.module is not None:
            if not hasattr(plan.module, "feature_info"):
                raise UnsupportedOptionError(
                    f"{plan.label} has no feature_info, so timm defines no feature levels for it"
                )
            levels = [dict(level) for level in cast(Any, plan.module).feature_info]
            default = self._default_for_instance(plan.module, len(levels))
            self._check_instance_stride(plan)
            kwargs: dict[str, Any] = {}
            runner: nn.Module | None = plan.module
        else:
            assert plan.model_name is not None
            features, kwargs = self._stride_kwargs(plan)
            levels, default = _levels_and_default(features)
            # Token models come wrapped in timm's getter, which keeps the model.
            runner = getattr(features, "model", None)
        if plan.return_prefix_tokens and not _takes_prefix_tokens(runner):
            raise UnsupportedOptionError(
                f"return_prefix_tokens=True needs a token model with prefix tokens, but "
                f"{plan.label} returns plain feature maps"
            )
        indices = normalize_indices(plan.out_indices, len(levels), default, context=plan.label)
        return _Layout(FeatureInfo.from_dicts(levels, indices), kwargs)

    def _stride_kwargs(self, plan: BuildPlan) -> tuple[nn.Module, dict[str, Any]]:
        """Meta-built features for ``plan`` and the timm kwargs that give its stride.

        timm refuses ``output_stride`` on most models, even when it equals the
        native stride, so the native value is honoured by passing nothing.
        """
        assert plan.model_name is not None
        native_features = _build_on_meta(plan.model_name, **plan.model_kwargs)
        levels, _default = _levels_and_default(native_features)
        native = max(level["reduction"] for level in levels)
        wanted = plan.output_stride
        if wanted is None or wanted == native:
            return native_features, {}
        try:
            strided = _build_on_meta(plan.model_name, output_stride=wanted, **plan.model_kwargs)
        except _OPTION_ERRORS as exc:
            raise self._stride_error(plan, native, exc) from None
        reached = max(level["reduction"] for level in _levels_and_default(strided)[0])
        if reached != wanted:
            raise self._stride_error(plan, native, None)
        return strided, {"output_stride": wanted}

    def _stride_error(
        self, plan: BuildPlan, native: int, cause: BaseException | None
    ) -> UnsupportedOptionError:
        assert plan.model_name is not None
        supported = {native}
        for stride in _PROBED_STRIDES:
            try:
                probe = _build_on_meta(plan.model_name, output_stride=stride, **plan.model_kwargs)
            except _OPTION_ERRORS:
                continue
            if max(level["reduction"] for level in _levels_and_default(probe)[0]) == stride:
                supported.add(stride)
        why = f" (timm: {cause})" if cause is not None and str(cause) else ""
        return UnsupportedOptionError(
            f"output_stride={plan.output_stride} is not supported by {plan.label}: "
            f"supported values are {format_choices(sorted(supported))}{why}"
        )

    def _check_instance_stride(self, plan: BuildPlan) -> None:
        if plan.output_stride is None:
            return
        levels = getattr(plan.module, "feature_info", None) or []
        native = max((level["reduction"] for level in levels), default=None)
        if plan.output_stride != native:
            raise UnsupportedOptionError(
                f"output_stride={plan.output_stride} cannot be applied to an already built "
                f"{plan.label}: timm sets dilation at construction, so pass the model name "
                f"(unifeat.create_model('timm:<name>', output_stride=...)); supported here: "
                f"{native if native is not None else 'none'}"
            )

    def _default_for_instance(self, module: nn.Module, num_levels: int) -> IndexSpec:
        """timm's features_only default for this architecture, as "last n" where it is one."""
        cfg = getattr(module, "pretrained_cfg", None) or {}
        arch = cfg.get("architecture") if isinstance(cfg, Mapping) else None
        if not arch or not timm.is_model(arch):
            return None
        try:
            arch_levels, arch_default = _levels_and_default(_build_on_meta(arch))
        except Exception:
            # Only a default is at stake: every level is a safe one.
            return None
        last = len(arch_levels) - 1
        if arch_default == tuple(range(last - len(arch_default) + 1, last + 1)):
            return min(len(arch_default), num_levels)
        return arch_default if len(arch_levels) == num_levels else None


def _takes_prefix_tokens(model: nn.Module | None) -> bool:
    method = getattr(model, "forward_intermediates", None)
    return method is not None and "return_prefix_tokens" in inspect.signature(method).parameters


class TimmFeatureModel(FeatureModel):
    """Feature model over a timm model (see the module docstring)."""

    def __init__(
        self,
        model: nn.Module,
        *,
        feature_info: FeatureInfo,
        output_type: str,
        output_fmt: str,
        return_prefix_tokens: bool,
        context: str,
    ) -> None:
        native = _has_native_intermediates(model)
        source_keys = tuple(nn.Module.state_dict(model).keys())
        last = max(feature_info.out_indices)
        # flatten_sequential=False keeps the source's module names, hence its keys.
        inner = model if native else FeatureListNet(model, tuple(range(last + 1)))
        super().__init__(
            inner,
            feature_info=feature_info,
            backend="timm",
            output_type=output_type,
            output_fmt=output_fmt,
            return_prefix_tokens=return_prefix_tokens,
            context=context,
            source_keys=source_keys,
        )
        self._native = native
        if native:
            cast(Any, model).prune_intermediate_layers(
                list(feature_info.out_indices), prune_head=True
            )
        self._after_prune()

    @property
    def default_input_size(self) -> tuple[int, int, int] | None:
        source = self.model if self._native else None
        size = (getattr(source, "pretrained_cfg", None) or {}).get("input_size")
        return (int(size[0]), int(size[1]), int(size[2])) if size else None

    def _run(
        self, x: Tensor, indices: tuple[int, ...], **kwargs: Any
    ) -> list[FeatureMap] | tuple[Tensor, list[FeatureMap]]:
        inner: Any = self.model
        if not self._native:
            return _run_list_net(inner, x, indices, **kwargs)
        if self.return_prefix_tokens:
            kwargs["return_prefix_tokens"] = True
        return inner.forward_intermediates(x, indices=list(indices), **kwargs)

    def forward(self, x: Tensor) -> Features:
        indices = self.feature_info.out_indices
        maps = cast(list[FeatureMap], self._run(x, indices, intermediates_only=True))
        return self.format_features(maps, indices)

    def forward_intermediates(
        self,
        x: Tensor,
        indices: int | Sequence[int] | None = None,
        intermediates_only: bool = False,
        norm: bool = False,
        output_fmt: str = "NCHW",
    ) -> list[FeatureMap] | tuple[Tensor, list[FeatureMap]]:
        """timm's ``forward_intermediates``, with unifeat's index rules.

        ``indices`` count over all levels (``None`` = this model's
        ``out_indices``) and must not reach past a pruned level. Returns the
        list of maps, or ``(final_features, maps)`` unless ``intermediates_only``.
        """
        chosen = self.resolve_indices(indices)
        result = self._run(x, chosen, intermediates_only=intermediates_only, norm=norm)
        if intermediates_only:
            maps = cast(list[FeatureMap], result)
            return cast(list[FeatureMap], self.format_features(maps, chosen, output_fmt, "list"))
        final, maps = cast(tuple[Tensor, list[FeatureMap]], result)
        return final, cast(list[FeatureMap], self.format_features(maps, chosen, output_fmt, "list"))

    def prune_intermediate_layers(
        self, indices: int | Sequence[int], prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop everything after the deepest of ``indices``; returns them normalized.

        ``forward`` then returns exactly these levels.
        """
        chosen = self.resolve_indices(indices)
        inner: Any = self.model
        if self._native:
            inner.prune_intermediate_layers(
                list(chosen), prune_norm=prune_norm, prune_head=prune_head
            )
        else:
            _truncate_list_net(inner, max(chosen))
        self.feature_info = self.feature_info.from_other(chosen)
        self.last_level = max(chosen)
        self._after_prune()
        return list(chosen)


def _run_list_net(
    net: Any,
    x: Tensor,
    indices: tuple[int, ...],
    *,
    intermediates_only: bool,
    norm: bool = False,
) -> list[FeatureMap] | tuple[Tensor, list[FeatureMap]]:
    if norm:
        raise UnsupportedOptionError(
            "norm=True needs timm's forward_intermediates, which this model does not have"
        )
    maps = net(x)
    chosen: list[FeatureMap] = [maps[i] for i in indices]
    return chosen if intermediates_only else (maps[-1], chosen)


def _truncate_list_net(net: Any, last_level: int) -> None:
    """Drop the hooked modules that run after level ``last_level``."""
    names = list(net.keys())
    last = next(name for name, level in net.return_layers.items() if int(level) == last_level)
    for name in names[names.index(last) + 1 :]:
        del net[name]
        net.return_layers.pop(name, None)
