"""Faults while building or reading a protocol cache (recbench.datasets.storage).

- A corrupted cache (flipped byte, truncated or deleted file, unreadable manifest) is rejected by
  its checksums and rebuilt; a change that keeps size and mtime (bit rot) is found by the full
  re-hash of ``recbench-data verify``.
- A full disk (ENOSPC injected into the streaming writer; a real EFBIG from RLIMIT_FSIZE in a
  child process), a permission error when publishing, or SIGKILL halfway through a build leave
  no cache directory and no temporary directory that could look valid; the next prepare builds
  the same arrays as an undisturbed build.
"""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from recbench.datasets import storage
from recbench.datasets.criteo import CriteoProtocol
from recbench.datasets.storage import CacheCorruptError, MANIFEST, SPLITS, try_load, verify
from recbench.datasets.text import writer

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_criteo import make_lines  # noqa: E402


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("src") / "train.txt"
    path.write_text("\n".join(make_lines(600, seed=3)) + "\n")
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory, source):
    return CriteoProtocol(source=str(source), chunk_rows=100).prepare(tmp_path_factory.mktemp("ref"))


def arrays(prepared):
    return {f"{s}/{k}": np.array(getattr(prepared.split(s), k)) for s in SPLITS for k in ("dense", "sparse", "labels")}


def assert_same(prepared, reference):
    for key, value in arrays(reference).items():
        np.testing.assert_array_equal(arrays(prepared)[key], value, err_msg=key)


def assert_nothing_published(root: Path, protocol) -> None:
    directory = protocol.cache_dir(root)
    assert not directory.exists(), f"{directory} was published by a failed build"
    leftovers = [p for p in directory.parent.glob(".*tmp-*")] if directory.parent.exists() else []
    assert leftovers == [], f"temporary build directories left behind: {leftovers}"
    assert try_load(directory) is None


# ----------------------------------------------------------------------------- corruption


def flip_last_byte(path: Path, keep_mtime: bool = False) -> None:
    st = path.stat()
    blob = bytearray(path.read_bytes())
    blob[-1] ^= 0xFF
    path.write_bytes(bytes(blob))
    if keep_mtime:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete", "manifest"])
def test_corrupted_cache_is_rejected_by_checksum_and_rebuilt(tmp_path, source, reference, damage, caplog):
    protocol = CriteoProtocol(source=str(source), chunk_rows=100)
    first = protocol.prepare(tmp_path)
    target = first.directory / "train" / "sparse.npy"
    if damage == "flip":
        flip_last_byte(target)
    elif damage == "truncate":
        target.write_bytes(target.read_bytes()[:-7])
    elif damage == "delete":
        target.unlink()
    else:
        (first.directory / MANIFEST).write_text("{not json")
    with pytest.raises(CacheCorruptError):
        verify(first.directory)
    rebuilt = protocol.prepare(tmp_path)
    assert "cache rejected, rebuilding" in caplog.text
    assert_same(rebuilt, reference)
    verify(rebuilt.directory, full=True)


def test_bit_rot_that_keeps_size_and_mtime_is_found_by_the_full_verify(tmp_path, source):
    from recbench.cli.data import main as data_main

    protocol = CriteoProtocol(source=str(source), chunk_rows=100)
    prepared = protocol.prepare(tmp_path)
    verify(prepared.directory)  # stamps (size, mtime) of every file
    flip_last_byte(prepared.directory / "val" / "dense.npy", keep_mtime=True)
    verify(prepared.directory)  # the documented fast path: unchanged size and mtime are not re-hashed
    with pytest.raises(CacheCorruptError, match="val/dense.npy: checksum mismatch"):
        verify(prepared.directory, full=True)
    code = data_main(["verify", "criteo_kaggle", f"dataset.source={source}", "dataset.chunk_rows=100",
                      f"paths.data_root={tmp_path}"])
    assert code == 2


# ------------------------------------------------------------------------ failed builds


def test_disk_full_while_streaming_leaves_no_cache(tmp_path, source, reference, monkeypatch):
    protocol = CriteoProtocol(source=str(source), chunk_rows=100)
    appended = []
    original = writer.NpyStreamWriter.append

    def append(self, block):
        appended.append(1)
        if len(appended) == 7:  # in the second pass
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.path))
        return original(self, block)

    monkeypatch.setattr(writer.NpyStreamWriter, "append", append)
    with pytest.raises(OSError) as info:
        protocol.prepare(tmp_path)
    assert info.value.errno == errno.ENOSPC
    assert_nothing_published(tmp_path, protocol)
    monkeypatch.setattr(writer.NpyStreamWriter, "append", original)
    assert_same(protocol.prepare(tmp_path), reference)


def test_permission_error_when_publishing_leaves_no_cache(tmp_path, source, reference, monkeypatch):
    protocol = CriteoProtocol(source=str(source), chunk_rows=100)
    real_replace = os.replace

    def replace(src, dst):
        if Path(dst) == protocol.cache_dir(tmp_path):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(dst))
        return real_replace(src, dst)

    monkeypatch.setattr(storage.os, "replace", replace)
    with pytest.raises(PermissionError):
        protocol.prepare(tmp_path)
    assert_nothing_published(tmp_path, protocol)
    monkeypatch.setattr(storage.os, "replace", real_replace)
    assert_same(protocol.prepare(tmp_path), reference)


CHILD = """
import resource, signal, sys
from pathlib import Path
from recbench.datasets.criteo import CriteoProtocol
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing
limit = int(sys.argv[3])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
CriteoProtocol(source=sys.argv[1], chunk_rows=100).prepare(Path(sys.argv[2]))
"""


def test_a_real_file_size_limit_during_preprocessing_leaves_no_cache(tmp_path, source, reference):
    """RLIMIT_FSIZE makes the kernel refuse writes past 20 kB (EFBIG), like a full disk."""
    done = subprocess.run([sys.executable, "-c", CHILD, str(source), str(tmp_path), "20000"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and ("File too large" in done.stderr or "EFBIG" in done.stderr), done.stderr[-2000:]
    protocol = CriteoProtocol(source=str(source), chunk_rows=100)
    assert_nothing_published(tmp_path, protocol)
    assert_same(protocol.prepare(tmp_path), reference)


KILLED_CHILD = """
import sys, time
from pathlib import Path
from recbench.datasets.text import writer
from recbench.datasets.criteo import CriteoProtocol
original = writer.NpyStreamWriter.append
calls = []
def append(self, block):
    calls.append(1)
    if len(calls) == 5:
        Path(sys.argv[3]).touch()  # halfway: tell the parent, then wait for SIGKILL
        time.sleep(600)
    return original(self, block)
writer.NpyStreamWriter.append = append
CriteoProtocol(source=sys.argv[1], chunk_rows=100).prepare(Path(sys.argv[2]))
"""


def test_sigkill_halfway_through_a_build_publishes_nothing(tmp_path, source, reference):
    ready = tmp_path / "halfway"
    root = tmp_path / "root"
    child = subprocess.Popen([sys.executable, "-c", KILLED_CHILD, str(source), str(root), str(ready)])
    deadline = time.time() + 120
    while not ready.exists() and time.time() < deadline and child.poll() is None:
        time.sleep(0.1)
    assert ready.exists(), "the child never reached the middle of its build"
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    protocol = CriteoProtocol(source=str(source), chunk_rows=100)
    directory = protocol.cache_dir(root)
    assert not directory.exists() and try_load(directory) is None
    stale = list(directory.parent.glob(".*tmp-*"))
    assert stale and not any((s / MANIFEST).exists() for s in stale)  # a killed build cannot clean up, but
    assert_same(protocol.prepare(root), reference)  # its leftovers never look valid and are not read,
    assert list(directory.parent.glob(".*tmp-*")) == []  # and the next build removes them


def test_a_forced_rebuild_never_pulls_the_data_from_under_a_reader(tmp_path, source, reference):
    """Publishing switches a symlink to a new version folder atomically: a dataset loaded before a
    forced rebuild keeps reading its own version, a concurrent loader never finds the directory
    missing (was: rmtree then rename, and hundreds of FileNotFoundError under a stress test), and
    only the current and the previous version are kept."""
    import threading

    protocol = CriteoProtocol(source=str(source), chunk_rows=100)
    before = protocol.prepare(tmp_path)
    errors, stop = [], threading.Event()

    def read_continuously():
        while not stop.is_set():
            try:
                loaded = try_load(protocol.cache_dir(tmp_path))
                assert loaded is not None, "the cache was missing while being republished"
                assert len(loaded.split("train")) == len(reference.split("train"))
            except Exception as exc:  # noqa: BLE001 - any failure of the reader is the finding
                errors.append(repr(exc))

    reader = threading.Thread(target=read_continuously)
    reader.start()
    try:
        protocol.prepare(tmp_path, force=True)
        assert_same(before, reference)  # loaded before the rebuild: reads the previous version, kept
        for _ in range(2):
            protocol.prepare(tmp_path, force=True)
    finally:
        stop.set()
        reader.join()
    assert errors == []
    versions = list(protocol.cache_dir(tmp_path).parent.glob(f".{protocol.protocol_id()}.v-*"))
    assert len(versions) == 2 and protocol.cache_dir(tmp_path).resolve() in versions
    assert_same(protocol.prepare(tmp_path), reference)


def test_two_processes_preparing_one_protocol_build_it_once(tmp_path, source, monkeypatch):
    """The build lock: the second preparer waits, then loads what the first published."""
    import threading

    protocol = CriteoProtocol(source=str(source), chunk_rows=100)
    builds, real_build = [], CriteoProtocol.build

    def counting_build(self, writer):
        builds.append(1)
        time.sleep(0.5)  # both preparers reach the lock while this build runs
        return real_build(self, writer)

    monkeypatch.setattr(CriteoProtocol, "build", counting_build)
    results = []
    threads = [threading.Thread(target=lambda: results.append(CriteoProtocol(source=str(source), chunk_rows=100)
                                                              .prepare(tmp_path))) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(builds) == 1 and len(results) == 2
    assert results[0].manifest["files"] == results[1].manifest["files"]
