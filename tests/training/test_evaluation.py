import numpy as np
import pytest
from sklearn.metrics import log_loss as sk_log_loss
from sklearn.metrics import roc_auc_score

from recbench.training.evaluation import binary_metrics, exact_auc, log_loss


@pytest.mark.parametrize("seed", range(5))
def test_exact_auc_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    n = 5000
    labels = rng.random(n) < 0.3
    scores = rng.normal(size=n) + labels * 0.7
    assert exact_auc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_exact_auc_with_heavy_ties_matches_sklearn():
    rng = np.random.default_rng(1)
    labels = rng.random(20000) < 0.5
    scores = np.round(rng.normal(size=20000) + labels, 1)  # many ties
    assert exact_auc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_exact_auc_edge_cases():
    assert exact_auc(np.array([1, 1, 0, 0]), np.array([0.9, 0.8, 0.2, 0.1])) == 1.0
    assert exact_auc(np.array([1, 1, 0, 0]), np.array([0.1, 0.2, 0.8, 0.9])) == 0.0
    assert exact_auc(np.array([1, 0]), np.array([0.5, 0.5])) == 0.5
    assert np.isnan(exact_auc(np.ones(3), np.arange(3.0)))
    assert np.isnan(exact_auc(np.array([1, 0]), np.array([np.nan, 0.1])))
    with pytest.raises(ValueError):
        exact_auc(np.ones(3), np.ones(4))


def test_log_loss_matches_sklearn():
    rng = np.random.default_rng(0)
    y = rng.random(1000) < 0.4
    p = rng.uniform(0.01, 0.99, 1000)
    assert log_loss(y, p) == pytest.approx(sk_log_loss(y, p), rel=1e-9)


def test_binary_metrics_from_logits():
    y = np.array([0, 1, 1, 0], dtype=np.float32)
    m = binary_metrics(y, np.array([-2.0, 2.0, 1.0, -1.0]))
    assert m["auc"] == 1.0 and m["positive_rate"] == 0.5 and 0 < m["logloss"] < 0.4
