"""Extraction throughput on one machine, in images/s, and the effect of --fast-decode.

Usage: ``python benchmarks/throughput.py [--quick] [--no-ray]`` (or ``nox -s throughput``).
Writes ``benchmarks/throughput.json`` and prints the table of the docs page
"Extraction at scale".

Cases, each on small (320x256) and large (4000x3000) synthetic JPEG photos:

* decoding and cropping alone, in one process, exact and reduced (the ceiling
  a decode-bound run can reach per CPU);
* the hand-written loop: a ``DataLoader`` over ``Image.open(p).convert("RGB")``
  and timm's own transform, ``forward_features(x).mean((2, 3))``;
* ``unifeat.extract`` with the local engine, with and without ``fast_decode``;
* ``unifeat.extract(engine="ray")`` on a local cluster of as many CPUs as the
  machine has, with and without ``fast_decode`` (the cluster is started once,
  outside the timings; its start-up time is reported separately).

All cases run in one process, in alternation, and the table reports each
case's best of ``--repeats`` runs. ``--fast-decode``'s effect on descriptors is
the cosine similarity of each image's descriptor to the exact one.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "throughput.json"


def photos(folder: Path, count: int, size: tuple[int, int], seed: int) -> list[Path]:
    """Photo-like JPEGs (smooth shading, shapes, sensor noise; quality 90)."""
    from PIL import Image, ImageDraw, ImageFilter

    folder.mkdir(parents=True, exist_ok=True)
    generator = np.random.RandomState(seed)
    width, height = size
    paths = []
    for i in range(count):
        low = generator.rand(6, 8, 3) * 255
        image = Image.fromarray(low.astype(np.uint8)).resize(size, Image.Resampling.BICUBIC)
        draw = ImageDraw.Draw(image)
        for _ in range(12):
            x, y = generator.randint(0, width), generator.randint(0, height)
            r = generator.randint(width // 40, width // 6)
            color = tuple(int(c) for c in generator.randint(0, 255, 3))
            draw.ellipse((x - r, y - r, x + r, y + r), fill=color)
        image = image.filter(ImageFilter.GaussianBlur(radius=max(1, width // 800)))
        noise = generator.normal(0, 6, (height, width, 3))
        pixels = np.clip(np.asarray(image, dtype=np.float32) + noise, 0, 255).astype(np.uint8)
        path = folder / f"{i:04d}.jpg"
        Image.fromarray(pixels).save(path, quality=90)
        paths.append(path)
    return paths


def hand_loop(model: Any, paths: list[Path], batch_size: int, workers: int) -> np.ndarray:
    """What a user writes without unifeat: timm's transform, a DataLoader, a loop."""
    from PIL import Image
    from timm.data import create_transform, resolve_data_config

    transform = create_transform(**resolve_data_config({}, model=model))

    class Files(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(paths)

        def __getitem__(self, i: int) -> torch.Tensor:
            with Image.open(paths[i]) as image:
                return transform(image.convert("RGB"))

    loader = torch.utils.data.DataLoader(Files(), batch_size=batch_size, num_workers=workers)
    out = []
    with torch.inference_mode():
        for batch in loader:
            out.append(model.forward_features(batch).mean(dim=(2, 3)))
    return torch.cat(out).numpy()


def run(args: argparse.Namespace) -> dict[str, Any]:
    import timm

    import unifeat

    work = Path(tempfile.mkdtemp(prefix="unifeat-throughput-"))
    sets = {
        "small 320x256": photos(work / "small", args.small, (320, 256), 0),
        "large 4000x3000": photos(work / "large", args.large, (4000, 3000), 1),
    }
    torch.manual_seed(0)
    native = timm.create_model(args.model).eval()
    model = unifeat.create_model(native, features_only=True, out_indices=(-1,))
    options = dict(batch_size=args.batch_size, num_workers=args.workers, progress=False)

    def extract(folder: Path, engine: str, fast: bool) -> Callable[[], np.ndarray]:
        def go() -> np.ndarray:
            out = work / "out" / f"{time.monotonic_ns()}.npy"
            unifeat.extract(model, [folder], out, engine=engine, fast_decode=fast, **options)
            return unifeat.load_matrix(out)

        return go

    def decode_only(paths: list[Path], fast: bool) -> Callable[[], np.ndarray]:
        from unifeat._data import model_data_config
        from unifeat._extract import decoder

        decode = decoder(model_data_config(model), fast)

        def go() -> np.ndarray:
            return np.stack([decode(str(p)) for p in paths])

        return go

    cases: dict[str, Callable[[Path, list[Path]], Callable[[], np.ndarray]]] = {
        "decode and crop only, one process": lambda folder, paths: decode_only(paths, False),
        "decode and crop only, one process, --fast-decode": lambda folder, paths: decode_only(
            paths, True
        ),
        "hand-written loop": lambda folder, paths: (
            lambda: hand_loop(native, paths, args.batch_size, args.workers)
        ),
        "extract, local": lambda folder, paths: extract(folder, "local", False),
        "extract, local, --fast-decode": lambda folder, paths: extract(folder, "local", True),
    }
    ray_start = None
    if not args.no_ray:
        import ray

        os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
        started = time.perf_counter()
        ray.init(
            num_cpus=os.cpu_count(),
            include_dashboard=False,
            log_to_driver=False,
            logging_level="ERROR",
        )
        ray_start = time.perf_counter() - started
        cases["extract --engine ray"] = lambda folder, paths: extract(folder, "ray", False)
        cases["extract --engine ray --fast-decode"] = lambda folder, paths: extract(
            folder, "ray", True
        )
    rates: dict[str, dict[str, float]] = {}
    descriptors: dict[tuple[str, str], np.ndarray] = {}
    for label, paths in sets.items():
        folder = paths[0].parent
        runners = {name: make(folder, paths) for name, make in cases.items()}
        best: dict[str, float] = {}
        for _ in range(args.repeats):
            for name, runner in runners.items():
                start = time.perf_counter()
                result = runner()
                seconds = time.perf_counter() - start
                best[name] = min(best.get(name, float("inf")), seconds)
                descriptors[(label, name)] = result
        rates[label] = {name: len(paths) / seconds for name, seconds in best.items()}
    similarity = {}
    for label, paths in sets.items():
        exact = descriptors[(label, "extract, local")].astype(np.float64)
        fast = descriptors[(label, "extract, local, --fast-decode")].astype(np.float64)
        similarity[label] = fast_decode_effect(model, paths, exact, fast)
        hand = descriptors[(label, "hand-written loop")]
        similarity[label]["hand_loop_max_abs_diff"] = float(np.abs(hand - exact).max())
        if not args.no_ray:
            ray_rows = descriptors[(label, "extract --engine ray")]
            similarity[label]["ray_vs_local_max_abs_diff"] = float(np.abs(ray_rows - exact).max())
    shutil.rmtree(work, ignore_errors=True)
    return {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "torch": torch.__version__,
        "model": f"timm {args.model} (random init), batch {args.batch_size}, "
        f"{args.workers} decode workers, best of {args.repeats}",
        "images": {label: len(paths) for label, paths in sets.items()},
        "images_per_second": rates,
        "fast_decode_cosine": similarity,
        "ray_cluster_start_seconds": ray_start,
    }


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def fast_decode_effect(
    model: Any, paths: list[Path], exact: np.ndarray, fast: np.ndarray
) -> dict[str, Any]:
    """How far reduced decoding moves crops and descriptors, against how far apart
    different images are (random-init descriptors are all alike, so the raw
    cosine alone says little: the centred one is compared too)."""
    from unifeat._data import model_data_config
    from unifeat._extract import decoder

    config = model_data_config(model)
    exact_crop, fast_crop = decoder(config, False), decoder(config, True)
    pixel_diff = [
        float(np.abs(exact_crop(str(p)).astype(int) - fast_crop(str(p)).astype(int)).mean())
        for p in paths
    ]
    centre = exact.mean(axis=0, keepdims=True)
    same = _cosine(exact - centre, fast - centre)
    shifted = np.roll(exact, 1, axis=0)
    others = _cosine(exact - centre, shifted - centre)
    nearest = np.argmax(
        (fast / np.linalg.norm(fast, axis=1, keepdims=True))
        @ (exact / np.linalg.norm(exact, axis=1, keepdims=True)).T,
        axis=1,
    )
    return {
        "images": len(paths),
        "crop_mean_abs_diff_of_255": float(np.mean(pixel_diff)),
        "cosine_min": float(_cosine(exact, fast).min()),
        "cosine_mean": float(_cosine(exact, fast).mean()),
        "centred_cosine_min": float(same.min()),
        "centred_cosine_mean": float(same.mean()),
        "centred_cosine_between_different_images_mean": float(others.mean()),
        "nearest_exact_descriptor_is_its_own": float(np.mean(nearest == np.arange(len(paths)))),
    }


def table(report: dict[str, Any]) -> str:
    labels = list(report["images_per_second"])
    names = list(report["images_per_second"][labels[0]])
    lines = [
        "| case | " + " | ".join(f"{label} (images/s)" for label in labels) + " |",
        "| --- | " + " | ".join("---:" for _ in labels) + " |",
    ]
    for name in names:
        cells = [f"{report['images_per_second'][label][name]:.1f}" for label in labels]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--small", type=int, default=64, help="small images")
    parser.add_argument("--large", type=int, default=16, help="large images")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--no-ray", action="store_true", help="skip the Ray cases")
    parser.add_argument("--quick", action="store_true", help="few images, one repeat")
    args = parser.parse_args()
    if args.quick:
        args.small, args.large, args.repeats = 16, 4, 1
    report = run(args)
    RESULTS.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "images_per_second"}, indent=1))
    print(table(report))


if __name__ == "__main__":
    main()
