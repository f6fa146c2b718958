"""Options are parsed once, at the front door, into an immutable :class:`BuildPlan`.

Adapters receive a plan whose every field is already type-checked, so no
backend re-validates ``output_type`` or the form of ``out_indices``; what only
the model can tell (how many levels, which strides) is checked by the adapter
against the shared helpers.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationError
from torch import nn

from unifeat._errors import InvalidNodeError, UnsupportedOptionError, format_choices
from unifeat._indices import IndexSpec, check_index_spec

OutputType = Literal["list", "dict"]
OutputFormat = Literal["NCHW", "NHWC"]
FeatureClass = Literal["getter", "fx", "hook", "list", "dict"]
Pyramid = Literal["simple"]

_CHOICES: dict[str, tuple[object, ...]] = {
    "output_type": ("list", "dict"),
    "output_fmt": ("NCHW", "NHWC"),
    "feature_cls": ("getter", "fx", "hook", "list", "dict"),
    "pyramid": ("simple",),
}


class BuildPlan(BaseModel):
    """Everything an adapter needs to build one model, validated."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True, extra="forbid")

    backend: str
    model_name: str | None = None
    """The name without backend prefix; ``None`` when ``module`` is given."""
    module: nn.Module | None = None
    pretrained: StrictBool = False
    checkpoint_path: Path | None = None
    features_only: StrictBool = False
    out_indices: IndexSpec = None
    # Strict: '16', 16.0 and True are mistakes, not 16, 16 and 1.
    output_stride: StrictInt | None = Field(default=None, gt=0)
    output_type: OutputType | None = None
    """``None``: a dict where ``return_nodes`` gives keys, else a list."""
    output_fmt: OutputFormat = "NCHW"
    return_prefix_tokens: StrictBool = False
    return_nodes: tuple[str, ...] | dict[str, str] | None = None
    input_size: tuple[int, int] | tuple[int, int, int] | None = None
    """``(H, W)`` or ``(C, H, W)`` levels are measured at; ``None``: the model's own."""
    tracer_kwargs: dict[str, Any] | None = None
    """torchvision's tracer options for graph backends (``leaf_modules``, ...)."""
    frozen_levels: StrictInt | None = None
    """Freeze what levels ``0..frozen_levels`` depend on (``-1``: everything)."""
    norm_eval: StrictBool = False
    """Hold every norm layer in eval mode while training (mmdetection's ``norm_eval``)."""
    norm: StrictBool = False
    """Keep the final norm and apply it to the levels it fits (timm's
    ``FeatureGetterNet(norm=True)``); without it a feature model holds only what
    its levels compute."""
    feature_cls: FeatureClass | None = None
    """timm's ``feature_cls=``: which runner computes the levels (docs/api.md)."""
    pyramid: Pyramid | None = None
    """``"simple"``: ViTDet's simple feature pyramid on a plain model's last map;
    its four levels replace the blocks (docs/levels.md)."""
    device: str | None = None
    """Where a model built by name is made (``"cuda:0"``); ``None``: the CPU."""
    dtype: torch.dtype | None = None
    """The floating dtype of its parameters; ``None``: the library's (float32)."""
    model_kwargs: dict[str, Any] = Field(default_factory=dict)
    num_classes: StrictInt | None = Field(default=None, ge=0)
    """Non-timm backends, ``features_only=False``: the classifier's classes (0: none)."""
    global_pool: str | None = None
    """Non-timm backends, ``features_only=False``: the head's pooling (``""``: none)."""

    @property
    def label(self) -> str:
        """How messages name the model: ``'resnet50' (backend 'timm')``."""
        return _label(self.model_name, self.module, self.backend)


# Options that only shape a feature model's outputs; with features_only=False
# they would be silently ignored, so they are refused instead.
_FEATURE_ONLY_OPTIONS = (
    "out_indices",
    "output_type",
    "output_fmt",
    "return_prefix_tokens",
    "return_nodes",
    "frozen_levels",
    "norm_eval",
    "norm",
    "feature_cls",
    "pyramid",
)
_TRACER_OPTIONS = ("leaf_modules", "autowrap_modules", "autowrap_functions")


def make_plan(**options: Any) -> BuildPlan:
    """Validate ``options`` into a plan, raising unifeat errors that name the value."""
    context = _label(options.get("model_name"), options.get("module"), options.get("backend"))
    options["out_indices"] = check_index_spec(options.get("out_indices"), context=context)
    options["return_nodes"] = _check_return_nodes(options.get("return_nodes"), context)
    options["input_size"] = _check_input_size(options.get("input_size"), context)
    options["tracer_kwargs"] = _check_tracer_kwargs(options.get("tracer_kwargs"), context)
    options["device"] = _check_device(options.get("device"), context)
    options["dtype"] = _check_dtype(options.get("dtype"), context)
    split = [
        k
        for k in ("train_return_nodes", "eval_return_nodes")
        if k in options.get("model_kwargs", {})
    ]
    if split:
        raise UnsupportedOptionError(
            f"{' and '.join(split)} are options of torchvision's create_feature_extractor, not "
            f"of {context}: unifeat takes one return_nodes for both modes, in which a node "
            "of only one graph is served in that mode (docs/node-names.md)"
        )
    _take_head_options(options, context)
    _take_feature_cls(options, context)
    try:
        plan = BuildPlan(**options)
    except ValidationError as exc:
        error = exc.errors()[0]
        field = str(error["loc"][0]) if error["loc"] else "options"
        value = options.get(field, error.get("input"))
        valid = (
            f"expected {format_choices(_CHOICES[field])}"
            if field in _CHOICES
            else error["msg"].lower()
        )
        raise UnsupportedOptionError(f"invalid {field}={value!r} for {context}: {valid}") from None
    if plan.pyramid is not None and plan.features_only:
        clashing = [
            name
            for name, given in (
                ("return_nodes", plan.return_nodes is not None),
                ("return_prefix_tokens", plan.return_prefix_tokens),
                ("output_stride", plan.output_stride is not None),
            )
            if given
        ]
        if clashing:
            raise UnsupportedOptionError(
                f"pyramid={plan.pyramid!r} returns its own four levels, so {', '.join(clashing)} "
                f"cannot be combined with it for {plan.label}"
            )
    if plan.return_nodes is not None and plan.features_only:
        clashing = [k for k in ("out_indices", "output_stride") if getattr(plan, k) is not None]
        if plan.return_prefix_tokens:
            clashing.append("return_prefix_tokens")
        if plan.output_fmt != "NCHW":
            clashing.append("output_fmt")
        if clashing:
            raise UnsupportedOptionError(
                f"return_nodes picks nodes as they are, so {', '.join(clashing)} cannot be "
                f"combined with it for {plan.label}"
            )
    if not plan.features_only:
        defaults = BuildPlan.model_fields
        changed = [k for k in _FEATURE_ONLY_OPTIONS if getattr(plan, k) != defaults[k].default]
        if changed:
            raise UnsupportedOptionError(
                f"{', '.join(changed)} only apply to feature models, but {plan.label} was "
                "asked for with features_only=False: pass features_only=True"
            )
    return plan


# timm's constructors take these; for the other backends unifeat applies them
# itself to the library model's head (docs/training.md, "Classifier models").
_HEAD_OPTIONS = ("num_classes", "global_pool")


def _take_head_options(options: dict[str, Any], context: str) -> None:
    """Move ``num_classes``/``global_pool`` out of a non-timm model's constructor
    kwargs into the plan (``features_only=False``); a feature model has no head, so
    ``global_pool`` is refused for it (``num_classes`` stays a constructor kwarg
    where the library takes one, as timm takes it)."""
    kwargs = options.get("model_kwargs") or {}
    if options.get("backend") == "timm" or not any(k in kwargs for k in _HEAD_OPTIONS):
        return
    if options.get("features_only"):
        if "global_pool" in kwargs:
            raise UnsupportedOptionError(
                f"global_pool= shapes a classifier head, which the feature model of {context} "
                "does not have: leave it out, or pass features_only=False"
            )
        return
    kwargs = dict(kwargs)
    for key in _HEAD_OPTIONS:
        if key in kwargs:
            options[key] = kwargs.pop(key)
    options["model_kwargs"] = kwargs


def _take_feature_cls(options: dict[str, Any], context: str) -> None:
    """timm's ``feature_cls=`` (a constructor keyword in timm) into the plan, lower-cased
    as timm reads it. ``'list'``/``'dict'`` choose the output type, as timm's
    ``FeatureListNet``/``FeatureDictNet`` do; an ``output_type`` saying otherwise is
    refused rather than one of them ignored."""
    kwargs = options.get("model_kwargs") or {}
    if "feature_cls" not in kwargs:
        return
    kwargs = dict(kwargs)
    value = kwargs.pop("feature_cls")
    options["model_kwargs"] = kwargs
    if not isinstance(value, str) or value.lower() not in _CHOICES["feature_cls"]:
        raise UnsupportedOptionError(
            f"invalid feature_cls={value!r} for {context}: expected "
            f"{format_choices(_CHOICES['feature_cls'])} (timm's names; docs/api.md says which "
            "runner each selects)"
        )
    value = value.lower()
    options["feature_cls"] = value
    if value in ("list", "dict"):
        asked = options.get("output_type")
        if asked is not None and asked != value:
            raise UnsupportedOptionError(
                f"feature_cls={value!r} returns a {value}, but output_type={asked!r} was asked "
                f"for {context}: give one of them"
            )
        options["output_type"] = value


def _check_return_nodes(nodes: object, context: str) -> tuple[str, ...] | dict[str, str] | None:
    if nodes is None:
        return None
    if isinstance(nodes, str):
        return (nodes,)
    if isinstance(nodes, Mapping):
        return dict(nodes)
    if isinstance(nodes, Iterable) and not isinstance(nodes, bytes):
        return tuple(nodes)
    raise InvalidNodeError(
        f"invalid return_nodes={nodes!r} for {context}: expected a list of node names or a "
        "{node: key} dict (unifeat.get_node_names lists the names)"
    )


def _check_input_size(size: object, context: str) -> tuple[int, int] | tuple[int, int, int] | None:
    if size is None:
        return None
    values = (size, size) if isinstance(size, int) and not isinstance(size, bool) else size
    if (
        not isinstance(values, (tuple, list))
        or len(values) not in (2, 3)
        or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values)
    ):
        raise UnsupportedOptionError(
            f"invalid input_size={size!r} for {context}: expected a positive int, "
            "(height, width) or (channels, height, width)"
        )
    return tuple(int(v) for v in values)  # type: ignore[return-value]


def _check_device(device: object, context: str) -> str | None:
    if device is None:
        return None
    try:
        return str(torch.device(device))  # type: ignore[call-overload]
    except (RuntimeError, TypeError):
        raise UnsupportedOptionError(
            f"invalid device={device!r} for {context}: expected a torch device such as "
            "'cpu', 'cuda' or 'cuda:1'"
        ) from None


def _check_dtype(dtype: object, context: str) -> torch.dtype | None:
    if dtype is None:
        return None
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise UnsupportedOptionError(
            f"invalid dtype={dtype!r} for {context}: expected a floating torch dtype "
            "(torch.float32, torch.bfloat16, torch.float16)"
        )
    return dtype


def _check_tracer_kwargs(options: object, context: str) -> dict[str, Any] | None:
    if options is None:
        return None
    if not isinstance(options, Mapping):
        raise UnsupportedOptionError(
            f"invalid tracer_kwargs={options!r} for {context}: expected a dict with keys "
            f"{format_choices(_TRACER_OPTIONS)}"
        )
    unknown = [key for key in options if key not in _TRACER_OPTIONS]
    if unknown:
        raise UnsupportedOptionError(
            f"unknown tracer_kwargs key {unknown[0]!r} for {context}: valid keys are "
            f"{format_choices(_TRACER_OPTIONS)}"
        )
    return {key: list(value) for key, value in options.items()}


def _label(model_name: str | None, module: object, backend: object) -> str:
    what = repr(model_name) if model_name is not None else f"module {type(module).__qualname__}"
    return f"{what} (backend {backend!r})"
