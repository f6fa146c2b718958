"""The public entry points: :func:`create_model`, :func:`feature_info`,
:func:`get_node_names`, :func:`list_models`.

All of them take the same options and validate them the same way, once, into
a :class:`~unifeat._options.BuildPlan` (what :func:`feature_info` accepts,
:func:`create_model` accepts, and the other way round).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from unifeat import _registry
from unifeat._engine.classifier import ClassifierModel
from unifeat._errors import UnsupportedOptionError
from unifeat._feature_info import FeatureInfo
from unifeat._options import BuildPlan, make_plan

__all__ = ["create_model", "feature_info", "get_node_names", "list_models"]


def _plan(model: str | nn.Module, *, backend: str | None, **options: Any) -> BuildPlan:
    if isinstance(model, ClassifierModel):
        model = model.library_model  # it stands for its library model, head as it is now
    if isinstance(model, torch.jit.ScriptModule):
        raise UnsupportedOptionError(
            f"model is a TorchScript module ({type(model).__name__} of "
            f"{model.original_name!r}): a compiled program, whose submodules unifeat can "
            "neither trace nor hook; pass the eager nn.Module it was scripted from (or the "
            "model's name)"
        )
    if isinstance(model, nn.Module):
        chosen = (
            _registry.canonical_backend(backend, context=f"module {type(model).__qualname__}")
            if backend is not None
            else _registry.backend_for_module(model)
        )
        return make_plan(backend=chosen, module=model, **options)
    if isinstance(model, type) and issubclass(model, nn.Module):
        raise UnsupportedOptionError(
            f"model is the class {model.__name__}, not an instance: pass "
            f"{model.__name__}(...) (a torch.nn.Module instance) or a model name"
        )
    if not isinstance(model, str):
        shown = repr(model)
        shown = shown if len(shown) <= 80 else shown[:77] + "..."
        raise UnsupportedOptionError(
            f"model must be a model name or a torch.nn.Module, got {shown} ({type(model).__name__})"
        )
    chosen, name = _registry.resolve_model_name(model, backend)
    return make_plan(backend=chosen, model_name=name, **options)


def _plan_from(arguments: dict[str, Any]) -> BuildPlan:
    """The plan of a public function's arguments (its ``locals()`` on entry): every
    entry point takes the same options, validated the same way."""
    options = dict(arguments)
    model = options.pop("model_name")
    backend = options.pop("backend")
    options["model_kwargs"] = options.pop("model_kwargs")
    return _plan(model, backend=backend, **options)


def create_model(
    model_name: str | nn.Module,
    pretrained: bool = False,
    features_only: bool = False,
    out_indices: int | tuple[int, ...] | list[int] | None = None,
    output_stride: int | None = None,
    output_type: str | None = None,
    output_fmt: str = "NCHW",
    backend: str | None = None,
    *,
    checkpoint_path: str | Path | None = None,
    return_prefix_tokens: bool = False,
    return_nodes: Sequence[str] | Mapping[str, str] | None = None,
    input_size: int | tuple[int, int] | tuple[int, int, int] | None = None,
    tracer_kwargs: Mapping[str, Any] | None = None,
    frozen_levels: int | None = None,
    norm_eval: bool = False,
    norm: bool = False,
    pyramid: str | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    **model_kwargs: Any,
) -> nn.Module:
    """Build a model, or a feature model cut from it, from any backend.

    Args:
        model_name: ``"resnet50"`` (the first backend that knows it, in the
            order timm, torchvision, transformers), ``"timm:convnext_tiny"``
            (timm's ``hf-hub:`` names pass through), ``"tv:resnet50"``,
            ``"hf:dinov2"`` (a transformers model type, random init from its
            config), ``"hf:org/repo"`` or ``"hf:/local/dir"`` (transformers
            ``from_pretrained``), ``"oc:ViT-B-32"`` (an open_clip image tower),
            or an ``nn.Module``. A module passed in is never mutated: the
            feature model shares its parameters and buffers.
        pretrained: load the backend's own pretrained weights.
        features_only: return a :class:`~unifeat.FeatureModel` whose forward
            gives the requested levels. Otherwise the backend's own model; with
            ``num_classes=`` or ``global_pool=`` (timm's classifier options),
            for torchvision and transformers models whose head unifeat knows, a
            :class:`~unifeat.ClassifierModel` with timm's interface
            (``forward_features``, ``forward_head``, ``reset_classifier``, ...)
            over the library model (``.library_model``, parameters and names shared). See the
            docs page "Training and deployment".
        out_indices: ``None`` (the default: every level of a hierarchical net,
            the last 3 blocks of a plain ViT), an int ``n`` (the last ``n``
            levels) or a sequence of level indices, negatives counting from the
            end. Outputs always come in depth order.
        output_stride: ``8``, ``16`` or ``32`` to dilate the later stages, where
            the model supports it (:class:`UnsupportedOptionError` otherwise).
        output_type: ``"list"`` or ``"dict"`` (keyed by level module name, or by
            the ``return_nodes`` keys). Default: a dict with ``return_nodes``,
            else a list.
        output_fmt: ``"NCHW"`` or ``"NHWC"``.
        backend: ``None`` (from the name or module) or a backend name.
        checkpoint_path: a local ``.pth``/``.pt``/``.safetensors`` state dict,
            loaded into the model before features are cut out.
        return_prefix_tokens: token models also return their class/register
            tokens: each level becomes ``(map, prefix_tokens)``.
        return_nodes: nodes to return instead of levels, as torchvision's
            ``create_feature_extractor`` takes them: a list, or a ``{node: key}``
            dict; full (``"layer4.2.relu_2"``) or truncated (``"layer4"`` = its
            last node) names. FX node names where the model traces, module
            paths where it does not (transformers); see :func:`get_node_names`.
        input_size: ``(H, W)`` (or one int) at which levels are measured,
            or ``(C, H, W)`` for a module taking other than 3 channels;
            default: the model's own input size.
        tracer_kwargs: torchvision's tracer options for models cut from FX
            graphs: ``leaf_modules``, ``autowrap_modules``, ``autowrap_functions``.
        frozen_levels: freeze the parameters that levels ``0..frozen_levels``
            depend on (``-1``: all) and hold that part in eval mode, as
            mmdetection's ``frozen_stages``; see :meth:`FeatureModel.freeze`.
        norm_eval: hold every normalization layer in eval mode while training,
            whatever is frozen (mmdetection's ``norm_eval``).
        norm: keep the final norm and apply it to the levels it fits (timm's
            ``FeatureGetterNet(norm=True)``, DINOv2's normalized intermediate
            layers); refused where it would change no requested level. Without
            it a feature model holds only what its levels compute, and
            ``forward_intermediates``' final output is its deepest level's block
            output (docs/levels.md, "The final output").
        pyramid: ``"simple"``: ViTDet's simple feature pyramid on a plain model's
            (a ViT's) last block: four levels at a quarter, half, one and two
            patch sizes (4, 8, 16, 32 for patch 16), ``C/4``, ``C/2``, ``C``, ``C``
            channels, which ``out_indices`` then indexes; its layers are trainable
            parameters under ``pyramid.``. Refused for hierarchical models
            (docs/levels.md, "A simple pyramid for plain models").
        device: build a model named by string there (random weights are made
            on it directly; pretrained ones are loaded, then moved).
        dtype: a floating dtype for its parameters (``torch.bfloat16``, ...).
        **model_kwargs: passed to the backend's own constructor (a transformers
            model's config). ``num_classes`` and ``global_pool`` go to timm's
            constructor; for the other backends, with ``features_only=False``,
            unifeat applies them to the library model's head (built with its
            default head, so pretrained weights load, then reset as timm's
            ``reset_classifier`` does).

    Returns:
        The feature model (``features_only=True``), the classifier model, or the
        backend's own model.

    Raises:
        UnknownModelError: no backend knows the name (close matches listed).
        UnknownBackendError: the prefix or ``backend=`` names no backend.
        InvalidIndicesError: ``out_indices`` out of range, duplicated, empty or not ints.
        UnsupportedOptionError: an option value the model cannot honour.
        BackendUnavailableError: the backend's library is not installed.
        CheckpointError: ``checkpoint_path`` is missing, unreadable or does not fit.

    Examples:
        >>> import torch, unifeat
        >>> model = unifeat.create_model("resnet18", features_only=True, out_indices=(1, -1))
        >>> model.feature_info.channels(), model.feature_info.reduction()
        ([64, 512], [4, 32])
        >>> [tuple(f.shape) for f in model(torch.randn(1, 3, 64, 64))]
        [(1, 64, 16, 16), (1, 512, 2, 2)]
        >>> pooled = unifeat.create_model("tv:resnet18", num_classes=0).eval()
        >>> tuple(pooled(torch.randn(1, 3, 64, 64)).shape), pooled.num_features
        ((1, 512), 512)
    """
    plan = _plan_from(locals())
    return _registry.get_adapter(plan.backend).create(plan)


def feature_info(
    model_name: str | nn.Module,
    pretrained: bool = False,
    features_only: bool = True,
    out_indices: int | tuple[int, ...] | list[int] | None = None,
    output_stride: int | None = None,
    output_type: str | None = None,
    output_fmt: str = "NCHW",
    backend: str | None = None,
    *,
    checkpoint_path: str | Path | None = None,
    return_prefix_tokens: bool = False,
    return_nodes: Sequence[str] | Mapping[str, str] | None = None,
    input_size: int | tuple[int, int] | tuple[int, int, int] | None = None,
    tracer_kwargs: Mapping[str, Any] | None = None,
    frozen_levels: int | None = None,
    norm_eval: bool = False,
    norm: bool = False,
    pyramid: str | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    **model_kwargs: Any,
) -> FeatureInfo:
    """The :class:`FeatureInfo` that ``create_model(..., features_only=True)`` would have.

    Takes exactly :func:`create_model`'s arguments and refuses what it would
    refuse, with the same error; nothing is allocated (models are built on the
    meta device), so this is fast even for billion-parameter models. Weights
    are not loaded (a ``checkpoint_path`` is checked against the model's keys).

    Examples:
        >>> import unifeat
        >>> info = unifeat.feature_info("resnet50")
        >>> info.channels(), info.reduction()
        ([64, 256, 512, 1024, 2048], [2, 4, 8, 16, 32])
        >>> unifeat.feature_info("timm:vit_small_patch16_224").out_indices
        (9, 10, 11)
        >>> unifeat.feature_info("tv:vit_b_16").out_indices
        (9, 10, 11)
    """
    plan = _plan_from({**locals(), "features_only": True})
    if features_only is not True:
        raise UnsupportedOptionError(
            f"feature_info describes feature models, so features_only={features_only!r} does "
            f"not apply to {plan.label}: leave it out"
        )
    return _registry.get_adapter(plan.backend).describe(plan)


def list_models(pattern: str = "*", backend: str | None = None) -> list[str]:
    """Model names matching a shell-style ``pattern``.

    With ``backend`` the names are bare, as that library spells them; without
    it they are prefixed (``"timm:resnet50"``) and cover every installed
    backend, so each entry can be passed to :func:`create_model` as is.

    Examples:
        >>> import unifeat
        >>> unifeat.list_models("resnet1?", backend="timm")
        ['resnet18']
        >>> "timm:resnet50" in unifeat.list_models("resnet50")
        True
    """
    if not isinstance(pattern, str):
        raise UnsupportedOptionError(
            f"invalid pattern={pattern!r}: expected a shell-style pattern string such as 'resnet*'"
        )
    if backend is not None:
        name = _registry.canonical_backend(backend)
        return sorted(fnmatch.filter(_registry.get_adapter(name).model_names(), pattern))
    found: list[str] = []
    for name in _registry.backend_names():
        if _registry.is_available(name):
            names = _registry.get_adapter(name).model_names()
            found += [f"{name}:{model}" for model in sorted(fnmatch.filter(names, pattern))]
    return found


def get_node_names(
    model_name: str | nn.Module,
    pretrained: bool = False,
    features_only: bool = True,
    out_indices: int | tuple[int, ...] | list[int] | None = None,
    output_stride: int | None = None,
    output_type: str | None = None,
    output_fmt: str = "NCHW",
    backend: str | None = None,
    *,
    checkpoint_path: str | Path | None = None,
    return_prefix_tokens: bool = False,
    return_nodes: Sequence[str] | Mapping[str, str] | None = None,
    input_size: int | tuple[int, int] | tuple[int, int, int] | None = None,
    tracer_kwargs: Mapping[str, Any] | None = None,
    frozen_levels: int | None = None,
    norm_eval: bool = False,
    norm: bool = False,
    pyramid: str | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    **model_kwargs: Any,
) -> tuple[list[str], list[str]]:
    """The node names of a model in train and in eval mode, as ``return_nodes`` takes them.

    For a model FX can trace, torchvision's names (``"layer4.2.relu_2"``:
    module path, then the operation, ``_N`` suffixes per parent scope), exactly
    as ``torchvision.models.feature_extraction.get_graph_node_names`` gives
    them. For a model it cannot trace (every transformers model, a module with
    data-dependent control flow), the paths of its modules in the order they
    finish running (``"encoder.layer.3"``), the same in both modes. Models named
    by string are built on the meta device (no weights); a module passed in is
    left as it was. Takes :func:`create_model`'s arguments.

    Raises:
        TracingError: the model cannot be traced and has no block list to hook.

    Examples:
        >>> import unifeat
        >>> train_names, eval_names = unifeat.get_node_names("tv:resnet18")
        >>> eval_names[:4], eval_names[-2:]
        (['x', 'conv1', 'bn1', 'relu'], ['flatten', 'fc'])
    """
    plan = _plan_from(locals())
    return _registry.get_adapter(plan.backend).node_names(plan)
