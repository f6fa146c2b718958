"""Category (c): files and directories.

``checkpoint_path`` files that are missing, empty, corrupt, truncated, in
another format, pickles of something else (a whole module, code to run) or
another model's weights; ``hf:`` directories that are missing, not a directory,
without a ``config.json``, with a corrupt one, or holding a model that is not a
vision model. Each is a unifeat error that names the file and says what would
be valid (a state dict saved with ``torch.save`` or a ``.safetensors`` file; a
transformers model directory). Nothing in a file is ever executed.
"""

from __future__ import annotations

import json
import pathlib
import pickle
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import unifeat
from unifeat import CheckpointError, UnknownModelError, UnsupportedOptionError

from ._support import (
    BACKENDS,
    HF_CNN,
    HF_VIT,
    MODULE,
    Backend,
    TinyNet,
    maps_of,
    param,
    refused,
)


@pytest.fixture(autouse=True)
def _no_traceback_on_stderr(capfd: pytest.CaptureFixture[str]) -> Any:
    yield
    assert "Traceback" not in capfd.readouterr().err


class _Touch:
    """Unpickling this creates a marker file: proof that a file ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> Any:
        return (pathlib.Path.touch, (self.marker,))


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every file and directory the rows below point at."""
    root = tmp_path_factory.mktemp("files")
    torch.manual_seed(0)
    state = TinyNet().state_dict()
    torch.save(state, root / "good.pth")
    save_file(state, str(root / "good.safetensors"))
    (root / "a_dir").mkdir()
    (root / "empty.pth").write_bytes(b"")
    (root / "garbage.pth").write_bytes(b"not a checkpoint at all")
    pth = (root / "good.pth").read_bytes()
    (root / "truncated.pth").write_bytes(pth[: len(pth) // 2])
    safetensors = (root / "good.safetensors").read_bytes()
    (root / "truncated.safetensors").write_bytes(safetensors[: len(safetensors) // 2])
    (root / "pickle_named.safetensors").write_bytes(pth)
    (root / "safetensors_named.pth").write_bytes(safetensors)
    (root / "json.pth").write_text(json.dumps({"conv1.weight": [1, 2, 3]}))
    np.save(root / "numpy.npy", np.zeros((3, 3), dtype=np.float32))
    torch.save(TinyNet(), root / "whole_module.pth")
    with open(root / "code.pth", "wb") as handle:
        pickle.dump({"state_dict": _Touch(root / "EXECUTED")}, handle)
    torch.save([1, 2, 3], root / "list.pth")
    torch.save({"epoch": 3, "lr": 0.1}, root / "no_tensors.pth")
    torch.save({}, root / "empty_dict.pth")
    torch.save({"epoch": 3, "model": state}, root / "nested.pth")
    torch.save({f"module.{k}": v for k, v in state.items()}, root / "ddp_prefixed.pth")
    torch.save(
        {k: v.half() if v.is_floating_point() else v for k, v in state.items()}, root / "half.pth"
    )
    torch.save(HF_CNN.source().state_dict(), root / "hf_resnet_weights.pth")
    return root


# -- checkpoint_path: one file format after another (the reader is shared: TinyNet) --------

READ_ROWS = [
    param(
        "missing.pth",
        [r"missing\.pth", r"does not exist"],
        id="missing",
    ),
    param(
        "a_dir",
        [r"a_dir", r"directory|not a file"],
        id="directory",
    ),
    param(
        "empty.pth",
        [r"empty\.pth", r"\bempty\b.*state.dict|state.dict.*\bempty\b"],
        id="empty-file",
    ),
    param("garbage.pth", [r"garbage\.pth", r"state.dict"], id="garbage"),
    param(
        "truncated.pth",
        [r"truncated\.pth", r"state.dict"],
        id="truncated-pth",
    ),
    param(
        "truncated.safetensors",
        [r"truncated\.safetensors", r"state.dict"],
        id="truncated-safetensors",
    ),
    param(
        "pickle_named.safetensors",
        [r"pickle_named\.safetensors", r"state.dict"],
        id="pickle-named-safetensors",
    ),
    param("json.pth", [r"json\.pth", r"state.dict"], id="json"),
    param("numpy.npy", [r"numpy\.npy", r"state.dict"], id="numpy"),
    param(
        "whole_module.pth",
        [r"whole_module\.pth", r"state_dict\(\)"],
        id="pickled-module",
    ),
    param("list.pth", [r"list\.pth", r"no state dict"], id="list"),
    param("no_tensors.pth", [r"no_tensors\.pth", r"no state dict"], id="no-tensors"),
    param("empty_dict.pth", [r"empty_dict\.pth", r"does not fit", r"missing"], id="empty-dict"),
    param(
        "hf_resnet_weights.pth",
        [
            r"does not fit",
            r"module TinyNet \(backend 'fx'\)",
            r"missing: stem\.0\.weight",
            r"unexpected",
        ],
        id="foreign-weights",
    ),
]


@pytest.mark.parametrize(("name", "patterns"), READ_ROWS)
def test_checkpoint_refused(files: Path, name: str, patterns: list[str]) -> None:
    refused(lambda: MODULE.create(checkpoint_path=files / name), CheckpointError, patterns)


def test_checkpoint_code_is_never_run(files: Path) -> None:
    refused(
        lambda: MODULE.create(checkpoint_path=files / "code.pth"), CheckpointError, r"code\.pth"
    )
    assert not (files / "EXECUTED").exists()


def test_safetensors_content_under_a_pth_name(files: Path) -> None:
    """Either read by its content, or refused with a message that says what it is."""
    try:
        model = MODULE.create(checkpoint_path=files / "safetensors_named.pth")
    except CheckpointError as error:
        assert re.search(r"safetensors_named\.pth", str(error))
        assert re.search(r"\bsafetensors\b(?!_named)", str(error)), str(error)
    else:
        torch.manual_seed(0)
        expected = TinyNet().state_dict()
        assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    "name",
    ["good.pth", "good.safetensors", "nested.pth", "ddp_prefixed.pth", "half.pth"],
)
def test_checkpoint_forms_that_load(files: Path, name: str) -> None:
    """Controls: the wrappers training scripts write are unwrapped, dtypes are cast."""
    torch.manual_seed(0)
    expected = TinyNet().state_dict()
    model = MODULE.create(checkpoint_path=files / name)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, expected[key].to(value.dtype), atol=1e-3, rtol=1e-3)


# -- the same rules on every backend ------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b.id)
def test_missing_checkpoint_on_every_backend(files: Path, backend: Backend) -> None:
    refused(
        lambda: backend.create(checkpoint_path=files / "missing.pth"),
        CheckpointError,
        [r"missing\.pth", r"does not exist"],
    )


@pytest.mark.parametrize("backend", [param(b, id=b.id) for b in BACKENDS])
def test_empty_checkpoint_on_every_backend(files: Path, backend: Backend) -> None:
    refused(
        lambda: backend.create(checkpoint_path=files / "empty.pth"),
        CheckpointError,
        [r"empty\.pth", r"\bempty\b.*state.dict|state.dict.*\bempty\b"],
    )


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b.id)
def test_foreign_checkpoint_on_every_backend(files: Path, backend: Backend) -> None:
    foreign = "hf_resnet_weights.pth" if backend is not HF_CNN else "good.pth"
    refused(
        lambda: backend.create(checkpoint_path=files / foreign),
        CheckpointError,
        [re.escape(foreign), r"does not fit", backend.named, r"missing", r"unexpected"],
    )


@pytest.mark.parametrize(
    "backend",
    [param(b, id=b.id) for b in BACKENDS],
)
def test_a_feature_models_own_weights_load_back(tmp_path: Path, backend: Backend) -> None:
    """Save a pruned feature model's weights; the same call with checkpoint_path=
    gives the same model back (the pruned modules' keys are not needed)."""
    indices = (0, 1)
    saved = backend.create(out_indices=indices).eval()
    torch.save(saved.state_dict(), tmp_path / "features.pth")
    loaded = backend.create(out_indices=indices, checkpoint_path=tmp_path / "features.pth").eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        for a, b in zip(maps_of(saved(x)), maps_of(loaded(x)), strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b.id)
def test_a_feature_models_weights_do_not_fit_a_deeper_one(tmp_path: Path, backend: Backend) -> None:
    """Keys that only the modules after level 1 hold may be missing for levels
    (0, 1), not for a model that also computes level 2: feature_info and
    create_model both refuse it, naming the missing keys."""
    torch.save(backend.create(out_indices=(0, 1)).state_dict(), tmp_path / "features.pth")
    for call in (backend.info, backend.create):
        refused(
            lambda call=call: call(
                out_indices=(0, 1, 2), checkpoint_path=tmp_path / "features.pth"
            ),
            CheckpointError,
            [r"features\.pth", r"does not fit", r"missing"],
        )


# -- hf: directories -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_dirs(files: Path) -> Path:
    from transformers import BertConfig, BertModel, ViTConfig, ViTModel

    root = files / "hf"
    root.mkdir()
    torch.manual_seed(0)
    ViTModel(ViTConfig(**HF_VIT)).save_pretrained(root / "vit")
    config = (root / "vit" / "config.json").read_text()
    (root / "empty_dir").mkdir()
    (root / "corrupt_config").mkdir()
    (root / "corrupt_config" / "config.json").write_text("{not json")
    (root / "no_model_type").mkdir()
    (root / "no_model_type" / "config.json").write_text(json.dumps({"hidden_size": 8}))
    (root / "unknown_type").mkdir()
    (root / "unknown_type" / "config.json").write_text(json.dumps({"model_type": "no_such_type"}))
    (root / "no_weights").mkdir()
    (root / "no_weights" / "config.json").write_text(config)
    (root / "corrupt_weights").mkdir()
    (root / "corrupt_weights" / "config.json").write_text(config)
    (root / "corrupt_weights" / "model.safetensors").write_bytes(b"not safetensors")
    bert = BertConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
    )
    BertModel(bert).save_pretrained(root / "bert")
    return root


HF_DIR_ROWS = [
    ("missing", "missing_dir", UnknownModelError, [r"missing_dir", r"does not exist|no such"]),
    ("a-file", "../good.pth", UnknownModelError, [r"good\.pth", r"not a directory"]),
    ("no-config", "empty_dir", UnknownModelError, [r"empty_dir", r"config\.json"]),
    ("corrupt-config", "corrupt_config", CheckpointError, [r"corrupt_config", r"config\.json"]),
    ("no-model_type", "no_model_type", UnknownModelError, [r"no_model_type", r"model_type"]),
    ("unknown-model_type", "unknown_type", UnknownModelError, [r"'no_such_type'", r"vit"]),
    ("not-vision", "bert", UnsupportedOptionError, [r"'bert'", r"vision", r"vit"]),
]


@pytest.mark.parametrize(
    ("row", "entry"),
    [
        param(
            row,
            entry,
            id=f"{entry}-{row[0]}",
        )
        for row in HF_DIR_ROWS
        for entry in ("create_model", "feature_info")
    ],
)
def test_hf_directory_refused(hf_dirs: Path, row: Any, entry: str) -> None:
    _row_id, name, expected, patterns = row
    path = f"hf:{hf_dirs / name}"
    if entry == "create_model":
        refused(lambda: unifeat.create_model(path, features_only=True), expected, patterns)
    else:
        refused(lambda: unifeat.feature_info(path), expected, patterns)


def test_hf_relative_missing_directory_refused() -> None:
    refused(
        lambda: unifeat.create_model("hf:./no_such_dir_xyz", features_only=True),
        UnknownModelError,
        [r"no_such_dir_xyz", r"does not exist|no such"],
    )


@pytest.mark.parametrize(
    ("name", "patterns"),
    [
        param(
            "no_weights",
            [r"no_weights", r"safetensors|weights"],
            id="no-weights",
        ),
        param(
            "corrupt_weights",
            [r"corrupt_weights", r"model\.safetensors"],
            id="corrupt-weights",
        ),
    ],
)
def test_hf_directory_weights_refused(hf_dirs: Path, name: str, patterns: list[str]) -> None:
    refused(
        lambda: unifeat.create_model(f"hf:{hf_dirs / name}", features_only=True, pretrained=True),
        CheckpointError,
        patterns,
    )


def test_hf_directory_that_is_fine(hf_dirs: Path) -> None:
    """Control: a saved model directory builds, from its config or with its weights."""
    path = f"hf:{hf_dirs / 'vit'}"
    info = unifeat.feature_info(path)
    assert info == unifeat.create_model(path, features_only=True).feature_info
    assert info.channels() == [32, 32, 32]
    loaded = unifeat.create_model(path, features_only=True, pretrained=True).state_dict()
    saved = load_file(str(hf_dirs / "vit" / "model.safetensors"))
    shared = [key for key in saved if key in loaded]
    assert shared and all(torch.equal(saved[key], loaded[key]) for key in shared)
