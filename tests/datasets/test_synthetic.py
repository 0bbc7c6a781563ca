"""Tests of the synthetic protocol (recbench.datasets.synthetic): the generator's profile, its
calibration, its determinism, and the Bayes-optimal figures recorded in the manifest."""
from __future__ import annotations

import itertools

import numpy as np
import polars as pl
import pytest
from scipy.stats import spearmanr
from sklearn.metrics import log_loss, roc_auc_score

from recbench.datasets.criteo import CRITEO_FORMAT, KAGGLE_CARDINALITIES
from recbench.datasets.storage import SPLITS, sha256_file
from recbench.datasets.synthetic import (
    DENSE_MISSING,
    SPARSE_MISSING,
    GeneratorConfig,
    SyntheticProtocol,
    expected_auc,
    generate,
    generated_files,
)

ROWS = 50_000


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("data_root")


@pytest.fixture(scope="module")
def prepared(root):
    return SyntheticProtocol(rows=ROWS, seed=0).prepare(root)


@pytest.fixture(scope="module")
def raw(root, prepared) -> pl.DataFrame:
    text = generated_files(GeneratorConfig(rows=ROWS, seed=0), root / "synthetic" / "raw").text
    return pl.read_csv(text, has_header=False, separator="\t", new_columns=list(CRITEO_FORMAT.columns),
                       schema={c: pl.String for c in CRITEO_FORMAT.columns}, quote_char=None)


def test_manifest_bayes_figures_equal_sklearn_on_the_stored_test_split(prepared):
    test = prepared.split("test")
    labels, prob = np.asarray(test.labels), np.asarray(test.targets["true_prob"])
    extras = prepared.spec.extras
    assert extras["bayes_test_auc"] == pytest.approx(roc_auc_score(labels, prob), abs=1e-12)
    assert extras["bayes_test_logloss"] == pytest.approx(log_loss(labels, prob.astype(np.float64)), abs=1e-9)
    assert prepared.spec.extra_targets == ("true_prob",)
    assert prob.dtype == np.float32 and np.all((prob > 0) & (prob < 1))


def test_positive_rate_and_bayes_auc_near_their_targets(prepared):
    extras = prepared.spec.extras
    assert extras["positive_rate"]["all"] == pytest.approx(0.256, abs=0.01)
    assert extras["bayes_test_auc"] == pytest.approx(0.80, abs=0.03)
    assert extras["teacher"]["expected_bayes_auc"] == pytest.approx(0.80, abs=1e-6)
    for split in SPLITS:  # the true probabilities are aligned with their rows: calibrated in every split
        arrays = prepared.split(split)
        assert float(np.mean(arrays.targets["true_prob"])) == pytest.approx(float(np.mean(arrays.labels)), abs=0.02)


def test_cardinality_profile_follows_scaled_criteo_counts(prepared):
    cardinalities = GeneratorConfig().cardinalities()
    expected = np.maximum(np.rint(np.array(KAGGLE_CARDINALITIES) * 0.01), 2)
    np.testing.assert_array_equal(cardinalities, expected)
    assert cardinalities.max() == 101_312 and cardinalities.min() == 2
    rows = np.array([t.num_embeddings for t in prepared.spec.tables])
    assert np.all(rows - 1 <= cardinalities)
    small = cardinalities <= 60
    np.testing.assert_array_equal(rows[small] - 1, cardinalities[small])  # every value of a small field is seen
    assert spearmanr(rows, KAGGLE_CARDINALITIES).statistic > 0.95
    assert prepared.spec.extras["teacher"]["cardinalities"] == cardinalities.tolist()


def test_zipf_frequencies_missing_rates_and_negative_dense(raw, prepared):
    counts = np.sort(prepared.spec.tables[2].counts[1:])[::-1]  # C3: ~101k values, by frequency
    top = counts[:50].astype(np.float64)
    slope = np.polyfit(np.log(np.arange(1, 51)), np.log(top), 1)[0]
    assert slope == pytest.approx(-1.1, abs=0.15)
    for j, rate in enumerate(DENSE_MISSING):
        assert raw.get_column(f"I{j + 1}").null_count() / ROWS == pytest.approx(rate, abs=0.015)
    for f, rate in enumerate(SPARSE_MISSING):
        assert raw.get_column(f"C{f + 1}").null_count() / ROWS == pytest.approx(rate, abs=0.015)
    negative = raw.get_column("I2").cast(pl.Int64).lt(0).mean()
    assert negative == pytest.approx(0.02, abs=0.005)
    assert raw.get_column("C1").drop_nulls().str.len_bytes().eq(8).all()  # Criteo-like 8-digit hex tokens


def test_row_numbers_are_independent_of_frequency_by_default(prepared):
    """Rows are numbered by ascending key of the scrambled tokens: on the large fields the row number
    and its train count are uncorrelated (|Spearman rho| < 0.05; by frequency it is ~ -1), and the
    counts line up with the rows of the train split."""
    train = prepared.split("train")
    for f in (2, 3, 11):  # C3, C4, C12: the largest fields
        counts = prepared.spec.tables[f].counts
        assert counts.size > 1000
        assert abs(spearmanr(np.arange(1, counts.size), counts[1:]).statistic) < 0.05
        np.testing.assert_array_equal(np.bincount(train.sparse[:, f], minlength=counts.size), counts)
        assert int(np.argmax(counts[1:])) > 0  # the most frequent value is not row 1


def test_row_order_frequency_keeps_the_previous_protocol_id():
    """``row_order=frequency`` gives the rules (and so the protocol id) the protocol had before the
    default became ascending key: the committed reference runs keep their id."""
    assert SyntheticProtocol(row_order="frequency").protocol_id() == "synthetic-3a21043c37"
    assert SyntheticProtocol().protocol_id() != "synthetic-3a21043c37"
    assert SyntheticProtocol().settings()["rules"]["row_order"].startswith("ascending key")


def test_generation_is_deterministic_from_the_seed(tmp_path):
    config = GeneratorConfig(rows=3000, seed=1)
    first, second = generate(config, tmp_path / "a"), generate(config, tmp_path / "b")
    assert sha256_file(first.text) == sha256_file(second.text)
    np.testing.assert_array_equal(np.load(first.true_prob), np.load(second.true_prob))
    other = generate(GeneratorConfig(rows=3000, seed=2), tmp_path / "a")
    assert other.text != first.text and sha256_file(other.text) != sha256_file(first.text)
    assert sorted(p.name for p in (tmp_path / "a").iterdir() if ".tmp-" in p.name) == []


def test_protocol_id_covers_generator_settings(tmp_path):
    base = SyntheticProtocol(rows=20_000)
    ids = {base.protocol_id()}
    for change in ({"rows": 20_001}, {"seed": 1}, {"zipf_exponent": 1.2}, {"target_bayes_auc": 0.75},
                   {"cardinality_scale": 0.02}, {"split": "dlrm_chunks"}, {"hash_cap": 1000}):
        ids.add(SyntheticProtocol(rows=change.pop("rows", 20_000), **change).protocol_id())
    assert len(ids) == 8
    assert SyntheticProtocol(rows=20_000, chunk_rows=1234).protocol_id() == base.protocol_id()


def test_dlrm_chunks_split_and_custom_target(tmp_path):
    ds = SyntheticProtocol(rows=10_003, seed=3, split="dlrm_chunks", target_bayes_auc=0.9).prepare(tmp_path)
    assert dict(ds.spec.split_sizes) == {"train": 8574, "test": 715, "val": 714}
    assert ds.spec.extras["teacher"]["expected_bayes_auc"] == pytest.approx(0.9, abs=1e-6)
    assert ds.spec.extras["bayes_test_auc"] == pytest.approx(0.9, abs=0.04)


def test_expected_auc_matches_pair_counting():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, 40).astype(np.float64)  # many ties
    p = rng.random(40)
    numerator = denominator = 0.0
    for i, j in itertools.permutations(range(40), 2):
        weight = p[i] * (1 - p[j])
        denominator += weight
        numerator += weight * (1.0 if scores[i] > scores[j] else 0.5 if scores[i] == scores[j] else 0.0)
    assert expected_auc(scores, p) == pytest.approx(numerator / denominator, rel=1e-12)


def test_generator_rejects_bad_settings():
    with pytest.raises(ValueError, match="target_bayes_auc"):
        GeneratorConfig(target_bayes_auc=0.4)
    with pytest.raises(ValueError, match="positive_rate"):
        GeneratorConfig(positive_rate=1.0)


def test_rare_signal_scales_each_value_by_its_frequency():
    """``rare_signal_exponent = g``: the per-value parameters of the default teacher, drawn from the same
    stream, times ``(v + 1) ** (-zipf * g / 2)`` (variance ~ frequency ** g relative to the most
    frequent value); g = 0 keeps the default's settings, hence its protocol id."""
    from recbench.datasets.synthetic import Teacher

    base, rare = GeneratorConfig(rows=1000, cardinality_scale=0.001), GeneratorConfig(rows=1000, cardinality_scale=0.001,
                                                                                      rare_signal_exponent=1.0)
    plain, shrunk = Teacher(base), Teacher(rare)
    for f in (0, 2, 25):
        n = int(plain.cardinalities[f])
        factor = np.arange(1, n + 1, dtype=np.float64) ** (-1.1 / 2)
        np.testing.assert_allclose(shrunk.first_order[f][:n], plain.first_order[f][:n] * factor, rtol=1e-12)
        np.testing.assert_allclose(shrunk.latent[f][:n], plain.latent[f][:n] * factor[:, None], rtol=1e-12)
    assert "rare_signal_exponent" not in base.settings() and rare.settings()["rare_signal_exponent"] == 1.0
    assert SyntheticProtocol(row_order="frequency", rare_signal_exponent=0.0).protocol_id() == "synthetic-3a21043c37"
    assert SyntheticProtocol(rare_signal_exponent=1.0).protocol_id() != SyntheticProtocol().protocol_id()
    with pytest.raises(ValueError, match="rare_signal_exponent must be >= 0"):
        GeneratorConfig(rare_signal_exponent=-1.0)


def test_the_distribution_variants_are_the_synthetic_protocol_with_one_setting_changed():
    from omegaconf import OmegaConf

    from recbench.runs.config import compose

    base = OmegaConf.to_container(compose(["dataset=synthetic"]).dataset)
    for name, change in (("synthetic_zipf08", {"zipf_exponent": 0.8}), ("synthetic_zipf14", {"zipf_exponent": 1.4}),
                         ("synthetic_rare_signal", {"rare_signal_exponent": 1.0})):
        variant = OmegaConf.to_container(compose([f"dataset={name}"]).dataset)
        assert variant == {**base, "name": name, **change}
