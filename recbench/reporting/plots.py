"""Report figures (matplotlib, Agg): the Pareto front of test AUC vs inference bytes and the
per-method curves over budgets. Inputs are scored rows (``reporting.leaderboard``); outputs PNG bytes
(``pareto_figure``, ``budget_figure``) or the matplotlib figures they are drawn from (``pareto_plot``,
``budget_plot``, which the tests inspect).

A leaderboard has ~25 methods, so no figure relies on colour alone: each method keeps one look (colour,
marker, filled or hollow) in every figure (``method_styles``). Given the methods' families (a
``{method: family}`` mapping passed in by the caller: reporting reads no method card), the family is the
colour's hue (a method without a family is ``other``, grey) and the method is the marker, with a shade of
the hue per method; without families each method takes the next ``tab10`` colour. Legends sit outside
the plotting area (grouped by family), the Pareto front's points are labelled, and the budget curves are
small multiples (one panel per method, with the best AUC of any method at each budget behind it for
context) instead of 25 curves in one axes.

The Pareto figure's y-range is the informative band (``auc_band``): from the top (the highest mean + std,
``full``; the Bayes ceiling when it is near) down to the rows' lower quartile, and as far again below it;
rows below that floor are not allowed to squash the band: each is a down-triangle on the axis floor,
counted in the corner ("n below"); a Bayes ceiling far above is written on the top edge.

References: docs/architecture.md section 1 (``reporting/``: Pareto fronts, plots).
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.transforms import blended_transform_factory  # noqa: E402

from recbench.reporting.leaderboard import (  # noqa: E402
    BYTES, REFERENCE_METHOD, Row, bayes_ceiling, infeasible_from, reference,
)

DPI = 110
#: one shape per method of a family ("v" is left out: it marks the rows below the Pareto figure's floor)
MARKERS = ("o", "s", "^", "D", "P", "X", "*", "p", "h", "<", ">", "d")
#: one sequential colour map (hue) per family; red is left out (infeasible marks, the Bayes ceiling)
FAMILY_MAPS = ("Blues", "Oranges", "Greens", "Purples", "YlOrBr", "PuRd", "GnBu", "copper_r")
OTHER_FAMILY, OTHER_MAP = "other", "Greys"
PANEL_COLUMNS = 4
INFEASIBLE_COLOR = "tab:red"
BELOW_MARKER = "v"


def caption(name: str, rows: Sequence[Row] = (), protocol: str = "",
            families: Optional[Mapping[str, str]] = None) -> str:
    """The caption of the figure file ``name`` (e.g. ``budgets-2.png``) for ``protocol``: it mentions
    only what the figure draws (the ``full`` line when a ``full`` row exists, the Bayes ceiling when one
    is known, the rows below the Pareto figure's floor when there are any); ``name`` itself for an
    unknown figure."""
    kind = figure_kind(name)
    ref, bayes = reference(rows, protocol), bayes_ceiling(rows, protocol)
    band = auc_band(rows, protocol) if kind == "pareto" else None
    lines = [f"dashed: {REFERENCE_METHOD} at ratio 1"] if ref is not None else []
    if bayes is not None and (band is None or band.ceiling_inside):
        lines.append("dotted: the Bayes-optimal ceiling (synthetic data)")
    elif bayes is not None:
        lines.append(f"the Bayes-optimal ceiling ({bayes:.4f}) lies far above the axis and is written on its top edge")
    drawn = "; ".join(lines)
    looks = ("Colour: the method's family (hue), marker: the method." if families
             else "Each method keeps one colour and marker in both figures.")
    if kind == "pareto":
        below = (f" {len(band.below)} row(s) with a mean below {band.floor:.4f} (the axis floor: the rows' lower "
                 "quartile minus its distance to the top) are down-triangles on the floor, counted in the corner."
                 if band and band.below else "")
        return ("Test AUC (mean ± std over seeds) against embedding inference bytes, log scale. Circled, "
                "joined and labelled: the Pareto front (no other row has fewer or equal bytes and higher or "
                f"equal AUC). {looks}" + (f" {drawn[0].upper()}{drawn[1:]}." if drawn else "") + below)
    if kind == "budgets":
        return ("One panel per method: test AUC (mean ± std) over the requested compression ratios. Grey: "
                "the best AUC of any method at each budget" + (f"; {drawn}" if drawn else "") + ". "
                "An x on a panel's floor: a budget the method cannot reach (its title says where it becomes "
                "infeasible); a hollow square: a failed run.")
    return name


def figure_kind(name: str) -> str:
    """``pareto`` for ``pareto.png`` and ``pareto-2.png``."""
    return name.rsplit(".", 1)[0].split("-")[0]


@dataclass(frozen=True)
class Style:
    color: tuple
    marker: str
    filled: bool = True
    family: str = ""

    @property
    def face(self):
        return self.color if self.filled else "none"


def method_styles(methods: Iterable[str], families: Optional[Mapping[str, str]] = None) -> Dict[str, Style]:
    """One look per method, the same in every figure of a report and whatever order the methods come in.

    With ``families`` ({method: family}; a method not in it is ``other``): each family, in name order
    (``other`` last), takes a hue (``FAMILY_MAPS``; ``other`` grey) and its methods, in name order, take
    the markers in turn (hollow after the 12th) and shades of the hue from dark to light: distinct for
    up to 8 families of up to 24 methods. Without: the methods in name order take the ten ``tab10``
    colours with circles, then again with squares, and so on (distinct for up to 120 methods)."""
    names = sorted(set(methods))
    if families is None:
        cmap = plt.get_cmap("tab10")
        return {m: Style(cmap(i % 10), MARKERS[(i // 10) % len(MARKERS)]) for i, m in enumerate(names)}
    family_of = {m: families.get(m) or OTHER_FAMILY for m in names}
    ordered = sorted(set(family_of.values()), key=lambda f: (f == OTHER_FAMILY, f))
    out: Dict[str, Style] = {}
    named = [f for f in ordered if f != OTHER_FAMILY]
    for family in ordered:
        hue = OTHER_MAP if family == OTHER_FAMILY else FAMILY_MAPS[named.index(family) % len(FAMILY_MAPS)]
        cmap = plt.get_cmap(hue)
        members = [m for m in names if family_of[m] == family]
        for j, method in enumerate(members):
            shade = 0.9 - 0.4 * (j / (len(members) - 1)) if len(members) > 1 else 0.8
            out[method] = Style(cmap(shade), MARKERS[j % len(MARKERS)], (j // len(MARKERS)) % 2 == 0, family)
    return out


def _png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def _references(ax, rows: Sequence[Row], protocol: str, labelled: bool = True, ceiling: bool = True) -> None:
    """``full``'s AUC (dashed) and, on synthetic data and when ``ceiling``, the Bayes-optimal AUC (dotted)."""
    ref = reference(rows, protocol)
    if ref is not None:
        ax.axhline(ref.auc, color="black", linestyle="--", linewidth=1,
                   label=f"{REFERENCE_METHOD} (ratio 1): {ref.auc:.4f}" if labelled else None)
    bayes = bayes_ceiling(rows, protocol)
    if bayes is not None and ceiling:
        ax.axhline(bayes, color="tab:red", linestyle=":", linewidth=1.2,
                   label=f"Bayes-optimal ceiling: {bayes:.4f}" if labelled else None)


def _scored(rows: Sequence[Row], protocol: str) -> List[Row]:
    return [r for r in rows if r.protocol == protocol and r.finished and not math.isnan(r.auc)]


@dataclass
class Band:
    """The Pareto figure's y-range: ``floor`` to ``top``, the rows with a mean below the floor, and
    whether the Bayes ceiling lies inside it (drawn as a line) or far above it (written on the top edge)."""
    floor: float
    top: float
    below: List[Row]
    ceiling_inside: bool


def auc_band(rows: Sequence[Row], protocol: str) -> Optional[Band]:
    """The informative band of test AUC for the Pareto figure (None without a scored row).

    ``top``: the highest mean + std and ``full``'s AUC. ``floor``: the lowest mean - std when that is no
    lower than the rows' lower quartile minus its distance to ``top`` (then nothing is below); else that
    bound, and the rows with a mean under it are ``below``. The Bayes ceiling raises ``top`` only when it
    lies within a third of the band above it; further up it would squash the band."""
    mine = [r for r in _scored(rows, protocol) if BYTES in r.mean]
    if not mine:
        return None
    ref, bayes = reference(rows, protocol), bayes_ceiling(rows, protocol)
    top = max([r.auc + r.auc_std for r in mine] + ([ref.auc] if ref is not None else []))
    quartile = float(np.percentile([r.auc for r in mine], 25))
    bound = quartile - max(top - quartile, 1e-3)
    lowest = min(r.auc - r.auc_std for r in mine)
    floor, below = (lowest, []) if lowest >= bound else \
        (bound, sorted((r for r in mine if r.auc < bound), key=lambda r: r.mean[BYTES]))
    inside = bayes is not None and bayes <= top + (top - floor) / 3
    return Band(floor, max(top, bayes) if inside else top, below, inside)


def _legend_handles(ax, styles: Dict[str, Style], methods: Sequence[str], grouped: bool) -> Tuple[List, List[str]]:
    """The method entries of the Pareto legend, under a heading per family when ``grouped``; then the
    lines (front, ``full``, Bayes) the axes drew."""
    handles: List = []
    families = sorted({styles[m].family for m in methods}, key=lambda f: (f == OTHER_FAMILY, f)) if grouped else [""]
    for family in families:
        if grouped:
            handles.append(Line2D([], [], linestyle="none", label=family))
        handles += [Line2D([], [], linestyle="none", marker=styles[m].marker, color=styles[m].color,
                           markerfacecolor=styles[m].face, markersize=6, label=m)
                    for m in methods if styles[m].family == family or not grouped]
    drawn, labels = ax.get_legend_handles_labels()
    handles += [h for h, label in zip(drawn, labels) if label not in methods]
    return handles, (families if grouped else [])


def pareto_plot(rows: Sequence[Row], protocol: str, families: Optional[Mapping[str, str]] = None) -> Figure:
    """Test AUC (mean +- std) vs inference bytes (log x), one look per method (``method_styles``); the
    non-dominated points circled, joined and labelled ``method ratio``; the y-range from ``auc_band``,
    rows below its floor as down-triangles on it; legend right of the axes, grouped by family."""
    mine = [r for r in _scored(rows, protocol) if BYTES in r.mean]
    styles = method_styles((r.method for r in rows), families)
    band = auc_band(rows, protocol)
    below = set(map(id, band.below)) if band else set()
    shown = [r for r in mine if id(r) not in below]
    methods = sorted({r.method for r in mine})
    fig, ax = plt.subplots(figsize=(10, max(5.5, 0.17 * (len(methods) + 8) / (1 if len(methods) <= 24 else 2))))
    for method in methods:
        points = sorted((r for r in shown if r.method == method), key=lambda r: r.mean[BYTES])
        style = styles[method]
        if points:
            ax.errorbar([r.mean[BYTES] for r in points], [r.auc for r in points], yerr=[r.auc_std for r in points],
                        fmt=style.marker, color=style.color, markerfacecolor=style.face, markeredgecolor=style.color,
                        capsize=3, markersize=6, label=method)
    front = sorted((r for r in mine if r.pareto), key=lambda r: r.mean[BYTES])
    labels = []
    if band:
        low, top = band.floor, band.top
        margin = 0.05 * (top - low) or 0.005
        ax.set_ylim(low - (2.5 if below else 1.0) * margin, top + margin)
        lo, hi = ax.get_ylim()
        floor_y = lo + 0.035 * (hi - lo)
    if front:
        ax.step([r.mean[BYTES] for r in front], [r.auc for r in front], where="post", color="grey", linewidth=1.5,
                alpha=0.8, label="Pareto front", zorder=0)
        ax.scatter([r.mean[BYTES] for r in front if id(r) not in below],
                   [r.auc for r in front if id(r) not in below], s=120, facecolors="none",
                   edgecolors="black", linewidths=1.0, zorder=3)
        for r in front:
            name = r.method if r.method == REFERENCE_METHOD else f"{r.method} {r.ratio:g}"
            if id(r) in below:
                labels.append(ax.annotate(f"{name} ({r.auc:.3f})", (r.mean[BYTES], floor_y), xytext=(5, 5),
                                          textcoords="offset points", fontsize=7))
            else:
                labels.append(ax.annotate(name, (r.mean[BYTES], r.auc), xytext=(6, -11), textcoords="offset points",
                                          fontsize=7))
    if band and band.below:
        ax.scatter([r.mean[BYTES] for r in band.below], [floor_y] * len(band.below), marker=BELOW_MARKER, s=42,
                   c=[styles[r.method].color for r in band.below], edgecolors="black", linewidths=0.6, zorder=4,
                   gid="below")
        lowest = min(r.auc for r in band.below)
        ax.text(0.99, 0.075, f"▼ {len(band.below)} below {band.floor:.3f} (lowest {lowest:.3f})", ha="right",
                transform=ax.transAxes, fontsize=8, gid="below-count")
    _references(ax, rows, protocol, ceiling=band is None or band.ceiling_inside)
    bayes = bayes_ceiling(rows, protocol)
    if band and bayes is not None and not band.ceiling_inside:
        ax.text(0.99, 0.985, f"Bayes-optimal ceiling {bayes:.4f}: far above ↑", transform=ax.transAxes, ha="right",
                va="top", fontsize=8, color="tab:red", gid="ceiling-above")
    if mine:
        ax.set_xscale("log")
    else:
        ax.text(0.5, 0.5, "no finished runs", transform=ax.transAxes, ha="center")
    ax.set_xlabel("embedding inference bytes (log scale)")
    ax.set_ylabel("test AUC (mean ± std over seeds)")
    ax.set_title(f"AUC vs memory — {protocol} (circled and labelled: the Pareto front)", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    handles, headings = _legend_handles(ax, styles, methods, families is not None)
    if handles:
        legend = ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False,
                           ncol=1 if len(handles) <= 30 else 2, handletextpad=0.4)
        for text in legend.get_texts():
            if text.get_text() in headings:
                text.set_fontweight("bold")
    if labels:
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


def budget_plot(rows: Sequence[Row], protocol: str, families: Optional[Mapping[str, str]] = None) -> Figure:
    """Small multiples: one panel per method (``full`` excluded: it is the dashed line), test AUC
    (mean +- std) over requested compression ratios (log x), shared axes. Behind each curve, in grey,
    the best AUC of any method at each budget; an x on a panel's floor marks a budget where the method
    is infeasible (its title says where it becomes infeasible), a hollow square one where it failed."""
    mine = [r for r in rows if r.protocol == protocol and r.method != REFERENCE_METHOD]
    methods = sorted({r.method for r in mine})
    styles = method_styles((r.method for r in rows), families)
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
                        fmt="-" + style.marker, color=style.color, markerfacecolor=style.face,
                        markeredgecolor=style.color, capsize=2, markersize=4)
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


def pareto_figure(rows: Sequence[Row], protocol: str, families: Optional[Mapping[str, str]] = None) -> bytes:
    """``pareto_plot`` as PNG bytes."""
    return _png(pareto_plot(rows, protocol, families))


def budget_figure(rows: Sequence[Row], protocol: str, families: Optional[Mapping[str, str]] = None) -> bytes:
    """``budget_plot`` as PNG bytes."""
    return _png(budget_plot(rows, protocol, families))


__all__ = ["pareto_figure", "budget_figure", "pareto_plot", "budget_plot", "method_styles", "auc_band", "caption",
           "figure_kind"]
