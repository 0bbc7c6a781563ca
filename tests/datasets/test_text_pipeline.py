"""The fast paths of the streaming text pipeline keep its rules (recbench.datasets.text).

- Dense fields parsed as Int64 by the CSV reader accept exactly what the String path accepts
  (the field read as String, then ``str.cast(pl.Int64)``): a chunk holding a value the Int64
  reader would read differently (a leading space, a carriage return inside a line) takes the
  String path, so the same lines are malformed and the same values kept.
- Line chunks hold every line once, in order, whatever the chunk and read sizes.
- A ``.npy`` written with its row count unknown in advance is byte-identical to ``np.save``.
- Categorical codes are stable across chunks: the arrays do not depend on ``chunk_rows`` even
  when new values keep appearing, and a build's own load does not re-hash its files while a
  later change is still caught.
"""
from __future__ import annotations

import io
import random
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from recbench.datasets import storage
from recbench.datasets.criteo import CRITEO_FORMAT, CriteoProtocol
from recbench.datasets.text import sources
from recbench.datasets.text.parsing import LineChunk, iter_line_chunks, parse_chunk
from recbench.datasets.text.sources import SourceFile
from recbench.datasets.text.writer import NpyStreamWriter

TRICKY_INTEGERS = ["5", "+5", "-0", "05", "0005", " 5", "  5", "5 ", " -5", "5\r", "\r5", "1e3", "5.0", "0x10",
                   "9223372036854775807", "9223372036854775808", "-9223372036854775808", "-9223372036854775809",
                   "--1", "+-1", "-", "+", "1_000", "\u0663", "\uff11", "\u00a05", "\x0b5", ""]


def criteo_line(dense0: str, label: str = "1") -> bytes:
    return "\t".join([label, dense0, *["3"] * 12, *[f"{f:08x}" for f in range(26)]]).encode()


def chunk_of(lines, tmp_path: Path) -> LineChunk:
    data = b"".join(line + b"\n" for line in lines)
    ends = np.flatnonzero(np.frombuffer(data, dtype=np.uint8) == 10)
    return LineChunk(SourceFile(tmp_path / "x.txt", "0" * 64, len(lines)), 1, 0, data, ends)


def string_path_value(value: str):
    """The field as the String path reads it (the CSV reader drops a field's trailing ``\\r``)."""
    line = "\t".join(["a", value, "b"]).encode() + b"\n"
    return pl.read_csv(line, has_header=False, separator="\t", schema={"x": pl.String, "y": pl.String, "z": pl.String},
                       quote_char=None).item(0, "y")


def rule_accepts(value: str) -> bool:
    read = string_path_value(value)
    return read is None or pl.Series([read]).cast(pl.Int64, strict=False)[0] is not None


@pytest.mark.parametrize("value", TRICKY_INTEGERS)
def test_dense_values_follow_the_string_rule_on_either_path(tmp_path, value):
    good = criteo_line("7")
    for lines in ([good, criteo_line(value), good], [criteo_line(value)]):
        parsed = parse_chunk(chunk_of(lines, tmp_path), CRITEO_FORMAT)
        bad = [m.line for m in parsed.malformed]
        expected = [] if rule_accepts(value) else [lines.index(criteo_line(value)) + 1]
        assert bad == expected, (value, [m.message() for m in parsed.malformed])
        assert parsed.frame.schema["I1"] == pl.Int64
        if rule_accepts(value):
            row = parsed.frame.get_column("I1").to_list()[lines.index(criteo_line(value))]
            read = string_path_value(value)
            assert row == (None if read is None else int(read))


def test_crlf_endings_parse_like_lf_endings(tmp_path):
    lines = [criteo_line("7"), criteo_line("-8", label="0"), criteo_line("")]
    lf = parse_chunk(chunk_of(lines, tmp_path), CRITEO_FORMAT)
    crlf = parse_chunk(chunk_of([line + b"\r" for line in lines], tmp_path), CRITEO_FORMAT)
    assert lf.malformed_count == crlf.malformed_count == 0
    assert crlf.frame.drop(CRITEO_FORMAT.categorical).equals(lf.frame.drop(CRITEO_FORMAT.categorical))
    assert crlf.frame.get_column("I1").to_list() == [7, -8, None]


@settings(max_examples=150, deadline=None)
@given(lengths=st.lists(st.integers(0, 40), max_size=50), final_newline=st.booleans(),
       chunk_rows=st.integers(1, 12), read_bytes=st.sampled_from([1, 2, 5, 64, 1 << 23]))
def test_line_chunks_hold_every_line_once_in_order(tmp_path_factory, lengths, final_newline, chunk_rows, read_bytes):
    rng = random.Random(len(lengths))
    lines = [bytes(rng.choice(b"ab\t") for _ in range(n)) for n in lengths]
    data = b"\n".join(lines) + (b"\n" if final_newline and lines else b"")
    path = tmp_path_factory.mktemp("lines") / "f.txt"
    path.write_bytes(data)
    count = data.count(b"\n") + (1 if data and not data.endswith(b"\n") else 0)
    original = sources.READ_BYTES
    sources.READ_BYTES = read_bytes
    try:
        chunks = list(iter_line_chunks(SourceFile(path, "0" * 64, count), chunk_rows, 10))
    finally:
        sources.READ_BYTES = original
    got = []
    for k, chunk in enumerate(chunks):
        assert len(chunk) == min(chunk_rows, count - k * chunk_rows)
        assert chunk.first_line == 1 + k * chunk_rows and chunk.first_index == 10 + k * chunk_rows
        starts = np.r_[0, chunk.ends[:-1] + 1]
        assert all(chunk.data[e:e + 1] == b"\n" for e in chunk.ends.tolist())
        got += [chunk.data[s:e] for s, e in zip(starts.tolist(), chunk.ends.tolist())]
    assert got == data.split(b"\n")[:count]


@pytest.mark.parametrize("shape", [(0, 13), (5, 13), (123457, 2), (7,)])
def test_npy_with_rows_unknown_in_advance_is_byte_identical_to_np_save(tmp_path, shape):
    array = np.arange(int(np.prod(shape)), dtype=np.float32).reshape(shape)
    writer = NpyStreamWriter(tmp_path / "a.npy", np.float32, (None, *shape[1:]))
    for start in range(0, shape[0], 1000):
        writer.append(array[start:start + 1000])
    writer.close()
    expected = io.BytesIO()
    np.save(expected, array)
    assert (tmp_path / "a.npy").read_bytes() == expected.getvalue()


def test_new_values_in_every_chunk_and_chunk_rows_do_not_change_the_arrays(tmp_path):
    rng = np.random.default_rng(0)
    lines = []
    for i in range(900):  # values drawn from a range that widens with the line number: new codes in every chunk
        cats = [f"{int(rng.integers(0, 3 + i // (f + 1))):x}" for f in range(26)]
        cats[3] = "NotHex" if i % 7 == 0 else cats[3]
        cats[5] = "" if i % 5 == 0 else cats[5]
        lines.append("\t".join([str(i % 2), *[str(int(rng.integers(-2, 9))) for _ in range(13)], *cats]))
    source = tmp_path / "train.txt"
    source.write_text("\n".join(lines) + "\n")
    built = [CriteoProtocol(source=str(source), split="random", min_count=2, chunk_rows=rows).prepare(tmp_path / f"r{rows}")
             for rows in (37, 900)]
    for split in ("train", "val", "test"):
        np.testing.assert_array_equal(built[0].split(split).sparse, built[1].split(split).sparse)
        np.testing.assert_array_equal(built[0].split(split).dense, built[1].split(split).dense)
    assert built[0].manifest["files"] == built[1].manifest["files"]


def test_a_build_stamps_what_it_hashed_and_a_later_change_is_still_caught(tmp_path, monkeypatch):
    source = tmp_path / "train.txt"
    source.write_text("\n".join(criteo_line(str(i)).decode() for i in range(50)) + "\n")
    protocol = CriteoProtocol(source=str(source), chunk_rows=16)
    hashed = []
    real = storage.sha256_file
    monkeypatch.setattr(storage, "sha256_file", lambda path, *a: hashed.append(Path(path).name) or real(path, *a))
    prepared = protocol.prepare(tmp_path / "root")
    assert len(hashed) == len(prepared.manifest["files"])  # at the build, not again at its load
    target = prepared.directory / "val" / "sparse.npy"
    target.write_bytes(target.read_bytes()[:-4])  # a new size: re-hashed, rejected
    with pytest.raises(storage.CacheCorruptError, match="val/sparse.npy: checksum mismatch"):
        storage.verify(prepared.directory)


def test_dense_transform_table_equals_the_direct_computation():
    values = [0, 1, 7, 65535, 65536, 10**6, 2**53 + 1, 2**62, 2**63 - 1, -5, None]
    frame = pl.DataFrame({c: pl.Series(values if c == "I1" else values[::-1], dtype=pl.Int64) for c in CRITEO_FORMAT.dense})
    direct = frame.select([pl.col(c).clip(lower_bound=0).fill_null(0).cast(pl.Float64).log1p().cast(pl.Float32)
                           for c in CRITEO_FORMAT.dense]).to_numpy()
    got = CRITEO_FORMAT.dense_values(frame)
    assert got.dtype == np.float32 and np.array_equal(got, direct)
    assert got[0, 0] == 0 and got[-2, 0] == 0 and got[-1, 0] == 0  # log(0 + 1); negative clamped; missing
