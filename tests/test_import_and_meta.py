"""import unifeat stays light, and feature_info never allocates weights."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def _run(code: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True
    )
    return done.stdout.strip().splitlines()[-1]


def test_import_does_not_import_any_backend_library():
    loaded = json.loads(
        _run(
            "import sys, json, unifeat; "
            "names = ('timm', 'torchvision', 'transformers'); "
            "print(json.dumps([m for m in names if m in sys.modules]))"
        )
    )
    assert loaded == []


def test_feature_info_of_a_giant_model_allocates_no_weights():
    """vit_giant_patch14_dinov2 has 1.1 B parameters (4.5 GB in fp32); none may be allocated."""
    report = json.loads(
        _run(
            "import json, resource, time, torch, unifeat, timm\n"
            "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            "start = time.perf_counter()\n"
            "info = unifeat.feature_info('timm:vit_giant_patch14_dinov2')\n"
            "seconds = time.perf_counter() - start\n"
            "grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base\n"
            "print(json.dumps(dict(grown_kib=grown, seconds=seconds, levels=len(info),"
            " channels=info.channels(), out=info.out_indices)))"
        )
    )
    assert report["levels"] == 40
    assert report["channels"] == [1536, 1536, 1536]
    assert report["out"] == [37, 38, 39]
    assert report["grown_kib"] < 300 * 1024, report  # far below the 4.5 GB of weights


@pytest.mark.parametrize(
    "name", ["timm:vit_giant_patch14_dinov2", "tv:vit_h_14", "hf:dinov2"], ids=str
)
def test_random_weights_are_made_on_the_device_asked_for(name):
    """create_model(device=...) makes random weights there directly: built on the
    meta device, a 1.1 B (timm), 632 M (torchvision) or 1.1 B (transformers, the
    giant config) parameter model allocates none on the CPU, which a CPU build
    moved afterwards would (2.5 to 4.5 GB)."""
    kwargs = (
        "hidden_size=1536, num_hidden_layers=40, num_attention_heads=24, mlp_ratio=4"
        if name.startswith("hf:")
        else ""
    )
    report = json.loads(
        _run(
            "import json, resource, torch, unifeat\n"
            "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            f"model = unifeat.create_model({name!r}, features_only=True, device='meta', {kwargs})\n"
            "grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base\n"
            "count = sum(p.numel() for p in model.parameters())\n"
            "devices = sorted({str(t.device) for t in [*model.parameters(), *model.buffers()]})\n"
            "print(json.dumps(dict(grown_kib=grown, count=count, devices=devices)))"
        )
    )
    assert report["devices"] == ["meta"]
    assert report["count"] > 600e6
    assert report["grown_kib"] < 400 * 1024, report  # far below the weights' size


@pytest.mark.parametrize("name", ["timm:convnext_xxlarge", "timm:eva02_enormous_patch14_clip_224"])
def test_feature_info_of_large_models_matches_their_blocks(name):
    import unifeat

    info = unifeat.feature_info(name)
    assert len(info) >= 4 and all(c > 0 for c in info.channels())
