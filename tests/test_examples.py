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
        ("timm:vit_tiny_patch16_224", {"img_size": 64, "pyramid": "simple"}, 64),
        ("hf:convnext", {"hidden_sizes": [8, 16, 24, 32], "depths": [1, 1, 1, 1]}, 64),
    ],
)
def test_fpn_head_wires_any_backbone(model, kwargs, size):
    fpn_module = runpy.run_path(str(EXAMPLES / "fpn_head.py"))
    net = fpn_module["backbone_with_fpn"](model, **kwargs).eval()
    with torch.no_grad():
        pyramid = net(torch.randn(1, 3, size, size))
    shapes = [tuple(level.shape) for level in pyramid.values()]
    assert list(pyramid) == ["0", "1", "2", "3", "pool"]
    assert all(s[1] == 256 for s in shapes)
    assert net.strides == [4, 8, 16, 32]
    assert [s[-1] for s in shapes] == [size // r for r in net.strides] + [1]


@pytest.mark.parametrize(
    ("argv", "first"),
    [
        (["resnet18", "--size", "64"], "(1, 256, 16, 16)"),
        (["timm:vit_tiny_patch16_224", "--pyramid", "--size", "64"], "(1, 256, 16, 16)"),
    ],
)
def test_fpn_head_script_runs(capsys, monkeypatch, argv, first):
    monkeypatch.setattr(sys, "argv", ["fpn_head.py", *argv])
    runpy.run_path(str(EXAMPLES / "fpn_head.py"), run_name="__main__")
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == ["0", "1", "2", "3", "pool"]
    assert [int(line.split()[2]) for line in lines] == [4, 8, 16, 32, 64]
    assert lines[0].endswith(first) and lines[-1].endswith("(1, 256, 1, 1)")


_HF_CONVNEXT = {"hidden_sizes": [8, 16, 24, 32], "depths": [1, 1, 1, 1]}


_TINY_VIT = {"pyramid": "simple", "img_size": 96, "depth": 4, "dynamic_img_size": True}


@pytest.mark.parametrize(
    ("model", "kwargs"),
    [
        ("timm:resnet18", {}),
        ("tv:resnet18", {}),
        ("hf:convnext", _HF_CONVNEXT),
        ("timm:vit_tiny_patch16_224", _TINY_VIT),
    ],
)
def test_mask_rcnn_head_runs_on_every_backend(model, kwargs):
    module = runpy.run_path(str(EXAMPLES / "mask_rcnn.py"))
    net = module["mask_rcnn"](model, **kwargs)
    images = [torch.rand(3, 96, 96)]
    targets = [
        {
            "boxes": torch.tensor([[10.0, 10.0, 60.0, 70.0]]),
            "labels": torch.tensor([1]),
            "masks": torch.zeros(1, 96, 96, dtype=torch.uint8),
        }
    ]
    losses = net.train()(images, targets)
    assert {"loss_classifier", "loss_box_reg", "loss_mask"} <= set(losses)
    sum(losses.values()).backward()
    assert next(net.backbone.body.parameters()).grad is not None
    with torch.no_grad():
        (detections,) = net.eval()(images)
    assert detections["masks"].shape[1:] == (1, 96, 96)


def test_retrieval_finds_the_near_duplicate(tmp_path):
    from PIL import Image

    retrieval = runpy.run_path(str(EXAMPLES / "retrieval.py"))
    generator = torch.Generator().manual_seed(0)
    base = (torch.rand(64, 64, 3, generator=generator) * 255).to(torch.uint8)
    Image.fromarray(base.numpy()).save(tmp_path / "a.png")
    Image.fromarray((base.int() + 3).clamp(0, 255).to(torch.uint8).numpy()).save(
        tmp_path / "a2.png"
    )
    for i in range(3):
        other = (torch.rand(64, 64, 3, generator=generator) * 255).to(torch.uint8)
        Image.fromarray(other.numpy()).save(tmp_path / f"other{i}.png")
    hits = retrieval["nearest"](
        tmp_path,
        tmp_path / "d.safetensors",
        "tv:resnet18",
        k=1,
        input_size=(64, 64),
        random_init=True,
    )
    assert hits[str(tmp_path / "a.png")][0][0] == str(tmp_path / "a2.png")


def test_show_feature_maps_script(tmp_path, monkeypatch, capsys):
    from PIL import Image

    Image.new("RGB", (48, 48), "navy").save(tmp_path / "in.png")
    argv = [
        "show_feature_maps.py",
        str(tmp_path / "in.png"),
        "--model",
        "tv:resnet18",
        "--output",
        str(tmp_path / "out.png"),
        "--channels",
        "3",
    ]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(EXAMPLES / "show_feature_maps.py"), run_name="__main__")
    assert (tmp_path / "out.png").exists()
    assert "384x" in capsys.readouterr().out


def test_the_docs_build_strictly(tmp_path):
    """Every page, and the API reference from docstrings, without a warning."""
    import os
    import subprocess

    pytest.importorskip("mkdocs", reason="the docs extra is part of the dev install CI uses")
    root = EXAMPLES.parent
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
        cwd=root,
        capture_output=True,
        text=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "extraction" / "index.html").exists()


def test_no_page_holds_a_placeholder_for_figures():
    """A page whose figures were never filled in (a bare ``THROUGHPUT_TABLE``
    line) builds without a warning, so it is looked for here."""
    import re

    placeholder = re.compile(r"^[A-Z][A-Z0-9]*(_[A-Z0-9]+)+$")
    found = [
        f"{page.name}:{number}"
        for page in sorted((EXAMPLES.parent / "docs").rglob("*.md"))
        for number, line in enumerate(page.read_text().splitlines(), 1)
        if placeholder.match(line.strip())
    ]
    assert not found, found


def test_train_frozen_backbone_learns_only_the_unfrozen_part(capsys, monkeypatch):
    monkeypatch.setattr(
        sys, "argv", ["train_frozen_backbone.py", "tv:resnet18", "--steps", "2", "--size", "64"]
    )
    runpy.run_path(str(EXAMPLES / "train_frozen_backbone.py"), run_name="__main__")
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines[:2]] == ["step 0", "step 1"]
    frozen, total = (int(word) for word in lines[-1].split() if word.isdigit())
    assert 0 < frozen < total


def test_upernet_on_a_vit_pyramid_trains(capsys, monkeypatch):
    """examples/segmentation_upernet.py: transformers' UperNet on a DINOv2-style ViT
    through the simple pyramid, a training step with layer-wise decay, on defaults."""
    monkeypatch.setattr(sys, "argv", ["segmentation_upernet.py", "--size", "56", "--steps", "2"])
    runpy.run_path(str(EXAMPLES / "segmentation_upernet.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "reductions [3.5, 7, 14, 28]" in out and "logits (1, 21, 56, 56)" in out
