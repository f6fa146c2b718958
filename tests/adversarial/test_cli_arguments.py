"""Category (g): arguments and exit codes of ``unifeat info``, ``list`` and ``nodes``.

``unifeat._cli.main(argv)`` gives the exit code: 0 success, 2 a bad argument
(including an unknown model, an invalid option, a value out of bounds), 1 a
failure while running. A refused command prints exactly one ``error:`` line
(argparse may print its usage above it) that names the bad value, nothing on
stdout, and no traceback unless ``--debug`` is given, wherever it is given.

argparse's own refusals raise ``SystemExit(2)`` instead of returning: the
process exit code is the same, so both count as the exit code here.
(``extract`` and ``show`` are covered with the extraction tests.)
"""

from __future__ import annotations

import re
from typing import Any

import pytest

import unifeat
from unifeat._cli import main

from ._support import param


def run(argv: list[str], capfd: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = 0 if exit_.code is None else int(exit_.code)
    out, err = capfd.readouterr()
    return code, out, err


def _error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, f"expected one error line, got: {err!r}"
    return lines[0]


# -- refused: exit 2, one line -----------------------------------------------------------

BAD_ROWS = [
    param(
        ["info", "resnet18", "--input-size", "-5"],
        [r"--input-size", r"-5"],
        id="input-size-negative",
    ),
    param(
        ["info", "resnet18", "--input-size", "0"],
        [r"--input-size", r"\b0\b"],
        id="input-size-zero",
    ),
    param(
        ["info", "resnet18", "--input-size", "1", "2", "3"],
        [r"--input-size", r"1,? 2,? 3"],
        id="input-size-three-values",
    ),
    param(
        ["info", "resnet18", "--input-size", "x"],
        [r"--input-size", r"'x'"],
        id="input-size-not-int",
    ),
    param(
        ["info", "resnet18", "--out-indices", "x"],
        [r"--out-indices", r"'x'"],
        id="out-indices-not-int",
    ),
    param(
        ["info", "resnet18", "--out-indices", "9"],
        [r"\b9\b", r"0\.\.4 or -5\.\.-1"],
        id="out-indices-out-of-range",
    ),
    param(
        ["info", "resnet18", "--out-indices", "1", "1"], [r"duplicate"], id="out-indices-duplicate"
    ),
    param(
        ["info", "resnet18", "--out-indices"],
        [r"--out-indices", r"expected at least one"],
        id="out-indices-missing-value",
    ),
    param(
        ["info", "resnet18", "--output-stride", "0"],
        [r"output.stride(=|:)?\s?0\b"],
        id="output-stride-zero",
    ),
    param(
        ["info", "resnet18", "--output-stride", "-8"],
        [r"output.stride(=|:)?\s?-8\b"],
        id="output-stride-negative",
    ),
    param(
        ["info", "resnet18", "--output-stride", "7"],
        [r"=7\b", r"8, 16 or 32"],
        id="output-stride-unsupported",
    ),
    param(
        ["info", "resnet18", "--output-stride", "1e3"],
        [r"--output-stride", r"'1e3'"],
        id="output-stride-not-int",
    ),
    param(
        ["info", "resnet18", "--backend", "caffe"],
        [r"'caffe'", r"known backends"],
        id="info-unknown-backend",
    ),
    param(
        ["info", "resnt18"], [r"'resnt18'", r"close matches: .*resnet18"], id="info-unknown-model"
    ),
    param(
        ["info", "hf:/nonexistent/unifeat_adversarial_dir"],
        [r"unifeat_adversarial_dir", r"does not exist|no such"],
        id="info-missing-hf-dir",
    ),
    param(["info"], [r"required: model"], id="info-no-model"),
    param(["info", "resnet18", "--bogus"], [r"--bogus"], id="unknown-flag"),
    param(["bogus"], [r"'bogus'", r"'info'"], id="unknown-command"),
    param([], [r"required"], id="no-command"),
    param(
        ["list", "--backend", "caffe"], [r"'caffe'", r"known backends"], id="list-unknown-backend"
    ),
    param(
        ["nodes", "tv:resnet18", "--mode", "test"],
        [r"'test'", r"'eval', 'train'"],
        id="nodes-bad-mode",
    ),
    param(["nodes", "no_such_model_xyz"], [r"'no_such_model_xyz'"], id="nodes-unknown-model"),
    param(["nodes", "tv:resnet18", "--backend", "caffe"], [r"'caffe'"], id="nodes-unknown-backend"),
]


@pytest.mark.parametrize(("argv", "patterns"), BAD_ROWS)
def test_bad_argument_exits_2_with_one_line(
    argv: list[str], patterns: list[str], capfd: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(argv, capfd)
    assert "Traceback" not in err, err
    assert code == 2, f"exit {code}; stderr: {err!r}; stdout: {out[:200]!r}"
    line = _error_line(err)
    for pattern in patterns:
        assert re.search(pattern, line), f"{pattern!r} not in {line!r}"
    assert out == ""


# -- fine: exit 0 --------------------------------------------------------------------------

GOOD_ROWS = [
    param(["info", "resnet18"], r"layer4\s+512\s+32\s+512x7x7", id="info"),
    param(
        ["info", "tv:resnet18", "--out-indices", "-1", "--json"],
        r'"out_indices": \[\s*4\s*\]',
        id="info-json",
    ),
    param(
        ["info", "resnet18", "--input-size", "32"],
        r"512x1x1",
        id="info-small-input",
    ),
    param(["list", "resnet1?", "--backend", "tv"], r"^resnet18$", id="list"),
    param(["nodes", "tv:resnet18", "--filter", "layer4.1.*"], r"layer4\.1\.relu_1", id="nodes"),
    param(
        ["nodes", "tv:resnet18", "--mode", "train", "--filter", "zzz*"], r"^$", id="nodes-no-match"
    ),
    # transformers models do not trace: their node names are module paths (docs/node-names.md).
    param(
        ["nodes", "hf:vit", "--filter", "embeddings.patch*"],
        r"^embeddings\.patch_embeddings\.projection$",
        id="nodes-hf-module-paths",
    ),
]


@pytest.mark.parametrize(("argv", "pattern"), GOOD_ROWS)
def test_good_arguments_exit_0_quietly(
    argv: list[str], pattern: str, capfd: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(argv, capfd)
    assert code == 0, err
    assert re.search(pattern, out, re.M), out
    assert err == ""


def test_version(capfd: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["--version"], capfd)
    assert code == 0 and out.strip() == f"unifeat {unifeat.__version__}"


# -- --debug, anywhere; runtime failures are exit 1 -----------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        pytest.param(["--debug", "info", "resnt18"], id="before-the-command"),
        pytest.param(["info", "resnt18", "--debug"], id="after-the-command"),
    ],
)
def test_debug_shows_the_traceback(argv: list[str], capfd: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(argv, capfd)
    assert code == 2
    assert "Traceback" in err
    assert re.search(r"unknown model 'resnt18'", err.strip().splitlines()[-1]), err


@pytest.mark.parametrize(
    ("argv", "target"),
    [
        pytest.param(["info", "resnet18"], "create_model", id="info"),
        pytest.param(["list", "resnet*"], "list_models", id="list"),
        pytest.param(["nodes", "tv:resnet18"], "get_node_names", id="nodes"),
    ],
)
def test_runtime_failure_exits_1_with_one_line(
    argv: list[str], target: str, capfd: pytest.CaptureFixture[str], monkeypatch: Any
) -> None:
    def boom(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("boom")

    monkeypatch.setattr(unifeat, target, boom)
    code, out, err = run(argv, capfd)
    assert code == 1 and out == ""
    assert "Traceback" not in err
    line = _error_line(err)
    assert "RuntimeError: boom" in line and "--debug" in line
