"""Bad input data gets a specific error or the documented policy, and nothing is dropped silently.

Property-based (hypothesis) over where bad lines land and which kind they are:

- Criteo and Avazu (streaming pipeline, ``malformed=skip`` by default): every bad line is counted
  and listed with its line number, every other line is kept, in order; ``malformed=fail`` names the
  first bad line; a split left without rows is an error, not an empty protocol.
- MovieLens (fail-fast policy): a bad token in any field of any ``u.data`` line is a
  ``DatasetError`` naming the file, the line and the field.

Plus: empty files, files of only blank lines, and non-finite dense features written by a protocol.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Dict

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from recbench.datasets.avazu import AvazuProtocol
from recbench.datasets.errors import DatasetError
from recbench.datasets.criteo import CriteoProtocol
from recbench.datasets.movielens import MovieLens100K

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_avazu import HEADER as AVAZU_HEADER, make_rows as avazu_rows  # noqa: E402
from test_criteo import file_order, make_lines as criteo_lines  # noqa: E402
from test_movielens import _replace_line, _tiny_grouplens  # noqa: E402

LINES = 60


def _field(index: int, value: bytes):
    def damage(good: bytes) -> bytes:
        fields = good.split(b"\t")
        fields[index] = value
        return b"\t".join(fields)
    return damage


CRITEO_BAD = {  # kind -> (good line -> bad line)
    "too few fields": lambda good: good.rsplit(b"\t", 1)[0],
    "too many fields": lambda good: good + b"\t0",
    "non-numeric integer": _field(2, b"12a"),
    "integer beyond int64": _field(1, b"9223372036854775808"),
    "float for an integer": _field(3, b"1.5"),
    "nan dense": _field(4, b"nan"),
    "inf dense": _field(5, b"-inf"),
    "label not 0/1": _field(0, b"2"),
    "empty line": lambda good: b"",
    "non-UTF-8 byte": _field(20, b"caf\xe9"),
}
AVAZU_BAD = {
    "too few fields": lambda good: good.rsplit(b",", 1)[0],
    "too many fields": lambda good: good + b",1",
    "click not 0/1": lambda good: b",".join([good.split(b",")[0], b"yes", *good.split(b",")[2:]]),
    "hour out of range": lambda good: b",".join([*good.split(b",")[:2], b"14102124", *good.split(b",")[3:]]),
    "hour too short": lambda good: b",".join([*good.split(b",")[:2], b"1410", *good.split(b",")[3:]]),
    "empty line": lambda good: b"",
    "non-UTF-8 byte": lambda good: good.replace(b",", b",\xff", 1),
}


def bad_lines(kinds) -> st.SearchStrategy:
    return st.dictionaries(st.integers(0, LINES - 1), st.sampled_from(sorted(kinds)), max_size=8)


def check_skip_and_fail(protocol_class, path: Path, root: Path, bad: Dict[int, str], first_line: int,
                        good_labels) -> None:
    """The accounting shared by both pipelines' formats. ``first_line``: file line of data row 0."""
    try:
        ds = protocol_class(source=str(path), chunk_rows=16).prepare(root / "skip")
    except DatasetError as exc:  # the bad lines emptied a split: the documented error, not an empty protocol
        assert "no rows in split(s)" in str(exc) and f"{len(bad)} malformed line(s)" in str(exc)
        kept = LINES - len(bad)
    else:
        extras = ds.spec.extras
        assert extras["malformed_lines"] == len(bad)
        listed = [int(e.split(": ")[0].rsplit(":", 1)[1]) for e in extras["malformed_examples"]]
        assert listed == sorted(first_line + i for i in bad)[:20]
        kept = sum(ds.spec.split_sizes.values())
        if protocol_class is CriteoProtocol:  # same rows, same order, minus exactly the bad lines
            expected = [label for i, label in enumerate(good_labels) if i not in bad]
            np.testing.assert_array_equal(file_order(ds, "labels"), expected)
    assert kept == LINES - len(bad)
    if bad:
        with pytest.raises(DatasetError, match=rf"{path}:{first_line + min(bad)}: "):
            protocol_class(source=str(path), chunk_rows=16, malformed="fail").prepare(root / "fail")


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bad=bad_lines(CRITEO_BAD))
def test_criteo_bad_lines_are_counted_listed_or_fatal(bad):
    good = [s.encode() for s in criteo_lines(LINES, seed=11)]
    lines = [CRITEO_BAD[bad[i]](g) if i in bad else g for i, g in enumerate(good)]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "train.txt"
        path.write_bytes(b"\n".join(lines) + b"\n")
        check_skip_and_fail(CriteoProtocol, path, Path(tmp), bad, 1, [float(g[:1]) for g in good])


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bad=bad_lines(AVAZU_BAD))
def test_avazu_bad_lines_are_counted_listed_or_fatal(bad):
    good = [",".join(r).encode() for r in avazu_rows(LINES, seed=4)]
    lines = [AVAZU_BAD[bad[i]](g) if i in bad else g for i, g in enumerate(good)]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "train.csv"
        path.write_bytes(b"\n".join([AVAZU_HEADER.encode(), *lines]) + b"\n")
        check_skip_and_fail(AvazuProtocol, path, Path(tmp), bad, 2, None)


U_DATA_FIELDS = ("user", "item", "rating", "timestamp")
BAD_TOKENS = ["", "x", "1.5", "99999999999999999999999", "-1", "\xff", "nan", "inf", "0x10"]


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(line=st.integers(1, 20), field=st.integers(0, 3), token=st.sampled_from(BAD_TOKENS))
def test_movielens_bad_field_is_a_clear_error(line, field, token):
    with tempfile.TemporaryDirectory() as tmp:
        source = _tiny_grouplens(Path(tmp) / "gl")
        fields = (source / "u.data").read_text().split("\n")[line - 1].split("\t")
        fields[field] = token
        _replace_line(source / "u.data", line, "\t".join(fields))
        with pytest.raises(DatasetError, match=rf"u\.data:{line}: field '{U_DATA_FIELDS[field]}' has value"):
            MovieLens100K(source="grouplens", grouplens_dir=str(source)).prepare(Path(tmp) / "root")


@pytest.mark.parametrize("text, message", [("", "u.data:3: expected 4"), ("1\t1\t3\t880000001\t9", "found 5")])
def test_movielens_empty_line_and_extra_column(tmp_path, text, message):
    source = _tiny_grouplens(tmp_path / "gl")
    _replace_line(source / "u.data", 3, text)
    with pytest.raises(DatasetError, match=message):
        MovieLens100K(source="grouplens", grouplens_dir=str(source)).prepare(tmp_path / "root")


@pytest.mark.parametrize("protocol, content, message", [
    ("criteo", b"", "no data lines"),
    ("criteo", b"\n\n\n", r"no rows in split\(s\) train, val, test .*3 malformed line\(s\).*empty line"),
    ("criteo", b"a\tb\n" * 20, r"no rows in split\(s\) train, val, test .*20 malformed"),
    ("avazu", b"", "empty file; allowed: a header line"),
    ("avazu", AVAZU_HEADER.encode() + b"\n", "no data lines"),
    ("movielens", b"", r"u\.data: no data lines"),
])
def test_empty_and_all_malformed_files(tmp_path, protocol, content, message):
    if protocol == "movielens":
        source = _tiny_grouplens(tmp_path / "gl")
        (source / "u.data").write_bytes(content)
        make = lambda: MovieLens100K(source="grouplens", grouplens_dir=str(source))  # noqa: E731
    else:
        path = tmp_path / "train.txt"
        path.write_bytes(content)
        cls = CriteoProtocol if protocol == "criteo" else AvazuProtocol
        make = lambda: cls(source=str(path))  # noqa: E731
    with pytest.raises(DatasetError, match=message):
        make().prepare(tmp_path / "root")
    assert not list((tmp_path / "root").rglob("manifest.json"))  # nothing cached


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_dense_features_are_rejected_before_caching(tmp_path, value):
    from recbench.datasets import storage
    from toy_protocol import ToyProtocol

    class Broken(ToyProtocol):
        def build(self, writer):
            original = storage.write_split

            def poisoned(writer, split, dense, *args, **kwargs):
                if split == "val":
                    dense = dense.copy()
                    dense[7, 2] = value
                return original(writer, split, dense, *args, **kwargs)

            import toy_protocol
            toy_protocol.write_split = poisoned
            try:
                return super().build(writer)
            finally:
                toy_protocol.write_split = original

    protocol = Broken(rows=500)
    with pytest.raises(DatasetError, match=rf"split 'val': dense feature 2 of row 7 is {value}.*allowed: finite"):
        protocol.prepare(tmp_path)
    assert not protocol.cache_dir(tmp_path).exists()


def test_a_folder_as_source_says_so(tmp_path):
    (tmp_path / "data").mkdir()
    with pytest.raises(DatasetError, match=r"source .*/data is a folder; give the data file in it \(or a glob such as"):
        CriteoProtocol(source=str(tmp_path / "data"), chunk_rows=100).prepare(tmp_path / "root")


def test_a_gzip_file_without_the_gz_suffix_is_read_as_gzip(tmp_path):
    """Compression is recognised by the file's magic bytes (was: a UTF-8 error for ``train.txt`` that
    was gzip); the arrays equal those of the plain file."""
    import gzip

    lines = "\n".join(criteo_lines(300, seed=5)) + "\n"
    plain, packed = tmp_path / "plain.txt", tmp_path / "packed.txt"
    plain.write_text(lines)
    packed.write_bytes(gzip.compress(lines.encode()))
    a = CriteoProtocol(source=str(plain), chunk_rows=100).prepare(tmp_path / "a")
    b = CriteoProtocol(source=str(packed), chunk_rows=100).prepare(tmp_path / "b")
    for split in ("train", "val", "test"):
        np.testing.assert_array_equal(np.array(a.split(split).sparse), np.array(b.split(split).sparse))
