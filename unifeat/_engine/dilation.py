"""``output_stride`` without a native switch: strided convs and pools become dilated.

Backend-neutral: a finder lists the model's convolutions and pools in
execution order with their input reductions (from an FX graph, or from hooks on
a shape pass), and gets back the changes to apply to the modules.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from unifeat._engine.levels import Level
from unifeat._errors import UnsupportedOptionError, format_choices

SPATIAL_OPS = (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)


@dataclass(frozen=True)
class DilationChange:
    """New stride/dilation/padding for one module, by its qualified name."""

    module: str
    stride: int
    dilation: int


def plan_dilation(
    ops: Iterable[tuple[str, nn.Module, int]],
    output_stride: int,
    *,
    context: str,
) -> list[DilationChange]:
    """What to change so that no map gets smaller than input / ``output_stride``.

    ``ops`` are ``(qualified name, module, reduction of its input)`` of the
    model's convs and pools, in the order they run. Each strided one whose output would pass
    ``output_stride`` keeps stride 1; it and every conv or pool after it
    dilate by the stride they no longer apply (input reduction / ``output_stride``).
    """
    changes = []
    for name, op, reduction_in in ops:
        if not isinstance(op, SPATIAL_OPS):
            continue
        stride = _pair(op.stride)[0] if op.stride is not None else 1
        kernel = _pair(op.kernel_size)[0]
        rate = max(1, reduction_in // output_stride)
        passes = reduction_in * stride > output_stride
        if (not passes and rate == 1) or (kernel == 1 and stride == 1):
            continue  # above the target stride, or pointwise: unchanged
        if isinstance(op, nn.AvgPool2d) or (isinstance(op, nn.MaxPool2d) and kernel % 2 == 0):
            raise UnsupportedOptionError(
                f"output_stride={output_stride} would have to dilate the "
                f"{type(op).__name__}({kernel}) {name!r} of {context}, which cannot keep "
                "its output size dilated"
            )
        changes.append(DilationChange(name, 1 if passes else stride, rate))
    return changes


def _pair(value: Any) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def apply_dilation(root: nn.Module, changes: Sequence[DilationChange]) -> None:
    """Apply ``changes`` in place; convs and max pools keep their output sizes 'same'."""
    for change in changes:
        module = root.get_submodule(change.module)
        if isinstance(module, nn.Conv2d):
            base = _pair(module.dilation)[0]
            module.stride = (change.stride, change.stride)
            module.dilation = (base * change.dilation, base * change.dilation)
            if change.stride == 1:
                # "same" pads asymmetrically where it must (ConvNeXt's 2x2 downsampling).
                module.padding = "same"
            else:
                kernel = _pair(module.kernel_size)[0]
                module.padding = ((kernel - 1) * module.dilation[0] // 2,) * 2
        elif isinstance(module, nn.MaxPool2d):
            kernel = _pair(module.kernel_size)[0]
            module.stride = change.stride
            module.dilation = change.dilation
            module.padding = (kernel - 1) * change.dilation // 2


def supported_message(strides: Sequence[int]) -> str:
    return f"supported values are {format_choices(sorted(set(strides)))}"


def generic_dilation(
    levels: Sequence[Level],
    ops: Sequence[tuple[str, nn.Module, int]],
    output_stride: int,
    *,
    remeasure: Callable[[Sequence[DilationChange]], Sequence[Level]],
    context: str,
    also_supported: Sequence[int] = (),
) -> tuple[list[DilationChange], list[Level]]:
    """``output_stride`` for any conv net: plan the changes, measure the levels of the
    dilated build (``remeasure`` applies the changes to a weightless copy and reads
    the levels' new reductions), and check that the target was reached.

    The one dilation loop of every backend; a target above the native stride is
    refused, naming the values that work (token models are refused before).
    """
    native = max(level.reduction for level in levels)
    if output_stride > native:
        raise UnsupportedOptionError(
            f"output_stride={output_stride} is larger than the native stride {native} of "
            f"{context}: {supported_message([native, *also_supported])}"
        )

    def reaches(stride: int) -> bool:
        try:
            found = remeasure(plan_dilation(ops, stride, context=context))
        except UnsupportedOptionError:
            return False
        return max(level.reduction for level in found) == stride

    def working() -> str:
        # Only on the error path: each candidate is one more weightless build.
        candidates = {level.reduction for level in levels if level.reduction > 1}
        found = [stride for stride in sorted(candidates) if stride == native or reaches(stride)]
        return supported_message([*found, *also_supported])

    changes = plan_dilation(ops, output_stride, context=context)
    try:
        dilated = list(remeasure(changes))
    except UnsupportedOptionError:
        raise UnsupportedOptionError(
            f"output_stride={output_stride} is not supported by {context}: once dilated, its "
            f"branches no longer produce maps of matching sizes (valid padding); {working()}"
        ) from None
    reached = max(level.reduction for level in dilated)
    if reached != output_stride:
        why = (
            f"it downsamples outside conv and pool modules (reached {reached})"
            if any(level.reduction == output_stride for level in levels)
            else f"dilating its strided convs and pools gives a stride of {reached}"
        )
        raise UnsupportedOptionError(
            f"output_stride={output_stride} is not supported by {context}: {why}; {working()}"
        )
    return changes, dilated
