"""The examples run, on tiny inputs, and do what they say."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.parametrize(
    ("model", "kwargs", "size"),
    [
        ("resnet18", {}, 64),
        ("timm:convnext_atto", {}, 64),
        ("timm:vit_tiny_patch16_224", {"img_size": 64}, 64),
        ("hf:convnext", {"hidden_sizes": [8, 16, 24, 32], "depths": [1, 1, 1, 1]}, 64),
    ],
)
def test_fpn_head_wires_any_backbone(model, kwargs, size):
    fpn_module = runpy.run_path(str(EXAMPLES / "fpn_head.py"))
    net = fpn_module["BackboneWithFPN"](model, **kwargs).eval()
    with torch.no_grad():
        pyramid = net(torch.randn(1, 3, size, size))
    shapes = [tuple(level.shape) for level in pyramid.values()]
    assert all(s[1] == 256 for s in shapes)
    assert [s[-1] for s in shapes] == [size // r for r in net.strides]


def test_fpn_head_script_runs(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["fpn_head.py", "resnet18", "--size", "64"])
    runpy.run_path(str(EXAMPLES / "fpn_head.py"), run_name="__main__")
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == ["layer2", "layer3", "layer4"]
    assert lines[-1].endswith("(1, 256, 2, 2)")
