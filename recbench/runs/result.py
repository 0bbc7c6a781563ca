"""A job's result: its status, metrics and run id, and the plain-text table printed at its end.

References: docs/architecture.md ("Evaluation").
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from omegaconf import DictConfig


@dataclass
class JobResult:
    status: str  # finished | infeasible | failed | skipped
    metrics: Dict[str, float]
    run_id: Optional[str]
    reason: str = ""
    under_budget: bool = False  # the solved ratio is below (1 - tolerance) x the requested one (tag ``under_budget``)
    model: Any = field(default=None, repr=False)  # the trained model (``run_job(keep_model=True)``: the Python API)



RESULT_KEYS = [
    ("val/auc", "val AUC", "{:.4f}"), ("test/auc", "test AUC", "{:.4f}"), ("test/logloss", "test log loss", "{:.4f}"),
    ("test/ne", "test NE", "{:.4f}"),
    ("test/calibration", "test calibration", "{:.3f}"),
    ("bayes/test_auc", "Bayes-optimal test AUC", "{:.4f}"), ("test/auc_gap_to_bayes", "gap to Bayes AUC", "{:.4f}"),
    ("emb/compression_ratio", "compression ratio", "{:.4g}"), ("emb/bytes_inference", "embedding bytes (inference)", "{:,.0f}"),
    ("emb/bytes_training", "embedding bytes (training)", "{:,.0f}"),
    ("emb/bytes_training_weights", "  measured: weights", "{:,.0f}"),
    ("emb/bytes_training_optimizer_state", "  measured: optimizer state", "{:,.0f}"),
    ("emb/bytes_training_buffers", "  measured: buffers", "{:,.0f}"),
    ("emb/bytes_training_runtime", "  measured: runtime (one step IO)", "{:,.0f}"),
    ("emb/collision_rate", "ids sharing a row (collision rate)", "{:.4f}"),
    ("emb/collision_rate_lookups", "lookups sharing a row (training)", "{:.4f}"), ("train/samples_per_s", "train samples/s", "{:,.0f}"),
    ("test/rating_mse", "test rating MSE", "{:.4f}"), ("infer/flops_per_sample", "FLOPs per sample", "{:,.0f}"),
    ("moe/experts_computed_per_sample", "experts computed per sample", "{:.2f}"),
    ("infer/latency_ms", "latency, batch 4096 (ms)", "{:.2f}"), ("infer/latency_ms_single", "latency, 1 request (ms)", "{:.3f}"),
    ("sys/peak_rss_mb", "peak RSS (MB)", "{:,.0f}"),
]


def format_result(cfg: DictConfig, result: JobResult) -> str:
    """A plain-text result table for the end of a run."""
    title = f"{cfg.method.name} @ ratio {float(cfg.budget.compression_ratio):g} | {cfg.model.get('name')} | seed {cfg.seed}"
    lines = [title, "-" * len(title), f"{'status':<30} {result.status}"]
    if result.under_budget:
        lines.append(f"{'under budget':<30} yes: the best configuration under the budget lands below "
                     f"{1 - float(cfg.budget.tolerance):g} x the requested ratio")
    if result.reason:
        lines.append(f"{'reason':<30} {result.reason}")
    for key, label, fmt in RESULT_KEYS:
        if key in result.metrics:
            lines.append(f"{label:<30} {fmt.format(result.metrics[key])}")
    if result.run_id:
        lines.append(f"{'MLflow run':<30} {result.run_id}")
    return "\n".join(lines)
