"""Feature-map pictures: one row per level, the input image then channel maps."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor, nn

TILE = 96
"""Side of one tile, in pixels."""
LABEL = 14
"""Height of the caption above each row."""
MAX_CHANNELS = 64
"""The most maps per row: the picture is ``(channels + 1) * TILE`` pixels wide."""


def plot_feature_maps(
    model: nn.Module | str,
    image: Any,
    output: str | Path | None = None,
    *,
    levels: Sequence[int] | None = None,
    channels: int = 8,
    input_size: tuple[int, int] | None = None,
    **create_kwargs: Any,
) -> Any:
    """A grid of feature maps: per level, the input image and ``channels`` maps.

    Each row shows one level: the preprocessed input, then the ``channels``
    channels with the largest mean activation, each min-max scaled to gray
    levels and enlarged (nearest neighbour) to ``TILE`` pixels. The picture is
    ``(channels + 1) * TILE`` wide and ``len(levels) * (TILE + LABEL)`` high.

    Args:
        model: a feature model, or a name built with ``features_only=True``
            and ``create_kwargs``.
        image: a file path (read as ``unifeat extract`` reads images: EXIF
            rotation applied, 16-bit and float images scaled) or a PIL image.
        output: where to save the PNG (optional).
        levels: level indices (over all levels); default: the model's ``out_indices``.
        channels: maps per level, 1 to 64.
        input_size: ``(H, W)`` to preprocess to; default: the model's own. The
            preprocessing is the model's :func:`unifeat.data_config`.

    Returns:
        The picture, a ``PIL.Image``.

    Examples:
        >>> from PIL import Image
        >>> picture = plot_feature_maps("tv:resnet18", Image.new("RGB", (64, 64), "teal"),
        ...                             levels=(1, 4), channels=4, input_size=(64, 64))
        >>> picture.size
        (480, 220)
    """
    from PIL import Image, ImageDraw

    from unifeat._data import create_transform, model_data_config, with_input_size
    from unifeat._errors import UnsupportedOptionError
    from unifeat._extract import as_feature_model
    from unifeat._images import load_image

    if isinstance(channels, bool) or not isinstance(channels, int):
        raise UnsupportedOptionError(f"invalid channels={channels!r}: expected an integer")
    if not 1 <= channels <= MAX_CHANNELS:
        raise UnsupportedOptionError(
            f"invalid channels={channels}: expected 1 to {MAX_CHANNELS} maps per level"
        )
    model = as_feature_model(model, create_kwargs).eval()
    if isinstance(image, (str, Path)):
        image = load_image(image)
    config = with_input_size(model_data_config(model), input_size)
    pixels = create_transform(config)(image).unsqueeze(0)
    device = next(model.parameters(), torch.empty(0)).device
    chosen = tuple(levels) if levels is not None else model.feature_info.out_indices
    with torch.no_grad():
        maps = model.forward_intermediates(
            pixels.to(device), indices=chosen, intermediates_only=True
        )
    order = model.resolve_indices(chosen)
    width = (channels + 1) * TILE
    picture = Image.new("RGB", (width, len(order) * (TILE + LABEL)), "white")
    draw = ImageDraw.Draw(picture)
    shown = _to_gray(_unnormalize(pixels[0]), TILE).convert("RGB")
    for row, (index, item) in enumerate(zip(order, maps, strict=True)):
        batch_maps = cast(Tensor, item[0] if isinstance(item, tuple) else item)
        feature_map = batch_maps[0].float().cpu()
        top = row * (TILE + LABEL)
        level = model.feature_info[index]
        draw.text(
            (2, top + 1),
            f"level {index}: {level.module or '(root)'}, {level.num_chs} ch, /{level.reduction}",
            fill="black",
        )
        picture.paste(shown, (0, top + LABEL))
        strongest = feature_map.mean(dim=(1, 2)).argsort(descending=True)[:channels]
        for column, channel in enumerate(strongest.tolist(), start=1):
            tile = _to_gray(feature_map[channel], TILE)
            picture.paste(tile.convert("RGB"), (column * TILE, top + LABEL))
    if output is not None:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        picture.save(output)
    return picture


def _unnormalize(pixels: Tensor) -> Tensor:
    """Back to [0, 1] for display, whatever normalization was applied."""
    low, high = pixels.amin(dim=(1, 2), keepdim=True), pixels.amax(dim=(1, 2), keepdim=True)
    return (pixels - low) / (high - low).clamp_min(1e-12)


def _to_gray(values: Tensor, side: int) -> Any:
    from PIL import Image

    if values.dim() == 3:
        array = (values.permute(1, 2, 0).clamp(0, 1) * 255).to(torch.uint8).numpy()
        return Image.fromarray(array).resize((side, side), Image.Resampling.BILINEAR)
    low, high = values.min(), values.max()
    scaled = ((values - low) / (high - low).clamp_min(1e-12) * 255).to(torch.uint8).numpy()
    return Image.fromarray(scaled).resize((side, side), Image.Resampling.NEAREST)
