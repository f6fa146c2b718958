"""The feature model (written once, in :mod:`unifeat._engine.model`) and the
preprocessing a backend records on it for extraction and pictures."""

from __future__ import annotations

from typing import Any

from torch import nn

from unifeat._engine.levels import FeatureMap
from unifeat._engine.model import FeatureModel, Features, share_parameters_copy, to_format

__all__ = [
    "FeatureMap",
    "FeatureModel",
    "Features",
    "attach_image_transform",
    "image_transform",
    "share_parameters_copy",
    "to_format",
]


def attach_image_transform(model: nn.Module, transform: Any) -> None:
    """Record the source library's own preprocessing (a callable PIL image -> CHW
    tensor) on ``model``, for :func:`unifeat.extract` and
    :func:`unifeat.plot_feature_maps`. Not registered as a submodule: it is no
    part of the model's state."""
    object.__setattr__(model, "_image_transform", transform)


def image_transform(model: nn.Module) -> Any:
    """The preprocessing :func:`attach_image_transform` recorded, or None."""
    return model.__dict__.get("_image_transform")
