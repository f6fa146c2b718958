"""Category (d): what a feature model is called with.

An input that cannot work (wrong channel count, wrong rank, not a tensor, on
another device, an integer image, smaller than the model's minimum, a token
model's size that is not a multiple of its patch size) raises a unifeat error
that names the input's shape (or type, dtype, device), the model's backend and
what would be valid; it never comes back as maps of a silently wrong shape.
Inputs that can work, work: any size a CNN takes (each map is
``ceil(size / reduction)``), channels_last and non-contiguous tensors (same
numbers), NaN and inf (propagated as they are: unifeat does not look at values).

Decisions written down here:

* **Empty batch.** torch's convolutions, and so timm's, torchvision's and
  transformers' CNNs, return ``(0, C, h, w)`` maps for a batch of 0; a CNN
  feature model must too. Token models fail natively (their reshapes cannot
  infer a dimension from 0 elements), so for them either ``(0, C, h, w)`` or a
  unifeat error that says the batch is empty.
* **float64 input on a float32 model.** torch refuses the mix, transformers
  casts the input to the model's dtype: either is fine (a unifeat error naming
  both dtypes, or the float32 result), a raw torch error is not.
* **Integer images** (``uint8`` 0..255) are refused everywhere: transformers
  casting them to float would give features of an unnormalised image.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch

from unifeat import UnifeatError

from ._support import (
    BACKENDS,
    HF_TOKENS,
    TIMM_TOKENS,
    Backend,
    eval_model,
    maps_of,
    param,
    refused,
)

ALL = (*BACKENDS, TIMM_TOKENS)
CNNS = tuple(b for b in ALL if not b.tokens)
TOKENS = tuple(b for b in ALL if b.tokens)
_SEP = r"\s*[,x\u00d7]\s*"  # "2, 1, 32, 32", "2x1x32x32" or with a multiplication sign


def _shape(*dims: int) -> str:
    return _SEP.join(str(d) for d in dims)


def _run(backend: Backend, x: Any, method: str = "forward") -> list[torch.Tensor]:
    model = eval_model(backend)
    with torch.no_grad():
        if method == "forward":
            return maps_of(model(x))
        return maps_of(model.forward_intermediates(x, intermediates_only=True))


def _attempt(call: Callable[[], Any]) -> tuple[Any, BaseException | None]:
    """``(result, None)`` or ``(None, error)``: checks then run outside the handler."""
    try:
        return call(), None
    except Exception as error:
        error.__traceback__ = None
        return None, error


# -- refused inputs ------------------------------------------------------------------------

_RAW = "the backend library's raw exception reaches the caller"
Row = tuple[Callable[[], Any], str, list[str]]
REFUSED_ROWS: list[tuple[str, Row]] = [
    (
        "channels-1",
        (
            lambda: torch.randn(2, 1, 32, 32),
            "forward",
            [_shape(2, 1, 32, 32), r"\b3\b", r"channel"],
        ),
    ),
    (
        "channels-4",
        (
            lambda: torch.randn(2, 4, 32, 32),
            "forward",
            [_shape(2, 4, 32, 32), r"\b3\b", r"channel"],
        ),
    ),
    (
        "rank-3",
        (
            lambda: torch.randn(3, 32, 32),
            "forward",
            [_shape(3, 32, 32), r"4-?D|4 dim|N, ?C, ?H, ?W|NCHW"],
        ),
    ),
    (
        "rank-5",
        (
            lambda: torch.randn(1, 2, 3, 32, 32),
            "forward",
            [_shape(1, 2, 3, 32, 32), r"4-?D|4 dim|N, ?C, ?H, ?W|NCHW"],
        ),
    ),
    ("not-a-tensor", (lambda: [torch.randn(3, 32, 32)], "forward", [r"\blist\b", r"[Tt]ensor"])),
    (
        "other-device",
        (lambda: torch.empty(2, 3, 32, 32, device="meta"), "forward", [r"\bmeta\b", r"\bcpu\b"]),
    ),
    (
        "uint8",
        (
            lambda: torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8),
            "forward",
            [r"uint8", r"float"],
        ),
    ),
    (
        "forward_intermediates-channels-1",
        (
            lambda: torch.randn(2, 1, 32, 32),
            "forward_intermediates",
            [_shape(2, 1, 32, 32), r"\b3\b", r"channel"],
        ),
    ),
]
TOKEN_ROWS: list[tuple[str, Row]] = [
    (
        "below-patch-size",
        (lambda: torch.randn(2, 3, 7, 7), "forward", [_shape(7, 7), r"\b8\b"]),
    ),
    (
        "not-a-multiple-of-the-patch",
        (lambda: torch.randn(2, 3, 33, 47), "forward", [_shape(33, 47), r"\b8\b"]),
    ),
]
_REFUSED_BUGS: dict[tuple[str, str], str] = {}


def _refused_params() -> list[Any]:
    params = []
    for backend in ALL:
        rows = REFUSED_ROWS + (TOKEN_ROWS if backend.tokens else [])
        for row_id, row in rows:
            reason = _REFUSED_BUGS.get((backend.id, row_id)) or _REFUSED_BUGS.get(("*", row_id))
            params.append(param(backend, row, id=f"{backend.id}-{row_id}", bug_reason=reason))
    return params


@pytest.mark.parametrize(("backend", "row"), _refused_params())
def test_input_refused(backend: Backend, row: Row) -> None:
    make, method, patterns = row
    refused(lambda: _run(backend, make(), method), UnifeatError, [*patterns, backend.named])


# -- inputs that work --------------------------------------------------------------------


@pytest.mark.parametrize("size", [(1, 1), (7, 7), (33, 47)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("backend", CNNS, ids=lambda b: b.id)
def test_cnn_sizes_give_ceil_size_over_reduction(backend: Backend, size: tuple[int, int]) -> None:
    model = eval_model(backend)
    maps = _run(backend, torch.randn(2, 3, *size))
    for feature_map, reduction in zip(maps, model.feature_info.reduction(), strict=True):
        expected = tuple(math.ceil(s / reduction) for s in size)
        assert feature_map.shape[0] == 2 and tuple(feature_map.shape[-2:]) == expected


@pytest.mark.parametrize(
    "backend",
    [param(b, id=b.id) for b in [*CNNS, *TOKENS]],
)
def test_empty_batch(backend: Backend) -> None:
    one = _run(backend, torch.randn(1, 3, 32, 32))
    empty, error = _attempt(lambda: _run(backend, torch.randn(0, 3, 32, 32)))
    if error is not None:
        assert backend.tokens, f"a CNN must take an empty batch: {error!r}"
        assert isinstance(error, UnifeatError), repr(error)
        assert "empty" in str(error) or "batch" in str(error), str(error)
        return
    assert [tuple(m.shape) for m in empty] == [(0, *m.shape[1:]) for m in one]


@pytest.mark.parametrize(
    "backend",
    [param(b, id=b.id) for b in ALL],
)
def test_float64_input(backend: Backend) -> None:
    x = torch.randn(2, 3, 32, 32)
    expected = _run(backend, x)
    found, error = _attempt(lambda: _run(backend, x.double()))
    if error is not None:
        assert isinstance(error, UnifeatError), repr(error)
        assert "float64" in str(error) and "float32" in str(error), str(error)
        return
    for a, b in zip(found, expected, strict=True):
        torch.testing.assert_close(a.float(), b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "backend",
    [
        param(HF_TOKENS, id=HF_TOKENS.id),
        param(TIMM_TOKENS, id=TIMM_TOKENS.id),
    ],
)
def test_token_model_at_another_multiple_of_the_patch(backend: Backend) -> None:
    """40x48 with 8x8 patches: 5x6 maps (position embeddings resampled; a timm ViT
    by name is built with dynamic_img_size=True: docs/levels.md)."""
    maps = _run(backend, torch.randn(2, 3, 40, 48))
    assert all(tuple(m.shape[-2:]) == (5, 6) for m in maps)


@pytest.mark.parametrize("backend", ALL, ids=lambda b: b.id)
def test_nan_and_inf_propagate(backend: Backend) -> None:
    shapes = [m.shape for m in _run(backend, torch.randn(1, 3, 32, 32))]
    for value in (float("nan"), float("inf")):
        maps = _run(backend, torch.full((1, 3, 32, 32), value))
        assert [m.shape for m in maps] == shapes
        if math.isnan(value):
            assert all(m.isnan().any() for m in maps)


@pytest.mark.parametrize("backend", ALL, ids=lambda b: b.id)
def test_memory_formats_give_the_same_numbers(backend: Backend) -> None:
    x = torch.randn(2, 3, 32, 32)
    expected = _run(backend, x)
    views = {
        "channels_last": x.contiguous(memory_format=torch.channels_last),
        "permuted view": x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2),
        "strided slice": torch.randn(2, 3, 64, 64)[..., ::2, ::2].copy_(x),
    }
    for name, view in views.items():
        for a, b in zip(_run(backend, view), expected, strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("backend", ALL, ids=lambda b: b.id)
def test_gradients_reach_the_input(backend: Backend) -> None:
    model = eval_model(backend)
    x = torch.randn(1, 3, 32, 32, requires_grad=True)
    sum(m.sum() for m in maps_of(model(x))).backward()
    model.zero_grad(set_to_none=True)
    assert x.grad is not None and x.grad.abs().sum() > 0
