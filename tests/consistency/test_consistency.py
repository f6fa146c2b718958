"""Cross-backend consistency (``nox -s consistency``; also part of the default run).

Each case builds one architecture in every backend that has it, with timm's
weights mapped to the others' names, and checks every pair of backends against
the recorded table ``docs/consistency.json``: a pair recorded equal must stay
equal (same level list, maps within the case's tolerance).
"""

from __future__ import annotations

import json

import pytest
import torch

import unifeat
from tests.consistency import cases
from tests.consistency import weights as w

pytestmark = pytest.mark.consistency

RECORDED = {row["arch"]: row for row in json.loads(cases.TABLE_JSON.read_text())}


def test_every_case_is_recorded() -> None:
    assert {case.arch for case in cases.CASES} == set(RECORDED)


@pytest.mark.parametrize("case", cases.CASES, ids=lambda case: case.arch)
def test_no_cell_regresses(case: cases.Case) -> None:
    result = cases.run(case)
    recorded = RECORDED[case.arch]
    assert result["levels"] == recorded["levels"], "a backend's level list changed"
    for pair, cell in recorded["pairs"].items():
        now = result["pairs"][pair]
        if cell["levels_equal"]:
            assert now["levels_equal"], f"{pair}: level lists no longer agree"
        if cell["equal"]:
            assert now["equal"], f"{pair}: maps differ by {now['max_rel_diff']}"


def test_the_comparison_sees_a_wrong_weight() -> None:
    """The same run with one torchvision weight changed is caught."""
    case = next(c for c in cases.CASES if c.arch == "resnet18")
    models = cases.build(case)
    with torch.no_grad():
        models["torchvision"].layer3[0].conv2.weight[0] += 0.5
    x = torch.randn(1, 3, 64, 64)
    import unifeat

    first, second = (
        unifeat.create_model(models[b], features_only=True).eval() for b in ("timm", "torchvision")
    )
    with torch.no_grad():
        diff = cases._relative_diff(list(first(x)), list(second(x)))
    assert diff is not None and diff > case.tolerance
    with torch.no_grad():
        unchanged = cases._relative_diff(list(first(x))[:3], list(second(x))[:3])
    assert unchanged == 0.0  # levels before layer3 still agree


def test_a_mapping_that_misses_a_key_fails_loudly() -> None:
    import timm
    import torchvision

    source = timm.create_model("resnet18").state_dict()
    partial = w.Mapping_(rules=((r"layer\d\..*", r"\g<0>"),))  # drops the stem
    with pytest.raises(KeyError, match="not mapped"):
        w.load_mapped(torchvision.models.resnet18(), source, partial)


@pytest.mark.parametrize("arch", ["resnet50", "convnext_tiny", "vit_b_16", "swin_t"])
def test_the_final_output_means_the_same_in_every_backend(arch: str) -> None:
    """forward_intermediates(intermediates_only=False)'s final output of a feature model
    that keeps the final norm (norm=True, where there is one), with the same
    weights: what timm's forward_features gives (the unpooled output of the last
    block after the final norm), in every backend, each in its library's layout
    (transformers' Swin keeps tokens where timm and torchvision keep NHWC)."""
    case = next(c for c in cases.CASES if c.arch == arch)
    models = cases.build(case)
    size = case.input_size
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = models["timm"].forward_features(x)
    for backend, model in models.items():
        try:
            features = unifeat.create_model(model, features_only=True, norm=True).eval()
        except unifeat.UnsupportedOptionError as refused:
            assert "no final norm" in str(refused), (backend, refused)
            features = unifeat.create_model(model, features_only=True).eval()
        with torch.no_grad():
            final, _ = features.forward_intermediates(x)
        if backend == "timm":
            torch.testing.assert_close(final, expected, rtol=0, atol=0)
        laid_out = final.reshape(expected.shape) if final.dim() != expected.dim() else final
        assert laid_out.shape == expected.shape, backend
        worst = float((laid_out - expected).abs().max()) / float(expected.abs().max())
        assert worst <= case.tolerance, f"{backend}: {worst}"
