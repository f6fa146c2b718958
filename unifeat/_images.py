"""Finding and decoding images as they come: odd modes, EXIF rotation, symlinks.

What timm and torchvision users do by hand, ``Image.open(path).convert("RGB")``,
goes wrong for a few kinds of files: 16-bit PNGs clip to white, float TIFFs
come out black, palette images with transparency warn. Here every mode gets
the conversion that keeps its values (see the docs page "Extraction", section
"Images in the wild"), and a file that cannot be turned into an RGB image is a
:class:`ImageReadError` naming the file and the reason.
"""

from __future__ import annotations

import errno
import hashlib
import io
import math
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from unifeat._errors import UnifeatError, UnsupportedOptionError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})


class ImageReadError(UnifeatError, OSError):
    """An image file that cannot be read as an RGB image (missing, corrupt,
    truncated, or values outside the range its mode promises)."""


class MissingInputError(UnifeatError, FileNotFoundError):
    """An image file or folder given as input does not exist."""


def canonical(path: str | os.PathLike[str]) -> str:
    """The one form a path is stored in: absolute, symlinks resolved, so a resume
    from another working directory, with an absolute path or through a symlink
    finds the same rows."""
    return os.path.realpath(os.path.abspath(path))


def _is_link_loop(path: str) -> bool:
    """Whether ``path`` is a symlink that never reaches a file (``a.jpg -> a.jpg``,
    or a cycle of links): there is something there, which cannot be read."""
    try:
        os.stat(path)
    except OSError as exc:
        return exc.errno == errno.ELOOP
    return False


def image_inputs(images: object) -> list[str | os.PathLike[str]]:
    """``images`` as a list of paths: one ``str`` or path is that file or folder,
    not a sequence of letters; anything that is not a path is refused."""
    if isinstance(images, (str, os.PathLike)):
        return [images]
    if isinstance(images, (bytes, Mapping)) or not isinstance(images, Iterable):
        raise UnsupportedOptionError(
            f"invalid images={images!r}: expected an image file or folder, or a list of them "
            "(str or pathlib.Path)"
        )
    items = list(images)
    for item in items:
        if not isinstance(item, (str, os.PathLike)) or isinstance(os.fspath(item), bytes):
            raise UnsupportedOptionError(
                f"invalid entry {item!r} in images: expected image files and folders as str "
                "or pathlib.Path"
            )
    return items


def input_exists(path: str | os.PathLike[str]) -> bool:
    """Whether an input names something: a file, a folder, or a symlink loop (an
    unreadable image, recorded as such, not a missing one)."""
    return os.path.exists(path) or _is_link_loop(os.fspath(path))


def find_images(inputs: str | os.PathLike[str] | Iterable[str | os.PathLike[str]]) -> list[str]:
    """Image files among ``inputs``, canonical, each once, sorted.

    Files are taken as given; folders are searched recursively for the known
    image suffixes, following symlinked folders (a folder reached twice, e.g.
    through a symlink loop, is searched once). A symlink loop with an image
    suffix is listed: reading it fails, and it is recorded as unreadable with
    that reason. Dangling symlinks are skipped: they name no file.
    """
    found: dict[str, None] = {}
    seen_dirs: set[tuple[int, int]] = set()
    for item in image_inputs(inputs):
        path = os.fspath(item)
        if os.path.isdir(path):
            for root, dirs, files in os.walk(path, followlinks=True):
                stat = os.stat(root)
                key = (stat.st_dev, stat.st_ino)
                if key in seen_dirs:
                    dirs.clear()  # a loop, or a folder already searched
                    continue
                seen_dirs.add(key)
                dirs.sort()
                for name in files:
                    if Path(name).suffix.lower() in IMAGE_SUFFIXES:
                        full = os.path.join(root, name)
                        if os.path.isfile(full) or _is_link_loop(full):
                            found.setdefault(canonical(full))
        elif input_exists(path):
            found.setdefault(canonical(path))
        else:
            raise MissingInputError(f"no such image file or folder: {path!r}")
    return sorted(found)


def in_part(path: str, part: tuple[int, int] | None) -> bool:
    """Whether ``path`` belongs to part ``i`` of ``n`` (``--shard i/n``): a hash of
    the canonical path, so the split does not depend on which other files exist
    or on the order they were listed in."""
    if part is None:
        return True
    index, count = part
    digest = hashlib.blake2b(path.encode("utf-8", "surrogateescape"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % count == index


def to_rgb(image: Any) -> Any:
    """An 8-bit RGB PIL image with the values ``image`` means.

    16-bit integer images (``I;16``, and ``I`` holding 0..65535) are scaled by
    255/65535; float images (``F``) are read as [0, 1] and scaled by 255 (values
    outside [0, 1] raise :class:`ImageReadError` rather than clip silently);
    palette images with transparency and images with alpha drop the alpha
    channel, as ``convert("RGB")`` does; CMYK, YCbCr, LAB, grayscale and bilevel
    images use PIL's conversion.
    """
    from PIL import Image

    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I;16") or mode == "I":
        values = np.asarray(image).astype(np.int64)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise ImageReadError(
                f"{mode} image with values {values.min()}..{values.max()}, outside the "
                "16-bit range 0..65535"
            )
        eight = ((values * 255 + 32767) // 65535).astype(np.uint8)
        return Image.fromarray(eight, mode="L").convert("RGB")
    if mode == "F":
        values = np.asarray(image, dtype=np.float64)
        if values.size and not np.isfinite(values).all():
            raise ImageReadError("float image with NaN or infinite values")
        low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
        if low < -1e-6 or high > 1 + 1e-6:
            raise ImageReadError(
                f"float image with values {low:g}..{high:g}: float images are read as [0, 1]"
            )
        eight = np.clip(np.round(values * 255), 0, 255).astype(np.uint8)
        return Image.fromarray(eight, mode="L").convert("RGB")
    if mode == "P" and "transparency" in image.info:
        # PIL warns on P -> RGB with transparency; via RGBA gives the same pixels.
        return image.convert("RGBA").convert("RGB")
    return image.convert("RGB")


def _draft(image: Any, need: tuple[int, int]) -> None:
    """Ask the JPEG decoder for a reduced image at least ``need`` (W, H), as seen
    after EXIF rotation: decoding 1/2, 1/4 or 1/8 of the pixels is much faster."""
    if image.format != "JPEG":
        return
    width, height = image.size
    orientation = image.getexif().get(0x0112, 1)
    shown = (height, width) if orientation in (5, 6, 7, 8) else (width, height)
    scale = min(shown[0] / max(need[0], 1), shown[1] / max(need[1], 1))
    if scale >= 2:
        image.draft("RGB", (math.ceil(width / scale), math.ceil(height / scale)))


def load_image(
    source: str | os.PathLike[str] | bytes,
    *,
    min_size: Callable[[int, int], tuple[int, int]] | None = None,
) -> Any:
    """Open and fully decode an image file (or its bytes) as an RGB PIL image,
    EXIF rotation applied.

    Args:
        source: a path or the file's bytes.
        min_size: for reduced JPEG decoding (``--fast-decode``): given the
            displayed ``(height, width)``, the ``(height, width)`` the image must
            keep at least.

    Raises:
        ImageReadError: the file is missing, not an image, truncated, or holds
            values its mode cannot mean.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    name = "<bytes>" if isinstance(source, bytes) else os.fspath(source)
    try:
        opened = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
        with opened as image:
            if min_size is not None:
                orientation = image.getexif().get(0x0112, 1)
                width, height = image.size
                if orientation in (5, 6, 7, 8):
                    width, height = height, width
                need_h, need_w = min_size(height, width)
                _draft(image, (need_w, need_h))
            image.load()
            rotated = ImageOps.exif_transpose(image)
            return to_rgb(rotated if rotated is not None else image)
    except ImageReadError as exc:
        raise ImageReadError(f"{name}: {exc}") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        # PIL signals corrupt and truncated files with these; the reason is kept.
        raise ImageReadError(f"{name}: {type(exc).__name__}: {exc}") from None
    except Image.DecompressionBombError as exc:  # pragma: no cover - a subclass of Exception
        raise ImageReadError(f"{name}: {exc}") from None
