"""Ray Data stages for extracting features over many machines (``pip install "unifeat[ray]"``).

Two callable classes, used as Ray Data users expect, on ``dict[str, np.ndarray]``
batches:

* :class:`Preprocess`: image bytes or paths to ``uint8`` crops at the model's
  input size (CPU work: decode, resize, crop), with an ``error`` column for
  images that cannot be read;
* :class:`Embed`: crops to pooled float32 descriptors per level (an actor:
  the feature model is built once, batches are normalized on its device).

They are the two halves of what ``unifeat extract`` does in one process, and
give the same numbers (see the docs page "Extraction at scale")::

    import ray, unifeat.ray

    ds = ray.data.read_binary_files("s3://bucket/photos/", include_paths=True)
    ds = ds.map_batches(unifeat.ray.Preprocess, fn_constructor_kwargs={"model": "resnet50"},
                        compute=ray.data.ActorPoolStrategy(size=8))
    ds = ds.map_batches(unifeat.ray.Embed,
                        fn_constructor_kwargs={"model": "resnet50", "pretrained": True},
                        compute=ray.data.ActorPoolStrategy(size=2), num_gpus=1, batch_size=64)
    ds.filter(lambda row: row["error"] == "").write_parquet("local:///data/feats")

``unifeat extract ... --engine ray`` runs this pipeline and writes the rows
through the same crash-safe, resumable store as the local engine.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from unifeat._data import DataConfig, data_config, with_input_size
from unifeat._engines import Batch, Engine, EngineRun, register_engine
from unifeat._errors import BackendUnavailableError, UnsupportedOptionError
from unifeat._extract import (
    POOLS,
    Embedder,
    build_for_extraction,
    decoder,
    level_names,
    parse_device,
    parse_dtype,
)
from unifeat._images import ImageReadError

__all__ = ["Embed", "Preprocess"]


def _as_config(
    config: DataConfig | dict[str, Any] | None, model: str | nn.Module | None, **kwargs: Any
) -> DataConfig:
    if isinstance(config, DataConfig):
        return config
    if isinstance(config, dict):
        return DataConfig(**config)
    if model is None:
        raise UnsupportedOptionError("give config= (a DataConfig or its dict) or model=")
    if isinstance(model, str):
        with torch.device("meta"):
            return data_config(model, **kwargs)
    return data_config(model)


class Preprocess:
    """Ray Data stage: image bytes (or paths) to ``uint8`` crops at the model's size.

    Input batches have a ``bytes`` column (``ray.data.read_binary_files``) or a
    ``path`` column, or both; output batches have ``path``, ``image`` (``uint8``
    ``(B, H, W, C)``) and ``error`` (``""``, or why the image could not be read:
    its ``image`` is then zeros). A corrupt image is an error row, never a failed
    task.

    Args:
        config: a :class:`~unifeat.DataConfig` or its ``model_dump()``; default:
            resolved from ``model``.
        model: a model name whose :func:`~unifeat.data_config` to use.
        fast_decode: reduced-size JPEG decoding (see :func:`unifeat.extract`).
        input_size: ``(H, W)`` overriding the config's.
        **create_kwargs: options for resolving ``model``'s config by name.

    Examples:
        >>> import io, numpy as np
        >>> from PIL import Image
        >>> buffer = io.BytesIO()
        >>> Image.new("RGB", (80, 60), "teal").save(buffer, format="PNG")
        >>> stage = Preprocess(model="timm:resnet18", input_size=(32, 32))
        >>> out = stage({"bytes": np.array([buffer.getvalue(), b"junk"], dtype=object),
        ...              "path": np.array(["ok.png", "bad.jpg"])})
        >>> out["image"].shape, out["image"].dtype, [bool(e) for e in out["error"]]
        ((2, 32, 32, 3), dtype('uint8'), [False, True])
    """

    def __init__(
        self,
        config: DataConfig | dict[str, Any] | None = None,
        *,
        model: str | nn.Module | None = None,
        fast_decode: bool = False,
        input_size: Sequence[int] | None = None,
        **create_kwargs: Any,
    ) -> None:
        self.config = with_input_size(_as_config(config, model, **create_kwargs), input_size)
        self.decode = decoder(self.config, fast_decode)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        sources = batch.get("bytes")
        paths = batch.get("path")
        if sources is None and paths is None:
            raise UnsupportedOptionError(
                f"Preprocess needs a 'bytes' or a 'path' column, got {sorted(batch)}"
            )
        count = len(sources if sources is not None else paths)  # type: ignore[arg-type]
        channels, height, width = self.config.input_size
        images = np.zeros((count, height, width, channels), dtype=np.uint8)
        errors = []
        for i in range(count):
            source: Any = sources[i] if sources is not None else str(paths[i])  # type: ignore[index]
            try:
                images[i] = self.decode(bytes(source) if sources is not None else source)
                errors.append("")
            except ImageReadError as exc:
                errors.append(str(exc).removeprefix(f"{source}: ").removeprefix("<bytes>: "))
            except Exception as exc:  # a decoder bug must not fail the task
                errors.append(f"{type(exc).__name__}: {exc}")
        names = paths if paths is not None else np.array([""] * count)
        return {
            "path": np.asarray([str(p) for p in names]),
            "image": images,
            "error": np.array(errors, dtype=str),
        }


class Embed:
    """Ray Data stage (an actor): ``uint8`` crops to pooled descriptors.

    Builds the feature model once per actor, normalizes each batch on its
    device with the model's :class:`~unifeat.DataConfig`, runs it, pools.
    Input batches are :class:`Preprocess`' output; output batches have
    ``path``, ``error`` and one float32 column per level (``level_<i>``:
    ``(B, D)``, or ``(B, C, H, W)`` with ``pool="none"``), NaN on error rows.

    Args:
        model: a feature model (shipped to each actor) or a model name, built
            with ``features_only=True`` and ``create_kwargs``; by name, weights
            must be asked for (``pretrained=True``, ``checkpoint_path=``) or
            ``random_init=True`` given, as in :func:`unifeat.extract`.
        pool: ``"avg"``, ``"max"``, ``"cls"`` or ``"none"``.
        device: default: ``"cuda"`` when the actor has a GPU, else ``"cpu"``.
        dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"``.
        config: the preprocessing the crops were made with (default: the
            model's own), for the normalization.
        input_size: ``(H, W)`` overriding the config's.
        channels_last: as in :func:`unifeat.extract`.
        random_init: build the named model with random weights from ``seed``.
        seed: the seed of ``random_init``.

    Examples:
        >>> import numpy as np
        >>> stage = Embed("tv:resnet18", random_init=True, out_indices=(-1,), input_size=(32, 32))
        >>> out = stage({"path": np.array(["a", "b"]), "error": np.array(["", "corrupt"]),
        ...              "image": np.zeros((2, 32, 32, 3), np.uint8)})
        >>> out["level_4"].shape, bool(np.isnan(out["level_4"][1]).all())
        ((2, 512), True)
    """

    def __init__(
        self,
        model: str | nn.Module,
        *,
        pool: str = "avg",
        device: str | None = None,
        dtype: str = "float32",
        config: DataConfig | dict[str, Any] | None = None,
        input_size: Sequence[int] | None = None,
        channels_last: bool | None = None,
        random_init: bool = False,
        seed: int = 0,
        **create_kwargs: Any,
    ) -> None:
        from unifeat._data import model_data_config

        if pool not in POOLS:
            raise UnsupportedOptionError(f"invalid pool={pool!r}: expected one of {POOLS}")
        if pool == "cls" and isinstance(model, str):
            create_kwargs.setdefault("return_prefix_tokens", True)
        feature_model = build_for_extraction(
            model, create_kwargs, random_init=random_init, seed=seed
        )
        chosen = device or ("cuda" if torch.cuda.is_available() else "cpu")
        resolved = (
            _as_config(config, None) if config is not None else model_data_config(feature_model)
        )
        self.embed = Embedder(
            feature_model,
            with_input_size(resolved, input_size),
            pool=pool,
            device=parse_device(chosen),
            dtype=parse_dtype(dtype),
            channels_last=channels_last,
        )

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = batch["image"]
        errors = np.asarray(batch.get("error", np.array([""] * len(images))), dtype=str)
        good = np.flatnonzero(errors == "")
        out: dict[str, np.ndarray] = {"path": np.asarray(batch["path"]), "error": errors}
        levels = (
            self.embed(torch.from_numpy(np.ascontiguousarray(images[good]))) if len(good) else {}
        )
        for name in self.embed.names:
            if name in levels:
                values = levels[name]
                full = np.full((len(images), *values.shape[1:]), np.nan, dtype=np.float32)
                full[good] = values
            else:
                full = np.full((len(images), 0), np.nan, dtype=np.float32)
            out[name] = full
        return out


# -- the engine behind ``unifeat extract --engine ray`` ------------------------------------


def _preprocess_task(
    batch: dict[str, np.ndarray], config: dict[str, Any], fast_decode: bool
) -> dict[str, np.ndarray]:
    # Tasks, not actors: decoding scales with the cluster's free CPUs.
    return Preprocess(config, fast_decode=fast_decode)(batch)


def _ray_batches(run: EngineRun) -> Iterator[Batch]:
    """Preprocess -> Embed on Ray Data over the run's batches, rows back in their order."""
    batches, model, config, device = run.batches, run.model, run.config, run.device
    if not batches:
        return
    try:
        import pyarrow as pa
        import ray
        import ray.data
    except ImportError:
        raise BackendUnavailableError(
            'engine="ray" needs Ray Data: pip install "unifeat[ray]"'
        ) from None
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    started = not ray.is_initialized()
    if started:
        ray.init(
            address=run.address,
            include_dashboard=False,
            logging_level=logging.ERROR,
            log_to_driver=False,
        )
    try:
        context = ray.data.DataContext.get_current()
        # Rows in input order, so the output equals the local engine's row for row.
        context.execution_options.preserve_order = True
        context.enable_progress_bars = False
        logging.getLogger("ray.data").setLevel(logging.ERROR)
        resources = ray.cluster_resources()
        gpu = device.type == "cuda"
        # On GPUs: up to one actor per GPU, decoding in CPU tasks. On CPUs Ray
        # fuses decoding into the actors: up to one per CPU, each decoding and
        # running; Ray's autoscaling adds them as resources allow.
        actors = max(1, int(resources.get("GPU" if gpu else "CPU", 1)))
        # One block per batch: every forward sees the same images as the local
        # engine's, whatever Ray's block sizing would do.
        blocks = [pa.table({"path": list(batch)}) for batch in batches]
        dataset: Any = ray.data.from_arrow(blocks)
        dataset = dataset.map_batches(
            _preprocess_task,
            fn_kwargs={"config": config.model_dump(mode="json"), "fast_decode": run.fast_decode},
            batch_size=None,
            batch_format="numpy",
        )
        dataset = dataset.map_batches(
            Embed,
            fn_constructor_kwargs={
                # Ray Data ships constructor arguments through its object store
                # (and logs that actors holding such arguments cannot be restarted).
                "model": model,
                "pool": run.pool,
                "device": str(device),
                "dtype": str(run.dtype).removeprefix("torch."),
                "config": config.model_dump(mode="json"),
                "channels_last": run.channels_last,
            },
            batch_size=None,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=actors),
            num_gpus=1 if gpu else 0,
            num_cpus=0 if gpu else 1,
        )
        names = level_names(model)
        for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
            errors = [str(e) for e in batch["error"]]
            paths = [str(p) for p in batch["path"]]
            good = [i for i, e in enumerate(errors) if not e]
            failures = [(paths[i], errors[i]) for i, e in enumerate(errors) if e]
            levels = {name: np.ascontiguousarray(batch[name][good]) for name in names}
            yield [paths[i] for i in good], levels if good else {}, failures
    finally:
        if started:
            ray.shutdown()


# Ray's actors may have GPUs the driver lacks; address names the cluster.
register_engine(Engine("ray", _ray_batches, devices_here=False, takes_address=True))
