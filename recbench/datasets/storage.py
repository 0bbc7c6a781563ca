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

A cache directory is built under a temporary name and renamed into place only when complete,
so a crash, a full disk or a permission error never leaves a directory that looks valid.
Checksums are verified on load (and re-verified whenever a file's size or mtime changes); the
build stamps the (size, mtime) of the files it has just hashed, so its own first load does not
hash them a second time.

References: DESIGN.md sections 2, 3 ("Tables and datasets") and 8.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence

import numpy as np

from recbench.types import DatasetSpec, TableSpec

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

    def split(self, name: str) -> SplitArrays:
        if name not in SPLITS:
            raise KeyError(f"unknown split {name!r}; allowed: {', '.join(SPLITS)}")
        root = self.directory / name
        multi = [t.name for t in self.spec.tables if t.multi_hot]
        targets = self.manifest.get("targets", [])
        return SplitArrays(
            dense=np.load(root / "dense.npy", mmap_mode="r"),
            sparse=np.load(root / "sparse.npy", mmap_mode="r"),
            labels=np.load(root / "labels.npy", mmap_mode="r"),
            multi_values={f: np.load(root / "multi" / f"{f}.values.npy", mmap_mode="r") for f in multi},
            multi_offsets={f: np.load(root / "multi" / f"{f}.offsets.npy", mmap_mode="r") for f in multi},
            targets={t: np.load(root / "targets" / f"{t}.npy", mmap_mode="r") for t in targets},
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
        self.tmp_dir = Path(tempfile.mkdtemp(prefix=f".{self.final_dir.name}.tmp-", dir=self.final_dir.parent))
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
        if self.final_dir.exists():  # a stale or corrupt cache being rebuilt
            shutil.rmtree(self.final_dir)
        os.replace(self.tmp_dir, self.final_dir)
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
    return PreparedDataset(spec=spec, directory=directory, manifest=manifest)


def try_load(directory: Path) -> Optional[PreparedDataset]:
    """Return the cached protocol if it is complete and intact, else None (it will be rebuilt)."""
    directory = Path(directory)
    if not (directory / MANIFEST).is_file():
        return None
    try:
        return load_prepared(directory)
    except CacheCorruptError as exc:
        import logging

        logging.getLogger(__name__).warning("cache rejected, rebuilding: %s", exc)
        return None


def iter_splits() -> Iterator[str]:
    return iter(SPLITS)


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
        from recbench.datasets.base import DatasetError  # base imports this module

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
