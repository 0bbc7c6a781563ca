"""Report figures (matplotlib, Agg): the Pareto front of test AUC vs inference bytes and the
per-method curves over budgets. Inputs are scored rows (``reporting.leaderboard``); outputs PNG bytes
(``pareto_figure``, ``budget_figure``) or the matplotlib figures they are drawn from (``pareto_plot``,
``budget_plot``, which the tests inspect).

A leaderboard has ~20 methods, so no figure relies on colour alone: each method keeps one colour and
marker pair in every figure (``method_styles``), legends sit outside the plotting area, the Pareto
front's points are labelled, and the budget curves are small multiples (one panel per method, with the
best AUC of any method at each budget behind it for context) instead of 20 curves in one axes.

References: docs/architecture.md section 1 (``reporting/``: Pareto fronts, plots).
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Dict, Iterable, List, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.transforms import blended_transform_factory  # noqa: E402

from recbench.reporting.leaderboard import (  # noqa: E402
    BYTES, REFERENCE_METHOD, Row, bayes_ceiling, infeasible_from, reference,
)

DPI = 110
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
PANEL_COLUMNS = 4
INFEASIBLE_COLOR = "tab:red"


#: what each figure shows, by file stem (``pareto``, ``pareto-2``... share one): the HTML report's captions
CAPTIONS = {
    "pareto": "Test AUC (mean ± std over seeds) against embedding inference bytes, log scale. Circled, "
              "joined and labelled: the Pareto front (no other row has fewer or equal bytes and higher or "
              "equal AUC). Dashed: full at ratio 1; dotted: the Bayes-optimal ceiling (synthetic data).",
    "budgets": "One panel per method: test AUC (mean ± std) over the requested compression ratios. Grey: "
               "the best AUC of any method at each budget. An x on a panel's floor: a budget the method "
               "cannot reach (its title says where it becomes infeasible); a hollow square: a failed run.",
}


def caption(name: str) -> str:
    """The caption of the figure file ``name`` (e.g. ``budgets-2.png``), or ``name`` itself."""
    return CAPTIONS.get(figure_kind(name), name)


def figure_kind(name: str) -> str:
    """``pareto`` for ``pareto.png`` and ``pareto-2.png``."""
    return name.rsplit(".", 1)[0].split("-")[0]


@dataclass(frozen=True)
class Style:
    color: tuple
    marker: str


def method_styles(methods: Iterable[str]) -> Dict[str, Style]:
    """One look per method, the same in every figure of a report: the methods in name order take the
    ten ``tab10`` colours with circles, then the ten colours again with squares, and so on (distinct
    for up to 80 methods)."""
    cmap = plt.get_cmap("tab10")
    return {m: Style(cmap(i % 10), MARKERS[(i // 10) % len(MARKERS)]) for i, m in enumerate(sorted(set(methods)))}


def _png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def _references(ax, rows: Sequence[Row], protocol: str, labelled: bool = True) -> None:
    """``full``'s AUC (dashed) and, on synthetic data, the Bayes-optimal AUC (dotted) as lines."""
    ref = reference(rows, protocol)
    if ref is not None:
        ax.axhline(ref.auc, color="black", linestyle="--", linewidth=1,
                   label=f"{REFERENCE_METHOD} (ratio 1): {ref.auc:.4f}" if labelled else None)
    bayes = bayes_ceiling(rows, protocol)
    if bayes is not None:
        ax.axhline(bayes, color="tab:red", linestyle=":", linewidth=1.2,
                   label=f"Bayes-optimal ceiling: {bayes:.4f}" if labelled else None)


def _scored(rows: Sequence[Row], protocol: str) -> List[Row]:
    return [r for r in rows if r.protocol == protocol and r.finished and not math.isnan(r.auc)]


def pareto_plot(rows: Sequence[Row], protocol: str) -> Figure:
    """Test AUC (mean +- std) vs inference bytes (log x), one marker style per method; the
    non-dominated points circled, joined and labelled ``method ratio``; legend right of the axes."""
    mine = [r for r in _scored(rows, protocol) if BYTES in r.mean]
    styles = method_styles(r.method for r in rows)
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for method in sorted({r.method for r in mine}):
        points = sorted((r for r in mine if r.method == method), key=lambda r: r.mean[BYTES])
        style = styles[method]
        ax.errorbar([r.mean[BYTES] for r in points], [r.auc for r in points], yerr=[r.auc_std for r in points],
                    fmt=style.marker, color=style.color, capsize=3, markersize=5, label=method)
    front = sorted((r for r in mine if r.pareto), key=lambda r: r.mean[BYTES])
    if front:
        ax.step([r.mean[BYTES] for r in front], [r.auc for r in front], where="post", color="grey", linewidth=1.5,
                alpha=0.8, label="Pareto front", zorder=0)
        ax.scatter([r.mean[BYTES] for r in front], [r.auc for r in front], s=110, facecolors="none",
                   edgecolors="black", linewidths=1.0, zorder=3)
        labels = [ax.annotate(r.method if r.method == REFERENCE_METHOD else f"{r.method} {r.ratio:g}",
                              (r.mean[BYTES], r.auc), xytext=(6, -11), textcoords="offset points", fontsize=7)
                  for r in front]
    _references(ax, rows, protocol)
    if mine:
        ax.set_xscale("log")
    else:
        ax.text(0.5, 0.5, "no finished runs", transform=ax.transAxes, ha="center")
    ax.set_xlabel("embedding inference bytes (log scale)")
    ax.set_ylabel("test AUC (mean ± std over seeds)")
    ax.set_title(f"AUC vs memory — {protocol} (circled and labelled: the Pareto front)", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    if front:
        _stack_overlapping(fig, labels)
    return fig


def _stack_overlapping(fig: Figure, labels: List) -> None:
    """Move each label down until it overlaps none placed before it, the highest point's label first
    (so the labels keep the points' vertical order): front points at almost the same bytes and AUC
    (two methods at one budget) would otherwise print their names over each other."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    placed = []
    for label in sorted(labels, key=lambda t: -t.xy[1]):
        for _ in range(len(labels)):
            box = label.get_window_extent(renderer)
            if not any(box.overlaps(other) for other in placed):
                break
            x, y = label.xyann
            label.xyann = (x, y - box.height * 72.0 / fig.dpi - 1)
        placed.append(label.get_window_extent(renderer))


def _infeasible_title(method: str, infeasible: List[float], finished: List[Row], boundary: float) -> str:
    if not infeasible:
        return method
    if not finished or max(infeasible) < min(r.ratio for r in finished):
        return f"{method}\ninfeasible at ratio ≤ {boundary:g}"
    return f"{method}\ninfeasible at {', '.join(f'{x:g}' for x in infeasible)}"


def budget_plot(rows: Sequence[Row], protocol: str) -> Figure:
    """Small multiples: one panel per method (``full`` excluded: it is the dashed line), test AUC
    (mean +- std) over requested compression ratios (log x), shared axes. Behind each curve, in grey,
    the best AUC of any method at each budget; an x on a panel's floor marks a budget where the method
    is infeasible (its title says where it becomes infeasible), a hollow square one where it failed."""
    mine = [r for r in rows if r.protocol == protocol and r.method != REFERENCE_METHOD]
    methods = sorted({r.method for r in mine})
    styles = method_styles(r.method for r in rows)
    boundary = infeasible_from(rows, protocol)
    scored = _scored(mine, protocol)
    columns = max(1, min(PANEL_COLUMNS, len(methods)))
    lines = max(1, math.ceil(len(methods) / columns))
    fig, axes = plt.subplots(lines, columns, figsize=(3.1 * columns + 0.6, 2.5 * lines + 1.0), sharex=True,
                             sharey=True, squeeze=False)
    panels = axes.ravel()
    ratios = sorted({r.ratio for r in mine})
    best = [max(r.auc for r in scored if r.ratio == x) for x in ratios if any(r.ratio == x for r in scored)]
    best_at = [x for x in ratios if any(r.ratio == x for r in scored)]
    for ax, method in zip(panels, methods):
        style = styles[method]
        floor = blended_transform_factory(ax.transData, ax.transAxes)
        ax.plot(best_at, best, color="0.75", linewidth=2.5, zorder=0)
        _references(ax, rows, protocol, labelled=False)
        finished = sorted((r for r in scored if r.method == method), key=lambda r: r.ratio)
        if finished:
            ax.errorbar([r.ratio for r in finished], [r.auc for r in finished], yerr=[r.auc_std for r in finished],
                        fmt="-" + style.marker, color=style.color, capsize=2, markersize=4)
        infeasible = sorted(r.ratio for r in mine if r.method == method and r.status == "infeasible")
        failed = sorted(r.ratio for r in mine if r.method == method and r.status == "failed")
        if infeasible:
            ax.scatter(infeasible, [0.07] * len(infeasible), marker="x", s=40, color=INFEASIBLE_COLOR,
                       transform=floor, clip_on=False, zorder=4, gid="infeasible")
        if failed:
            ax.scatter(failed, [0.07] * len(failed), marker="s", s=36, facecolors="none", edgecolors="black",
                       transform=floor, clip_on=False, zorder=4, gid="failed")
        ax.set_title(_infeasible_title(method, infeasible, finished, boundary.get(method, 0.0)), fontsize=9,
                     color=style.color if finished else INFEASIBLE_COLOR)
        ax.grid(True, which="major", alpha=0.3)
    for ax in panels[len(methods):]:
        ax.set_axis_off()
    if ratios:
        panels[0].set_xscale("log")
        for ax in panels[:len(methods)]:
            ax.set_xticks(ratios, [f"{t:g}" for t in ratios], fontsize=7, rotation=45)
            ax.minorticks_off()
            ax.tick_params(axis="y", labelsize=7)
    else:
        panels[0].text(0.5, 0.5, "no runs", transform=panels[0].transAxes, ha="center")
    key = [Line2D([], [], color="0.6", linewidth=2.5, label="best of any method at the budget"),
           Line2D([], [], color="black", marker="o", markersize=4, label="the panel's method (mean ± std)"),
           Line2D([], [], color=INFEASIBLE_COLOR, marker="x", linestyle="none", label="infeasible budget"),
           Line2D([], [], color="black", marker="s", markerfacecolor="none", linestyle="none", label="failed")]
    ref, bayes = reference(rows, protocol), bayes_ceiling(rows, protocol)
    if ref is not None:
        key.append(Line2D([], [], color="black", linestyle="--", label=f"{REFERENCE_METHOD} (ratio 1): {ref.auc:.4f}"))
    if bayes is not None:
        key.append(Line2D([], [], color="tab:red", linestyle=":", label=f"Bayes-optimal ceiling: {bayes:.4f}"))
    fig.suptitle(f"AUC over budgets — {protocol}", fontsize=11)
    fig.legend(handles=key, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=3, fontsize=8, frameon=False)
    fig.supxlabel("requested compression ratio (log scale)", fontsize=9)
    fig.supylabel("test AUC (mean ± std over seeds)", fontsize=9)
    fig.tight_layout()
    return fig


def pareto_figure(rows: Sequence[Row], protocol: str) -> bytes:
    """``pareto_plot`` as PNG bytes."""
    return _png(pareto_plot(rows, protocol))


def budget_figure(rows: Sequence[Row], protocol: str) -> bytes:
    """``budget_plot`` as PNG bytes."""
    return _png(budget_plot(rows, protocol))


__all__ = ["pareto_figure", "budget_figure", "pareto_plot", "budget_plot", "method_styles", "caption", "figure_kind"]
