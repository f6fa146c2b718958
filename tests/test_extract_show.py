"""Batch extraction to disk, feature-map pictures, and their command lines, end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

import unifeat
from unifeat._cli import main
from unifeat._extract import preprocessing_for
from unifeat._show import LABEL, TILE


@pytest.fixture
def images(tmp_path: Path) -> Path:
    """Six readable images in nested folders, one unreadable file, one non-image."""
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    generator = torch.Generator().manual_seed(0)
    for i in range(6):
        pixels = (torch.rand(40 + i, 50, 3, generator=generator) * 255).to(torch.uint8).numpy()
        target = folder / ("sub" if i % 2 else "") / f"img{i}.png"
        Image.fromarray(pixels).save(target)
    (folder / "broken.jpg").write_bytes(b"not an image")
    (folder / "notes.txt").write_text("ignored")
    return folder


def _cli(*args: str) -> int:
    return main(list(args))


def test_cli_extract_writes_one_row_per_readable_image_and_resumes(
    images: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "out" / "feats.safetensors"
    common = ["tv:resnet18", str(images), "-o", str(output), "--input-size", "64", "--random-init"]
    assert (
        _cli("extract", *common, "--out-indices", "-1", "-2", "--batch-size", "4", "--no-progress")
        == 0
    )
    captured = capsys.readouterr()
    assert "wrote 6 images (0 already there, 1 unreadable)" in captured.out
    assert "skipped" in captured.err and "broken.jpg" in captured.err
    features = unifeat.load_features(tmp_path / "out" / "feats.index.json")
    assert len(features["paths"]) == 6 and not any("broken" in p for p in features["paths"])
    assert features["level_3"].shape == (6, 256) and features["level_4"].shape == (6, 512)
    # A rerun skips what is there; a new image is the only one written.
    Image.new("RGB", (30, 30), "red").save(images / "new.png")
    assert _cli("extract", *common, "--out-indices", "-1", "-2", "--no-progress") == 0
    assert "wrote 1 images (6 already there, 1 unreadable)" in capsys.readouterr().out
    index = json.loads((tmp_path / "out" / "feats.index.json").read_text())
    assert len(index["shards"]) == 2 and index["pool"] == "avg"
    assert len(unifeat.load_features(tmp_path / "out" / "feats.index.json")["paths"]) == 7


def test_extract_equals_a_hand_written_loop_whatever_the_batch_size(
    images: Path, tmp_path: Path
) -> None:
    """Against timm's own transform and model, not unifeat's: the loop a user writes."""
    import timm
    from timm.data import create_transform, resolve_data_config

    native = timm.create_model("resnet18").eval()
    model = unifeat.create_model(native, features_only=True, out_indices=(-1,))
    results = []
    for batch_size in (1, 4):
        out = tmp_path / f"b{batch_size}.safetensors"
        unifeat.extract(model, [images], out, batch_size=batch_size, progress=False)
        results.append(unifeat.load_features(tmp_path / f"b{batch_size}.index.json"))
    assert results[0]["paths"] == results[1]["paths"]
    torch.testing.assert_close(results[0]["level_4"], results[1]["level_4"], rtol=1e-5, atol=1e-5)
    transform = create_transform(**resolve_data_config({}, model=native))
    with torch.no_grad():
        by_hand = torch.cat(
            [
                native.forward_features(transform(Image.open(path).convert("RGB"))[None]).mean(
                    dim=(2, 3)
                )
                for path in results[0]["paths"]
            ]
        )
    torch.testing.assert_close(results[0]["level_4"], by_hand, rtol=1e-5, atol=1e-5)


def test_preprocessing_is_the_libraries_own(tmp_path: Path) -> None:
    from timm.data import resolve_data_config
    from transformers import AutoConfig, AutoModel, ViTImageProcessor

    timm_model = unifeat.create_model("timm:resnet18", features_only=True)
    image = Image.new("RGB", (300, 200), "olive")
    expected_size = resolve_data_config({}, model=timm_model)["input_size"]
    assert tuple(preprocessing_for(timm_model)(image).shape) == expected_size
    # A transformers model saved with its image processor is preprocessed by it.
    config = AutoConfig.for_model(
        "vit",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=48,
        patch_size=16,
    )
    AutoModel.from_config(config).save_pretrained(tmp_path / "vit")
    processor = ViTImageProcessor(size={"height": 48, "width": 48}, image_mean=[0.1] * 3)
    processor.save_pretrained(tmp_path / "vit")
    hf_model = unifeat.create_model(f"hf:{tmp_path / 'vit'}", pretrained=True, features_only=True)
    pixels = preprocessing_for(hf_model)(image)
    assert torch.equal(pixels, processor(images=image, return_tensors="pt")["pixel_values"][0])
    # Random-init models without a recipe: resize, center crop, ImageNet normalization.
    plain = unifeat.create_model("tv:resnet18", features_only=True)
    assert tuple(preprocessing_for(plain)(image).shape) == (3, 224, 224)


def test_cls_pooling_for_token_models(images: Path, tmp_path: Path) -> None:
    kwargs = dict(
        hidden_size=32,
        mlp_ratio=2,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
    )
    result = unifeat.extract(
        "hf:dinov2",
        [images],
        tmp_path / "cls.safetensors",
        pool="cls",
        out_indices=(-1,),
        progress=False,
        random_init=True,
        **kwargs,
    )
    assert result.written == 6 and len(result.failed) == 1
    assert unifeat.load_features(result.index_path)["level_1"].shape == (6, 32)
    assert (
        _cli(
            "extract",
            "tv:resnet18",
            str(images),
            "-o",
            str(tmp_path / "x.safetensors"),
            "--pool",
            "cls",
            "--no-progress",
            "--random-init",
        )
        == 2
    )


def test_show_writes_a_grid_of_the_expected_size(images: Path, tmp_path: Path) -> None:
    output = tmp_path / "grid.png"
    assert (
        _cli(
            "show",
            "timm:resnet18",
            str(images / "img0.png"),
            "-o",
            str(output),
            "--level",
            "1",
            "3",
            "4",
            "--channels",
            "5",
        )
        == 0
    )
    with Image.open(output) as picture:
        assert picture.size == (6 * TILE, 3 * (TILE + LABEL))
        # Not a blank picture: the maps are drawn.
        assert len(picture.convert("L").getcolors(maxcolors=256) or []) > 10


def test_nodes_cli_prints_torchvisions_names(capsys: pytest.CaptureFixture[str]) -> None:
    assert _cli("nodes", "tv:resnet18", "--filter", "layer4.1.*") == 0
    printed = capsys.readouterr().out.split()
    _, evaluation = unifeat.get_node_names("tv:resnet18")
    assert printed == [n for n in evaluation if n.startswith("layer4.1.")]


@pytest.mark.parametrize(
    "args,code,message",
    [
        (["extract", "tv:resnet18", "/no/such/dir", "-o", "x.safetensors"], 2, "no such image"),
        (["extract", "tv:resnet5O", "IMAGES", "-o", "OUT"], 2, "resnet50"),
        (["show", "tv:resnet18", "/no/such.png", "-o", "x.png"], 2, "no such image"),
        (
            ["extract", "tv:resnet18", "IMAGES", "-o", "OUT", "--device", "nope"],
            2,
            "invalid device",
        ),
        # A failure while running (the output folder cannot be made): exit 1.
        (
            ["extract", "tv:resnet18", "IMAGES", "-o", "IMAGES/img0.png/f.npy", "--random-init"],
            1,
            "--debug",
        ),
    ],
)
def test_cli_errors_are_one_line_with_exit_codes(
    args: list[str],
    code: int,
    message: str,
    images: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = [
        str(images) if a == "IMAGES" else str(tmp_path / "o.st") if a == "OUT" else a for a in args
    ]
    args = [a.replace("IMAGES", str(images)) for a in args]
    assert _cli(*args) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and "Traceback" not in err[0]


def test_bad_arguments_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        _cli("extract", "tv:resnet18", "x", "-o", "y", "--pool", "median")
    assert exit_info.value.code == 2
    assert "invalid choice: 'median'" in capsys.readouterr().err


def test_the_extraction_core_does_not_import_the_ray_engine() -> None:
    """unifeat.ray depends on the core (_extract, _store), never the other way round:
    no import of it anywhere in the core's source, function-level ones included, and
    importing the core (or unifeat) leaves it unloaded."""
    import ast
    import subprocess
    import sys

    root = Path(unifeat.__file__).parent
    for name in ("_extract.py", "_store.py", "_images.py"):
        tree = ast.parse((root / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                names = [f"{node.module}.{a.name}" for a in node.names] + [str(node.module)]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            assert not any(n == "unifeat.ray" or n.startswith("unifeat.ray.") for n in names), (
                f"{name}:{node.lineno} imports unifeat.ray"
            )
        strings = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant)]
        assert "unifeat.ray" not in strings, f"{name} names unifeat.ray for importlib"
    code = (
        "import sys, unifeat, unifeat._extract, unifeat._store, unifeat._cli\n"
        "ray = ('ray', 'unifeat.ray')\n"
        "print(sorted(m for m in sys.modules if m.partition('.')[0] == 'ray' or m in ray))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "[]", out.stdout


def test_engines_are_found_by_name_and_unknown_ones_refused(tmp_path: Path) -> None:
    from unifeat._engines import engine_names, get_engine

    assert engine_names() == ("local", "ray")
    assert get_engine("local").name == "local"
    with pytest.raises(unifeat.UnsupportedOptionError, match=r"engine='spark'.*'local' or 'ray'"):
        get_engine("spark")
