"""The extraction store: formats, provenance, resume rules, locking, failures, parts and merge."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

import unifeat
from unifeat._cli import main
from unifeat._images import in_part
from unifeat._store import ProvenanceMismatchError, StoreLockedError, _Lock, store_paths

# One image per forward: CPU kernels may give other last bits for other batch
# sizes, and these tests compare rows exactly across formats, parts and runs.
SMALL = dict(
    random_init=True, out_indices=(-2, -1), input_size=(32, 32), progress=False, batch_size=1
)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Nine readable images of odd sizes, one corrupt, one truncated."""
    root = tmp_path_factory.mktemp("store") / "images"
    (root / "nested").mkdir(parents=True)
    generator = np.random.RandomState(0)
    for i in range(9):
        pixels = (generator.rand(30 + 3 * i, 41, 3) * 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / ("nested" if i % 3 else "") / f"img{i}.png")
    (root / "corrupt.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    data = (root / "img0.png").read_bytes()
    (root / "truncated.png").write_bytes(data[: len(data) // 2])
    return root


READABLE = 9


def _extract(folder: Path, output: Path, **kwargs: object) -> unifeat.ExtractResult:
    return unifeat.extract("tv:resnet18", [folder], output, **{**SMALL, **kwargs})


@pytest.fixture(scope="module")
def reference(folder: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("reference") / "ref.safetensors"
    _extract(folder, out)
    return unifeat.load_features(out)


@pytest.mark.parametrize("storage", ["safetensors", "parquet", "npy"])
def test_every_format_holds_the_same_rows(
    storage: str, folder: Path, tmp_path: Path, reference: dict
) -> None:
    result = _extract(folder, tmp_path / f"f.{storage}", flush_every=4)
    assert (result.written, result.skipped, len(result.failed)) == (READABLE, 0, 2)
    features = unifeat.load_features(tmp_path / f"f.{storage}")
    assert features["paths"] == reference["paths"]
    for level in ("level_3", "level_4"):
        assert torch.equal(features[level], reference[level])
    assert [Path(p).name for p, _ in features["failed"]] == ["corrupt.jpg", "truncated.png"]
    assert features["provenance"]["weights"] == reference["provenance"]["weights"]
    # flush_every=4: three shards, and the index names exactly them.
    index = json.loads((tmp_path / "f.index.json").read_text())
    assert [s["rows"] for s in index["shards"]] == [4, 4, 1] and index["complete"]


def test_parquet_schema_pyarrow_and_pandas(folder: Path, tmp_path: Path, reference: dict) -> None:
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    _extract(folder, tmp_path / "f.parquet", flush_every=100)
    shard = tmp_path / "f.00000.parquet"
    table = pq.read_table(shard)
    assert table.schema.field("path").type == pa.string()
    assert table.schema.field("level_4").type == pa.list_(pa.float32(), 512)
    assert table.schema.field("level_3").type == pa.list_(pa.float32(), 256)
    provenance = json.loads(table.schema.metadata[b"unifeat"])
    assert provenance == unifeat.load_features(tmp_path / "f.parquet")["provenance"]
    assert provenance["pool"] == "avg" and provenance["out_indices"] == [3, 4]
    assert provenance["data_config"] == unifeat.data_config("tv:resnet18").model_copy(
        update={"input_size": (3, 32, 32)}
    ).model_dump(mode="json") | {"source": provenance["data_config"]["source"]}
    frame = pd.read_parquet(shard)
    assert list(frame["path"]) == reference["paths"]
    assert np.array_equal(np.stack(frame["level_4"].to_list()), reference["level_4"].numpy())
    # FixedSizeList values are one float32 buffer: a (N, D) view without copies.
    column = table["level_4"].chunk(0)
    view = column.values.to_numpy(zero_copy_only=True).reshape(len(column), 512)
    assert np.array_equal(view, reference["level_4"].numpy())


def test_parquet_whole_maps_use_a_tensor_column(folder: Path, tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    _extract(folder, tmp_path / "maps.parquet", pool="none", out_indices=(-1,))
    table = pq.read_table(tmp_path / "maps.00000.parquet")
    assert str(table.schema.field("level_4").type).startswith("extension<arrow.fixed_shape_tensor")
    maps = unifeat.load_features(tmp_path / "maps.parquet")["level_4"]
    assert maps.shape == (READABLE, 512, 1, 1)
    pooled = unifeat.load_features(
        _extract(folder, tmp_path / "p.npy", out_indices=(-1,)).index_path
    )
    assert torch.allclose(maps.mean(dim=(2, 3)), pooled["level_4"])


def test_npy_shards_memory_map_and_load_matrix(
    folder: Path, tmp_path: Path, reference: dict
) -> None:
    _extract(folder, tmp_path / "f.npy", flush_every=5)
    mapped = np.load(tmp_path / "f.00000.level_4.npy", mmap_mode="r")
    assert isinstance(mapped, np.memmap) and mapped.shape == (5, 512)
    matrix = unifeat.load_matrix(tmp_path / "f.npy", level=4)
    assert matrix.dtype == np.float32 and matrix.flags["C_CONTIGUOUS"]
    assert np.array_equal(matrix, reference["level_4"].numpy())
    # Nearest neighbours by inner product, as a FAISS IndexFlatIP would give.
    normed = matrix / np.linalg.norm(matrix, axis=1, keepdims=True)
    assert (np.argmax(normed @ normed.T, axis=1) == np.arange(len(matrix))).all()
    with pytest.raises(unifeat.UnsupportedOptionError, match="'level_3' or 'level_4'"):
        unifeat.load_matrix(tmp_path / "f.npy")
    with pytest.raises(unifeat.UnsupportedOptionError, match="no 'level_1'"):
        unifeat.load_matrix(tmp_path / "f.npy", level=1)


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"out_indices": (-1,)}, "out_indices"),
        ({"pool": "max"}, 'pool: stored "avg", now "max"'),
        ({"input_size": (48, 48)}, "data_config"),
        ({"seed": 1}, "weights"),
        ({"dtype": "bfloat16"}, "dtype"),
        ({"fast_decode": True}, "fast_decode"),
    ],
)
def test_resume_with_other_settings_is_refused_naming_the_difference(
    change: dict, named: str, folder: Path, tmp_path: Path
) -> None:
    _extract(folder, tmp_path / "f.safetensors", flush_every=100)
    with pytest.raises(ProvenanceMismatchError, match="--overwrite") as caught:
        _extract(folder, tmp_path / "f.safetensors", **change)
    assert named in str(caught.value)
    assert isinstance(caught.value, ValueError) and isinstance(caught.value, unifeat.StoreError)
    # Nothing was changed by the refused run.
    assert len(unifeat.load_features(tmp_path / "f.safetensors")["paths"]) == READABLE


def test_another_model_is_refused_and_overwrite_starts_over(folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "f.npy"
    _extract(folder, out, flush_every=4)
    with pytest.raises(ProvenanceMismatchError, match=r"model: stored \"tv:resnet18\""):
        unifeat.extract("timm:resnet18", [folder], out, **SMALL)
    result = unifeat.extract("timm:resnet18", [folder], out, overwrite=True, **SMALL)
    assert result.written == READABLE
    features = unifeat.load_features(out)
    assert features["provenance"]["model"] == "timm:resnet18"
    assert len(features["paths"]) == READABLE
    # The first run's three shards are gone, not just forgotten.
    assert sorted(p.name for p in tmp_path.glob("f.*.paths.npy")) == ["f.00000.paths.npy"]


def test_failed_images_are_recorded_and_retried_only_when_asked(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (20, 20), "red").save(images / "good.png")
    (images / "late.png").write_bytes(b"half-uploaded")
    out = tmp_path / "f.parquet"
    first = _extract(images, out)
    assert [Path(p).name for p, _ in first.failed] == ["late.png"]
    assert "cannot identify image file" in first.failed[0][1]
    Image.new("RGB", (20, 20), "blue").save(images / "late.png")  # the upload finished
    again = _extract(images, out)
    assert (again.written, again.skipped, len(again.failed)) == (0, 1, 1)
    retried = _extract(images, out, retry_failed=True)
    assert (retried.written, retried.failed) == (1, [])
    features = unifeat.load_features(out)
    assert [Path(p).name for p in features["paths"]] == ["good.png", "late.png"]
    assert features["failed"] == []


def test_a_second_writer_is_refused(folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "f.safetensors"
    holder = _Lock(store_paths(out).lock, "f")
    tmp_path.mkdir(exist_ok=True)
    holder.acquire()
    try:
        with pytest.raises(StoreLockedError, match=r"pid \d+ on host"):
            _extract(folder, out)
        # A writer in another process is refused the same way, with exit code 2.
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "unifeat",
                "extract",
                "tv:resnet18",
                str(folder),
                "-o",
                str(out),
                "--random-init",
                "--input-size",
                "32",
                "--no-progress",
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 2
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and "being written by another process" in lines[0]
    finally:
        holder.release()
    assert _extract(folder, out).written == READABLE


def test_writers_in_threads_one_wins(folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "f.npy"
    outcomes: list[object] = []
    model = unifeat.create_model("tv:resnet18", features_only=True, out_indices=(-1,))

    def run() -> None:
        try:
            result = unifeat.extract(model, [folder], out, input_size=(32, 32), progress=False)
            outcomes.append(result.written)
        except StoreLockedError as exc:
            outcomes.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    written = [o for o in outcomes if isinstance(o, int)]
    assert sum(written) == READABLE  # one ran, or both ran one after the other
    assert len(unifeat.load_features(out)["paths"]) == READABLE


def test_a_stale_lock_is_taken_over(
    folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "f.lock").write_text(json.dumps({"pid": 999999, "host": "gone", "since": "x"}))
    assert _extract(folder, tmp_path / "f.npy").written == READABLE
    assert "took over the stale lock" in capsys.readouterr().err
    assert not (tmp_path / "f.lock").exists()


def test_leftovers_of_a_killed_run_are_removed_not_read(folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "f.safetensors"
    _extract(folder, out, flush_every=5)
    # A shard renamed into place but never committed, and half-written temporaries.
    (tmp_path / "f.00002.safetensors").write_bytes(b"garbage")
    (tmp_path / ".f.00003.safetensors.tmp-1-ab").write_bytes(b"half")
    (tmp_path / ".f.index.json.tmp-1-cd").write_bytes(b"{")
    assert len(unifeat.load_features(out)["paths"]) == READABLE  # the index is the truth
    assert _extract(folder, out).written == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "f.00000.safetensors",
        "f.00001.safetensors",
        "f.index.json",
    ]


def test_a_damaged_index_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "f.index.json").write_text("{ not json")
    with pytest.raises(unifeat.StoreError, match="not valid JSON"):
        unifeat.load_features(tmp_path / "f.safetensors")
    with pytest.raises(unifeat.StoreError, match="no extraction output"):
        unifeat.load_features(tmp_path / "nothing.parquet")


def test_parts_cover_every_image_once_and_merge_reproduces_one_run(
    folder: Path, tmp_path: Path, reference: dict
) -> None:
    for i in range(3):
        _extract(folder, tmp_path / "f.parquet", shard=f"{i}/3")
    parts = [unifeat.load_features(tmp_path / f"f.part{i}of3.parquet") for i in range(3)]
    covered = sorted(p for part in parts for p in part["paths"])
    assert covered == sorted(reference["paths"]) and len(set(covered)) == READABLE
    # Each part holds the images the path hash gives it, and nothing else. (How
    # evenly the hash splits is checked over 1000 paths in test_images; with nine
    # images under a temporary folder, a part may hold none, which must work too.)
    for i, part in enumerate(parts):
        assert part["paths"] == [p for p in reference["paths"] if in_part(p, (i, 3))]
    failed = sorted(f for part in parts for f, _ in part["failed"])
    assert [Path(p).name for p in failed] == ["corrupt.jpg", "truncated.png"]
    with pytest.raises(unifeat.StoreError, match=r"parts 2/3 .* missing"):
        unifeat.merge_features(
            [tmp_path / "f.part0of3.parquet", tmp_path / "f.part1of3.parquet"],
            tmp_path / "m.parquet",
        )
    assert main(["merge", "-o", str(tmp_path / "f.safetensors")]) == 0
    merged = unifeat.load_features(tmp_path / "f.safetensors")
    assert merged["paths"] == reference["paths"]
    for level in ("level_3", "level_4"):
        assert torch.equal(merged[level], reference[level])
    assert len(merged["failed"]) == 2 and merged["provenance"]["shard"] is None


def test_merge_refuses_parts_computed_differently_or_unfinished(
    folder: Path, tmp_path: Path
) -> None:
    _extract(folder, tmp_path / "a.npy", shard="0/2")
    _extract(folder, tmp_path / "a.npy", shard="1/2", pool="max")
    with pytest.raises(unifeat.StoreError, match="pool"):
        unifeat.merge_features([], tmp_path / "a.npy")
    _extract(folder, tmp_path / "a.npy", shard="1/2", pool="max", overwrite=False)
    index = tmp_path / "a.part1of2.index.json"
    record = json.loads(index.read_text())
    record["complete"] = False
    index.write_text(json.dumps(record))
    with pytest.raises(unifeat.StoreError, match="incomplete"):
        unifeat.merge_features([tmp_path / "a.part1of2.npy"], tmp_path / "b.npy")


def _ctrl_c_at_forward(number: int, monkeypatch: pytest.MonkeyPatch) -> Callable[[], None]:
    """Ctrl-C during forward ``number``; returns the undo."""
    from unifeat import _extract as module

    calls = {"n": 0}
    original = module.Embedder.__call__

    def interrupted(self, pixels):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == number:
            raise KeyboardInterrupt
        return original(self, pixels)

    monkeypatch.setattr(module.Embedder, "__call__", interrupted)
    return lambda: monkeypatch.setattr(module.Embedder, "__call__", original)


def test_ctrl_c_keeps_the_finished_rows(
    folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    undo = _ctrl_c_at_forward(3, monkeypatch)
    out = tmp_path / "f.npy"
    with pytest.raises(KeyboardInterrupt):
        _extract(folder, out, batch_size=2, flush_every=1000)
    # The two finished batches (corrupt.jpg, img0 | img3, img6: three images),
    # committed although the shard was not full.
    assert [Path(p).name for p in unifeat.load_features(out)["paths"]] == [
        "img0.png",
        "img3.png",
        "img6.png",
    ]
    assert not (tmp_path / "f.lock").exists()
    undo()
    assert _extract(folder, out, batch_size=2).written == READABLE - 3


def test_ctrl_c_in_the_cli_exits_130_with_one_line(
    folder: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _ctrl_c_at_forward(2, monkeypatch)
    args = [
        "extract",
        "tv:resnet18",
        str(folder),
        "-o",
        str(tmp_path / "f.parquet"),
        "--random-init",
        "--input-size",
        "32",
        "--batch-size",
        "3",
        "--no-progress",
    ]
    assert main(args) == 130
    err = [line for line in capsys.readouterr().err.splitlines() if "skipped" not in line]
    assert err == [
        # The first batch: corrupt.jpg, img0, img3.
        f"unifeat extract: interrupted; 2 images are safely in {tmp_path / 'f.parquet'}, "
        "rerun the same command to go on"
    ]


def test_whole_maps_are_flushed_by_size(
    folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pool='none' never holds more than the byte budget, whatever flush_every says."""
    from unifeat import _store

    monkeypatch.setattr(_store, "MAX_BUFFER_BYTES", 3 * 512 * 4 + 1)
    _extract(folder, tmp_path / "m.npy", pool="none", out_indices=(-1,), batch_size=1)
    index = json.loads((tmp_path / "m.index.json").read_text())
    assert [s["rows"] for s in index["shards"]] == [4, 4, 1]


def test_random_weights_by_name_must_be_asked_for(folder: Path, tmp_path: Path) -> None:
    with pytest.raises(unifeat.UnsupportedOptionError, match=r"refusing to extract .* random"):
        unifeat.extract("tv:resnet18", [folder], tmp_path / "f.npy")
    with pytest.raises(unifeat.UnknownModelError, match="resnet18"):
        unifeat.extract("tv:resnet1B", [folder], tmp_path / "f.npy")
    with pytest.raises(unifeat.UnsupportedOptionError, match="contradicts"):
        unifeat.extract(
            "tv:resnet18", [folder], tmp_path / "f.npy", pretrained=True, random_init=True
        )
    assert main(["extract", "tv:resnet18", str(folder), "-o", str(tmp_path / "g.npy")]) == 2
    assert not (tmp_path / "f.index.json").exists()


def test_nhwc_and_dict_models_give_the_same_descriptors(
    folder: Path, tmp_path: Path, reference: dict
) -> None:
    torch.manual_seed(0)
    base = torchvision.models.resnet18()
    results = {}
    for options in ({}, {"output_fmt": "NHWC"}, {"output_type": "dict"}):
        model = unifeat.create_model(base, features_only=True, out_indices=(-2, -1), **options)
        out = tmp_path / f"{'_'.join(options) or 'plain'}.npy"
        unifeat.extract(model, [folder], out, input_size=(32, 32), progress=False)
        results[out.stem] = unifeat.load_features(out)
    for name, features in results.items():
        assert features["level_4"].shape == (READABLE, 512), name
        assert torch.equal(features["level_4"], results["plain"]["level_4"]), name
        assert torch.equal(features["level_3"], results["plain"]["level_3"]), name


def test_bfloat16_is_close_to_float32(folder: Path, tmp_path: Path, reference: dict) -> None:
    _extract(folder, tmp_path / "bf.npy", dtype="bfloat16")
    half = unifeat.load_features(tmp_path / "bf.npy")
    assert half["level_4"].dtype == torch.float32 and half["provenance"]["dtype"] == "bfloat16"
    cosine = torch.nn.functional.cosine_similarity(half["level_4"], reference["level_4"])
    assert cosine.min() > 0.99


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"pool": "median"}, "invalid pool='median'"),
        ({"batch_size": 0}, "invalid batch_size=0"),
        ({"flush_every": -1}, "invalid flush_every=-1"),
        ({"num_workers": -1}, "invalid num_workers=-1"),
        ({"device": "gpu"}, "invalid device 'gpu'"),
        ({"dtype": "int8"}, "invalid dtype='int8'"),
        ({"shard": "3/3"}, "invalid shard='3/3'"),
        ({"shard": "a/b"}, "invalid shard='a/b'"),
        ({"engine": "spark"}, "invalid engine='spark'"),
        ({"format": "csv"}, "invalid format='csv'"),
        ({"input_size": (32, -1)}, r"invalid input_size=\(32, -1\)"),
        ({"address": "auto"}, "address only applies"),
    ],
)
def test_bad_options_are_unifeat_errors_before_anything_is_written(
    kwargs: dict, message: str, folder: Path, tmp_path: Path
) -> None:
    with pytest.raises(unifeat.UnsupportedOptionError, match=message):
        _extract(folder, tmp_path / "f.safetensors", **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_a_model_passed_in_is_left_as_it_was(folder: Path, tmp_path: Path) -> None:
    """Its mode, dtype and weights: bfloat16 runs on a copy, eval is undone."""
    model = unifeat.create_model("tv:resnet18", features_only=True, out_indices=(-1,)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for dtype in ("float32", "bfloat16"):
        unifeat.extract(
            model, [folder], tmp_path / f"{dtype}.npy", dtype=dtype, input_size=(32, 32),
            progress=False,
        )  # fmt: skip
        assert model.training
        after = model.state_dict()
        assert all(torch.equal(after[k], before[k]) for k in before)


def test_outputs_of_unifeat_0_1_still_load(folder: Path, tmp_path: Path) -> None:
    """The earlier layout: an index listing each shard's paths, no provenance."""
    from safetensors.torch import save_file

    rows = [str(folder / "img0.png"), str(folder / "img3.png")]
    tensor = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    save_file(
        {"level_4": tensor}, str(tmp_path / "f.00000.safetensors"), {"paths": json.dumps(rows)}
    )
    index = {"format": "unifeat-features/1", "pool": "avg", "backend": "torchvision"}
    index["shards"] = [{"file": "f.00000.safetensors", "paths": rows}]
    (tmp_path / "f.index.json").write_text(json.dumps(index))
    features = unifeat.load_features(tmp_path / "f.index.json")
    assert features["paths"] == rows and torch.equal(features["level_4"], tensor)
    with pytest.raises(ProvenanceMismatchError, match="earlier unifeat"):
        _extract(folder, tmp_path / "f.safetensors")
    assert _extract(folder, tmp_path / "f.safetensors", overwrite=True).written == READABLE


def test_decoding_workers_give_the_same_rows(folder: Path, tmp_path: Path, reference: dict) -> None:
    import pickle

    from unifeat._extract import _Decode, decoder

    _extract(folder, tmp_path / "w.npy", num_workers=2)
    features = unifeat.load_features(tmp_path / "w.npy")
    assert features["paths"] == reference["paths"]
    assert torch.equal(features["level_4"], reference["level_4"])
    # Workers started by spawn (macOS, Windows) get the dataset pickled.
    config = unifeat.data_config("tv:resnet18")
    dataset = pickle.loads(pickle.dumps(_Decode(reference["paths"], decoder(config, True))))
    assert dataset[0][1].shape == (224, 224, 3)


# -- shard names from an index: inside the folder, or refused ---------------------------

STORAGES = ("safetensors", "parquet", "npy")


@pytest.fixture(scope="module")
def stores(folder: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Per format, a folder holding ``f.*`` (three shards of 4, 4 and 1 rows) and the
    two parts ``p.part{0,1}of2.*``: copied by each test that damages them."""
    made = {}
    for storage in STORAGES:
        root = tmp_path_factory.mktemp(f"base-{storage}")
        _extract(folder, root / f"f.{storage}", flush_every=4)
        for i in range(2):
            _extract(folder, root / f"p.{storage}", shard=f"{i}/2")
        made[storage] = root
    return made


def _copy(stores: dict[str, Path], storage: str, tmp_path: Path) -> Path:
    import shutil

    target = tmp_path / "store"
    shutil.copytree(stores[storage], target, symlinks=True)
    return target


BAD_NAMES = ["dotdot", "dotdot-alone", "absolute", "slash", "backslash", "symlink-out"]


def _plant_bad_name(store: Path, index: Path, kind: str) -> str:
    """Valid copies of shard 0 (its level file for npy) outside the store's folder
    and in a subfolder, named from ``index`` the ``kind`` way; returns the name
    the index now gives (the message must show it)."""
    import shutil

    record = json.loads(index.read_text())
    files = record["shards"][0]["files"]
    role = "level_4" if "level_4" in files else "shard"
    original = files[role]
    outside = store.parent / "outside"
    outside.mkdir(exist_ok=True)
    shutil.copy(store / original, outside / original)
    inner = store / "sub"
    inner.mkdir(exist_ok=True)
    shutil.copy(store / original, inner / original)
    if kind == "symlink-out":
        (store / original).unlink()
        (store / original).symlink_to(outside / original)
        return original
    name = {
        "dotdot": f"../outside/{original}",
        "dotdot-alone": "..",
        "absolute": str(outside / original),
        "slash": f"sub/{original}",
        "backslash": f"..\\outside\\{original}",
    }[kind]
    files[role] = name
    index.write_text(json.dumps(record))
    return name


def _snapshot(root: Path) -> dict[str, object]:
    """Every file and link under ``root``, with its bytes or target."""
    return {
        str(p.relative_to(root)): str(p.readlink()) if p.is_symlink() else p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_symlink() or p.is_file()
    }


def _refused_as_unsafe(call: Callable[[], object], index: Path, name: str) -> None:
    with pytest.raises(unifeat.StoreError) as caught:
        call()
    assert isinstance(caught.value, ValueError)
    message = str(caught.value)
    assert index.name in message, message
    assert repr(name) in message, message
    assert "plain file name inside" in message, message


@pytest.mark.parametrize("kind", BAD_NAMES)
@pytest.mark.parametrize("storage", STORAGES)
def test_shard_names_leading_outside_the_folder_are_refused_by_every_reader(
    storage: str, kind: str, stores: dict[str, Path], folder: Path, tmp_path: Path
) -> None:
    store = _copy(stores, storage, tmp_path)
    index = store / "f.index.json"
    name = _plant_bad_name(store, index, kind)
    before = _snapshot(tmp_path)
    _refused_as_unsafe(lambda: unifeat.load_features(store / f"f.{storage}"), index, name)
    _refused_as_unsafe(lambda: unifeat.load_matrix(index, level=4), index, name)
    _refused_as_unsafe(lambda: _extract(folder, store / f"f.{storage}"), index, name)
    # Nothing was changed or removed, inside the folder or out.
    assert _snapshot(tmp_path) == before
    # The parts of a split, read by merge.
    part = store / "p.part1of2.index.json"
    name = _plant_bad_name(store, part, kind)
    _refused_as_unsafe(lambda: unifeat.merge_features([], store / f"p.{storage}"), part, name)
    assert not (store / "p.index.json").exists()


def test_a_symlink_to_a_file_inside_the_folder_is_read(
    stores: dict[str, Path], tmp_path: Path, reference: dict
) -> None:
    store = _copy(stores, "safetensors", tmp_path)
    (store / "f.00000.safetensors").rename(store / "real.safetensors")
    (store / "f.00000.safetensors").symlink_to("real.safetensors")
    assert unifeat.load_features(store / "f.safetensors")["paths"] == reference["paths"]


def test_index_entries_that_are_not_file_names_are_refused(
    stores: dict[str, Path], tmp_path: Path
) -> None:
    store = _copy(stores, "parquet", tmp_path)
    index = store / "f.index.json"
    for bad in (3, None, "", ["f.00000.parquet"]):
        record = json.loads(index.read_text())
        record["shards"][0]["files"]["shard"] = bad
        index.write_text(json.dumps(record))
        with pytest.raises(unifeat.StoreError, match=r"f\.index\.json.*shard 0"):
            unifeat.load_features(index)


# -- damaged shards: named with their rows, repaired by a rerun ---------------------------

DAMAGES = ["empty", "in-length", "in-header", "in-data", "garbled-middle", "garbled-end"]


def _damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "empty":
        data = bytearray()
    elif how == "in-length":  # inside safetensors' 8-byte header length, npy's magic
        data = data[:4]
    elif how == "in-header":
        data = data[:20]
    elif how == "in-data":
        data = data[: len(data) - 5]
    else:  # a few bytes overwritten, the size unchanged
        at = len(data) // 2 if how == "garbled-middle" else len(data) - 24
        data[at : at + 4] = bytes(b ^ 0x5A for b in data[at : at + 4])
    path.write_bytes(bytes(data))


def _by_path(features: dict) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return {
        p: (features["level_3"][i].numpy(), features["level_4"][i].numpy())
        for i, p in enumerate(features["paths"])
    }


def _damaged_file(store: Path, storage: str, role: str = "level") -> Path:
    if storage == "npy":
        return store / ("f.00001.level_4.npy" if role == "level" else "f.00001.paths.npy")
    return store / f"f.00001.{storage}"


@pytest.mark.parametrize("how", DAMAGES)
@pytest.mark.parametrize(
    ("storage", "role"),
    [("safetensors", "level"), ("parquet", "level"), ("npy", "level"), ("npy", "paths")],
)
def test_a_damaged_shard_is_named_with_its_rows_and_a_rerun_repairs_it(
    storage: str,
    role: str,
    how: str,
    stores: dict[str, Path],
    folder: Path,
    tmp_path: Path,
    reference: dict,
    capsys: pytest.CaptureFixture[str],
) -> None:
    store = _copy(stores, storage, tmp_path)
    damaged = _damaged_file(store, storage, role)
    _damage(damaged, how)
    output = store / f"f.{storage}"
    for read in (lambda: unifeat.load_features(output), lambda: unifeat.load_matrix(output, 4)):
        with pytest.raises(unifeat.StoreError) as caught:
            read()
        message = str(caught.value)
        assert damaged.name in message, message
        assert "rows 4 to 7" in message, message
        assert "img2.png" in message and "img7.png" in message, message  # first and last
        assert "rerun the extract command" in message, message
    capsys.readouterr()
    result = _extract(folder, output)
    assert (result.written, result.skipped) == (4, READABLE - 4)
    assert "damaged" in capsys.readouterr().err
    repaired = unifeat.load_features(output)
    assert sorted(repaired["paths"]) == sorted(reference["paths"])
    want = _by_path(reference)
    for path, (level_3, level_4) in _by_path(repaired).items():
        assert np.array_equal(level_3, want[path][0]) and np.array_equal(level_4, want[path][1])
    assert [Path(p).name for p, _ in repaired["failed"]] == ["corrupt.jpg", "truncated.png"]


def test_a_damaged_shard_is_re_extracted_from_any_listing_that_holds_its_images(
    stores: dict[str, Path], folder: Path, tmp_path: Path
) -> None:
    store = _copy(stores, "safetensors", tmp_path)
    output = store / "f.safetensors"
    # Shard 1 holds nested/img2, img4, img5 and img7: the nested folder alone will do.
    _damage(store / "f.00001.safetensors", "empty")
    assert _extract(folder / "nested", output).written == 4
    # Shard 0 holds img0, img3, img6 and nested/img1: the nested folder lacks three.
    _damage(store / "f.00000.safetensors", "in-data")
    before = {p.name: p.read_bytes() for p in store.iterdir() if p.is_file()}
    with pytest.raises(unifeat.StoreError, match=r"f\.00000\.safetensors.*rows 0 to 3"):
        _extract(folder / "nested", output)
    assert {p.name: p.read_bytes() for p in store.iterdir() if p.is_file()} == before
    assert _extract(folder, output).written == 4
    assert len(unifeat.load_features(output)["paths"]) == READABLE


@pytest.mark.parametrize("storage", ["safetensors", "npy"])
def test_a_store_written_before_checksums_still_loads_and_names_damage(
    storage: str, stores: dict[str, Path], folder: Path, tmp_path: Path, reference: dict
) -> None:
    """Indexes of unifeat 0.1.0 record no sizes, CRCs or image digests."""
    store = _copy(stores, storage, tmp_path)
    index = store / "f.index.json"
    record = json.loads(index.read_text())
    for shard in record["shards"]:
        for key in ("bytes", "crc32", "first", "last", "images_digest"):
            del shard[key]
    index.write_text(json.dumps(record))
    assert unifeat.load_features(index)["paths"] == reference["paths"]
    _damage(_damaged_file(store, storage), "in-data")
    with pytest.raises(unifeat.StoreError, match=r"rows 4 to 7 \(4 images"):
        unifeat.load_features(index)
    if storage == "npy":  # the paths file is intact: the rows are known, and re-extracted
        assert _extract(folder, store / "f.npy").written == 4
        assert sorted(unifeat.load_features(index)["paths"]) == sorted(reference["paths"])
    else:
        with pytest.raises(unifeat.StoreError, match="does not record which images"):
            _extract(folder, store / "f.safetensors")


def test_damaged_shards_of_two_runs_whose_images_interleave_are_repaired_together(
    folder: Path, tmp_path: Path, reference: dict
) -> None:
    """A first run over three images, a second over the folder: the second run's
    shards hold images sorted between the first run's, so neither damaged shard's
    range alone holds exactly its images; together they do."""
    import pickle

    out = tmp_path / "f.safetensors"
    first = [folder / "img0.png", folder / "nested" / "img2.png", folder / "nested" / "img5.png"]
    unifeat.extract("tv:resnet18", first, out, **{**SMALL, "flush_every": 3})
    _extract(folder, out, flush_every=3)
    index = json.loads((tmp_path / "f.index.json").read_text())
    spans = [(s["first"], s["last"]) for s in index["shards"]]
    assert spans[0][0] < spans[1][0] < spans[0][1]  # the ranges overlap
    for number in (0, 1):
        _damage(tmp_path / f"f.0000{number}.safetensors", "garbled-middle")
    with pytest.raises(unifeat.StoreError) as caught:
        unifeat.load_features(out)
    again = pickle.loads(pickle.dumps(caught.value))
    assert str(again) == str(caught.value) and again.file == caught.value.file
    assert _extract(folder, out).written == 6
    want = _by_path(reference)
    for path, (level_3, level_4) in _by_path(unifeat.load_features(out)).items():
        assert np.array_equal(level_3, want[path][0]) and np.array_equal(level_4, want[path][1])


def test_merge_names_a_damaged_part(stores: dict[str, Path], tmp_path: Path) -> None:
    store = _copy(stores, "parquet", tmp_path)
    _damage(store / "p.part1of2.00000.parquet", "in-data")
    with pytest.raises(unifeat.StoreError, match=r"p\.part1of2\.00000\.parquet.*rows 0 to"):
        unifeat.merge_features([], store / "p.parquet")


# -- where the output goes ---------------------------------------------------------------


@pytest.mark.parametrize("form", ["path", "str", "str-slash"])
def test_an_existing_folder_as_output_is_written_inside(
    form: str, folder: Path, tmp_path: Path, reference: dict
) -> None:
    out = tmp_path / "outdir"
    out.mkdir()
    given = {"path": out, "str": str(out), "str-slash": f"{out}/"}[form]
    result = _extract(folder, given, flush_every=5)
    assert result.index_path == out / "features.index.json"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["outdir"]
    assert sorted(p.name for p in out.iterdir()) == [
        "features.00000.safetensors",
        "features.00001.safetensors",
        "features.index.json",
    ]
    for read in (given, out / "features.index.json", out / "features.safetensors"):
        assert unifeat.load_features(read)["paths"] == reference["paths"]
    assert _extract(folder, given).written == 0  # resumes in the same place


def test_a_folder_output_takes_the_format_asked_for_and_keeps_it(
    folder: Path, tmp_path: Path, reference: dict
) -> None:
    out = tmp_path / "outdir"
    out.mkdir()
    _extract(folder, out, format="parquet", flush_every=100)
    files = sorted(p.name for p in out.iterdir())
    assert files == ["features.00000.parquet", "features.index.json"]
    # A rerun without format= resumes the parquet store, whatever the default.
    assert _extract(folder, out).written == 0
    assert np.array_equal(unifeat.load_matrix(out, 4), reference["level_4"].numpy())


def test_a_path_ending_in_a_separator_is_a_folder_even_when_new(
    folder: Path, tmp_path: Path
) -> None:
    _extract(folder, f"{tmp_path / 'new'}/")
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == [
        "features.00000.safetensors",
        "features.index.json",
    ]


def test_the_cli_writes_inside_an_existing_folder(folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "outdir"
    out.mkdir()
    args = ["extract", "tv:resnet18", str(folder), "-o", f"{out}/", "--random-init"]
    assert main([*args, "--input-size", "32", "--no-progress", "--format", "npy"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["outdir"]
    assert (out / "features.index.json").exists() and (out / "features.00000.paths.npy").exists()
    assert len(unifeat.load_features(out)["paths"]) == READABLE


def test_a_folder_without_the_default_store_names_the_ones_it_holds(
    folder: Path, tmp_path: Path
) -> None:
    _extract(folder, tmp_path / "mine.parquet", out_indices=(-1,))
    with pytest.raises(unifeat.StoreError, match=r"features\.index\.json.*'mine\.index\.json'"):
        unifeat.load_features(tmp_path)


# -- what the images are -----------------------------------------------------------------


@pytest.mark.parametrize("form", [str, Path])
def test_one_image_folder_given_alone_is_that_folder(
    form: Callable[[Path], object], folder: Path, tmp_path: Path, reference: dict
) -> None:
    result = unifeat.extract("tv:resnet18", form(folder), tmp_path / "f.npy", **SMALL)
    assert result.written == READABLE
    assert unifeat.load_features(tmp_path / "f.npy")["paths"] == reference["paths"]
    one = reference["paths"][0]
    assert unifeat.extract("tv:resnet18", form(one), tmp_path / "g.npy", **SMALL).written == 1


@pytest.mark.parametrize("images", [3, b"photos", [3]])
def test_images_that_are_not_paths_are_refused(images: object, tmp_path: Path) -> None:
    with pytest.raises(unifeat.UnsupportedOptionError, match="images"):
        unifeat.extract("tv:resnet18", images, tmp_path / "f.npy", **SMALL)  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []
