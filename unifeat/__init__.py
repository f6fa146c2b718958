"""unifeat: one timm-style API for intermediate features of vision models.

>>> import torch, unifeat
>>> backbone = unifeat.create_model("resnet18", features_only=True, out_indices=(-2, -1))
>>> backbone.feature_info.channels()
[256, 512]
>>> [tuple(f.shape) for f in backbone(torch.randn(1, 3, 64, 64))]
[(1, 256, 4, 4), (1, 512, 2, 2)]

Backend libraries (timm, ...) are imported on first use, not here.
"""

from unifeat._api import create_model, feature_info, get_node_names, list_models
from unifeat._data import DataConfig, create_transform, data_config
from unifeat._engine.classifier import ClassifierModel
from unifeat._errors import (
    BackendUnavailableError,
    CheckpointError,
    InvalidIndicesError,
    InvalidNodeError,
    TracingError,
    UnifeatError,
    UnknownBackendError,
    UnknownFieldError,
    UnknownModelError,
    UnsupportedOptionError,
)
from unifeat._extract import ExtractResult, extract, load_features, load_matrix, merge_features
from unifeat._feature_info import FeatureInfo, FeatureLevel
from unifeat._feature_model import FeatureModel
from unifeat._registry import register_backend
from unifeat._show import plot_feature_maps
from unifeat._store import StoreError

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "CheckpointError",
    "ClassifierModel",
    "DataConfig",
    "ExtractResult",
    "FeatureInfo",
    "FeatureLevel",
    "FeatureModel",
    "InvalidIndicesError",
    "InvalidNodeError",
    "StoreError",
    "TracingError",
    "UnifeatError",
    "UnknownBackendError",
    "UnknownFieldError",
    "UnknownModelError",
    "UnsupportedOptionError",
    "__version__",
    "create_model",
    "create_transform",
    "data_config",
    "extract",
    "feature_info",
    "get_node_names",
    "list_models",
    "load_features",
    "load_matrix",
    "merge_features",
    "plot_feature_maps",
    "register_backend",
]
