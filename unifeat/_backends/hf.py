"""The transformers backend: any vision model's blocks as a timm-style feature backbone.

How levels are found
--------------------
One shape pass on the meta device, with a hook on every module, records what
each module returns. The model's *block container* is the shallowest
``ModuleList`` holding the most parameters (``layers`` of ViT,
``encoder.stages`` of ResNet and ConvNeXt, ``encoder.layers`` of Swin).

* Token models (blocks return ``[N, L, C]``): one level per block, reduction =
  the patch size, the ``L - h*w`` leading tokens being prefix tokens (class,
  distillation, registers). Index ``i`` is block ``i``, as in timm, not
  ``hidden_states[i]`` (whose entry 0 is the embeddings).
* Map models (blocks return ``[N, C, H, W]``): for each reduction, the last
  output at that reduction among the modules that run before the first block
  and the blocks themselves. So ResNet-50 gets its stride-2 stem as level 0, as
  in timm and torchvision, although transformers' own stages start after the
  max-pool.
* Swin-style models, whose stages end by downsampling, give each stage's map
  *before* downsampling (what timm calls the stage output), through the
  model's own ``output_hidden_states_before_downsampling`` switch.

The feature model shares the source's parameters, keeps only the blocks up to
the deepest requested level, skips what follows the blocks (final norm,
pooler, heads) and records only the requested levels, with forward hooks.
"""

from __future__ import annotations

import copy
import functools
import inspect
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import Tensor, nn
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_BACKBONE_MAPPING, MODEL_MAPPING

from unifeat._backends._base import Adapter
from unifeat._checkpoint import load_checkpoint
from unifeat._dilation import SPATIAL_OPS, DilationChange, apply_dilation, plan_dilation
from unifeat._errors import UnsupportedOptionError, format_choices
from unifeat._feature_info import FeatureInfo
from unifeat._feature_model import (
    FeatureMap,
    MapsFeatureModel,
    attach_image_transform,
    share_parameters_copy,
)
from unifeat._indices import normalize_indices
from unifeat._maps import spatial
from unifeat._options import BuildPlan

# The model types the test suite checks, level by level, against the models'
# own hidden states or backbones (``list_models(backend="hf")``). Other vision
# types are accepted and work where their layout is one of the above.
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
# on each block call, and where the level is in a block's tuple output: the
# index path to the tensor, and where it is tokens, where its height and width
# are (one index: a (height, width, ...) tuple there; two: height and width).
_Where = tuple[tuple[int, ...], tuple[int, ...] | None]
_FIRST: _Where = ((0,), None)
_BLOCK_KWARGS: dict[str, dict[str, Any]] = {
    "swin": {"output_hidden_states_before_downsampling": True},
}
_BLOCK_OUTPUT: dict[str, _Where] = {
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


def _vision_types() -> list[str]:
    return sorted(set(TESTED_MODEL_TYPES) | set(_VISION_TOWERS))


def _is_location(name: str) -> bool:
    """A local directory or a hub id (``org/repo``), as opposed to a model type."""
    return os.path.isdir(name) or "/" in name or "\\" in name


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
        loaded = AutoConfig.from_pretrained(name, **kwargs)
        return _vision_config(loaded), {}
    return _vision_config(AutoConfig.for_model(name, **kwargs)), {}


def _build_source(plan: BuildPlan, *, meta: bool) -> PreTrainedModel:
    """The model ``plan`` names: random init from its config, or ``from_pretrained``."""
    config, load_kwargs = _config_for(plan)
    model_class = _model_class(config, plan.label)
    name = plan.model_name or ""
    if plan.pretrained and not _is_location(name):
        raise UnsupportedOptionError(
            f"pretrained=True needs weights, but {plan.label} is a model type: pass a hub id "
            f"or a local directory (hf:<org>/<repo>, hf:/path/to/dir), or checkpoint_path="
        )
    if plan.pretrained and not meta:
        return model_class.from_pretrained(name, config=config, **load_kwargs)
    if meta:
        with torch.device("meta"):
            return model_class(config)
    return model_class(config)


class _ProcessorTransform:
    """An image processor as a PIL image -> CHW tensor transform (picklable)."""

    def __init__(self, processor: Any) -> None:
        self.processor = processor

    def __call__(self, image: Any) -> Tensor:
        return self.processor(images=image, return_tensors="pt")["pixel_values"][0]


def _image_processor(plan: BuildPlan) -> Any:
    """The image processor saved with a local model (or a hub model loaded with
    weights), where there is one."""
    name = plan.model_name or ""
    local = os.path.isfile(os.path.join(name, "preprocessor_config.json"))
    if not (local or (plan.pretrained and _is_location(name))):
        return None
    from transformers import AutoImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(name)
    except Exception:
        return None


# -- where the levels are -----------------------------------------------------------


def _runner_path(source: nn.Module) -> str:
    """The part of ``source`` that maps pixels to hidden states: the vision tower
    of image-text models, the base model of task models, else the model."""
    tower = getattr(source, "vision_model", None)
    if isinstance(tower, nn.Module) and _takes_pixels(tower):
        return "vision_model"
    prefix = str(getattr(source, "base_model_prefix", "") or "")
    base = getattr(source, prefix, None) if prefix else None
    # A base model's own ``base_model_prefix`` child can be its encoder (DINOv3).
    if isinstance(base, nn.Module) and base is not source and _takes_pixels(base):
        return prefix
    return ""


def _takes_pixels(module: nn.Module) -> bool:
    try:
        return "pixel_values" in inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False


def _block_container(runner: nn.Module, label: str) -> str:
    """The shallowest ``ModuleList`` that holds the most parameters."""
    lists = [
        (name, module)
        for name, module in runner.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) > 0
    ]
    if not lists:
        raise UnsupportedOptionError(
            f"{label} has no list of blocks (nn.ModuleList) to take feature levels from"
        )

    def weight(item: tuple[str, nn.Module]) -> tuple[int, int]:
        name, module = item
        return sum(p.numel() for p in module.parameters()), -name.count(".")

    return max(lists, key=weight)[0]


@dataclass(frozen=True)
class _Level:
    module: str
    """Path relative to the runner (the module whose output is the level)."""
    num_chs: int
    reduction: int
    tokens: bool
    block: int
    """Index in the block container; -1 for a level before the first block."""


@dataclass
class _Layout:
    """What a model type gives: its levels, and how to run it to get them."""

    container: str
    levels: list[_Level]
    patch_size: int | None
    input_size: tuple[int, int]
    block_kwargs: dict[str, Any] = field(default_factory=dict)
    block_output: _Where = _FIRST
    block_tail: tuple[str, ...] = ()
    dilation: list[DilationChange] = field(default_factory=list)


def _first_tensor(output: Any, index: int = 0) -> Tensor | None:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)) and len(output) > index:
        item = output[index]
        return item if isinstance(item, Tensor) else None
    return None


def _level_tensor(output: Any, where: _Where) -> Tensor | None:
    """The level in a module's output: a map, or tokens laid out as a map with the
    height and width the module returns beside them."""
    path, dims = where
    item = output
    for position in path:
        if isinstance(item, Tensor) or not isinstance(item, (tuple, list)):
            break
        if len(item) <= position:
            return None
        item = item[position]
    tensor = item if isinstance(item, Tensor) else _first_tensor(item)
    if tensor is None or dims is None or tensor.dim() != 3:
        return tensor
    if len(dims) == 1:
        height, width = (int(d) for d in output[dims[0]][:2])
    else:
        height, width = int(output[dims[0]]), int(output[dims[1]])
    return tensor.reshape(tensor.shape[0], height, width, tensor.shape[2]).permute(0, 3, 1, 2)


def _image_size(config: PretrainedConfig) -> tuple[int, int]:
    size = getattr(config, "image_size", None) or 224
    if isinstance(size, int):
        return size, size
    return int(size[0]), int(size[-1])


def _patch_size(config: PretrainedConfig) -> int | None:
    patch = getattr(config, "patch_size", None)
    if isinstance(patch, (list, tuple)):
        patch = patch[0]
    return int(patch) if isinstance(patch, int) else None


@contextmanager
def _block_kwargs_forced(blocks: Sequence[nn.Module], kwargs: dict[str, Any]) -> Iterator[None]:
    handles = [
        block.register_forward_pre_hook(functools.partial(_force_kwargs, kwargs), with_kwargs=True)
        for block in blocks
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _force_kwargs(
    forced: dict[str, Any], module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    return args, {**kwargs, **forced}


def _shape_pass(
    runner: nn.Module,
    layout: _Layout,
    input_size: tuple[int, int],
    channels: int,
    label: str,
) -> list[tuple[str, Any, Any]]:
    """``(module path, module, output)`` for every module, in the order they finish,
    from one forward on the meta device; convs and pools also record their input
    shape, as ``(path, module, ("input", shape))`` just before they run."""
    container = cast(nn.ModuleList, runner.get_submodule(layout.container))
    blocks = set(map(id, container))
    records: list[tuple[str, Any, Any]] = []

    def after(path: str, module: nn.Module, args: Any, output: Any) -> None:
        is_block = id(module) in blocks
        tensor = _level_tensor(output, layout.block_output if is_block else _FIRST)
        records.append((path, module, tuple(tensor.shape) if tensor is not None else None))

    def before(path: str, module: nn.Module, args: Any) -> None:
        tensor = _first_tensor(args)
        if tensor is not None:
            records.append((path, module, ("input", tuple(tensor.shape))))

    handles = []
    for path, module in runner.named_modules():
        handles.append(module.register_forward_hook(functools.partial(after, path)))
        if isinstance(module, SPATIAL_OPS):
            handles.append(module.register_forward_pre_hook(functools.partial(before, path)))
    pixels = torch.empty(1, channels, *input_size, device="meta")
    try:
        with torch.no_grad(), _block_kwargs_forced(list(container), layout.block_kwargs):
            runner(pixel_values=pixels)
    except Exception as exc:
        raise UnsupportedOptionError(
            f"could not run {label} on a 1x{channels}x{input_size[0]}x{input_size[1]} input "
            f"on the meta device to find its levels ({type(exc).__name__}: "
            f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''})"
        ) from None
    finally:
        for handle in handles:
            handle.remove()
    return records


def _takes_interpolation(runner: nn.Module) -> bool:
    """Whether the forward interpolates position embeddings on request (ViT-likes)."""
    try:
        return "interpolate_pos_encoding" in inspect.signature(runner.forward).parameters
    except (TypeError, ValueError):
        return False


def _size_kwargs(
    interpolates: bool, size: tuple[int, int], native: tuple[int, int]
) -> dict[str, Any]:
    """Position embeddings are interpolated for inputs of another size than trained."""
    return {"interpolate_pos_encoding": True} if interpolates and size != native else {}


def _find_levels(
    runner: nn.Module, config: PretrainedConfig, model_type: str, label: str
) -> tuple[_Layout, list[tuple[str, nn.Module, int]]]:
    """The levels, and the convs and pools in execution order with their input
    reductions (what output_stride's dilation planning needs), from one shape pass."""
    container = _block_container(runner, label)
    layout = _Layout(
        container=container,
        levels=[],
        patch_size=_patch_size(config),
        input_size=_image_size(config),
        block_kwargs=_BLOCK_KWARGS.get(model_type, {}),
        block_output=_BLOCK_OUTPUT.get(model_type, _FIRST),
        block_tail=_BLOCK_TAIL.get(model_type, ()),
    )
    channels = int(getattr(config, "num_channels", 3) or 3)
    records = _shape_pass(runner, layout, layout.input_size, channels, label)
    layout.levels = _levels_from_records(records, layout, label)
    return layout, _spatial_ops(records, layout.input_size)


def _spatial_ops(
    records: list[tuple[str, Any, Any]], size: tuple[int, int]
) -> list[tuple[str, nn.Module, int]]:
    """What :func:`unifeat._dilation.plan_dilation` needs, from the shape pass's records."""
    ops = []
    for path, module, shape in records:
        if _is_input_record(shape) and (found := spatial(shape[1], size)) is not None:
            ops.append((path, module, found[1]))
    return ops


def _levels_from_records(
    records: list[tuple[str, Any, Any]], layout: _Layout, label: str
) -> list[_Level]:
    outputs = [(path, shape) for path, _m, shape in records if not _is_input_record(shape)]
    block_order = {path: i for i, path in enumerate(_block_paths_from(outputs, layout.container))}
    block_outputs = [(path, shape) for path, shape in outputs if path in block_order]
    if not block_outputs or block_outputs[0][1] is None:
        raise UnsupportedOptionError(f"the blocks of {label} return no tensors to take levels from")
    first_shape = block_outputs[0][1]
    if len(first_shape) == 3:
        return _token_levels(block_outputs, block_order, layout, label)
    if len(first_shape) != 4:
        raise UnsupportedOptionError(
            f"the blocks of {label} return {len(first_shape)}-D tensors; feature levels need "
            "maps [N, C, H, W] or tokens [N, L, C]"
        )
    block_maps = [spatial(shape, layout.input_size) for _path, shape in block_outputs]
    if len(block_maps) > 1 and len(set(block_maps)) == 1 and block_maps[0] is not None:
        # Every block keeps one map size (ViTDet: a plain ViT laid out as maps):
        # one level per block, as for token models.
        _layout_name, reduction_, channels = block_maps[0]
        return [
            _Level(module=path, num_chs=channels, reduction=reduction_, tokens=False, block=i)
            for i, (path, _shape) in enumerate(block_outputs)
        ]
    first_block = outputs.index(block_outputs[0])
    before = [
        (path, shape)
        for path, shape in outputs[:first_block]
        if path and not path.startswith(f"{layout.container}.")
    ]
    # Per reduction, the last map that divides the input exactly; a padded map
    # (BiT's stem pads before pooling) only where no exact one exists.
    last_at: dict[int, tuple[bool, tuple[str, int, int, int]]] = {}
    height, _width = layout.input_size
    for path, shape in [*before, *block_outputs]:
        found = spatial(shape, layout.input_size) if shape is not None else None
        if found is None or found[0] != "NCHW":
            continue
        exact = height % int(shape[2]) == 0
        if exact or not last_at.get(found[1], (False,))[0]:
            last_at[found[1]] = (exact, (path, found[2], found[1], block_order.get(path, -1)))
    return [
        _Level(module=path, num_chs=chs, reduction=red, tokens=False, block=block)
        for _exact, (path, chs, red, block) in sorted(last_at.values(), key=lambda c: c[1][2])
    ]


def _is_input_record(shape: Any) -> bool:
    return isinstance(shape, tuple) and len(shape) == 2 and shape[0] == "input"


def _block_paths_from(outputs: list[tuple[str, Any]], container: str) -> list[str]:
    prefix = f"{container}." if container else ""
    paths = []
    for path, _shape in outputs:
        rest = path[len(prefix) :] if path.startswith(prefix) else None
        if rest is not None and rest.isdigit() and path not in paths:
            paths.append(path)
    return sorted(paths, key=lambda p: int(p.rpartition(".")[2]))


def _token_levels(
    block_outputs: list[tuple[str, Any]],
    block_order: dict[str, int],
    layout: _Layout,
    label: str,
) -> list[_Level]:
    lengths = {shape[1] for _path, shape in block_outputs}
    patch = layout.patch_size
    if len(lengths) != 1 or patch is None:
        raise UnsupportedOptionError(
            f"{label} is a token model whose blocks change the number of tokens; unifeat "
            f"reads levels off plain token models (ViT-like) and the layouts of "
            f"{format_choices(TESTED_MODEL_TYPES)}"
        )
    height, width = layout.input_size
    cells = (height // patch) * (width // patch)
    if next(iter(lengths)) < cells:
        raise UnsupportedOptionError(
            f"{label} has fewer tokens than {height // patch}x{width // patch} patches of "
            f"size {patch}: its tokens are not a patch grid"
        )
    return [
        _Level(
            module=path,
            num_chs=int(shape[2]),
            reduction=patch,
            tokens=True,
            block=block_order[path],
        )
        for path, shape in block_outputs
    ]


# -- the adapter -------------------------------------------------------------------


class HfAdapter(Adapter):
    """transformers vision models by model type, hub id or local directory."""

    name = "hf"
    untraceable = (
        "transformers models do not trace with torchvision's FX tracer; pick levels with "
        "out_indices (unifeat.feature_info lists them)"
    )

    def has_model(self, name: str) -> bool:
        return _is_location(name) or name in CONFIG_MAPPING

    def model_names(self) -> list[str]:
        return _vision_types()

    def source_on_meta(self, plan: BuildPlan) -> nn.Module:
        return plan.module if plan.module is not None else _build_source(plan, meta=True)

    def describe(self, plan: BuildPlan) -> FeatureInfo:
        return self._plan_levels(plan)[1]

    def create(self, plan: BuildPlan) -> nn.Module:
        # Everything that depends on the model is checked on a meta build first.
        needs_layout = plan.features_only or plan.output_stride is not None
        layout, info = self._plan_levels(plan) if needs_layout else (None, None)
        if plan.module is not None:
            source = plan.module
            if plan.checkpoint_path is not None:
                # Loading writes into the tensors, which the caller's module owns.
                source = copy.deepcopy(source)
                load_checkpoint(source, plan.checkpoint_path, context=plan.label)
            elif layout is not None:
                source = share_parameters_copy(source)
        else:
            source = _build_source(plan, meta=False)
            if plan.checkpoint_path is not None:
                load_checkpoint(source, plan.checkpoint_path, context=plan.label)
        runner_path = _runner_path(source)
        if layout is not None and layout.dilation:
            apply_dilation(source.get_submodule(runner_path), layout.dilation)
        if not plan.features_only or layout is None or info is None:
            if plan.module is None:
                cast(Any, source).backend = self.name
            return source
        features = HfFeatureModel(
            source,
            runner_path=runner_path,
            layout=layout,
            feature_info=info,
            output_type=plan.output_type or "list",
            output_fmt=plan.output_fmt,
            return_prefix_tokens=plan.return_prefix_tokens,
            context=plan.label,
        )
        processor = _image_processor(plan)
        if processor is not None:
            attach_image_transform(features, _ProcessorTransform(processor))
        return features

    def _plan_levels(self, plan: BuildPlan) -> tuple[_Layout, FeatureInfo]:
        if plan.return_nodes is not None:
            raise UnsupportedOptionError(
                f"return_nodes is not available for {plan.label}: {self.untraceable}"
            )
        source = self.source_on_meta(plan)
        if not isinstance(source, PreTrainedModel):
            raise UnsupportedOptionError(
                f"{plan.label} is not a transformers PreTrainedModel; pass it with backend='fx'"
            )
        runner = source.get_submodule(_runner_path(source))
        config = cast(PretrainedConfig, getattr(runner, "config", source.config))
        model_type = str(config.model_type)
        on_meta = next(iter(source.parameters()), torch.empty(0)).is_meta
        if not on_meta:
            # A module passed in: find its levels on a weightless copy.
            with torch.device("meta"):
                runner = type(runner)(config)
        layout, spatial_ops = _find_levels(runner, config, model_type, plan.label)
        if not layout.levels:
            raise UnsupportedOptionError(f"no feature levels found in {plan.label}")
        tokens = layout.levels[0].tokens
        if plan.return_prefix_tokens and not tokens:
            raise UnsupportedOptionError(
                f"return_prefix_tokens=True needs a token model with prefix tokens, but "
                f"{plan.label} returns plain feature maps"
            )
        if plan.output_stride is not None:
            self._apply_stride(plan, runner, layout, config, spatial_ops)
        # Plain ViT-likes (one map size throughout) default to their last 3 blocks, as timm.
        plain = len({level.reduction for level in layout.levels}) == 1 and len(layout.levels) > 3
        default = 3 if plain else None
        indices = normalize_indices(
            plan.out_indices, len(layout.levels), default, context=plan.label
        )
        prefix = _runner_path(source)
        dicts = [
            dict(
                num_chs=level.num_chs,
                reduction=level.reduction,
                module=f"{prefix}.{level.module}" if prefix else level.module,
            )
            for level in layout.levels
        ]
        return layout, FeatureInfo.from_dicts(dicts, indices)

    def _apply_stride(
        self,
        plan: BuildPlan,
        runner: nn.Module,
        layout: _Layout,
        config: PretrainedConfig,
        spatial_ops: list[tuple[str, nn.Module, int]],
    ) -> None:
        """Generic dilation of map models; token models only at their patch size."""
        wanted = plan.output_stride
        assert wanted is not None
        native = max(level.reduction for level in layout.levels)
        if wanted == native:
            return
        if layout.levels[0].tokens or wanted > native:
            kind = "a token model" if layout.levels[0].tokens else "a conv net"
            raise UnsupportedOptionError(
                f"output_stride={wanted} is not supported by {plan.label}, {kind}: "
                f"supported values are {self._supported(native, layout)}"
            )
        channels = int(getattr(config, "num_channels", 3) or 3)
        size = layout.input_size
        changes = plan_dilation(spatial_ops, wanted, context=plan.label)
        dilated = share_parameters_copy(runner)
        apply_dilation(dilated, changes)
        try:
            records = _shape_pass(dilated, layout, size, channels, plan.label)
        except UnsupportedOptionError:
            records = []
        reductions = {
            path: found[1]
            for path, _m, shape in records
            if not _is_input_record(shape)
            and shape is not None
            and (found := spatial(shape, size)) is not None
        }
        new_levels = [
            _Level(
                module=level.module,
                num_chs=level.num_chs,
                reduction=reductions.get(level.module, 0),
                tokens=False,
                block=level.block,
            )
            for level in layout.levels
        ]
        if max(level.reduction for level in new_levels) != wanted:
            raise UnsupportedOptionError(
                f"output_stride={wanted} is not supported by {plan.label}: it downsamples "
                f"outside plain conv and pool modules; supported values are "
                f"{self._supported(native, layout)}"
            )
        layout.levels = new_levels
        layout.dilation = changes

    @staticmethod
    def _supported(native: int, layout: _Layout) -> str:
        if layout.levels[0].tokens:
            return f"{native} (its patch size)"
        return format_choices([s for s in (8, 16, 32) if s <= native] or [native])


# -- the feature model ---------------------------------------------------------------


class _Skipped(nn.Module):
    """Stands in for what follows the blocks (norm, pooler, head): passes its input on."""

    def forward(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        return x


def _record(
    owner: HfFeatureModel,
    level: int,
    where: _Where,
    module: nn.Module,
    args: Any,
    output: Any,
) -> None:
    if level in owner._wanted:
        owner._captured[level] = _level_tensor(output, where)


class HfFeatureModel(MapsFeatureModel):
    """Feature model over a transformers model (see the module docstring)."""

    _no_norm = "its final norm follows the last block and is not part of the feature model"

    def __init__(
        self,
        source: nn.Module,
        *,
        runner_path: str,
        layout: _Layout,
        feature_info: FeatureInfo,
        output_type: str,
        output_fmt: str,
        return_prefix_tokens: bool,
        context: str,
    ) -> None:
        source_keys = tuple(nn.Module.state_dict(source).keys())
        super().__init__(
            source,
            feature_info=feature_info,
            backend="hf",
            output_type=output_type,
            output_fmt=output_fmt,
            return_prefix_tokens=return_prefix_tokens,
            context=context,
            source_keys=source_keys,
        )
        self._runner_path = runner_path
        self._layout = layout
        self._wanted: frozenset[int] = frozenset()
        self._captured: dict[int, Tensor | None] = {}
        self._hooks: list[Any] = []
        runner = self._runner()
        config = getattr(runner, "config", None)
        self._native_size = _image_size(config) if config is not None else layout.input_size
        self._interpolates = _takes_interpolation(runner)
        # Everything outside the vision trunk (task heads, a text tower) is unused.
        for name in [name for name, _ in source.named_children()]:
            if runner_path and name != runner_path.split(".")[0]:
                setattr(source, name, _Skipped())
        # Everything after the block container in the trunk is unused too.
        top = layout.container.split(".")[0]
        names = [name for name, _ in runner.named_children()]
        for name in names[names.index(top) + 1 :]:
            setattr(runner, name, _Skipped())
        self._cut(self.last_level)
        self._after_prune()

    def _runner(self) -> nn.Module:
        return self.model.get_submodule(self._runner_path)

    def _cut(self, last_level: int) -> None:
        """Keep the blocks up to ``last_level``'s and hook the levels up to it."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        runner = self._runner()
        levels = self._layout.levels
        last_block = max(levels[last_level].block, -1)
        parent_path, _, attr = self._layout.container.rpartition(".")
        parent = runner.get_submodule(parent_path)
        container = cast(nn.ModuleList, getattr(parent, attr))
        if len(container) > last_block + 1:
            setattr(parent, attr, nn.ModuleList(list(container)[: last_block + 1]))
            container = cast(nn.ModuleList, getattr(parent, attr))
            if last_block >= 0:
                for name in self._layout.block_tail:
                    if getattr(container[last_block], name, None) is not None:
                        setattr(container[last_block], name, None)
        for block in container:
            if self._layout.block_kwargs:
                self._hooks.append(
                    block.register_forward_pre_hook(
                        functools.partial(_force_kwargs, self._layout.block_kwargs),
                        with_kwargs=True,
                    )
                )
        for index, level in enumerate(levels[: last_level + 1]):
            module = runner.get_submodule(level.module)
            where = self._layout.block_output if level.block >= 0 else _FIRST
            self._hooks.append(
                module.register_forward_hook(functools.partial(_record, self, index, where))
            )

    @property
    def default_input_size(self) -> tuple[int, int, int] | None:
        config = getattr(self._runner(), "config", None)
        channels = int(getattr(config, "num_channels", 3) or 3)
        return (channels, *self._native_size)

    def _maps(self, x: Tensor, indices: Sequence[int]) -> list[FeatureMap]:
        size = (int(x.shape[-2]), int(x.shape[-1]))
        runner = self._runner()
        self._wanted = frozenset(indices)
        self._captured = {}
        try:
            runner(pixel_values=x, **_size_kwargs(self._interpolates, size, self._native_size))
            captured = self._captured
        finally:
            self._captured = {}
            self._wanted = frozenset()
        maps: list[FeatureMap] = []
        for index in indices:
            tensor = captured.get(index)
            if tensor is None:  # pragma: no cover - a hook that did not fire
                raise RuntimeError(f"level {index} of {self._context} was not computed")
            level = self._layout.levels[index]
            maps.append(self._to_map(tensor, size) if level.tokens else tensor)
        return maps

    def _to_map(self, tokens: Tensor, size: tuple[int, int]) -> FeatureMap:
        patch = self._layout.patch_size or 1
        height, width = size[0] // patch, size[1] // patch
        prefix = tokens.shape[1] - height * width
        grid = tokens[:, prefix:].reshape(tokens.shape[0], height, width, tokens.shape[2])
        feature_map = grid.permute(0, 3, 1, 2)
        if self.return_prefix_tokens:
            return feature_map, tokens[:, :prefix]
        return feature_map

    def prune_intermediate_layers(
        self, indices: int | Sequence[int], prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the blocks after the deepest of ``indices``; returns them normalized.

        ``forward`` then returns exactly these levels.
        """
        chosen = self.resolve_indices(indices)
        self._cut(max(chosen))
        self.feature_info = self.feature_info.from_other(chosen)
        self.last_level = max(chosen)
        self._after_prune()
        return list(chosen)
