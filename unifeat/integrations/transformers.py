"""transformers' heads on any unifeat backbone (docs/heads.md, section "transformers").

transformers' task models (UperNet, Mask2Former, DPT, ...) build their backbone
from ``backbone_config`` through ``AutoBackbone``. Importing this module
registers the model type ``"unifeat_backbone"`` with ``AutoConfig`` and
``AutoBackbone``, so a :class:`UnifeatBackboneConfig` naming any model unifeat
builds (timm, torchvision, transformers, open_clip) is such a backbone:

>>> import torch
>>> from transformers import UperNetConfig, UperNetForSemanticSegmentation
>>> from unifeat.integrations.transformers import UnifeatBackboneConfig
>>> backbone = UnifeatBackboneConfig(model_name="tv:resnet18", out_indices=(1, 2, 3, 4))
>>> backbone.channels, backbone.feature_strides
([64, 128, 256, 512], [4, 8, 16, 32])
>>> config = UperNetConfig(backbone_config=backbone, hidden_size=32, pool_scales=[1, 2],
...                        auxiliary_in_channels=256, auxiliary_channels=16, num_labels=3)
>>> model = UperNetForSemanticSegmentation(config)
>>> out = model(torch.randn(2, 3, 32, 32), labels=torch.randint(0, 3, (2, 32, 32)))
>>> tuple(out.logits.shape), out.loss.requires_grad
((2, 3, 32, 32), True)

Registration happens on import, once per process (importing again is harmless):
import this module before ``from_pretrained`` of a head model saved with a
unifeat backbone, as for any model type transformers does not ship.
"""

from __future__ import annotations

import inspect
import json
import math
import os
from collections.abc import Sequence
from typing import Any, ClassVar, cast

import torch
from torch import Tensor, nn
from transformers import AutoBackbone, AutoConfig
from transformers.backbone_utils import BackboneConfigMixin, BackboneMixin
from transformers.configuration_utils import PreTrainedConfig
from transformers.generation.configuration_utils import GenerationConfig
from transformers.modeling_outputs import BackboneOutput
from transformers.modeling_utils import PreTrainedModel

import unifeat
from unifeat._errors import InvalidIndicesError, UnsupportedOptionError, format_choices
from unifeat._feature_info import FeatureInfo
from unifeat._feature_model import FeatureModel

__all__ = ["UnifeatBackbone", "UnifeatBackboneConfig", "check_head_config"]

MODEL_TYPE = "unifeat_backbone"

# The config's own options, in the order messages list them.
_OPTIONS = (
    "model_name",
    "out_indices",
    "out_features",
    "pyramid",
    "output_stride",
    "norm",
    "frozen_levels",
    "norm_eval",
    "reshape_hidden_states",
    "pretrained",
    "checkpoint_path",
    "model_kwargs",
)
# create_model's options that a backbone config does not take: the backbone's
# outputs are fixed by what heads read (a tuple of NCHW maps, or tokens).
_NOT_OPTIONS = {
    "features_only": "a backbone is always a feature model",
    "output_type": "heads read a tuple of levels in depth order",
    "output_fmt": "heads read NCHW maps (or [B, 1 + N, C] tokens with reshape_hidden_states=False)",
    "return_prefix_tokens": "reshape_hidden_states=False returns the class token with the patches",
    "return_nodes": "heads read levels, which out_indices or out_features pick",
    "input_size": "levels are measured at the model's own input size",
    "tracer_kwargs": "a config is saved as JSON, which cannot hold modules or functions",
    "backend": "name the backend in model_name ('timm:...', 'tv:...', 'hf:...', 'oc:...')",
    "device": "transformers places the head model (model.to(...), device_map=)",
    "dtype": "transformers sets the head model's dtype (dtype= in from_pretrained or from_config)",
}


def _json_value(value: Any, what: str) -> Any:
    """``value`` as it reads back from JSON (tuples become lists), or a refusal: a
    config is saved as JSON, and a backbone built from the saved config must be the
    backbone built from this one."""
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise UnsupportedOptionError(
            f"{what} must be JSON-serializable (numbers, strings, lists, dicts), because "
            f"UnifeatBackboneConfig is saved as config.json: {exc}"
        ) from None


def _nominal_stride(reduction: float) -> int:
    """A level's stride as heads count with it: the power of two nearest to its
    reduction (the reduction itself for 4, 8, 16, 32; 4, 8, 16, 32 for a patch-14
    pyramid's 3.5, 7, 14, 28). Mask2Former derives its level count from the log2 of
    its ``feature_strides``, which a stride of 7 would throw off."""
    return int(2 ** round(math.log2(reduction)))


class UnifeatBackboneConfig(BackboneConfigMixin, PreTrainedConfig):
    """The config of a :class:`UnifeatBackbone`: any model unifeat builds, as the
    ``backbone_config`` of a transformers head model.

    The options are :func:`unifeat.create_model`'s (``features_only=True`` always),
    saved as JSON: ``model_name`` names the model (``"timm:resnet50"``,
    ``"tv:convnext_tiny"``, ``"hf:dinov2"``, ``"oc:ViT-B-32"``, ...),
    ``model_kwargs`` holds its constructor's arguments (``{"depth": 4}``), and the
    levels follow unifeat's index rule (docs/levels.md): ``out_indices=None`` is
    unifeat's default (every level of a hierarchical net, the last 3 blocks of a
    plain ViT, the 4 levels of ``pyramid="simple"``), negatives count from the end,
    outputs come in depth order.

    transformers' backbone conventions hold on top of them: ``stage_names`` lists
    every level's module name (``["act1", "layer1", ..., "layer4"]`` for a timm
    ResNet), and ``out_indices`` (normalized: non-negative, sorted) and
    ``out_features`` (their stage names) say which levels the backbone returns;
    either may be given, or set later, as on transformers' own backbone configs.

    Everything is checked when the config is made, on the meta device (nothing is
    allocated, no weights are read): an unknown model name, an option the model
    cannot honour or an index out of range is a unifeat error here, not deep inside
    a head. The file ``checkpoint_path`` names is read when the backbone is built.

    Weights: ``pretrained=True`` (the backend's pretrained weights) and
    ``checkpoint_path`` (a local state dict of the source model or of a unifeat
    feature model) are loaded when the backbone is built from this config: a new
    head model, ``UperNetForSemanticSegmentation(config)``. Inside a head model's
    ``from_pretrained`` neither is read (no hub, no file): the head's own
    checkpoint holds the backbone's trained weights (docs/heads.md).

    Read-only, from the levels: ``channels`` and ``feature_strides`` of the
    returned levels (what ``Mask2FormerConfig(feature_strides=...)`` must say), and
    ``feature_info`` (a :class:`unifeat.FeatureInfo`). With
    ``reshape_hidden_states=False`` (DPT) the config also has ``hidden_size`` and
    ``patch_size``, which DPT reads.

    Attributes:
        model_name: the model, as :func:`unifeat.create_model` names it.
        out_indices: which levels to return (unifeat's index rule).
        out_features: the same by stage name, instead of ``out_indices``.
        pyramid: ``"simple"``: ViTDet's simple pyramid on a plain ViT's last block,
            4 levels at strides 4-32 (docs/levels.md).
        output_stride: dilate the later stages to this stride (8, 16).
        norm: apply the final norm to the levels it fits (a ViT's blocks).
        frozen_levels: freeze what levels ``0..frozen_levels`` depend on.
        norm_eval: hold every norm layer in eval mode while training.
        reshape_hidden_states: ``True``: NCHW maps; ``False``: ``[B, 1 + N, C]``
            tokens, the class token first, for DPT (a plain ViT with exactly one
            prefix token only).
        pretrained: load the backend's pretrained weights when built.
        checkpoint_path: a local state dict loaded when built.
        model_kwargs: the model's own constructor arguments (JSON values).

    Raises:
        UnknownModelError: no backend knows ``model_name``.
        InvalidIndicesError: ``out_indices`` or ``out_features`` out of range.
        UnsupportedOptionError: an option the model cannot honour, an unknown
            option, or ``model_kwargs`` that JSON cannot hold.

    Examples:
        >>> from unifeat.integrations.transformers import UnifeatBackboneConfig
        >>> config = UnifeatBackboneConfig(model_name="timm:resnet18", out_indices=(1, -1))
        >>> config.stage_names
        ['act1', 'layer1', 'layer2', 'layer3', 'layer4']
        >>> config.out_indices, config.out_features, config.channels
        ([1, 4], ['layer1', 'layer4'], [64, 512])
        >>> same = UnifeatBackboneConfig.from_dict(config.to_dict())
        >>> same.out_features, same.to_dict() == config.to_dict()
        (['layer1', 'layer4'], True)
    """

    model_type = MODEL_TYPE

    model_name: str | None = None
    pyramid: str | None = None
    output_stride: int | None = None
    norm: bool = False
    frozen_levels: int | None = None
    norm_eval: bool = False
    reshape_hidden_states: bool = True
    pretrained: bool = False
    checkpoint_path: str | None = None
    model_kwargs: dict[str, Any] | None = None

    # Recomputed from the model on every load, never taken from a saved file.
    _DERIVED: ClassVar[tuple[str, ...]] = ("hidden_size", "patch_size")

    def __post_init__(self, **kwargs: Any) -> None:
        out_indices = kwargs.pop("out_indices", None)
        out_features = kwargs.pop("out_features", None)
        saved_stage_names = kwargs.pop("stage_names", None)
        for name in self._DERIVED:
            kwargs.pop(name, None)
        _refuse_unknown(kwargs)
        self._check_fields()
        self._resolve(out_indices, out_features, saved_stage_names)
        super().__post_init__(**kwargs)

    # -- the levels -------------------------------------------------------------------------

    @property
    def _label(self) -> str:
        return f"unifeat backbone {self.model_name!r}"

    def unifeat_options(self) -> dict[str, Any]:
        """The keyword arguments :func:`unifeat.create_model` and
        :func:`unifeat.feature_info` take for this config, except ``out_indices``,
        ``checkpoint_path`` and ``features_only``.

        Examples:
            >>> from unifeat.integrations.transformers import UnifeatBackboneConfig
            >>> config = UnifeatBackboneConfig(model_name="timm:resnet18", frozen_levels=1)
            >>> config.unifeat_options()["frozen_levels"]
            1
        """
        return dict(
            pretrained=self.pretrained,
            output_stride=self.output_stride,
            pyramid=self.pyramid,
            norm=self.norm,
            frozen_levels=self.frozen_levels,
            norm_eval=self.norm_eval,
            return_prefix_tokens=not self.reshape_hidden_states,
            **(self.model_kwargs or {}),
        )

    @property
    def feature_info(self) -> FeatureInfo:
        """Every level, and the ones the backbone returns (``out_indices``).

        Examples:
            >>> from unifeat.integrations.transformers import UnifeatBackboneConfig
            >>> config = UnifeatBackboneConfig(model_name="tv:resnet18", out_indices=(2, 3))
            >>> info = config.feature_info
            >>> len(info), info.module_name(), info.reduction()
            (5, ['layer2', 'layer3'], [8, 16])
        """
        return self._levels.from_other(tuple(self._out_indices or ()))

    @property
    def channels(self) -> list[int]:
        """The channels of the returned levels, in depth order."""
        return list(self.feature_info.channels())

    @property
    def feature_strides(self) -> list[int]:
        """The nominal strides of the returned levels: the power of two nearest to
        each reduction, which is the reduction itself for the usual strides 4 to 32
        (a patch-14 pyramid's 3.5, 7, 14, 28 give 4, 8, 16, 32; ``feature_info``
        has the exact ones). Pass it to ``Mask2FormerConfig(feature_strides=...)``,
        whose pixel decoder counts levels by the log2 of these.

        Examples:
            >>> from unifeat.integrations.transformers import UnifeatBackboneConfig
            >>> config = UnifeatBackboneConfig(model_name="hf:dinov2", pyramid="simple",
            ...     model_kwargs=dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
            ...                       patch_size=14, image_size=56))
            >>> config.feature_info.reduction(), config.feature_strides
            ([3.5, 7, 14, 28], [4, 8, 16, 32])
        """
        return [_nominal_stride(r) for r in self.feature_info.reduction()]

    def _check_fields(self) -> None:
        if not isinstance(self.model_name, str) or not self.model_name:
            raise UnsupportedOptionError(
                f"UnifeatBackboneConfig needs model_name=, a model name as unifeat.create_model "
                f"takes it ('timm:resnet50', 'tv:resnet50', 'hf:dinov2', 'oc:ViT-B-32'), got "
                f"{self.model_name!r}: a config is saved as JSON, so it names its model"
            )
        if not isinstance(self.reshape_hidden_states, bool):
            raise UnsupportedOptionError(
                f"invalid reshape_hidden_states={self.reshape_hidden_states!r} for {self._label}: "
                "expected True (NCHW maps) or False ([B, 1 + N, C] tokens, for DPT)"
            )
        if isinstance(self.checkpoint_path, os.PathLike):
            self.checkpoint_path = os.fspath(self.checkpoint_path)
        if self.checkpoint_path is not None and not isinstance(self.checkpoint_path, str):
            raise UnsupportedOptionError(
                f"invalid checkpoint_path={self.checkpoint_path!r} for {self._label}: expected "
                "the path of a local .pth/.pt/.safetensors file"
            )
        kwargs = self.model_kwargs if self.model_kwargs is not None else {}
        if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
            raise UnsupportedOptionError(
                f"invalid model_kwargs={kwargs!r} for {self._label}: expected a dict of the "
                "model's constructor arguments by name"
            )
        for key in kwargs:
            if key in _OPTIONS:
                raise UnsupportedOptionError(
                    f"model_kwargs of {self._label} holds {key!r}, an option of the config "
                    f"itself: pass UnifeatBackboneConfig({key}=...)"
                )
            if key in _NOT_OPTIONS:
                raise UnsupportedOptionError(
                    f"model_kwargs of {self._label} holds {key!r}, which a backbone config does "
                    f"not take: {_NOT_OPTIONS[key]}"
                )
        self.model_kwargs = _json_value(kwargs, f"model_kwargs of {self._label}")

    def _resolve(
        self, out_indices: object, out_features: object, saved_stage_names: object
    ) -> None:
        """Find the levels (on the meta device) and set transformers' stage names,
        ``out_indices`` and ``out_features`` from them."""
        name = str(self.model_name)
        options = self.unifeat_options()
        if out_features is not None:
            every = unifeat.feature_info(name, **options)
            wanted = _indices_of(out_features, [level.module for level in every], self._label)
            if out_indices is not None:
                given = every.from_other(_index_spec(out_indices)).out_indices
                if given != every.from_other(wanted).out_indices:
                    raise InvalidIndicesError(
                        f"out_indices={out_indices!r} and out_features={out_features!r} name "
                        f"different levels of {self._label}: pass one of them"
                    )
            out_indices = wanted
        info = unifeat.feature_info(name, out_indices=_index_spec(out_indices), **options)
        stage_names = [level.module for level in info]
        if len(set(stage_names)) != len(stage_names):
            raise UnsupportedOptionError(
                f"the levels of {self._label} share module names ({stage_names}), which "
                "transformers' stage names cannot tell apart"
            )
        if saved_stage_names is not None and list(saved_stage_names) != stage_names:  # type: ignore[call-overload]
            raise UnsupportedOptionError(
                f"this config was saved with stage_names={list(saved_stage_names)!r}, but "  # type: ignore[call-overload]
                f"{self._label} now has {stage_names!r}: the installed library builds another "
                "model than the one saved, whose weights would not fit it"
            )
        self._levels = info
        self.stage_names = stage_names
        BackboneConfigMixin.set_output_features_output_indices(
            self, out_features=None, out_indices=list(info.out_indices)
        )
        if not self.reshape_hidden_states:
            self._resolve_tokens(info)

    def _resolve_tokens(self, info: FeatureInfo) -> None:
        """``reshape_hidden_states=False``: the levels are returned as ``[B, 1 + N, C]``
        tokens, class token first (DPT's input). Only a plain ViT with exactly one
        prefix token has them: with none there is no class token to read out, and
        with more (registers, a distillation token) nothing says which one is the
        class token. Counted with one forward on the meta device."""
        widths = set(info.channels())
        reductions = set(info.reduction())
        if len(widths) != 1 or len(reductions) != 1:
            raise UnsupportedOptionError(
                f"reshape_hidden_states=False returns tokens of one width and one patch grid, "
                f"but the levels {info.out_indices} of {self._label} have channels "
                f"{info.channels()} and reductions {info.reduction()}: pick blocks of a plain ViT"
            )
        options = {
            k: v
            for k, v in self.unifeat_options().items()
            if k not in ("pretrained", "frozen_levels", "norm_eval")
        }
        probe = unifeat.create_model(
            str(self.model_name),
            features_only=True,
            out_indices=info.out_indices,
            device="meta",
            **options,
        )
        assert isinstance(probe, FeatureModel)
        with torch.no_grad():
            (level,) = probe(torch.empty(1, *probe.input_size, device="meta"))[:1]
        prefix = _prefix_count(level)
        if prefix != 1:
            raise UnsupportedOptionError(
                f"reshape_hidden_states=False returns the class token and the patch tokens, "
                f"but {self._label} has {prefix} prefix tokens: DPT reads exactly one (a class "
                "token at index 0); a model with register or distillation tokens is not "
                "supported, as nothing tells which prefix token is the class token"
            )
        (width,) = widths
        (reduction,) = reductions
        self.hidden_size = int(width)
        self.patch_size = int(reduction)

    # -- transformers' conventions ------------------------------------------------------------

    @property
    def out_indices(self) -> list[int] | None:
        """The returned levels (non-negative, in depth order); setting it follows
        unifeat's index rule and updates ``out_features``."""
        return self._out_indices

    @out_indices.setter
    def out_indices(self, out_indices: Sequence[int] | int | None) -> None:
        if out_indices is None:  # unifeat's default, which depends on the model
            chosen = unifeat.feature_info(
                str(self.model_name), **self.unifeat_options()
            ).out_indices
        else:
            chosen = self._levels.from_other(_index_spec(out_indices)).out_indices
        BackboneConfigMixin.set_output_features_output_indices(
            self, out_features=None, out_indices=list(chosen)
        )

    @property
    def out_features(self) -> list[str] | None:
        """The stage names of the returned levels; setting it updates ``out_indices``."""
        return self._out_features

    @out_features.setter
    def out_features(self, out_features: Sequence[str]) -> None:
        chosen = self._levels.from_other(_indices_of(out_features, self.stage_names, self._label))
        BackboneConfigMixin.set_output_features_output_indices(
            self, out_features=None, out_indices=list(chosen.out_indices)
        )

    def to_dict(self) -> dict[str, Any]:
        """The config as JSON-ready data: the options, ``stage_names``,
        ``out_indices`` and ``out_features`` (the levels themselves are found again
        from the model on load)."""
        output = super().to_dict()
        output.pop("_levels", None)
        return output


def _index_spec(value: object) -> Any:
    """Lists (from JSON) as the tuples unifeat's index rule takes; anything else as
    it is, for the index rule to accept or refuse naming it."""
    return tuple(value) if isinstance(value, list) else value


def _indices_of(out_features: object, stage_names: list[str], label: str) -> tuple[int, ...]:
    if isinstance(out_features, str) or not isinstance(out_features, Sequence):
        raise InvalidIndicesError(
            f"out_features must be a list of stage names of {label}, got {out_features!r}; "
            f"its stage names are {format_choices(stage_names)}"
        )
    unknown = [name for name in out_features if name not in stage_names]
    if unknown:
        raise InvalidIndicesError(
            f"out_features {unknown!r} are not stage names of {label}: they are "
            f"{format_choices(stage_names)}"
        )
    return tuple(stage_names.index(name) for name in out_features)


_ACCEPTED: set[str] | None = None


def _refuse_unknown(kwargs: dict[str, Any]) -> None:
    """A keyword the config does not know is an error, not an attribute silently
    set (``depth=4`` meant for the model belongs in ``model_kwargs``). What
    transformers itself writes into or reads from any config passes."""
    global _ACCEPTED
    if _ACCEPTED is None:
        base = PreTrainedConfig()
        _ACCEPTED = {
            *base.to_dict(),
            *inspect.signature(PreTrainedConfig).parameters,
            *GenerationConfig._get_default_generation_params(),
            "model_type",
            "torch_dtype",
            "num_labels",
            "name_or_path",
            "output_attentions",
            "attn_implementation",
            "experts_implementation",
            "per_layer_config",
        }
    unknown = sorted(k for k in kwargs if k not in _ACCEPTED and not k.startswith("_"))
    if unknown:
        raise UnsupportedOptionError(
            f"UnifeatBackboneConfig takes no option {format_choices(unknown)}: its options are "
            f"{', '.join(_OPTIONS)}; the model's own constructor arguments go in "
            "model_kwargs={...}"
        )


class UnifeatBackbone(BackboneMixin, PreTrainedModel):
    """A unifeat feature model as a transformers backbone (``AutoBackbone``).

    Built from a :class:`UnifeatBackboneConfig`, it holds the
    :class:`unifeat.FeatureModel` of ``unifeat.create_model(config.model_name,
    features_only=True, ...)`` as ``self.model``: its parameters are named
    ``model.`` + the source model's own names (``model.layer1.0.conv1.weight``), so
    inside a head they read ``backbone.model.layer1.0.conv1.weight``, and a
    unifeat feature model's (or the source model's) state dict loads with
    ``backbone.model.load_state_dict(...)``.

    ``forward(pixel_values)`` returns a ``BackboneOutput`` whose ``feature_maps`` is
    a tuple of the levels ``config.out_indices`` in depth order: NCHW maps, or
    ``[B, 1 + N, C]`` tokens with ``reshape_hidden_states=False``.
    ``output_hidden_states=True`` adds ``hidden_states``: every level the
    backbone computes, up to its deepest returned one. It has no attention maps
    (``has_attentions = False``); ``output_attentions=True`` is refused.

    ``num_features`` lists every level's channels and ``channels`` the returned
    ones, as on transformers' own backbones (UperNet and Mask2Former read them).

    Weights (docs/heads.md): a backbone built from its config is
    ``unifeat.create_model``'s model, with the library's own initialization or
    ``pretrained``/``checkpoint_path`` weights, and head models leave it as it is.
    Inside ``from_pretrained`` (transformers builds the model on the meta device,
    then loads the checkpoint) no weights are read from the hub or
    ``checkpoint_path``: the checkpoint's are loaded, and what it lacks (buffers
    that are not saved, such as a Swin's attention masks, or missing keys) gets
    the library's initialization from a model built for the purpose.
    ``frozen_levels`` and ``norm_eval`` hold after loading too.

    Examples:
        >>> import torch
        >>> from unifeat.integrations.transformers import UnifeatBackbone, UnifeatBackboneConfig
        >>> config = UnifeatBackboneConfig(model_name="tv:resnet18", out_indices=(2, 4))
        >>> backbone = UnifeatBackbone(config).eval()
        >>> out = backbone(torch.randn(1, 3, 64, 64))
        >>> [tuple(m.shape) for m in out.feature_maps], backbone.channels
        ([(1, 128, 8, 8), (1, 512, 2, 2)], [128, 512])
        >>> next(name for name, _ in backbone.named_parameters())
        'model.conv1.weight'
    """

    config_class = UnifeatBackboneConfig
    config: UnifeatBackboneConfig
    main_input_name = "pixel_values"
    input_modalities = "image"
    has_attentions = False
    supports_gradient_checkpointing = False

    def __init__(self, config: UnifeatBackboneConfig) -> None:
        if not isinstance(config, UnifeatBackboneConfig):
            raise UnsupportedOptionError(
                f"UnifeatBackbone takes a UnifeatBackboneConfig, got {type(config).__name__}"
            )
        super().__init__(config)
        # transformers builds a model on the meta device to load a checkpoint into it
        # (from_pretrained): then no weights are read, the checkpoint brings them.
        self._built_on_meta = torch.get_default_device().type == "meta"
        self.model = _build(config, on_meta=self._built_on_meta)
        levels = self.model.feature_info
        if _described(levels) != _described(config._levels):
            raise UnsupportedOptionError(
                f"{config._label} built the levels {_described(levels)} (module, channels, "
                f"reduction), but its config says {_described(config._levels)}: the config was "
                "changed after it was made; make a new UnifeatBackboneConfig"
            )
        self.num_features = [level.num_chs for level in levels]
        # What freezing left frozen, restored after a checkpoint is loaded (transformers
        # loads every floating parameter as requiring grad).
        self._frozen = tuple(n for n, p in self.model.named_parameters() if not p.requires_grad)
        self.post_init()

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """The feature model's :meth:`unifeat.FeatureModel.group_matcher` under this
        backbone's ``model.`` prefix: timm's ``create_optimizer_v2(model.backbone,
        layer_decay=...)`` groups the backbone from the stem up (docs/training.md)."""
        from unifeat._engine.groups import prefixed

        return prefixed(self.model.group_matcher(coarse=coarse), "model")

    def no_weight_decay(self) -> set[str]:
        """:meth:`unifeat.FeatureModel.no_weight_decay`, under the ``model.`` prefix."""
        return {f"model.{name}" for name in self.model.no_weight_decay()}

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """The backbone keeps its library's initialization: nothing is re-initialized.
        After a checkpoint was loaded into a backbone built on the meta device, what
        it did not bring (non-persistent buffers, missing keys) is filled in, from a
        model built with the same options, and frozen parameters are frozen again."""
        if module is not self or not self._built_on_meta:
            return
        pending = [
            (name, tensor)
            for name, tensor in (*self.model.named_parameters(), *self.model.named_buffers())
            if not getattr(tensor, "_is_hf_initialized", False) and not tensor.is_meta
        ]
        if pending:
            reference = _build(self.config, on_meta=False, weights=False)
            values = dict((*reference.named_parameters(), *reference.named_buffers()))
            for name, tensor in pending:
                tensor.copy_(values[name])
        for name in self._frozen:
            self.model.get_parameter(name).requires_grad_(False)

    def forward(
        self,
        pixel_values: Tensor,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> BackboneOutput | tuple[Any, ...]:
        """The levels ``config.out_indices`` of ``pixel_values`` (``[B, C, H, W]``).

        Args:
            pixel_values: the images, normalized as the model expects.
            output_hidden_states: also return every level the backbone computes
                (default: ``config.output_hidden_states``).
            output_attentions: refused when true: the backbone returns no
                attention maps.
            return_dict: a ``BackboneOutput`` (default) or a tuple
                ``(feature_maps,)`` (``+ (hidden_states,)``).

        Examples:
            >>> import torch
            >>> from unifeat.integrations.transformers import (
            ...     UnifeatBackbone, UnifeatBackboneConfig)
            >>> backbone = UnifeatBackbone(UnifeatBackboneConfig(
            ...     model_name="timm:resnet18", out_indices=(3, 4))).eval()
            >>> out = backbone(torch.randn(1, 3, 64, 64), output_hidden_states=True)
            >>> len(out.feature_maps), len(out.hidden_states)
            (2, 5)
        """
        if kwargs:
            raise UnsupportedOptionError(
                f"{self.config._label} takes pixel_values, output_hidden_states, "
                f"output_attentions and return_dict, not {format_choices(sorted(kwargs))}"
            )
        config = self.config
        return_dict = config.return_dict if return_dict is None else return_dict
        hidden = (
            config.output_hidden_states if output_hidden_states is None else output_hidden_states
        )
        attentions = config.output_attentions if output_attentions is None else output_attentions
        for flag, value in (
            ("output_hidden_states", hidden),
            ("output_attentions", attentions),
            ("return_dict", return_dict),
        ):
            if not isinstance(value, bool):
                raise UnsupportedOptionError(
                    f"invalid {flag}={value!r} for {config._label}: expected True or False"
                )
        if attentions:
            raise UnsupportedOptionError(
                f"output_attentions=True: {config._label} returns no attention maps "
                "(has_attentions is False)"
            )
        out_indices = list(self.model.feature_info.out_indices)
        hidden_states: tuple[Tensor, ...] | None = None
        if hidden:
            computed = list(self.model._runner.computable())
            levels = self.model.forward_intermediates(
                pixel_values, indices=computed, intermediates_only=True, norm=config.norm
            )
            hidden_states = tuple(self._as_output(level) for level in levels)
            feature_maps = tuple(hidden_states[computed.index(i)] for i in out_indices)
        else:
            feature_maps = tuple(self._as_output(level) for level in self.model(pixel_values))
        if not return_dict:
            return (feature_maps, hidden_states) if hidden else (feature_maps,)
        return BackboneOutput(
            feature_maps=feature_maps,  # type: ignore[arg-type]  # annotated as a 1-tuple
            hidden_states=hidden_states,
        )

    def _as_output(self, level: Any) -> Tensor:
        """A level as heads read it: the NCHW map, or (tokens) the class token
        followed by the patch grid row by row, ``[B, 1 + N, C]``: the block's own
        token tensor."""
        if self.config.reshape_hidden_states:
            return cast(Tensor, level)
        count = _prefix_count(level)
        if count != 1:
            raise UnsupportedOptionError(
                f"{self.config._label} gave {count} prefix tokens at this input, "
                "but reshape_hidden_states=False returns exactly one (the class token)"
            )
        feature_map, prefix = level
        return torch.cat((prefix, feature_map.flatten(2).transpose(1, 2)), dim=1)


def _described(info: FeatureInfo) -> list[tuple[str, int, float]]:
    return [(level.module, level.num_chs, level.reduction) for level in info]


def _prefix_count(level: Any) -> int:
    """How many prefix tokens a level asked with ``return_prefix_tokens=True`` came
    with: a model without any gives the bare map, not ``(map, empty)``."""
    if isinstance(level, tuple):
        return int(level[1].shape[1])
    return 0


def _build(config: UnifeatBackboneConfig, *, on_meta: bool, weights: bool = True) -> FeatureModel:
    """The feature model ``config`` describes: on the meta device without weights
    (``on_meta``), or for real, with ``pretrained``/``checkpoint_path`` weights unless
    ``weights`` is false."""
    options = config.unifeat_options()
    load = weights and not on_meta
    options["pretrained"] = bool(config.pretrained) and load
    model = unifeat.create_model(
        str(config.model_name),
        features_only=True,
        out_indices=tuple(config.out_indices or ()),
        checkpoint_path=config.checkpoint_path if load else None,
        device="meta" if on_meta else None,
        **options,
    )
    assert isinstance(model, FeatureModel)
    return model


# -- what each head needs -------------------------------------------------------------------


def check_head_config(config: PreTrainedConfig) -> None:
    """Refuse a head config whose head cannot take its unifeat backbone's levels.

    transformers' heads trust their config: a Mask2Former told the wrong
    ``feature_strides`` builds and trains with levels at the wrong scales, and a
    UperNet's auxiliary head reads whatever level comes third. This checks what
    each head reads against the backbone's levels (docs/heads.md):

    - UperNet (``"upernet"``): NCHW maps (``reshape_hidden_states=True``); with
      ``use_auxiliary_head`` (the default) at least 3 levels, the auxiliary head
      reading the third, and ``auxiliary_in_channels`` unset or its channels.
    - Mask2Former (``"mask2former"``): NCHW maps; at least 3 levels;
      ``feature_strides`` equal to the backbone's ``feature_strides``; and the
      levels before the last 3 exactly the ones its pixel decoder adds from the
      stride of the first of those 3 down to ``common_stride`` (4 levels at
      strides 4-32 with the default ``common_stride=4``).
    - DPT (``"dpt"``): tokens (``reshape_hidden_states=False``), not hybrid, as
      many levels as ``neck_hidden_sizes`` and ``reassemble_factors``.

    Raises:
        UnsupportedOptionError: the head cannot take the levels (the message says
            what to change), the backbone is not a unifeat one, or the head is
            none of those above.

    Examples:
        >>> from transformers import Mask2FormerConfig
        >>> from unifeat.integrations.transformers import UnifeatBackboneConfig, check_head_config
        >>> backbone = UnifeatBackboneConfig(model_name="timm:resnet18")  # 5 levels, strides 2-32
        >>> check_head_config(Mask2FormerConfig(backbone_config=backbone))
        Traceback (most recent call last):
        ...
        unifeat._errors.UnsupportedOptionError: Mask2Former's feature_strides=[4, 8, 16, 32] ...
        >>> backbone.out_indices = (1, 2, 3, 4)
        >>> check_head_config(Mask2FormerConfig(backbone_config=backbone,
        ...                                     feature_strides=backbone.feature_strides))
    """
    backbone = getattr(config, "backbone_config", None)
    if not isinstance(backbone, UnifeatBackboneConfig):
        raise UnsupportedOptionError(
            f"{type(config).__name__} has backbone_config of type "
            f"{type(backbone).__name__}, not UnifeatBackboneConfig: check_head_config checks "
            "heads on unifeat backbones"
        )
    checks = {"upernet": _check_upernet, "mask2former": _check_mask2former, "dpt": _check_dpt}
    check = checks.get(str(config.model_type))
    if check is None:
        raise UnsupportedOptionError(
            f"check_head_config knows the heads {format_choices(sorted(checks))}, not "
            f"{config.model_type!r}"
        )
    check(config, backbone)


def _needs_maps(head: str, backbone: UnifeatBackboneConfig) -> None:
    if not backbone.reshape_hidden_states:
        raise UnsupportedOptionError(
            f"{head} reads NCHW feature maps, but {backbone._label} returns tokens "
            "(reshape_hidden_states=False, for DPT): leave reshape_hidden_states at True"
        )


def _check_upernet(config: PreTrainedConfig, backbone: UnifeatBackboneConfig) -> None:
    _needs_maps("UperNet", backbone)
    channels = backbone.channels
    if not config.use_auxiliary_head:
        return
    if len(channels) < 3:
        raise UnsupportedOptionError(
            f"UperNet's auxiliary head reads the third level, but {backbone._label} returns "
            f"{len(channels)} (out_indices={backbone.out_indices}): return at least 3 levels, "
            "or set use_auxiliary_head=False"
        )
    wanted = config.auxiliary_in_channels
    if wanted is not None and wanted != channels[2]:
        raise UnsupportedOptionError(
            f"UperNet's auxiliary head reads the third level, which has {channels[2]} channels "
            f"in {backbone._label}, but auxiliary_in_channels={wanted}: set it to "
            f"{channels[2]} or leave it None"
        )


def _check_mask2former(config: PreTrainedConfig, backbone: UnifeatBackboneConfig) -> None:
    _needs_maps("Mask2Former", backbone)
    strides = backbone.feature_strides
    said = list(config.feature_strides)
    if said != strides:
        raise UnsupportedOptionError(
            f"Mask2Former's feature_strides={said} do not match the levels of "
            f"{backbone._label}, whose strides are {strides} (out_indices="
            f"{backbone.out_indices}): pass feature_strides=backbone_config.feature_strides"
        )
    if len(strides) < 3:
        raise UnsupportedOptionError(
            f"Mask2Former's pixel decoder reads 3 levels with attention and more below them, "
            f"but {backbone._label} returns {len(strides)} (strides {strides}): return at "
            "least 3 levels"
        )
    finest = min(strides[-3:])
    added = math.log2(finest) - math.log2(config.common_stride)
    if added != len(strides) - 3:
        needed = max(int(added), 0)
        raise UnsupportedOptionError(
            f"Mask2Former's pixel decoder takes the last 3 levels (strides {strides[-3:]}) and "
            f"{needed} level(s) before them (from stride {finest} down to "
            f"common_stride={config.common_stride}), but {backbone._label} returns "
            f"{len(strides) - 3} before them (strides {strides}): return "
            f"{3 + needed} levels (4 levels at strides 4-32 for common_stride=4)"
        )


def _check_dpt(config: PreTrainedConfig, backbone: UnifeatBackboneConfig) -> None:
    if config.is_hybrid:
        raise UnsupportedOptionError(
            "a hybrid DPT (is_hybrid=True) builds its own BiT backbone and ignores "
            f"{backbone._label}: set is_hybrid=False"
        )
    if backbone.reshape_hidden_states:
        raise UnsupportedOptionError(
            f"DPT reads [B, 1 + N, C] tokens with the class token first, but {backbone._label} "
            "returns NCHW maps: set reshape_hidden_states=False (a plain ViT with a class token)"
        )
    count = len(backbone.channels)
    for name in ("neck_hidden_sizes", "reassemble_factors"):
        if len(getattr(config, name)) != count:
            raise UnsupportedOptionError(
                f"DPT's {name} has {len(getattr(config, name))} entries, but {backbone._label} "
                f"returns {count} levels (out_indices={backbone.out_indices}): give one per level"
            )


def _register() -> None:
    """``AutoConfig``/``AutoBackbone`` know ``"unifeat_backbone"`` from now on.

    ``exist_ok``: a process that imported this module before (or reloaded it)
    registers the same type again instead of failing."""
    AutoConfig.register(MODEL_TYPE, UnifeatBackboneConfig, exist_ok=True)
    AutoBackbone.register(UnifeatBackboneConfig, UnifeatBackbone, exist_ok=True)


_register()
