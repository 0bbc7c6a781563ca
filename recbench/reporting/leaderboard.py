"""Leaderboard tables: mean +- std over seeds per (protocol, method, requested ratio).

Pure functions over run records (``reporting.runs``), so they are tested on fixtures.

References: DESIGN.md section 4 (seeds, mean +- std) and section 5.
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Tuple

import numpy as np

COLUMNS = ("test/auc", "test/logloss", "emb/compression_ratio", "emb/bytes_inference", "train/samples_per_s",
           "infer/latency_ms", "bayes/test_auc")


@dataclass
class Row:
    protocol: str
    method: str
    ratio: float
    status: str  # finished | infeasible | failed
    seeds: int
    mean: Dict[str, float] = field(default_factory=dict)
    std: Dict[str, float] = field(default_factory=dict)
    run_ids: List[str] = field(default_factory=list)
    reason: str = ""

    @property
    def auc(self) -> float:
        return self.mean.get("test/auc", float("nan"))


def _ratio(record: Dict[str, Any]) -> float:
    try:
        return float(record.get("compression_ratio", "nan"))
    except ValueError:
        return float("nan")


def aggregate(records: Iterable[Dict[str, Any]]) -> List[Row]:
    """Group finished runs by (protocol, method, ratio); infeasible/failed groups keep their reason."""
    groups: Dict[Tuple[str, str, float], List[Dict[str, Any]]] = defaultdict(list)
    for record in records:
        groups[(record.get("protocol", ""), record.get("method", ""), _ratio(record))].append(record)
    rows = []
    for (protocol, method, ratio), runs in groups.items():
        finished = [r for r in runs if r.get("status") == "finished" and r.get("run_status") == "FINISHED"]
        if finished:
            row = Row(protocol, method, ratio, "finished", len({r.get("seed") for r in finished}))
            for key in COLUMNS:
                values = [r["metrics"][key] for r in finished if key in r["metrics"]]
                if values:
                    row.mean[key] = float(np.mean(values))
                    row.std[key] = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
            row.run_ids = [r["run_id"] for r in finished]
        else:
            statuses = {r.get("status") or r.get("run_status", "").lower() for r in runs}
            status = "infeasible" if "infeasible" in statuses else "failed"
            reason = next((r.get("status_reason", "") for r in runs if r.get("status_reason")), "")
            row = Row(protocol, method, ratio, status, 0, reason=reason, run_ids=[r["run_id"] for r in runs])
        rows.append(row)
    rows.sort(key=lambda r: (r.protocol, -r.ratio if not math.isnan(r.ratio) else 0, -(r.auc if not math.isnan(r.auc) else -1)))
    return rows


def fmt(mean: Optional[float], std: Optional[float], digits: int = 4) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "—"
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if std is not None else f"{mean:.{digits}f}"


def markdown(rows: List[Row]) -> str:
    """One Markdown table per protocol."""
    out = []
    for protocol in sorted({r.protocol for r in rows}):
        out.append(f"### {protocol}\n")
        out.append("| method | ratio | status | seeds | test AUC | test log loss | achieved ratio | samples/s | latency ms (4096) |")
        out.append("|---|---|---|---|---|---|---|---|---|")
        for r in (r for r in rows if r.protocol == protocol):
            if r.status != "finished":
                out.append(f"| {r.method} | {r.ratio:g} | {r.status} | 0 | — | — | — | — | — |")
                continue
            out.append(
                f"| {r.method} | {r.ratio:g} | {r.status} | {r.seeds} | {fmt(r.auc, r.std.get('test/auc'))} | "
                f"{fmt(r.mean.get('test/logloss'), r.std.get('test/logloss'))} | "
                f"{r.mean.get('emb/compression_ratio', float('nan')):.4g} | "
                f"{r.mean.get('train/samples_per_s', float('nan')):,.0f} | {r.mean.get('infer/latency_ms', float('nan')):.2f} |"
            )
        bayes = [r.mean["bayes/test_auc"] for r in rows if r.protocol == protocol and "bayes/test_auc" in r.mean]
        if bayes:
            out.append(f"\nBayes-optimal test AUC (ceiling): {bayes[0]:.4f}")
        out.append("")
    return "\n".join(out)


def csv_rows(rows: List[Row]) -> List[Dict[str, Any]]:
    table = []
    for r in rows:
        item = {"protocol": r.protocol, "method": r.method, "ratio": r.ratio, "status": r.status, "seeds": r.seeds,
                "reason": r.reason, "run_ids": " ".join(r.run_ids)}
        for key in COLUMNS:
            item[f"{key}_mean"] = r.mean.get(key, "")
            item[f"{key}_std"] = r.std.get(key, "")
        table.append(item)
    return table
