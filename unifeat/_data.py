"""One preprocessing description for every backend: :class:`DataConfig`.

timm keeps its recipe in ``pretrained_cfg``, torchvision in its weights'
``transforms()``, transformers in an image processor and open_clip in a
``Compose``. Each is converted here into one small frozen object, and
:func:`create_transform` turns that object back into a transform that gives the
same pixels as the library's own (see the docs page "Preprocessing").

Extraction splits the transform in two: the geometric part (decode, resize,
crop, to ``uint8``) runs where the images are read, the arithmetic part
(scale, normalize) runs on the model's device, so a batch crosses process and
device boundaries as ``uint8``, a quarter of the bytes of ``float32``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal, cast

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import Tensor, nn

from unifeat._errors import UnsupportedOptionError, format_choices

if TYPE_CHECKING:
    from PIL import Image as PILImage

__all__ = ["DataConfig", "create_transform", "data_config"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_CROP_PCT = 0.875

Interpolation = Literal["nearest", "bilinear", "bicubic", "lanczos", "box", "hamming"]
INTERPOLATIONS: tuple[str, ...] = ("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming")
# PIL's resampling filter numbers, which transformers' processors store as ``resample``.
_PIL_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
# transformers fuses rescaling into normalization with this factor; reproduced bit for bit.
_RESCALE = 1 / 255


class DataConfig(BaseModel):
    """How images are turned into model input: size, crop, interpolation, normalization.

    Resolved from the model's own library by :func:`data_config`; turned into a
    transform by :func:`create_transform`; recorded with extracted features.

    Examples:
        >>> import unifeat
        >>> config = unifeat.data_config("timm:resnet18")
        >>> config.input_size, config.interpolation, config.crop_pct
        ((3, 224, 224), 'bicubic', 0.95)
        >>> config.model_copy(update={"input_size": (3, 160, 160)}).input_size
        (3, 160, 160)
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    input_size: tuple[int, int, int]
    """``(channels, height, width)`` of the model input."""
    mean: tuple[float, ...] = IMAGENET_MEAN
    """Per-channel mean subtracted after scaling pixels to [0, 1]."""
    std: tuple[float, ...] = IMAGENET_STD
    """Per-channel standard deviation divided by after subtracting the mean."""
    interpolation: Interpolation = "bicubic"
    crop_pct: float = Field(default=DEFAULT_CROP_PCT, gt=0, le=1)
    """The crop's share of the resized image: the image is first resized to
    ``size / crop_pct``, then cropped to ``size``."""
    crop_mode: Literal["center", "squash", "border"] = "center"
    """``center``: keep the aspect ratio, resize the shorter side, crop the centre
    (timm's and torchvision's default); ``squash``: resize both sides to
    ``size / crop_pct`` ignoring the aspect ratio, then crop; ``border``: fit the
    longer side, pad the rest with the mean colour."""
    channel_order: Literal["RGB", "BGR"] = "RGB"
    impl: Literal["pil", "transformers"] = "pil"
    """Whose resize and crop arithmetic to reproduce: ``pil`` (PIL's resize on the
    decoded image, torchvision's crop offsets: timm, torchvision, open_clip) or
    ``transformers`` (transformers' default image processors: torchvision kernels
    on ``uint8`` tensors, floor crop offsets, fused rescale and normalize). The
    two differ by at most one gray level per pixel."""
    source: str = "default"
    """Where the config was resolved from, e.g. ``"timm pretrained_cfg"``."""

    @field_validator("input_size")
    @classmethod
    def _positive_size(cls, value: tuple[int, int, int]) -> tuple[int, int, int]:
        if min(value) < 1:
            raise ValueError(f"input_size must be (C, H, W) with all sides >= 1, not {value}")
        return value

    @model_validator(mode="after")
    def _channels_agree(self) -> DataConfig:
        channels = self.input_size[0]
        if len(self.mean) != channels or len(self.std) != channels:
            raise ValueError(
                f"mean {self.mean} and std {self.std} must have one value per channel ({channels})"
            )
        if min(self.std) <= 0:
            raise ValueError(f"std must be positive, not {self.std}")
        return self

    @property
    def size(self) -> tuple[int, int]:
        """``(height, width)`` of the model input."""
        return (self.input_size[1], self.input_size[2])


def default_config(input_size: Sequence[int] | None = None) -> DataConfig:
    """The recipe for models that carry none (random init, a plain module): the
    shorter side resized to ``size / 0.875`` (bicubic), a center crop of ``size``,
    ImageNet mean and std."""
    size = tuple(int(s) for s in (input_size or (3, 224, 224)))
    if len(size) == 2:
        size = (3, *size)
    channels = size[0]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    if channels == 3:
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    else:
        mean, std = (0.5,) * channels, (0.5,) * channels
    return DataConfig(
        input_size=cast(tuple[int, int, int], size),
        mean=mean,
        std=std,
        source="default (the model carries no preprocessing)",
    )


# -- converters from each library's own recipe ---------------------------------------


def _interpolation_name(value: Any) -> str:
    """A torchvision ``InterpolationMode``, a PIL filter number or a name, as a name."""
    if isinstance(value, str):
        name = value.lower()
    elif hasattr(value, "value") and isinstance(value.value, str):  # InterpolationMode
        name = value.value
    elif isinstance(value, int):
        name = _PIL_RESAMPLE.get(int(value), str(value))
    else:
        name = str(value)
    if name == "nearest-exact":
        name = "nearest"
    if name == "random":  # timm's training-time choice; inference uses bicubic
        name = "bicubic"
    if name not in INTERPOLATIONS:
        raise UnsupportedOptionError(
            f"unknown interpolation {value!r}: expected {format_choices(INTERPOLATIONS)}"
        )
    return name


def from_timm(resolved: dict[str, Any], source: str = "timm pretrained_cfg") -> DataConfig:
    """From the dict ``timm.data.resolve_data_config`` returns."""
    return DataConfig(
        input_size=tuple(int(s) for s in resolved["input_size"]),  # type: ignore[arg-type]
        mean=tuple(float(v) for v in resolved["mean"]),
        std=tuple(float(v) for v in resolved["std"]),
        interpolation=_interpolation_name(resolved.get("interpolation", "bicubic")),  # type: ignore[arg-type]
        crop_pct=float(resolved.get("crop_pct") or DEFAULT_CROP_PCT),
        crop_mode=resolved.get("crop_mode") or "center",
        source=source,
    )


def from_timm_model(module: nn.Module) -> DataConfig:
    """From a timm model's ``pretrained_cfg``, as timm's own ``resolve_data_config``
    reads it."""
    from timm.data import resolve_data_config

    return from_timm(resolve_data_config({}, model=module))


def from_torchvision(transform: Any) -> DataConfig:
    """From a torchvision weights' ``transforms()`` (the ``ImageClassification``
    preset): resize the shorter side to ``resize_size``, center-crop ``crop_size``."""
    crop = [int(s) for s in transform.crop_size]
    resize = [int(s) for s in transform.resize_size]
    height, width = (crop[0], crop[-1])
    if len(resize) != 1:
        raise UnsupportedOptionError(
            f"torchvision transform {transform!r}: only a shorter-side resize_size is supported"
        )
    return DataConfig(
        input_size=(3, height, width),
        mean=tuple(float(v) for v in transform.mean),
        std=tuple(float(v) for v in transform.std),
        interpolation=_interpolation_name(transform.interpolation),  # type: ignore[arg-type]
        crop_pct=min(height, width) / resize[0],
        crop_mode="center",
        source=f"torchvision weights transforms ({type(transform).__name__})",
    )


def _size_dict(value: Any) -> dict[str, int]:
    if value is None:
        return {}
    if isinstance(value, int):
        return {"height": value, "width": value}
    items = value.items() if hasattr(value, "items") else vars(value).items()
    return {k: int(v) for k, v in items if v is not None}


def from_transformers(processor: Any) -> DataConfig:
    """From a transformers image processor (``ViTImageProcessor``,
    ``ConvNextImageProcessor``, ``CLIPImageProcessor``, ``BitImageProcessor``, ...)."""
    name = type(processor).__name__
    if getattr(processor, "do_rescale", True) and not math.isclose(
        float(getattr(processor, "rescale_factor", _RESCALE)), _RESCALE
    ):
        raise UnsupportedOptionError(
            f"{name} rescales by {processor.rescale_factor}, not 1/255: not representable "
            "as a DataConfig"
        )
    if getattr(processor, "do_normalize", True):
        mean = processor.image_mean
        std = processor.image_std
    else:
        mean, std = 0.0, 1.0
    mean = tuple(float(v) for v in (mean if isinstance(mean, (list, tuple)) else [mean] * 3))
    std = tuple(float(v) for v in (std if isinstance(std, (list, tuple)) else [std] * 3))
    interpolation = _interpolation_name(getattr(processor, "resample", 3))
    size = _size_dict(getattr(processor, "size", None)) if processor.do_resize else {}
    crop = (
        _size_dict(getattr(processor, "crop_size", None))
        if getattr(processor, "do_center_crop", False)
        else {}
    )
    impl = "pil" if getattr(processor, "backend", "") == "pil" else "transformers"
    crop_pct = getattr(processor, "crop_pct", None)
    if crop_pct is not None and "shortest_edge" in size:
        # ConvNeXt's processor: below 384, resize the shorter side to
        # shortest_edge / crop_pct and crop shortest_edge; from 384, squash.
        edge = size["shortest_edge"]
        if edge < 384:
            target, mode, pct = (edge, edge), "center", edge / math.floor(edge / crop_pct)
        else:
            target, mode, pct = (edge, edge), "squash", 1.0
    elif "shortest_edge" in size and "longest_edge" not in size:
        if not crop:
            raise UnsupportedOptionError(
                f"{name} resizes the shorter side without a center crop: the input size "
                "varies per image, which batched extraction cannot stack"
            )
        target = (crop["height"], crop["width"])
        mode, pct = "center", min(target) / size["shortest_edge"]
    elif "height" in size and "width" in size:
        if crop:
            target = (crop["height"], crop["width"])
            pct = target[0] / size["height"]
            if not math.isclose(pct, target[1] / size["width"]):
                raise UnsupportedOptionError(
                    f"{name}: resize {size} and crop {crop} have different ratios per side"
                )
        else:
            target, pct = (size["height"], size["width"]), 1.0
        mode = "squash"
    else:
        raise UnsupportedOptionError(f"{name} with size {size}: not representable as a DataConfig")
    return DataConfig(
        input_size=(3, *target),
        mean=mean,
        std=std,
        interpolation=interpolation,  # type: ignore[arg-type]
        crop_pct=pct,
        crop_mode=mode,  # type: ignore[arg-type]
        impl=impl,  # type: ignore[arg-type]
        source=f"transformers image processor ({name})",
    )


def from_open_clip(preprocess: Any) -> DataConfig:
    """From open_clip's preprocess (a torchvision ``Compose``: ``Resize``,
    ``CenterCrop`` or open_clip's keep-ratio resize and pad, then ``Normalize``)."""
    steps = list(getattr(preprocess, "transforms", []))
    resize = crop = normalize = None
    longest = None
    for step in steps:
        kind = type(step).__name__
        if kind == "Resize":
            resize = step
        elif kind == "ResizeKeepRatio":
            resize, longest = step, float(getattr(step, "longest", 0.0))
        elif kind in ("CenterCrop", "CenterCropOrPad"):
            crop = step
        elif kind == "Normalize":
            normalize = step
    if resize is None or normalize is None:
        raise UnsupportedOptionError(
            f"open_clip preprocess {preprocess!r}: expected a Resize and a Normalize step"
        )
    sizes = resize.size if isinstance(resize.size, (list, tuple)) else [resize.size]
    crop_sizes = list(crop.size) if crop is not None else list(sizes)
    target = (int(crop_sizes[0]), int(crop_sizes[-1]))
    mean = normalize.mean.tolist() if isinstance(normalize.mean, Tensor) else normalize.mean
    std = normalize.std.tolist() if isinstance(normalize.std, Tensor) else normalize.std
    if longest is not None:
        fill = getattr(crop, "fill", 0)
        mean_fill = [round(255 * m) for m in mean]
        if longest == 1.0 and list(np.broadcast_to(fill, (3,))) != mean_fill:
            # The border mode pads with the mean colour, as timm does.
            raise UnsupportedOptionError(
                f"open_clip preprocess pads with fill {fill!r}, not the mean colour "
                f"{mean_fill}: not representable as a DataConfig"
            )
        mode, pct = ("border", 1.0) if longest == 1.0 else ("center", 1.0)
    elif len(sizes) == 2:
        mode, pct = "squash", target[0] / int(sizes[0])
    else:
        mode, pct = "center", min(target) / int(sizes[0])
    return DataConfig(
        input_size=(3, *target),
        mean=tuple(float(v) for v in mean),
        std=tuple(float(v) for v in std),
        interpolation=_interpolation_name(resize.interpolation),  # type: ignore[arg-type]
        crop_pct=pct,
        crop_mode=mode,  # type: ignore[arg-type]
        source="open_clip preprocess",
    )


def from_transform(transform: Any) -> DataConfig:
    """From whichever library's transform object ``transform`` is; a ``DataConfig``
    an adapter made (where the library's recipe is part of the model, as a
    torchvision detection model's transform) is taken as it is."""
    if isinstance(transform, DataConfig):
        return transform
    kind = type(transform).__name__
    if hasattr(transform, "crop_size") and hasattr(transform, "resize_size"):
        return from_torchvision(transform)
    processor = getattr(transform, "processor", None)
    if processor is not None:
        return from_transformers(processor)
    if hasattr(transform, "do_resize") and hasattr(transform, "image_mean"):
        return from_transformers(transform)
    if kind == "Compose":
        return from_open_clip(transform)
    raise UnsupportedOptionError(
        f"cannot read a DataConfig from a {kind}: expected a torchvision weights transform, "
        "a transformers image processor or an open_clip preprocess Compose"
    )


# -- resolving a model's config ------------------------------------------------------


def _is_timm(module: nn.Module) -> bool:
    return type(module).__module__.startswith("timm.") and (
        getattr(module, "pretrained_cfg", None) is not None
    )


def model_data_config(model: nn.Module) -> DataConfig:
    """The config ``model`` carries: its ``data_config`` attribute, else timm's
    ``pretrained_cfg``, else the transform recorded when it was built, else the
    default at its input size."""
    from unifeat._feature_model import image_transform

    carried = getattr(model, "data_config", None)
    if isinstance(carried, DataConfig):
        return carried
    source = model.__dict__.get("_root", model)  # a feature model: the library's model
    for candidate in (source, model):
        if isinstance(candidate, nn.Module) and _is_timm(candidate):
            return from_timm_model(candidate)
    own = image_transform(model)
    if own is not None:
        return from_transform(own)
    return default_config(getattr(model, "default_input_size", None))


def timm_pretrained_cfg(model: nn.Module) -> dict[str, Any]:
    """``model``'s :func:`model_data_config` in timm's ``pretrained_cfg`` format, over
    the timm model's own ``pretrained_cfg`` where there is one (its other keys kept);
    a classifier model adds ``num_classes`` and ``classifier``."""
    config = model_data_config(model)
    source = model.__dict__.get("_root", model)
    own = getattr(source, "pretrained_cfg", None) if _is_timm(source) else None
    cfg: dict[str, Any] = dict(own) if isinstance(own, dict) else {}
    cfg.update(
        input_size=config.input_size,
        mean=config.mean,
        std=config.std,
        interpolation=config.interpolation,
        crop_pct=config.crop_pct,
        crop_mode=config.crop_mode,
    )
    classifier = getattr(model, "classifier_path", None)
    if classifier is not None:
        cfg.update(num_classes=int(getattr(model, "num_classes", 0)), classifier=classifier)
    return cfg


def with_input_size(config: DataConfig, size: Sequence[int] | None) -> DataConfig:
    """``config`` at another ``(H, W)``; the rest of the recipe is kept."""
    if size is None:
        return config
    height, width = (int(size[0]), int(size[-1]))
    if (height, width) == config.size:
        return config
    return config.model_copy(
        update={
            "input_size": (config.input_size[0], height, width),
            "source": f"{config.source}, input size {height}x{width}",
        }
    )


def data_config(name_or_model: str | nn.Module, **create_kwargs: Any) -> DataConfig:
    """The preprocessing a model expects, as one :class:`DataConfig`, from any backend.

    Resolved from the model's own library: timm's ``pretrained_cfg``;
    torchvision's weights ``transforms()`` (models built with
    ``pretrained=True``); a transformers image processor (models loaded from a
    directory or hub id that has one); open_clip's preprocess. Models that carry
    none (random init, a plain module) get the documented default: the shorter
    side resized to ``size / 0.875`` (bicubic), a center crop of the model's
    input size (else 224), ImageNet mean and std.

    Args:
        name_or_model: a model name (built as :func:`unifeat.create_model` would,
            with ``features_only=True`` and ``create_kwargs``; on the meta device
            unless weights are asked for) or a built model or feature model.
        **create_kwargs: options for building a model by name.

    Returns:
        A frozen :class:`DataConfig`; its ``source`` says where it came from.

    Examples:
        >>> import unifeat
        >>> unifeat.data_config("tv:resnet18").source
        'default (the model carries no preprocessing)'
        >>> config = unifeat.data_config("timm:vit_tiny_patch16_224")
        >>> config.input_size, config.mean, config.crop_pct
        ((3, 224, 224), (0.5, 0.5, 0.5), 0.9)
    """
    if isinstance(name_or_model, DataConfig):
        return name_or_model
    if isinstance(name_or_model, str):
        import unifeat

        weights = create_kwargs.get("pretrained") or create_kwargs.get("checkpoint_path")
        if weights:
            model = unifeat.create_model(name_or_model, features_only=True, **create_kwargs)
        else:
            with torch.device("meta"):
                model = unifeat.create_model(name_or_model, features_only=True, **create_kwargs)
        return model_data_config(model)
    if not isinstance(name_or_model, nn.Module):
        raise UnsupportedOptionError(
            f"data_config takes a model name or a torch.nn.Module, not "
            f"{type(name_or_model).__name__}"
        )
    if create_kwargs:
        raise UnsupportedOptionError(
            f"{', '.join(create_kwargs)} only apply when a model is given by name"
        )
    return model_data_config(name_or_model)


# -- the transform ---------------------------------------------------------------


def resize_size(config: DataConfig, height: int, width: int) -> tuple[int, int]:
    """``(H, W)`` the resize step gives an image of ``height`` x ``width``."""
    target_h, target_w = config.size
    # The epsilon keeps e.g. 224 / (224 / 232) at 232 (no timm config is affected).
    scale_h = math.floor(target_h / config.crop_pct + 1e-6)
    scale_w = math.floor(target_w / config.crop_pct + 1e-6)
    if config.crop_mode == "squash":
        return (scale_h, scale_w)
    if config.crop_mode == "border":
        ratio = max(height / scale_h, width / scale_w)
        return (round(height / ratio), round(width / ratio))
    if config.impl == "pil" and scale_h != scale_w:
        ratio = min(height / scale_h, width / scale_w)
        return (round(height / ratio), round(width / ratio))
    # Shorter side to the scale, the longer one in proportion (truncated), as
    # torchvision's Resize(int) and transformers' shortest_edge do.
    short = scale_h
    if height <= width:
        return (short, int(short * width / height))
    return (int(short * height / width), short)


def _pil_filter(name: str) -> Any:
    from torchvision.transforms import InterpolationMode

    return InterpolationMode(name)


class _Geometry:
    """Resize and crop a PIL image as ``config`` says: a ``uint8`` ``(H, W, C)`` array."""

    def __init__(self, config: DataConfig) -> None:
        self.config = config

    def __call__(self, image: PILImage.Image) -> np.ndarray:
        from unifeat._images import to_rgb

        config = self.config
        image = to_rgb(image)
        new_size = resize_size(config, image.height, image.width)
        if config.impl == "transformers":
            pixels = _transformers_geometry(image, new_size, config)
        else:
            pixels = _pil_geometry(image, new_size, config)
        if config.channel_order == "BGR":
            pixels = pixels[..., ::-1]
        return np.ascontiguousarray(pixels)

    def __repr__(self) -> str:
        config = self.config
        return (
            f"ResizeCrop(size={config.size}, crop_pct={config.crop_pct:g}, "
            f"crop_mode={config.crop_mode!r}, interpolation={config.interpolation!r}, "
            f"impl={config.impl!r})"
        )


def _pil_geometry(image: Any, new_size: tuple[int, int], config: DataConfig) -> np.ndarray:
    from torchvision.transforms import functional as F

    height, width = config.size
    image = F.resize(image, list(new_size), interpolation=_pil_filter(config.interpolation))
    if config.crop_mode == "border":
        fill = tuple(round(255 * m) for m in config.mean)
        pad_w, pad_h = max(width - image.width, 0), max(height - image.height, 0)
        if pad_w or pad_h:
            image = F.pad(
                image, [pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2], fill=fill
            )
    image = F.center_crop(image, [height, width])
    return np.array(image, dtype=np.uint8).reshape(height, width, -1)


def _transformers_geometry(image: Any, new_size: tuple[int, int], config: DataConfig) -> np.ndarray:
    from torchvision.transforms.v2 import functional as F

    height, width = config.size
    pixels = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)
    pixels = F.resize(
        pixels, list(new_size), interpolation=_pil_filter(config.interpolation), antialias=True
    )
    rows, cols = pixels.shape[-2:]
    if height > rows or width > cols:
        pad_w, pad_h = max(width - cols, 0), max(height - rows, 0)
        pixels = F.pad(pixels, [pad_w // 2, pad_h // 2, (pad_w + 1) // 2, (pad_h + 1) // 2])
        rows, cols = pixels.shape[-2:]
    top, left = int((rows - height) / 2.0), int((cols - width) / 2.0)
    pixels = pixels[:, top : top + height, left : left + width]
    return pixels.permute(1, 2, 0).numpy()


def normalize(pixels: Tensor, config: DataConfig, dtype: torch.dtype = torch.float32) -> Tensor:
    """A ``uint8`` batch ``(B, H, W, C)`` to normalized ``(B, C, H, W)`` floats, on
    the batch's device, with the same arithmetic as the source library."""
    if pixels.dtype != torch.uint8 or pixels.dim() != 4:
        raise UnsupportedOptionError(
            f"expected a uint8 (B, H, W, C) batch, got {pixels.dtype} {tuple(pixels.shape)}"
        )
    x = pixels.permute(0, 3, 1, 2).to(torch.float32)
    mean = torch.tensor(config.mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(config.std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    if config.impl == "transformers":
        # transformers folds the 1/255 into mean and std.
        x = x.sub(mean * (1.0 / _RESCALE)).div(std * (1.0 / _RESCALE))
    else:
        x = x.div(255).sub(mean).div(std)
    return x.to(dtype)


class _ToNormalizedTensor:
    """A ``uint8`` ``(H, W, C)`` array to a normalized ``(C, H, W)`` float tensor."""

    def __init__(self, config: DataConfig) -> None:
        self.config = config

    def __call__(self, pixels: np.ndarray) -> Tensor:
        return normalize(torch.from_numpy(np.ascontiguousarray(pixels))[None], self.config)[0]

    def __repr__(self) -> str:
        return f"ToNormalizedTensor(mean={self.config.mean}, std={self.config.std})"


class _ToRGB:
    def __call__(self, image: Any) -> Any:
        from unifeat._images import to_rgb

        return to_rgb(image)

    def __repr__(self) -> str:
        return "ToRGB()"


class _FlipChannels:
    def __call__(self, tensor: Tensor) -> Tensor:
        return tensor.flip(0)

    def __repr__(self) -> str:
        return "FlipChannels()"


def create_transform(
    config_or_model: DataConfig | nn.Module | str, training: bool = False
) -> Callable[[Any], Tensor]:
    """A transform from a PIL image to the model's normalized ``(C, H, W)`` input.

    Evaluation (``training=False``): resize and crop exactly as the source
    library does (the same pixels as timm's ``create_transform``, torchvision's
    weights ``transforms()``, transformers' image processor or open_clip's
    preprocess; tested against each), scale to [0, 1], normalize. Training:
    timm's basic recipe, a random resized crop (scale 0.08-1, aspect 3/4-4/3)
    and a horizontal flip, then the same normalization; add colour jitter or
    RandAugment yourself if you want them.

    Images in any PIL mode are accepted: 16-bit and float images are scaled to
    8 bits, palette, CMYK, grayscale and alpha images converted to RGB (see the
    docs page "Extraction", section "Images in the wild").

    Args:
        config_or_model: a :class:`DataConfig`, or a model or model name whose
            config :func:`data_config` resolves.
        training: the training-time augmentation instead of the evaluation crop.

    Returns:
        A ``torchvision.transforms.Compose``.

    Examples:
        >>> import unifeat
        >>> from PIL import Image
        >>> transform = unifeat.create_transform(unifeat.data_config("timm:resnet18"))
        >>> transform(Image.new("RGB", (320, 240), "tan")).shape
        torch.Size([3, 224, 224])
        >>> unifeat.create_transform("timm:resnet18", training=True)(Image.new("L", (64, 48))).shape
        torch.Size([3, 224, 224])
    """
    from torchvision import transforms

    config = (
        config_or_model if isinstance(config_or_model, DataConfig) else data_config(config_or_model)
    )
    if not training:
        return transforms.Compose([_Geometry(config), _ToNormalizedTensor(config)])
    steps: list[Any] = [
        _ToRGB(),
        transforms.RandomResizedCrop(
            config.size,
            scale=(0.08, 1.0),
            ratio=(3 / 4, 4 / 3),
            interpolation=_pil_filter(config.interpolation),
        ),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
    ]
    if config.channel_order == "BGR":
        steps.append(_FlipChannels())
    steps.append(transforms.Normalize(config.mean, config.std))
    return transforms.Compose(steps)


def geometry(config: DataConfig) -> Callable[[Any], np.ndarray]:
    """The resize-and-crop half of the evaluation transform (PIL image -> ``uint8``
    ``(H, W, C)``), which extraction runs where images are decoded."""
    return _Geometry(config)
