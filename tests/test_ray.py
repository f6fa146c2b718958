"""Ray Data on a local 2-CPU cluster: unifeat.ray's stages and ``extract --engine ray`` give
exactly the local engine's rows. Behind the ``ray`` marker (``nox -s ray``, run by CI):
starting Ray and its workers takes most of a minute on two cores."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import unifeat

pytestmark = pytest.mark.ray
ray = pytest.importorskip("ray", reason='the [ray] extra: pip install "unifeat[ray]"')
import unifeat.ray  # noqa: E402 - after the skip

OPTIONS = dict(
    random_init=True, out_indices=(-2, -1), input_size=(32, 32), batch_size=16, progress=False
)


@pytest.fixture(scope="module")
def cluster():
    """One local cluster for the module: no dashboard, no usage stats, no network."""
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """300 generated images (PNG and JPEG, odd sizes), 6 of them corrupt or truncated."""
    folder = tmp_path_factory.mktemp("ray") / "images"
    (folder / "a").mkdir(parents=True)
    (folder / "b").mkdir()
    generator = np.random.RandomState(7)
    for i in range(294):
        pixels = (generator.rand(20 + i % 13, 24 + i % 5, 3) * 255).astype(np.uint8)
        Image.fromarray(pixels).save(
            folder / ("a" if i % 2 else "b") / f"{i:03d}.{'png' if i % 3 else 'jpg'}"
        )
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(buffer, format="JPEG")
    for i in range(3):
        (folder / f"corrupt{i}.jpg").write_bytes(b"\x00" * (10 + i))
        (folder / f"truncated{i}.jpg").write_bytes(buffer.getvalue()[: 200 + 50 * i])
    return folder


@pytest.fixture(scope="module")
def local(images: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("local") / "local.parquet"
    unifeat.extract("tv:resnet18", [images], out, **OPTIONS)
    return unifeat.load_features(out)


def test_extract_with_the_ray_engine_equals_the_local_engine(
    cluster: None, images: Path, local: dict, tmp_path: Path
) -> None:
    out = tmp_path / "ray.parquet"
    result = unifeat.extract("tv:resnet18", [images], out, engine="ray", **OPTIONS)
    assert result.written == 294 and len(result.failed) == 6
    features = unifeat.load_features(out)
    assert features["paths"] == local["paths"]  # same rows, same order
    for level in ("level_3", "level_4"):
        assert (features[level] - local[level]).abs().max().item() == 0.0
    assert features["failed"] == local["failed"]
    record = features["provenance"]
    assert {k: v for k, v in record.items() if k not in ("created", "versions")} == {
        k: v for k, v in local["provenance"].items() if k not in ("created", "versions")
    }
    # A rerun finds everything there: nothing new is written.
    again = unifeat.extract("tv:resnet18", [images], out, engine="ray", **OPTIONS)
    assert (again.written, again.skipped, len(again.failed)) == (0, 294, 6)
    # Resuming a half-done output: the missing rows, bit-identical again.
    half = tmp_path / "half.parquet"
    unifeat.extract("tv:resnet18", [images / "a"], half, **OPTIONS)
    rest = unifeat.extract("tv:resnet18", [images], half, engine="ray", **OPTIONS)
    assert rest.written == 147
    resumed = unifeat.load_features(half)
    order = {p: i for i, p in enumerate(resumed["paths"])}
    rows = [order[p] for p in local["paths"]]
    assert torch.equal(resumed["level_4"][rows], local["level_4"])


def test_preprocess_and_embed_stages_on_binary_files(
    cluster: None, images: Path, local: dict
) -> None:
    """The pattern Ray Data users write themselves, with read_binary_files."""
    import ray.data

    dataset = ray.data.read_binary_files(str(images), include_paths=True)
    dataset = dataset.map_batches(
        unifeat.ray.Preprocess,
        fn_constructor_kwargs={"model": "tv:resnet18", "input_size": (32, 32)},
        compute=ray.data.ActorPoolStrategy(size=1),
        batch_size=32,
        num_cpus=0.5,  # two actors and the read tasks share the two CPUs
    )
    model = unifeat.create_model("tv:resnet18", features_only=True, out_indices=(-2, -1))
    model.load_state_dict(_local_weights())
    dataset = dataset.map_batches(
        unifeat.ray.Embed,
        fn_constructor_kwargs={"model": model, "input_size": (32, 32)},
        compute=ray.data.ActorPoolStrategy(size=1),
        batch_size=16,
        num_cpus=0.5,
    )
    rows = dataset.take_all()
    assert len(rows) == 300
    errors = {Path(r["path"]).name: r["error"] for r in rows if r["error"]}
    assert sorted(errors) == [
        f"{kind}{i}.jpg" for kind in ("corrupt", "truncated") for i in range(3)
    ]
    by_path = {os.path.realpath(r["path"]): r["level_4"] for r in rows if not r["error"]}
    got = np.stack([by_path[p] for p in local["paths"]])
    # Other batches than the local run's: equal up to float rounding.
    np.testing.assert_allclose(got, local["level_4"].numpy(), rtol=1e-5, atol=1e-5)


def _local_weights() -> dict:
    """The random-init weights the local run used (seed 0)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = unifeat.create_model("tv:resnet18", features_only=True, out_indices=(-2, -1))
    return model.state_dict()


def test_the_cli_ray_engine(cluster: None, images: Path, local: dict, tmp_path: Path) -> None:
    from unifeat._cli import main

    out = tmp_path / "cli.parquet"
    args = [
        "extract",
        "tv:resnet18",
        str(images),
        "-o",
        str(out),
        "--engine",
        "ray",
        "--random-init",
        "--out-indices",
        "-2",
        "-1",
        "--input-size",
        "32",
        "--batch-size",
        "16",
        "--no-progress",
    ]
    assert main(args) == 0
    assert torch.equal(unifeat.load_features(out)["level_4"], local["level_4"])
