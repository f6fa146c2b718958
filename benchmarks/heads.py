"""One training step of transformers' UperNet on a unifeat backbone against the same
UperNet on transformers' own backbone of the same architecture.

Usage: ``python benchmarks/heads.py [--arch resnet50] [--size 256] [--batch 2]
[--repeats 10] [--threads N] [--device cpu|cuda] [--output benchmarks/heads.json]``.

Both head models are built from one UperNet config, one on
``ResNetConfig(out_features=stage1-stage4)`` (transformers' ``ResNetBackbone``),
the other on ``UnifeatBackboneConfig("hf:resnet", out_indices=(1, 2, 3, 4))``
with the same ``ResNetConfig`` values, and the transformers model gets the
unifeat model's weights: the two compute the same numbers (the script checks
that the losses are equal), so the ratio is the cost of the unifeat backbone
alone. A step is forward, loss (with the auxiliary head) and backward, in
training mode. The machine is noisy, so the two run in alternation (the order
swapped every repetition) in one process, after warm-up steps, and the verdict
is the ratio of the minimum times; the ratio of the medians is reported too,
and on the CPU the same ratios of the process's CPU time (with ``--threads 1``
the steadiest measure on a machine others use too).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "resnet50": dict(layer_type="bottleneck", depths=[3, 4, 6, 3]),
    "resnet18": dict(layer_type="basic", depths=[2, 2, 2, 2], hidden_sizes=[64, 128, 256, 512]),
}


def build(arch: str, device: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    """``(ours, theirs)``: UperNet on the unifeat backbone and on ``ResNetBackbone``,
    with the same weights, in training mode."""
    from transformers import ResNetConfig, UperNetConfig, UperNetForSemanticSegmentation

    from unifeat.integrations.transformers import UnifeatBackboneConfig

    values = ARCHITECTURES[arch]
    head = dict(num_labels=150)  # ADE20k's classes; UperNet's other defaults
    ours = UperNetForSemanticSegmentation(
        UperNetConfig(
            backbone_config=UnifeatBackboneConfig(
                model_name="hf:resnet", out_indices=(1, 2, 3, 4), model_kwargs=values
            ),
            **head,
        )
    )
    theirs = UperNetForSemanticSegmentation(
        UperNetConfig(
            backbone_config=ResNetConfig(
                **values, out_features=["stage1", "stage2", "stage3", "stage4"]
            ),
            **head,
        )
    )
    state = {k.replace("backbone.model.", "backbone."): v for k, v in ours.state_dict().items()}
    theirs.load_state_dict(state, strict=True)
    return ours.to(device).train(), theirs.to(device).train()


def step(model: torch.nn.Module, x: torch.Tensor, labels: torch.Tensor) -> float:
    """One forward, loss and backward; returns the loss."""
    model.zero_grad(set_to_none=True)
    loss = model(pixel_values=x, labels=labels).loss
    loss.backward()
    return float(loss.detach())


def timed(run: Callable[[], float], device: str) -> tuple[float, float, float]:
    """``(wall seconds, CPU seconds of this process, loss)`` of one call."""
    if device == "cuda":
        torch.cuda.synchronize()
    start, cpu_start = time.perf_counter(), time.process_time()
    loss = run()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, time.process_time() - cpu_start, loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=sorted(ARCHITECTURES), default="resnet50")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch's CPU threads (default: torch's); 1 makes CPU time a steady measure "
        "on a machine others use too",
    )
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "heads.json")
    args = parser.parse_args()

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ours, theirs = build(args.arch, args.device)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, args.size, args.size, generator=generator).to(args.device)
    labels = torch.randint(0, 150, (args.batch, args.size, args.size), generator=generator)
    labels = labels.to(args.device)
    runs = {
        "unifeat": lambda: step(ours, x, labels),
        "transformers": lambda: step(theirs, x, labels),
    }
    for _ in range(args.warmup):
        for run in runs.values():
            run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    cpu: dict[str, list[float]] = {name: [] for name in runs}
    losses: dict[str, float] = {}
    order = list(runs)
    for _ in range(args.repeats):
        for name in order:
            seconds, cpu_seconds, losses[name] = timed(runs[name], args.device)
            times[name].append(seconds)
            cpu[name].append(cpu_seconds)
        order.reverse()
    # Same weights, same input: the same loss, or the comparison is not of one network.
    if losses["unifeat"] != losses["transformers"]:
        raise SystemExit(f"the two models disagree: losses {losses}")
    result = {
        "case": (
            f"UperNet training step (forward, loss, backward), {args.arch}, batch "
            f"{args.batch}, {args.size}x{args.size}: unifeat hf:resnet vs ResNetBackbone"
        ),
        "machine": f"{platform.machine()}, {args.device}",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "ours_min_ms": 1000 * min(times["unifeat"]),
        "native_min_ms": 1000 * min(times["transformers"]),
        "ours_median_ms": 1000 * statistics.median(times["unifeat"]),
        "native_median_ms": 1000 * statistics.median(times["transformers"]),
        "ratio_min": min(times["unifeat"]) / min(times["transformers"]),
        "ratio_median": statistics.median(times["unifeat"])
        / statistics.median(times["transformers"]),
        # CPU time of this process: what others' load on a shared machine disturbs least.
        "ours_cpu_min_ms": 1000 * min(cpu["unifeat"]),
        "native_cpu_min_ms": 1000 * min(cpu["transformers"]),
        "cpu_ratio_min": min(cpu["unifeat"]) / min(cpu["transformers"]),
        "cpu_ratio_median": statistics.median(cpu["unifeat"])
        / statistics.median(cpu["transformers"]),
    }
    args.output.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
