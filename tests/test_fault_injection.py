"""Crash safety: extractions killed with SIGKILL at chosen points (during a forward, in the
middle of a shard file, between a shard and its index, in the middle of the index), then
rerun, end with exactly one row per readable image, each equal to an uninterrupted run's."""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import unifeat

OPTIONS = dict(
    random_init=True, out_indices=(-2, -1), input_size=(32, 32), batch_size=4, flush_every=4
)


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no finally, no flush


def _run_and_kill(point: str, count: int, output: str, images: str) -> None:
    """In a forked child: an extraction that kills itself at a chosen point."""
    from unifeat import _extract, _store

    # OpenMP's thread pool does not survive a fork; DataLoader workers do the same.
    torch.set_num_threads(1)
    calls = {"n": 0}
    if point == "forward":
        forward = _extract.Embedder.__call__

        def call(self, pixels):  # type: ignore[no-untyped-def]
            calls["n"] += 1
            if calls["n"] == count:
                _die()
            return forward(self, pixels)

        _extract.Embedder.__call__ = call  # type: ignore[method-assign]
    else:
        write = _store.atomic_write

        def atomic_write(target, writer):  # type: ignore[no-untyped-def]
            is_index = target.name.endswith(".index.json")
            if is_index == (point in ("index", "between")):
                calls["n"] += 1
                if calls["n"] == count:
                    if point == "between":  # the shard is in place, its index entry not
                        _die()
                    buffer = io.BytesIO()
                    writer(buffer)
                    data = buffer.getvalue()
                    temp = target.with_name(f".{target.name}.tmp-{os.getpid()}-killed")
                    with open(temp, "wb") as handle:  # half of the file, then death
                        handle.write(data[: len(data) // 2])
                        handle.flush()
                        os.fsync(handle.fileno())
                    _die()
            return write(target, writer)

        _store.atomic_write = atomic_write  # type: ignore[assignment]
    unifeat.extract("tv:resnet18", [images], output, progress=False, **OPTIONS)
    os._exit(0)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Forty readable images (ten batches of four, less the corrupt ones) and three corrupt."""
    folder = tmp_path_factory.mktemp("kill") / "images"
    folder.mkdir()
    generator = np.random.RandomState(3)
    for i in range(40):
        pixels = (generator.rand(24 + i % 7, 30, 3) * 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:03d}.png")
    for name in ("005b.jpg", "017b.png", "031b.jpg"):
        (folder / name).write_bytes(b"corrupt")
    return folder


@pytest.fixture(scope="module")
def uninterrupted(images: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("reference") / "ref.safetensors"
    unifeat.extract("tv:resnet18", [images], out, progress=False, **OPTIONS)
    return unifeat.load_features(out)


def _kill_at(point: str, count: int, output: Path, images: Path) -> int:
    """The exit code of a forked extraction killed at ``point`` (forked: no second
    torch import, so each case takes seconds)."""
    process = multiprocessing.get_context("fork").Process(
        target=_run_and_kill, args=(point, count, str(output), str(images))
    )
    process.start()
    process.join(timeout=600)
    return process.exitcode if process.exitcode is not None else 0


def _check_rerun(output: Path, images: Path, uninterrupted: dict) -> dict:
    result = unifeat.extract("tv:resnet18", [images], output, progress=False, **OPTIONS)
    features = unifeat.load_features(output)
    paths = features["paths"]
    assert len(paths) == len(set(paths)), "duplicate rows"
    assert paths == uninterrupted["paths"], "rows lost, added or out of order"
    for level in ("level_3", "level_4"):
        assert torch.equal(features[level], uninterrupted[level])
    assert sorted(features["failed"]) == sorted(uninterrupted["failed"])
    leftovers = [p.name for p in output.parent.iterdir() if p.name.startswith(".")]
    assert leftovers == []
    return {"written_by_rerun": result.written, "rows": len(paths)}


# (point, which call dies, format): kills in the first, middle and last parts of a run.
KILLS = [
    ("forward", 3, "safetensors"),  # 2 batches done, nothing committed past them
    ("forward", 9, "parquet"),
    ("shard", 2, "parquet"),  # half of the second shard file on disk
    ("shard", 5, "npy"),  # npy: one shard is three files; dies inside shard 1
    ("between", 3, "safetensors"),  # shard 2 renamed into place, index not updated
    ("index", 2, "npy"),  # half of the first commit's index
    ("index", 4, "parquet"),
    ("index", 1, "safetensors"),  # before anything: the new store's first index
]


@pytest.mark.parametrize(("point", "count", "storage"), KILLS)
def test_killed_runs_resume_to_exactly_the_uninterrupted_rows(
    point: str, count: int, storage: str, images: Path, uninterrupted: dict, tmp_path: Path
) -> None:
    output = tmp_path / f"f.{storage}"
    assert _kill_at(point, count, output, images) == -signal.SIGKILL
    # What the killed run left is readable and holds no half-written row.
    if (tmp_path / "f.index.json").exists():
        before = unifeat.load_features(output)
        assert len(before["paths"]) < len(uninterrupted["paths"])
        assert before["paths"] == uninterrupted["paths"][: len(before["paths"])]
    report = _check_rerun(output, images, uninterrupted)
    assert 0 < report["written_by_rerun"] <= report["rows"]


def _extract_arguments(images: Path, output: Path) -> list[str]:
    """The command line of ``OPTIONS``."""
    return [
        "extract", "tv:resnet18", str(images), "-o", str(output), "--random-init",
        "--out-indices", "-2", "-1", "--input-size", "32", "--batch-size", "4",
        "--flush-every", "4", "--no-progress",
    ]  # fmt: skip


@pytest.mark.slow
def test_kills_at_random_moments(images: Path, uninterrupted: dict, tmp_path: Path) -> None:
    """kill -9 from outside, at random moments of the command line's run, three times."""
    output = tmp_path / "f.parquet"
    command = [sys.executable, "-m", "unifeat", *_extract_arguments(images, output)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    chance = random.Random(0)
    for _ in range(3):
        process = subprocess.Popen(command, env=env, stderr=subprocess.DEVNULL)
        time.sleep(chance.uniform(6, 14))
        process.send_signal(signal.SIGKILL)
        process.wait()
    _check_rerun(output, images, uninterrupted)


def test_a_real_ctrl_c_exits_130_and_keeps_finished_rows(images: Path, tmp_path: Path) -> None:
    slow = (
        "import sys, time\n"
        "from unifeat import _extract\n"
        "forward = _extract.Embedder.__call__\n"
        "def call(self, pixels):\n"
        "    time.sleep(0.5)\n"
        "    return forward(self, pixels)\n"
        "_extract.Embedder.__call__ = call\n"
        "from unifeat._cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    output = tmp_path / "f.npy"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    process = subprocess.Popen(
        [sys.executable, "-c", slow, *_extract_arguments(images, output)],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    index = tmp_path / "f.index.json"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if index.exists() and json.loads(index.read_text())["shards"]:
            break
        time.sleep(0.1)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130
    lines = [line for line in err.splitlines() if "skipped" not in line]
    assert len(lines) == 1 and "interrupted;" in lines[0] and "Traceback" not in err
    kept = unifeat.load_features(output)["paths"]
    assert 0 < len(kept) < 40 and f"{len(kept)} images are safely in" in lines[0]
