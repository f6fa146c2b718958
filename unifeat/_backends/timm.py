"""The timm backend: timm's own ``forward_intermediates``, pruning and metadata.

Levels are timm's ``feature_info``, unchanged, and the default selection is
what ``timm.create_model(name, features_only=True)`` would return. The feature
model keeps timm's model (so the source's state-dict keys and checkpoints
fit) and lets timm prune what comes after the deepest requested level. A model
without ``forward_intermediates`` runs through timm's own ``FeatureListNet``
hooks. ``return_nodes`` picks FX nodes of timm's model.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import timm
import torch
from timm.models import FeatureListNet
from torch import Tensor, nn

from unifeat._backends._base import Adapter, NativeLevels, built_with_kwargs, refuse_unknown_kwargs
from unifeat._engine.levels import FeatureMap, Level
from unifeat._engine.native import NativeSpec
from unifeat._errors import UnsupportedOptionError
from unifeat._indices import IndexSpec
from unifeat._options import BuildPlan

# Errors timm raises when a model does not take an option: an unexpected
# keyword (TypeError), or a bare assert / ValueError in the constructor.
_OPTION_ERRORS = (TypeError, AssertionError, ValueError, NotImplementedError)
_PROBED_STRIDES = (8, 16, 32)


# -- timm's own forward_intermediates, as the engine's native runner calls it ----------------


def _intermediates(
    model: Any, x: Tensor, indices: list[int], prefix: bool, norm: bool
) -> list[FeatureMap]:
    kwargs = {"return_prefix_tokens": True} if prefix else {}
    return list(
        model.forward_intermediates(
            x, indices=indices, norm=norm, intermediates_only=True, **kwargs
        )
    )


def _final(
    model: Any, x: Tensor, indices: list[int], prefix: bool, norm: bool
) -> tuple[Tensor, list[FeatureMap]]:
    kwargs = {"return_prefix_tokens": True} if prefix else {}
    final, maps = model.forward_intermediates(
        x, indices=indices, norm=norm, intermediates_only=False, **kwargs
    )
    return final, list(maps)


def levels_of(model: Any) -> list[dict[str, Any]]:
    info = model.feature_info
    return [dict(level) for level in getattr(info, "info", info)]


def _prune(model: Any, last_level: int, keep_final: bool) -> None:
    """timm's pruning: with the last level, what ``forward_features`` runs after the
    blocks stays (only the classifier goes); after an earlier level, the norm stays
    only where it fits the level's width (plain ViT-likes)."""
    levels = levels_of(model)
    if keep_final and last_level == len(levels) - 1:
        model.prune_intermediate_layers([last_level], prune_norm=False, prune_head=False)
        model.reset_classifier(0)
        return
    fits = levels[last_level]["num_chs"] == levels[-1]["num_chs"]
    model.prune_intermediate_layers(
        [last_level], prune_norm=not (keep_final and fits), prune_head=True
    )


TIMM = NativeSpec(intermediates=_intermediates, final=_final, prune=_prune)


# Models without forward_intermediates: timm's FeatureListNet hooks, which run
# the model's children in order (so what follows the last level can be cut).


def _list_intermediates(
    net: Any, x: Tensor, indices: list[int], prefix: bool, norm: bool
) -> list[FeatureMap]:
    return _list_final(net, x, indices, prefix, norm)[1]


def _list_final(
    net: Any, x: Tensor, indices: list[int], prefix: bool, norm: bool
) -> tuple[Tensor, list[FeatureMap]]:
    maps = net(x)
    return maps[-1], [maps[i] for i in indices]


def _list_prune(net: Any, last_level: int, keep_final: bool) -> None:
    names = list(net.keys())
    last = next(name for name, level in net.return_layers.items() if int(level) == last_level)
    for name in names[names.index(last) + 1 :]:
        del net[name]
        net.return_layers.pop(name, None)


def _list_net(model: nn.Module, last_level: int) -> nn.Module:
    # flatten_sequential=False keeps the source's module names, hence its keys.
    return FeatureListNet(model, tuple(range(last_level + 1)))


_LEGACY = NativeSpec(
    intermediates=_list_intermediates,
    final=_list_final,
    prune=_list_prune,
    wrap=_list_net,
    norm="it has no forward_intermediates, so timm's hooks return the maps as they are",
)


def spec_of(model: nn.Module) -> NativeSpec:
    """How the engine runs a timm model: its own ``forward_intermediates``, else timm's
    ``FeatureListNet`` hooks (a ``features_only`` model, such as the one inside
    transformers' DETR)."""
    return TIMM if _has_native_intermediates(model) else _LEGACY


def _has_native_intermediates(model: nn.Module) -> bool:
    return callable(getattr(model, "forward_intermediates", None)) and callable(
        getattr(model, "prune_intermediate_layers", None)
    )


def takes_prefix_tokens(model: nn.Module) -> bool:
    method = getattr(model, "forward_intermediates", None)
    return method is not None and "return_prefix_tokens" in inspect.signature(method).parameters


def as_levels(levels: list[dict[str, Any]]) -> list[Level]:
    return [
        Level(
            str(level["module"]),
            int(level["num_chs"]),
            int(level["reduction"]),
            "NCHW",
            where=str(level["module"]),
            extra={k: v for k, v in level.items() if k not in ("num_chs", "reduction", "module")},
        )
        for level in levels
    ]


class TimmAdapter(Adapter):
    name = "timm"

    def has_model(self, name: str) -> bool:
        return name.startswith(("hf-hub:", "local-dir:")) or timm.is_model(name)

    def model_names(self) -> list[str]:
        return list(timm.list_models())

    def build(
        self, plan: BuildPlan, *, meta: bool, extra_kwargs: Mapping[str, Any] | None = None
    ) -> nn.Module:
        assert plan.model_name is not None
        kwargs = {**plan.model_kwargs, **(extra_kwargs or {})}
        pretrained = plan.pretrained and not meta
        try:
            if meta:
                return _on_meta(plan.model_name, **kwargs)
            return timm.create_model(plan.model_name, pretrained=pretrained, **kwargs)
        except TypeError as exc:
            if "output_stride" in kwargs and "output_stride" in str(exc):
                return self._dilated_like_features(plan, kwargs, pretrained)
            refuse_unknown_kwargs(exc, plan, lambda: self._accepted(plan))
            raise

    def _dilated_like_features(
        self, plan: BuildPlan, kwargs: dict[str, Any], pretrained: bool
    ) -> nn.Module:
        """The whole model, dilated as timm's own ``features_only`` build with
        ``output_stride`` is.

        Some classes take ``output_stride`` only in their feature variant
        (MobileNetV3's ``MobileNetV3Features``, also MobileNetV4): the model is
        built undilated and each conv gets the stride, dilation and padding of the
        same conv in timm's dilated feature build, so the levels are timm's and
        the final norm and head stay for ``forward_intermediates``' final output.
        """
        assert plan.model_name is not None
        undilated = {k: v for k, v in kwargs.items() if k != "output_stride"}
        model = timm.create_model(plan.model_name, pretrained=pretrained, **undilated)
        features = _on_meta(plan.model_name, features_only=True, **kwargs)
        convs = dict(model.named_modules())
        for name, conv in features.named_modules():
            if not isinstance(conv, nn.Conv2d):
                continue
            target = convs.get(name)
            if not isinstance(target, nn.Conv2d) or target.kernel_size != conv.kernel_size:
                raise UnsupportedOptionError(
                    f"output_stride={kwargs['output_stride']} is not supported by {plan.label}: "
                    f"timm dilates only its feature variant, whose conv {name!r} has no "
                    "counterpart in the whole model"
                )
            target.stride, target.dilation = conv.stride, conv.dilation
            target.padding = conv.padding
        return model

    def _accepted(self, plan: BuildPlan) -> list[str]:
        """The keyword arguments the model's class takes (timm passes them on)."""
        assert plan.model_name is not None
        try:
            model = _on_meta(plan.model_name)
        except Exception:
            return []
        names = [
            n for n in inspect.signature(type(model)).parameters if n not in ("kwargs", "args")
        ]
        return [*names, "pretrained_cfg", "pretrained_cfg_overlay", "features_only"]

    def fixed_input_size(self, source: nn.Module) -> tuple[int, int, int] | None:
        embed = getattr(source, "patch_embed", None)
        size, patch = getattr(embed, "img_size", None), getattr(embed, "patch_size", None)
        if (
            not getattr(embed, "strict_img_size", False)
            or getattr(source, "dynamic_img_size", False)
            or not isinstance(size, (tuple, list))
            or not isinstance(patch, (tuple, list))
        ):
            return None
        return int(patch[0]), int(size[0]), int(size[1])

    def patch_size(self, source: nn.Module) -> int | None:
        """A ViT built with ``dynamic_img_size`` takes any multiple of its patch size
        (timm resamples its position embeddings); with ``dynamic_img_pad`` any size."""
        embed = getattr(source, "patch_embed", None)
        patch = getattr(embed, "patch_size", None)
        if (
            not getattr(source, "dynamic_img_size", False)
            or getattr(embed, "dynamic_img_pad", False)
            or not isinstance(patch, (tuple, list))
        ):
            return None
        return int(patch[0])

    def native_input_size(self, plan: BuildPlan, source: nn.Module) -> tuple[int, int, int]:
        size = (getattr(source, "pretrained_cfg", None) or {}).get("input_size", (3, 224, 224))
        # pretrained_cfg keeps the pretrained channels and size when in_chans= or
        # img_size= built others; the model was built with what was asked.
        channels = plan.model_kwargs.get("in_chans", size[0])
        if not isinstance(channels, int) or isinstance(channels, bool):
            channels = size[0]
        # A fixed-size patch embedding knows the size the model was built for.
        built = getattr(getattr(source, "patch_embed", None), "img_size", None)
        if isinstance(built, (tuple, list)) and len(built) == 2:
            return int(channels), int(built[0]), int(built[1])
        return int(channels), int(size[1]), int(size[2])

    # -- timm's metadata -------------------------------------------------------------

    def native(self, plan: BuildPlan, extra_kwargs: Mapping[str, Any]) -> NativeLevels | None:
        if plan.module is not None:
            return self._native_instance(plan)
        assert plan.model_name is not None
        features = self.features_on_meta(plan, extra_kwargs)
        levels = [dict(level) for level in features.feature_info.info]
        runner = getattr(features, "model", features)
        tokens = takes_prefix_tokens(runner)
        size = self.native_input_size(plan, runner)
        return NativeLevels(
            TIMM,
            as_levels(levels),
            tokens,
            size,
            default=tuple(features.feature_info.out_indices),
            build_kwargs=_any_size(plan, runner),
        )

    def features_on_meta(self, plan: BuildPlan, extra_kwargs: Mapping[str, Any]) -> Any:
        assert plan.model_name is not None
        kwargs = {**plan.model_kwargs, **extra_kwargs}
        with built_with_kwargs(plan):
            return self._features_on_meta(plan, kwargs, extra_kwargs)

    def _features_on_meta(
        self, plan: BuildPlan, kwargs: dict[str, Any], extra_kwargs: Mapping[str, Any]
    ) -> Any:
        assert plan.model_name is not None
        try:
            return _on_meta(plan.model_name, features_only=True, **kwargs)
        except AssertionError as exc:
            if "out of range" not in str(exc):
                raise
            # timm's default selection (a ViT's last 3 blocks) does not fit a model
            # built shallower (depth=2): every level, as the one policy clips it.
            count = len(getattr(_on_meta(plan.model_name, **kwargs), "feature_info", ()))
            return _on_meta(
                plan.model_name, features_only=True, out_indices=tuple(range(count)), **kwargs
            )
        except TypeError as exc:
            if "output_stride" not in extra_kwargs:
                refuse_unknown_kwargs(exc, plan, lambda: self._accepted(plan))
            raise

    def _native_instance(self, plan: BuildPlan) -> NativeLevels:
        module = plan.module
        assert module is not None
        if not hasattr(module, "feature_info"):
            raise UnsupportedOptionError(
                f"{plan.label} has no feature_info, so timm defines no feature levels for it"
            )
        levels = levels_of(module)
        native = _has_native_intermediates(module)
        return NativeLevels(
            TIMM if native else _LEGACY,
            as_levels(levels),
            native and takes_prefix_tokens(module),
            self.native_input_size(plan, module),
            default=self._default_for_instance(module, len(levels)),
        )

    def _default_for_instance(self, module: nn.Module, num_levels: int) -> IndexSpec:
        """timm's features_only default for this architecture, as "last n" where it is one."""
        cfg = getattr(module, "pretrained_cfg", None) or {}
        arch = cfg.get("architecture") if isinstance(cfg, Mapping) else None
        if not arch or not timm.is_model(arch):
            return None
        try:
            features = _on_meta(arch, features_only=True)
        except Exception:
            # Only a default is at stake: the policy's is a safe one.
            return None
        arch_default = tuple(features.feature_info.out_indices)
        last = len(features.feature_info.info) - 1
        if arch_default == tuple(range(last - len(arch_default) + 1, last + 1)):
            return min(len(arch_default), num_levels)
        return arch_default if len(features.feature_info.info) == num_levels else None

    # -- output_stride: timm's own switch -----------------------------------------------

    def native_stride(self, plan: BuildPlan, stride: int) -> dict[str, Any] | None:
        if plan.module is not None:
            native = max(level["reduction"] for level in levels_of(plan.module))
            raise UnsupportedOptionError(
                f"output_stride={stride} cannot be applied to an already built "
                f"{plan.label}: timm sets dilation at construction, so pass the model name "
                f"(unifeat.create_model('timm:<name>', output_stride=...)); supported here: "
                f"{native}"
            )
        try:
            self.features_on_meta(plan, {"output_stride": stride})
        except _OPTION_ERRORS:
            return None
        return {"output_stride": stride}

    def native_strides(self, plan: BuildPlan) -> list[int]:
        if plan.module is not None:
            return []
        return [s for s in _PROBED_STRIDES if self._reaches(plan, s)]

    def _reaches(self, plan: BuildPlan, stride: int) -> bool:
        try:
            features = self.features_on_meta(plan, {"output_stride": stride})
        except _OPTION_ERRORS:
            return False
        return max(level["reduction"] for level in features.feature_info.info) == stride


def _any_size(plan: BuildPlan, model: nn.Module) -> dict[str, Any]:
    """``dynamic_img_size=True`` for a feature model of a class that takes it (ViT,
    Eva, ...), unless the caller chose: timm then resamples the position embeddings
    to each input's grid (bicubic, antialiased) and leaves them as they are at the
    built size, so any multiple of the patch size runs."""
    takes = "dynamic_img_size" in inspect.signature(type(model)).parameters
    if not plan.features_only or not takes or "dynamic_img_size" in plan.model_kwargs:
        return {}
    return {"dynamic_img_size": True}


def _on_meta(name: str, **kwargs: Any) -> Any:
    """``timm.create_model`` without allocating weights.

    A few constructors compute on tensors (``.item()``), which the meta device
    refuses; those are built on CPU instead, which is slower but correct.
    """
    try:
        with torch.device("meta"):
            return timm.create_model(name, pretrained=False, **kwargs)
    except _OPTION_ERRORS:
        raise
    except Exception:
        return timm.create_model(name, pretrained=False, **kwargs)
