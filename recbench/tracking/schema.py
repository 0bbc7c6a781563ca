"""The tracking schema: the tags a run carries, how a tag value is written and read back, and the
metric keys every reader uses. Writers (``recbench.runs.job``) and readers (``recbench.reporting``,
the sweep planner, ``recbench-report``) import these names; no other module spells a tag's format.

References: docs/architecture.md section 5 ("Tracking schema").
"""
from __future__ import annotations

import math
from typing import Any

#: tags copied into a run record (``recbench.reporting.runs``); the last two mark imported runs
RECORD_TAGS = ("method", "model", "dataset", "protocol", "dataset_protocol_id", "compression_ratio", "seed",
               "sweep_id", "status", "status_reason", "config_hash", "group_hash", "git_commit", "achieved_ratio",
               "under_budget", "overrides", "command", "num_threads", "host", "pid", "process_start", "software",
               "imported_from", "imported_from_run_id")

#: metric keys (``split/metric``) read by the reports and the result table
TEST_AUC, TEST_LOGLOSS, VAL_AUC = "test/auc", "test/logloss", "val/auc"
BYTES_INFERENCE, COMPRESSION_RATIO = "emb/bytes_inference", "emb/compression_ratio"
REQUESTED_RATIO, SOLVED_RATIO = "budget/requested_ratio", "budget/solved_ratio"
CPU_SECONDS = "run/cpu_seconds"


def ratio_tag(ratio: float) -> str:
    """The ``compression_ratio`` tag of a requested ratio (``0.1``, ``1``)."""
    return f"{float(ratio):g}"


def parse_ratio(value: Any) -> float:
    """A ``compression_ratio`` tag (or a config value) back to a float; NaN when absent or not a number
    (the one parser every reader uses, so ``0.1``, ``0.10`` and ``1e-1`` are one budget)."""
    try:
        ratio = float(value)
    except (TypeError, ValueError):
        return float("nan")
    return ratio if not math.isinf(ratio) else float("nan")
