"""The one place where level indices are checked and normalized (docs/levels.md).

Two steps, because the number of levels is only known once a backend has
looked at the model: :func:`check_index_spec` validates the *form* of what the
user passed (at the front door), :func:`normalize_indices` resolves it against
a model's level count (in the adapter).
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Mapping

from unifeat._errors import InvalidIndicesError

IndexSpec = int | tuple[int, ...] | None
"""``None`` (backend default), ``n`` (the last n levels) or explicit indices."""


def _as_int(value: object, what: str, where: str) -> int:
    # bool is an int subclass, but out_indices=True is always a mistake.
    if isinstance(value, bool):
        raise InvalidIndicesError(f"{what} must be integers{where}, got {value!r}")
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise InvalidIndicesError(
            f"{what} must be integers{where}, got {value!r} ({type(value).__name__})"
        ) from None


def check_index_spec(
    value: object, what: str = "out_indices", context: str | None = None
) -> IndexSpec:
    """Validate the form of an index request and return it canonical.

    Accepts ``None``, a positive int ``n`` (the last ``n`` levels) or a
    non-empty sequence of ints; returns ``None``, an ``int`` or a tuple.

    >>> check_index_spec([1, -1])
    (1, -1)
    >>> check_index_spec(2)
    2

    ``context`` names the model in messages (``'resnet50' (backend 'timm')``).
    """
    where = f" for {context}" if context else ""
    if value is None:
        return None
    if isinstance(value, Iterable) and not isinstance(value, (str, bytes, Mapping)):
        indices = tuple(_as_int(v, what, where) for v in value)
        if not indices:
            raise InvalidIndicesError(
                f"{what} is empty ({value!r}){where}; ask for at least one level"
            )
        return indices
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise InvalidIndicesError(
            f"{what} must be None, a positive int (the last n levels) or a sequence "
            f"of ints{where}, got {value!r} ({type(value).__name__})"
        )
    count = _as_int(value, what, where)
    if count < 1:
        raise InvalidIndicesError(
            f"{what}={count!r}{where} asks for the last {count} levels; an int {what} must "
            "be at least 1 (use a sequence such as (-1,) to pick by position)"
        )
    return count


def _valid_range(num_levels: int) -> str:
    return f"0..{num_levels - 1} or -{num_levels}..-1"


def normalize_indices(
    spec: object,
    num_levels: int,
    default: IndexSpec = None,
    *,
    context: str = "the model",
    what: str = "out_indices",
) -> tuple[int, ...]:
    """Resolve an index request against ``num_levels`` levels.

    Returns non-negative indices in depth order. ``None`` means ``default``
    (itself ``None`` = every level). Out-of-range values and two entries naming
    the same level raise :class:`InvalidIndicesError` with the valid range.

    >>> normalize_indices((3, -1), 5)
    (3, 4)
    >>> normalize_indices(2, 5)
    (3, 4)
    >>> normalize_indices(None, 12, default=3)
    (9, 10, 11)
    """
    spec = check_index_spec(spec, what, context)
    if spec is None:
        spec = check_index_spec(default, what, context)
        if spec is None:
            return tuple(range(num_levels))
    if isinstance(spec, int):
        if spec > num_levels:
            raise InvalidIndicesError(
                f"{what}={spec} asks for the last {spec} levels, but {context} has "
                f"{num_levels}: use 1..{num_levels}"
            )
        return tuple(range(num_levels - spec, num_levels))
    resolved: dict[int, int] = {}
    for index in spec:
        if not -num_levels <= index < num_levels:
            raise InvalidIndicesError(
                f"{what} value {index} is out of range for {context}, which has "
                f"{num_levels} levels: valid indices are {_valid_range(num_levels)}"
            )
        level = index % num_levels
        if level in resolved:
            first = resolved[level]
            same = (
                f"{first} and {index} both name level {level}"
                if first != index
                else (f"{index} is repeated")
            )
            raise InvalidIndicesError(
                f"{what} {tuple(spec)!r} has a duplicate: {same} (for {context})"
            )
        resolved[level] = index
    return tuple(sorted(resolved))
