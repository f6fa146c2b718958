"""The torchvision backend: every classification model by name, levels from FX graphs.

What torchvision knows and the engine cannot guess: model names, how to
build them (RegNet's constructor reads tensor values, so it is built on CPU),
the input size Inception and ViTs are made for, the 1x1 head convs that timm
does not count as a level, and the native dilation switches.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping
from typing import Any

import torch
import torchvision
from torch import nn
from torchvision.models.vision_transformer import VisionTransformer

from unifeat._backends._base import Adapter, refuse_unknown_kwargs, unknown_keyword
from unifeat._engine.classifier import FLATTEN, NHWC_TO_NCHW, HeadRecipe
from unifeat._engine.resize import PositionEmbedding
from unifeat._errors import UnsupportedOptionError, format_choices
from unifeat._options import BuildPlan

# Where torchvision's automatic level list differs from the canonical one of
# the same architecture in timm, the last modules of a container are part of
# the head, not a level: the 1x1 conv before pooling that timm does not count.
# By class, so that a model built by name and one passed in agree:
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

# Input sizes the models are made for (ViTs say theirs; Inception wants 299: its
# auxiliary head's 5x5 conv does not fit the map of a 224 input), by class, so
# that a model built by name and one passed in agree.
_INPUT_SIZES = {"Inception3": 299}


# Classifier heads by class (docs/training.md, "Classifier models"): how the
# model pools its last map, its pre-logits and dropout steps and its classifier,
# as HeadRecipe fields; "features_from" names the module whose in_features is
# num_features where the classifier's input is not the map itself (MobileNetV3).
_MAP_HEADS: dict[str, dict[str, Any]] = {
    "ResNet": dict(pool_module="avgpool", classifier="fc"),
    "RegNet": dict(pool_module="avgpool", classifier="fc"),
    "ConvNeXt": dict(
        pool_module="avgpool",
        pre_logits=("classifier.0", "classifier.1"),
        classifier="classifier.2",
    ),
    "EfficientNet": dict(
        pool_module="avgpool",
        pre_logits=(FLATTEN,),
        drop=("classifier.0",),
        classifier="classifier.1",
    ),
    "MobileNetV2": dict(pre_logits=(FLATTEN,), drop=("classifier.0",), classifier="classifier.1"),
    "MobileNetV3": dict(
        pool_module="avgpool",
        pre_logits=(FLATTEN, "classifier.0", "classifier.1"),
        drop=("classifier.2",),
        classifier="classifier.3",
        features_from="classifier.0",
    ),
    # norm -> permute -> avgpool -> flatten -> head
    "SwinTransformer": dict(
        pool_module="avgpool", pre_pool=(NHWC_TO_NCHW,), pre_logits=(FLATTEN,), classifier="head"
    ),
    # its final ReLU is in the final output; then F.adaptive_avg_pool2d
    "DenseNet": dict(
        pool_function="adaptive_avg_pool2d", pre_logits=(FLATTEN,), classifier="classifier"
    ),
}


def _width(module: nn.Module, attribute: str) -> int:
    return int(getattr(module, attribute))


def _matching(table: dict[str, Any], name: str) -> Any:
    return next((value for pattern, value in table.items() if fnmatch.fnmatch(name, pattern)), None)


class TorchvisionAdapter(Adapter):
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

    def position_embedding(self, source: nn.Module) -> PositionEmbedding | None:
        """A ViT's learned position embedding (class token first), resampled as
        torchvision's own ``interpolate_embeddings`` does: bicubic, corners aligned."""
        if not isinstance(source, VisionTransformer):
            return None
        patch, size = int(source.patch_size), int(source.image_size)
        grid = (size // patch, size // patch)
        return PositionEmbedding("encoder.pos_embedding", patch, grid, 1, True, False)

    def head_recipe(self, plan: BuildPlan, source: nn.Module) -> HeadRecipe | None:
        kind = type(source).__name__
        if not type(source).__module__.startswith("torchvision."):
            return None
        if kind == "VisionTransformer":
            heads: Any = source.get_submodule("heads")
            head = heads.head
            pre: tuple[str, ...] = (
                ("heads.pre_logits", "heads.act") if hasattr(heads, "pre_logits") else ()
            )
            return HeadRecipe(
                "tokens",
                "heads.head",
                num_features=_width(source, "hidden_dim"),
                head_hidden_size=_width(head, "in_features"),
                num_classes=_width(head, "out_features"),
                default_pool="token",
                pre_logits=pre,
            )
        if kind in ("VGG", "AlexNet"):
            raise UnsupportedOptionError(
                f"{plan.label} is a torchvision {kind}: its classifier MLP reads the last "
                "map pooled to 7x7 and flattened (avgpool is AdaptiveAvgPool2d((7, 7))), not "
                "a global pool, so it has no pooled pre-logits features and no classifier "
                "timm's interface could reset; features_only=True gives its features"
            )
        found = _MAP_HEADS.get(kind)
        if found is None:
            return None
        fields = dict(found)
        path = fields.pop("classifier")
        classifier = source.get_submodule(path)
        widest = source.get_submodule(fields.pop("features_from", path))
        return HeadRecipe(
            "map",
            path,
            num_features=_width(widest, "in_features"),
            head_hidden_size=_width(classifier, "in_features"),
            num_classes=_width(classifier, "out_features"),
            **fields,
        )

    def native_input_size(self, plan: BuildPlan, source: nn.Module) -> tuple[int, int, int]:
        size = getattr(source, "image_size", None) or _INPUT_SIZES.get(type(source).__name__, 224)
        return (3, int(size), int(size))

    def native_stride(self, plan: BuildPlan, stride: int) -> dict[str, Any] | None:
        native = _matching(_NATIVE_DILATION, plan.model_name or "") or {}
        return native.get(stride)

    def native_strides(self, plan: BuildPlan) -> list[int]:
        return sorted(_matching(_NATIVE_DILATION, plan.model_name or "") or {})

    def image_transform(self, plan: BuildPlan, source: nn.Module) -> Any:
        if plan.pretrained and plan.model_name is not None:
            return torchvision.models.get_model_weights(plan.model_name).DEFAULT.transforms()
        return None

    def build(
        self, plan: BuildPlan, *, meta: bool, extra_kwargs: Mapping[str, Any] | None = None
    ) -> nn.Module:
        assert plan.model_name is not None
        kwargs = {**plan.model_kwargs, **(extra_kwargs or {})}
        weights = "DEFAULT" if plan.pretrained and not meta else None
        try:
            if meta:
                try:
                    with torch.device("meta"):
                        return torchvision.models.get_model(plan.model_name, **kwargs)
                except (RuntimeError, NotImplementedError):
                    pass  # RegNet's constructor reads tensor values: build on CPU
            return torchvision.models.get_model(plan.model_name, weights=weights, **kwargs)
        except TypeError as exc:
            refuse_unknown_kwargs(exc, plan, lambda: self._accepted(plan))
            fixed = re.search(r"got multiple values for keyword argument '(\w+)'", str(exc))
            if fixed is not None:
                raise UnsupportedOptionError(
                    f"{plan.label} fixes {fixed.group(1)} itself, so {fixed.group(1)}= cannot be "
                    "passed (torchvision names the variant: pick another model name, or build "
                    "torchvision.models.VisionTransformer(...) and pass the module)"
                ) from None
            raise
        except (ValueError, NotImplementedError) as exc:
            if extra_kwargs:
                raise UnsupportedOptionError(
                    f"output_stride={plan.output_stride} is not supported by {plan.label}: "
                    f"supported values are {format_choices(self.native_strides(plan))} "
                    f"(torchvision: {exc})"
                ) from None
            raise UnsupportedOptionError(
                f"torchvision could not build {plan.label} with {dict(plan.model_kwargs)}: {exc}"
            ) from None

    def check_kwargs(self, plan: BuildPlan) -> None:
        # Some classes (MobileNetV3, ConvNeXt, ...) take **kwargs and ignore them:
        # a typo would build the default model. Their builders forward every
        # keyword to the class, so the named parameters of both are the valid ones.
        if plan.module is not None or not plan.model_kwargs:
            return
        if "weights" in plan.model_kwargs:
            raise UnsupportedOptionError(
                f"weights= is chosen by unifeat for {plan.label}: pass pretrained=True for "
                "torchvision's DEFAULT weights, or checkpoint_path= for a file of your own"
            )
        accepted = self._accepted(plan)
        if not accepted:
            return
        for name in plan.model_kwargs:
            if name not in accepted:
                unknown_keyword(name, plan, accepted)

    def _accepted(self, plan: BuildPlan) -> list[str]:
        """The keyword arguments a model's builder and class take."""
        import inspect

        assert plan.model_name is not None
        builder = torchvision.models.get_model_builder(plan.model_name)
        with torch.device("meta"):
            try:
                model = builder()
            except Exception:
                return []
        names = [*inspect.signature(builder).parameters, *inspect.signature(type(model)).parameters]
        return [n for n in dict.fromkeys(names) if n not in ("kwargs", "args", "self")]
