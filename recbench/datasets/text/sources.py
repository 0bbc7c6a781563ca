"""Source files of a text protocol: expansion, sha256 and line counts (cached next to the files), sidecars.

A source is a path, a glob or a list of them; globs expand in natural order (``day_2`` before
``day_10``). gzip files are read decompressed, whatever their name. The sha256 (of the bytes on
disk) and the line count of each file enter the protocol id; both are cached in
``.recbench-checksums.json`` next to the file, keyed by size and mtime.

Row extras: float sidecar arrays aligned with the data lines (e.g. the synthetic true click
probability) are gathered by data-line index and stored as ``<split>/targets/<name>.npy``.

References: FIPS 180-4 (SHA-256); RFC 1952 (the gzip magic bytes).
"""
from __future__ import annotations

import glob
import gzip
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple, Union

import numpy as np

from recbench.datasets.errors import DatasetError
from recbench.datasets.storage import sha256_file

log = logging.getLogger(__name__)

CHECKSUM_CACHE = ".recbench-checksums.json"
READ_BYTES = 1 << 20  # one read of a source; its newline scan stays in cache
GZIP_MAGIC = b"\x1f\x8b"

SourceLike = Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]]


@dataclass(frozen=True)
class SourceFile:
    """One source file: its sha256 (of the bytes on disk) and its number of text lines."""

    path: Path
    sha256: str
    lines: int

    def describe(self) -> Dict[str, Any]:
        return {"file": self.path.name, "sha256": self.sha256, "lines": self.lines}


def _natural_key(path: Path) -> List[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(path))]


def expand_sources(source: SourceLike, how_to_obtain: str) -> List[Path]:
    """Resolve ``source`` (a path, a glob, or a list of them) to existing files.

    Globs expand in natural order (``day_2`` before ``day_10``). A missing file or a glob that
    matches nothing raises ``DatasetError`` naming the path and ``how_to_obtain``.
    """
    items = [source] if isinstance(source, (str, os.PathLike)) else list(source)
    if not items:
        raise DatasetError(f"no source files given. {how_to_obtain}")
    paths: List[Path] = []
    for item in items:
        text = os.fspath(item)
        if glob.has_magic(text):
            matches = sorted((Path(p) for p in glob.glob(text)), key=_natural_key)
            if not matches:
                raise DatasetError(f"source pattern {text!r} matches no file. {how_to_obtain}")
            paths.extend(matches)
        else:
            paths.append(Path(text))
    for path in paths:
        if path.is_dir():
            raise DatasetError(f"source {path} is a folder; give the data file in it (or a glob such as "
                               f"{os.path.join(path, '*.txt')!r}). {how_to_obtain}")
        if not path.is_file():
            raise DatasetError(f"source file {path} does not exist. {how_to_obtain}")
    return paths


def open_binary(path: Path):
    """Open a source for reading bytes; gzip files (by their magic bytes, whatever their name) are
    decompressed on the fly."""
    with open(path, "rb") as probe:
        compressed = probe.read(2) == GZIP_MAGIC
    return gzip.open(path, "rb") if compressed else open(path, "rb")


def count_lines(path: Path) -> int:
    """Text lines of a file: newlines, plus one for a final line without a newline."""
    lines, last = 0, b"\n"
    with open_binary(path) as handle:
        while True:
            block = handle.read(READ_BYTES)
            if not block:
                break
            lines += block.count(b"\n")
            last = block[-1:]
    return lines + (last != b"\n")


_DIGESTS: Dict[Tuple[str, int, int], SourceFile] = {}


def describe_source(path: Path) -> SourceFile:
    """sha256 and line count of ``path``, cached by (path, size, mtime).

    The cache is a small JSON file (``.recbench-checksums.json``) next to the source, so the
    multi-gigabyte hash is computed once, not on every run; a read-only directory only loses
    the cache.
    """
    path = Path(path).resolve()
    stat = path.stat()
    memo_key = (str(path), stat.st_size, stat.st_mtime_ns)
    if memo_key in _DIGESTS:
        return _DIGESTS[memo_key]
    cache_path = path.parent / CHECKSUM_CACHE
    try:
        cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    except (OSError, json.JSONDecodeError):
        cache = {}
    entry = cache.get(path.name)
    if not (entry and entry.get("size") == stat.st_size and entry.get("mtime_ns") == stat.st_mtime_ns):
        log.info("computing sha256 and line count of %s (cached afterwards in %s)", path, cache_path.name)
        entry = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": sha256_file(path),
                 "lines": count_lines(path)}
        cache[path.name] = entry
        try:
            tmp = cache_path.with_name(f"{cache_path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(cache, indent=1, sort_keys=True))
            os.replace(tmp, cache_path)
        except OSError as exc:
            log.warning("cannot cache the checksum of %s (%s); it is recomputed next run", path, exc)
    described = SourceFile(path, entry["sha256"], int(entry["lines"]))
    _DIGESTS[memo_key] = described
    return described


@dataclass(frozen=True)
class RowExtra:
    """A float sidecar array (``.npy``, shape (L,)) aligned with the data lines of the sources."""

    name: str
    path: Path

    def describe(self) -> Dict[str, Any]:
        return {"file": self.path.name, "sha256": describe_source(self.path).sha256}

    def read(self, start: int, stop: int) -> np.ndarray:
        values = np.load(self.path, mmap_mode="r")  # re-opened per chunk: resident pages stay bounded
        try:
            return np.array(values[start:stop], dtype=np.float32)
        finally:
            del values
