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


def test_normalized_entropy_and_calibration_match_torchrec():
    """Independent implementations: TorchRec's ``compute_ne`` (cross-entropy sum over the entropy of
    the mean label) and ``compute_calibration`` (sum of predictions over sum of labels)."""
    import torch
    from torchrec.metrics.calibration import compute_calibration
    from torchrec.metrics.ne import compute_cross_entropy, compute_ne

    rng = np.random.default_rng(0)
    labels = (rng.random(5000) < 0.3).astype(np.float64)
    logits = rng.normal(size=5000) + 1.5 * labels - 1.0
    m = binary_metrics(labels, logits)
    y, p = torch.tensor(labels), torch.sigmoid(torch.tensor(logits))
    ce_sum = compute_cross_entropy(y, p, torch.ones_like(y), eta=1e-12).sum()
    ne = compute_ne(ce_sum, torch.tensor(5000.0, dtype=torch.float64), y.sum(), (1 - y).sum(), eta=1e-12)
    assert m["ne"] == pytest.approx(float(ne), rel=1e-9)
    assert m["calibration"] == pytest.approx(float(compute_calibration(p.sum(), y.sum())), rel=1e-12)
    constant = binary_metrics(labels, np.full(5000, np.log(labels.mean() / (1 - labels.mean()))))
    assert constant["ne"] == pytest.approx(1.0, abs=1e-9) and constant["calibration"] == pytest.approx(1.0)
    assert np.isnan(binary_metrics(np.zeros(4), np.zeros(4))["ne"])
