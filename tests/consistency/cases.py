"""The cross-backend cases: one architecture, built in each backend that has it,
with the same weights (timm's, mapped), compared level by level.

Run ``python -m tests.consistency.cases`` to regenerate ``docs/consistency.md``
and ``docs/consistency.json``; ``nox -s consistency`` fails when a cell is
worse than the recorded table.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import unifeat
from tests.consistency import weights as w

ROOT = Path(__file__).resolve().parents[2]
TABLE_JSON = ROOT / "docs" / "consistency.json"
TABLE_MD = ROOT / "docs" / "consistency.md"
BACKENDS = ("timm", "torchvision", "hf")

_RESNET_HF = {
    "resnet18": dict(layer_type="basic", depths=[2, 2, 2, 2], hidden_sizes=[64, 128, 256, 512]),
    "resnet34": dict(layer_type="basic", depths=[3, 4, 6, 3], hidden_sizes=[64, 128, 256, 512]),
    "resnet50": {},
    "resnet101": dict(depths=[3, 4, 23, 3]),
}


@dataclass(frozen=True)
class Case:
    arch: str
    timm: str
    torchvision: str | None = None
    tv_mapping: w.Mapping_ | None = None
    hf: tuple[str, dict[str, Any]] | None = None
    hf_mapping: w.Mapping_ | None = None
    tolerance: float = 1e-4
    """Largest allowed max-abs difference between two backends' maps, relative to
    the largest magnitude in the reference map."""
    notes: str = ""
    input_size: int = 224
    align_batchnorm_eps: bool = False
    """Give torchvision's BatchNorms timm's eps (same weights, other constant)."""


CASES = [
    *[
        Case(arch, arch, arch, w.SAME_NAMES, ("resnet", cfg), w.HF_RESNET)
        for arch, cfg in _RESNET_HF.items()
    ],
    Case("resnext50_32x4d", "resnext50_32x4d", "resnext50_32x4d", w.SAME_NAMES),
    Case("wide_resnet50_2", "wide_resnet50_2", "wide_resnet50_2", w.SAME_NAMES),
    Case("densenet121", "densenet121", "densenet121", w.SAME_NAMES),
    Case("efficientnet_b0", "efficientnet_b0", "efficientnet_b0", w.BY_ORDER),
    Case(
        "mobilenet_v2",
        "mobilenetv2_100",
        "mobilenet_v2",
        w.BY_ORDER,
    ),
    Case(
        "mobilenet_v3_large",
        "mobilenetv3_large_100",
        "mobilenet_v3_large",
        w.BY_ORDER,
        align_batchnorm_eps=True,
        notes="torchvision's BatchNorm eps (1e-3) set to timm's (1e-5); with its own "
        "eps the maps differ by up to 3e-2 relative",
    ),
    Case("regnet_y_400mf", "regnety_004", "regnet_y_400mf", w.TV_REGNET),
    Case(
        "convnext_tiny",
        "convnext_tiny",
        "convnext_tiny",
        w.TV_CONVNEXT,
        ("convnext", {}),
        w.HF_CONVNEXT,
    ),
    Case(
        "vit_b_16",
        "vit_base_patch16_224",
        "vit_b_16",
        w.TV_VIT,
        ("vit", dict(layer_norm_eps=1e-6)),
        w.HF_VIT,
        notes="transformers' ViT built with layer_norm_eps=1e-6, timm's and torchvision's value",
    ),
    Case(
        "swin_t",
        "swin_tiny_patch4_window7_224",
        "swin_t",
        w.TV_SWIN,
        ("swin", {}),
        w.HF_SWIN,
    ),
    Case(
        "dinov2_small",
        "vit_small_patch14_dinov2",
        hf=("dinov2", dict(hidden_size=384, num_attention_heads=6, image_size=518)),
        hf_mapping=w.HF_DINOV2,
        input_size=518,
    ),
]


def _randomize(model: nn.Module) -> None:
    """Give norms, biases and layer scales non-trivial values: default inits (unit
    BatchNorm statistics, zero-init last norms, 1e-6 layer scales) would let two
    backends agree while computing different things."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if not tensor.is_floating_point():
                continue
            noise = torch.randn(tensor.shape, generator=generator)
            if name.endswith("running_var"):
                tensor.copy_(0.5 + torch.rand(tensor.shape, generator=generator))
            elif name.endswith("running_mean") or name.endswith("bias"):
                tensor.copy_(0.1 * noise)
            elif tensor.dim() == 1 or "gamma" in name or "layer_scale" in name:
                tensor.copy_(1.0 + 0.1 * noise if name.endswith("weight") else 0.5 + 0.1 * noise)


def _align_batchnorm_eps(target: nn.Module, source: nn.Module) -> None:
    norms = [m for m in source.modules() if isinstance(m, nn.BatchNorm2d)]
    targets = [m for m in target.modules() if isinstance(m, nn.BatchNorm2d)]
    for mine, theirs in zip(targets, norms, strict=True):
        mine.eps = theirs.eps


def _source(case: Case) -> nn.Module:
    import timm

    torch.manual_seed(0)
    model = timm.create_model(case.timm).eval()
    _randomize(model)
    return model


def build(case: Case) -> dict[str, nn.Module]:
    """The case's model in each backend that has it, with timm's weights."""
    source = _source(case)
    state = source.state_dict()
    models: dict[str, nn.Module] = {"timm": source}
    if case.torchvision is not None and case.tv_mapping is not None:
        import torchvision

        tv_model = torchvision.models.get_model(case.torchvision).eval()
        w.load_mapped(tv_model, state, case.tv_mapping)
        if case.align_batchnorm_eps:
            _align_batchnorm_eps(tv_model, source)
        models["torchvision"] = tv_model
    if case.hf is not None and case.hf_mapping is not None:
        from transformers import AutoConfig, AutoModel

        model_type, config = case.hf
        hf_model = AutoModel.from_config(AutoConfig.for_model(model_type, **config)).eval()
        w.load_mapped(hf_model, state, case.hf_mapping)
        models["hf"] = hf_model
    return models


def run(case: Case) -> dict[str, Any]:
    """Levels and maps of every backend, and how each pair of backends compares."""
    models = build(case)
    x = torch.randn(
        1, 3, case.input_size, case.input_size, generator=torch.Generator().manual_seed(1)
    )
    levels: dict[str, list[list[int]]] = {}
    maps: dict[str, list[Tensor]] = {}
    for backend, model in models.items():
        info = unifeat.feature_info(model)
        every = list(range(len(info)))
        levels[backend] = [
            [c, r] for c, r in zip(info.channels(every), info.reduction(every), strict=True)
        ]
        features = unifeat.create_model(model, features_only=True, out_indices=every).eval()
        with torch.no_grad():
            maps[backend] = list(features(x))
    pairs = {}
    names = [b for b in BACKENDS if b in models]
    for i, first in enumerate(names):
        for second in names[i + 1 :]:
            same_levels = levels[first] == levels[second]
            diff = _relative_diff(maps[first], maps[second]) if same_levels else None
            pairs[f"{first}~{second}"] = {
                "levels_equal": same_levels,
                "max_rel_diff": diff,
                "equal": same_levels and diff is not None and diff <= case.tolerance,
            }
    return {
        "arch": case.arch,
        "names": {"timm": case.timm, "torchvision": case.torchvision, "hf": case.hf and case.hf[0]},
        "levels": levels,
        "pairs": pairs,
        "tolerance": case.tolerance,
        "notes": case.notes,
    }


def _relative_diff(first: list[Tensor], second: list[Tensor]) -> float | None:
    worst = 0.0
    for a, b in zip(first, second, strict=True):
        if a.shape != b.shape:
            return None
        scale = max(float(a.abs().max()), 1e-12)
        worst = max(worst, float((a - b).abs().max()) / scale)
    return worst


def markdown(results: list[dict[str, Any]]) -> str:
    lines = [
        "# Cross-backend consistency",
        "",
        "The same architecture built in each backend, with the same weights (timm's,",
        "mapped to the other backends' names by `tests/consistency/weights.py`), on one",
        "random input of the model's size (224x224; DINOv2 518x518). *levels*: the full",
        "(channels, reduction) lists are identical;",
        "*max rel. diff*: the largest absolute difference over all levels, relative to",
        "the largest magnitude of each map. Regenerate with",
        "`python -m tests.consistency.cases`; `nox -s consistency` fails when a cell",
        "gets worse.",
        "",
        "Each pair cell: *yes* when the level lists are identical and the maps agree",
        "within the tolerance, with the largest relative difference in brackets.",
        "",
        "| architecture | timm | torchvision | transformers | levels (channels, reduction) "
        "| timm = tv | timm = hf | tv = hf | tolerance |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for result in results:
        names = result["names"]
        first_levels = next(iter(result["levels"].values()))
        described = ", ".join(f"({c}, {r})" for c, r in first_levels[:5])
        if len(first_levels) > 5:
            described += f", … {len(first_levels)} levels"
        cells = []
        for pair in ("timm~torchvision", "timm~hf", "torchvision~hf"):
            cell = result["pairs"].get(pair)
            if cell is None:
                cells.append("—")
            elif not cell["levels_equal"]:
                cells.append("no (levels differ)")
            else:
                verdict = "yes" if cell["equal"] else "no"
                cells.append(f"{verdict} ({cell['max_rel_diff']:.1e})")
        lines.append(
            f"| {result['arch']} | `{names['timm']}` | `{names['torchvision'] or '—'}` | "
            f"`{names['hf'] or '—'}` | {described} | {' | '.join(cells)} | "
            f"{result['tolerance']:.0e} |"
        )
    notes = [f"- {r['arch']}: {r['notes']}" for r in results if r["notes"]]
    if notes:
        lines += ["", "Notes:", "", *notes]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    only = set(argv)
    results = [run(case) for case in CASES if not only or case.arch in only]
    for result in results:
        for pair, cell in result["pairs"].items():
            print(f"{result['arch']:20s} {pair:18s} {cell}")
    if not only:
        TABLE_JSON.write_text(json.dumps(results, indent=1) + "\n")
        TABLE_MD.write_text(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
