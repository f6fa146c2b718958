"""The exception hierarchy (docs/errors.md).

Every error derives from :class:`UnifeatError` and also from the builtin a user
would already catch for that kind of mistake, so ``except ValueError`` around a
call that used to go straight to timm keeps working.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = [
    "BackendUnavailableError",
    "CheckpointError",
    "InvalidIndicesError",
    "InvalidNodeError",
    "TracingError",
    "UnifeatError",
    "UnknownBackendError",
    "UnknownModelError",
    "UnsupportedOptionError",
]


class UnifeatError(Exception):
    """Base class of every error raised by unifeat."""

    def __str__(self) -> str:
        # KeyError's own __str__ wraps the message in quotes; ours read as prose.
        return str(self.args[0]) if self.args else ""


class UnknownModelError(UnifeatError, KeyError, ValueError):
    """No backend knows the model name; the message lists close matches."""


class UnknownBackendError(UnifeatError, KeyError, ValueError):
    """The backend prefix or ``backend=`` names no registered backend."""


class InvalidIndicesError(UnifeatError, IndexError, ValueError):
    """``out_indices`` (or ``indices``) is out of range, duplicated, empty or not integers."""


class UnsupportedOptionError(UnifeatError, ValueError):
    """An option value the model or backend cannot honour (e.g. ``output_stride``)."""


class InvalidNodeError(UnifeatError, KeyError, ValueError):
    """A ``return_nodes`` entry is unknown or ambiguous."""


class UnknownFieldError(UnifeatError, KeyError, ValueError):
    """A FeatureInfo field that levels do not have (``get("nokey")``)."""


class TracingError(UnifeatError, RuntimeError):
    """FX could not trace the model."""


class BackendUnavailableError(UnifeatError, ImportError):
    """The library behind a backend is not installed."""


class CheckpointError(UnifeatError, RuntimeError):
    """A ``checkpoint_path`` file is missing, unreadable or does not fit the model."""


def close_matches(word: str, candidates: Iterable[str], n: int = 5) -> list[str]:
    """The ``n`` candidates closest to ``word``, best first (case-insensitive)."""
    by_lower: dict[str, str] = {}
    for candidate in candidates:
        by_lower.setdefault(candidate.lower(), candidate)
    found = difflib.get_close_matches(word.lower(), list(by_lower), n=n, cutoff=0.6)
    return [by_lower[f] for f in found]


def format_choices(values: Iterable[object]) -> str:
    """``'a', 'b' or 'c'`` — how messages list valid values."""
    shown = [repr(v) for v in values]
    if not shown:
        return "(none)"
    if len(shown) == 1:
        return shown[0]
    return ", ".join(shown[:-1]) + " or " + shown[-1]
