"""Feature-level metadata as data (docs/feature-info.md).

:class:`FeatureInfo` answers the questions a head needs answered (channels,
reductions, module names) with timm's accessor names, so code written against
``timm`` feature models keeps working. Unlike timm's, it is a pydantic model:
validated once and serializable to JSON.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, overload

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from unifeat._errors import (
    InvalidIndicesError,
    UnknownFieldError,
    UnsupportedOptionError,
    format_choices,
)
from unifeat._indices import (
    check_index_spec,
    index_value,
    is_index_sequence,
    normalize_indices,
    shown_value,
)

__all__ = ["FeatureInfo", "FeatureLevel"]


class FeatureLevel(BaseModel):
    """One feature level: its position, channels, reduction and source module.

    Extra fields a backend knows (e.g. ``stage``) are kept. Levels also read
    like timm's dicts: ``level["num_chs"]``.

    >>> level = FeatureLevel(index=1, num_chs=256, reduction=4, module="layer1")
    >>> level["num_chs"], level.reduction
    (256, 4)
    """

    model_config = ConfigDict(frozen=True, extra="allow")

    index: int
    num_chs: int
    reduction: int | float
    """How many input pixels one map cell spans: an int, except where a level's
    stride is fractional (a simple pyramid's finest level on a patch-14 ViT: 3.5)."""
    module: str

    def __getitem__(self, key: str) -> Any:
        fields = [*type(self).model_fields, *(self.model_extra or {})]
        if not isinstance(key, str) or key not in fields:
            raise UnknownFieldError(
                f"feature levels have no field {key!r}: they have {format_choices(fields)}"
            )
        return getattr(self, key)

    def get(self, key: str, default: Any = None) -> Any:
        """``level[key]``, or ``default`` where the level has no such field."""
        return getattr(self, key, default)

    def keys(self) -> list[str]:
        """The field names, as on the dicts timm's ``feature_info`` holds."""
        return list(self.model_dump())


class FeatureInfo(BaseModel):
    """The ordered list of a model's feature levels and the ones it returns.

    Indexing, ``len()`` and iteration cover *every* level, as in timm;
    ``channels()``, ``reduction()``, ``module_name()`` and ``get_dicts()``
    default to the returned levels (``out_indices``), and take ``idx`` (an
    absolute level index or a list of them) to ask about others.

    >>> info = FeatureInfo.from_dicts(
    ...     [dict(num_chs=64, reduction=2, module="act1"),
    ...      dict(num_chs=256, reduction=4, module="layer1"),
    ...      dict(num_chs=512, reduction=8, module="layer2")],
    ...     out_indices=(1, 2),
    ... )
    >>> info.channels(), info.reduction(), info.channels(0), len(info)
    ([256, 512], [4, 8], 64, 3)
    >>> FeatureInfo.model_validate_json(info.model_dump_json()) == info
    True
    """

    model_config = ConfigDict(frozen=True)

    levels: tuple[FeatureLevel, ...]
    out_indices: tuple[int, ...]

    @model_validator(mode="after")
    def _check(self) -> FeatureInfo:
        positions = [level.index for level in self.levels]
        if positions != list(range(len(self.levels))):
            raise ValueError(f"level indices must be 0..{len(self.levels) - 1}, got {positions}")
        if not self.levels:
            raise ValueError("a FeatureInfo needs at least one level")
        normalized = normalize_indices(self.out_indices, len(self.levels))
        if normalized != self.out_indices:
            raise ValueError(f"out_indices must be normalized, got {self.out_indices}")
        return self

    @classmethod
    def from_dicts(
        cls, levels: Iterable[Mapping[str, Any]], out_indices: Sequence[int] | None = None
    ) -> FeatureInfo:
        """Build from timm-style dicts (``num_chs``, ``reduction``, ``module``, ...);
        ``out_indices`` follows the index rule (an int ``n`` is the last ``n``)."""
        try:
            parsed = tuple(
                FeatureLevel(**{**dict(level), "index": position})
                for position, level in enumerate(levels)
            )
        except (ValidationError, TypeError, ValueError) as exc:
            raise UnsupportedOptionError(
                f"invalid feature levels: each is a dict with num_chs, reduction and module "
                f"({_first_problem(exc)})"
            ) from None
        if not parsed:
            raise UnsupportedOptionError("a FeatureInfo needs at least one level, got none")
        chosen = normalize_indices(out_indices, len(parsed), context="these levels")
        return cls(levels=parsed, out_indices=chosen)

    def from_other(self, out_indices: int | Sequence[int]) -> FeatureInfo:
        """The same levels with another selection (normalized, as everywhere).

        >>> info = FeatureInfo.from_dicts([dict(num_chs=c, reduction=r, module=m) for c, r, m in
        ...     [(64, 2, "act1"), (256, 4, "layer1"), (512, 8, "layer2")]], out_indices=(1, 2))
        >>> info.from_other((-1,)).out_indices
        (2,)
        """
        chosen = normalize_indices(
            check_index_spec(out_indices, context="these levels"),
            len(self.levels),
            context="these levels",
        )
        return FeatureInfo(levels=self.levels, out_indices=chosen)

    def _level(self, index: object) -> FeatureLevel:
        """Level ``index`` (negatives from the end), or an error naming the valid range."""
        count = len(self.levels)
        valid = f"valid indices are 0..{count - 1} or -{count}..-1"
        try:
            position = index_value(index)
        except InvalidIndicesError:
            raise InvalidIndicesError(
                f"level index {shown_value(index)} is not an int: {valid}"
            ) from None
        if not -count <= position < count:
            raise InvalidIndicesError(f"level index {position} is out of range: {valid}")
        return self.levels[position]

    def _selected(self, idx: object) -> list[FeatureLevel] | FeatureLevel:
        if idx is None:
            return [self.levels[i] for i in self.out_indices]
        if is_index_sequence(idx):
            return [self._level(i) for i in idx]  # type: ignore[attr-defined]
        return self._level(idx)

    @overload
    def get(self, key: str, idx: None = None) -> list[Any]: ...
    @overload
    def get(self, key: str, idx: int) -> Any: ...
    @overload
    def get(self, key: str, idx: Sequence[int]) -> list[Any]: ...
    def get(self, key: str, idx: int | Sequence[int] | None = None) -> Any:
        """Field ``key`` of the returned levels, or of level(s) ``idx``.

        >>> info = FeatureInfo.from_dicts([dict(num_chs=c, reduction=r, module=m) for c, r, m in
        ...     [(64, 2, "act1"), (256, 4, "layer1"), (512, 8, "layer2")]], out_indices=(1, 2))
        >>> info.get("module"), info.get("num_chs", 0)
        (['layer1', 'layer2'], 64)
        """
        chosen = self._selected(idx)
        if isinstance(chosen, FeatureLevel):
            return chosen[key]
        return [level[key] for level in chosen]

    def get_dicts(
        self, keys: Sequence[str] | None = None, idx: int | Sequence[int] | None = None
    ) -> list[dict[str, Any]] | dict[str, Any]:
        """Levels as plain dicts, optionally only the fields ``keys``.

        >>> info = FeatureInfo.from_dicts([dict(num_chs=c, reduction=r, module=m) for c, r, m in
        ...     [(64, 2, "act1"), (256, 4, "layer1"), (512, 8, "layer2")]], out_indices=(1, 2))
        >>> info.get_dicts(keys=("num_chs", "reduction"))
        [{'num_chs': 256, 'reduction': 4}, {'num_chs': 512, 'reduction': 8}]
        """
        chosen = self._selected(idx)
        # One field name alone is one key, not a sequence of letters.
        wanted = [keys] if isinstance(keys, str) else keys

        def as_dict(level: FeatureLevel) -> dict[str, Any]:
            full = level.model_dump()
            return full if wanted is None else {k: level[k] for k in wanted}

        if isinstance(chosen, FeatureLevel):
            return as_dict(chosen)
        return [as_dict(level) for level in chosen]

    def channels(self, idx: int | Sequence[int] | None = None) -> Any:
        """Channel counts: ``[256, 512, 1024, 2048]`` for resnet50's last four levels.

        >>> info = FeatureInfo.from_dicts([dict(num_chs=c, reduction=r, module=m) for c, r, m in
        ...     [(64, 2, "act1"), (256, 4, "layer1"), (512, 8, "layer2")]], out_indices=(1, 2))
        >>> info.channels(), info.channels([0, 2])
        ([256, 512], [64, 512])
        """
        return self.get("num_chs", idx)

    def reduction(self, idx: int | Sequence[int] | None = None) -> Any:
        """Input-to-map stride of each level: ``[4, 8, 16, 32]``.

        >>> info = FeatureInfo.from_dicts([dict(num_chs=c, reduction=r, module=m) for c, r, m in
        ...     [(64, 2, "act1"), (256, 4, "layer1"), (512, 8, "layer2")]], out_indices=(1, 2))
        >>> info.reduction(), info.reduction(0)
        ([4, 8], 2)
        """
        return self.get("reduction", idx)

    def module_name(self, idx: int | Sequence[int] | None = None) -> Any:
        """Name of the module whose output each level is (``"layer1"``, ``"blocks.9"``).

        >>> info = FeatureInfo.from_dicts([dict(num_chs=c, reduction=r, module=m) for c, r, m in
        ...     [(64, 2, "act1"), (256, 4, "layer1"), (512, 8, "layer2")]], out_indices=(1, 2))
        >>> info.module_name()
        ['layer1', 'layer2']
        """
        return self.get("module", idx)

    def __len__(self) -> int:
        return len(self.levels)

    def __getitem__(self, item: int) -> FeatureLevel:
        return self._level(item)

    def __iter__(self) -> Iterator[FeatureLevel]:  # type: ignore[override]
        return iter(self.levels)


def _first_problem(exc: Exception) -> str:
    """Every field pydantic complains about, in one line."""
    if isinstance(exc, ValidationError):
        return "; ".join(
            f"{'.'.join(str(part) for part in error['loc']) or 'level'}: {error['msg'].lower()}"
            for error in exc.errors()
        )
    return str(exc)
