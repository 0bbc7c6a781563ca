"""Tests of the BARS protocols (recbench.datasets.bars) on generated files in BARS's exact CSV layouts.

No real data: a few hundred lines per split written in tmp_path (Criteo_x1: ``label,I1..I13,C1..C26``
with decimal numerics and integer ids; Avazu_x4: Avazu's own header and layout), prepared through the
real storage code, checked against an independent pandas-free recomputation of BARS's rules
(FuxiCTR's Tokenizer: train counts, ``min_categr_count``, OOV 0, rows by descending count).
"""
from __future__ import annotations

import datetime as dt
import gzip
from collections import Counter
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest

from recbench.datasets.avazu import COLUMNS as AVAZU_COLUMNS
from recbench.datasets.avazu import AvazuProtocol
from recbench.datasets.bars import FILES, BarsAvazuX4Protocol, BarsCriteoX1Protocol
from recbench.datasets.errors import DatasetError
from recbench.datasets.storage import SPLITS
from recbench.datasets.text.pipeline import PipelineConfig
from recbench.datasets.criteo import CRITEO_FORMAT

CRITEO_HEADER = ",".join(["label"] + [f"I{i}" for i in range(1, 14)] + [f"C{i}" for i in range(1, 27)])
SIZES = {"train": 420, "val": 130, "test": 90}


def criteo_rows(n: int, seed: int) -> List[List[str]]:
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        dense = [f"{v:.6g}" for v in rng.random(13) * rng.choice([1, 0.01, 5], 13)]
        ids = [str(1000 * k + int(rng.zipf(1.6)) % 40) for k in range(26)]  # AFN's integer ids per field
        rows.append([str(int(rng.integers(0, 2)))] + dense + ids)
    return rows


def avazu_rows(n: int, seed: int) -> List[List[str]]:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        day, hour = int(rng.integers(21, 31)), int(rng.integers(0, 24))
        values = [str(10**18 + seed * 10**6 + i), str(int(rng.integers(0, 2))), f"1410{day:02d}{hour:02d}"]
        for k in range(21):
            values.append(f"{int(rng.zipf(1.4)) % 60 * 7919 + k:08x}" if k % 3 == 0 else str(int(rng.integers(0, 4 + k))))
        rows.append(values)
    return rows


def write_split(folder: Path, header: str, rows: Dict[str, List[List[str]]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, split in zip(FILES, SPLITS):
        (folder / name).write_text("\n".join([header] + [",".join(r) for r in rows[split]]) + "\n")
    return folder


@pytest.fixture(scope="module")
def criteo(tmp_path_factory):
    rows = {s: criteo_rows(n, k) for k, (s, n) in enumerate(SIZES.items())}
    folder = write_split(tmp_path_factory.mktemp("criteo_x1"), CRITEO_HEADER, rows)
    prepared = BarsCriteoX1Protocol(source=folder, chunk_rows=97).prepare(tmp_path_factory.mktemp("root"))
    return rows, folder, prepared


@pytest.fixture(scope="module")
def avazu(tmp_path_factory):
    rows = {s: avazu_rows(n, k) for k, (s, n) in enumerate(SIZES.items())}
    folder = write_split(tmp_path_factory.mktemp("avazu_x4"), ",".join(AVAZU_COLUMNS), rows)
    prepared = BarsAvazuX4Protocol(source=folder, chunk_rows=101).prepare(tmp_path_factory.mktemp("root"))
    return rows, folder, prepared


def fuxictr_rows(train: List[str], values: List[str], min_count: int) -> np.ndarray:
    """FuxiCTR's Tokenizer: train counts, keep count >= min_count, index 1.. by (-count, token), OOV 0.
    Returns the row of each of ``values`` up to the tie order (ties compared as a set below)."""
    counts = Counter(train)
    kept = sorted((t for t, c in counts.items() if c >= min_count), key=lambda t: (-counts[t], t))
    vocab = {t: i for i, t in enumerate(kept, 1)}
    return np.array([vocab.get(v, 0) for v in values])


def assert_same_partition(ours: np.ndarray, reference: np.ndarray, counts: Counter, train: List[str]) -> None:
    """Same OOV set, and the same count at every row (rows differ only inside ties of equal count)."""
    assert ((ours == 0) == (reference == 0)).all()
    by_row = {}
    for value, row in zip(train, ours):
        by_row.setdefault(int(row), set()).add(value)
    for row, values in by_row.items():
        if row:
            assert len(values) == 1  # a kept value owns its row
    row_counts = [counts[next(iter(v))] for r, v in sorted(by_row.items()) if r]
    assert row_counts == sorted(row_counts, reverse=True)  # descending train count


def test_criteo_x1_split_sizes_labels_and_dense_as_given(criteo):
    rows, _, prepared = criteo
    assert prepared.spec.split_sizes == SIZES
    assert prepared.spec.num_dense == 13 and len(prepared.spec.tables) == 26
    for split in SPLITS:
        arrays = prepared.split(split)
        expected_dense = np.array([[float(v) for v in r[1:14]] for r in rows[split]], dtype=np.float32)
        np.testing.assert_array_equal(np.asarray(arrays.dense), expected_dense)  # no log, file order kept
        np.testing.assert_array_equal(np.asarray(arrays.labels), [float(r[0]) for r in rows[split]])
    extras = prepared.manifest["extras"]
    assert extras["split_rule"]["rule"] == "given" and extras["matches_published_split_sizes"] is False


def test_criteo_x1_vocabulary_is_fuxictrs_tokenizer_on_train(criteo):
    rows, _, prepared = criteo
    for f in (0, 2, 25):
        train = [r[14 + f] for r in rows["train"]]
        counts = Counter(train)
        table = prepared.spec.tables[f]
        assert table.num_embeddings == len(counts) + 1  # min_count 1: every train value, plus OOV row 0
        ours_train = np.asarray(prepared.split("train").sparse)[:, f]
        assert_same_partition(ours_train, fuxictr_rows(train, train, 1), counts, train)
        test_values = [r[14 + f] for r in rows["test"]]
        ours_test = np.asarray(prepared.split("test").sparse)[:, f]
        np.testing.assert_array_equal(ours_test == 0, [v not in counts for v in test_values])  # unseen -> OOV
        np.testing.assert_array_equal(np.asarray(table.counts)[1:], sorted(counts.values(), reverse=True))


def test_avazu_x4_min_count_two_and_fuxictr_hour_fields(avazu):
    rows, _, prepared = avazu
    spec = prepared.spec
    assert spec.split_sizes == SIZES and spec.num_dense == 0
    names = [t.name for t in spec.tables]
    assert names == ["hour_of_day", *AVAZU_COLUMNS[3:], "weekday", "weekend"]  # FuxiCTR's field order, 24 tables
    sparse = {s: np.asarray(prepared.split(s).sparse) for s in SPLITS}
    for field, column in (("site_id", 5), ("C1", 3), ("C14", 16)):
        f = names.index(field)
        train = [r[column] for r in rows["train"]]
        counts = Counter(train)
        assert spec.tables[f].num_embeddings == sum(c >= 2 for c in counts.values()) + 1
        assert_same_partition(sparse["train"][:, f], fuxictr_rows(train, train, 2), counts, train)
        assert int(spec.tables[f].counts[0]) == sum(c for c in counts.values() if c < 2)  # singletons -> OOV
    # the derived fields are functions of the date and hour, and partition the rows as FuxiCTR's do
    for split in SPLITS:
        dates = [dt.date(2000 + int(r[2][:2]), int(r[2][2:4]), int(r[2][4:6])) for r in rows[split]]
        reference = {"hour_of_day": [int(r[2][6:8]) for r in rows[split]],
                     "weekday": [int(d.strftime("%w")) for d in dates],
                     "weekend": [int(d.strftime("%w") in ("6", "0")) for d in dates]}
        for field, values in reference.items():
            ours = sparse[split][:, names.index(field)]
            pairs = set(zip(values, ours.tolist()))
            assert len(pairs) == len(set(values))  # one row per value (a bijection on what occurs) ...
            assert len({row for _, row in pairs}) == len(pairs)
    assert spec.tables[names.index("weekend")].num_embeddings == 3  # 0, 1 and OOV


def test_gzip_and_explicit_file_list_give_the_same_protocol_arrays(tmp_path, criteo):
    rows, folder, prepared = criteo
    gz = []
    for name in FILES:
        target = tmp_path / f"{name}.gz"
        target.write_bytes(gzip.compress((folder / name).read_bytes()))
        gz.append(target)
    other = BarsCriteoX1Protocol(source=gz, chunk_rows=1000).prepare(tmp_path / "root")
    for split in SPLITS:
        np.testing.assert_array_equal(np.asarray(other.split(split).sparse), np.asarray(prepared.split(split).sparse))
        np.testing.assert_array_equal(np.asarray(other.split(split).dense), np.asarray(prepared.split(split).dense))


def test_bad_input_names_file_line_and_field(tmp_path, criteo):
    rows, folder, _ = criteo
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in FILES:
        (bad / name).write_bytes((folder / name).read_bytes())
    lines = (bad / "valid.csv").read_text().splitlines()
    fields = lines[5].split(",")
    fields[3] = "nan"  # I3 of data line 5 = file line 6
    lines[5] = ",".join(fields)
    (bad / "valid.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError, match=r"valid\.csv:6: field 'I3' is 'nan'; allowed: a finite decimal"):
        BarsCriteoX1Protocol(source=bad, malformed="fail").prepare(tmp_path / "root")
    skipped = BarsCriteoX1Protocol(source=bad).prepare(tmp_path / "root2")
    assert skipped.spec.split_sizes == {**SIZES, "val": SIZES["val"] - 1}
    assert skipped.manifest["extras"]["malformed_lines"] == 1

    (bad / "test.csv").unlink()
    with pytest.raises(DatasetError, match=r"no test\.csv; allowed: a folder holding train\.csv, valid\.csv, test\.csv"):
        BarsCriteoX1Protocol(source=bad).settings()
    with pytest.raises(DatasetError, match=r"lists 2 file\(s\)"):
        BarsCriteoX1Protocol(source=[bad / "train.csv", bad / "valid.csv"]).settings()
    (bad / "test.csv").write_text("label,I1\n0,1\n")
    with pytest.raises(DatasetError, match=r"test\.csv:1: header is 'label,I1'; allowed: exactly 'label,I1,I2"):
        BarsCriteoX1Protocol(source=bad).prepare(tmp_path / "root3")
    with pytest.raises(ValueError, match="row_order must be one of key, frequency"):
        BarsAvazuX4Protocol(source=bad, row_order="count")


def test_existing_protocol_ids_do_not_see_the_new_split_rule(tmp_path):
    """``given`` and the float dense dtype are new options: the default rules of the existing
    protocols are unchanged (so are their ids, which hash these rules)."""
    rules = PipelineConfig(fmt=CRITEO_FORMAT).rules()
    assert rules["split"] == {"rule": "dlrm_chunks", "chunks": 7, "assignment":
                              "all chunks but the last train; last chunk: first half test, second half validation"}
    assert rules["line_format"]["dense"]["transform"] == "log(max(x, 0) + 1) as float32; missing -> 0"
    source = tmp_path / "train.csv"
    source.write_text("\n".join([",".join(AVAZU_COLUMNS)] + [",".join(r) for r in avazu_rows(40, 3)]) + "\n")
    with pytest.raises(DatasetError, match="split 'given' reads one file per split; allowed: exactly 3 source files"):
        AvazuProtocol(source=source, split="given").prepare(tmp_path / "root")


def test_presets_compose_with_bars_settings():
    from recbench.runs.config import compose

    cfg = compose(["experiment=bars_criteo_x1", "method=full", "dataset.source=/data/Criteo_x1"])
    assert cfg.dataset._target_.endswith("BarsCriteoX1Protocol") and cfg.dataset.source == "/data/Criteo_x1"
    assert (cfg.model.name, cfg.model.embedding_dim, cfg.model.cross_layers, cfg.model.cross_rank) == ("dcn", 12, 3, 324)
    assert (cfg.trainer.batch_size, cfg.optimizer.dense.learning_rate, cfg.dataset.min_count) == (4096, 0.001, 1)
    cfg = compose(["experiment=bars_avazu_x4", "method=full"])
    assert (cfg.model.embedding_dim, cfg.model.cross_layers, cfg.model.cross_rank) == (16, 4, 400)
    assert (cfg.trainer.batch_size, cfg.dataset.min_count, list(cfg.model.top_mlp)) == (10000, 2, [2000] * 4 + [1])


def test_a_protocol_without_dense_features_survives_the_counted_test_pass():
    """Avazu_x4 has no dense features: the models' learned stand-in vector must pass torch's
    FlopCounterMode under no_grad (the final test pass counts FLOPs), and train as before."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from recbench.models.common import DenseInput

    module = DenseInput(0, [16], 16)
    with torch.no_grad(), FlopCounterMode(display=False):
        out = module(torch.zeros(5, 0))
    assert out.shape == (5, 16) and not out.requires_grad
    upstream = torch.arange(80, dtype=torch.float32).view(5, 16)
    (module(torch.zeros(5, 0)) * upstream).sum().backward()
    torch.testing.assert_close(module.constant.grad, upstream.sum(0))  # the gradient of a broadcast vector
