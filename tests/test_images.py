"""Images as they come: 16-bit, float, CMYK, palette, alpha, EXIF rotation, broken files,
symlinked folders and path forms."""

from __future__ import annotations

import io
import os
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import unifeat
from unifeat._images import ImageReadError, find_images, in_part, load_image


def _png16(pixels: np.ndarray) -> bytes:
    """A 16-bit RGB PNG, encoded by hand (PIL cannot write one)."""
    height, width, _ = pixels.shape
    raw = b"".join(b"\x00" + pixels[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


@pytest.fixture
def gray() -> np.ndarray:
    return np.arange(48 * 64, dtype=np.uint32).reshape(48, 64) % 256


def _rgb(image: Image.Image) -> np.ndarray:
    assert image.mode == "RGB"
    return np.asarray(image)


def test_16_bit_gray_png_is_scaled_not_clipped(tmp_path: Path, gray: np.ndarray) -> None:
    """PIL's convert('RGB') clips I;16 at 255 (an almost white picture)."""
    Image.fromarray((gray * 257).astype(np.uint16)).save(tmp_path / "a.png")
    with Image.open(tmp_path / "a.png") as raw:
        assert raw.mode == "I;16"
        assert (np.asarray(raw.convert("RGB")) == 255).mean() > 0.99  # the bug this avoids
    assert np.array_equal(_rgb(load_image(tmp_path / "a.png"))[..., 0], gray)


def test_16_bit_rgb_png_keeps_its_colours(tmp_path: Path) -> None:
    pixels = np.zeros((8, 8, 3), dtype=np.uint16)
    pixels[..., 0], pixels[..., 1], pixels[..., 2] = 30000, 65535, 1000
    (tmp_path / "c.png").write_bytes(_png16(pixels))
    loaded = _rgb(load_image(tmp_path / "c.png"))
    expected = np.round(pixels / 257)
    assert np.abs(loaded.astype(int) - expected).max() <= 1


def test_float_tiff_is_read_as_zero_to_one(tmp_path: Path, gray: np.ndarray) -> None:
    Image.fromarray((gray / 255).astype(np.float32)).save(tmp_path / "f.tif")
    with Image.open(tmp_path / "f.tif") as raw:
        assert raw.mode == "F" and np.asarray(raw.convert("RGB")).max() <= 1  # black
    assert np.array_equal(_rgb(load_image(tmp_path / "f.tif"))[..., 1], gray)


@pytest.mark.parametrize(
    ("values", "message"),
    [(np.full((4, 4), 200.0), r"values 200\.\.200"), (np.full((4, 4), np.nan), "NaN")],
)
def test_float_images_outside_zero_one_are_errors_not_clipped(
    tmp_path: Path, values: np.ndarray, message: str
) -> None:
    Image.fromarray(values.astype(np.float32)).save(tmp_path / "f.tif")
    with pytest.raises(ImageReadError, match=message) as caught:
        load_image(tmp_path / "f.tif")
    assert "f.tif" in str(caught.value) and isinstance(caught.value, OSError)


def test_cmyk_palette_alpha_and_gray_convert_as_pil_does(tmp_path: Path) -> None:
    """What ``Image.open(p).convert('RGB')`` gives timm and torchvision users, without
    the warning palette-with-transparency images raise."""
    base = Image.fromarray(
        (np.random.RandomState(0).rand(20, 30, 3) * 255).astype(np.uint8), mode="RGB"
    )
    files = {
        "cmyk.jpg": base.convert("CMYK"),
        "rgba.png": base.convert("RGBA"),
        "la.png": base.convert("LA"),
        "gray.png": base.convert("L"),
        "bits.png": base.convert("1"),
    }
    palette = base.convert("P")
    palette.info["transparency"] = 0
    files["palette.png"] = palette
    for name, image in files.items():
        image.save(tmp_path / name)
    for name in files:
        with Image.open(tmp_path / name) as opened, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            expected = np.asarray(opened.convert("RGB"))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            loaded = _rgb(load_image(tmp_path / name))
        assert np.array_equal(loaded, expected), name


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_rotation_is_applied(tmp_path: Path, orientation: int) -> None:
    """A photo stored sideways with an orientation tag comes out as it is shown."""
    shown = np.zeros((30, 50, 3), dtype=np.uint8)
    shown[:10, :10] = 255  # a white top-left corner
    # What a camera stores so that applying the tag gives ``shown``.
    undo = {
        3: Image.Transpose.ROTATE_180,
        6: Image.Transpose.ROTATE_90,
        8: Image.Transpose.ROTATE_270,
    }
    stored = Image.fromarray(shown).transpose(undo[orientation])
    exif = Image.Exif()
    exif[0x0112] = orientation
    stored.save(tmp_path / "r.png", exif=exif)
    assert np.array_equal(_rgb(load_image(tmp_path / "r.png")), shown)


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"", "cannot identify"),
        (b"GIF89a not really", "cannot identify"),
        ("TRUNCATED", "truncated"),
    ],
)
def test_broken_files_are_image_read_errors(tmp_path: Path, content: object, reason: str) -> None:
    if content == "TRUNCATED":
        buffer = io.BytesIO()
        Image.new("RGB", (300, 200), "red").save(buffer, format="JPEG")
        content = buffer.getvalue()[: len(buffer.getvalue()) // 2]
    (tmp_path / "x.jpg").write_bytes(content)  # type: ignore[arg-type]
    with pytest.raises(ImageReadError, match=reason):
        load_image(tmp_path / "x.jpg")
    with pytest.raises(ImageReadError, match="No such file"):
        load_image(tmp_path / "missing.jpg")


def test_decompression_bombs_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    Image.new("RGB", (100, 100)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ImageReadError, match="decompression bomb"):
        load_image(tmp_path / "big.png")


def test_fast_decode_reduces_large_jpegs_but_never_below_the_resize(tmp_path: Path) -> None:
    Image.new("RGB", (4000, 3000), "olive").save(tmp_path / "big.jpg", quality=90)
    full = load_image(tmp_path / "big.jpg")
    reduced = load_image(tmp_path / "big.jpg", min_size=lambda h, w: (256, 341))
    assert full.size == (4000, 3000)
    assert reduced.size == (500, 375)  # 1/8: the largest reduction keeping 341x256
    assert min(reduced.size) >= 256
    # A PNG has no reduced decoding: unchanged.
    Image.new("RGB", (800, 600)).save(tmp_path / "big.png")
    assert load_image(tmp_path / "big.png", min_size=lambda h, w: (10, 10)).size == (800, 600)


def test_extract_gives_16_bit_images_the_features_of_their_8_bit_twins(tmp_path: Path) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    pixels = (np.random.RandomState(1).rand(40, 40, 3) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(folder / "eight.png")
    (folder / "sixteen.png").write_bytes(_png16(pixels.astype(np.uint16) * 257))
    result = unifeat.extract(
        "tv:resnet18",
        [folder],
        tmp_path / "f.safetensors",
        random_init=True,
        out_indices=(-1,),
        input_size=(32, 32),
        progress=False,
    )
    features = unifeat.load_features(result.index_path)
    assert result.written == 2 and not result.failed
    assert torch.equal(features["level_4"][0], features["level_4"][1])


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """photos/a.png, photos/sub/b.png, photos/link -> ../elsewhere (c.png),
    photos/sub/loop -> .. (a loop), a dangling link, and a second link to elsewhere."""
    photos, elsewhere = tmp_path / "photos", tmp_path / "elsewhere"
    (photos / "sub").mkdir(parents=True)
    elsewhere.mkdir()
    for path in (photos / "a.png", photos / "sub" / "b.png", elsewhere / "c.png"):
        Image.new("RGB", (16, 16), "navy").save(path)
    (photos / "link").symlink_to(elsewhere, target_is_directory=True)
    (photos / "sub" / "loop").symlink_to(photos, target_is_directory=True)
    (photos / "dangling.png").symlink_to(tmp_path / "gone.png")
    (photos / "again").symlink_to(elsewhere, target_is_directory=True)
    return photos


def test_symlinked_folders_are_followed_once_each(tree: Path) -> None:
    found = find_images([tree])
    real = os.path.realpath(tree)
    assert found == sorted(
        [f"{real}/a.png", f"{real}/sub/b.png", os.path.realpath(tree.parent / "elsewhere/c.png")]
    )
    assert find_images([tree, tree / "sub", tree / "a.png"]) == found
    with pytest.raises(FileNotFoundError, match="no such image file or folder") as caught:
        find_images([tree / "nope"])
    assert isinstance(caught.value, unifeat.UnifeatError)


def test_resume_works_from_any_working_directory_and_path_form(
    tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kwargs = dict(random_init=True, out_indices=(-1,), input_size=(32, 32), progress=False)
    monkeypatch.chdir(tmp_path)
    first = unifeat.extract("tv:resnet18", ["photos"], "out/f.npy", **kwargs)
    assert first.written == 3
    (tmp_path / "other").mkdir()
    monkeypatch.chdir(tmp_path / "other")
    (tmp_path / "alias").symlink_to(tree, target_is_directory=True)
    for form in (str(tree), "../photos", "../alias", str(tmp_path / "alias" / "sub" / "..")):
        again = unifeat.extract("tv:resnet18", [form], tmp_path / "out" / "f.npy", **kwargs)
        assert (again.written, again.skipped) == (0, 3), form


def test_parts_split_every_path_exactly_once() -> None:
    paths = [f"/data/{i}.jpg" for i in range(1000)]
    parts = [[p for p in paths if in_part(p, (i, 3))] for i in range(3)]
    assert sorted(p for part in parts for p in part) == sorted(paths)
    assert all(250 < len(part) < 420 for part in parts)
    # Independent of which other files exist.
    assert [p for p in paths[:10] if in_part(p, (1, 3))] == [p for p in parts[1] if p in paths[:10]]


def test_show_reads_images_the_same_way(tmp_path: Path, gray: np.ndarray) -> None:
    Image.fromarray((gray * 257).astype(np.uint16)).save(tmp_path / "a.png")
    picture = unifeat.plot_feature_maps(
        "tv:resnet18", tmp_path / "a.png", levels=(1,), channels=2, input_size=(32, 32)
    )
    # The input tile is the gradient, not a white square.
    tile = np.asarray(picture)[20:100, 10:80, 0]
    assert tile.std() > 20


@pytest.mark.parametrize("loop", ["self", "pair"])
def test_a_looping_symlink_is_an_unreadable_image_with_its_reason(
    loop: str, tmp_path: Path
) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("RGB", (16, 16), "navy").save(photos / "a.png")
    if loop == "self":
        (photos / "b.jpg").symlink_to("b.jpg")
    else:
        (photos / "b.jpg").symlink_to("c.jpg")
        (photos / "c.jpg").symlink_to("b.jpg")
    found = [Path(p).name for p in find_images([photos])]
    assert "b.jpg" in found
    # Given by name, it is there (a link), not a missing file.
    assert Path(find_images([photos / "b.jpg"])[0]).name == "b.jpg"
    kwargs = dict(random_init=True, out_indices=(-1,), input_size=(32, 32), progress=False)
    result = unifeat.extract("tv:resnet18", [photos], tmp_path / "f.npy", **kwargs)
    assert result.written == 1
    reasons = {Path(p).name: why for p, why in result.failed}
    assert "b.jpg" in reasons and "symbolic links" in reasons["b.jpg"], reasons
    stored = unifeat.load_features(tmp_path / "f.npy")["failed"]
    assert {Path(p).name for p, _ in stored} >= {"b.jpg"}
