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

A store is something people download and share, so nothing in an index is
trusted: a shard file must be a plain file name inside the output's folder,
and each shard is checked against the size, CRC-32 and image digest the index
records for it before any row of it is used. A damaged shard is named with the
rows it holds; a rerun of the extraction re-extracts exactly those rows (see
the docs page "Extraction", section "What is stored").
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import hashlib
import io
import json
import ntpath
import os
import re
import secrets
import socket
import stat
import sys
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

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


class UnsafeShardError(StoreError, ValueError):
    """An index names a shard file that is not a plain file name inside the
    output's folder (a path, ``..``, or a symlink leading out of it)."""


class DamagedShardError(StoreError):
    """A shard file that is missing, truncated, garbled or not what its index
    records; the message names the file and the rows it holds."""

    def __init__(
        self,
        message: str,
        *,
        file: str = "",
        reason: str = "",
        number: int = -1,
        images: list[str] | None = None,
    ) -> None:
        super().__init__(message)
        self.file = file
        self.reason = reason
        self.number = number
        """The shard's position in its index."""
        self.images = images
        """The shard's image paths where an intact part of it still gives them
        (an npy shard's paths file), else None."""

    def __reduce__(self) -> tuple[Any, ...]:
        # Keyword-only fields: pickled (e.g. across processes) with their values.
        return (type(self), self.args, self.__dict__)


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
    """The index at ``path``, or None if there is none. Its shard entries are
    checked (see :func:`check_shard_name`) before anything reads them."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise StoreError(f"the index {str(path)!r} cannot be read ({exc})") from None
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
    _check_entries(index, path)
    return index


def _check_entries(index: dict[str, Any], path: Path) -> None:
    def damaged(what: str) -> StoreError:
        return StoreError(
            f"the index {str(path)!r} is damaged: {what}; restore it, or start over with "
            "overwrite (--overwrite)"
        )

    shards = index.get("shards")
    if not isinstance(shards, list):
        raise damaged("'shards' is not a list")
    if not isinstance(index.get("failed", {}), dict):
        raise damaged("'failed' is not a mapping of paths to reasons")
    if index["format"] == INDEX_FORMAT and not isinstance(index.get("provenance"), dict):
        raise damaged("'provenance' is not a mapping")
    for number, shard in enumerate(shards):
        if not isinstance(shard, dict):
            raise damaged(f"shard {number} is {shard!r}, not an entry")
        files = shard_files(shard)
        if not isinstance(files, dict) or not files:
            raise damaged(f"shard {number} names no files ({files!r})")
        for role, name in files.items():
            check_shard_name(name, path, number, role)
        rows = shard.get("rows", len(shard.get("paths") or ()))
        if isinstance(rows, bool) or not isinstance(rows, int) or rows < 0:
            raise damaged(f"shard {number} holds {rows!r} rows")
        for key in ("bytes", "crc32"):
            records = shard.get(key, {})
            if not isinstance(records, dict) or not all(
                isinstance(v, int) and not isinstance(v, bool) for v in records.values()
            ):
                raise damaged(f"shard {number} records {key} {records!r}")
        for key in ("first", "last", "images_digest"):
            if not isinstance(shard.get(key, ""), str):
                raise damaged(f"shard {number} records {key} {shard[key]!r}")
        digest = shard.get("images_digest")
        if digest is not None and re.fullmatch(r"blake2b-sum:[0-9a-f]{32}", digest) is None:
            raise damaged(f"shard {number} records images_digest {digest!r}")


def shard_files(shard: dict[str, Any]) -> Any:
    """``{role: file name}`` of an index entry (unifeat 0.1 entries have one ``file``)."""
    return shard["files"] if "files" in shard else {"shard": shard.get("file")}


SHARD_NAME_RULE = (
    "a shard file must be a plain file name inside the output's folder (no '/' or '\\', "
    "not '.' or '..', not absolute, not a symlink leading out of the folder)"
)


def check_shard_name(name: object, index: Path, number: int, role: str) -> str:
    """``name`` if it is a plain file name, else :class:`UnsafeShardError` naming
    the index, the entry and the rule. Both separators are refused on every
    system: a store written on one is read on the others."""
    plain = (
        isinstance(name, str)
        and name not in ("", ".", "..")
        and "/" not in name
        and "\\" not in name
        and "\0" not in name
        and not ntpath.splitdrive(name)[0]
        and not os.path.isabs(name)
    )
    if not plain:
        raise UnsafeShardError(
            f"the index {str(index)!r} names {name!r} as the {role!r} file of shard {number}: "
            f"{SHARD_NAME_RULE}; refusing to read it"
        )
    assert isinstance(name, str)
    return name


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


def _encode_shard(
    storage: str,
    files: dict[str, str],
    rows: list[str],
    levels: dict[str, np.ndarray],
    provenance: dict[str, Any],
) -> dict[str, bytes | memoryview]:
    """``{file name: bytes}`` of one shard, encoded in memory: the bytes are
    checksummed before they are written, so the index can vouch for them."""
    if storage == "safetensors":
        import torch
        from safetensors.torch import save

        data = save(
            {name: torch.from_numpy(np.ascontiguousarray(a)) for name, a in levels.items()},
            metadata={"paths": json.dumps(rows), "unifeat": json.dumps(provenance)},
        )
        return {files["shard"]: data}
    if storage == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        sink = pa.BufferOutputStream()
        pq.write_table(to_arrow(rows, levels, provenance), sink)
        return {files["shard"]: memoryview(sink.getvalue())}
    encoded: dict[str, bytes | memoryview] = {
        files[name]: _npy_bytes(array) for name, array in levels.items()
    }
    encoded[files["paths"]] = _npy_bytes(np.array(rows))
    return encoded


def _bytes_writer(data: bytes | memoryview) -> Callable[[IO[bytes]], Any]:
    return lambda handle: handle.write(data)


def _npy_bytes(array: np.ndarray) -> memoryview:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getbuffer()


def images_digest(rows: Iterable[str]) -> str:
    """A digest of a set of image paths that does not depend on their order: the
    sum of their 128-bit BLAKE2b hashes. The index keeps it per shard, so the
    images of a shard too damaged to read can still be recognized among a run's."""
    hashes = (
        hashlib.blake2b(row.encode("utf-8", "surrogateescape"), digest_size=16).digest()
        for row in rows
    )
    return _sum_digest(int.from_bytes(h, "big") for h in hashes)


def _sum_digest(values: Iterable[int]) -> str:
    return f"blake2b-sum:{sum(values) % (1 << 128):032x}"


def union_digest(digests: Iterable[str]) -> str:
    """The :func:`images_digest` of disjoint sets' union, from theirs."""
    return _sum_digest(int(d.removeprefix("blake2b-sum:"), 16) for d in digests)


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


# -- reading shards, trusting nothing ----------------------------------------------------


class _Damage(Exception):
    """Why one file of a shard cannot be used; turned into a DamagedShardError
    with the shard's rows by :class:`_ShardReader`."""

    def __init__(self, file: str, reason: str) -> None:
        super().__init__(reason)
        self.file = file
        self.reason = reason


_CHUNK = 16 << 20


class _ShardReader:
    """Reads shard ``number`` of a store's index: resolves each file inside the
    folder, checks it against the size and CRC-32 the index records, parses it,
    and checks that it holds the rows, levels and images the index says."""

    def __init__(self, paths: StorePaths, index: dict[str, Any], number: int) -> None:
        self.paths = paths
        self.index = index
        self.number = number
        self.shard = index["shards"][number]
        self.files: dict[str, str] = shard_files(self.shard)
        self.rows = int(self.shard.get("rows", len(self.shard.get("paths") or ())))
        self.folder = os.path.realpath(paths.folder)

    # -- one file

    def _resolve(self, role: str) -> str:
        name = check_shard_name(self.files[role], self.paths.index, self.number, role)
        real = os.path.realpath(os.path.join(self.paths.folder, name))
        if os.path.dirname(real) != self.folder and not real.startswith(self.folder + os.sep):
            raise UnsafeShardError(
                f"the index {str(self.paths.index)!r} names {name!r} as the {role!r} file of "
                f"shard {self.number}, a symlink to {real!r}: {SHARD_NAME_RULE}; refusing to "
                "read it"
            )
        try:
            found = os.stat(real)
        except FileNotFoundError:
            raise _Damage(name, "the file is missing") from None
        except OSError as exc:
            raise _Damage(name, f"the file cannot be opened ({exc.strerror})") from None
        if not stat.S_ISREG(found.st_mode):
            raise _Damage(name, "it is not a regular file")
        recorded = (self.shard.get("bytes") or {}).get(role)
        if recorded is not None and found.st_size != recorded:
            raise _Damage(
                name,
                f"{found.st_size} bytes where the index records {recorded}: truncated or "
                "partly copied",
            )
        return real

    def _check_crc(self, role: str, crc: int) -> None:
        recorded = (self.shard.get("crc32") or {}).get(role)
        if recorded is not None and crc != recorded:
            raise _Damage(
                self.files[role],
                "its bytes do not match the CRC-32 the index records: garbled",
            )

    def _bytes(self, role: str) -> bytes:
        real = self._resolve(role)
        try:
            with open(real, "rb") as handle:
                data = handle.read()
        except OSError as exc:
            raise _Damage(self.files[role], f"the file cannot be read ({exc.strerror})") from None
        self._check_crc(role, zlib.crc32(data))
        return data

    def _checked(self, role: str) -> str:
        """The file's real path, after its CRC (where recorded) is checked in
        chunks, without holding the file in memory."""
        real = self._resolve(role)
        if (self.shard.get("crc32") or {}).get(role) is not None:
            crc = 0
            try:
                with open(real, "rb") as handle:
                    while chunk := handle.read(_CHUNK):
                        crc = zlib.crc32(chunk, crc)
            except OSError as exc:
                raise _Damage(
                    self.files[role], f"the file cannot be read ({exc.strerror})"
                ) from None
            self._check_crc(role, crc)
        return real

    def _mapped(self, role: str) -> np.ndarray:
        real = self._checked(role)
        return self._parse(role, lambda: np.load(real, mmap_mode="r", allow_pickle=False))

    def _parse(self, role: str, parse: Callable[[], Any]) -> Any:
        try:
            return parse()
        except Exception as exc:  # each parser has its own errors; all mean damage
            reason = f"it is not a readable {self.paths.storage} file ({type(exc).__name__}: {exc})"
            raise _Damage(self.files[role], reason) from None

    # -- the shard

    def read(self, *, mmap: bool) -> tuple[list[str], dict[str, np.ndarray]]:
        """The shard's image paths and level arrays, or :class:`DamagedShardError`."""
        images: list[str] | None = None
        try:
            if "paths" in self.shard:  # an index written by unifeat 0.1 lists them
                images = [str(p) for p in self.shard["paths"]]
            if self.paths.storage == "npy":
                rows = self._npy_paths()
                self._check_rows(rows)
                # Its own file, intact: what the shard held is known even where
                # a level file is damaged, so a rerun can re-extract exactly it.
                images = rows
                levels = {}
                for name in self.files:
                    if name != "paths":
                        mapped = self._mapped(name)
                        levels[name] = mapped if mmap else np.array(mapped)
            elif self.paths.storage == "safetensors" or "paths" in self.shard:
                rows, levels = self._safetensors()
            else:
                rows, levels = self._parquet()
            self._check_contents(rows, levels)
        except _Damage as damage:
            raise self._damaged(damage, images) from None
        return rows, levels

    def read_paths(self) -> list[str]:
        """The shard's image paths, with every file checked. Where the index
        records each file's CRC-32 and it matches, the file is the one written,
        so only its paths are parsed (a resume then costs one read of the store,
        not one decode); otherwise the whole shard is read."""
        checksummed = set(self.shard.get("crc32") or {}) >= set(self.files)
        if self.paths.storage == "npy" or not checksummed or "paths" in self.shard:
            return self.read(mmap=True)[0]
        try:
            real = self._checked("shard")
            if self.paths.storage == "safetensors":
                rows = self._parse("shard", lambda: _safetensors_paths(real))
            else:
                rows = self._parse("shard", lambda: _parquet_paths(real))
            self._check_rows(rows)
        except _Damage as damage:
            raise self._damaged(damage, None) from None
        return rows

    def _npy_paths(self) -> list[str]:
        data = self._bytes("paths")
        array = self._parse("paths", lambda: _load_npy(data))
        if array.ndim != 1 or array.dtype.kind != "U":
            raise _Damage(
                self.files["paths"],
                f"it holds a {array.dtype} array of shape {array.shape}, not a list of paths",
            )
        return [str(p) for p in array]

    def _safetensors(self) -> tuple[list[str], dict[str, np.ndarray]]:
        from safetensors.numpy import load

        data = self._bytes("shard")
        arrays = self._parse("shard", lambda: load(data))

        if "paths" in self.shard:
            return [str(p) for p in self.shard["paths"]], dict(arrays)
        # load() has checked the header; its metadata holds the paths.
        length = int.from_bytes(data[:8], "little")
        rows = self._parse("shard", lambda: _header_paths(data[8 : 8 + length]))
        return rows, dict(arrays)

    def _parquet(self) -> tuple[list[str], dict[str, np.ndarray]]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        data = self._bytes("shard")
        table = self._parse("shard", lambda: pq.read_table(pa.BufferReader(data)))

        def columns() -> tuple[list[str], dict[str, np.ndarray]]:
            rows = [str(p) for p in table["path"].to_pylist()]
            names = [name for name in table.column_names if name != "path"]
            return rows, {name: _arrow_column(table[name]) for name in names}

        return self._parse("shard", columns)

    def _main_file(self) -> str:
        return self.files.get("shard") or self.files.get("paths") or next(iter(self.files.values()))

    def _check_rows(self, rows: list[str]) -> None:
        if len(rows) != self.rows:
            raise _Damage(
                self._main_file(), f"it holds {len(rows)} rows where the index records {self.rows}"
            )
        recorded = self.shard.get("images_digest")
        if recorded is not None and images_digest(rows) != recorded:
            raise _Damage(self._main_file(), "its image paths are not those the index records")

    def _check_contents(self, rows: list[str], levels: dict[str, np.ndarray]) -> None:
        self._check_rows(rows)
        main = self._main_file()
        wanted = _level_names(self.index)
        if wanted is not None and sorted(levels) != sorted(wanted):
            raise _Damage(
                main, f"it holds the levels {sorted(levels)} where the index records {wanted}"
            )
        for name, array in levels.items():
            if array.ndim < 2 or len(array) != self.rows or array.dtype != np.float32:
                file = self.files.get(name, main)
                raise _Damage(
                    file,
                    f"its {name} is a {array.dtype} array of shape {tuple(array.shape)}, not "
                    f"{self.rows} float32 rows",
                )

    # -- messages

    def row_range(self) -> tuple[int, int]:
        """The shard's rows in load_features' order, first and last."""
        start = sum(
            int(s.get("rows", len(s.get("paths") or ())))
            for s in self.index["shards"][: self.number]
        )
        return start, start + self.rows - 1

    def holds(self, images: list[str] | None = None) -> str:
        """``rows 4 to 7 (4 images, '/a.png' to '/d.png')``: what the index says it holds."""
        first, last = self.row_range()
        where = f"rows {first} to {last}" if self.rows != 1 else f"row {first}"
        low = self.shard.get("first", min(images) if images else None)
        high = self.shard.get("last", max(images) if images else None)
        if low is None:
            return f"{where} ({self.rows} images)"
        if low == high:
            return f"{where} (1 image, {low!r})"
        return f"{where} ({self.rows} images, {low!r} to {high!r})"

    def _damaged(self, damage: _Damage, images: list[str] | None) -> DamagedShardError:
        part = self.index.get("provenance", {}).get("shard")
        command = "the extract command that wrote " + self.paths.display
        if part:
            command += f" (with --shard {part})"
        message = (
            f"{damage.file!r} of {self.paths.display} is damaged ({damage.reason}): it holds "
            f"{self.holds(images)} of that output. To repair it, rerun {command} with the "
            "same model, options and images: it re-extracts these rows and keeps the others"
        )
        return DamagedShardError(
            message, file=damage.file, reason=damage.reason, number=self.number, images=images
        )


def _safetensors_paths(file: str) -> list[str]:
    with open(file, "rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        return _header_paths(handle.read(length))


def _header_paths(header: bytes) -> list[str]:
    """The image paths a safetensors shard's header keeps in its metadata."""
    paths = json.loads(json.loads(header)["__metadata__"]["paths"])
    if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
        raise ValueError("the paths in its metadata are not a list of strings")
    return paths


def _parquet_paths(file: str) -> list[str]:
    import pyarrow.parquet as pq

    return [str(p) for p in pq.read_table(file, columns=["path"])["path"].to_pylist()]


def _load_npy(data: bytes) -> np.ndarray:
    array = np.load(io.BytesIO(data), allow_pickle=False)
    if not isinstance(array, np.ndarray):
        raise ValueError("not a single array")
    return array


def _level_names(index: dict[str, Any]) -> list[str] | None:
    """The level columns every shard of a store holds, from its provenance."""
    out_indices = index.get("provenance", {}).get("out_indices")
    if not isinstance(out_indices, list):
        return None
    return [f"level_{i}" for i in out_indices]


def read_shard(
    paths: StorePaths, index: dict[str, Any], number: int, *, mmap: bool = False
) -> tuple[list[str], dict[str, np.ndarray]]:
    """Paths and level arrays of shard ``number`` of ``index``, checked; npy
    levels memory-mapped with ``mmap``. Raises :class:`DamagedShardError` or
    :class:`UnsafeShardError`."""
    return _ShardReader(paths, index, number).read(mmap=mmap)


def read_shard_paths(paths: StorePaths, index: dict[str, Any], number: int) -> list[str]:
    """The image paths of shard ``number``, after the whole shard is checked: a
    resume must find what :func:`read_shard` would refuse."""
    return _ShardReader(paths, index, number).read_paths()


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
    listing: Sequence[str] | None = None
    """The images of the run that opens the store (sorted, canonical): what a
    damaged shard's images are looked for among, to re-extract them. Without
    it (a merge), a damaged shard is an error."""
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
        # With overwrite the old index is not read: a damaged or hostile one
        # must not stand in the way of starting over.
        index = None if self.overwrite else read_index(self.paths.index)
        if index is not None:
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
        damaged: list[DamagedShardError] = []
        for number in range(len(self.index["shards"])):
            try:
                self.done.update(read_shard_paths(self.paths, self.index, number))
            except DamagedShardError as exc:
                damaged.append(exc)
        if damaged:
            self._drop_damaged(damaged)
        if self.index.get("complete"):
            self.index["complete"] = False
            self._commit_index()

    def _drop_damaged(self, damaged: list[DamagedShardError]) -> None:
        """Forget damaged shards whose images this run lists, so that they are
        extracted again; refuse (changing nothing) where they cannot be known."""
        if self.listing is None:
            raise damaged[0]
        listed = set(self.listing)
        failed = set(self.index["failed"])
        # Images no intact shard holds, not recorded as unreadable: a damaged
        # shard's images are among these if this run lists them.
        candidates = [p for p in self.listing if p not in self.done and p not in failed]
        unknown: list[DamagedShardError] = []
        for exc in damaged:
            if exc.images is None:
                unknown.append(exc)
            elif not listed.issuperset(exc.images):
                missing = sorted(set(exc.images) - listed)
                raise self._cannot_repair(
                    exc, f"this run does not list {len(missing)} of them (such as {missing[0]!r})"
                )
        claimed = {p for exc in damaged if exc.images is not None for p in exc.images}
        for group in self._overlapping(unknown):
            shards = [self.index["shards"][exc.number] for exc in group]
            if any(not {"first", "last", "images_digest"} <= set(s) for s in shards):
                raise self._cannot_repair(
                    group[0],
                    "the index (written by an earlier unifeat) does not record which images "
                    "the shard held",
                )
            low, high = min(s["first"] for s in shards), max(s["last"] for s in shards)
            found = [p for p in candidates if low <= p <= high and p not in claimed]
            wanted = sum(int(s["rows"]) for s in shards)
            held = union_digest(s["images_digest"] for s in shards)
            if len(found) != wanted or images_digest(found) != held:
                raise self._cannot_repair(
                    group[0],
                    f"this run's images from {low!r} to {high!r} are not exactly the "
                    f"{wanted} it held",
                )
        for exc in damaged:
            reader = _ShardReader(self.paths, self.index, exc.number)
            print(
                f"unifeat: {exc.file} of {self.paths.display} is damaged ({exc.reason}); "
                f"re-extracting {reader.holds(exc.images)}",
                file=sys.stderr,
            )
        dropped = {exc.number for exc in damaged}
        files = [
            f
            for number in sorted(dropped)
            for f in shard_files(self.index["shards"][number]).values()
        ]
        self.index["shards"] = [
            s for number, s in enumerate(self.index["shards"]) if number not in dropped
        ]
        self._commit_index()
        for name in files:  # plain names inside the folder: checked by read_index
            with contextlib.suppress(FileNotFoundError):
                (self.paths.folder / name).unlink()

    def _overlapping(self, damaged: list[DamagedShardError]) -> list[list[DamagedShardError]]:
        """Damaged shards in groups whose image ranges overlap: two runs over
        different listings can interleave their shards, so a group is matched
        against the run's images as one."""
        shards = self.index["shards"]

        def bounds(exc: DamagedShardError) -> tuple[str, str]:
            shard = shards[exc.number]
            return str(shard.get("first", "")), str(shard.get("last", ""))

        groups: list[list[DamagedShardError]] = []
        high = ""
        for exc in sorted(damaged, key=bounds):
            low, last = bounds(exc)
            if groups and low <= high:
                groups[-1].append(exc)
                high = max(high, last)
            else:
                groups.append([exc])
                high = last
        return groups

    def _cannot_repair(self, exc: DamagedShardError, why: str) -> StoreError:
        reader = _ShardReader(self.paths, self.index, exc.number)
        return StoreError(
            f"{exc.file!r} of {self.paths.display} is damaged ({exc.reason}): it holds "
            f"{reader.holds(exc.images)}, and {why}, so they cannot be re-extracted: rerun "
            "with the images this output was extracted from, or start over with overwrite "
            "(--overwrite)"
        )

    def _remove_leftovers(self) -> None:
        named = {f for shard in self.index["shards"] for f in shard_files(shard).values()}
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
            encoded = _encode_shard(self.paths.storage, files, self._rows, levels, self.provenance)
            for name, data in encoded.items():
                atomic_write(self.paths.folder / name, _bytes_writer(data))
            roles = {name: role for role, name in files.items()}
            self.index["shards"].append(
                {
                    "id": number,
                    "rows": len(self._rows),
                    "files": files,
                    # What the shard must be, checked before any row of it is read.
                    "bytes": {roles[name]: len(data) for name, data in encoded.items()},
                    "crc32": {roles[name]: zlib.crc32(data) for name, data in encoded.items()},
                    "first": min(self._rows),
                    "last": max(self._rows),
                    "images_digest": images_digest(self._rows),
                }
            )
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
    """Each committed shard's paths and level arrays, in order, each checked."""
    for number in range(len(index["shards"])):
        yield read_shard(paths, index, number, mmap=mmap)
