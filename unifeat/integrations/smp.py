"""segmentation_models_pytorch's decoders on any unifeat backbone (docs/heads.md).

smp's models (``smp.Unet``, ``smp.FPN``, ``smp.DeepLabV3Plus``, ...) take an
encoder by *name* and look it up in ``smp.encoders.encoders``, a dict of smp's
own encoders (timm's models come through ``tu-`` names, which refuse a plain
ViT). :func:`register_encoder` adds an entry there for any model unifeat
builds, by name or as a module, and returns the name to pass as
``encoder_name``. Its encoder, :class:`UnifeatEncoder`, gives smp's decoders
what they read: ``[x, f/2, f/4, f/8, f/16, f/32]`` (up to ``encoder_depth``),
the levels chosen by reduction from the model's ``feature_info``, a 0-channel
map where a model starts at stride 4 (as smp's own ``tu-`` encoders do), and
``encoder_output_stride`` through unifeat's ``output_stride``.

smp is imported by :func:`register_encoder` only: neither ``import unifeat`` nor
importing this module imports it.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from unifeat import _registry
from unifeat._api import create_model, feature_info
from unifeat._engine.model import FeatureModel
from unifeat._errors import BackendUnavailableError, UnsupportedOptionError
from unifeat._feature_info import FeatureInfo

__all__ = ["ENTRY_PREFIX", "UnifeatEncoder", "register_encoder"]

ENTRY_PREFIX = "unifeat:"
"""How the names :func:`register_encoder` returns begin; no smp encoder name does."""

_DEPTHS = (1, 2, 3, 4, 5)
"""smp's encoder depths: the input's halvings its decoders read (strides 2 to 32)."""

_OUTPUT_STRIDES = (8, 16, 32)

# The encoder builds the feature model itself and lays its outputs out as smp's
# decoders read them; each of these would change that layout (or is smp's to say:
# encoder_output_stride), so it is refused with the reason rather than overridden.
_SMP_OWNED: dict[str, str] = {
    "features_only": "the encoder always builds a feature model",
    "out_indices": (
        "the encoder picks one level per stride (2, 4, ..., 2**encoder_depth) by reduction"
    ),
    "output_type": "smp's decoders take a list",
    "output_fmt": "smp's decoders take NCHW maps",
    "return_nodes": "the encoder picks its levels by reduction",
    "return_prefix_tokens": "smp's decoders take maps only",
    "output_stride": (
        "smp says it: pass encoder_output_stride= to the smp model (DeepLabV3 and "
        "DeepLabV3Plus), which calls the encoder's make_dilated"
    ),
}
_SMP_OWNED_ACCEPTED: dict[str, tuple[object, ...]] = {
    "features_only": (True,),
    "out_indices": (None,),
    "output_type": (None, "list"),
    "output_fmt": ("NCHW",),
    "return_nodes": (None,),
    "return_prefix_tokens": (False,),
    "output_stride": (None,),
}
"""The values of those options that say what the encoder does anyway."""

# How each backend's library takes the input channels of a model built by name:
# smp's in_channels= reaches the model through these (timm adapts pretrained
# first-conv weights itself). Other backends' models take 3-channel images only.
_CHANNEL_OPTIONS: dict[str, str] = {"timm": "in_chans", "hf": "num_channels"}


def _import_smp() -> Any:
    try:
        import segmentation_models_pytorch
    except ImportError:
        raise BackendUnavailableError(
            "unifeat.integrations.smp needs segmentation_models_pytorch, which is not "
            'installed: pip install "unifeat[smp]"'
        ) from None
    return segmentation_models_pytorch


@dataclass(frozen=True)
class _Slot:
    """Where one of smp's strides (2, 4, ..., 32) comes from."""

    stride: int
    level: int | None
    """The feature model's level (absolute index), or None: the 0-channel placeholder."""


def _power_of_two(value: float) -> bool:
    return float(value).is_integer() and int(value) >= 1 and int(value) & (int(value) - 1) == 0


def _shown(values: Sequence[float]) -> str:
    return ", ".join(f"{v:g}" for v in values)


def _deepest_at(info: FeatureInfo, stride: int) -> int | None:
    """The deepest level at ``stride`` (the stage's last output, where a stem and a
    stage share one stride: open_clip's ModifiedResNet), or None."""
    found = [level.index for level in info if level.reduction == stride]
    return found[-1] if found else None


def _is_pyramid(info: FeatureInfo) -> bool:
    return any(level.module.startswith("pyramid.") for level in info)


def _plain_stride(info: FeatureInfo) -> float | None:
    """The stride of a plain model's blocks: the pyramid's level that is the last
    block's map itself (``pyramid.same``), None for a model without the pyramid."""
    for level in info:
        if level.module == "pyramid.same":
            return level.reduction
    return None


def _fit_refusal(info: FeatureInfo, label: str) -> str | None:
    """Why no smp decoder can read the model's levels, or None where depth 3 fits."""
    reductions = [level.reduction for level in info]
    if all(_deepest_at(info, stride) is not None for stride in (4, 8)):
        return None
    if len(set(reductions)) == 1:
        return (
            f"{label} is a plain model: every level is at stride {_shown(reductions[:1])}, "
            "while smp's decoders need maps at strides 4, 8, 16 and 32; register it with "
            'pyramid="simple", which adds ViTDet\'s simple feature pyramid (docs/levels.md)'
        )
    odd = [r for r in reductions if not _power_of_two(r)]
    if odd:
        return (
            f"{label} has levels at strides {_shown(reductions)}: smp's decoders need a map at "
            "each of strides 4, 8, 16 and 32, as they upsample by 2 from one level to the "
            f"next, and strides {_shown(odd)} are not powers of two (a patch-14 model's "
            "pyramid is at 3.5, 7, 14 and 28); use a model with a power-of-two patch size "
            "(patch 16) or another head"
        )
    return (
        f"{label} has levels at strides {_shown(reductions)}: smp's decoders need a map at "
        "each of strides 4, 8 and up to 2**encoder_depth (only stride 2 may be missing: "
        "the encoder gives a 0-channel map there)"
    )


def _slots(info: FeatureInfo, depth: int, label: str) -> list[_Slot]:
    """One level per stride 2, 4, ..., 2**depth: the deepest at that stride; stride 2
    may be the placeholder, any other missing stride is refused."""
    refusal = _fit_refusal(info, label)
    if refusal is not None:
        raise UnsupportedOptionError(refusal)
    slots = []
    for k in range(1, depth + 1):
        stride = 2**k
        level = _deepest_at(info, stride)
        if level is None and stride != 2:
            fits = max(d for d in _DEPTHS if d < k)
            raise UnsupportedOptionError(
                f"{label} has no level at stride {stride} (its strides are "
                f"{_shown([level.reduction for level in info])}), which "
                f"encoder_depth={depth} needs: use encoder_depth={fits} or less"
            )
        slots.append(_Slot(stride, level))
    return slots


# -- the entry's name ------------------------------------------------------------------


def _plain(value: object, key: str) -> object:
    """``value`` as JSON data that is the same in every process, for the entry's name."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (Path, torch.dtype, torch.device)):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): _plain(v, key) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, key) for v in value]
    if isinstance(value, type) or inspect.isfunction(value):
        return f"{value.__module__}.{value.__qualname__}"
    raise UnsupportedOptionError(
        f"register_encoder names its smp entry after its arguments, so that the same call "
        f"in a new process gives the same name; {key}={value!r} is a {type(value).__name__}, "
        "which has no such name: pass plain data (numbers, strings, lists, dicts, paths, "
        "dtypes, classes)"
    )


def _defaults() -> dict[str, object]:
    parameters = inspect.signature(create_model).parameters.values()
    return {p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty}


def _resolve(model: str | nn.Module, backend: object) -> tuple[str, str]:
    """The backend that builds ``model`` and how the entry's name calls the model."""
    if isinstance(model, str):
        return _registry.resolve_model_name(model, backend if isinstance(backend, str) else None)
    chosen = (
        _registry.canonical_backend(backend)
        if isinstance(backend, str)
        else _registry.backend_for_module(model)
    )
    return chosen, type(model).__qualname__


def _entry_name(model: str | nn.Module, options: Mapping[str, Any]) -> str:
    """``unifeat:<backend>:<model>``, and ``@<hash of the options>`` where there are
    any: the same in every process for the same arguments."""
    options = dict(options)
    backend, shown = _resolve(model, options.pop("backend", None))
    described: dict[str, object] = {
        key: _plain(value, key) for key, value in sorted(options.items())
    }
    if isinstance(model, nn.Module):
        # The module's structure stands for it: the same architecture built again in
        # a new process gives the same name (its weights come from the smp checkpoint).
        described["<module>"] = f"{type(model).__module__}.{model!r}"
    base = f"{ENTRY_PREFIX}{backend}:{shown}"
    if not described:
        return base
    text = json.dumps(described, sort_keys=True)
    return f"{base}@{hashlib.sha256(text.encode()).hexdigest()[:12]}"


class _HubWeightsRefused(dict[str, object]):
    """The entry's ``pretrained_settings``: smp downloads the weights named by
    ``encoder_weights`` from these (its default is ``"imagenet"``); a unifeat entry
    has its weights from :func:`register_encoder`, so any name is refused, saying so."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def __contains__(self, weights: object) -> bool:
        raise UnsupportedOptionError(
            f"encoder_weights={weights!r} asks smp for hub weights of {self.name!r}, a unifeat "
            "encoder, which has none there: pass encoder_weights=None; the encoder's weights "
            "are the model's as registered (register_encoder(..., pretrained=True) for its "
            "library's pretrained weights, checkpoint_path= for your own)"
        )


def register_encoder(model_name: str | nn.Module, **create_model_options: Any) -> str:
    """Register a unifeat model as a segmentation_models_pytorch encoder; returns its name.

    Pass the name to any smp model as ``encoder_name`` (with
    ``encoder_weights=None``): ``smp.Unet(name, encoder_weights=None)``,
    ``smp.create_model("fpn", name, encoder_weights=None)``. Each smp model
    built from it gets its own :class:`UnifeatEncoder`, built by
    ``unifeat.create_model(model_name, features_only=True, **create_model_options)``
    (a module passed in is copied for each, so two smp models never share
    weights). The encoder gives the decoder one level per stride 2, 4, ...,
    ``2**encoder_depth``, chosen from the model's ``feature_info`` by reduction
    (the deepest level at each stride), and a 0-channel map at stride 2 where
    the model starts at stride 4 (Swin, ConvNeXt, a ViT's pyramid), as smp's own
    ``tu-`` encoders do.

    The name is made from the arguments alone:
    ``"unifeat:<backend>:<model>"``, followed by ``@`` and a hash of the
    options where there are any (options left at ``create_model``'s defaults
    do not count). smp's ``save_pretrained`` stores it as ``encoder_name``, so
    in a new process the same ``register_encoder`` call, made before
    ``smp.from_pretrained``, gives the same name and lets smp rebuild the model.
    Registering again with the same arguments is harmless.

    Args:
        model_name: anything :func:`unifeat.create_model` takes: a model name
            (``"timm:convnext_tiny"``, ``"tv:resnet50"``, ``"hf:dinov2"``,
            ``"oc:ViT-B-16"``) or an ``nn.Module``.
        **create_model_options: :func:`unifeat.create_model`'s options and the
            model's constructor kwargs: ``pretrained=True`` (the library's
            weights), ``checkpoint_path=``, ``pyramid="simple"`` (required for
            plain models such as ViTs), ``frozen_levels=``, ``norm_eval=``, ....
            They must be plain data (numbers, strings, lists, dicts, paths,
            dtypes, classes), from which the name is made.

    Returns:
        The name to pass to smp as ``encoder_name``.

    Raises:
        UnknownModelError: no backend knows ``model_name``.
        UnsupportedOptionError: an option unifeat refuses for the model; one the
            encoder sets itself (``out_indices``, ``output_stride``, which smp's
            ``encoder_output_stride`` gives, ``output_type``, ``output_fmt``,
            ``return_nodes``, ``return_prefix_tokens``); or a model whose levels
            no smp decoder can read: a plain model without ``pyramid="simple"``,
            a pyramid at strides that are not powers of two (patch 14), a model
            without levels at strides 4 and 8.
        BackendUnavailableError: segmentation_models_pytorch is not installed.

    See docs/heads.md for what each decoder needs and what is refused.

    Examples:
        >>> import torch
        >>> import segmentation_models_pytorch as smp
        >>> from unifeat.integrations.smp import register_encoder
        >>> name = register_encoder("timm:vit_tiny_patch16_224", img_size=64, depth=4,
        ...                         pyramid="simple")
        >>> name
        'unifeat:timm:vit_tiny_patch16_224@00cb1a9f3038'
        >>> model = smp.FPN(name, encoder_weights=None, classes=3)
        >>> model.encoder.out_channels
        [3, 0, 48, 96, 192, 192]
        >>> tuple(model(torch.randn(2, 3, 64, 64)).shape)
        (2, 3, 64, 64)
    """
    for key, reason in _SMP_OWNED.items():
        if key in create_model_options and not any(
            _same(create_model_options[key], accepted) for accepted in _SMP_OWNED_ACCEPTED[key]
        ):
            raise UnsupportedOptionError(
                f"register_encoder does not take {key}={create_model_options[key]!r}: {reason}"
            )
    defaults = _defaults()
    options = {
        key: value
        for key, value in create_model_options.items()
        if key not in _SMP_OWNED and not (key in defaults and _same(value, defaults[key]))
    }
    # The name first: it refuses option values with no stable name before any build.
    name = _entry_name(model_name, options)
    info = feature_info(model_name, **options)
    backend, _ = _resolve(model_name, options.get("backend"))
    channels = _CHANNEL_OPTIONS.get(backend)
    if channels in options:
        raise UnsupportedOptionError(
            f"register_encoder does not take {channels}={options[channels]!r}: smp says the "
            f"input channels: pass in_channels= to the smp model, which builds the {backend} "
            f"model with {channels} through the encoder's set_in_channels"
        )
    refusal = _fit_refusal(info, _label(model_name))
    if refusal is not None:
        raise UnsupportedOptionError(refusal)
    smp = _import_smp()
    smp.encoders.encoders[name] = {
        "encoder": UnifeatEncoder,
        "params": {"source": model_name, "options": options, "entry": name},
        "pretrained_settings": _HubWeightsRefused(name),
    }
    return name


def _same(value: object, default: object) -> bool:
    try:
        return type(value) is type(default) and bool(value == default)
    except Exception:
        return False


def _label(model: str | nn.Module) -> str:
    return repr(model) if isinstance(model, str) else f"module {type(model).__qualname__}"


class UnifeatEncoder(nn.Module):
    """An smp encoder over a unifeat feature model; smp builds it from a
    :func:`register_encoder` entry.

    It has smp's encoder interface (smp 0.6's ``EncoderMixin``):
    ``forward(x)`` gives ``[x, f/2, f/4, ..., f/2**depth]``, ``out_channels``
    their channels (``in_channels`` first, 0 for the stride-2 placeholder),
    ``output_stride``, ``set_in_channels`` and ``make_dilated``. The feature
    model is ``encoder.model`` (its ``feature_info``, ``freeze``,
    ``set_grad_checkpointing``, ... are there), so the smp model's keys are
    ``encoder.model.<the source model's own names>``, as for smp's ``tu-``
    encoders.

    Args:
        source: the model name or module given to :func:`register_encoder`.
        options: its ``create_model`` options.
        entry: the registered name (for messages).
        depth: smp's ``encoder_depth``: strides 2 to ``2**depth``.
        output_stride: smp's ``encoder_output_stride``: 8 or 16 dilate the
            levels past it through unifeat's ``output_stride``
            (docs/output-stride.md); 32 leaves them.

    Examples:
        >>> import torch
        >>> from unifeat.integrations.smp import UnifeatEncoder
        >>> encoder = UnifeatEncoder("tv:resnet18", {}, depth=4, output_stride=16)
        >>> encoder.out_channels, encoder.output_stride
        ([3, 64, 64, 128, 256], 16)
        >>> [tuple(f.shape[1:]) for f in encoder(torch.randn(2, 3, 64, 64))]
        [(3, 64, 64), (64, 32, 32), (64, 16, 16), (128, 8, 8), (256, 4, 4)]
    """

    # unifeat's feature models run hooks and library code TorchScript cannot
    # compile (docs/training.md, "TorchScript").
    _is_torch_scriptable = False
    _is_torch_exportable = True
    _is_torch_compilable = True

    model: FeatureModel
    _source: str | nn.Module

    def __init__(
        self,
        source: str | nn.Module,
        options: Mapping[str, Any],
        entry: str | None = None,
        depth: int = 5,
        output_stride: int = 32,
    ) -> None:
        super().__init__()
        if isinstance(depth, bool) or depth not in _DEPTHS:
            raise UnsupportedOptionError(
                f"invalid encoder_depth={depth!r} for {entry or _label(source)}: expected "
                f"1 to 5 (the encoder gives strides 2 to 2**encoder_depth, at most 32)"
            )
        # Held outside the module tree: the feature model built from it holds what the
        # levels use, and a source module registered here would add its unused head to
        # parameters(), state_dict() and the optimizer. It is kept to rebuild from when
        # smp asks for other input channels or a dilation.
        self.__dict__["_source"] = source
        self._options = dict(options)
        self._depth = depth
        self.name = entry or _label(source)
        self._output_stride = 32
        self._in_channels = 3
        self._slots: list[_Slot] = []
        self._positions: list[int | None] = []
        self._build(output_stride=_check_output_stride(output_stride, self.name))

    # -- smp's interface --------------------------------------------------------------

    @property
    def out_channels(self) -> list[int]:
        """The channels of ``forward``'s maps: the input's, then one per stride (0 for
        the stride-2 placeholder)."""
        channels = self.model.feature_info.channels
        return [self._in_channels] + [
            0 if slot.level is None else channels(slot.level) for slot in self._slots
        ]

    @property
    def output_stride(self) -> int:
        """The stride of the deepest map: ``min(encoder_output_stride, 2**depth)``."""
        return min(self._output_stride, 2**self._depth)

    def forward(self, x: Tensor) -> list[Tensor]:
        """``[x, f/2, f/4, ..., f/2**depth]`` (NCHW), as smp's decoders read them."""
        maps = self.model(x)
        assert isinstance(maps, list)
        features = [x]
        for position in self._positions:
            if position is None:
                # smp's decoders skip a 0-channel map, as for its own tu- encoders of
                # models that start at stride 4.
                n, _, h, w = x.shape
                features.append(x.new_empty(n, 0, h // 2, w // 2))
            else:
                features.append(maps[position])
        return features

    def set_in_channels(self, in_channels: int, pretrained: bool = True) -> None:
        """Make the model take ``in_channels``-channel images (smp's ``in_channels=``).

        Through the library's own option for a model built by name: timm's
        ``in_chans`` (timm adapts pretrained first-conv weights itself) and a
        transformers config's ``num_channels``. Other models take the channels
        they were built with, and any other count is refused. ``pretrained`` is
        smp's and not used: the weights are those registered.
        """
        del pretrained
        if in_channels == self._in_channels:
            return
        backend = self.model.backend
        option = _CHANNEL_OPTIONS.get(backend)
        if option is None or not isinstance(self._source, str):
            why = (
                f"a {backend} model has no option for its input channels (unifeat passes "
                "timm's in_chans and transformers' num_channels)"
                if isinstance(self._source, str)
                else "a module passed in takes the channels it was built with"
            )
            raise UnsupportedOptionError(
                f"in_channels={in_channels} for {self.name}: it takes {self._in_channels}-"
                f"channel images, and {why}: build the smp model with "
                f"in_channels={self._in_channels}, or register a model built for your channels"
            )
        if backend == "hf" and self._options.get("pretrained"):
            raise UnsupportedOptionError(
                f"in_channels={in_channels} for {self.name}: transformers loads pretrained "
                f"weights only into a model of the channels they were trained for "
                f"({self._in_channels}), and does not adapt the first convolution as timm does: "
                f"build the smp model with in_channels={self._in_channels}"
            )
        self._build(output_stride=self._output_stride, channels=(option, in_channels))

    def make_dilated(self, output_stride: int) -> None:
        """Keep the levels past ``output_stride`` (8 or 16) at it, as smp's
        DeepLabV3 and DeepLabV3Plus ask, through unifeat's ``output_stride``
        (docs/output-stride.md); the weights are kept.

        A model that cannot dilate is refused with unifeat's error saying why. A
        plain model's pyramid keeps its blocks' stride: at an ``output_stride``
        equal to its patch size, the strides past it take the last block's map
        itself (its pyramid's stride-32 level is only a max-pool of it); a
        smaller one is refused.
        """
        output_stride = _check_output_stride(output_stride, self.name)
        if output_stride == self._output_stride:
            return
        old = self.model
        self._build(output_stride=output_stride, channels=self._channel_option())
        self.model.load_state_dict(old.state_dict())
        parameter = next(old.parameters(), None)
        if parameter is not None:
            self.model.to(device=parameter.device, dtype=parameter.dtype)
        self.model.train(old.training)

    def get_stages(self) -> dict[int, Sequence[nn.Module]]:
        """Refused: smp's ``EncoderMixin.make_dilated`` reads it to patch strides in
        place; this encoder dilates through unifeat instead (:meth:`make_dilated`)."""
        raise UnsupportedOptionError(
            f"{self.name} dilates through unifeat's output_stride, not by patching its "
            "stages in place: call make_dilated(output_stride)"
        )

    # -- building -----------------------------------------------------------------------

    def _channel_option(self) -> tuple[str, int] | None:
        option = _CHANNEL_OPTIONS.get(self.model.backend)
        if option is None or self._in_channels == 3 or option in self._options:
            return None
        return option, self._in_channels

    def _build(self, *, output_stride: int, channels: tuple[str, int] | None = None) -> None:
        options = dict(self._options)
        if channels is not None:
            options[channels[0]] = channels[1]
        native = feature_info(self._source, **options)
        slots = _slots(native, self._depth, self.name)
        past = [slot for slot in slots if slot.stride > output_stride]
        build: dict[str, Any] = {}
        if past and _is_pyramid(native):
            slots = self._pyramid_dilated(native, slots, output_stride)
        elif past:
            build["output_stride"] = output_stride
        levels = sorted({slot.level for slot in slots if slot.level is not None})
        if channels is not None:
            # unifeat reads a timm model's input channels from its pretrained_cfg, which
            # in_chans does not change: say them through input_size (C, H, W).
            options.setdefault("input_size", self._input_size_with(channels[1], options))
        try:
            model = create_model(
                self._source,
                features_only=True,
                out_indices=levels,
                output_type="list",
                **build,
                **options,
            )
        except UnsupportedOptionError as exc:
            if not build:
                raise
            raise UnsupportedOptionError(
                f"encoder_output_stride={output_stride} (smp's make_dilated) for {self.name}: {exc}"
            ) from exc
        assert isinstance(model, FeatureModel)
        expected = [min(slot.stride, output_stride) for slot in slots if slot.level is not None]
        got = [model.feature_info.reduction(slot.level) for slot in slots if slot.level is not None]
        if got != expected:
            raise UnsupportedOptionError(
                f"{self.name} at output_stride={output_stride} gives maps at strides "
                f"{_shown(got)}, where smp's decoders read {_shown(expected)}"
            )
        self.model = model
        self._slots = slots
        self._positions = [None if s.level is None else levels.index(s.level) for s in slots]
        self._output_stride = output_stride
        self._in_channels = model.input_size[0]

    def _input_size_with(self, channels: int, options: Mapping[str, Any]) -> tuple[int, int, int]:
        given = options.get("input_size")
        if isinstance(given, (tuple, list)) and len(given) >= 2:
            return channels, int(given[-2]), int(given[-1])
        if isinstance(given, int):
            return channels, given, given
        _, height, width = self.model.input_size
        return channels, height, width

    def _pyramid_dilated(
        self, info: FeatureInfo, slots: list[_Slot], output_stride: int
    ) -> list[_Slot]:
        """A plain model's pyramid at ``output_stride``: its blocks run at their patch
        size, so the strides past it take the block map (``pyramid.same``), as a
        dilated ResNet's last stages stay at the output stride."""
        patch = _plain_stride(info)
        if patch != output_stride:
            raise UnsupportedOptionError(
                f"encoder_output_stride={output_stride} for {self.name}: a plain model's blocks "
                f"run at its patch size ({_shown([patch or 0])}) and cannot be dilated, and "
                "its pyramid's levels past that are max-pools of the last block's map; "
                f"pass encoder_output_stride={_shown([patch or 0])}"
            )
        same = _deepest_at(info, output_stride)
        return [
            slot if slot.stride <= output_stride else _Slot(slot.stride, same) for slot in slots
        ]


def _check_output_stride(output_stride: object, name: str) -> int:
    if isinstance(output_stride, bool) or output_stride not in _OUTPUT_STRIDES:
        raise UnsupportedOptionError(
            f"invalid encoder_output_stride={output_stride!r} for {name}: expected 8, 16 or 32"
        )
    return int(output_stride)
