"""Extraction engines by name: the seam between :func:`unifeat.extract` and what
runs its batches (docs/extraction-at-scale.md).

The extraction core lists the images, opens the store and hands an engine the
batches still to run; the engine yields, batch by batch, the rows it computed
and the images it could not read, which the core commits. An engine's module
registers it here when imported; the core asks for engines by name only, so it
never imports an engine's module, and ``unifeat.ray`` depends on the core, not
the other way round.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from unifeat._errors import UnsupportedOptionError, format_choices

if TYPE_CHECKING:
    import torch

    from unifeat._data import DataConfig
    from unifeat._feature_model import FeatureModel

Batch = tuple[list[str], dict[str, np.ndarray], list[tuple[str, str]]]
"""What an engine yields per batch: the paths of the rows it computed, their
float32 arrays per level (``{}`` when none), and ``(path, reason)`` of the
images it could not read."""


@dataclass(frozen=True)
class EngineRun:
    """What an engine is asked to run: ``batches`` are fixed slices of the
    sorted image list, less what the output holds, to be run as they are (a
    resumed run then computes exactly the batches an uninterrupted one would)."""

    batches: Sequence[Sequence[str]]
    model: FeatureModel
    config: DataConfig
    pool: str
    device: torch.device
    dtype: torch.dtype
    channels_last: bool | None
    fast_decode: bool
    num_workers: int
    address: str | None


@dataclass(frozen=True)
class Engine:
    """An engine: ``run`` yields one :data:`Batch` per batch, in order."""

    name: str
    run: Callable[[EngineRun], Iterator[Batch]]
    devices_here: bool = True
    """Whether ``device`` must exist on this machine; a cluster's workers may
    have GPUs the driver lacks."""
    takes_address: bool = False
    """Whether ``address`` (a cluster to connect to) means anything to it."""


_ENGINES: dict[str, Engine] = {}
_PROVIDERS = {"local": "unifeat._extract", "ray": "unifeat.ray"}
"""The modules that register the built-in engines when imported: loaded on
first use, so choosing an engine never costs an import of the others."""


def register_engine(engine: Engine) -> None:
    """Make ``engine`` available as ``extract(..., engine=engine.name)``."""
    _ENGINES[engine.name] = engine


def engine_names() -> tuple[str, ...]:
    """The names ``engine=`` (``--engine``) takes."""
    return tuple(sorted(set(_ENGINES) | set(_PROVIDERS)))


def get_engine(name: object) -> Engine:
    """The engine called ``name``, or :class:`UnsupportedOptionError` listing them."""
    if isinstance(name, str) and name not in _ENGINES and name in _PROVIDERS:
        importlib.import_module(_PROVIDERS[name])
    if not isinstance(name, str) or name not in _ENGINES:
        raise UnsupportedOptionError(
            f"invalid engine={name!r}: expected {format_choices(engine_names())}"
        )
    return _ENGINES[name]
