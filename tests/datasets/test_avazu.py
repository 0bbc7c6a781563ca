"""Tests of the avazu protocol (recbench.datasets.avazu) on tiny Avazu-format CSV files."""
from __future__ import annotations

import datetime as dt
import gzip
from pathlib import Path
from typing import List

import numpy as np
import pytest
import torch

from recbench.datasets.avazu import CATEGORICAL, COLUMNS, HOUR_FIELDS, AvazuProtocol
from recbench.datasets.errors import DatasetError
from recbench.datasets.batching import BatchIterator
from recbench.datasets.storage import SPLITS

HEADER = ",".join(COLUMNS)
ROWS = 3000


def make_rows(n: int, seed: int = 0) -> List[List[str]]:
    rng = np.random.default_rng(seed)
    days = rng.integers(21, 31, n)
    hours = rng.integers(0, 24, n)
    rows = []
    for i in range(n):
        values = [str(10**18 + i), str(rng.integers(0, 2)), f"1410{days[i]:02d}{hours[i]:02d}"]
        for k, name in enumerate(CATEGORICAL):
            if name.startswith(("site", "app", "device_id", "device_ip", "device_model")):
                values.append(f"{int(rng.zipf(1.5)) % 500 * 7919 + k:08x}")
            else:
                values.append(str(int(rng.integers(0, 5 + 3 * k))))
        rows.append(values)
    return rows


def write(path: Path, rows: List[List[str]], header: str = HEADER) -> Path:
    path.write_text("\n".join([header] + [",".join(r) for r in rows]) + "\n")
    return path


@pytest.fixture(scope="module")
def rows() -> List[List[str]]:
    return make_rows(ROWS)


@pytest.fixture(scope="module")
def source(tmp_path_factory, rows) -> Path:
    return write(tmp_path_factory.mktemp("avazu") / "train.csv", rows)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, source):
    return AvazuProtocol(source=source, chunk_rows=700).prepare(tmp_path_factory.mktemp("root"))


def test_layout_no_dense_and_hour_fields_first(prepared):
    spec = prepared.spec
    assert spec.num_dense == 0
    assert spec.feature_names == list(HOUR_FIELDS + CATEGORICAL)
    assert "id" not in spec.feature_names and "click" not in spec.feature_names and "hour" not in spec.feature_names
    for split in SPLITS:
        arrays = prepared.split(split)
        assert arrays.dense.shape == (len(arrays), 0) and arrays.dense.dtype == np.float32
        assert arrays.sparse.shape == (len(arrays), 23)


def test_random_split_is_exact_8_1_1(prepared):
    assert dict(prepared.spec.split_sizes) == {"train": ROWS - 2 * (ROWS // 10), "val": ROWS // 10, "test": ROWS // 10}
    assert prepared.spec.extras["split_rule"]["rule"] == "random"


def test_hour_expands_into_hour_of_day_and_weekday(tmp_path):
    hours = ["14102100", "14102123", "14102607", "14103015", "14102500"]  # Tue 00, Tue 23, Sun 07, Thu 15, Sat 00
    rows = make_rows(len(hours) * 2, seed=1)
    for r, h in zip(rows, hours * 2):
        r[2] = h
    ds = AvazuProtocol(source=write(tmp_path / "train.csv", rows), split="dlrm_chunks", num_chunks=2).prepare(tmp_path)
    train = ds.split("train")
    assert len(train) == 5
    hour_table, weekday_table = ds.spec.tables[0], ds.spec.tables[1]
    # decode rows back to values through the counts: every value is seen once in train except ties
    expected_hours = [int(h[6:]) for h in hours]
    expected_days = [dt.date(2000 + int(h[:2]), int(h[2:4]), int(h[4:6])).isoweekday() for h in hours]
    assert expected_days == [2, 2, 7, 4, 6]
    # rows are ordered by (count desc, key asc): all counts are 1 except hour 0 (twice) and Tuesday (twice)
    hour_rows = {0: 1, 7: 2, 15: 3, 23: 4}
    day_rows = {2: 1, 4: 2, 6: 3, 7: 4}
    np.testing.assert_array_equal(train.sparse[:, 0], [hour_rows[h] for h in expected_hours])
    np.testing.assert_array_equal(train.sparse[:, 1], [day_rows[d] for d in expected_days])
    np.testing.assert_array_equal(hour_table.counts, [0, 2, 1, 1, 1])
    np.testing.assert_array_equal(weekday_table.counts, [0, 2, 1, 1, 1])


def test_labels_follow_click_and_vocabularies_are_train_only(tmp_path, rows):
    rows = [list(r) for r in rows[:100]]
    for r in rows[90:]:  # last chunk of 10 (test then validation): a site_id unseen in train
        r[COLUMNS.index("site_id")] = "deadbeef"
    ds = AvazuProtocol(source=write(tmp_path / "train.csv", rows), split="dlrm_chunks", num_chunks=10).prepare(tmp_path)
    field = ds.spec.feature_names.index("site_id")
    for split in ("val", "test"):
        assert np.all(ds.split(split).sparse[:, field] == 0)
    train_values = {r[COLUMNS.index("site_id")] for r in rows[:90]}
    assert ds.spec.tables[field].num_embeddings == len(train_values) + 1
    labels = np.concatenate([ds.split(s).labels for s in ("train", "test", "val")])
    np.testing.assert_array_equal(labels, [float(r[1]) for r in rows])


def test_min_count_sends_rare_values_to_oov(tmp_path, source, prepared):
    ds = AvazuProtocol(source=source, min_count=5, chunk_rows=1000).prepare(tmp_path)
    for loose, strict in zip(prepared.spec.tables, ds.spec.tables):
        assert strict.num_embeddings <= loose.num_embeddings
        assert np.all(strict.counts[1:] >= 5)
        assert strict.counts.sum() == loose.counts.sum()  # every train value is counted once, OOV included
    assert any(s.num_embeddings < l.num_embeddings for l, s in zip(prepared.spec.tables, ds.spec.tables))


def test_malformed_hour_and_click_skip_and_fail(tmp_path, rows):
    rows = [list(r) for r in rows[:50]]
    rows[3][2] = "14102124"  # hour 24
    rows[7][2] = "141021"  # too short
    rows[9][1] = "yes"  # click not 0/1
    rows[12] = rows[12][:-1]  # 23 fields
    source = write(tmp_path / "train.csv", rows)
    ds = AvazuProtocol(source=source).prepare(tmp_path)
    assert ds.spec.extras["malformed_lines"] == 4
    examples = ds.spec.extras["malformed_examples"]
    # line numbers count the header: data row i is on line i + 2
    assert [e.split(": ")[0] for e in examples] == [f"{source}:{n}" for n in (5, 9, 11, 14)]
    assert "field 'hour' is '14102124'" in examples[0] and "YYMMDDHH" in examples[0]
    assert "field 'click' is 'yes'" in examples[2] and "0 or 1" in examples[2]
    assert "line has 23 fields" in examples[3] and "24 comma-separated fields" in examples[3]
    assert sum(ds.spec.split_sizes.values()) == 46
    with pytest.raises(DatasetError, match=rf"{source}:5: field 'hour'"):
        AvazuProtocol(source=source, malformed="fail").prepare(tmp_path / "fail")


def test_wrong_header_and_missing_file(tmp_path, rows):
    bad = write(tmp_path / "train.csv", rows[:5], header=HEADER.replace("click", "clicked"))
    with pytest.raises(DatasetError, match=r"train.csv:1: header is .*allowed: exactly 'id,click,hour"):
        AvazuProtocol(source=bad).prepare(tmp_path)
    with pytest.raises(DatasetError, match="kaggle.com/c/avazu-ctr-prediction"):
        AvazuProtocol(source=tmp_path / "nope" / "train.gz").prepare(tmp_path)


def test_gzip_source_matches_plain(tmp_path, source, prepared):
    packed = tmp_path / "train.gz"
    packed.write_bytes(gzip.compress(source.read_bytes()))
    ds = AvazuProtocol(source=packed, chunk_rows=700).prepare(tmp_path)
    for split in SPLITS:
        np.testing.assert_array_equal(ds.split(split).sparse, prepared.split(split).sparse)


def test_batch_iterator_with_no_dense_features(prepared):
    split = prepared.split("test")
    batch = next(iter(BatchIterator(prepared.spec, split, batch_size=32, shuffle=True, seed=1)))
    assert batch.dense_features.shape == (32, 0)
    kjt = batch.sparse_features
    assert kjt.keys() == prepared.spec.feature_names and torch.all(kjt.lengths() == 1)
    rows = np.sort(np.random.default_rng([1, 0]).permutation(len(split))[:32])
    np.testing.assert_array_equal(kjt["weekday"].values().numpy(), split.sparse[rows, 1])
    np.testing.assert_array_equal(batch.labels.numpy(), split.labels[rows])


def test_fetch_explains_how_to_obtain_the_file(tmp_path, source):
    from recbench.datasets.avazu import fetch

    with pytest.raises(DatasetError, match="kaggle.com/c/avazu-ctr-prediction"):
        fetch(tmp_path)
    raw = tmp_path / "avazu" / "raw"
    raw.mkdir(parents=True)
    (raw / "train.csv").write_bytes(source.read_bytes())
    assert fetch(tmp_path) == raw



def test_rows_follow_the_sorted_values_as_label_encoder_numbers_them(tmp_path, source, rows):
    """Default ``row_order=key``: a numeric column's rows come in ascending numeric order (what
    sklearn's LabelEncoder gives on the integer column pandas reads: Hetu's ``load_data.py``), an
    8-digit hex column's in sorted-token order, ``hour_of_day`` in hour order; the counts line up.
    (dlrm_chunks: the train split is the first 9 of 10 chunks, in file order.)"""
    from sklearn.preprocessing import LabelEncoder

    ds = AvazuProtocol(source=source, split="dlrm_chunks", num_chunks=10, chunk_rows=700).prepare(tmp_path)
    train = ds.split("train")
    lines = rows[: len(train)]
    columns = {"hour_of_day": [int(r[2][-2:]) for r in lines]}
    for name in ("C14", "banner_pos", "C21"):
        columns[name] = [int(r[COLUMNS.index(name)]) for r in lines]
    columns["site_id"] = [r[COLUMNS.index("site_id")] for r in lines]
    assert max(len(str(v)) for v in columns["C21"]) > min(len(str(v)) for v in columns["C21"])  # mixed lengths
    for name, values in columns.items():
        f = ds.spec.feature_names.index(name)
        encoder = LabelEncoder().fit(values)
        np.testing.assert_array_equal(train.sparse[:, f], encoder.transform(values) + 1, err_msg=name)
        np.testing.assert_array_equal(ds.spec.tables[f].counts[1:], np.bincount(encoder.transform(values)))
