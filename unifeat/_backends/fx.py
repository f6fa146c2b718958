"""The generic backend: any ``nn.Module`` passed in.

Levels come from its traced FX graph; a module FX cannot trace (data-dependent
control flow) is served by hooks on its block list instead. Input size and
channel count are the module's own where it says (its first convolution),
``input_size=`` otherwise.
"""

from __future__ import annotations

from torch import nn

from unifeat._backends._base import Adapter
from unifeat._options import BuildPlan


class FxAdapter(Adapter):
    name = "fx"

    def native_input_size(self, plan: BuildPlan, source: nn.Module) -> tuple[int, int, int]:
        first = next((m for m in source.modules() if isinstance(m, nn.Conv2d)), None)
        return (first.in_channels if first is not None else 3, 224, 224)
