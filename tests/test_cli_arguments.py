"""Command-line arguments are checked up front: a bad value exits 2 with one line that
names it and what is valid, before any model is built or file written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from unifeat._cli import main


@pytest.fixture
def image(tmp_path: Path) -> Path:
    Image.new("RGB", (32, 32), "teal").save(tmp_path / "a.png")
    return tmp_path / "a.png"


def _exit_and_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str]]:
    try:
        code = main(argv)
    except SystemExit as exit_info:  # argparse's own checks
        code = int(exit_info.code or 0)
    return code, capsys.readouterr().err.strip().splitlines()


EXTRACT = ["extract", "tv:resnet18", "IMAGE", "-o", "OUT", "--random-init"]
SHOW = ["show", "tv:resnet18", "IMAGE", "-o", "OUT"]

# (arguments, text the one line must contain)
BAD = [
    (
        ["info", "resnet18", "--input-size", "-5"],
        "--input-size: -5 is out of range: expected 1 to 8192",
    ),
    (["info", "resnet18", "--input-size", "0"], "out of range"),
    (["info", "resnet18", "--input-size", "100000"], "expected 1 to 8192"),
    (["info", "resnet18", "--input-size", "big"], "invalid integer 'big'"),
    (["info", "resnet18", "--output-stride", "0"], "--output-stride: 0 is out of range"),
    (["info", "resnet18", "--out-indices", "x"], "invalid int value: 'x'"),
    ([*EXTRACT, "--num-workers", "-1"], "--num-workers: -1 is out of range: expected 0 to 1024"),
    ([*EXTRACT, "--batch-size", "0"], "--batch-size: 0 is out of range"),
    ([*EXTRACT, "--flush-every", "0"], "--flush-every: 0 is out of range"),
    ([*EXTRACT, "--device", "gpu"], "--device: invalid device 'gpu'"),
    ([*EXTRACT, "--device", "cuda:7"], "--device: device 'cuda:7'"),
    ([*EXTRACT, "--pool", "median"], "invalid choice: 'median'"),
    ([*EXTRACT, "--format", "csv"], "invalid choice: 'csv'"),
    ([*EXTRACT, "--dtype", "int8"], "invalid choice: 'int8'"),
    ([*EXTRACT, "--engine", "spark"], "invalid choice: 'spark'"),
    ([*EXTRACT, "--shard", "3/3"], "--shard: invalid value '3/3': expected I/N with 0 <= I < N"),
    ([*EXTRACT, "--shard", "1"], "--shard: invalid value '1'"),
    ([*EXTRACT, "--address", "auto"], "--address only applies with --engine ray"),
    ([*EXTRACT, "--seed", "-1"], "--seed: -1 is out of range"),
    ([*EXTRACT, "--input-size", "32", "32", "32"], "--input-size takes H [W], not 3 values"),
    (["extract", "tv:resnet18", "IMAGE", "-o", "OUT"], "refusing to extract"),
    ([*EXTRACT, "--pretrained"], "contradicts"),
    (
        [
            "extract",
            "tv:resnet18",
            "IMAGE",
            "-o",
            "OUT.parquet",
            "--format",
            "npy",
            "--random-init",
        ],
        "ends in .parquet but format='npy'",
    ),
    ([*SHOW, "--channels", "0"], "--channels: 0 is out of range: expected 1 to 64"),
    ([*SHOW, "--channels", "100000"], "expected 1 to 64"),
    ([*SHOW, "--level", "9"], "out of range"),
    (["merge", "-o", "OUT"], "no parts to merge"),
    (["list", "--backend", "caffe"], "unknown backend 'caffe'"),
    (["nodes", "tv:resnet18", "--mode", "test"], "invalid choice: 'test'"),
]


@pytest.mark.parametrize(("argv", "message"), BAD, ids=[" ".join(a[:1] + a[3:]) for a, _ in BAD])
def test_bad_arguments_exit_2_with_one_line(
    argv: list[str], message: str, image: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [
        a.replace("IMAGE", str(image)).replace("OUT", str(tmp_path / "out" / "f.npy"))
        if a.startswith(("IMAGE", "OUT"))
        else a
        for a in argv
    ]
    code, err = _exit_and_error(argv, capsys)
    assert code == 2
    assert len(err) == 1, err
    assert message in err[0] and "Traceback" not in err[0]
    assert not (tmp_path / "out").exists()  # nothing was written


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_is_accepted_before_and_after_the_command(
    where: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["info", "resnt50"]
    argv = ["--debug", *argv] if where == "before" else [*argv, "--debug"]
    code, err = _exit_and_error(argv, capsys)
    assert code == 2
    assert err[0] == "Traceback (most recent call last):"
    assert "unknown model 'resnt50'" in err[-1]


def test_no_traceback_without_debug(capsys: pytest.CaptureFixture[str]) -> None:
    code, err = _exit_and_error(["info", "resnt50"], capsys)
    assert code == 2 and len(err) == 1 and "resnet50" in err[0]


def test_argparse_errors_are_one_line_in_a_real_process() -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "unifeat",
            "show",
            "tv:resnet18",
            "x.png",
            "-o",
            "y.png",
            "--channels",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "unifeat show: error: argument --channels: 0 is out of range: expected 1 to 64 "
        "(see unifeat show --help)"
    ]


def test_valid_bounds_are_accepted(image: Path, tmp_path: Path) -> None:
    assert (
        main(
            [
                "show",
                "tv:resnet18",
                str(image),
                "-o",
                str(tmp_path / "g.png"),
                "--channels",
                "64",
                "--input-size",
                "32",
                "--level",
                "4",
            ]
        )
        == 0
    )
    with Image.open(tmp_path / "g.png") as picture:
        assert picture.size[0] == 65 * 96
