"""Batch extraction of pooled descriptors (or whole maps) over image files, to disk.

Images are decoded and resized in ``DataLoader`` workers (unreadable files
are recorded with their reason, not fatal), normalized on the model's device
with the model's own :class:`~unifeat.DataConfig`, run in batches, pooled and
committed to a crash-safe store (``unifeat._store``) in safetensors, Parquet or
npy. A rerun with the same output adds only what is missing, and refuses to
mix rows computed differently.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import itertools
import os
import platform
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from unifeat._data import DataConfig, geometry, model_data_config, normalize, resize_size
from unifeat._data import with_input_size as _with_input_size
from unifeat._engines import Batch, Engine, EngineRun, get_engine, register_engine
from unifeat._errors import UnsupportedOptionError, format_choices
from unifeat._feature_model import FeatureModel
from unifeat._images import ImageReadError, find_images, in_part, load_image
from unifeat._store import (
    Store,
    StoreError,
    StorePaths,
    differences,
    iter_shards,
    open_index,
    part_paths,
    read_shard,
    read_shard_paths,
    store_paths,
)

POOLS = ("avg", "max", "cls", "none")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ExtractResult:
    """What :func:`extract` (or :func:`merge_features`) did."""

    index_path: Path
    """The store's index (``feats.index.json``); :func:`load_features` takes it
    or the output path."""
    written: int
    """Images written by this call."""
    skipped: int
    """Images already in the output (a resumed run)."""
    failed: list[tuple[str, str]] = field(default_factory=list)
    """``(path, reason)`` of this call's images that could not be read, including
    those recorded by an earlier run and not retried."""
    output: str = ""
    """The output as given (with ``.partIofN`` for one part of ``shard``)."""


def preprocessing_for(
    model: nn.Module, input_size: tuple[int, int] | None = None
) -> Callable[[Any], Tensor]:
    """The evaluation transform of ``model``'s :class:`~unifeat.DataConfig` (an
    internal alias kept for older tests; use :func:`unifeat.create_transform`)."""
    from unifeat._data import create_transform

    return create_transform(_with_input_size(model_data_config(model), input_size))


# -- validation -----------------------------------------------------------------------


def _positive(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise UnsupportedOptionError(f"invalid {name}={value!r}: expected an integer >= 1")
    return int(value)


def parse_part(value: str | tuple[int, int] | None) -> tuple[int, int] | None:
    """``"i/n"`` or ``(i, n)`` with ``0 <= i < n``, as ``(i, n)``."""
    if value is None:
        return None
    try:
        if isinstance(value, str):
            first, second = value.split("/")
            index, count = int(first), int(second)
        else:
            index, count = (int(v) for v in value)
    except (ValueError, TypeError):
        raise UnsupportedOptionError(
            f"invalid shard={value!r}: expected 'i/n' with 0 <= i < n, e.g. '0/4'"
        ) from None
    if count < 1 or not 0 <= index < count:
        raise UnsupportedOptionError(
            f"invalid shard={value!r}: expected 'i/n' with 0 <= i < n, e.g. '0/4'"
        )
    return (index, count)


def parse_device(device: str | torch.device, *, here: bool = True) -> torch.device:
    """``device`` as a ``torch.device``; with ``here``, one that exists on this machine."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise UnsupportedOptionError(
            f"invalid device {str(device)!r}: expected 'cpu', 'cuda', 'cuda:N', 'mps' or "
            "another torch device"
        ) from None
    if not here:
        return parsed
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise UnsupportedOptionError(
                f"device {str(device)!r}: CUDA is not available on this machine"
            )
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise UnsupportedOptionError(
                f"device {str(device)!r}: this machine has {torch.cuda.device_count()} CUDA "
                f"device(s), cuda:0..cuda:{torch.cuda.device_count() - 1}"
            )
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        raise UnsupportedOptionError(f"device {str(device)!r}: MPS is not available")
    return parsed


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"float32"``, ``"bfloat16"`` or ``"float16"`` (or the torch dtype)."""
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise UnsupportedOptionError(f"invalid dtype={dtype!r}: expected {format_choices(DTYPES)}")


# -- the model ------------------------------------------------------------------------


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
            f"expected a feature model (unifeat.create_model(..., features_only=True)) or a "
            f"model name, got {type(model).__name__}"
        )
    return model


def build_for_extraction(
    model: nn.Module | str,
    create_kwargs: dict[str, Any],
    *,
    random_init: bool,
    seed: int,
) -> FeatureModel:
    """The feature model to extract with. By name, weights must be asked for:
    ``pretrained``, ``checkpoint_path`` or an explicit ``random_init`` (then
    built from ``seed``, so a rerun builds the same network and can resume)."""
    if not isinstance(model, str):
        if random_init:
            raise UnsupportedOptionError(
                "random_init only applies when the model is given by name, not a built model"
            )
        return as_feature_model(model, create_kwargs)
    has_weights = bool(create_kwargs.get("pretrained") or create_kwargs.get("checkpoint_path"))
    if random_init and has_weights:
        raise UnsupportedOptionError(
            "random_init=True contradicts pretrained/checkpoint_path: ask for one of them"
        )
    if not (has_weights or random_init):
        import unifeat

        # An unknown name or option is the more useful error: check those first.
        unifeat.feature_info(model, **create_kwargs)
        raise UnsupportedOptionError(
            f"refusing to extract features of {model!r} with random weights: pass "
            "pretrained=True (--pretrained), checkpoint_path=... (--checkpoint FILE), or "
            "random_init=True (--random-init) if random features are what you want"
        )
    if random_init:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return as_feature_model(model, create_kwargs)
    return as_feature_model(model, create_kwargs)


def _own_copy(
    model: FeatureModel, device: torch.device, dtype: torch.dtype, channels_last: bool | None
) -> FeatureModel:
    """``model`` itself, or a copy where running it as asked would convert the
    caller's module in place (another dtype, device or memory format); its
    train/eval mode is restored after the run."""
    first = next(iter(model.parameters()), None)
    moves = first is not None and (first.device != device or first.dtype != dtype)
    if moves or (channels_last if channels_last is not None else device.type == "cuda"):
        return copy.deepcopy(model)
    return model


def weights_fingerprint(model: nn.Module) -> str:
    """A hash of every parameter and buffer (names, dtypes, shapes, values): two
    runs resume into one output only if their weights are bit-identical."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(model.state_dict().items()):
        if not isinstance(tensor, Tensor):
            continue
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        if tensor.is_meta:
            continue
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    return "blake2b:" + digest.hexdigest()


def _versions() -> dict[str, str]:
    import importlib.metadata

    import unifeat

    found = {"unifeat": unifeat.__version__, "python": platform.python_version()}
    for package in ("torch", "torchvision", "timm", "transformers", "open_clip_torch", "pillow"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            found[package] = importlib.metadata.version(package)
    return found


def provenance(
    model: FeatureModel,
    name: str | None,
    config: DataConfig,
    *,
    pool: str,
    dtype: torch.dtype,
    fast_decode: bool,
    part: tuple[int, int] | None,
    random_seed: int | None,
    create_kwargs: dict[str, Any],
) -> dict[str, Any]:
    """What the rows of an output were computed with, recorded in the store."""
    import datetime

    info = model.feature_info
    source = getattr(model, "model", model)
    checkpoint = create_kwargs.get("checkpoint_path")
    return {
        "model": name or f"{type(source).__module__}.{type(source).__qualname__}",
        "backend": model.backend,
        "weights": weights_fingerprint(model),
        "pretrained": bool(create_kwargs.get("pretrained")) if name else None,
        "checkpoint": str(checkpoint) if checkpoint else None,
        "random_init_seed": random_seed,
        "out_indices": list(info.out_indices),
        "levels": [level.model_dump() for level in info if level.index in info.out_indices],
        "pool": pool,
        "output_fmt": model.output_fmt,
        "data_config": config.model_dump(mode="json"),
        "input_size": list(config.input_size),
        "fast_decode": fast_decode,
        "dtype": str(dtype).removeprefix("torch."),
        "shard": f"{part[0]}/{part[1]}" if part else None,
        "versions": _versions(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


# -- pooling and the forward ------------------------------------------------------------


def pool_features(maps: Sequence[Any], pool: str, output_fmt: str = "NCHW") -> list[Tensor]:
    """One descriptor per level: ``avg``/``max`` over space, ``cls`` the first prefix
    token (token models), ``none`` the whole map. ``output_fmt`` says where the
    channels are (``"NHWC"`` maps give ``(N, C)`` descriptors too)."""
    spatial = (1, 2) if output_fmt == "NHWC" else (2, 3)
    pooled = []
    for item in maps:
        feature_map, prefix = item if isinstance(item, tuple) else (item, None)
        if not isinstance(feature_map, Tensor) or feature_map.dim() != 4:
            shape = tuple(feature_map.shape) if isinstance(feature_map, Tensor) else None
            raise UnsupportedOptionError(
                f"cannot pool a level of shape {shape}: expected a 4-D {output_fmt} map"
            )
        if pool == "avg":
            pooled.append(feature_map.float().mean(dim=spatial))
        elif pool == "max":
            pooled.append(feature_map.float().amax(dim=spatial))
        elif pool == "cls":
            if prefix is None or prefix.shape[1] == 0:
                raise UnsupportedOptionError(
                    "pool='cls' needs a token model with a class token; use 'avg' or 'max'"
                )
            pooled.append(prefix[:, 0].float())
        else:
            pooled.append(feature_map.float())
    return pooled


def level_names(model: FeatureModel) -> list[str]:
    """Column names of the levels, ``level_<index>``, in depth order."""
    return [f"level_{index}" for index in model.feature_info.out_indices]


class Embedder:
    """The device half of extraction: ``uint8`` ``(B, H, W, C)`` batch in, pooled
    ``float32`` arrays per level out. Shared by the local and the Ray engines,
    so both compute the same numbers."""

    def __init__(
        self,
        model: FeatureModel,
        config: DataConfig,
        *,
        pool: str,
        device: torch.device,
        dtype: torch.dtype = torch.float32,
        channels_last: bool | None = None,
    ) -> None:
        self.config = config
        self.pool = pool
        self.device = device
        self.dtype = dtype
        # channels_last helps convolutions on GPUs; on CPU it would change the
        # kernels, and the numbers would no longer match a hand-written loop.
        self.channels_last = device.type == "cuda" if channels_last is None else channels_last
        model = model.eval().to(device)
        if dtype != torch.float32:
            model = model.to(dtype)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self.names = level_names(model)

    def __call__(self, pixels: Tensor) -> dict[str, np.ndarray]:
        x = normalize(pixels.to(self.device, non_blocking=True), self.config, self.dtype)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            out = self.model(x)
            maps = list(out.values()) if isinstance(out, dict) else list(out)
            pooled = pool_features(maps, self.pool, self.model.output_fmt)
        return {
            name: t.to("cpu", torch.float32).numpy()
            for name, t in zip(self.names, pooled, strict=True)
        }


# -- the local engine -------------------------------------------------------------------


class _Decoder:
    """Path or bytes to the ``uint8`` ``(H, W, C)`` crop the model takes (a class,
    not a closure: DataLoader workers started by spawn get it pickled)."""

    def __init__(self, config: DataConfig, fast_decode: bool) -> None:
        self.config = config
        self.crop = geometry(config)
        self.fast_decode = fast_decode

    def _min_size(self, height: int, width: int) -> tuple[int, int]:
        return resize_size(self.config, height, width)

    def __call__(self, source: str | bytes) -> np.ndarray:
        min_size = self._min_size if self.fast_decode else None
        return self.crop(load_image(source, min_size=min_size))


def decoder(config: DataConfig, fast_decode: bool) -> Callable[[str | bytes], np.ndarray]:
    """Path or bytes to the ``uint8`` ``(H, W, C)`` crop the model takes."""
    return _Decoder(config, fast_decode)


class _Decode(torch.utils.data.Dataset):
    def __init__(self, paths: Sequence[str], decode: Callable[[str], np.ndarray]) -> None:
        self.paths = list(paths)
        self.decode = decode

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, np.ndarray | None, str]:
        try:
            return index, self.decode(self.paths[index]), ""
        except ImageReadError as exc:
            return index, None, str(exc).removeprefix(f"{self.paths[index]}: ")
        except Exception as exc:  # a decoder bug must not end a million-image run
            return index, None, f"{type(exc).__name__}: {exc}"


def _collate(
    items: list[tuple[int, np.ndarray | None, str]],
) -> tuple[list[int], Tensor | None, list[tuple[int, str]]]:
    good = [(i, a) for i, a, _ in items if a is not None]
    bad = [(i, why) for i, a, why in items if a is None]
    batch = torch.from_numpy(np.stack([a for _, a in good])) if good else None
    return [i for i, _ in good], batch, bad


def aligned_batches(listed: Sequence[str], todo: set[str], batch_size: int) -> list[list[str]]:
    """The batches still to run: fixed slices of the whole listing, less what is
    done. A resumed run then runs exactly the batches an uninterrupted run
    would have (rows are committed in whole batches), and CPU kernels, whose
    results can depend on the batch, give bit-identical rows."""
    batches = []
    for start in range(0, len(listed), batch_size):
        batch = [p for p in listed[start : start + batch_size] if p in todo]
        if batch:
            batches.append(batch)
    return batches


def _local_batches(
    batches: Sequence[Sequence[str]],
    embed: Embedder,
    *,
    num_workers: int,
    fast_decode: bool,
) -> Iterator[Batch]:
    todo = [path for batch in batches for path in batch]
    starts = np.cumsum([0] + [len(batch) for batch in batches])
    loader = torch.utils.data.DataLoader(
        _Decode(todo, decoder(embed.config, fast_decode)),
        batch_sampler=[list(range(a, b)) for a, b in itertools.pairwise(starts)],
        num_workers=num_workers,
        collate_fn=_collate,
        pin_memory=embed.device.type == "cuda",
    )
    for positions, batch, bad in loader:
        failures = [(todo[i], why) for i, why in bad]
        if batch is None:
            yield [], {}, failures
            continue
        yield [todo[i] for i in positions], embed(batch), failures


def _local_engine(run: EngineRun) -> Iterator[Batch]:
    """This process runs the model; DataLoader workers decode."""
    embed = Embedder(
        run.model,
        run.config,
        pool=run.pool,
        device=run.device,
        dtype=run.dtype,
        channels_last=run.channels_last,
    )
    return _local_batches(
        run.batches, embed, num_workers=run.num_workers, fast_decode=run.fast_decode
    )


register_engine(Engine("local", _local_engine))


# -- extract ------------------------------------------------------------------------------


def extract(
    model: nn.Module | str,
    images: str | os.PathLike[str] | Iterable[str | os.PathLike[str]],
    output: str | Path,
    *,
    pool: str = "avg",
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
    format: str | None = None,
    flush_every: int = 1024,
    input_size: tuple[int, int] | None = None,
    overwrite: bool = False,
    retry_failed: bool = False,
    fast_decode: bool = False,
    dtype: str | torch.dtype = "float32",
    channels_last: bool | None = None,
    shard: str | tuple[int, int] | None = None,
    engine: str = "local",
    address: str | None = None,
    progress: bool = True,
    random_init: bool = False,
    seed: int = 0,
    **create_kwargs: Any,
) -> ExtractResult:
    """Extract features of image files into a crash-safe, resumable store.

    Args:
        model: a feature model from :func:`unifeat.create_model`, or a name
            (then built with ``features_only=True`` and ``create_kwargs``, which
            must ask for weights: ``pretrained=True`` or ``checkpoint_path=``,
            or ``random_init=True`` for random features on purpose).
        images: an image file or folder, or a list of them (folders are
            searched recursively, symlinked folders followed). Paths are stored
            absolute with symlinks resolved.
        output: ``feats.safetensors``, ``feats.parquet`` or ``feats.npy`` (or
            any name with ``format``); shards are written beside it
            (``feats.00000.parquet``, ...) with the index ``feats.index.json``.
            An existing folder (or a path ending in ``/``) holds the store
            inside it as ``features.*`` (see the docs page "Extraction").
        pool: ``"avg"`` or ``"max"`` over space, ``"cls"`` (the class token of a
            token model) or ``"none"`` (whole maps).
        batch_size: images per forward; results do not depend on it.
        device: where the model runs (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...).
        num_workers: ``DataLoader`` processes decoding and resizing images.
        format: ``"safetensors"``, ``"parquet"`` or ``"npy"``; default: from
            ``output``'s suffix.
        flush_every: rows per shard: at most this many finished rows are lost to
            a ``kill -9`` (none to Ctrl-C, which commits what is finished).
            Whole maps are also flushed every 256 MB, and any buffer every two
            minutes.
        input_size: ``(H, W)`` to preprocess to; the rest of the model's recipe
            is kept. Default: the model's own.
        overwrite: start the output over instead of adding to it.
        retry_failed: try again the images an earlier run recorded as unreadable.
        fast_decode: decode JPEGs at a reduced size (PIL's ``draft``), never
            below what the resize needs; much faster on large photos, slightly
            different numbers (see the docs page "Extraction at scale").
        dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"`` for the model;
            descriptors are stored as float32.
        channels_last: the model and batches in channels-last memory format;
            default: on for CUDA, off elsewhere.
        shard: ``"i/n"``: this process takes part ``i`` of ``n`` disjoint parts
            (by a hash of each path) and writes ``feats.partIofN.*``; combine
            the parts with :func:`merge_features` (``unifeat merge``).
        engine: ``"local"`` (this process and its DataLoader workers) or
            ``"ray"`` (Ray Data; :mod:`unifeat.ray`).
        address: the Ray cluster for ``engine="ray"`` (``"auto"``,
            ``"ray://host:10001"``); default: a local cluster.
        progress: show a progress bar on stderr.
        random_init: build the named model with random weights on purpose.
        seed: the seed of ``random_init``'s weights.
        **create_kwargs: options for :func:`unifeat.create_model` when ``model``
            is a name (``pretrained``, ``checkpoint_path``, ``out_indices``, ...).

    Returns:
        An :class:`ExtractResult`. Unreadable images are recorded with their
        reason in the output and listed in ``failed``; a rerun skips them
        unless ``retry_failed``.

    Raises:
        ProvenanceMismatchError: the output holds rows computed with another
            model, weights, levels, pool, preprocessing or dtype.
        StoreLockedError: another process is writing the same output.
        StoreError: the output's index names a shard outside its folder, or a
            damaged shard held images this run does not list (a damaged shard
            whose images it lists is extracted again).
        UnsupportedOptionError: an invalid option value, or random weights by
            name without ``random_init=True``.

    Examples:
        >>> import tempfile, pathlib
        >>> from PIL import Image
        >>> folder = pathlib.Path(tempfile.mkdtemp())
        >>> for i in range(3):
        ...     Image.new("RGB", (40, 30), (80 * i, 40, 90)).save(folder / f"{i}.png")
        >>> result = extract("tv:resnet18", [folder], folder / "feats.parquet", random_init=True,
        ...                  out_indices=(-1,), input_size=(64, 64), progress=False)
        >>> result.written, load_features(result.index_path)["level_4"].shape
        (3, torch.Size([3, 512]))
    """
    if pool not in POOLS:
        raise UnsupportedOptionError(f"invalid pool={pool!r}: expected {format_choices(POOLS)}")
    runner = get_engine(engine)
    batch_size = _positive("batch_size", batch_size)
    flush_every = _positive("flush_every", flush_every)
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise UnsupportedOptionError(
            f"invalid num_workers={num_workers!r}: expected an integer >= 0"
        )
    if input_size is not None and (
        len(input_size) != 2 or any(not isinstance(s, int) or s < 1 for s in input_size)
    ):
        raise UnsupportedOptionError(
            f"invalid input_size={input_size!r}: expected (height, width), both >= 1"
        )
    part = parse_part(shard)
    torch_dtype = parse_dtype(dtype)
    torch_device = parse_device(device, here=runner.devices_here)
    paths = part_paths(store_paths(output, format), part)
    if address is not None and not runner.takes_address:
        raise UnsupportedOptionError(
            f"address only applies to an engine that runs on a cluster (engine='ray'), not "
            f"engine={engine!r}"
        )
    # Listed first: a missing folder is reported before any model is built.
    listed = [p for p in find_images(images) if in_part(p, part)]
    name = model if isinstance(model, str) else None
    was_training = model.training if isinstance(model, nn.Module) else False
    if pool == "cls" and isinstance(model, str):
        create_kwargs.setdefault("return_prefix_tokens", True)
    kwargs = dict(create_kwargs)
    feature_model = build_for_extraction(model, create_kwargs, random_init=random_init, seed=seed)
    if not isinstance(model, str):
        feature_model = _own_copy(feature_model, torch_device, torch_dtype, channels_last)
    config = _with_input_size(model_data_config(feature_model), input_size)
    record = provenance(
        feature_model,
        name,
        config,
        pool=pool,
        dtype=torch_dtype,
        fast_decode=fast_decode,
        part=part,
        random_seed=seed if random_init else None,
        create_kwargs=kwargs,
    )
    store = Store(
        paths, record, overwrite=overwrite, flush_every=flush_every, listing=listed
    ).open()
    completed = False
    try:
        known_failed = store.failed
        todo = [
            p for p in listed if p not in store.done and (retry_failed or p not in known_failed)
        ]
        kept_failures = [
            (p, known_failed[p]) for p in listed if p in known_failed and not retry_failed
        ]
        batches_todo = aligned_batches(listed, set(todo), batch_size)
        skipped = sum(1 for p in listed if p in store.done)
        batches = runner.run(
            EngineRun(
                batches=batches_todo,
                model=feature_model,
                config=config,
                pool=pool,
                device=torch_device,
                dtype=torch_dtype,
                channels_last=channels_last,
                fast_decode=fast_decode,
                num_workers=num_workers,
                address=address,
            )
        )
        failures: list[tuple[str, str]] = []
        bar = _progress(len(todo), progress)
        try:
            for rows, levels, bad in batches:
                for path, why in bad:
                    print(f"unifeat extract: skipped {path}: {why}", file=sys.stderr)
                failures += bad
                store.add(rows, levels, bad)
                bar.update(len(rows) + len(bad))
        finally:
            bar.close()
        completed = True
    finally:
        # Ctrl-C or an error: what is finished is committed all the same.
        store.close(complete=completed)
        if not isinstance(model, str):
            model.train(was_training)
    return ExtractResult(
        index_path=paths.index,
        written=store.written,
        skipped=skipped,
        failed=kept_failures + failures,
        output=paths.display,
    )


def _progress(total: int, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="img", disable=not enabled, file=sys.stderr)


# -- reading ----------------------------------------------------------------------------


def load_features(output: str | Path) -> dict[str, Any]:
    """Read what :func:`extract` wrote, in any of its formats.

    Args:
        output: the output path (``feats.parquet``, ...), its index
            (``feats.index.json``), or the folder given to :func:`extract`.

    Returns:
        ``{"paths": [...], "level_<i>": Tensor, ..., "failed": [(path, reason), ...],
        "provenance": {...}}``: committed shards concatenated in order (rows in
        the order they were written), float32 ``(N, D)`` descriptors or
        ``(N, C, H, W)`` maps; ``failed`` lists the images recorded as
        unreadable; ``provenance`` is what the rows were computed with (model,
        weights hash, levels, pool, preprocessing, dtype, versions).

    Raises:
        StoreError: no output there; its index is damaged or names a shard
            outside its folder; a shard is missing, truncated or garbled (the
            message names the file, its rows and how to repair it).

    Examples:
        >>> import tempfile, pathlib
        >>> from PIL import Image
        >>> folder = pathlib.Path(tempfile.mkdtemp())
        >>> Image.new("RGB", (32, 32), "tan").save(folder / "a.png")
        >>> (folder / "b.jpg").write_bytes(b"not a jpeg")
        10
        >>> result = extract("tv:resnet18", [folder], folder / "f.npy", random_init=True,
        ...                  out_indices=(1, 2), input_size=(32, 32), progress=False)
        >>> features = load_features(folder / "f.npy")
        >>> sorted(features), features["level_2"].shape
        (['failed', 'level_1', 'level_2', 'paths', 'provenance'], torch.Size([1, 128]))
        >>> [pathlib.Path(p).name for p, reason in features["failed"]]
        ['b.jpg']
    """
    paths, index = open_index(output)
    rows: list[str] = []
    parts: dict[str, list[np.ndarray]] = {}
    for shard_rows, levels in iter_shards(paths, index):
        rows += shard_rows
        for name, array in levels.items():
            parts.setdefault(name, []).append(array)
    result: dict[str, Any] = {
        name: torch.from_numpy(np.concatenate(arrays)) for name, arrays in parts.items()
    }
    result["paths"] = rows
    result["failed"] = sorted(index.get("failed", {}).items())
    result["provenance"] = index.get("provenance", {})
    return result


def load_matrix(output: str | Path, level: int | str | None = None) -> np.ndarray:
    """One level of an extraction output as a C-contiguous float32 ``(N, D)`` numpy
    matrix, rows in :func:`load_features`' order: what FAISS indexes take.

    Args:
        output: the output path, its index, or its folder.
        level: the level index (``4``) or column name (``"level_4"``); may be
            omitted when the output has a single level. Whole maps
            (``pool="none"``) are flattened to ``(N, C*H*W)``.

    Examples:
        >>> import tempfile, pathlib
        >>> from PIL import Image
        >>> folder = pathlib.Path(tempfile.mkdtemp())
        >>> for color in ("red", "blue"):
        ...     Image.new("RGB", (32, 32), color).save(folder / f"{color}.png")
        >>> _ = extract("tv:resnet18", [folder], folder / "f.parquet", random_init=True,
        ...             out_indices=(-1,), input_size=(32, 32), progress=False)
        >>> matrix = load_matrix(folder / "f.parquet")
        >>> matrix.shape, matrix.dtype, matrix.flags["C_CONTIGUOUS"]
        ((2, 512), dtype('float32'), True)
    """
    paths, index = open_index(output)
    names = [f"level_{i}" for i in index.get("provenance", {}).get("out_indices", [])]
    if level is None:
        if len(names) != 1:
            raise UnsupportedOptionError(
                f"{paths.display} has levels {format_choices(names)}: say which with level="
            )
        wanted = names[0]
    else:
        wanted = level if isinstance(level, str) else f"level_{level}"
        if names and wanted not in names:
            raise UnsupportedOptionError(
                f"{paths.display} has no {wanted!r}: its levels are {format_choices(names)}"
            )
    chunks = [levels[wanted] for _, levels in iter_shards(paths, index, mmap=True)]
    if not chunks:
        return np.zeros((0, 0), dtype=np.float32)
    flat = [c.reshape(len(c), -1) for c in chunks]
    if len(flat) == 1:
        return np.ascontiguousarray(flat[0], dtype=np.float32)
    return np.ascontiguousarray(np.concatenate(flat), dtype=np.float32)


# -- merging parts --------------------------------------------------------------------------


def merge_features(
    parts: Sequence[str | Path],
    output: str | Path,
    *,
    format: str | None = None,
    overwrite: bool = False,
    flush_every: int = 4096,
) -> ExtractResult:
    """Combine the parts written with ``shard="i/n"`` into one output.

    Every part ``0..n-1`` must be there, complete, and computed the same way
    (same model, weights, levels, pool, preprocessing, dtype); rows are written
    sorted by path, which is the order a single run over one folder writes.

    Args:
        parts: the parts' outputs or indexes (``feats.part0of3.parquet``, ...);
            empty: every ``OUTPUT_STEM.partIofN`` beside ``output``.
        output: the merged output; its format may differ from the parts'.
        format: as in :func:`extract`.
        overwrite: replace an existing output.
        flush_every: rows per shard of the merged output.

    Examples:
        >>> import tempfile, pathlib
        >>> from PIL import Image
        >>> folder = pathlib.Path(tempfile.mkdtemp())
        >>> for i in range(4):
        ...     Image.new("RGB", (32, 32), (60 * i, 0, 0)).save(folder / f"{i}.png")
        >>> for i in range(2):
        ...     _ = extract("tv:resnet18", [folder], folder / "f.npy", shard=f"{i}/2",
        ...                 random_init=True, out_indices=(-1,), input_size=(32, 32),
        ...                 progress=False)
        >>> merge_features([], folder / "f.npy").written
        4
    """
    flush_every = _positive("flush_every", flush_every)
    target = store_paths(output, format)
    sources = [open_index(p) for p in parts] if parts else _discover_parts(target)
    if not sources:
        raise StoreError(f"no parts to merge for {target.display}")
    first = sources[0][1]["provenance"]
    count = _part_count(first, sources[0][0])
    seen: dict[int, StorePaths] = {}
    for paths, index in sources:
        record = index["provenance"]
        if _part_count(record, paths) != count:
            raise StoreError(f"{paths.display} is a part of another split than {first['shard']}")
        number = int(record["shard"].split("/")[0])
        if number in seen:
            raise StoreError(
                f"part {number}/{count} given twice: {seen[number].display}, {paths.display}"
            )
        seen[number] = paths
        if not index.get("complete"):
            raise StoreError(
                f"{paths.display} is incomplete (its run was interrupted): rerun its "
                "extract command first"
            )
        found = [d for d in differences(first, record) if not d.startswith("shard:")]
        if found:
            raise StoreError(
                f"cannot merge {paths.display} with {sources[0][0].display}: " + "; ".join(found)
            )
    missing = sorted(set(range(count)) - set(seen))
    if missing:
        raise StoreError(
            f"parts {', '.join(f'{m}/{count}' for m in missing)} of {target.display} are missing"
        )
    record = dict(first, shard=None)
    where: dict[str, tuple[int, int, int]] = {}
    failed: dict[str, str] = {}
    for number, (paths, index) in enumerate(sources):
        failed.update(index.get("failed", {}))
        for shard_number in range(len(index["shards"])):
            for row, path in enumerate(read_shard_paths(paths, index, shard_number)):
                if path in where:
                    raise StoreError(f"{path} is in two parts: the parts overlap")
                where[path] = (number, shard_number, row)
    store = Store(target, record, overwrite=overwrite, flush_every=flush_every).open()
    completed = False
    try:
        if store.done:
            raise StoreError(
                f"{target.display} already has rows: merge into a new output or use overwrite"
            )
        cache: dict[tuple[int, int], dict[str, np.ndarray]] = {}
        order = sorted(where)
        for start in range(0, len(order), flush_every):
            chunk = order[start : start + flush_every]
            rows: dict[str, list[np.ndarray]] = {}
            for path in chunk:
                number, shard_number, row = where[path]
                key = (number, shard_number)
                if key not in cache:
                    if len(cache) > 2 * len(sources):
                        cache.pop(next(iter(cache)))
                    paths, index = sources[number]
                    cache[key] = read_shard(paths, index, shard_number, mmap=True)[1]
                for name, array in cache[key].items():
                    rows.setdefault(name, []).append(array[row])
            store.add(chunk, {name: np.stack(values) for name, values in rows.items()})
        store.add([], {}, sorted(failed.items()))
        completed = True
    finally:
        store.close(complete=completed)
    return ExtractResult(
        index_path=target.index,
        written=store.written,
        skipped=0,
        failed=sorted(failed.items()),
        output=target.display,
    )


def _part_count(record: dict[str, Any], paths: StorePaths) -> int:
    spec = record.get("shard")
    if not spec:
        raise StoreError(f"{paths.display} is not a part written with shard='i/n'")
    return int(str(spec).split("/")[1])


def _discover_parts(target: StorePaths) -> list[tuple[StorePaths, dict[str, Any]]]:
    import re

    found = []
    pattern = re.compile(rf"{re.escape(target.stem)}\.part(\d+)of(\d+)\.index\.json")
    for entry in sorted(target.folder.glob(f"{target.stem}.part*of*.index.json")):
        if pattern.fullmatch(entry.name):
            found.append(open_index(entry))
    return found
