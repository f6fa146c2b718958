"""Batch extraction of pooled descriptors (or whole maps) over image files, to disk.

Images are read by a ``DataLoader`` (unreadable files are reported and
skipped), preprocessed the way the model's own library does it, run in
batches, and written with their paths to safetensors shards plus a JSON
index. A rerun with the same output skips the images already written.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import torch
from torch import Tensor, nn

from unifeat._errors import UnsupportedOptionError, format_choices
from unifeat._feature_model import FeatureModel, image_transform

Pool = Literal["avg", "max", "cls", "none"]
POOLS = ("avg", "max", "cls", "none")
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class ExtractResult:
    """What :func:`extract` wrote."""

    index_path: Path
    """The JSON index: shards, image paths per shard, levels, options."""
    written: int
    """Images written by this call."""
    skipped: int
    """Images already in the output (a resumed run)."""
    failed: list[tuple[str, str]] = field(default_factory=list)
    """``(path, reason)`` of the images that could not be read."""


def find_images(inputs: Iterable[str | Path]) -> list[Path]:
    """Image files among ``inputs``: files as given, folders searched recursively,
    sorted within each folder. Unknown suffixes in folders are ignored."""
    found: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.exists():
            found.append(path)
        else:
            raise FileNotFoundError(f"no such image file or folder: {str(path)!r}")
    return list(dict.fromkeys(found))


def preprocessing_for(
    model: nn.Module, input_size: tuple[int, int] | None = None
) -> Callable[[Any], Tensor]:
    """The transform the model's own library would apply to a PIL image.

    timm models: ``timm.data.create_transform`` from the model's data config.
    torchvision models built with pretrained weights: those weights'
    ``transforms()``. transformers models loaded from a directory or hub id with
    an image processor: that processor. Otherwise (random init, a plain
    module), or where ``input_size`` overrides a torchvision or transformers
    recipe: resize the shorter side to ``size / 0.875``, center-crop ``size``
    (the model's input size, else 224), scale to [0, 1] and normalize with the
    ImageNet mean and std.
    """
    source = getattr(model, "model", model)
    size = input_size or _input_size(model)
    timm_cfg = getattr(source, "pretrained_cfg", None)
    if timm_cfg is not None and type(source).__module__.startswith("timm."):
        from timm.data import create_transform, resolve_data_config

        config = resolve_data_config({}, model=source)
        if input_size is not None:
            config["input_size"] = (3, *input_size)
        return create_transform(**config)
    own = image_transform(model)
    if own is not None and input_size is None:
        return cast(Callable[[Any], Tensor], own)
    return _default_transform(size)


def _input_size(model: nn.Module) -> tuple[int, int]:
    size = getattr(model, "default_input_size", None)
    return (int(size[-2]), int(size[-1])) if size else (224, 224)


def _default_transform(size: tuple[int, int]) -> Callable[[Any], Tensor]:
    from torchvision import transforms

    resize = [math.floor(s / 0.875) for s in size]
    return transforms.Compose(
        [
            transforms.Resize(min(resize), interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(size),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


class _Images(torch.utils.data.Dataset):
    def __init__(self, paths: Sequence[Path], transform: Callable[[Any], Tensor]) -> None:
        self.paths = list(paths)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, Tensor | None, str]:
        from PIL import Image

        try:
            with Image.open(self.paths[index]) as image:
                return index, self.transform(image.convert("RGB")), ""
        except Exception as exc:  # unreadable: reported, not fatal
            return index, None, f"{type(exc).__name__}: {exc}"


def _collate(
    items: list[tuple[int, Tensor | None, str]],
) -> tuple[list[int], Tensor | None, list[tuple[int, str]]]:
    good = [(i, t) for i, t, _ in items if t is not None]
    bad = [(i, why) for i, t, why in items if t is None]
    batch = torch.stack([t for _, t in good]) if good else None
    return [i for i, _ in good], batch, bad


def pool_features(maps: Sequence[Any], pool: str) -> list[Tensor]:
    """One descriptor per level: ``avg``/``max`` over space, ``cls`` the first prefix
    token (token models), ``none`` the whole map."""
    pooled = []
    for item in maps:
        feature_map, prefix = item if isinstance(item, tuple) else (item, None)
        if pool == "avg":
            pooled.append(feature_map.float().mean(dim=(-2, -1)))
        elif pool == "max":
            pooled.append(feature_map.float().amax(dim=(-2, -1)))
        elif pool == "cls":
            if prefix is None or prefix.shape[1] == 0:
                raise UnsupportedOptionError(
                    "pool='cls' needs a token model with a class token; use 'avg' or 'max'"
                )
            pooled.append(prefix[:, 0].float())
        else:
            pooled.append(feature_map.float())
    return pooled


def extract(
    model: nn.Module | str,
    images: Iterable[str | Path],
    output: str | Path,
    *,
    pool: str = "avg",
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
    shard_size: int = 4096,
    input_size: tuple[int, int] | None = None,
    progress: bool = True,
    **create_kwargs: Any,
) -> ExtractResult:
    """Extract features for image files and write them to safetensors shards.

    Args:
        model: a feature model from :func:`unifeat.create_model`, or a name
            (then built with ``features_only=True`` and ``create_kwargs``).
        images: image files and folders (searched recursively).
        output: the output file, e.g. ``feats.safetensors``; shards are written
            beside it as ``feats.00000.safetensors``, ... with an index
            ``feats.index.json`` (paths per shard, levels, options).
        pool: ``"avg"`` or ``"max"`` over space, ``"cls"`` (the class token of a
            token model) or ``"none"`` (whole maps).
        batch_size: images per forward; results do not depend on it.
        device: where the model runs (``"cpu"``, ``"cuda"``, ...).
        num_workers: ``DataLoader`` worker processes reading and preprocessing.
        shard_size: images per shard, so a large folder never has to fit in memory.
        input_size: ``(H, W)`` to preprocess to; default: the model's own.
        progress: show a tqdm progress bar on stderr.

    Returns:
        An :class:`ExtractResult`. Unreadable images are skipped and listed in
        ``failed``; images already written by an earlier run with the same
        ``output`` are skipped (resumable).

    Examples:
        >>> import tempfile, pathlib
        >>> from PIL import Image
        >>> folder = pathlib.Path(tempfile.mkdtemp())
        >>> for i in range(3):
        ...     Image.new("RGB", (40, 30), (80 * i, 40, 90)).save(folder / f"{i}.png")
        >>> result = extract("tv:resnet18", [folder], folder / "feats.safetensors",
        ...                  out_indices=(-1,), input_size=(64, 64), progress=False)
        >>> result.written, load_features(result.index_path)["level_4"].shape
        (3, torch.Size([3, 512]))
    """
    from safetensors.torch import save_file

    if pool not in POOLS:
        raise UnsupportedOptionError(f"invalid pool={pool!r}: expected {format_choices(POOLS)}")
    if batch_size < 1:
        raise UnsupportedOptionError(f"invalid batch_size={batch_size}: expected at least 1")
    if pool == "cls" and isinstance(model, str):
        create_kwargs.setdefault("return_prefix_tokens", True)
    model = as_feature_model(model, create_kwargs)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    index_path = output.with_name(f"{output.stem}.index.json")
    index = _read_index(index_path)
    paths = find_images(images)
    done = {p for shard in index["shards"] for p in shard["paths"]}
    todo = [p for p in paths if str(p) not in done]
    model = model.eval().to(device)
    info = model.feature_info
    index.update(
        levels=[level.model_dump() for level in info if level.index in info.out_indices],
        pool=pool,
        backend=getattr(model, "backend", None),
    )
    transform = preprocessing_for(model, input_size)
    loader = torch.utils.data.DataLoader(
        _Images(todo, transform),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=_collate,
    )
    failed: list[tuple[str, str]] = []
    buffer_paths: list[str] = []
    buffer: list[list[Tensor]] = []
    bar = _progress(len(todo), progress)

    def flush() -> None:
        if not buffer_paths:
            return
        shard_file = output.with_name(f"{output.stem}.{len(index['shards']):05d}{output.suffix}")
        tensors = {
            f"level_{level}": torch.cat([batch[i] for batch in buffer]).contiguous()
            for i, level in enumerate(info.out_indices)
        }
        save_file(tensors, str(shard_file), metadata={"paths": json.dumps(buffer_paths)})
        index["shards"].append({"file": shard_file.name, "paths": list(buffer_paths)})
        index_path.write_text(json.dumps(index, indent=1))
        buffer_paths.clear()
        buffer.clear()

    with torch.no_grad():
        for positions, batch, bad in loader:
            for position, why in bad:
                failed.append((str(todo[position]), why))
                print(f"unifeat extract: skipped {todo[position]}: {why}", file=sys.stderr)
            if batch is not None:
                maps = model(batch.to(device))
                levels = list(maps.values()) if isinstance(maps, dict) else list(maps)
                buffer.append([t.cpu() for t in pool_features(levels, pool)])
                buffer_paths.extend(str(todo[p]) for p in positions)
                if len(buffer_paths) >= shard_size:
                    flush()
            bar.update(len(positions) + len(bad))
    flush()
    bar.close()
    index_path.write_text(json.dumps(index, indent=1))
    return ExtractResult(
        index_path=index_path,
        written=len(todo) - len(failed),
        skipped=len(paths) - len(todo),
        failed=failed,
    )


def as_feature_model(model: nn.Module | str, create_kwargs: dict[str, Any]) -> FeatureModel:
    """``model`` if it is a feature model, else one built by name with ``create_kwargs``."""
    if isinstance(model, str):
        import unifeat

        model = unifeat.create_model(model, features_only=True, **create_kwargs)
    elif create_kwargs:
        raise UnsupportedOptionError(
            f"{', '.join(create_kwargs)} only apply when model is a name, not a built model"
        )
    if not isinstance(model, FeatureModel):
        raise UnsupportedOptionError(
            f"expected a feature model (unifeat.create_model(..., features_only=True)), "
            f"got {type(model).__name__}"
        )
    return model


def _read_index(path: Path) -> dict[str, Any]:
    if path.exists():
        return dict(json.loads(path.read_text()))
    return {"format": "unifeat-features/1", "shards": []}


def _progress(total: int, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="img", disable=not enabled, file=sys.stderr)


def load_features(index_path: str | Path) -> dict[str, Any]:
    """Read what :func:`extract` wrote: ``{"paths": [...], "level_<i>": Tensor, ...}``,
    shards concatenated in order.

    Examples:
        >>> import tempfile, pathlib
        >>> from PIL import Image
        >>> folder = pathlib.Path(tempfile.mkdtemp())
        >>> Image.new("RGB", (32, 32), "tan").save(folder / "a.png")
        >>> result = extract("tv:resnet18", [folder], folder / "f.safetensors",
        ...                  out_indices=(1, 2), input_size=(32, 32), progress=False)
        >>> features = load_features(result.index_path)
        >>> sorted(features), features["level_2"].shape
        (['level_1', 'level_2', 'paths'], torch.Size([1, 128]))
    """
    from safetensors.torch import load_file

    index_path = Path(index_path)
    index = json.loads(index_path.read_text())
    paths: list[str] = []
    parts: dict[str, list[Tensor]] = {}
    for shard in index["shards"]:
        tensors = load_file(str(index_path.with_name(shard["file"])))
        for key, tensor in tensors.items():
            parts.setdefault(key, []).append(tensor)
        paths += shard["paths"]
    result: dict[str, Any] = {key: torch.cat(tensors) for key, tensors in parts.items()}
    result["paths"] = paths
    return result
