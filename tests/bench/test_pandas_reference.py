"""The chunked-pandas preprocessing reference produces exactly recbench's arrays (same rules)."""
from __future__ import annotations

import numpy as np

from recbench.bench.pandas_preprocessing import preprocess, string_key
from recbench.datasets.criteo import CriteoProtocol
from recbench.datasets.synthetic import GeneratorConfig, generate


def test_string_key_matches_the_rule():
    assert string_key("0") == 0 and string_key("f") == 15 and string_key("00") == 16  # per-length offsets
    assert string_key("68fd1e64") == int("68fd1e64", 16) + (16**8 - 16) // 15
    assert string_key("ABC") >= 2**63 and string_key("a" * 16) >= 2**63  # not canonical hex: FNV | top bit


def test_reference_arrays_equal_recbench_pipeline(tmp_path):
    files = generate(GeneratorConfig(rows=3000), tmp_path / "raw")
    prepared = CriteoProtocol(source=files.text, split="random", malformed="fail", chunk_rows=700, name="synthetic",
                              row_extras={"true_prob": str(files.true_prob)}).prepare(tmp_path / "root")
    sizes = preprocess(files.text, tmp_path / "pandas", chunk_rows=700, row_extras={"true_prob": files.true_prob})
    assert sizes == dict(prepared.spec.split_sizes)
    for split in ("train", "val", "test"):
        for name in ("dense", "sparse", "labels", "targets/true_prob"):
            ours = np.load(prepared.directory / split / f"{name}.npy")
            reference = np.load(tmp_path / "pandas" / split / f"{name}.npy")
            assert ours.dtype == reference.dtype and np.array_equal(ours, reference), (split, name)
    for table in prepared.spec.tables:
        assert np.array_equal(np.load(tmp_path / "pandas" / "counts" / f"{table.name}.npy"), table.counts), table.name
