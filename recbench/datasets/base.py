"""The dataset protocol contract: settings -> protocol id -> cached, verified arrays.

A protocol object is instantiated by Hydra from ``recbench/conf/dataset/<name>.yaml``. Its ``settings()``
hold everything that changes the numbers (source checksum, preprocessing rules, split rule,
label rule); the protocol id is the name plus a hash of them, so a changed rule never reuses a
stale cache.

References: docs/architecture.md sections 2, 3 ("Tables and datasets"), 4a and 8.
"""
from __future__ import annotations

import abc
import fcntl
import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator

from recbench.datasets.errors import DatasetError
from recbench.datasets.storage import (SPLITS, CacheWriter, PreparedDataset, load_prepared, remove_dead_pid_temps,
                                       remove_stale_builds, try_load)
from recbench.types import settings_hash

log = logging.getLogger(__name__)


def check_split_sizes(manifest: Dict[str, Any], protocol_id: str) -> None:
    """Every split needs rows: a source whose lines were all malformed (or too few for the split
    rule) is an error before anything is cached, not an empty protocol that fails later."""
    sizes = manifest.get("split_sizes", {})
    empty = [split for split in SPLITS if int(sizes.get(split, 0)) <= 0]
    if not empty:
        return
    extras = manifest.get("extras", {})
    detail = ""
    if extras.get("malformed_lines"):
        examples = extras.get("malformed_examples") or []
        detail = f"; {extras['malformed_lines']} malformed line(s) were skipped" + (f", first: {examples[0]}" if examples else "")
    raise DatasetError(f"{protocol_id}: no rows in split(s) {', '.join(empty)} "
                       f"(rows per split: {', '.join(f'{k}={sizes.get(k, 0)}' for k in SPLITS)}{detail}); "
                       "allowed: at least one row in every split")


class DatasetProtocol(abc.ABC):
    """Base class of every dataset protocol."""

    name: str = "dataset"

    @abc.abstractmethod
    def settings(self) -> Dict[str, Any]:
        """Every setting that changes the numbers, JSON-serialisable (source checksum included)."""

    @abc.abstractmethod
    def build(self, writer: CacheWriter) -> Dict[str, Any]:
        """Write every split and count file through ``writer``; return the manifest dict
        (see ``storage.spec_to_manifest``) without the ``files`` entry."""

    def protocol_id(self) -> str:
        return f"{self.name}-{settings_hash(self.settings())}"

    def cache_dir(self, data_root: Path) -> Path:
        return Path(data_root) / self.name / "processed" / self.protocol_id()

    def prepare(self, data_root: Path, force: bool = False) -> PreparedDataset:
        """Return the cached protocol, building (and atomically publishing) it when needed."""
        directory = self.cache_dir(data_root)
        if not force:
            cached = try_load(directory)
            if cached is not None:
                clean_leftovers(directory)
                return cached
        directory.parent.mkdir(parents=True, exist_ok=True)
        with build_lock(directory):
            if not force:  # another process may have published it while this one waited
                cached = try_load(directory)
                if cached is not None:
                    return cached
            for path in remove_stale_builds(directory):
                log.info("removed %s, left by a build that did not finish", path)
            log.info("preparing %s into %s", self.protocol_id(), directory)
            with CacheWriter(directory) as writer:
                manifest = self.build(writer)
                check_split_sizes(manifest, self.protocol_id())
                manifest.setdefault("settings", self.settings())
                manifest["protocol_id"] = self.protocol_id()
                writer.commit(manifest)
        return load_prepared(directory)


def clean_leftovers(directory: Path) -> None:
    """Remove what killed processes left next to a published cache: unfinished builds of it (only
    when no build of it runs now: the build lock is free) and ``raw/*.tmp-<pid>`` files of dead pids."""
    for path in remove_dead_pid_temps(directory.parent.parent / "raw"):
        log.info("removed %s, left by a killed process", path)
    if not any(directory.parent.glob(f".{directory.name}.tmp-*")):
        return
    with open(directory.with_name(f".{directory.name}.lock"), "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # a build is running: its temporary folder is not a leftover
            return
        try:
            for path in remove_stale_builds(directory):
                log.info("removed %s, left by a build that did not finish", path)
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextmanager
def build_lock(directory: Path) -> Iterator[None]:
    """An exclusive lock on ``.<directory name>.lock`` held while one process builds that cache."""
    with open(directory.with_name(f".{directory.name}.lock"), "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("another process is preparing %s; waiting for it", directory.name)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
