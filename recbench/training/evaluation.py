"""Exact evaluation metrics over a whole split.

``exact_auc`` is the Mann-Whitney statistic with average ranks for ties, computed over every
prediction of the split at once (never averaged over batches), in O(N log N) with float64 sums.

References: Hanley & McNeil, "The meaning and use of the area under a ROC curve", Radiology 1982.
"""
from __future__ import annotations

import numpy as np


def exact_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC of ``scores`` for binary ``labels`` (N,), ties counted as 1/2; NaN if one class is absent."""
    labels = np.asarray(labels).reshape(-1)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if labels.shape != scores.shape:
        raise ValueError(f"labels {labels.shape} and scores {scores.shape} differ in shape")
    positives = labels > 0.5
    n_pos = int(positives.sum())
    n_neg = labels.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    if np.isnan(scores).any():
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    new_group = np.empty(sorted_scores.size, dtype=bool)
    new_group[0] = True
    np.not_equal(sorted_scores[1:], sorted_scores[:-1], out=new_group[1:])
    group = np.cumsum(new_group) - 1
    starts = np.flatnonzero(new_group)
    ends = np.append(starts[1:], sorted_scores.size) - 1
    average_rank = (starts + ends) / 2.0 + 1.0  # 1-based average rank of each tie group
    ranks = np.empty(scores.size, dtype=np.float64)
    ranks[order] = average_rank[group]
    rank_sum = ranks[positives].sum(dtype=np.float64)
    return float((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def log_loss(labels: np.ndarray, probabilities: np.ndarray, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy with probabilities clipped to [eps, 1 - eps]."""
    y = np.asarray(labels, dtype=np.float64).reshape(-1)
    p = np.clip(np.asarray(probabilities, dtype=np.float64).reshape(-1), eps, 1.0 - eps)
    return float(-np.mean(y * np.log(p) + (1.0 - y) * np.log1p(-p)))


def normalized_entropy(logloss: float, positive_rate: float) -> float:
    """Normalised entropy (NE): the log loss divided by the entropy of the positive rate p, i.e. the log
    loss of always predicting p (NE < 1 beats that constant; lower is better); NaN when p is 0 or 1.

    References: He et al., "Practical Lessons from Predicting Clicks on Ads at Facebook", ADKDD 2014
    (section 2); TorchRec's ``torchrec.metrics.ne`` (the same quantity)."""
    p = float(positive_rate)
    if not 0.0 < p < 1.0:
        return float("nan")
    return float(logloss) / float(-(p * np.log(p) + (1.0 - p) * np.log1p(-p)))


def calibration(mean_prediction: float, positive_rate: float) -> float:
    """Mean predicted probability over the positive rate (1 = calibrated); NaN without positives.

    References: TorchRec's ``torchrec.metrics.calibration`` (sum of predictions / sum of labels)."""
    return float(mean_prediction) / float(positive_rate) if positive_rate > 0 else float("nan")


def binary_metrics(labels: np.ndarray, logits: np.ndarray) -> dict:
    """AUC, log loss, normalised entropy, mean prediction, positive rate and calibration of logits (N,)
    against labels (N,)."""
    with np.errstate(over="ignore"):  # exp(-x) = inf for x < -709 gives the exact limit 0
        probabilities = 1.0 / (1.0 + np.exp(-np.asarray(logits, dtype=np.float64)))
    loss = log_loss(labels, probabilities)
    mean_prediction = float(probabilities.mean()) if probabilities.size else float("nan")
    positive_rate = float(np.mean(labels)) if np.size(labels) else float("nan")
    return {
        "auc": exact_auc(labels, logits),
        "logloss": loss,
        "ne": normalized_entropy(loss, positive_rate),
        "mean_prediction": mean_prediction,
        "positive_rate": positive_rate,
        "calibration": calibration(mean_prediction, positive_rate),
    }
