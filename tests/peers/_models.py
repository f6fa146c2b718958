"""Small, randomly initialised models shared by the ported peer suites.

Each :class:`Case` is one architecture in one backend, small enough that a
forward at its input size costs milliseconds. Cases name a model (``"timm:..."``,
``"tv:..."``, ``"hf:..."``) or build a module instance (torchvision classes, or a
plain ``nn.Module`` for the generic FX backend). The peers' references are
taken from the *source* model: the backend's own model, built with the same
weights as the feature model, read through forward hooks on its modules.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
import torchvision
from torch import Tensor, nn

import unifeat


class StageNet(nn.Module):
    """A plain module (generic FX backend): a BatchNorm stem, two stages, a head."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU())
        self.stage1 = nn.Sequential(nn.Conv2d(8, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.ReLU())
        self.stage2 = nn.Sequential(nn.Conv2d(16, 32, 3, 2, 1), nn.ReLU())
        self.head = nn.Linear(32, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stage2(self.stage1(self.stem(x)))
        return self.head(x.mean((2, 3)))


def tv_small_vit() -> nn.Module:
    """A torchvision ViT class instance at its standard 224 input, four narrow blocks."""
    return torchvision.models.VisionTransformer(
        image_size=224, patch_size=16, num_layers=4, num_heads=2, hidden_dim=32, mlp_dim=64
    )


HF_TOKENS = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=4,
    num_attention_heads=2,
    image_size=64,
    patch_size=16,
)
HF_RESNET = dict(embedding_size=8, hidden_sizes=[16, 32, 48, 64], depths=[1, 1, 1, 1])
HF_CONVNEXT = dict(hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1])
HF_SWIN = dict(
    embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], window_size=2, image_size=64
)


_INFO: dict[tuple[str, str], unifeat.FeatureInfo] = {}


@dataclass(frozen=True)
class Case:
    """One architecture in one backend.

    ``final_module``: the module whose output is the source's unpooled final
    features (timm's ``forward_features``); ``None`` for timm, which has the
    method itself.
    """

    id: str
    model: str | Callable[[], nn.Module]
    backend: str
    size: int = 64
    kwargs: dict[str, Any] = field(default_factory=dict)
    tokens: bool = False
    final_module: str | None = None
    traceable: bool = True

    def arg(self) -> Any:
        return self.model() if callable(self.model) else self.model

    def source(self, **kwargs: Any) -> nn.Module:
        """The backend's own model (a fresh random init)."""
        if callable(self.model):
            return self.model(**kwargs)
        return unifeat.create_model(self.model, **self.kwargs, **kwargs)

    def build(self, source: nn.Module | None = None, **options: Any) -> Any:
        """A feature model; with ``source``, built by the same route and given its weights."""
        options.setdefault("features_only", True)
        if callable(self.model):
            return unifeat.create_model(source or self.model(), **options)
        model = unifeat.create_model(self.model, **self.kwargs, **options)
        if source is not None:
            model.load_state_dict(source.state_dict())
        return model

    def info(self, **options: Any) -> unifeat.FeatureInfo:
        """``unifeat.feature_info`` for this case (memoised: it is asked often)."""
        key = (self.id, repr(sorted(options.items())))
        if key not in _INFO:
            _INFO[key] = unifeat.feature_info(self.arg(), **self.kwargs, **options)
        return _INFO[key]

    def input(self, batch: int = 2) -> Tensor:
        return torch.randn(batch, 3, self.size, self.size)

    def forward_features(self, source: nn.Module, x: Tensor) -> Tensor:
        """The source's unpooled final features (timm's ``forward_features``)."""
        if self.final_module is None:
            return source.forward_features(x)
        (out,) = module_outputs(source, [self.final_module], x)
        return out


CASES = [
    Case("timm-resnet", "timm:test_resnet", "timm"),
    Case("timm-vit", "timm:test_vit", "timm", kwargs=dict(img_size=64), tokens=True),
    Case("timm-efficientnet", "timm:test_efficientnet", "timm"),
    Case("tv-squeezenet", "tv:squeezenet1_1", "torchvision", final_module="features"),
    Case("tv-vit", tv_small_vit, "torchvision", size=224, tokens=True, final_module="encoder.ln"),
    Case(
        "hf-resnet",
        "hf:resnet",
        "hf",
        kwargs=HF_RESNET,
        final_module="encoder.stages.3",
        traceable=False,
    ),
    Case(
        "hf-vit",
        "hf:vit",
        "hf",
        kwargs=HF_TOKENS,
        tokens=True,
        final_module="layernorm",
        traceable=False,
    ),
    Case(
        "hf-convnext",
        "hf:convnext",
        "hf",
        kwargs=HF_CONVNEXT,
        final_module="encoder.stages.3",
        traceable=False,
    ),
    Case("fx-stagenet", StageNet, "fx", final_module="stage2"),
]
"""The default suite: a CNN and a token model (where the backend has both) per backend,
small and randomly initialised."""

SLOW_CASES = [
    Case("timm-resnet18", "timm:resnet18", "timm"),
    Case(
        "timm-vit_tiny",
        "timm:vit_tiny_patch16_224",
        "timm",
        kwargs=dict(img_size=64, depth=4),
        tokens=True,
    ),
    Case("timm-efficientnet_b0", "timm:efficientnet_b0", "timm"),
    Case(
        "timm-swin",
        "timm:swin_tiny_patch4_window7_224",
        "timm",
        size=224,
        kwargs=dict(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1)),
    ),
    Case("timm-convnext", "timm:test_convnext", "timm"),
    Case("timm-mobilenetv3", "timm:mobilenetv3_small_100", "timm"),
    Case("timm-mixnet", "timm:mixnet_s", "timm"),
    Case("timm-ghostnet", "timm:ghostnet_100", "timm"),
    Case("timm-rexnet", "timm:rexnet_100", "timm"),
    Case("timm-regnet", "timm:regnetx_002", "timm"),
    Case(
        "timm-deit-distilled",
        "timm:deit_tiny_distilled_patch16_224",
        "timm",
        kwargs=dict(img_size=64, depth=4),
        tokens=True,
    ),
    Case("timm-instance-resnet", lambda: _timm("test_resnet"), "timm"),
    Case("tv-mobilenet", "tv:mobilenet_v3_small", "torchvision", final_module="features"),
    Case("tv-resnet18", "tv:resnet18", "torchvision", final_module="layer4"),
    Case("tv-convnext_tiny", "tv:convnext_tiny", "torchvision", final_module="features"),
    Case("tv-swin_t", "tv:swin_t", "torchvision", size=224, final_module="norm"),
    Case("tv-instance-resnet18", torchvision.models.resnet18, "torchvision", final_module="layer4"),
    Case(
        "hf-dinov2",
        "hf:dinov2",
        "hf",
        # Dinov2Config sizes its MLP by mlp_ratio; it has no intermediate_size field.
        kwargs={**{k: v for k, v in HF_TOKENS.items() if k != "intermediate_size"}, "mlp_ratio": 2},
        tokens=True,
        final_module="layernorm",
        traceable=False,
    ),
    Case("hf-swin", "hf:swin", "hf", kwargs=HF_SWIN, traceable=False),
]
"""More architectures per backend (each case runs in seconds, in the default suite)."""

BY_ID = {case.id: case for case in [*CASES, *SLOW_CASES]}


def _timm(name: str) -> nn.Module:
    import timm

    return timm.create_model(name)


def params(
    where: Callable[[Case], bool] = lambda case: True,
    marks: dict[str, Any] | None = None,
) -> list[Any]:
    """``pytest.param``s for the cases ``where`` accepts, of ``CASES`` and
    ``SLOW_CASES`` alike (each runs in seconds: the default suite runs them all).
    ``marks`` maps a case id to a mark (an expected failure) or a list of them.
    """
    result = []
    for case in [*CASES, *SLOW_CASES]:
        if not where(case):
            continue
        extra = (marks or {}).get(case.id, [])
        extra = list(extra) if isinstance(extra, (list, tuple)) else [extra]
        result.append(pytest.param(case, id=case.id, marks=extra))
    return result


@contextmanager
def capture(source: nn.Module, names: Sequence[str]) -> Iterator[dict[str, Any]]:
    """Record what the modules ``names`` of ``source`` return, as they return it."""
    seen: dict[str, Any] = {}
    handles = []
    for name in names:

        def hook(_module: nn.Module, _args: Any, output: Any, name: str = name) -> None:
            seen[name] = output

        handles.append(source.get_submodule(name).register_forward_hook(hook))
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def first_tensor(value: Any) -> Tensor:
    """A block's output: the tensor itself, or the first element of a tuple."""
    return value[0] if isinstance(value, (tuple, list)) else value


def module_outputs(source: nn.Module, names: Sequence[str], x: Tensor) -> list[Tensor]:
    """The outputs of the modules ``names`` in one forward of ``source``."""
    with capture(source, names) as seen:
        run_source(source, x)
    return [first_tensor(seen[name]) for name in names]


def run_source(source: nn.Module, x: Tensor) -> Any:
    """The source model's own forward (transformers models take ``pixel_values``)."""
    if type(source).__module__.startswith("transformers."):
        return source(pixel_values=x)
    return source(x)


def grad_numel(parameters: Any) -> int:
    """How many parameter elements received a gradient."""
    return sum(p.numel() for p in parameters if p.grad is not None)
