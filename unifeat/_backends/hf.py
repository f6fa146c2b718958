"""The transformers backend: any vision model's blocks as a timm-style feature backbone.

What transformers knows and the engine cannot guess: names (model types, hub
ids, local directories), configs (and which keyword arguments they take), the
base model or vision tower to run (``pixel_values`` in, hidden states out),
and per-model-type calling conventions — keyword arguments forced on blocks,
where in a block's output the level is. Levels are found by the engine's hook
finder on the model's block list (see the docs page "The transformers
backend"); transformers models do not trace with FX, so their node names are
module paths.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import inspect
import json
import os
from collections.abc import Mapping
from typing import Any, cast

import torch
from torch import Tensor, nn
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel
from transformers.backbone_utils import BackboneMixin
from transformers.models.auto import modeling_auto
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_BACKBONE_MAPPING, MODEL_MAPPING

from unifeat._backends._base import Adapter, NativeLevels, unknown_keyword
from unifeat._engine.classifier import FLATTEN, TOKEN_AVG, HeadRecipe
from unifeat._engine.hooks import CallingConvention, Where
from unifeat._engine.native import at
from unifeat._errors import (
    BackendUnavailableError,
    CheckpointError,
    UnifeatError,
    UnknownModelError,
    UnsupportedOptionError,
    format_choices,
)
from unifeat._options import BuildPlan

# The model types the test suite checks, level by level, against the models'
# own hidden states or backbones (``list_models(backend="hf")``). Other vision
# types are accepted and work where their layout is one of the engine's.
TESTED_MODEL_TYPES = (
    "beit",
    "bit",
    "clip_vision_model",
    "convnext",
    "convnextv2",
    "data2vec-vision",
    "deit",
    "dinov2",
    "dinov2_with_registers",
    "dinov3_vit",
    "efficientnet",
    "focalnet",
    "hiera",
    "ijepa",
    "levit",
    "lw_detr_vit",
    "maskformer-swin",
    "metaclip_2",
    "poolformer",
    "pp_lcnet",
    "pvt",
    "pvt_v2",
    "regnet",
    "resnet",
    "rf_detr_dinov2",
    "siglip2",
    "siglip_vision_model",
    "swin",
    "swinv2",
    "timm_wrapper",
    "vit",
    "vit_msn",
    "vitdet",
)
# Detection, segmentation and dense-prediction types whose backbone the test suite
# checks against the backbone type built directly and the model's own backbone
# outputs (docs/backends/hf.md, "Detection and segmentation models").
TESTED_TASK_TYPES = ("depth_anything", "detr", "dpt", "mask2former", "upernet")
# Task models' auto mappings, in the order a type's model class is looked up where it
# has no base model (UperNet, Depth Anything, ViTPose): the tasks of vision backbones.
_TASK_MAPPINGS = (
    "MODEL_FOR_SEMANTIC_SEGMENTATION_MAPPING",
    "MODEL_FOR_UNIVERSAL_SEGMENTATION_MAPPING",
    "MODEL_FOR_INSTANCE_SEGMENTATION_MAPPING",
    "MODEL_FOR_OBJECT_DETECTION_MAPPING",
    "MODEL_FOR_DEPTH_ESTIMATION_MAPPING",
    "MODEL_FOR_NORMAL_ESTIMATION_MAPPING",
    "MODEL_FOR_POSE_ESTIMATION_MAPPING",
    "MODEL_FOR_KEYPOINT_DETECTION_MAPPING",
    "MODEL_FOR_IMAGE_MATTING_MAPPING",
    "MODEL_FOR_IMAGE_SEGMENTATION_MAPPING",
    "MODEL_FOR_TABLE_RECOGNITION_MAPPING",
    "MODEL_FOR_TEXT_RECOGNITION_MAPPING",
)
# Composite (image-text) types whose vision tower is used.
_VISION_TOWERS = {"clip": "clip_vision_model", "siglip": "siglip_vision_model"}

# Stages that end by downsampling (Swin) also return their map before it, which
# is timm's stage output and the level. Per model type: keyword arguments forced
# on each block call, and where the level is in a block's tuple output.
_BLOCK_KWARGS: dict[str, dict[str, Any]] = {
    "swin": {"output_hidden_states_before_downsampling": True},
}
_BLOCK_OUTPUT: dict[str, Where] = {
    "swin": ((1,), None),
    "swinv2": ((1,), (2,)),  # (tokens, before downsampling, (h, w, ...))
    "donut-swin": ((1,), (2,)),
    "pvt_v2": ((0, 0), (1, 2)),  # ((tokens,), h, w)
    "focalnet": ((1,), None),  # (tokens, before downsampling, dims after it)
}
# Models whose own outputs lay a stage's tokens out as its map (last_hidden_state
# included), so the final output is the deepest level's map, as in timm.
_FINAL_AS_LEVEL = {"pvt_v2"}
# Block attributes to drop on the deepest kept block: work after its level.
_BLOCK_TAIL: dict[str, tuple[str, ...]] = {
    "swin": ("downsample",),
    "swinv2": ("downsample",),
    "donut-swin": ("downsample",),
    "focalnet": ("downsample",),
}


def _hiera_map(trunk: nn.Module, tokens: Tensor, stage: int, size: tuple[int, int]) -> Tensor:
    """Hiera keeps its tokens in unrolled mask-unit order; its own ``reroll`` puts
    them back in spatial order ([N, H, W, C] at the configured image size)."""
    encoder: Any = trunk.get_submodule("encoder")
    return encoder.reroll(tokens, stage_idx=stage).permute(0, 3, 1, 2)


def _rf_detr_map(trunk: nn.Module, tokens: Tensor, block: int, size: tuple[int, int]) -> Tensor:
    """RF-DETR's DINOv2 runs on windows, a class token each: the model's own
    ``window_unpartition`` and grid layout, as its backbone makes its maps."""
    model: Any = trunk
    rows, cols = (side // int(model.config.patch_size) for side in size)
    windows = model.window_unpartition(tokens[:, 1:], *size)
    return windows.reshape(windows.shape[0], rows, cols, -1).permute(0, 3, 1, 2)


def _lw_detr_map(trunk: nn.Module, tokens: Tensor, block: int, size: tuple[int, int]) -> Tensor:
    """LW-DETR's ViT runs on ``n x n`` windows without class tokens; the layout its
    backbone undoes to make its maps."""
    config: Any = getattr(trunk, "config", None)
    side = int(config.num_windows_side)
    rows, cols = (length // int(config.patch_size) for length in size)
    batch = tokens.shape[0] // side**2
    grid = tokens.reshape(batch, side, side, rows // side, cols // side, tokens.shape[-1])
    return grid.permute(0, 5, 1, 3, 2, 4).reshape(batch, tokens.shape[-1], rows, cols)


def _siglip2_inputs(x: Tensor, patch: int) -> dict[str, Any]:
    """SigLIP 2 (NaFlex) takes patches, not pixels: an image's patches in row-major
    order, all valid, with the grid's shape."""
    batch, channels, height, width = x.shape
    rows, cols = height // patch, width // patch
    patches = x.reshape(batch, channels, rows, patch, cols, patch).permute(0, 2, 4, 3, 5, 1)
    # Every patch is valid, which no mask says best (a mask of ones is read back as
    # Python values, impossible on the meta device); the shapes are read back too.
    return {
        "pixel_values": patches.reshape(batch, rows * cols, patch * patch * channels),
        "pixel_attention_mask": None,
        "spatial_shapes": torch.tensor([[rows, cols]] * batch),
    }


_RESHAPE: dict[str, Any] = {
    "hiera": _hiera_map,
    "rf_detr_dinov2": _rf_detr_map,
    "lw_detr_vit": _lw_detr_map,
}
# Model types whose classification head the classifier model knows (head_recipe).
# Classifier heads by model type (docs/training.md, "Classifier models"): the family
# of *ForImageClassification's head, read by ``HfAdapter.head_recipe``.
_HEADS = {
    "resnet": "map",  # pooler (AdaptiveAvgPool2d), Flatten, Linear
    "regnet": "map",
    "bit": "map",
    "convnext": "map",  # mean, layernorm, Linear
    "convnextv2": "map",
    "vit": "token",  # class token, Linear (the base model's pooler is not used)
    "deit": "token",
    "beit": "beit",  # mean of patch tokens, pooler.layernorm, Linear (or class token)
    "data2vec-vision": "beit",
    "dinov2": "dinov2",  # concat(class token, mean of patch tokens), Linear
    "dinov2_with_registers": "dinov2",
    "swin": "swin",  # layernorm'd tokens, pooler (AdaptiveAvgPool1d), Linear
    "swinv2": "swin",
}
_PREPARE: dict[str, Any] = {"siglip2_vision_model": _siglip2_inputs}
# transformers models that wrap a timm model: its own forward_intermediates serve.
_TIMM_INSIDE = {"timm_wrapper": "timm_model", "timm_backbone": "_backbone"}
# Keyword arguments every config takes besides its own fields.
_COMMON_CONFIG_KWARGS = ("num_labels", "attn_implementation", "output_attentions")


def _vision_types() -> list[str]:
    return sorted(set(TESTED_MODEL_TYPES) | set(TESTED_TASK_TYPES) | set(_VISION_TOWERS))


def _is_location(name: str) -> bool:
    """A local directory or a hub id (``org/repo``), as opposed to a model type."""
    return os.path.isdir(name) or "/" in name or "\\" in name


def _is_path(name: str) -> bool:
    """Spelled as a filesystem path rather than a hub id (``org/repo``)."""
    return name.startswith(("/", "./", "../", "~", "\\")) or os.path.isabs(name)


# -- building the source model ---------------------------------------------------------


def _vision_config(config: PretrainedConfig) -> PretrainedConfig:
    """The vision part of an image-text config (CLIP, SigLIP), else the config itself."""
    vision = getattr(config, "vision_config", None)
    return vision if isinstance(vision, PretrainedConfig) else config


def _model_class(config: PretrainedConfig, label: str) -> type[PreTrainedModel]:
    """The base model of ``config``; its ``*Backbone`` where it has only that (RT-DETR's
    ResNet, ViTPose's ViT); else its task model (UperNet, Depth Anything, whose
    backbone is read). Refused where that class takes no ``pixel_values``."""
    for mapping in (MODEL_MAPPING, MODEL_FOR_BACKBONE_MAPPING):
        if type(config) in mapping:
            return _taking_pixels(mapping[type(config)], config, label)
    tasks = [getattr(modeling_auto, name, {}) for name in _TASK_MAPPINGS]
    found = [mapping[type(config)] for mapping in tasks if type(config) in mapping]
    for model_class in found:
        if _takes_pixels(model_class):
            return cast(type[PreTrainedModel], model_class)
    if found:
        return _taking_pixels(found[0], config, label)
    # A vision config without an auto mapping of its own (MetaCLIP 2's): its model
    # class is named after it.
    import transformers

    name = type(config).__name__
    named = getattr(transformers, name.replace("Config", "Model"), None)
    if name.endswith("VisionConfig") and isinstance(named, type):
        return _taking_pixels(named, config, label)
    raise UnsupportedOptionError(
        f"{label}: transformers has no base model or backbone for config "
        f"{type(config).__name__} (model type {config.model_type!r}); vision model types "
        f"include {format_choices(_vision_types())}"
    )


def _takes_pixels(model_class: Any) -> bool:
    try:
        return "pixel_values" in inspect.signature(model_class.forward).parameters
    except (TypeError, ValueError):
        return False


def _without_backbone_download(config: PretrainedConfig) -> PretrainedConfig:
    """``config`` with no backbone that downloads its own weights while the model is
    built (DETR's timm backbone with ``use_pretrained_backbone``): random init means
    random, and pretrained weights come with the whole model's checkpoint."""
    backbone = getattr(config, "backbone_config", None)
    parts = [config, backbone] if isinstance(backbone, PretrainedConfig) else [config]
    if not any(getattr(part, "use_pretrained_backbone", False) for part in parts):
        return config
    config = copy.deepcopy(config)
    backbone = getattr(config, "backbone_config", None)
    for part in (config, backbone):
        if part is not None and getattr(part, "use_pretrained_backbone", False):
            part.use_pretrained_backbone = False
    return config


def _taking_pixels(model_class: Any, config: PretrainedConfig, label: str) -> type[PreTrainedModel]:
    """``model_class``, where its ``forward`` takes images as ``pixel_values``; what a
    model takes is its forward's to say (a config's ``num_channels`` is not: TextNet
    and PP-LCNet V3 configs have none)."""
    try:
        parameters = [p for p in inspect.signature(model_class.forward).parameters if p != "self"]
    except (TypeError, ValueError):
        parameters = []
    if "pixel_values" in parameters:
        return cast(type[PreTrainedModel], model_class)
    takes = parameters[0] if parameters else "no input it names"
    raise UnsupportedOptionError(
        f"{label}: its model {model_class.__name__} takes {takes}, not pixel_values "
        f"(model type {config.model_type!r}); unifeat runs models that take images as "
        f"pixel_values: vision model types include {format_choices(_vision_types())}"
    )


def _input_channels(config: PretrainedConfig, runner: nn.Module) -> int:
    """The channels of the images ``runner`` takes: its config's ``num_channels``, else
    the input channels of its first convolution (TextNet's ``stem_num_channels``,
    PP-LCNet's fixed RGB stem), else 3."""
    channels = getattr(config, "num_channels", None)
    if isinstance(channels, int) and channels > 0:
        return channels
    first = next((m for m in runner.modules() if isinstance(m, nn.Conv2d)), None)
    return int(first.in_channels) if first is not None else 3


def _check_config_kwargs(model_type: str, kwargs: Mapping[str, Any], plan: BuildPlan) -> None:
    """A config silently keeps keywords it does not know: a typo would build the
    default model. Refuse them, with the close matches."""
    config_class = CONFIG_MAPPING[model_type]
    valid = set(inspect.signature(config_class.__init__).parameters) - {"self", "kwargs"}
    valid |= set(_COMMON_CONFIG_KWARGS) | set(vars(config_class()))
    for key in kwargs:
        if key not in valid:
            unknown_keyword(key, plan, sorted(v for v in valid if not v.startswith("_")))


def _load_config(name: str, kwargs: Mapping[str, Any], plan: BuildPlan) -> PretrainedConfig:
    """``AutoConfig.from_pretrained`` with errors that say what is wrong with the files."""
    where = os.path.expanduser(name)
    if _is_path(name) and os.path.exists(where) and not os.path.isdir(where):
        raise UnknownModelError(
            f"{name!r} is not a directory: hf:<path> names a directory written by "
            "save_pretrained (with config.json)"
        )
    if _is_path(name) and not os.path.isdir(where):
        raise UnknownModelError(
            f"directory {name!r} does not exist: hf:<path> names a directory written by "
            "save_pretrained (with config.json)"
        )
    if os.path.isdir(where):
        config_file = os.path.join(where, "config.json")
        if not os.path.isfile(config_file):
            raise UnknownModelError(
                f"directory {name!r} has no config.json, so it names no model: save the model "
                "there with save_pretrained()"
            )
        try:
            with open(config_file, encoding="utf-8") as file:
                found = json.load(file)
        except (ValueError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{config_file!r} is not valid JSON ({exc})") from None
        model_type = found.get("model_type") if isinstance(found, dict) else None
        if not model_type:
            raise UnknownModelError(
                f"{config_file!r} has no model_type, so transformers cannot tell which model "
                "it describes: write it with save_pretrained()"
            )
        if model_type not in CONFIG_MAPPING:
            raise UnknownModelError(
                f"{config_file!r} names model type {model_type!r}, which this transformers "
                f"does not know; vision model types include {format_choices(_vision_types())}"
            )
    try:
        return AutoConfig.from_pretrained(name, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(
            f"transformers could not load the config of {plan.label}: {_first_line(exc)}"
        ) from None


def _config_for(plan: BuildPlan) -> tuple[PretrainedConfig, dict[str, Any]]:
    """The (vision) config ``plan`` names, and the kwargs left for ``from_pretrained``."""
    kwargs = dict(plan.model_kwargs)
    given = kwargs.pop("config", None)
    name = plan.model_name or ""
    if given is not None:
        if not isinstance(given, PretrainedConfig):
            raise UnsupportedOptionError(
                f"config= must be a transformers PretrainedConfig for {plan.label}, "
                f"not {type(given).__name__}"
            )
        wanted = _VISION_TOWERS.get(name, name)
        found = _vision_config(given)
        if not _is_location(name) and found.model_type not in (name, wanted):
            raise UnsupportedOptionError(
                f"config= is a {found.model_type!r} config, but {plan.label} names model "
                f"type {name!r}: pass matching ones"
            )
        return found, kwargs
    if _is_location(name):
        return _vision_config(_load_config(name, kwargs, plan)), {}
    _check_config_kwargs(name, kwargs, plan)
    return _vision_config(AutoConfig.for_model(name, **kwargs)), {}


class _ProcessorTransform:
    """An image processor as a PIL image -> CHW tensor transform (picklable)."""

    def __init__(self, processor: Any) -> None:
        self.processor = processor

    def __call__(self, image: Any) -> Tensor:
        return self.processor(images=image, return_tensors="pt")["pixel_values"][0]


# -- where the levels are -----------------------------------------------------------


def _trunk_path(source: nn.Module) -> str:
    """The part of ``source`` that maps pixels to hidden states: the vision tower
    of image-text models, the base model of task models, else the model; and in
    it, the backbone a detection or segmentation model runs images through."""
    base = _base_path(source)
    return _join(base, _backbone_path(source.get_submodule(base)))


def _base_path(source: nn.Module) -> str:
    tower = getattr(source, "vision_model", None)
    if isinstance(tower, nn.Module) and _takes(tower, "pixel_values"):
        return "vision_model"
    prefix = str(getattr(source, "base_model_prefix", "") or "")
    base = getattr(source, prefix, None) if prefix else None
    # A base model's own ``base_model_prefix`` child can be its encoder (DINOv3).
    if isinstance(base, nn.Module) and base is not source and _takes(base, "pixel_values"):
        return prefix
    return ""


def _is_timm(module: nn.Module) -> bool:
    return type(module).__module__.startswith("timm.")


def _backbone_path(model: nn.Module) -> str:
    """Where ``model`` keeps the backbone it runs images through: the shallowest
    transformers ``*Backbone`` (UperNet's, Mask2Former's pixel-level encoder) or
    timm model (DETR's), or ``""`` where the model is its own trunk. A backbone
    inside an ``embeddings`` module is a stem of the model's own trunk (DPT-hybrid's
    BiT), not what the model runs images through."""
    if isinstance(model, BackboneMixin) or _is_timm(model):
        return ""
    level = list(model.named_children())
    while level:
        for path, module in level:
            if isinstance(module, BackboneMixin) or _is_timm(module):
                return path
        level = [
            (f"{path}.{name}", child)
            for path, module in level
            if path.rpartition(".")[2] != "embeddings"
            for name, child in module.named_children()
        ]
    return ""


def _takes(module: nn.Module, keyword: str) -> bool:
    try:
        return keyword in inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False


def _has_backbone(model_type: str) -> bool:
    """Whether a model type's config names a backbone of its own (``backbone_config``)."""
    try:
        config_class = CONFIG_MAPPING[model_type]
    except KeyError:
        return False
    return "backbone_config" in inspect.signature(config_class.__init__).parameters


def _model_type(runner: nn.Module, config: PretrainedConfig) -> str:
    """The model type whose conventions ``runner`` follows: a ``*Backbone``'s own class
    says it (MaskFormer's Swin backbone keeps the ``swin`` config it was made from,
    but its stages are MaskFormer-Swin's), otherwise its config."""
    own = getattr(getattr(type(runner), "config_class", None), "model_type", None)
    if isinstance(runner, BackboneMixin) and isinstance(own, str) and own:
        return own
    return str(config.model_type)


def _config_of(source: nn.Module, trunk: str) -> PretrainedConfig:
    runner = source.get_submodule(trunk)
    return cast(PretrainedConfig, getattr(runner, "config", getattr(source, "config", None)))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _has_module(root: nn.Module, path: str) -> bool:
    try:
        return isinstance(root.get_submodule(path), nn.Module)
    except AttributeError:
        return False


def _join(prefix: str, path: str) -> str:
    return f"{prefix}.{path}" if prefix and path else prefix or path


def _patch_size(config: PretrainedConfig) -> int | None:
    patch = getattr(config, "patch_size", None)
    if isinstance(patch, (list, tuple)):
        patch = patch[0]
    return int(patch) if isinstance(patch, int) else None


class HfAdapter(Adapter):
    """transformers vision models by model type, hub id or local directory."""

    name = "hf"
    finder = "hooks"

    def has_model(self, name: str) -> bool:
        return _is_location(name) or name in CONFIG_MAPPING

    def model_names(self) -> list[str]:
        return _vision_types()

    def build(
        self, plan: BuildPlan, *, meta: bool, extra_kwargs: Mapping[str, Any] | None = None
    ) -> nn.Module:
        config, load_kwargs = _config_for(plan)
        config = _without_backbone_download(config)
        model_class = _model_class(config, plan.label)
        name = plan.model_name or ""
        if plan.pretrained and not _is_location(name):
            raise UnsupportedOptionError(
                f"pretrained=True needs weights, but {plan.label} is a model type: pass a hub "
                "id or a local directory (hf:<org>/<repo>, hf:/path/to/dir), or checkpoint_path="
            )
        if plan.pretrained and not meta:
            try:
                return model_class.from_pretrained(name, config=config, **load_kwargs)
            except Exception as exc:  # safetensors' own error is none of the builtins
                if isinstance(exc, UnifeatError) or not os.path.isdir(os.path.expanduser(name)):
                    raise
                files = sorted(os.listdir(os.path.expanduser(name)))
                raise CheckpointError(
                    f"could not load the weights of {plan.label} from directory {name!r} "
                    f"(files: {', '.join(files)}): {type(exc).__name__}: {_first_line(exc)}; "
                    "save_pretrained() writes model.safetensors there"
                ) from None
        try:
            with torch.device("meta") if meta else contextlib.nullcontext():
                return model_class(config)
        except ImportError as exc:
            raise BackendUnavailableError(
                f"transformers cannot build {plan.label} here: {_first_line(exc)}"
            ) from None
        except (ValueError, TypeError) as exc:
            raise UnsupportedOptionError(
                f"transformers could not build {plan.label} from its config: {_first_line(exc)}"
            ) from None

    def source_on_meta(self, plan: BuildPlan) -> nn.Module:
        source = super().source_on_meta(plan)
        if not isinstance(source, PreTrainedModel):
            raise UnsupportedOptionError(
                f"{plan.label} is not a transformers PreTrainedModel; pass it with backend='fx'"
            )
        return source

    def native_input_size(self, plan: BuildPlan, source: nn.Module) -> tuple[int, int, int]:
        trunk = _trunk_path(source)
        config = _config_of(source, trunk)
        size = getattr(config, "image_size", None) or 224
        height, width = (size, size) if isinstance(size, int) else (int(size[0]), int(size[-1]))
        return _input_channels(config, source.get_submodule(trunk)), height, width

    def convention(self, plan: BuildPlan, source: nn.Module) -> tuple[str, CallingConvention]:
        trunk = _trunk_path(source)
        config = _config_of(source, trunk)
        runner = source.get_submodule(trunk)
        model_type = _model_type(runner, config)
        patch = _patch_size(config)
        prepare = _PREPARE.get(model_type)
        return trunk, CallingConvention(
            input_keyword="pixel_values",
            prepare=functools.partial(prepare, patch=patch) if prepare and patch else None,
            reshape=_RESHAPE.get(model_type),
            resize_keyword=(
                "interpolate_pos_encoding" if _takes(runner, "interpolate_pos_encoding") else None
            ),
            block_kwargs=_BLOCK_KWARGS.get(model_type, {}),
            block_output=_BLOCK_OUTPUT.get(model_type, ((0,), None)),
            block_tail=_BLOCK_TAIL.get(model_type, ()),
            final_as_level=model_type in _FINAL_AS_LEVEL,
            containers=(nn.ModuleList,),
            patch_size=patch,
        )

    def head_recipe(self, plan: BuildPlan, source: nn.Module) -> HeadRecipe | None:
        """The heads of ``*ForImageClassification`` (``_HEADS``), on that model or its
        base model (which has no classifier until ``reset_classifier``)."""
        if not isinstance(source, PreTrainedModel):
            return None
        trunk = _trunk_path(source)
        config = _config_of(source, trunk)
        kind = str(config.model_type)
        name = type(source).__name__
        if kind in _HEADS and name.endswith("ForImageClassificationWithTeacher"):
            raise UnsupportedOptionError(
                f"{plan.label} is a {name}: its logits average two classifiers (on the "
                "class and the distillation token), not one head timm's interface can "
                f"reset; pass its {type(source.get_submodule(trunk)).__name__} (.{trunk}) "
                "or a DeiTForImageClassification instead"
            )
        if kind not in _HEADS or not (
            (trunk == "" and type(source) is MODEL_MAPPING.get(type(config), None))
            or name.endswith("ForImageClassification")
        ):
            return None
        classifier = source.get_submodule("classifier") if trunk else None
        pre: tuple[str, ...] = ()
        path = "classifier"
        if isinstance(classifier, nn.Sequential):  # resnet, regnet, bit: Flatten, Linear
            pre, path = ("classifier.0",), "classifier.1"
            classifier = source.get_submodule(path)
        classes = int(getattr(classifier, "out_features", 0) or 0)
        family = _HEADS[kind]
        if family == "map":
            width = int(config.hidden_sizes[-1])
            if kind in ("convnext", "convnextv2"):
                pre = (FLATTEN, _join(trunk, "layernorm"))
            return HeadRecipe(
                "map",
                path,
                num_features=width,
                head_hidden_size=width,
                num_classes=classes,
                pool_module=None if pre and pre[0] == FLATTEN else _join(trunk, "pooler"),
                pre_logits=pre,
            )
        runner: Any = source.get_submodule(trunk)
        width = int(runner.num_features if family == "swin" else config.hidden_size)
        tokens = functools.partial(
            HeadRecipe, "tokens", path, num_features=width, num_classes=classes
        )
        if family == "swin":
            pooler = _join(trunk, "pooler")
            return tokens(
                head_hidden_size=width,
                pools=("avg", "max", ""),
                pool_module=pooler if _has_module(source, pooler) else None,
                num_prefix_tokens=0,
            )
        if family == "dinov2":
            return tokens(
                head_hidden_size=2 * width,
                default_pool=TOKEN_AVG,
                pools=(TOKEN_AVG, "token", "avg", ""),
                num_prefix_tokens=1 + int(getattr(config, "num_register_tokens", 0) or 0),
            )
        if family == "beit" and config.use_mean_pooling:
            norm = _join(trunk, "pooler.layernorm")
            if not _has_module(source, norm):
                raise UnsupportedOptionError(
                    f"{plan.label} was built without its pooling layer "
                    "(add_pooling_layer=False), which holds the final norm of its mean "
                    f"pooling: pass a {kind} model with it (its *ForImageClassification "
                    "has one)"
                )
            return tokens(head_hidden_size=width, default_pool="avg", pre_logits=(norm,))
        return tokens(  # vit, deit, beit with a class-token head
            head_hidden_size=width,
            default_pool="token",
            num_prefix_tokens=2 if kind == "deit" else 1,
        )

    def native(self, plan: BuildPlan, extra_kwargs: Mapping[str, Any]) -> NativeLevels | None:
        """A transformers model that wraps a timm model, or runs images through one
        (DETR's backbone), runs timm's own intermediates."""
        name = plan.model_name or ""
        if (
            plan.module is None
            and not _is_location(name)
            and name not in _TIMM_INSIDE
            and not _has_backbone(name)
        ):
            return None
        source = self.source_on_meta(plan)
        trunk = _trunk_path(source)
        inner = "" if _is_timm(source.get_submodule(trunk)) else None
        if inner is None:
            inner = _TIMM_INSIDE.get(str(_config_of(source, trunk).model_type))
        if inner is None:
            return None
        from unifeat._backends import timm as timm_backend

        path = _join(trunk, inner)
        model = source.get_submodule(path)
        levels = [
            dataclasses.replace(level, module=_join(path, level.module))
            for level in timm_backend.as_levels(timm_backend.levels_of(model))
        ]
        size = self.native_input_size(plan, source)
        return NativeLevels(at(timm_backend.spec_of(model), path), levels, False, size)

    def image_transform(self, plan: BuildPlan, source: nn.Module) -> Any:
        """The image processor saved with a local model (or a hub model loaded with
        weights), where there is one."""
        name = plan.model_name or ""
        local = os.path.isfile(os.path.join(name, "preprocessor_config.json"))
        if not (local or (plan.pretrained and _is_location(name))):
            return None
        from transformers import AutoImageProcessor

        try:
            return _ProcessorTransform(AutoImageProcessor.from_pretrained(name))
        except Exception:
            return None
