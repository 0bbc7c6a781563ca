"""Fixture runs for the report tests: hand-made records with known means, stds, ties and Pareto front."""
from __future__ import annotations

from typing import Any, Dict, List

import pytest

PROTOCOL = "toy-abc/1234"


def record(method: str, ratio: float, seed: int, auc: float, nbytes: float, status: str = "finished",
           run_status: str = "FINISHED", end_time: int = 100, **metrics: float) -> Dict[str, Any]:
    run_id = f"{method}-{ratio:g}-s{seed}-{end_time}"
    values = {"test/auc": auc, "test/logloss": 0.5 - (auc - 0.75), "emb/bytes_inference": nbytes,
              "emb/compression_ratio": nbytes / 1000, "train/samples_per_s": 1000.0 + seed, "infer/latency_ms": 2.0,
              **metrics} if status == "finished" else {}
    return {"run_id": run_id, "experiment": "toy-abc", "experiment_id": "7", "run_status": run_status,
            "run_name": f"{method}@{ratio:g}/dlrm/toy/s{seed}", "start_time": end_time - 10, "end_time": end_time,
            "method": method, "model": "dlrm", "dataset": "toy", "protocol": PROTOCOL, "dataset_protocol_id": "toy-abc",
            "compression_ratio": f"{ratio:g}", "seed": str(seed), "sweep_id": "fixture", "status": status,
            "status_reason": f"{method} cannot reach {ratio:g}" if status in ("infeasible", "failed") else "",
            "config_hash": f"h-{method}-{ratio:g}-{seed}", "group_hash": f"g-{method}-{ratio:g}", "git_commit": "abc1234",
            "achieved_ratio": "", "overrides": f"sweep=fixture method={method} budget.compression_ratio={ratio:g} seed={seed}",
            "command": "", "metrics": values}


def fixture_records() -> List[Dict[str, Any]]:
    runs = []
    for seed, auc in enumerate((0.80, 0.81, 0.79)):
        runs.append(record("full", 1.0, seed, auc, 1000.0))
    for seed in range(3):
        runs.append(record("hashing", 0.1, seed, 0.78, 100.0))
    runs.append(record("hashing", 0.1, 0, 0.50, 100.0, end_time=50))  # an older duplicate of seed 0: ignored
    for seed, auc in enumerate((0.775, 0.785, 0.78)):
        runs.append(record("qr", 0.1, seed, auc, 110.0))
    for seed, auc in enumerate((0.70, 0.71, 0.69)):
        runs.append(record("robe", 0.1, seed, auc, 100.0))
    runs.append(record("dhe", 0.1, 0, 0.0, 0.0, status="infeasible"))
    runs.append(record("dhe", 0.01, 0, 0.0, 0.0, status="infeasible"))
    for seed in range(3):
        runs.append(record("hashing", 0.01, seed, 0.75, 10.0))
    runs.append(record("qr", 0.01, 0, 0.0, 0.0, status="failed", run_status="FAILED"))
    runs.append(record("robe", 0.01, 0, 0.0, 0.0, status="running", run_status="RUNNING"))  # killed
    return runs


@pytest.fixture
def records() -> List[Dict[str, Any]]:
    return fixture_records()
