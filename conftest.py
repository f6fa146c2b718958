"""Shared by the tests and the docstring examples under unifeat/."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator

import pytest

# The smp integration's examples run smp itself: without the [smp] extra they are not
# collected (its tests skip themselves).
collect_ignore = (
    []
    if importlib.util.find_spec("segmentation_models_pytorch")
    else ["unifeat/integrations/smp.py"]
)


@pytest.fixture(autouse=True)
def _isolated_backend_registry() -> Iterator[None]:
    """Backends a test or an example registers are gone after it."""
    from unifeat import _registry

    _registry.backend_names()  # read entry points before taking the snapshot
    saved = (dict(_registry._ENTRIES), dict(_registry._ALIASES), dict(_registry._ADAPTERS))
    yield
    for live, kept in zip(
        (_registry._ENTRIES, _registry._ALIASES, _registry._ADAPTERS), saved, strict=True
    ):
        live.clear()
        live.update(kept)
