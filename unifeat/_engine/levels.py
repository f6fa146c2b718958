"""The one level type, the default selection, and how level tensors become maps.

Every finder (graph, hooks, native) describes a model as a list of
:class:`Level`; every runner turns what a level's module returns into an NCHW
map with :func:`to_map`. The rules are written down in the docs' "Levels and
indices" page; this module is where they are implemented, once.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from torch import Tensor

from unifeat._errors import UnsupportedOptionError
from unifeat._feature_info import FeatureInfo
from unifeat._indices import IndexSpec, normalize_indices

Layout = Literal["NCHW", "NHWC", "tokens", "raw"]
"""How a level's module returns it: a map, a channels-last map, ``[N, L, C]``
tokens (prefix tokens first, then the patch grid row by row), or as is
(``return_nodes`` picks that are not maps)."""

FeatureMap = Tensor | tuple[Tensor, Tensor]
"""A map, or ``(map, prefix_tokens)`` when prefix tokens were asked for."""

PLAIN_DEFAULT = 3
"""Plain token models (one reduction throughout) return their last 3 blocks by default."""


@dataclass(frozen=True)
class Level:
    """One feature level as a finder found it.

    ``module`` names the level in :class:`~unifeat.FeatureInfo`; ``where`` is
    what the runner reads (an FX node name, or a module path for hooks).
    """

    module: str
    num_chs: int
    reduction: int
    layout: Layout = "NCHW"
    where: str = ""
    block: int = -1
    """Hook runner: the index in the block container (-1: a module before it)."""
    num_prefix_tokens: int = 0
    """Measured at the build size; at run time the rule of :func:`to_map` decides."""
    grid: Literal["exact", "ceil"] = "exact"
    """Tokens: the grid is ``H / r`` (a patch grid: other sizes are refused) or
    ``ceil(H / r)`` (the stages of hierarchical token models)."""
    extra: dict[str, Any] = field(default_factory=dict, compare=False)
    """More metadata for ``FeatureInfo`` (``node`` for FX levels)."""

    def as_dict(self) -> dict[str, Any]:
        return dict(
            num_chs=self.num_chs, reduction=self.reduction, module=self.module, **self.extra
        )

    def with_reduction(self, reduction: int) -> Level:
        return dataclasses.replace(self, reduction=reduction)


def is_plain(levels: Sequence[Level]) -> bool:
    """One map size throughout and more levels than the default takes: a plain ViT-like."""
    return len({level.reduction for level in levels}) == 1 and len(levels) > PLAIN_DEFAULT


def default_indices(levels: Sequence[Level]) -> IndexSpec:
    """The one default selection: every level of a hierarchical net, the last 3
    blocks of a plain token model (as timm's ``features_only`` does)."""
    return PLAIN_DEFAULT if is_plain(levels) else None


def feature_info(
    levels: Sequence[Level], out_indices: IndexSpec, *, context: str, default: IndexSpec = None
) -> FeatureInfo:
    """The :class:`FeatureInfo` of ``levels`` with ``out_indices`` normalized.

    ``default`` overrides the policy where a library's own default is the
    contract (timm's ``features_only``); ``None`` applies :func:`default_indices`.
    """
    chosen = default if default is not None else default_indices(levels)
    indices = normalize_indices(out_indices, len(levels), chosen, context=context)
    return FeatureInfo.from_dicts([level.as_dict() for level in levels], indices)


# -- reading maps off shapes ---------------------------------------------------------


def reduction(size: int, extent: int) -> int:
    """Exact where the map divides the input (patch 14 -> 14), else the nearest power
    of two (valid-padding nets such as AlexNet: 224 / 55 -> 4)."""
    if extent <= 0:
        return 0
    if size % extent == 0:
        return size // extent
    return int(2 ** max(0, round(math.log2(size / extent))))


def spatial(shape: Sequence[int], size: tuple[int, int]) -> tuple[str, int, int] | None:
    """``(layout, reduction, channels)`` of a 4-D map, or None.

    A 1x1 map counts where it is the input reduced by a power of two in both
    directions (a 32x32 input through a stride-32 net); a channels-last reading
    is only tried where the channels-first one does not fit.
    """
    if len(shape) != 4:
        return None
    height, width = size
    for layout, (h, w, c) in (
        ("NCHW", (shape[2], shape[3], shape[1])),
        ("NHWC", (shape[1], shape[2], shape[3])),
    ):
        if h < 1 or w < 1:
            continue
        r_h, r_w = reduction(height, h), reduction(width, w)
        if r_h == r_w and r_h >= 1 and (h > 1 or w > 1 or _single_cell(height, width, r_h)):
            return layout, r_h, c
    return None


def _single_cell(height: int, width: int, stride: int) -> bool:
    # A power-of-two stride of at least 8: what a backbone's last stage reaches
    # (ConvNeXt at 32x32), not a global pool over an arbitrary input size.
    return height == width == stride and stride >= 8 and stride & (stride - 1) == 0


def token_grid(shape: Sequence[int], cells: int, max_prefix: int = 32) -> int | None:
    """The number of prefix tokens of ``[N, L, C]`` tokens over a grid of ``cells``
    patches, or None where the tokens are no such grid."""
    if len(shape) != 3:
        return None
    prefix = int(shape[1]) - cells
    return prefix if 0 <= prefix <= max_prefix else None


# -- tokens -> map -------------------------------------------------------------------


def grid_size(level: Level, height: int, width: int, *, context: str) -> tuple[int, int]:
    """The patch grid of a token level at an input of ``height`` x ``width``.

    A size that is not a multiple of the patch size is refused: the model would
    crop or pad it silently, and the map would no longer line up with the image.
    """
    patch = level.reduction
    if patch < 1 or height % patch or width % patch:
        raise off_grid(height, width, max(patch, 1), context=context)
    return height // patch, width // patch


def off_grid(height: int, width: int, patch: int, *, context: str) -> UnsupportedOptionError:
    """The error for an input of a token model that is not a multiple of its patch
    size, naming the valid sizes nearest to it."""
    lower = (max(patch, height // patch * patch), max(patch, width // patch * patch))
    upper = (-(-height // patch) * patch, -(-width // patch) * patch)
    return UnsupportedOptionError(
        f"input {height}x{width} is not a multiple of the patch size {patch} of {context}: "
        f"it takes heights and widths that are multiples of {patch}, such as "
        f"{lower[0]}x{lower[1]} or {upper[0]}x{upper[1]} (resize or pad the input; the "
        "model would crop it silently)"
    )


def to_map(
    tensor: Tensor,
    level: Level,
    input_hw: tuple[int, int],
    *,
    prefix_tokens: bool,
    context: str,
) -> FeatureMap:
    """What a level's module returned, as an NCHW map (with its prefix tokens if asked).

    The one tokens -> map rule: of ``L`` tokens at an input of ``H`` x ``W``
    and patch size ``p``, the last ``(H / p) * (W / p)`` are the patch grid in
    row-major order; the ``L - (H / p) * (W / p)`` before them are prefix
    tokens (class, distillation, registers).
    """
    if level.layout == "NHWC":
        feature_map = tensor.permute(0, 3, 1, 2)
    elif level.layout == "tokens":
        if level.grid == "ceil":
            rows, cols = (-(-input_hw[0] // level.reduction), -(-input_hw[1] // level.reduction))
        else:
            rows, cols = grid_size(level, *input_hw, context=context)
        prefix = tensor.shape[1] - rows * cols
        if prefix < 0:
            raise UnsupportedOptionError(
                f"{context} returned {tensor.shape[1]} tokens at level {level.module!r}, fewer "
                f"than its {rows}x{cols} patch grid"
            )
        patches = tensor[:, prefix:]
        feature_map = patches.transpose(1, 2).reshape(tensor.shape[0], tensor.shape[2], rows, cols)
        if prefix_tokens:
            return feature_map, tensor[:, :prefix]
        return feature_map
    else:
        feature_map = tensor
    return feature_map
