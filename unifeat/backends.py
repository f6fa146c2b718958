"""Writing a backend: the interface an adapter implements, and what it hands the engine.

An adapter describes one model zoo — names, how to build a model, native
switches, preprocessing — and the engine does the rest (levels, runners,
``output_stride``, the feature model). Register it with
:func:`unifeat.register_backend` or an entry point in the ``unifeat.backends``
group; the docs page "Writing a backend" walks through one.

Examples:
    >>> import torch.nn as nn, unifeat
    >>> from unifeat.backends import Adapter
    >>> class Zoo(Adapter):
    ...     name = "zoo"
    ...     def has_model(self, name): return name == "two_stage"
    ...     def model_names(self): return ["two_stage"]
    ...     def build(self, plan, *, meta, extra_kwargs=None):
    ...         return nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.Conv2d(8, 16, 3, 2, 1))
    >>> unifeat.register_backend("zoo", Zoo)
    >>> unifeat.create_model("zoo:two_stage", features_only=True).feature_info.reduction()
    [2, 4]
"""

from unifeat._backends._base import Adapter, NativeLevels
from unifeat._engine.hooks import CallingConvention
from unifeat._engine.levels import Level
from unifeat._engine.native import NativeSpec
from unifeat._options import BuildPlan
from unifeat._registry import ENTRY_POINT_GROUP, register_backend

__all__ = [
    "ENTRY_POINT_GROUP",
    "Adapter",
    "BuildPlan",
    "CallingConvention",
    "Level",
    "NativeLevels",
    "NativeSpec",
    "register_backend",
]
