"""What the adversarial modules share: the backend cases, the tiny models, the
refusal check, and the ``bug`` mark.

Every backend case is small enough to build in well under a second on the CPU
(random init, no hub): timm's and torchvision's resnet18, transformers' ResNet
and ViT from tiny configs, timm's ViT at 32x32 with 8x8 patches (a fixed-size
token model), and a small module of our own traced with FX.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from torch import nn

import unifeat
from unifeat import UnifeatError

HF_RESNET: dict[str, Any] = dict(
    embedding_size=8, hidden_sizes=[16, 32, 48, 64], depths=[1, 1, 1, 1]
)
HF_VIT: dict[str, Any] = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=4,
    num_attention_heads=2,
    image_size=32,
    patch_size=8,
)
TIMM_VIT: dict[str, Any] = dict(img_size=32, patch_size=8, depth=4)


class TinyNet(nn.Module):
    """Three stride-2 stages with BatchNorm and Dropout, and a classifier head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU())
        self.stage1 = nn.Sequential(nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU(), nn.Dropout(0.5))
        self.stage2 = nn.Sequential(nn.Conv2d(16, 32, 3, 2, 1), nn.BatchNorm2d(32), nn.ReLU())
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage2(self.stage1(self.stem(x)))
        return self.head(x.mean((2, 3)))


@dataclass(frozen=True, eq=False)
class Backend:
    """One way into unifeat: a model name with its kwargs, or a module factory."""

    id: str
    model: str | Callable[[], nn.Module]
    kwargs: dict[str, Any] = field(default_factory=dict)
    backend: str = ""
    """The backend name unifeat reports (and names in messages)."""
    tokens: bool = False
    patch: int | None = None
    fixed_size: int | None = None
    """Input size a fixed-size token model accepts only (timm's default ViT)."""

    def arg(self) -> Any:
        """The first argument of the public functions: the name, or a fresh module."""
        return self.model if isinstance(self.model, str) else self.model()

    def source(self) -> nn.Module:
        """A module instance of this backend's model (random init)."""
        if not isinstance(self.model, str):
            return self.model()
        return unifeat.create_model(self.model, **self.kwargs)

    def create(self, source: Any = None, **options: Any) -> Any:
        options.setdefault("features_only", True)
        model = self.arg() if source is None else source
        kwargs = self.kwargs if isinstance(model, str) else {}
        return unifeat.create_model(model, **kwargs, **options)

    def info(self, **options: Any) -> unifeat.FeatureInfo:
        model = self.arg()
        kwargs = self.kwargs if isinstance(model, str) else {}
        return unifeat.feature_info(model, **kwargs, **options)

    @property
    def named(self) -> str:
        """``backend 'timm'``, as messages name it, as a regex."""
        return rf"backend '{self.backend}'"


TIMM = Backend("timm", "timm:resnet18", backend="timm")
TV = Backend("tv", "tv:resnet18", backend="torchvision")
HF_CNN = Backend("hf-resnet", "hf:resnet", HF_RESNET, backend="hf")
HF_TOKENS = Backend("hf-vit", "hf:vit", HF_VIT, backend="hf", tokens=True, patch=8)
MODULE = Backend("module", TinyNet, backend="fx")
TIMM_TOKENS = Backend(
    "timm-vit",
    "timm:vit_tiny_patch16_224",
    TIMM_VIT,
    backend="timm",
    tokens=True,
    patch=8,
    fixed_size=32,
)

BACKENDS = (TIMM, TV, HF_CNN, HF_TOKENS, MODULE)
"""The five the brief names: one per backend, transformers with a CNN and a ViT."""


def bug(reason: str) -> pytest.MarkDecorator:
    """Today's code fails this case; strict, so the mark must go once it is fixed."""
    return pytest.mark.xfail(strict=True, reason=f"BUG: {reason}")


def param(*values: Any, id: str, bug_reason: str | None = None) -> Any:
    """A ``pytest.param`` carrying the bug mark where there is one."""
    return pytest.param(*values, id=id, marks=[bug(bug_reason)] if bug_reason else [])


def per_backend(
    backends: Iterable[Backend],
    rows: Iterable[tuple[str, Any]],
    bugs: dict[tuple[str, str], str] | None = None,
) -> list[Any]:
    """The cross product ``backend x row`` as params, with per-pair bug marks.

    ``bugs`` maps ``(backend id, row id)`` (``"*"`` for every backend) to a reason.
    """
    bugs = bugs or {}
    params = []
    for backend in backends:
        for row_id, row in rows:
            reason = bugs.get((backend.id, row_id)) or bugs.get(("*", row_id))
            params.append(param(backend, row, id=f"{backend.id}-{row_id}", bug_reason=reason))
    return params


def refused(
    call: Callable[[], Any],
    expected: type[BaseException] | tuple[type[BaseException], ...],
    message: str | Sequence[str],
) -> BaseException:
    """``call`` raises a unifeat error that is an instance of every class in
    ``expected`` and whose message matches every pattern in ``message``."""
    classes = expected if isinstance(expected, tuple) else (expected,)
    patterns = [message] if isinstance(message, str) else list(message)
    caught: BaseException | None = None
    try:
        result = call()
    except Exception as error:
        caught = error
    # Checked outside the handler: an assertion raised inside it would drag the
    # whole library traceback along (slow to render for hundreds of xfails).
    if caught is None:
        pytest.fail(f"accepted; returned {type(result).__name__}: {str(result)[:200]}")
    kind = type(caught).__name__
    text = str(caught)
    caught.__traceback__ = None
    assert isinstance(caught, UnifeatError), f"raised {kind}, not a UnifeatError: {text}"
    for cls in classes:
        assert isinstance(caught, cls), f"raised {kind}, not a {cls.__name__}: {text}"
    for pattern in patterns:
        assert re.search(pattern, text, re.S), f"{pattern!r} not in message: {text}"
    return caught


def maps_of(output: Any) -> list[torch.Tensor]:
    """The maps of a forward's output (list or dict; prefix tokens dropped)."""
    values = list(output.values()) if isinstance(output, dict) else list(output)
    return [v[0] if isinstance(v, tuple) else v for v in values]


@functools.cache
def eval_model(backend: Backend) -> Any:
    """One eval-mode feature model per backend for tests that only run forwards."""
    torch.manual_seed(0)
    return backend.create().eval()
