"""Report figures (matplotlib, Agg): the Pareto front of test AUC vs inference bytes and the
per-method curves over budgets. Inputs are scored rows (``reporting.leaderboard``); outputs PNG bytes.

References: DESIGN.md section 1 (``reporting/``: Pareto fronts, plots).
"""
from __future__ import annotations

import io
import math
from typing import Dict, List, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.transforms import blended_transform_factory  # noqa: E402

from recbench.reporting.leaderboard import (  # noqa: E402
    BYTES, REFERENCE_METHOD, Row, bayes_ceiling, infeasible_from, reference,
)

DPI = 110


def method_colors(rows: Sequence[Row]) -> Dict[str, tuple]:
    methods = sorted({r.method for r in rows})
    cmap = plt.get_cmap("tab10" if len(methods) <= 10 else "tab20")
    return {m: cmap(i % cmap.N) for i, m in enumerate(methods)}


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def _references(ax, rows: Sequence[Row], protocol: str) -> None:
    ref = reference(rows, protocol)
    if ref is not None:
        ax.axhline(ref.auc, color="black", linestyle="--", linewidth=1, label=f"{REFERENCE_METHOD} (ratio 1): {ref.auc:.4f}")
    bayes = bayes_ceiling(rows, protocol)
    if bayes is not None:
        ax.axhline(bayes, color="tab:red", linestyle=":", linewidth=1.2, label=f"Bayes-optimal ceiling: {bayes:.4f}")


def pareto_figure(rows: Sequence[Row], protocol: str) -> bytes:
    """Test AUC (mean +- std) vs inference bytes (log x); the non-dominated points joined."""
    mine = [r for r in rows if r.protocol == protocol and r.finished and BYTES in r.mean and not math.isnan(r.auc)]
    colors = method_colors(rows)
    fig, ax = plt.subplots(figsize=(8, 5))
    for method in sorted({r.method for r in mine}):
        points = sorted((r for r in mine if r.method == method), key=lambda r: r.mean[BYTES])
        ax.errorbar([r.mean[BYTES] for r in points], [r.auc for r in points], yerr=[r.auc_std for r in points],
                    fmt="o", color=colors[method], capsize=3, markersize=5, label=method)
    front = sorted((r for r in mine if r.pareto), key=lambda r: r.mean[BYTES])
    if front:
        ax.step([r.mean[BYTES] for r in front], [r.auc for r in front], where="post", color="grey", linewidth=1.5,
                alpha=0.8, label="Pareto front", zorder=0)
        ax.scatter([r.mean[BYTES] for r in front], [r.auc for r in front], s=110, facecolors="none",
                   edgecolors="black", linewidths=1.0, zorder=3)
    _references(ax, rows, protocol)
    if mine:
        ax.set_xscale("log")
    return _finish(fig, ax, "embedding inference bytes (log scale)", f"AUC vs memory — {protocol}")


def budget_figure(rows: Sequence[Row], protocol: str) -> bytes:
    """Test AUC per method over requested compression ratios (log x); x marks where a method is
    infeasible, an arrow where it becomes infeasible."""
    mine = [r for r in rows if r.protocol == protocol and r.method != REFERENCE_METHOD]
    colors = method_colors(rows)
    fig, ax = plt.subplots(figsize=(8, 5))
    bottom = blended_transform_factory(ax.transData, ax.transAxes)
    boundary = infeasible_from(rows, protocol)
    methods: List[str] = sorted({r.method for r in mine})
    for i, method in enumerate(methods):
        finished = sorted((r for r in mine if r.method == method and r.finished and not math.isnan(r.auc)),
                          key=lambda r: r.ratio)
        if finished:
            ax.errorbar([r.ratio for r in finished], [r.auc for r in finished], yerr=[r.auc_std for r in finished],
                        fmt="-o", color=colors[method], capsize=3, markersize=4, label=method)
        infeasible = sorted(r.ratio for r in mine if r.method == method and r.status == "infeasible")
        if infeasible:
            y = 0.03 + 0.03 * i
            ax.scatter(infeasible, [y] * len(infeasible), marker="x", color=colors[method], transform=bottom,
                       clip_on=False, label=None if finished else f"{method} (infeasible)")
            below = not finished or max(infeasible) < min(r.ratio for r in finished)
            text = (f"{method}: infeasible at ratio ≤ {boundary[method]:g}" if below
                    else f"{method}: infeasible at {', '.join(f'{x:g}' for x in infeasible)}")
            ax.annotate(text, (boundary[method], y), xycoords=bottom, xytext=(4, 3), textcoords="offset points",
                        fontsize=7, color=colors[method])
    _references(ax, rows, protocol)
    if mine:
        ax.set_xscale("log")
        ticks = sorted({r.ratio for r in mine})
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.minorticks_off()
    return _finish(fig, ax, "requested compression ratio (log scale; x: infeasible budget)",
                   f"AUC over budgets — {protocol}")


def _finish(fig, ax, xlabel: str, title: str) -> bytes:
    """Labels, grid and legend shared by every figure; returns the PNG bytes."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test AUC (mean ± std over seeds)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return _png(fig)


__all__ = ["pareto_figure", "budget_figure", "method_colors"]
