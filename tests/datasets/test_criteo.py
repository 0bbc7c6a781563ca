"""Tests of the Criteo protocols and the shared streaming pipeline (recbench.datasets.criteo,
recbench.datasets.text), on tiny Criteo-format files written into tmp_path."""
from __future__ import annotations

import gzip
import json
import math
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
import polars as pl
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from recbench.datasets import storage
from recbench.datasets.errors import DatasetError
from recbench.datasets.batching import BatchIterator
from recbench.datasets.criteo import DENSE_FIELDS, SPARSE_FIELDS, CriteoProtocol
from recbench.datasets.storage import SPLITS
from recbench.datasets.text.keys import MISSING_KEY, FeistelPermutation, string_keys
from recbench.datasets.text.parsing import invalid_utf8_positions
from recbench.datasets.text.sources import CHECKSUM_CACHE
from recbench.datasets.text.splits import SplitAssigner

ROWS = 2003  # 7 * 286 + 1: the first DLRM chunk is one line longer


def make_lines(n: int, seed: int = 0) -> List[str]:
    """``n`` random Criteo lines: dense in [-2, 50) with 10% missing, 26 hex fields with 5% missing."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    dense = rng.integers(-2, 50, (n, 13)).astype(str).astype(object)
    dense[rng.random((n, 13)) < 0.1] = ""
    cards = rng.integers(2, 60, 26)
    cats = np.stack([np.char.mod("%08x", rng.integers(0, c, n) * 7919 + f) for f, c in enumerate(cards)], axis=1).astype(object)
    cats[rng.random((n, 26)) < 0.05] = ""
    return ["\t".join([str(labels[i]), *dense[i], *cats[i]]) for i in range(n)]


def line(label: str = "0", dense: Optional[Sequence[str]] = None, cats: Optional[Sequence[str]] = None) -> str:
    dense = list(dense) if dense is not None else ["1"] * 13
    cats = list(cats) if cats is not None else [f"{f:08x}" for f in range(26)]
    return "\t".join([label, *dense, *cats])


def write(path: Path, lines: Sequence[str], ending: str = "\n", final_newline: bool = True) -> Path:
    text = ending.join(lines) + (ending if final_newline else "")
    path.write_bytes(text.encode())
    return path


def index_extra(tmp_path: Path, n: int) -> Path:
    """A row extra holding each data line's 0-based index (to check alignment and splits)."""
    path = tmp_path / "index.npy"
    np.save(path, np.arange(n, dtype=np.float32))
    return path


def prepare(tmp_path: Path, source, **kwargs):
    kwargs.setdefault("chunk_rows", 500)
    return CriteoProtocol(source=source, **kwargs).prepare(tmp_path / "root")


def file_order(ds, key: str):
    """Rows of all splits in file order (dlrm_chunks: train, then test, then val)."""
    parts = [ds.split(s) for s in ("train", "test", "val")]
    if key == "index":
        return np.concatenate([p.targets["index"] for p in parts])
    return np.concatenate([getattr(p, key) for p in parts])


@pytest.fixture(scope="module")
def random_file(tmp_path_factory) -> Path:
    return write(tmp_path_factory.mktemp("src") / "train.txt", make_lines(ROWS))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, random_file):
    root = tmp_path_factory.mktemp("root")
    extra = index_extra(root, ROWS)
    return CriteoProtocol(source=random_file, chunk_rows=300, row_extras={"index": str(extra)}).prepare(root)


# ------------------------------------------------------------------------------------------------
# dense and categorical rules
# ------------------------------------------------------------------------------------------------


def test_dense_log_transform_missing_and_negative(tmp_path):
    values = ["0", "", "-3", "5", "123456789012", "1", "", "7", "2", "-1", "9", "", "42"]
    lines = [line(dense=values)] + [line()] * 13
    ds = prepare(tmp_path, write(tmp_path / "train.txt", lines))
    got = ds.split("train").dense[0]
    expected = np.log1p(np.maximum([0 if v == "" else int(v) for v in values], 0)).astype(np.float32)
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    assert got[1] == 0 and got[2] == 0  # missing -> 0, negative clamped to 0
    assert ds.split("train").dense.dtype == np.float32 and ds.split("train").dense.shape == (12, 13)


def test_labels_and_table_layout(prepared, random_file):
    spec = prepared.spec
    assert spec.num_dense == 13 and spec.feature_names == list(SPARSE_FIELDS)
    labels = file_order(prepared, "labels")
    expected = np.array([int(s.split("\t")[0]) for s in random_file.read_text().splitlines()], dtype=np.float32)
    np.testing.assert_array_equal(labels, expected)
    for split in SPLITS:
        arrays = prepared.split(split)
        assert arrays.sparse.dtype == np.int32 and arrays.sparse.shape == (len(arrays), 26)
        assert arrays.labels.dtype == np.float32


def c1_lines(values: Sequence[str]) -> List[str]:
    """14 lines (12 train, 1 test, 1 validation under dlrm_chunks) with the given 12 C1 values."""
    assert len(values) == 12
    return [line(cats=[v] + [f"{f:08x}" for f in range(1, 26)]) for v in values] + [line(), line()]


def test_min_count_threshold_maps_rare_values_to_oov(tmp_path):
    c1 = ["0000aaaa"] * 5 + ["0000bbbb"] * 3 + ["0000cccc"] + [""] + ["0000dddd"] * 2
    ds = prepare(tmp_path, write(tmp_path / "train.txt", c1_lines(c1)), min_count=3)
    np.testing.assert_array_equal(ds.split("train").sparse[:, 0], [1] * 5 + [2] * 3 + [0] * 4)
    table = ds.spec.tables[0]
    assert table.num_embeddings == 3
    np.testing.assert_array_equal(table.counts, [4, 5, 3])  # OOV: cccc once, one missing, dddd twice


def test_rows_ordered_by_ascending_key_by_default(tmp_path):
    """Rows 1..V are the sorted tokens (ascending key), whatever their frequency, as Hetu's
    LabelEncoder numbers them; ``counts[r]`` is row r's train count."""
    c1 = ["0000000c"] * 3 + ["000000b1"] * 5 + ["0000000a"] + ["000000a2"] * 3
    ds = prepare(tmp_path, write(tmp_path / "train.txt", c1_lines(c1)))
    np.testing.assert_array_equal(ds.split("train").sparse[:, 0], [2] * 3 + [4] * 5 + [1] + [3] * 3)
    np.testing.assert_array_equal(ds.spec.tables[0].counts, [0, 1, 3, 3, 5])


def test_row_order_frequency_numbers_rows_by_train_count_then_key(tmp_path):
    c1 = ["00000003"] * 3 + ["00000001"] * 5 + ["00000002"] * 3 + ["00000004"]
    ds = prepare(tmp_path, write(tmp_path / "train.txt", c1_lines(c1)), row_order="frequency")
    np.testing.assert_array_equal(ds.split("train").sparse[:, 0], [3] * 3 + [1] * 5 + [2] * 3 + [4])
    np.testing.assert_array_equal(ds.spec.tables[0].counts, [0, 5, 3, 3, 1])


def test_key_order_is_the_label_encoder_order_of_equal_length_hex_tokens(prepared, random_file):
    """On 8-digit hex tokens (Criteo's), row r of a field is the r-th token of
    ``sklearn.preprocessing.LabelEncoder().fit(train tokens).classes_`` (Hetu's ``load_data.py``
    numbering, on the train split, without missing values), and the counts are aligned with it."""
    from sklearn.preprocessing import LabelEncoder

    fields = [s.split("\t") for s in random_file.read_text().splitlines()]
    train_lines = np.sort(prepared.split("train").targets["index"].astype(np.int64))
    for f in (0, 7, 25):
        tokens = [fields[i][14 + f] for i in train_lines if fields[i][14 + f]]
        classes = LabelEncoder().fit(tokens).classes_
        rows = prepared.split("train").sparse[:, f]
        values = [fields[int(i)][14 + f] for i in prepared.split("train").targets["index"]]
        expected = [0 if not v else int(np.searchsorted(classes, v)) + 1 for v in values]
        np.testing.assert_array_equal(rows, expected)
        counts = prepared.spec.tables[f].counts
        assert counts[1:].tolist() == [tokens.count(c) for c in classes]


def test_row_order_is_in_the_protocol_id_and_keeps_the_arrays_but_the_row_numbers(tmp_path, prepared, random_file):
    """``row_order=frequency`` relabels the rows (a permutation per field), nothing else: the same
    counts in another order, the same dense values and labels; and it has its own protocol id."""
    extra = index_extra(tmp_path, ROWS)
    other = CriteoProtocol(source=random_file, chunk_rows=300, row_extras={"index": str(extra)},
                           row_order="frequency").prepare(tmp_path)
    assert other.spec.protocol_id != prepared.spec.protocol_id
    for f, (a, b) in enumerate(zip(prepared.spec.tables, other.spec.tables)):
        assert a.num_embeddings == b.num_embeddings and a.counts[0] == b.counts[0]
        assert np.all(np.diff(b.counts[1:]) <= 0)  # frequency: non-increasing
        perm = np.zeros(a.num_embeddings, dtype=np.int64)  # key row -> frequency row
        for split in SPLITS:
            perm[prepared.split(split).sparse[:, f]] = other.split(split).sparse[:, f]
            np.testing.assert_array_equal(perm[prepared.split(split).sparse[:, f]], other.split(split).sparse[:, f])
        np.testing.assert_array_equal(b.counts[perm], a.counts)
    for split in SPLITS:
        np.testing.assert_array_equal(prepared.split(split).dense, other.split(split).dense)
        np.testing.assert_array_equal(prepared.split(split).labels, other.split(split).labels)
    with pytest.raises(ValueError, match="row_order must be one of key, frequency"):
        CriteoProtocol(source=random_file, row_order="sorted")


def test_hash_cap_buckets_keys_before_the_vocabulary(tmp_path):
    # key(v) = int(v, 16) + (16**8 - 16) / 15, and that offset is divisible by 4: key % 4 == int(v, 16) % 4
    c1 = ["00000001", "00000005", "00000002", "00000009", "00000003", "00000004"] * 2
    ds = prepare(tmp_path, write(tmp_path / "train.txt", c1_lines(c1)), hash_cap=4)
    rows = ds.split("train").sparse[:6, 0]
    assert rows[0] == rows[1] == rows[3] == 2  # 1, 5 and 9 share bucket 1 (rows: buckets in ascending order)
    np.testing.assert_array_equal(rows[[5, 2, 4]], [1, 3, 4])  # buckets 0, 2, 3
    np.testing.assert_array_equal(ds.spec.tables[0].counts, [0, 2, 6, 2, 2])
    assert all(t.num_embeddings <= 5 for t in ds.spec.tables)


def test_vocabularies_and_counts_come_from_train_only(prepared, random_file, tmp_path):
    lines = make_lines(70, seed=3)
    fields = [s.split("\t") for s in lines]
    for row in fields[60:]:  # the last chunk (lines 60..69) is val/test: give it new values
        row[14] = "deadbeef"
    ds = prepare(tmp_path, write(tmp_path / "train.txt", ["\t".join(r) for r in fields]))
    table = ds.spec.tables[0]
    train = [r[14] for r in fields[:60]]
    assert table.num_embeddings == len({v for v in train if v}) + 1
    assert int(table.counts.sum()) == 60 == len(ds.split("train"))
    for split in ("val", "test"):
        assert np.all(ds.split(split).sparse[:, 0] == 0)  # unseen in train -> OOV


def test_counts_match_the_train_split(prepared):
    train = prepared.split("train")
    for f, table in enumerate(prepared.spec.tables):
        np.testing.assert_array_equal(np.bincount(train.sparse[:, f], minlength=table.num_embeddings), table.counts)
        assert table.counts.dtype == np.int64 and np.all(table.counts[1:] > 0)


def test_string_keys_are_injective_and_stable():
    values = pl.Series(["a", "0a", "00a", "A", "+a", "0000000a", "zz", "ZZ", None, "ffffffffffffffff", "ff" * 9])
    keys = string_keys(pl.DataFrame({"v": values}), ["v"])[0]
    assert keys[8] == MISSING_KEY
    present = np.delete(keys, 8)
    assert len(set(present.tolist())) == present.size
    assert keys[0] == 10 and keys[1] == 16 + 10 and keys[5] == 10 + (16**8 - 16) // 15
    assert np.all(keys[[3, 4, 6, 7, 9, 10]] >= 2**63)  # non-canonical -> FNV with the top bit
    # the fast path (no A-F or '+' in the chunk) gives the same keys
    plain = pl.DataFrame({"v": ["a", "0a", "zz", None, "1234abcd"]})
    np.testing.assert_array_equal(string_keys(plain, ["v"], plain=True)[0], string_keys(plain, ["v"])[0])


# ------------------------------------------------------------------------------------------------
# splits
# ------------------------------------------------------------------------------------------------


def test_dlrm_chunks_boundaries_exact(prepared):
    # ROWS = 2003 = 7 * 286 + 1: chunk sizes 287, 286 x 6; train = 287 + 5 * 286 = 1717 lines;
    # the last chunk (286 lines) is halved: first 143 test, last 143 validation
    index = {s: prepared.split(s).targets["index"].astype(np.int64) for s in SPLITS}
    np.testing.assert_array_equal(index["train"], np.arange(0, 1717))
    np.testing.assert_array_equal(index["test"], np.arange(1717, 1860))
    np.testing.assert_array_equal(index["val"], np.arange(1860, 2003))
    assert dict(prepared.spec.split_sizes) == {"train": 1717, "val": 143, "test": 143}


@pytest.mark.parametrize("total", [7, 8, 13, 100, 2003])
def test_dlrm_chunks_match_dlrm_array_split(total):
    # DLRM: divmod into 7 days (first `extra` days one longer); last day np.array_split in 2: test, val
    base, extra = divmod(total, 7)
    days = np.array_split(np.arange(total), np.cumsum([base + (d < extra) for d in range(7)])[:-1])
    test, val = np.array_split(days[-1], 2)
    codes = SplitAssigner("dlrm_chunks", total, [total], 7, 0)(np.arange(total))
    np.testing.assert_array_equal(np.flatnonzero(codes == 0), np.concatenate(days[:-1]))
    np.testing.assert_array_equal(np.flatnonzero(codes == 2), test)
    np.testing.assert_array_equal(np.flatnonzero(codes == 1), val)


def test_random_split_exact_8_1_1_disjoint_and_seeded(tmp_path, random_file):
    extra = index_extra(tmp_path, ROWS)
    ds = prepare(tmp_path, random_file, split="random", split_seed=3, row_extras={"index": str(extra)})
    index = {s: ds.split(s).targets["index"].astype(np.int64) for s in SPLITS}
    assert [index[s].size for s in SPLITS] == [ROWS - 2 * (ROWS // 10), ROWS // 10, ROWS // 10]
    everything = np.concatenate(list(index.values()))
    np.testing.assert_array_equal(np.sort(everything), np.arange(ROWS))  # disjoint and complete
    assert all(np.all(np.diff(v) > 0) for v in index.values())  # file order inside a split
    other = SplitAssigner("random", ROWS, [ROWS], None, 4)(np.arange(ROWS))
    assert not np.array_equal(np.flatnonzero(other == 2), index["test"])
    again = SplitAssigner("random", ROWS, [ROWS], None, 3)(np.arange(ROWS))
    np.testing.assert_array_equal(np.flatnonzero(again == 2), index["test"])


@pytest.mark.parametrize("n", [1, 2, 3, 17, 1000, 4097, 65536])
def test_feistel_permutation_is_a_bijection(n):
    image = FeistelPermutation(n, seed=11)(np.arange(n))
    np.testing.assert_array_equal(np.sort(image), np.arange(n))
    if n > 100:
        assert abs(np.corrcoef(np.arange(n), image)[0, 1]) < 0.1  # scrambled


def test_terabyte_days_are_chunks(tmp_path):
    days = [write(tmp_path / f"day_{d}", make_lines(n, seed=d)) for d, n in ((0, 30), (1, 25), (2, 11), (10, 20))]
    ds = prepare(tmp_path, str(tmp_path / "day_*"), format="terabyte", chunk_rows=7)
    # natural order: day_0, day_1, day_2, day_10 -> train = 30 + 25 + 11; day_10 halved: 10 test, 10 val
    assert dict(ds.spec.split_sizes) == {"train": 66, "val": 10, "test": 10}
    assert [s["file"] for s in ds.spec.extras["sources"]] == [p.name for p in days]
    labels = np.array([float(s[0]) for s in (tmp_path / "day_10").read_text().splitlines()], dtype=np.float32)
    np.testing.assert_array_equal(ds.split("test").labels, labels[:10])
    with pytest.raises(DatasetError, match="at least 2 files"):
        CriteoProtocol(source=days[0], format="terabyte").protocol_id()


# ------------------------------------------------------------------------------------------------
# malformed lines
# ------------------------------------------------------------------------------------------------

MALFORMED = {  # 1-based line number -> (bytes of the line, field, text in the message)
    5: (line().rsplit("\t", 1)[0].encode(), "line", "line has 39 fields"),
    9: (line(dense=["1", "2", "abc"] + ["1"] * 10).encode(), "I3", "field 'I3' is 'abc'"),
    12: (b"", "line", "empty line"),
    15: (line(cats=["caf\xe9"] + ["0"] * 25).encode("latin-1"), "line", "byte 0xe9 at column 32 is not valid UTF-8"),
    20: (line(dense=["99999999999999999999"] + ["1"] * 12).encode(), "I1", "field 'I1' is '99999999999999999999'"),
    25: (line(label="2").encode(), "label", "field 'label' is '2'"),
    31: (line(dense=["1.5"] + ["1"] * 12).encode(), "I1", "field 'I1' is '1.5'"),
}


def malformed_file(path: Path, n: int = 70, only: Optional[int] = None) -> Path:
    lines = [s.encode() for s in make_lines(n, seed=5)]
    for number, (content, _, _) in MALFORMED.items():
        if only is None or number == only:
            lines[number - 1] = content
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def test_malformed_lines_skipped_counted_and_listed(tmp_path, caplog):
    source = malformed_file(tmp_path / "train.txt")
    extra = index_extra(tmp_path, 70)
    ds = prepare(tmp_path, source, chunk_rows=8, row_extras={"index": str(extra)})
    extras = ds.spec.extras
    assert extras["malformed_lines"] == len(MALFORMED)
    listed = extras["malformed_examples"]
    assert len(listed) == len(MALFORMED)
    for (number, (_, _, text)), message in zip(sorted(MALFORMED.items()), listed):
        assert message.startswith(f"{source}:{number}: ") and text in message
    assert sum(ds.spec.split_sizes.values()) == 70 - len(MALFORMED)
    # row extras stay aligned with the original line numbers; splits are by line, so no row moves
    kept = file_order(ds, "index").astype(np.int64)
    np.testing.assert_array_equal(kept, np.setdiff1d(np.arange(70), np.array(list(MALFORMED)) - 1))
    assert "malformed lines skipped" in caplog.text
    expected_labels = [float(s[0]) for i, s in enumerate(make_lines(70, seed=5)) if i + 1 not in MALFORMED]
    np.testing.assert_array_equal(file_order(ds, "labels"), expected_labels)


@pytest.mark.parametrize("number", sorted(MALFORMED))
def test_malformed_fail_names_file_line_field_and_allowed(tmp_path, number):
    source = malformed_file(tmp_path / "train.txt", only=number)
    _, field, text = MALFORMED[number]
    with pytest.raises(DatasetError) as info:
        prepare(tmp_path, source, malformed="fail", chunk_rows=16)
    message = str(info.value)
    assert f"{source}:{number}: " in message and text in message and "allowed:" in message
    if field.startswith("I"):
        assert "an integer in [-9223372036854775808, 9223372036854775807], or empty for missing" in message
    if field == "label":
        assert "allowed: 0 or 1" in message
    if text.startswith("line has"):
        assert "40 tab-separated fields" in message


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=40))
def test_utf8_validation_agrees_with_python(blob):
    try:
        blob.decode("utf-8")
        valid = True
    except UnicodeDecodeError as exc:
        valid = False
        first_bad = exc.start
    positions = invalid_utf8_positions(np.frombuffer(blob, dtype=np.uint8))
    assert (positions.size == 0) == valid
    if not valid:
        assert positions[0] == first_bad  # the first byte of the first broken sequence


def test_crlf_gzip_and_missing_final_newline_parse_identically(tmp_path, prepared, random_file):
    lines = random_file.read_text().splitlines()
    crlf = write(tmp_path / "crlf.txt", lines, ending="\r\n", final_newline=False)
    packed = tmp_path / "train.txt.gz"
    packed.write_bytes(gzip.compress(random_file.read_bytes()))
    for source in (crlf, packed):
        ds = prepare(tmp_path / f"out-{source.name}", source, chunk_rows=64)
        assert ds.spec.extras["malformed_lines"] == 0
        for split in SPLITS:
            np.testing.assert_array_equal(ds.split(split).sparse, prepared.split(split).sparse)
            np.testing.assert_array_equal(ds.split(split).dense, prepared.split(split).dense)


# ------------------------------------------------------------------------------------------------
# sources, protocol id and cache
# ------------------------------------------------------------------------------------------------


def test_missing_source_file_says_how_to_obtain_it(tmp_path):
    missing = tmp_path / "criteo" / "raw" / "train.txt"
    with pytest.raises(DatasetError, match="does not exist") as info:
        CriteoProtocol(source=missing).prepare(tmp_path)
    assert str(missing) in str(info.value) and "ailab.criteo.com" in str(info.value)
    with pytest.raises(DatasetError, match="matches no file"):
        CriteoProtocol(source=str(tmp_path / "day_*"), format="terabyte").protocol_id()


def test_protocol_id_covers_source_checksum_and_rules(tmp_path, random_file):
    source = write(tmp_path / "train.txt", random_file.read_text().splitlines())
    base = CriteoProtocol(source=source)
    settings_ = base.settings()
    assert settings_["sources"][0]["sha256"] == storage.sha256_file(source)
    assert settings_["sources"][0]["lines"] == ROWS
    cache = json.loads((tmp_path / CHECKSUM_CACHE).read_text())
    assert cache["train.txt"]["sha256"] == settings_["sources"][0]["sha256"]
    ids = {base.protocol_id()}
    for change in ({"min_count": 2}, {"hash_cap": 100}, {"split": "random"}, {"malformed": "fail"},
                   {"row_order": "frequency"}):
        ids.add(CriteoProtocol(source=source, **change).protocol_id())
    assert len(ids) == 6
    assert CriteoProtocol(source=source, chunk_rows=7).protocol_id() == base.protocol_id()
    assert CriteoProtocol(source=source, split_seed=9).protocol_id() == base.protocol_id()  # unused by dlrm_chunks
    before = base.protocol_id()
    source.write_text(source.read_text() + line() + "\n")
    assert CriteoProtocol(source=source).protocol_id() != before


def test_chunk_rows_never_changes_the_arrays(tmp_path, prepared, random_file):
    ds = prepare(tmp_path, random_file, chunk_rows=61)
    for split in SPLITS:
        for key in ("dense", "sparse", "labels"):
            np.testing.assert_array_equal(getattr(ds.split(split), key), getattr(prepared.split(split), key))
    for a, b in zip(ds.spec.tables, prepared.spec.tables):
        np.testing.assert_array_equal(a.counts, b.counts)


def test_cache_is_reused_and_a_corrupt_cache_is_rebuilt(tmp_path, random_file, monkeypatch):
    protocol = CriteoProtocol(source=random_file, chunk_rows=1000)
    first = protocol.prepare(tmp_path)
    assert first.directory == tmp_path / "criteo" / "processed" / protocol.protocol_id()
    reference = np.array(first.split("train").sparse)
    builds = []
    original = CriteoProtocol.build
    monkeypatch.setattr(CriteoProtocol, "build", lambda self, writer: builds.append(1) or original(self, writer))
    again = protocol.prepare(tmp_path)
    assert builds == [] and again.directory == first.directory
    target = first.directory / "train" / "sparse.npy"
    blob = bytearray(target.read_bytes())
    blob[-1] ^= 0xFF
    target.write_bytes(bytes(blob))
    rebuilt = protocol.prepare(tmp_path)
    assert builds == [1]
    np.testing.assert_array_equal(rebuilt.split("train").sparse, reference)


# ------------------------------------------------------------------------------------------------
# batches
# ------------------------------------------------------------------------------------------------


def test_batch_iterator_yields_keyed_jagged_batches(prepared):
    split = prepared.split("val")
    iterator = BatchIterator(prepared.spec, split, batch_size=64)
    batches = list(iterator)
    assert len(batches) == math.ceil(len(split) / 64)
    batch = batches[1]
    rows = slice(64, 128)
    kjt = batch.sparse_features
    assert kjt.keys() == list(SPARSE_FIELDS)
    assert torch.all(kjt.lengths() == 1)
    for f, name in enumerate(SPARSE_FIELDS):
        np.testing.assert_array_equal(kjt[name].values().numpy(), split.sparse[rows, f])
    np.testing.assert_array_equal(batch.dense_features.numpy(), split.dense[rows])
    np.testing.assert_array_equal(batch.labels.numpy(), split.labels[rows])
    np.testing.assert_array_equal(batch.targets["index"].numpy(), split.targets["index"][rows])
    assert batch.dense_features.shape == (64, len(DENSE_FIELDS))


def test_fetch_explains_how_to_obtain_the_files(tmp_path):
    from recbench.datasets.criteo import fetch

    with pytest.raises(DatasetError, match="does not download"):
        fetch(tmp_path)
    raw = tmp_path / "criteo" / "raw"
    raw.mkdir(parents=True)
    (raw / "train.txt").write_text(line() + "\n")
    assert fetch(tmp_path) == raw
