"""Exact AUC over a whole split: recbench's ``exact_auc`` against scikit-learn's ``roc_auc_score``.

Both compute the exact ROC AUC (ties counted as 1/2) of the same arrays: ``--rows`` (default
10^7) float32 predictions ``sigmoid(logit)`` with logit ~ N(0, 1.5^2) (float32 rounding makes
ties, as in real model outputs) and labels drawn from those probabilities (about 50% positives,
an AUC near 0.75). Rounds interleave the two; the figure is sklearn's median time / recbench's
(target >= 1: exactness must not cost more than the library routine) together with the largest
absolute difference of the two values (must be <= 1e-9: both are exact up to float64 summation).

    python benchmarks/evaluation.py                  # 10^7 predictions
    python benchmarks/evaluation.py --rows 1000000

References: recbench.training.evaluation.exact_auc; sklearn.metrics.roc_auc_score.
"""
from __future__ import annotations

import argparse
import sys

import numpy as np

from recbench.bench import harness
from recbench.training.evaluation import exact_auc

TOLERANCE = 1e-9


def arrays(rows: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 1.5, rows).astype(np.float32)
    scores = (1.0 / (1.0 + np.exp(-logits))).astype(np.float32)
    labels = (rng.random(rows) < scores).astype(np.float32)
    return labels, scores


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/evaluation.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    harness.add_common_arguments(parser, rounds=3, warmup=1)
    args = parser.parse_args(argv)
    if args.quick:
        args.rows, args.rounds, args.warmup = 100_000, 2, 0
    from sklearn.metrics import roc_auc_score

    clock = harness.setup(args)

    result = harness.BenchResult.start("evaluation", argv, args)
    labels, scores = arrays(args.rows)
    values = {}

    def ours():
        values["recbench"] = exact_auc(labels, scores)

    def sklearn():
        values["sklearn"] = roc_auc_score(labels, scores)

    seconds = harness.interleaved({"recbench": ours, "sklearn": sklearn}, args.rounds, args.warmup, clock=clock)
    difference = abs(values["recbench"] - values["sklearn"])
    result.settings.update({"distinct_scores": int(np.unique(scores).size), "positives": int(labels.sum())})
    result.add(harness.Figure(
        "exact_auc_vs_sklearn", f"time of sklearn.metrics.roc_auc_score / recbench exact_auc on the same {args.rows:,} "
        "predictions (both exact).", harness.Side("recbench exact_auc", seconds["recbench"], "s"),
        harness.Side("sklearn roc_auc_score", seconds["sklearn"], "s"), ratio_of="reference/candidate", target=">= 1",
        note=f"Values: recbench {values['recbench']:.15f}, sklearn {values['sklearn']:.15f}, |difference| "
             f"{difference:.2e} ({'equal' if difference <= TOLERANCE else 'NOT equal'} within {TOLERANCE:g})."))
    result.tables["values"] = [{"implementation": k, "auc": f"{v:.15f}"} for k, v in values.items()]
    result.notes.append(f"|recbench - sklearn| = {difference:.3e}; equality within {TOLERANCE:g}: "
                        f"{'yes' if difference <= TOLERANCE else 'NO'}")
    result.finish(args)
    return 0 if difference <= TOLERANCE else 1


if __name__ == "__main__":
    sys.exit(main())
