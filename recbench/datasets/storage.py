"""On-disk format of a prepared protocol: memory-mapped ``.npy`` arrays plus a JSON manifest.

Layout of ``<data_root>/<name>/processed/<protocol_id>/``::

    manifest.json                 spec, settings, split sizes, sha256 of every file (written last)
    counts/<field>.npy            int64 (num_embeddings,) training-split frequencies
    <split>/dense.npy             float32 (N, num_dense)
    <split>/sparse.npy            int32 (N, F_single): per-field row index, 0 = OOV
    <split>/labels.npy            float32 (N,)
    <split>/multi/<field>.values.npy   int32 (nnz,)  for multi-hot fields
    <split>/multi/<field>.offsets.npy  int64 (N+1,)
    <split>/targets/<name>.npy    float32 (N,) extra targets (rating, true_prob, ...)

A cache directory is built under a temporary name (``.<protocol_id>.tmp-<pid>-*``) and published
only when complete, so a crash, a full disk or a permission error never leaves a directory that
looks valid. Publishing renames it to a version folder (``.<protocol_id>.v-<time>-<pid>``) and
switches the symlink ``<protocol_id>`` to it with one atomic rename, so a reader sees the old
version or the new one, never a missing directory; a loaded dataset reads from the version it
resolved, and the previous version is kept (older ones are removed) for readers still on it.
``DatasetProtocol.prepare`` builds under an exclusive lock (``.<protocol_id>.lock``): a second
process waiting on it loads what the first published instead of building again, and the lock
holder removes temporary folders that killed builds left behind.
Checksums are verified on load (and re-verified whenever a file's size or mtime changes); the
build stamps the (size, mtime) of the files it has just hashed, so its own first load does not
hash them a second time.

References: docs/architecture.md sections 2, 3 ("Tables and datasets") and 8.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np

from recbench.datasets.errors import DatasetError
from recbench.types import DatasetSpec, TableSpec

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
VERIFIED_STAMP = ".verified.json"
SPLITS = ("train", "val", "test")
FORMAT_VERSION = 1


class CacheCorruptError(RuntimeError):
    """A cached file is missing or does not match the checksum in its manifest."""


def sha256_file(path: Path, chunk_bytes: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while True:
            block = handle.read(chunk_bytes)
            if not block:
                break
            digest.update(block)
    return digest.hexdigest()


@dataclass
class SplitArrays:
    """Memory-mapped arrays of one split; ``len()`` is its row count."""

    dense: np.ndarray
    sparse: np.ndarray
    labels: np.ndarray
    multi_values: Dict[str, np.ndarray] = field(default_factory=dict)
    multi_offsets: Dict[str, np.ndarray] = field(default_factory=dict)
    targets: Dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass
class PreparedDataset:
    """A prepared protocol: its spec plus lazy access to split arrays."""

    spec: DatasetSpec
    directory: Path
    manifest: Dict[str, Any]
    #: the version folder ``directory`` pointed to when loaded (files are read from it, so a
    #: rebuild published meanwhile does not change the data under a running job)
    version_dir: Optional[Path] = None

    def split(self, name: str) -> SplitArrays:
        if name not in SPLITS:
            raise KeyError(f"unknown split {name!r}; allowed: {', '.join(SPLITS)}")
        root = (self.version_dir or self.directory) / name
        multi = [t.name for t in self.spec.tables if t.multi_hot]
        targets = self.manifest.get("targets", [])

        def load(path: Path) -> np.ndarray:
            try:
                return np.load(path, mmap_mode="r")
            except (OSError, ValueError) as exc:  # a header damaged in a way size and mtime do not show
                raise CacheCorruptError(f"{path}: unreadable ({exc}); run `recbench-data verify "
                                        f"{self.spec.name}` to re-hash the cache (it is rebuilt on the next "
                                        "prepare once rejected)") from exc

        return SplitArrays(
            dense=load(root / "dense.npy"),
            sparse=load(root / "sparse.npy"),
            labels=load(root / "labels.npy"),
            multi_values={f: load(root / "multi" / f"{f}.values.npy") for f in multi},
            multi_offsets={f: load(root / "multi" / f"{f}.offsets.npy") for f in multi},
            targets={t: load(root / "targets" / f"{t}.npy") for t in targets},
        )


class CacheWriter:
    """Builds a protocol directory atomically.

    Usage::

        with CacheWriter(final_dir) as w:
            w.save("train/dense.npy", array)              # whole arrays
            mm = w.open_memmap("train/sparse.npy", np.int32, (n, f))   # or streamed fills
            ...
            w.commit(manifest_dict)                       # checksums, manifest, rename
    """

    def __init__(self, final_dir: Path):
        self.final_dir = Path(final_dir)
        self.final_dir.parent.mkdir(parents=True, exist_ok=True)
        self.tmp_dir = Path(tempfile.mkdtemp(prefix=f".{self.final_dir.name}.tmp-{os.getpid()}-",
                                             dir=self.final_dir.parent))
        self._memmaps: List[np.memmap] = []
        self._committed = False

    def path(self, rel: str) -> Path:
        out = self.tmp_dir / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        return out

    def save(self, rel: str, array: np.ndarray) -> None:
        np.save(self.path(rel), np.ascontiguousarray(array))

    def open_memmap(self, rel: str, dtype: Any, shape: Sequence[int]) -> np.memmap:
        mm = np.lib.format.open_memmap(self.path(rel), mode="w+", dtype=dtype, shape=tuple(shape))
        self._memmaps.append(mm)
        return mm

    def commit(self, manifest: Dict[str, Any]) -> Path:
        for mm in self._memmaps:
            mm.flush()
        self._memmaps.clear()
        files = sorted(p for p in self.tmp_dir.rglob("*") if p.is_file())
        manifest = dict(manifest)
        manifest["format_version"] = FORMAT_VERSION
        manifest["files"], stamp = {}, {}
        for p in files:
            rel, st = str(p.relative_to(self.tmp_dir)), p.stat()
            manifest["files"][rel] = sha256_file(p)
            stamp[rel] = [st.st_size, st.st_mtime_ns]
        manifest_path = self.tmp_dir / MANIFEST
        with open(manifest_path, "w") as handle:
            json.dump(manifest, handle, indent=2, sort_keys=True, default=_json_default)
            handle.flush()
            os.fsync(handle.fileno())
        # the files were just hashed from disk: the first load need not hash them again (``verify``)
        (self.tmp_dir / VERIFIED_STAMP).write_text(json.dumps(stamp))
        publish(self.tmp_dir, self.final_dir)
        self._committed = True
        return self.final_dir

    def abort(self) -> None:
        self._memmaps.clear()
        shutil.rmtree(self.tmp_dir, ignore_errors=True)

    def __enter__(self) -> "CacheWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self._committed:
            self.abort()


def publish(built: Path, final_dir: Path) -> Path:
    """Make the complete folder ``built`` the cache ``final_dir``: rename it to a version folder and
    switch the symlink ``final_dir`` to it atomically; keep the version it replaces, remove older
    ones. Returns the new version folder."""
    parent, name = final_dir.parent, final_dir.name
    version = parent / f".{name}.v-{time.time_ns()}-{os.getpid()}"
    os.replace(built, version)
    link = parent / f".{name}.link-{os.getpid()}"
    if link.is_symlink() or link.exists():
        link.unlink()
    os.symlink(version.name, link)  # relative: the data root can move
    previous = final_dir.resolve() if final_dir.is_symlink() else None
    if final_dir.exists() and not final_dir.is_symlink():  # a cache from before versioning (or foreign)
        os.replace(final_dir, parent / f".{name}.v-0-{os.getpid()}")
    os.replace(link, final_dir)
    for old in parent.glob(f".{name}.v-*"):
        if old != version and old != previous:
            shutil.rmtree(old, ignore_errors=True)
    return version


def remove_stale_builds(final_dir: Path) -> List[Path]:
    """Remove the temporary folders and links of builds of ``final_dir`` that ended without
    publishing (call only while holding the build lock: no other build of it can be running)."""
    removed = []
    for path in [*final_dir.parent.glob(f".{final_dir.name}.tmp-*"), *final_dir.parent.glob(f".{final_dir.name}.link-*")]:
        if path.is_symlink() or path.is_file():
            path.unlink()
        else:
            shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def remove_dead_pid_temps(folder: Path) -> List[Path]:
    """Remove the files ``*.tmp-<pid>`` in ``folder`` whose writing process is gone (a kill mid-write)."""
    removed = []
    for path in Path(folder).glob("*.tmp-*") if Path(folder).is_dir() else []:
        pid = path.name.rsplit(".tmp-", 1)[1]
        if pid.isdigit() and not _alive(int(pid)) and path.is_file():
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def verify(directory: Path, full: bool = False) -> Dict[str, Any]:
    """Load and checksum-verify a protocol directory; raises CacheCorruptError on any mismatch.

    Files whose (size, mtime) match the last successful verification are not re-hashed (a
    change that keeps both, such as bit rot, is found only by ``full=True``: every file re-hashed,
    ``recbench-data verify``).
    """
    directory = Path(directory)
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        raise CacheCorruptError(f"{manifest_path}: manifest missing (incomplete or foreign cache)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as exc:
        raise CacheCorruptError(f"{manifest_path}: unreadable manifest ({exc})") from exc
    stamp_path = directory / VERIFIED_STAMP
    try:
        stamp = json.loads(stamp_path.read_text()) if stamp_path.is_file() else {}
    except json.JSONDecodeError:
        stamp = {}
    new_stamp: Dict[str, List[float]] = {}
    for rel, expected in manifest.get("files", {}).items():
        path = directory / rel
        if not path.is_file():
            raise CacheCorruptError(f"{path}: listed in the manifest but missing")
        st = path.stat()
        key = [st.st_size, st.st_mtime_ns]
        if full or stamp.get(rel) != key:
            actual = sha256_file(path)
            if actual != expected:
                raise CacheCorruptError(f"{path}: checksum mismatch (expected {expected[:12]}, got {actual[:12]})")
        new_stamp[rel] = key
    if new_stamp != stamp:
        try:
            tmp = stamp_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(new_stamp))
            os.replace(tmp, stamp_path)
        except OSError:
            pass  # read-only cache: verification still happened
    return manifest


def spec_to_manifest(spec: DatasetSpec) -> Dict[str, Any]:
    return {
        "name": spec.name,
        "protocol_id": spec.protocol_id,
        "num_dense": spec.num_dense,
        "tables": [
            {"name": t.name, "num_embeddings": t.num_embeddings, "pooling": t.pooling, "multi_hot": t.multi_hot}
            for t in spec.tables
        ],
        "split_sizes": dict(spec.split_sizes),
        "targets": list(spec.extra_targets),
        "extras": dict(spec.extras),
    }


def load_prepared(directory: Path, verify_checksums: bool = True) -> PreparedDataset:
    """Open a prepared protocol directory (checksums verified unless told otherwise)."""
    directory = Path(directory)
    if verify_checksums:
        manifest = verify(directory)
    else:
        manifest = json.loads((directory / MANIFEST).read_text())
    tables = []
    for t in manifest["tables"]:
        counts = np.load(directory / "counts" / f"{t['name']}.npy")
        tables.append(TableSpec(t["name"], int(t["num_embeddings"]), counts, t["pooling"], bool(t["multi_hot"])))
    spec = DatasetSpec(
        name=manifest["name"],
        protocol_id=manifest["protocol_id"],
        num_dense=int(manifest["num_dense"]),
        tables=tuple(tables),
        split_sizes={k: int(v) for k, v in manifest["split_sizes"].items()},
        extra_targets=tuple(manifest.get("targets", [])),
        extras=manifest.get("extras", {}),
    )
    return PreparedDataset(spec=spec, directory=directory, manifest=manifest, version_dir=directory.resolve())


def try_load(directory: Path) -> Optional[PreparedDataset]:
    """Return the cached protocol if it is complete and intact, else None (it will be rebuilt)."""
    directory = Path(directory)
    if not (directory / MANIFEST).is_file():
        return None
    try:
        return load_prepared(directory)
    except CacheCorruptError as exc:
        log.warning("cache rejected, rebuilding: %s", exc)
        return None


def write_split(
    writer: CacheWriter,
    split: str,
    dense: np.ndarray,
    sparse: np.ndarray,
    labels: np.ndarray,
    multi: Optional[Mapping[str, tuple]] = None,
    targets: Optional[Mapping[str, np.ndarray]] = None,
) -> None:
    """Write one in-memory split (small protocols; large ones fill ``open_memmap`` arrays).

    Dense features must be finite: a NaN or infinity is a protocol bug that would surface much
    later as a diverged loss or a NaN AUC, so it is a ``DatasetError`` naming split, row, column."""
    dense = dense.astype(np.float32, copy=False)
    bad = ~np.isfinite(dense)
    if bad.any():
        row, column = (int(i[0]) for i in np.nonzero(bad))
        raise DatasetError(f"split {split!r}: dense feature {column} of row {row} is {float(dense[row, column])} "
                           f"({int(bad.sum())} non-finite value(s)); allowed: finite numbers")
    writer.save(f"{split}/dense.npy", dense)
    writer.save(f"{split}/sparse.npy", sparse.astype(np.int32, copy=False))
    writer.save(f"{split}/labels.npy", labels.astype(np.float32, copy=False))
    for name, (values, offsets) in (multi or {}).items():
        writer.save(f"{split}/multi/{name}.values.npy", values.astype(np.int32, copy=False))
        writer.save(f"{split}/multi/{name}.offsets.npy", offsets.astype(np.int64, copy=False))
    for name, values in (targets or {}).items():
        writer.save(f"{split}/targets/{name}.npy", values.astype(np.float32, copy=False))
