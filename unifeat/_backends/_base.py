"""The interface every backend adapter implements; the front door knows only this."""

from __future__ import annotations

from abc import ABC, abstractmethod

from torch import nn

from unifeat._feature_info import FeatureInfo
from unifeat._options import BuildPlan


class Adapter(ABC):
    """Turns a validated :class:`BuildPlan` into a model or its metadata."""

    name: str
    untraceable: str | None = None
    """Why this backend's models have no FX node names, where they have none."""

    @abstractmethod
    def has_model(self, name: str) -> bool:
        """Whether ``name`` (without backend prefix) is a model this backend can build."""

    @abstractmethod
    def model_names(self) -> list[str]:
        """Every model name the backend knows, for listing and close matches."""

    @abstractmethod
    def describe(self, plan: BuildPlan) -> FeatureInfo:
        """The feature levels ``plan`` would give, without allocating weights.

        Also validates everything the model decides (index range,
        ``output_stride``), so that a failing plan fails before any real build.
        """

    @abstractmethod
    def create(self, plan: BuildPlan) -> nn.Module:
        """The backend's own model (``features_only=False``) or a feature model."""

    @abstractmethod
    def source_on_meta(self, plan: BuildPlan) -> nn.Module:
        """The source model without weights (meta device), e.g. for tracing node names;
        a module passed in is returned as it is."""
