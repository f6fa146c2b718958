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

import inspect
import json
import os
from collections.abc import Mapping
from typing import Any, cast

import torch
from torch import Tensor, nn
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_BACKBONE_MAPPING, MODEL_MAPPING

from unifeat._backends._base import Adapter, unknown_keyword
from unifeat._engine.hooks import CallingConvention, Where
from unifeat._errors import (
    CheckpointError,
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
    "ijepa",
    "pvt_v2",
    "regnet",
    "resnet",
    "siglip_vision_model",
    "swin",
    "swinv2",
    "vit",
    "vit_msn",
    "vitdet",
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
}
# Block attributes to drop on the deepest kept block: work after its level.
_BLOCK_TAIL: dict[str, tuple[str, ...]] = {
    "swin": ("downsample",),
    "swinv2": ("downsample",),
    "donut-swin": ("downsample",),
}
# Keyword arguments every config takes besides its own fields.
_COMMON_CONFIG_KWARGS = ("num_labels", "attn_implementation", "output_attentions")


def _vision_types() -> list[str]:
    return sorted(set(TESTED_MODEL_TYPES) | set(_VISION_TOWERS))


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
    ResNet, ViTPose's ViT)."""
    for mapping in (MODEL_MAPPING, MODEL_FOR_BACKBONE_MAPPING):
        if type(config) in mapping:
            return cast(type[PreTrainedModel], mapping[type(config)])
    raise UnsupportedOptionError(
        f"{label}: transformers has no base model or backbone for config "
        f"{type(config).__name__} (model type {config.model_type!r}); vision model types "
        f"include {format_choices(_vision_types())}"
    )


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
    if _is_path(name) and not os.path.isdir(os.path.expanduser(name)):
        raise UnknownModelError(
            f"no directory {name!r} for {plan.label}: hf:<path> names a directory written by "
            "save_pretrained (with config.json)"
        )
    if os.path.isdir(name):
        config_file = os.path.join(name, "config.json")
        if not os.path.isfile(config_file):
            raise CheckpointError(
                f"directory {name!r} has no config.json, so {plan.label} cannot be built: "
                "save the model there with save_pretrained()"
            )
        try:
            with open(config_file, encoding="utf-8") as file:
                json.load(file)
        except (ValueError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{config_file!r} is not valid JSON ({exc})") from None
    try:
        return AutoConfig.from_pretrained(name, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"transformers could not load the config of {plan.label}: {first}"
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
    of image-text models, the base model of task models, else the model."""
    tower = getattr(source, "vision_model", None)
    if isinstance(tower, nn.Module) and _takes(tower, "pixel_values"):
        return "vision_model"
    prefix = str(getattr(source, "base_model_prefix", "") or "")
    base = getattr(source, prefix, None) if prefix else None
    # A base model's own ``base_model_prefix`` child can be its encoder (DINOv3).
    if isinstance(base, nn.Module) and base is not source and _takes(base, "pixel_values"):
        return prefix
    return ""


def _takes(module: nn.Module, keyword: str) -> bool:
    try:
        return keyword in inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False


def _config_of(source: nn.Module, trunk: str) -> PretrainedConfig:
    runner = source.get_submodule(trunk)
    return cast(PretrainedConfig, getattr(runner, "config", getattr(source, "config", None)))


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
        model_class = _model_class(config, plan.label)
        name = plan.model_name or ""
        if plan.pretrained and not _is_location(name):
            raise UnsupportedOptionError(
                f"pretrained=True needs weights, but {plan.label} is a model type: pass a hub "
                "id or a local directory (hf:<org>/<repo>, hf:/path/to/dir), or checkpoint_path="
            )
        if plan.pretrained and not meta:
            return model_class.from_pretrained(name, config=config, **load_kwargs)
        if meta:
            with torch.device("meta"):
                return model_class(config)
        return model_class(config)

    def source_on_meta(self, plan: BuildPlan) -> nn.Module:
        source = super().source_on_meta(plan)
        if not isinstance(source, PreTrainedModel):
            raise UnsupportedOptionError(
                f"{plan.label} is not a transformers PreTrainedModel; pass it with backend='fx'"
            )
        return source

    def native_input_size(self, plan: BuildPlan, source: nn.Module) -> tuple[int, int, int]:
        config = _config_of(source, _trunk_path(source))
        size = getattr(config, "image_size", None) or 224
        height, width = (size, size) if isinstance(size, int) else (int(size[0]), int(size[-1]))
        return int(getattr(config, "num_channels", 3) or 3), height, width

    def convention(self, plan: BuildPlan, source: nn.Module) -> tuple[str, CallingConvention]:
        trunk = _trunk_path(source)
        config = _config_of(source, trunk)
        model_type = str(config.model_type)
        runner = source.get_submodule(trunk)
        return trunk, CallingConvention(
            input_keyword="pixel_values",
            resize_keyword=(
                "interpolate_pos_encoding" if _takes(runner, "interpolate_pos_encoding") else None
            ),
            block_kwargs=_BLOCK_KWARGS.get(model_type, {}),
            block_output=_BLOCK_OUTPUT.get(model_type, ((0,), None)),
            block_tail=_BLOCK_TAIL.get(model_type, ()),
            containers=(nn.ModuleList,),
            patch_size=_patch_size(config),
        )

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
