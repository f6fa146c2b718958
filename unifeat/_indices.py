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


def _scalar(value: object) -> object:
    """The Python number a 0-d array or tensor holds (NumPy scalars too); anything
    else as it is. ``np.array(2)`` is then the int 2 everywhere, and a 0-d bool
    tensor is a bool, which ``operator.index`` would silently take as 0 or 1."""
    if getattr(value, "ndim", None) == 0 and callable(getattr(value, "item", None)):
        return value.item()  # type: ignore[attr-defined]
    return value


def index_value(value: object, what: str = "indices", where: str = "") -> int:
    """One level index: an int, or a 0-d integer array or tensor; bools, floats
    and anything else are refused naming ``value`` (the rule of docs/levels.md)."""
    scalar = _scalar(value)
    # bool is an int subclass, but out_indices=True is always a mistake.
    if isinstance(scalar, bool) or getattr(value, "ndim", 0) != 0:
        raise InvalidIndicesError(f"{what} must be integers{where}, got {shown_value(value)}")
    try:
        return operator.index(scalar)  # type: ignore[arg-type]
    except TypeError:
        raise InvalidIndicesError(
            f"{what} must be integers{where}, got {shown_value(value)}"
        ) from None


def shown_value(value: object) -> str:
    """``value`` as messages name it: its repr and type (and dtype for arrays)."""
    kind = type(value).__name__
    dtype = getattr(value, "dtype", None)
    dtype_name = str(dtype).removeprefix("torch.")
    if getattr(value, "ndim", None) is not None and dtype is not None and dtype_name != kind:
        return f"{value!r} ({kind} of {dtype_name})"
    return f"{value!r} ({kind})"


def is_index_sequence(value: object) -> bool:
    """Whether ``value`` asks for several levels (a sequence, a 1-d array or
    tensor) rather than naming one (an int, a 0-d array or tensor)."""
    if getattr(value, "ndim", None) == 0:
        return False
    return isinstance(value, Iterable) and not isinstance(value, (str, bytes, Mapping))


def check_index_spec(
    value: object, what: str = "out_indices", context: str | None = None
) -> IndexSpec:
    """Validate the form of an index request and return it canonical.

    Accepts ``None``, a positive int ``n`` (the last ``n`` levels) or a
    non-empty sequence of ints; returns ``None``, an ``int`` or a tuple. A 0-d
    integer array or tensor is the int it holds, wherever an int is taken.

    >>> check_index_spec([1, -1])
    (1, -1)
    >>> check_index_spec(2)
    2

    ``context`` names the model in messages (``'resnet50' (backend 'timm')``).
    """
    where = f" for {context}" if context else ""
    if value is None:
        return None
    if is_index_sequence(value):
        indices = tuple(index_value(v, what, where) for v in value)  # type: ignore[attr-defined]
        if not indices:
            raise InvalidIndicesError(
                f"{what} is empty ({value!r}){where}; ask for at least one level"
            )
        return indices
    scalar = _scalar(value)
    if isinstance(scalar, bool) or not hasattr(scalar, "__index__"):
        raise InvalidIndicesError(
            f"{what} must be None, a positive int (the last n levels) or a sequence "
            f"of ints{where}, got {shown_value(value)}"
        )
    count = index_value(value, what, where)
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
