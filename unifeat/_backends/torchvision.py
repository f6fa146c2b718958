"""The torchvision backend: FX graphs cut at automatically found levels.

Levels come from a meta-device build, trace and shape propagation (see
``unifeat._fx``); the feature model runs the real model's traced graphs,
cut after the deepest requested level.
"""

from __future__ import annotations

import fnmatch
from typing import Any

import torch
import torchvision
from torch import nn

from unifeat._backends.fx import FxAdapter
from unifeat._errors import UnsupportedOptionError, format_choices
from unifeat._feature_model import attach_image_transform
from unifeat._options import BuildPlan

# Where torchvision's automatic level list differs from the canonical one of
# the same architecture in timm, the last modules of a container are part of
# the head, not a level: the 1x1 conv before pooling that timm does not count
# (SPEC §2). By class, so that a model built by name and one passed in agree:
# class name -> (container, how many of its last children).
HEAD_OVERRIDES: dict[str, tuple[str, int]] = {
    "EfficientNet": ("features", 1),  # efficientnet_b0..b7 features.8, v2_s/m/l features.7
    "MobileNetV2": ("features", 1),  # features.18
    "MNASNet": ("layers", 3),  # layers.14-16: conv, norm, activation
}

# Native dilation switches: output_stride -> constructor kwargs.
_BOTTLENECK_RESNETS = ("resnet50", "resnet101", "resnet152", "resnext*", "wide_resnet*")
_NATIVE_DILATION: dict[str, dict[int, dict[str, Any]]] = {
    **{
        pattern: {
            16: {"replace_stride_with_dilation": [False, False, True]},
            8: {"replace_stride_with_dilation": [False, True, True]},
        }
        for pattern in _BOTTLENECK_RESNETS
    },
    "mobilenet_v3_*": {16: {"dilated": True}},
}

# Input sizes the models are made for (ViTs assert it; Inception wants 299).
_INPUT_SIZES = {"inception_v3": 299}


def _matching(table: dict[str, Any], name: str) -> Any:
    return next((value for pattern, value in table.items() if fnmatch.fnmatch(name, pattern)), None)


class TorchvisionAdapter(FxAdapter):
    name = "torchvision"

    def has_model(self, name: str) -> bool:
        return name in self.model_names()

    def model_names(self) -> list[str]:
        return sorted(torchvision.models.list_models(module=torchvision.models))

    def head_modules(self, source: nn.Module) -> tuple[str, ...]:
        override = HEAD_OVERRIDES.get(type(source).__name__)
        if override is None or not type(source).__module__.startswith("torchvision."):
            return ()
        container, count = override
        children = [name for name, _ in source.get_submodule(container).named_children()]
        return tuple(f"{container}.{name}" for name in children[-count:])

    def input_size(self, plan: BuildPlan) -> tuple[int, int]:
        size = plan.model_kwargs.get("image_size") or _INPUT_SIZES.get(plan.model_name or "", 224)
        return (int(size), int(size))

    def constructor_kwargs(self, plan: BuildPlan) -> dict[str, Any]:
        kwargs = dict(plan.model_kwargs)
        if plan.output_stride is None or plan.module is not None:
            return kwargs
        native = _matching(_NATIVE_DILATION, plan.model_name or "") or {}
        if plan.output_stride in native:
            kwargs.update(native[plan.output_stride])
        return kwargs

    def stride_is_native(self, plan: BuildPlan) -> bool:
        native = _matching(_NATIVE_DILATION, plan.model_name or "") or {}
        return plan.output_stride in native

    def supported_strides(self, plan: BuildPlan, native: int) -> list[int]:
        return sorted({native, *(_matching(_NATIVE_DILATION, plan.model_name or "") or {})})

    def create(self, plan: BuildPlan) -> nn.Module:
        model = super().create(plan)
        if plan.pretrained and plan.model_name is not None:
            weights = torchvision.models.get_model_weights(plan.model_name).DEFAULT
            attach_image_transform(model, weights.transforms())
        return model

    def build(self, plan: BuildPlan, *, meta: bool) -> nn.Module:
        assert plan.model_name is not None
        kwargs = self.constructor_kwargs(plan)
        weights = "DEFAULT" if plan.pretrained and not meta else None
        try:
            if meta:
                try:
                    with torch.device("meta"):
                        return torchvision.models.get_model(plan.model_name, **kwargs)
                except (RuntimeError, NotImplementedError):
                    pass  # RegNet's constructor reads tensor values: build on CPU
            return torchvision.models.get_model(plan.model_name, weights=weights, **kwargs)
        except (TypeError, ValueError, NotImplementedError) as exc:
            if plan.output_stride is not None:
                raise UnsupportedOptionError(
                    f"output_stride={plan.output_stride} is not supported by {plan.label}: "
                    f"supported values are "
                    f"{format_choices(self.supported_strides(plan, 32))} (torchvision: {exc})"
                ) from None
            raise
