"""The extraction store: shards plus an index, crash-safe, with provenance.

Layout, for ``-o feats.parquet`` (likewise ``.safetensors`` and ``.npy``; an
existing folder as the output holds ``features.*`` inside it)::

    feats.index.json          what is committed: provenance, shards, failed images
    feats.00000.parquet       one shard per flush: paths and one column per level
    feats.lock                the writer's pid and host while a run is going

Every file is written under a temporary name, flushed to disk and renamed into
place; the index is renamed last. The index is the only truth: a shard it does
not name (a run killed between the two renames) is deleted by the next run,
whose rows are then computed again. So a ``kill -9`` at any moment leaves the
previous committed state or the new one, and a rerun ends with each readable
image exactly once (see the docs page "Extraction at scale").
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import os
import re
import secrets
import socket
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

import numpy as np

from unifeat._errors import UnifeatError, UnsupportedOptionError, format_choices

FORMATS = ("safetensors", "parquet", "npy")
INDEX_FORMAT = "unifeat-features/2"
_OLD_INDEX_FORMAT = "unifeat-features/1"
MAX_BUFFER_BYTES = 256 << 20
"""Buffered rows are committed at this size whatever ``flush_every`` says, so
whole maps (``pool="none"``) never pile up in memory."""
# Provenance entries that must match for a run to add to an existing store.
IDENTITY = (
    "model",
    "backend",
    "weights",
    "out_indices",
    "levels",
    "pool",
    "output_fmt",
    "data_config",
    "fast_decode",
    "dtype",
    "shard",
)


class StoreError(UnifeatError, RuntimeError):
    """An extraction output that cannot be written or read as asked: locked by
    another writer, written with other settings, or damaged."""


class StoreLockedError(StoreError):
    """Another process is writing the same output."""


class ProvenanceMismatchError(StoreError, ValueError):
    """A run would add rows computed differently from those already stored."""


DEFAULT_STEM = "features"
"""The stem of a store written into a folder given as the output: ``outdir/``
holds ``outdir/features.index.json`` and ``outdir/features.00000.safetensors``."""


# -- names ----------------------------------------------------------------------------


@dataclass(frozen=True)
class StorePaths:
    """Where a store's files are: ``folder/stem.*``."""

    folder: Path
    stem: str
    storage: str

    @property
    def index(self) -> Path:
        return self.folder / f"{self.stem}.index.json"

    @property
    def lock(self) -> Path:
        return self.folder / f"{self.stem}.lock"

    @property
    def display(self) -> str:
        return str(self.folder / f"{self.stem}.{self.storage}")

    def shard_files(self, number: int, levels: Sequence[str]) -> dict[str, str]:
        """``{role: file name}`` of shard ``number``: one file, or for npy one per
        level plus the paths."""
        base = f"{self.stem}.{number:05d}"
        if self.storage == "npy":
            files = {name: f"{base}.{name}.npy" for name in levels}
            files["paths"] = f"{base}.paths.npy"
            return files
        return {"shard": f"{base}.{self.storage}"}

    def is_shard_name(self, name: str) -> bool:
        # Any format's shard names: the index (shared by all formats) is the truth.
        pattern = rf"{re.escape(self.stem)}\.\d{{5,}}\.(?:safetensors|parquet|\w+\.npy)"
        return re.fullmatch(pattern, name) is not None

    def is_temp_name(self, name: str) -> bool:
        return name.startswith(f".{self.stem}.") and ".tmp-" in name


def names_folder(output: str | os.PathLike[str]) -> bool:
    """Whether ``output`` is a folder to write the store in: an existing folder,
    or a path ending in a separator (then created)."""
    text = os.fspath(output)
    separators = tuple(s for s in (os.sep, os.altsep, "/") if s)
    return os.path.isdir(text) or text.endswith(separators)


def store_paths(output: str | os.PathLike[str], storage: str | None = None) -> StorePaths:
    """The store an output path names: ``feats.parquet``, ``feats.index.json``,
    a folder (the store ``features.*`` inside it), or any other name
    (safetensors unless ``storage`` says otherwise)."""
    path = Path(output)
    if storage is not None and storage not in FORMATS:
        raise UnsupportedOptionError(
            f"invalid format={storage!r}: expected {format_choices(FORMATS)}"
        )
    if names_folder(output):
        if storage is None:
            # A rerun into the folder resumes its store, whatever format it has.
            index = read_index(path / f"{DEFAULT_STEM}.index.json")
            storage = index.get("storage", "safetensors") if index else "safetensors"
        return StorePaths(path, DEFAULT_STEM, storage)
    name = path.name
    if name.endswith(".index.json"):
        stem = name[: -len(".index.json")]
        if storage is None:
            index = read_index(path)
            storage = index.get("storage", "safetensors") if index else None
        if storage is None:
            raise StoreError(f"no extraction index at {str(path)!r}")
        return StorePaths(path.parent, stem, storage)
    suffix = path.suffix.lstrip(".").lower()
    if suffix in FORMATS:
        if storage is not None and storage != suffix:
            raise UnsupportedOptionError(
                f"output {name!r} ends in .{suffix} but format={storage!r}: name the output "
                f".{storage} or drop the format"
            )
        return StorePaths(path.parent, path.stem, suffix)
    # Any other name: the whole name is the stem, safetensors unless told.
    return StorePaths(path.parent, name, storage or "safetensors")


def part_paths(paths: StorePaths, part: tuple[int, int] | None) -> StorePaths:
    """The store of part ``i`` of ``n`` (``--shard i/n``): ``feats.part0of3.parquet``."""
    if part is None:
        return paths
    return StorePaths(paths.folder, f"{paths.stem}.part{part[0]}of{part[1]}", paths.storage)


# -- atomic files ---------------------------------------------------------------------


def _fsync_folder(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every file system lets folders be synced
        handle = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(handle)
        finally:
            os.close(handle)


def atomic_write(target: Path, write: Callable[[IO[bytes]], Any]) -> None:
    """Write ``target`` so that it is either absent/old or complete: a temporary
    file in the same folder, flushed to disk, then renamed over ``target``."""
    temp = target.with_name(f".{target.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        with open(temp, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            temp.unlink()
        raise
    _fsync_folder(target.parent)


def read_index(path: Path) -> dict[str, Any] | None:
    """The index at ``path``, or None if there is none."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    try:
        index = json.loads(text)
    except json.JSONDecodeError as exc:
        # Only a rename puts an index in place, so this is damage from outside.
        raise StoreError(f"the index {str(path)!r} is not valid JSON ({exc})") from None
    if not isinstance(index, dict) or index.get("format") not in (
        INDEX_FORMAT,
        _OLD_INDEX_FORMAT,
    ):
        raise StoreError(f"{str(path)!r} is not an extraction index written by unifeat")
    return index


# -- the lock -------------------------------------------------------------------------


class _Lock:
    """One writer per store: an exclusive ``flock`` on ``stem.lock``, held for the
    run. The file records the owner's pid and host, for the message a second
    writer gets; the kernel drops the lock when its owner dies, even by
    ``kill -9``, so a lock file left behind is recognized as stale."""

    def __init__(self, path: Path, store: str) -> None:
        self.path = path
        self.store = store
        self.handle: IO[str] | None = None
        self.stale: dict[str, Any] | None = None

    def acquire(self) -> None:
        import fcntl

        for _ in range(10):
            handle = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115 - held for the run
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                handle.close()
                if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise StoreError(f"cannot lock {str(self.path)!r}: {exc}") from None
                owner = self._owner()
                raise StoreLockedError(
                    f"{self.store} is being written by another process "
                    f"(pid {owner.get('pid', '?')} on host {owner.get('host', '?')}, since "
                    f"{owner.get('since', '?')}): wait for it to finish or stop it, or "
                    "write to another output"
                ) from None
            # The file may have been removed and recreated by the previous owner
            # between our open and flock: then we locked a file nobody else sees.
            try:
                same = os.stat(self.path).st_ino == os.fstat(handle.fileno()).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                handle.close()
                continue
            previous = self._owner()
            if previous:
                self.stale = previous
            handle.seek(0)
            handle.truncate()
            since = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
            json.dump({"pid": os.getpid(), "host": socket.gethostname(), "since": since}, handle)
            handle.flush()
            self.handle = handle
            return
        raise StoreError(f"could not take the lock {str(self.path)!r}")  # pragma: no cover

    def _owner(self) -> dict[str, Any]:
        try:
            owner = json.loads(self.path.read_text(encoding="utf-8") or "{}")
        except (OSError, json.JSONDecodeError):
            return {}
        return owner if isinstance(owner, dict) else {}

    def release(self) -> None:
        if self.handle is None:
            return
        import fcntl

        with contextlib.suppress(OSError):
            self.path.unlink()
        fcntl.flock(self.handle.fileno(), fcntl.LOCK_UN)
        self.handle.close()
        self.handle = None


# -- shards ---------------------------------------------------------------------------


def _write_shard(
    paths: StorePaths,
    files: dict[str, str],
    rows: list[str],
    levels: dict[str, np.ndarray],
    provenance: dict[str, Any],
) -> None:
    folder = paths.folder
    if paths.storage == "safetensors":
        import torch
        from safetensors.torch import save

        data = save(
            {name: torch.from_numpy(np.ascontiguousarray(a)) for name, a in levels.items()},
            metadata={"paths": json.dumps(rows), "unifeat": json.dumps(provenance)},
        )
        atomic_write(folder / files["shard"], lambda handle: handle.write(data))
    elif paths.storage == "parquet":
        import pyarrow.parquet as pq

        table = to_arrow(rows, levels, provenance)
        atomic_write(folder / files["shard"], lambda handle: pq.write_table(table, handle))
    else:
        for name, array in levels.items():
            atomic_write(folder / files[name], _npy_writer(array))
        atomic_write(folder / files["paths"], _npy_writer(np.array(rows)))


def _npy_writer(array: np.ndarray) -> Callable[[IO[bytes]], None]:
    return lambda handle: np.save(handle, np.ascontiguousarray(array))


def to_arrow(rows: list[str], levels: dict[str, np.ndarray], provenance: dict[str, Any]) -> Any:
    """A pyarrow table: ``path``, then one ``FixedSizeList<float32>`` column per
    pooled level (a fixed-shape tensor column for whole maps), provenance in the
    schema metadata under ``unifeat``."""
    import pyarrow as pa

    columns: dict[str, Any] = {"path": pa.array(rows, type=pa.string())}
    for name, array in levels.items():
        array = np.ascontiguousarray(array, dtype=np.float32)
        if array.ndim == 2:
            flat = pa.array(array.reshape(-1), type=pa.float32())
            columns[name] = pa.FixedSizeListArray.from_arrays(flat, array.shape[1])
        else:
            columns[name] = pa.FixedShapeTensorArray.from_numpy_ndarray(array)
    table = pa.table(columns)
    return table.replace_schema_metadata({"unifeat": json.dumps(provenance)})


def _arrow_column(column: Any) -> np.ndarray:
    import pyarrow as pa

    chunks = []
    for chunk in column.chunks:
        if isinstance(chunk, pa.FixedShapeTensorArray):
            chunks.append(chunk.to_numpy_ndarray())
        else:
            width = chunk.type.list_size
            values = chunk.flatten().to_numpy(zero_copy_only=False)
            chunks.append(values.reshape(-1, width))
    if len(chunks) == 1:
        return chunks[0]
    return np.concatenate(chunks)


def read_shard_paths(paths: StorePaths, shard: dict[str, Any]) -> list[str]:
    """The image paths of one committed shard, without reading its features."""
    if "paths" in shard:  # an index written by unifeat 0.1
        return list(shard["paths"])
    files = shard["files"]
    folder = paths.folder
    try:
        if paths.storage == "safetensors":
            from safetensors import safe_open

            with safe_open(str(folder / files["shard"]), "np") as handle:
                return list(json.loads((handle.metadata() or {})["paths"]))
        if paths.storage == "parquet":
            import pyarrow.parquet as pq

            return [
                str(p) for p in pq.read_table(folder / files["shard"], columns=["path"])["path"]
            ]
        return [str(p) for p in np.load(folder / files["paths"], allow_pickle=False)]
    except (OSError, KeyError, ValueError) as exc:
        raise StoreError(f"shard {files} of {paths.display} cannot be read: {exc}") from None


def read_shard(
    paths: StorePaths, shard: dict[str, Any], *, mmap: bool = False
) -> tuple[list[str], dict[str, np.ndarray]]:
    """Paths and level arrays of one committed shard."""
    folder = paths.folder
    files = shard.get("files") or {"shard": shard["file"]}
    try:
        if paths.storage == "safetensors":
            from safetensors.numpy import load_file

            arrays = load_file(str(folder / files["shard"]))
            return read_shard_paths(paths, shard), dict(arrays)
        if paths.storage == "parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(folder / files["shard"])
            rows = [str(p) for p in table["path"]]
            return rows, {
                name: _arrow_column(table[name]) for name in table.column_names if name != "path"
            }
        rows = read_shard_paths(paths, shard)
        mode: Literal["r"] | None = "r" if mmap else None
        return rows, {
            name: np.load(folder / file, mmap_mode=mode, allow_pickle=False)
            for name, file in files.items()
            if name != "paths"
        }
    except StoreError:
        raise
    except (OSError, KeyError, ValueError) as exc:
        raise StoreError(f"shard {files} of {paths.display} cannot be read: {exc}") from None


# -- the store ------------------------------------------------------------------------


def differences(stored: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """The identity entries in which two provenance records differ, as prose."""
    found = []
    for key in IDENTITY:
        if stored.get(key) != wanted.get(key):
            found.append(f"{key}: stored {_short(stored.get(key))}, now {_short(wanted.get(key))}")
    return found


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 160 else text[:157] + "..."


@dataclass
class Store:
    """A store open for writing: rows are buffered and committed in shards."""

    paths: StorePaths
    provenance: dict[str, Any]
    overwrite: bool = False
    flush_every: int = 1024
    max_buffer_bytes: int = field(default_factory=lambda: MAX_BUFFER_BYTES)
    max_buffer_seconds: float = 120.0
    index: dict[str, Any] = field(default_factory=dict)
    done: set[str] = field(default_factory=set)
    written: int = 0
    _lock: _Lock | None = None
    _rows: list[str] = field(default_factory=list)
    _levels: list[dict[str, np.ndarray]] = field(default_factory=list)
    _bytes: int = 0
    _since: float = field(default_factory=time.monotonic)
    _new_failed: dict[str, str] = field(default_factory=dict)
    _recovered: set[str] = field(default_factory=set)

    def open(self) -> Store:
        """Take the lock, read or start the index, remove leftovers of killed runs."""
        self.paths.folder.mkdir(parents=True, exist_ok=True)
        self._lock = _Lock(self.paths.lock, self.paths.display)
        self._lock.acquire()
        try:
            if self._lock.stale:
                owner = self._lock.stale
                print(
                    f"unifeat: took over the stale lock of {self.paths.display} (pid "
                    f"{owner.get('pid', '?')} on host {owner.get('host', '?')} is gone)",
                    file=sys.stderr,
                )
            self._start()
        except BaseException:
            self._lock.release()
            raise
        return self

    def _start(self) -> None:
        index = read_index(self.paths.index)
        if index is not None and not self.overwrite:
            if index.get("format") != INDEX_FORMAT:
                raise ProvenanceMismatchError(
                    f"cannot add to {self.paths.display}: it was written by an earlier unifeat "
                    "that recorded no provenance; use overwrite (--overwrite) to start over"
                )
            if index.get("storage") != self.paths.storage:
                other = self.paths.folder / f"{self.paths.stem}.{index.get('storage')}"
                raise StoreError(
                    f"{self.paths.index.name} already belongs to the output {str(other)!r}: "
                    f"give {self.paths.display} another name, or use overwrite (--overwrite) "
                    "to replace that output"
                )
            found = differences(index["provenance"], self.provenance)
            if found:
                raise ProvenanceMismatchError(
                    f"cannot add to {self.paths.display}: its rows were computed differently ("
                    + "; ".join(found)
                    + "); use overwrite (--overwrite) to start over, or another output"
                )
            self.index = index
        else:
            self.index = {
                "format": INDEX_FORMAT,
                "storage": self.paths.storage,
                "provenance": self.provenance,
                # Copies for readers of unifeat 0.1 indexes, which had them here.
                "pool": self.provenance.get("pool"),
                "levels": self.provenance.get("levels"),
                "backend": self.provenance.get("backend"),
                "complete": False,
                "next_shard": 0,
                "shards": [],
                "failed": {},
            }
            # The new (empty) index goes in first: from then on the old shards are
            # leftovers, removed below, whatever happens in between.
            self._commit_index()
        self._remove_leftovers()
        for shard in self.index["shards"]:
            self.done.update(read_shard_paths(self.paths, shard))
        if self.index.get("complete"):
            self.index["complete"] = False
            self._commit_index()

    def _remove_leftovers(self) -> None:
        named = {f for shard in self.index["shards"] for f in shard["files"].values()}
        for entry in os.listdir(self.paths.folder):
            leftover = self.paths.is_temp_name(entry) or (
                self.paths.is_shard_name(entry) and entry not in named
            )
            if leftover:
                with contextlib.suppress(FileNotFoundError):
                    (self.paths.folder / entry).unlink()

    @property
    def failed(self) -> dict[str, str]:
        """``{path: reason}`` of every image recorded as unreadable."""
        return dict(self.index["failed"])

    def add(
        self,
        rows: Sequence[str],
        levels: dict[str, np.ndarray],
        failures: Sequence[tuple[str, str]] = (),
    ) -> None:
        """Buffer rows (and failures); commit a shard when the buffer is full."""
        for path, reason in failures:
            self._new_failed[path] = reason
        if rows:
            self._rows.extend(rows)
            self._levels.append(levels)
            self._bytes += sum(a.nbytes for a in levels.values())
            self._recovered.update(rows)
        full = (
            len(self._rows) >= self.flush_every
            or self._bytes >= self.max_buffer_bytes
            or (time.monotonic() - self._since >= self.max_buffer_seconds)
        )
        if full:
            self.flush()

    def flush(self) -> None:
        """Commit what is buffered: a new shard, then the index naming it."""
        self._since = time.monotonic()
        if not self._rows and not self._new_failed:
            return
        if self._rows:
            names = list(self._levels[0])
            levels = {name: np.concatenate([part[name] for part in self._levels]) for name in names}
            number = int(self.index["next_shard"])
            files = self.paths.shard_files(number, names)
            _write_shard(self.paths, files, self._rows, levels, self.provenance)
            self.index["shards"].append({"id": number, "rows": len(self._rows), "files": files})
            self.index["next_shard"] = number + 1
        failed = self.index["failed"]
        failed.update(self._new_failed)
        for path in self._recovered:
            failed.pop(path, None)
        self._commit_index()
        self.done.update(self._rows)
        self.written += len(self._rows)
        self._rows, self._levels, self._bytes = [], [], 0
        self._new_failed, self._recovered = {}, set()

    def _commit_index(self) -> None:
        text = json.dumps(self.index, indent=1).encode("utf-8")
        atomic_write(self.paths.index, lambda handle: handle.write(text))

    def close(self, *, complete: bool) -> None:
        """Commit what is buffered, mark the store complete if the run finished,
        release the lock."""
        try:
            self.flush()
            if complete:
                self.index["complete"] = True
                self._commit_index()
        finally:
            if self._lock is not None:
                self._lock.release()
                self._lock = None


# -- reading --------------------------------------------------------------------------


def open_index(output: str | os.PathLike[str]) -> tuple[StorePaths, dict[str, Any]]:
    """The store at ``output`` (its output or index path, or its folder) and its index."""
    paths = store_paths(output)
    index = read_index(paths.index)
    if index is None:
        message = f"no extraction output at {str(output)!r} (no {paths.index.name})"
        if names_folder(output):
            others = sorted(p.name for p in Path(output).glob("*.index.json"))
            held = f"it holds {format_choices(others)}: name one" if others else "it holds none"
            message = (
                f"no extraction output in the folder {str(output)!r}: a folder holds its "
                f"store as {paths.index.name}, and {held}"
            )
        raise StoreError(message)
    return paths, index


def iter_shards(
    paths: StorePaths, index: dict[str, Any], *, mmap: bool = False
) -> Iterator[tuple[list[str], dict[str, np.ndarray]]]:
    """Each committed shard's paths and level arrays, in order."""
    for shard in index["shards"]:
        yield read_shard(paths, shard, mmap=mmap)
