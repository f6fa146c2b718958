"""The command line: the README's main job, exit codes and messages."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from unifeat._cli import main


def test_info_prints_the_level_table(capsys):
    assert main(["info", "resnet50"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "resnet50 (timm): 5 levels, input 3x224x224, out_indices=(0, 1, 2, 3, 4)"
    assert out[1].split() == ["index", "module", "channels", "reduction", "output", "shape"]
    assert out[-1].split() == ["*", "4", "layer4", "2048", "32", "2048x7x7"]


def test_info_json_has_exact_shapes_from_the_meta_device(capsys):
    assert (
        main(
            [
                "info",
                "timm:convnext_atto",
                "--output-stride",
                "16",
                "--input-size",
                "96",
                "--out-indices",
                "-1",
                "1",
                "--json",
            ]
        )
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    assert report["out_indices"] == [1, 3]
    assert [lv["reduction"] for lv in report["levels"]] == [4, 8, 16, 16]
    assert [lv["shape"] for lv in report["levels"] if lv["selected"]] == [[80, 12, 12], [320, 6, 6]]


def test_list(capsys):
    assert main(["list", "resnet1?", "--backend", "timm"]) == 0
    assert capsys.readouterr().out.split() == ["resnet18"]
    assert main(["list", "convnext_atto*"]) == 0
    assert "timm:convnext_atto" in capsys.readouterr().out.split()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["info", "resnet5O"], "unknown model 'resnet5O'.*close matches: timm:resnet50"),
        (["info", "resnet50", "--out-indices", "7"], r"out of range.*0\.\.4 or -5\.\.-1"),
        (["info", "vit_tiny_patch16_224", "--output-stride", "8"], "supported values are 16"),
        (["list", "--backend", "caffe"], "unknown backend 'caffe'"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0]
    assert __import__("re").search(message, err[0])


def test_debug_shows_the_traceback(capsys):
    assert main(["--debug", "info", "resnet5O"]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_argparse_errors_exit_2():
    with pytest.raises(SystemExit) as exit_info:
        main(["info"])
    assert exit_info.value.code == 2


def test_python_dash_m_runs_the_same_command():
    done = subprocess.run(
        [sys.executable, "-m", "unifeat", "info", "resnet18"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "layer4" in done.stdout and "512x7x7" in done.stdout


def test_runtime_failures_exit_1_with_one_line():
    """timm's hf-hub: names pass through to timm, whose hub loading fails offline."""
    env = {**__import__("os").environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "unifeat", "info", "timm:hf-hub:unifeat-tests/no-such-model"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "--debug" in lines[0] and "Traceback" not in done.stderr
