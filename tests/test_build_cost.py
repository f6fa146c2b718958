"""What a build from a traced model costs, and that the shortcuts change no result.

The meta shape pass runs each distinct node of repeated blocks once
(``unifeat._engine.shapes``): its shapes are checked here against torch's own
``ShapeProp`` running the same graph on real tensors, including graphs built to
trip a wrong shortcut (in-place ops that change shapes, hooks, a ``torch.nn``
subclass with its own forward, settings that differ between alike modules).
"""

from __future__ import annotations

import random
from typing import Any

import pytest
import torch
import torchvision
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp
from torchvision.models.convnext import CNBlockConfig, ConvNeXt
from torchvision.models.swin_transformer import SwinTransformer
from torchvision.models.vision_transformer import VisionTransformer

from unifeat._engine.graph import shapes_of, trace, with_constants


def _tiny_vit() -> nn.Module:
    return VisionTransformer(
        image_size=32, patch_size=8, num_layers=3, num_heads=2, hidden_dim=16, mlp_dim=32
    )


def _tiny_convnext() -> nn.Module:
    return ConvNeXt([CNBlockConfig(8, 16, 2), CNBlockConfig(16, None, 3)])


def _tiny_swin() -> nn.Module:
    return SwinTransformer(
        patch_size=[4, 4], embed_dim=8, depths=[2, 2], num_heads=[1, 2], window_size=[2, 2]
    )


class Widening(nn.Linear):
    """A ``torch.nn`` subclass with its own forward: not torch's code."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([super().forward(x), x], dim=-1)


class RandomCrop(nn.Module):
    """A module whose output shape is decided by something outside itself (Python's
    random numbers): alike instances, alike inputs, other shapes. Traced as a leaf."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[..., : random.randint(1, x.shape[-1])]


LEAVES = {"leaf_modules": [RandomCrop]}


class Tricky(nn.Module):
    """Alike modules and ops whose results differ in ways a shortcut could miss."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.plain = nn.Linear(8, 8)
        self.widening = Widening(8, 8)
        self.hooked = nn.Linear(16, 16)
        self.again = nn.Linear(16, 16)
        self.hooked.register_forward_hook(lambda module, args, out: out.repeat(1, 1, 1, 2))
        self.flat_one = nn.Flatten(1)
        self.flat_two = nn.Flatten(2)
        self.crops = nn.Sequential(*(RandomCrop() for _ in range(4)))

    def forward(self, x: torch.Tensor) -> Any:
        x = self.stem(x).permute(0, 2, 3, 1)  # [N, H, W, 8]
        a = self.plain(x)
        b = self.widening(x)  # [N, H, W, 16] where a plain Linear gives 8
        c = self.hooked(b)  # [N, H, W, 32] by its hook
        d = self.again(b)  # [N, H, W, 16]: the same module class and shapes, no hook
        e = a.clone()
        e.unsqueeze_(0)  # in place, changes e's shape
        f = a.clone()
        f.unsqueeze_(0)
        g, h = torch.empty(0), torch.empty(0)  # constants of the graph
        torch.add(a, a, out=g)  # resized to a's shape
        torch.add(a, a, out=h)
        one = a.new_ones(())
        flat = [e.flatten(1), f.flatten(1), g * one, h * one]
        crops = [crop(d) for crop in self.crops]
        return c, self.flat_one(d), self.flat_two(d), flat, crops


MODELS = {
    "resnet18": lambda: torchvision.models.resnet18(),
    "vit": _tiny_vit,
    "convnext": _tiny_convnext,
    "swin": _tiny_swin,
    "tricky": Tricky,
}


def _reference_shapes(model: nn.Module, traced: Any, size: int) -> dict[str, tuple[int, ...]]:
    graph_module = torch.fx.GraphModule(with_constants(model, traced), traced.graph)
    random.seed(0)
    with torch.no_grad():
        ShapeProp(graph_module.eval()).propagate(torch.randn(2, 3, size, size))
    found = {}
    for node in graph_module.graph.nodes:
        meta = node.meta.pop("tensor_meta", None)
        if meta is not None and hasattr(meta, "shape"):
            found[traced.names.get(node, node.name)] = tuple(meta.shape)
    return found


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("on_meta", [False, True], ids=["real", "meta"])
def test_meta_shapes_equal_a_real_run(name: str, on_meta: bool) -> None:
    torch.manual_seed(0)
    if on_meta:
        with torch.device("meta"):
            model = MODELS[name]().eval()
        real = MODELS[name]().eval()
    else:
        model = real = MODELS[name]().eval()
    size = 32
    traced = trace(model, train=False, context=name, extra_tracer_kwargs=LEAVES)
    random.seed(0)
    ours = shapes_of(model, traced, (3, size, size), context=name)
    found = {traced.names.get(node, node.name): shape for node, shape in ours.items()}
    reference = trace(real, train=False, context=name, extra_tracer_kwargs=LEAVES)
    expected = _reference_shapes(real, reference, size)
    assert found == expected
