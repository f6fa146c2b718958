"""Running a real module on the meta device without touching it."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn


@contextmanager
def weightless(
    module: nn.Module, *, trainable: bool = False, every_parameter: bool = False
) -> Iterator[dict[str, Tensor]]:
    """Meta stand-ins for every parameter and buffer of ``module`` for the duration.

    A forward inside computes nothing and copies no weight (a fake-tensor copy
    of ResNet-50's weights cost 3x the rest of a build); the module's own
    tensors are back in place afterwards, untouched. With ``trainable`` the
    stand-ins of trainable parameters require grad (to see which get one).
    Yields the stand-ins by name.
    """
    from torch.nn.utils.stateless import _reparametrize_module

    named = [
        *module.named_parameters(remove_duplicate=False),
        *module.named_buffers(remove_duplicate=False),
    ]
    stand_ins = {
        name: torch.empty_like(t, device="meta").requires_grad_(
            isinstance(t, nn.Parameter) and (every_parameter or (trainable and t.requires_grad))
        )
        for name, t in named
    }
    with _reparametrize_module(module, stand_ins):
        yield stand_ins


def meta_batch(module: nn.Module, input_size: Sequence[int], batch: int = 2) -> Tensor:
    """A meta-device batch of ``input_size`` in the dtype of ``module``'s floating
    parameters (a model built with ``dtype=torch.float64`` takes float64 input)."""
    dtype = next(
        (p.dtype for p in module.parameters() if p.is_floating_point()), torch.get_default_dtype()
    )
    return torch.empty(batch, *input_size, device="meta", dtype=dtype)
