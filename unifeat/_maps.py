"""Reading feature maps off tensor shapes: layout, reduction, channels.

Shared by every backend that finds levels from a shape pass (FX graphs,
transformers hooks) and by the ``output_stride`` planner.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def reduction(size: int, extent: int) -> int:
    """Exact where the map divides the input (patch 14 -> 14), else the nearest power
    of two (valid-padding nets such as AlexNet: 224 / 55 -> 4)."""
    if extent <= 0:
        return 0
    if size % extent == 0:
        return size // extent
    return int(2 ** max(0, round(math.log2(size / extent))))


def spatial(shape: Sequence[int], size: tuple[int, int]) -> tuple[str, int, int] | None:
    """``(layout, reduction, channels)`` of a 4-D map, or None (not a map, or 1x1)."""
    if len(shape) != 4:
        return None
    height, width = size
    for layout, (h, w, c) in (
        ("NCHW", (shape[2], shape[3], shape[1])),
        ("NHWC", (shape[1], shape[2], shape[3])),
    ):
        if h <= 1 and w <= 1:
            continue
        r_h, r_w = reduction(height, h), reduction(width, w)
        if r_h == r_w and r_h >= 1:
            return layout, r_h, c
    return None
