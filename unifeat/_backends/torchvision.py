"""The torchvision backend: classification, detection and segmentation models by
name, levels from FX graphs.

What torchvision knows and the engine cannot guess: model names, how to
build them (RegNet's constructor reads tensor values, so it is built on CPU),
the input size Inception and ViTs are made for, the 1x1 head convs that timm
does not count as a level, the native dilation switches, and for detection and
segmentation models: which part is the backbone, which of its modules are neck
(an FPN, SSD's extra layers), the model their weights load into, and the
classification architecture of a dilated segmentation backbone
(docs/backends/torchvision.md, "Detection and segmentation models").
"""

from __future__ import annotations

import fnmatch
import functools
import inspect
import re
from collections.abc import Mapping
from typing import Any

import torch
import torchvision
from torch import Tensor, nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.detection.ssd import SSDFeatureExtractorVGG
from torchvision.models.detection.ssdlite import SSDLiteFeatureExtractorMobileNet
from torchvision.models.vision_transformer import VisionTransformer
from torchvision.ops import FeaturePyramidNetwork, FrozenBatchNorm2d

from unifeat._backends._base import Adapter, refuse_unknown_kwargs, unknown_keyword
from unifeat._data import DataConfig
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

# Keywords a builder passes to a config function rather than to the class (MobileNetV3's
# _mobilenet_v3_conf), by class.
_CONFIG_KEYWORDS: dict[str, tuple[str, ...]] = {"MobileNetV3": ("reduced_tail", "dilated")}

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


# -- detection and segmentation models ------------------------------------------------

_TASK_MODULES = {
    "detection": torchvision.models.detection,
    "segmentation": torchvision.models.segmentation,
}
# torchvision's detection builders take BatchNorm2d for the backbone's body when no
# weights are loaded, FrozenBatchNorm2d when they are (their ``is_trained``), and
# reset its eps to 0.0 after loading COCO_V1 weights (``overwrite_eps``). unifeat
# builds the model the DEFAULT weights load into, loaded or not, so that their
# checkpoints (no ``num_batches_tracked``) load and compute as torchvision's does:
# name -> the eps of the body's FrozenBatchNorm2d with those weights.
_FROZEN_BODY_NORM_EPS: dict[str, float] = {
    "fasterrcnn_resnet50_fpn": 0.0,
    "maskrcnn_resnet50_fpn": 0.0,
    "keypointrcnn_resnet50_fpn": 0.0,
    "retinanet_resnet50_fpn": 0.0,
    "fcos_resnet50_fpn": 1e-5,
    "fasterrcnn_mobilenet_v3_large_fpn": 1e-5,
    "fasterrcnn_mobilenet_v3_large_320_fpn": 1e-5,
}
# The shorter side torchvision's segmentation weights resize images to.
_SEGMENTATION_SIZE = 520
# Builder keywords unifeat sets itself: the whole model's weights come from
# pretrained=True or checkpoint_path=, never a backbone download.
_WEIGHT_KEYWORDS = ("weights_backbone", "pretrained_backbone", "pretrained")


@functools.cache
def _task_names() -> dict[str, str]:
    """Detection and segmentation model names -> ``"detection"``/``"segmentation"``."""
    return {
        name: task
        for task, module in _TASK_MODULES.items()
        for name in torchvision.models.list_models(module=module)
    }


def _task_of(module: nn.Module) -> str | None:
    """``"detection"`` or ``"segmentation"`` for a torchvision task model's class."""
    origin = type(module).__module__
    for task in _TASK_MODULES:
        if origin.startswith(f"torchvision.models.{task}.") and isinstance(
            getattr(module, "backbone", None), nn.Module
        ):
            return task
    return None


class TaskBackbone(nn.Module):
    """A torchvision detection or segmentation model as unifeat reads it: the model's
    own children under their own names (so its state-dict keys are the model's and
    its checkpoints load), run as its ``backbone`` alone, on images already
    normalized (a detection model's ``transform`` resizes and normalizes inside).

    The levels are its backbone's body; the FPN's outputs and SSD's extra maps are
    nodes of its graph, for ``return_nodes`` (docs/backends/torchvision.md,
    "Detection and segmentation models").
    """

    task_model: nn.Module
    backbone: nn.Module

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        for name, child in model.named_children():
            self.add_module(name, child)
        # Not registered: its children are this module's own, and it is what
        # features_only=False returns.
        self.__dict__["task_model"] = model

    def forward(self, x: Tensor) -> Any:
        return self.backbone(x)


def _as_with_weights(model: nn.Module, name: str) -> None:
    """Give a detection model built without weights the norm layers its DEFAULT
    weights are loaded into (see ``_FROZEN_BODY_NORM_EPS``)."""
    eps = _FROZEN_BODY_NORM_EPS.get(name)
    if eps is None:
        return
    body = model.get_submodule("backbone.body")
    for path, norm in list(body.named_modules()):
        if type(norm) is not nn.BatchNorm2d:
            continue
        frozen = FrozenBatchNorm2d(norm.num_features, eps=eps)
        with torch.no_grad():
            for field_ in ("weight", "bias", "running_mean", "running_var"):
                getattr(frozen, field_).copy_(getattr(norm, field_))
        parent, _, child = path.rpartition(".")
        setattr(body.get_submodule(parent), child, frozen)


def _task_kwargs(model_name: str, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Builder keywords for a detection or segmentation model: no backbone weights to
    download, and the auxiliary classifier the DEFAULT weights have."""
    result = {**kwargs, "weights_backbone": None}
    builder = torchvision.models.get_model_builder(model_name)
    if "aux_loss" in inspect.signature(builder).parameters:
        result.setdefault("aux_loss", True)
    return result


def _input_size_of(source: TaskBackbone) -> tuple[int, int]:
    """The size a task model works at: SSD's fixed size, the shorter side an R-CNN,
    RetinaNet or FCOS resizes images to, else the segmentation weights'."""
    transform = getattr(source, "transform", None)
    fixed = getattr(transform, "fixed_size", None)
    if fixed:
        return int(fixed[0]), int(fixed[1])
    shorter = getattr(transform, "min_size", None)
    if shorter:
        return int(shorter[-1]), int(shorter[-1])
    return _SEGMENTATION_SIZE, _SEGMENTATION_SIZE


def _task_data_config(source: TaskBackbone, model_name: str | None) -> DataConfig | None:
    """The preprocessing a task model's backbone expects. A detection model resizes
    and normalizes inside its own ``transform``, which the feature model skips (its
    weights' ``transforms()`` only scale to [0, 1]): its mean and std are the
    transform's (SSD300 takes 0-255 pixels, SSDlite [-1, 1]), its size the one it
    resizes to (SSD's exactly, squashed; the R-CNNs' shorter side, kept here as a
    square center crop). A segmentation model's are its weights' transforms'."""
    transform = getattr(source, "transform", None)
    height, width = _input_size_of(source)
    if transform is not None:
        fixed = getattr(transform, "fixed_size", None)
        return DataConfig(
            input_size=(3, height, width),
            mean=tuple(float(v) for v in transform.image_mean),
            std=tuple(float(v) for v in transform.image_std),
            interpolation="bilinear",
            crop_pct=1.0,
            crop_mode="squash" if fixed else "center",
            source=(
                f"torchvision {type(transform).__name__} of the detection model"
                + ("" if fixed else f" (its shorter side to {height}, here center-cropped)")
            ),
        )
    if model_name is None:
        return None
    preset = torchvision.models.get_model_weights(model_name).DEFAULT.transforms()
    return DataConfig(
        input_size=(3, height, width),
        mean=tuple(float(v) for v in preset.mean),
        std=tuple(float(v) for v in preset.std),
        interpolation="bilinear",
        crop_pct=1.0,
        source=(
            f"torchvision weights transforms ({type(preset).__name__}: the shorter side "
            f"to {height}, here center-cropped)"
        ),
    )


def _backbone_of(source: nn.Module) -> tuple[str, nn.Module] | None:
    """A detection backbone in ``source`` and its path prefix: a task model's, or the
    backbone itself passed in (a ``BackboneWithFPN``, an SSD feature extractor)."""
    if isinstance(source, TaskBackbone):
        return "backbone.", source.get_submodule("backbone")
    if type(source).__module__.startswith("torchvision.models.detection."):
        return "", source
    return None


def _neck(source: nn.Module) -> tuple[str, ...]:
    """The modules of a detection backbone that follow the classification trunk:
    its FPN, SSD's extra layers (SSD300's first extra block is VGG's own conv5 with
    fc6 and fc7 as convolutions, the trunk's last stage)."""
    found = _backbone_of(source)
    if found is None:
        return ()
    prefix, backbone = found
    if isinstance(getattr(backbone, "fpn", None), nn.Module):
        return (f"{prefix}fpn",)
    if isinstance(backbone, SSDFeatureExtractorVGG):
        extra: Any = backbone.extra
        return tuple(f"{prefix}extra.{i}" for i in range(1, len(extra)))
    if isinstance(backbone, SSDLiteFeatureExtractorMobileNet):
        return (f"{prefix}extra",)
    return ()


def _parameter_shapes(module: nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    return [(key, tuple(value.shape)) for key, value in module.state_dict().items()]


def _trunk_name(source: TaskBackbone, model_name: str | None) -> str | None:
    """The classification model a segmentation model's backbone is: from its name
    (``deeplabv3_resnet50`` -> ``resnet50``), or for a model passed in, the
    torchvision segmentation model whose backbone has its parameters."""
    if model_name is not None:
        return model_name.partition("_")[2]
    wanted = _parameter_shapes(source.get_submodule("backbone"))
    for name, task in _task_names().items():
        if task != "segmentation":
            continue
        with torch.device("meta"):
            candidate = torchvision.models.get_model(name, **_task_kwargs(name, {}))
        if _parameter_shapes(candidate.backbone) == wanted:
            return name.partition("_")[2]
    return None


def _width(module: nn.Module, attribute: str) -> int:
    return int(getattr(module, attribute))


def _matching(table: dict[str, Any], name: str) -> Any:
    return next((value for pattern, value in table.items() if fnmatch.fnmatch(name, pattern)), None)


class TorchvisionAdapter(Adapter):
    name = "torchvision"

    def has_model(self, name: str) -> bool:
        return name in self.model_names()

    def model_names(self) -> list[str]:
        classification = torchvision.models.list_models(module=torchvision.models)
        return sorted([*classification, *_task_names()])

    def as_source(self, module: nn.Module) -> nn.Module:
        """A detection or segmentation model is read as its backbone (``TaskBackbone``)."""
        return TaskBackbone(module) if _task_of(module) is not None else module

    def whole_model(self, plan: BuildPlan, source: nn.Module) -> nn.Module:
        """The library's own model; for a detection or segmentation model, the model
        itself, not the view unifeat reads it through."""
        if isinstance(source, TaskBackbone):
            source = source.task_model
        return super().whole_model(plan, source)

    def create(self, plan: BuildPlan) -> nn.Module:
        """A detection or segmentation model with ``features_only=False`` is
        torchvision's own: ``num_classes=`` is its builder's (the classes of its
        heads), and it takes no ``global_pool=`` or ``output_stride=``."""
        if not plan.features_only and self._task(plan) is not None:
            if plan.global_pool is not None or plan.output_stride is not None:
                given = "global_pool=" if plan.global_pool is not None else "output_stride="
                raise UnsupportedOptionError(
                    f"{given} does not apply to {plan.label} with features_only=False: "
                    "torchvision's detection and segmentation models are built as torchvision "
                    "builds them (features_only=True gives the backbone's levels, which "
                    "take output_stride=)"
                )
            if plan.num_classes is not None and plan.module is None:
                kwargs = {**plan.model_kwargs, "num_classes": plan.num_classes}
                plan = plan.model_copy(update={"model_kwargs": kwargs, "num_classes": None})
        return super().create(plan)

    def _task(self, plan: BuildPlan) -> str | None:
        if plan.module is not None:
            return _task_of(plan.module)
        return _task_names().get(plan.model_name or "")

    def tracer_options(self, plan: BuildPlan, source: nn.Module) -> dict[str, Any] | None:
        """An FPN is traced into, so that each of its outputs is a node of its own
        (torchvision's tracer keeps ``torchvision.ops`` modules whole)."""
        options = super().tracer_options(plan, source)
        found = _backbone_of(source)
        if found is not None and isinstance(getattr(found[1], "fpn", None), FeaturePyramidNetwork):
            return {**(options or {}), "trace_through": [FeaturePyramidNetwork]}
        return options

    def level_twin(self, plan: BuildPlan, source: nn.Module) -> nn.Module | None:
        """A segmentation model's backbone over its classification model undilated,
        with the same module names (torchvision builds the backbones of DeepLabV3 and
        FCN ResNets, DeepLabV3 and LR-ASPP MobileNetV3 dilated)."""
        if not isinstance(source, TaskBackbone) or _task_of(source.task_model) != "segmentation":
            return None
        body = source.get_submodule("backbone")
        name = _trunk_name(source, plan.model_name)
        if not isinstance(body, IntermediateLayerGetter) or name not in self.model_names():
            return None
        with torch.device("meta"):
            trunk = torchvision.models.get_model(name)
        first = next(iter(body.keys()))
        container = (
            trunk if first in dict(trunk.named_children()) else trunk.get_submodule("features")
        )
        holder = nn.Module()
        holder.backbone = IntermediateLayerGetter(container, dict(body.return_layers))
        return TaskBackbone(holder)

    def head_modules(self, source: nn.Module) -> tuple[str, ...]:
        neck = _neck(source)
        if neck:
            return neck
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
        if isinstance(source, TaskBackbone):
            return (3, *_input_size_of(source))
        size = getattr(source, "image_size", None) or _INPUT_SIZES.get(type(source).__name__, 224)
        return (3, int(size), int(size))

    def native_stride(self, plan: BuildPlan, stride: int) -> dict[str, Any] | None:
        if self._task(plan) == "segmentation":
            raise UnsupportedOptionError(
                f"output_stride={stride} is not supported by {plan.label}: torchvision builds "
                "its backbone dilated to the stride its weights were trained at, which its "
                "levels end at (unifeat.feature_info gives it); leave output_stride out"
            )
        native = _matching(_NATIVE_DILATION, plan.model_name or "") or {}
        return native.get(stride)

    def native_strides(self, plan: BuildPlan) -> list[int]:
        return sorted(_matching(_NATIVE_DILATION, plan.model_name or "") or {})

    def image_transform(self, plan: BuildPlan, source: nn.Module) -> Any:
        if isinstance(source, TaskBackbone):
            return _task_data_config(source, plan.model_name)
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
                        return self._made(plan, None, kwargs)
                except (RuntimeError, NotImplementedError):
                    pass  # RegNet's constructor reads tensor values: build on CPU
            return self._made(plan, weights, kwargs)
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

    def _made(self, plan: BuildPlan, weights: str | None, kwargs: dict[str, Any]) -> nn.Module:
        """torchvision's model; a detection or segmentation model as its DEFAULT
        weights have it (loaded or not), read as its backbone."""
        assert plan.model_name is not None
        if plan.model_name not in _task_names():
            return torchvision.models.get_model(plan.model_name, weights=weights, **kwargs)
        model = torchvision.models.get_model(
            plan.model_name, weights=weights, **_task_kwargs(plan.model_name, kwargs)
        )
        if weights is None:
            _as_with_weights(model, plan.model_name)
        if plan.features_only:
            # torchvision's builders freeze early stages when they load weights
            # (trainable_backbone_layers); a feature model freezes with frozen_levels=.
            model.requires_grad_(True)
        return TaskBackbone(model)

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
        if self._task(plan) is not None:
            self._check_task_kwargs(plan)
        accepted = self._accepted(plan)
        if not accepted:
            return
        for name in plan.model_kwargs:
            if name not in accepted:
                unknown_keyword(name, plan, accepted)

    def _check_task_kwargs(self, plan: BuildPlan) -> None:
        given = [key for key in _WEIGHT_KEYWORDS if key in plan.model_kwargs]
        if given:
            raise UnsupportedOptionError(
                f"{given[0]}= is chosen by unifeat for {plan.label}: it builds the whole model "
                "with no backbone weights to download; pass pretrained=True for torchvision's "
                "DEFAULT weights of the whole model, or checkpoint_path= for a file of your own "
                "(an ImageNet backbone alone is the classification model, such as tv:resnet50)"
            )
        if plan.features_only and "trainable_backbone_layers" in plan.model_kwargs:
            layers = plan.model_kwargs["trainable_backbone_layers"]
            raise UnsupportedOptionError(
                f"trainable_backbone_layers={layers!r} freezes the first stages of the "
                f"detection model {plan.label} as torchvision trains it; a feature model "
                "freezes with frozen_levels=k (everything levels 0..k depend on: "
                "trainable_backbone_layers=3 of a ResNet is frozen_levels=1), or pass "
                "features_only=False for torchvision's own model"
            )

    def _accepted(self, plan: BuildPlan) -> list[str]:
        """The keyword arguments a model's builder and class take. A segmentation
        builder ignores keywords it does not name, and passes none to its class; a
        detection builder passes the rest to its class, past the backbone it makes."""
        assert plan.model_name is not None
        builder = torchvision.models.get_model_builder(plan.model_name)
        task = _task_names().get(plan.model_name)
        with torch.device("meta"):
            try:
                model = builder(**({"weights_backbone": None} if task else {}))
            except Exception:
                return []
        names = list(inspect.signature(builder).parameters)
        names += _CONFIG_KEYWORDS.get(type(model).__name__, ())
        if task != "segmentation":
            names += inspect.signature(type(model)).parameters
        fixed: tuple[str, ...] = ("kwargs", "args", "self", "weights", "backbone")
        fixed += _WEIGHT_KEYWORDS if task else ()
        return [n for n in dict.fromkeys(names) if n not in fixed]
