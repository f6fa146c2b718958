from __future__ import annotations

import pytest
import torch
from torch import nn


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _flat(key: str) -> str:
    return key.replace(".", "_")


def copy_weights_into_timm_features(features: nn.Module, source: nn.Module) -> None:
    """Load ``source``'s weights into a timm ``features_only`` model.

    timm's feature wrappers rename modules (``stages.0`` -> ``stages_0``,
    ``model.`` prefixes), so keys are matched with dots and underscores folded
    together. Every key of ``features`` must find its source: the reference
    then runs exactly the weights unifeat runs.
    """
    by_flat = {_flat(k): v for k, v in source.state_dict().items()}
    state = {}
    for key in features.state_dict():
        flat = _flat(key)
        if flat not in by_flat and key.startswith("model."):
            flat = _flat(key[len("model.") :])
        state[key] = by_flat[flat]
    features.load_state_dict(state, strict=True)
