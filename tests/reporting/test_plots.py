"""The report figures on fixture runs: what each panel and legend holds, not only that a PNG came out."""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pytest
from report_fixtures import PROTOCOL, record, records  # noqa: F401 (fixture)

from recbench.reporting.leaderboard import aggregate
from recbench.reporting.plots import (
    FAMILY_MAPS, MARKERS, OTHER_FAMILY, auc_band, budget_figure, budget_plot, caption, method_styles, pareto_plot,
)


def _look(style):
    return style.color, style.marker, style.filled


def test_every_method_of_a_full_leaderboard_has_its_own_look():
    names = [f"method{i:02d}" for i in range(23)]
    styles = method_styles(reversed(names))
    assert len({_look(s) for s in styles.values()}) == 23
    assert styles == method_styles(names)  # the same look whatever order the rows come in


#: 25 methods in 3 families (13 in the largest: past the 12 markers, so hollow ones appear) and 2 without one
FAMILIES = {**{f"hash{i:02d}": "hashing" for i in range(13)}, **{f"prune{i}": "pruning" for i in range(6)},
            **{f"quant{i}": "quantization" for i in range(4)}}
METHODS = [*FAMILIES, "mystery", "zzz"]


def test_families_take_distinct_hues_and_methods_within_a_family_distinct_markers():
    styles = method_styles(reversed(METHODS), FAMILIES)
    assert styles == method_styles(METHODS, FAMILIES)  # order-free
    assert len({_look(s) for s in styles.values()}) == 25  # one look per method
    assert styles["mystery"].family == styles["zzz"].family == OTHER_FAMILY  # no family: "other", grey
    assert all(np.ptp(styles[m].color[:3]) < 1e-9 for m in ("mystery", "zzz"))
    by_family = {}
    for method, style in styles.items():
        by_family.setdefault(style.family, []).append(style)
    assert sorted(by_family) == ["hashing", OTHER_FAMILY, "pruning", "quantization"]
    colours = {family: {s.color for s in members} for family, members in by_family.items()}
    families = sorted(colours)
    assert not any(colours[a] & colours[b] for i, a in enumerate(families) for b in families[i + 1:])
    # the family is the hue: every method of a family is a shade of that family's colour map
    for k, family in enumerate(["hashing", "pruning", "quantization"]):
        shades = plt.get_cmap(FAMILY_MAPS[k])(np.linspace(0, 1, 1001))
        assert all(np.abs(shades - np.array(s.color)).sum(axis=1).min() < 1e-2 for s in by_family[family])
    # within a family: a distinct marker for each of the first 12, then hollow markers
    hashing = [styles[f"hash{i:02d}"] for i in range(13)]
    assert [s.marker for s in hashing[:12]] == list(MARKERS) and len(set(MARKERS)) == 12
    assert [s.filled for s in hashing] == [True] * 12 + [False]
    assert len({s.marker for s in by_family["pruning"]}) == 6


def _pareto_runs(outlier_auc=None, bayes=None, with_full=True):
    """12 methods with AUC 0.75-0.7610 over 3 budgets, optionally one outlier far below and a Bayes ceiling."""
    extra = {"bayes/test_auc": bayes} if bayes is not None else {}
    runs = []
    for i in range(12):
        for ratio, nbytes in ((0.1, 100.0), (0.01, 10.0), (0.5, 500.0)):
            runs += [record(f"m{i:02d}", ratio, s, 0.75 + 0.001 * i + 0.0002 * s, nbytes + i, **extra)
                     for s in range(3)]
    if with_full:
        runs += [record("full", 1.0, s, 0.762, 1000.0, **extra) for s in range(3)]
    if outlier_auc is not None:
        runs += [record("bad", 0.1, s, outlier_auc, 100.5, **extra) for s in range(3)]
    return runs


def test_an_outlier_far_below_does_not_stretch_the_y_axis_and_is_marked_on_its_floor():
    rows = aggregate(_pareto_runs(outlier_auc=0.52))
    band = auc_band(rows, PROTOCOL)
    assert [r.method for r in band.below] == ["bad"]
    fig = pareto_plot(rows, PROTOCOL, {"bad": "broken"})
    try:
        (ax,) = fig.axes
        low, high = ax.get_ylim()
        assert 0.52 < 0.70 < low < 0.75 and high > 0.7612  # the band 0.75-0.762 fills the axes, not 0.52-0.762
        (marks,) = [c for c in ax.collections if c.get_gid() == "below"]
        (x, y), = np.asarray(marks.get_offsets())
        assert x == pytest.approx(100.5) and low <= y < low + 0.1 * (high - low)  # at its bytes, on the floor
        assert [t.get_text() for t in ax.texts if t.get_gid() == "below-count"] == ["▼ 1 below %.3f (lowest 0.520)"
                                                                                    % band.floor]
        assert "1 row(s) with a mean below" in caption("pareto.png", rows, PROTOCOL)
    finally:
        plt.close(fig)
    without = auc_band(aggregate(_pareto_runs()), PROTOCOL)
    assert without.below == [] and without.floor == pytest.approx(0.75, abs=1e-9)  # nothing far below: the lowest


def test_the_pareto_legend_is_grouped_by_family():
    rows = aggregate(_pareto_runs())
    families = {f"m{i:02d}": ("odd" if i % 2 else "even") for i in range(11)}  # m11 and full: other
    fig = pareto_plot(rows, PROTOCOL, families)
    try:
        texts = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
        assert texts[:7] == ["even", "m00", "m02", "m04", "m06", "m08", "m10"]
        assert texts[7:14] == ["odd", "m01", "m03", "m05", "m07", "m09", OTHER_FAMILY]
        assert texts[14:16] == ["full", "m11"]
        bold = {t.get_text() for t in fig.axes[0].get_legend().get_texts() if t.get_fontweight() == "bold"}
        assert bold == {"even", "odd", OTHER_FAMILY}
    finally:
        plt.close(fig)


@pytest.mark.parametrize("bayes, with_full", [(None, True), (None, False), (0.763, True), (0.90, True)])
def test_captions_mention_only_the_lines_the_figures_draw(bayes, with_full):
    rows = aggregate(_pareto_runs(bayes=bayes, with_full=with_full))
    pareto, budgets = caption("pareto-2.png", rows, PROTOCOL), caption("budgets.png", rows, PROTOCOL)
    fig = pareto_plot(rows, PROTOCOL)
    try:
        (ax,) = fig.axes
        dashed = [line for line in ax.get_lines() if line.get_linestyle() == "--"]
        dotted = [line for line in ax.get_lines() if line.get_linestyle() == ":"]
        above = [t for t in ax.texts if t.get_gid() == "ceiling-above"]
        assert bool(dashed) == with_full == ("Dashed: full at ratio 1" in pareto) == ("dashed: full" in budgets)
        assert bool(dotted) == (bayes == 0.763) == ("dotted: the Bayes-optimal ceiling" in pareto)
        assert bool(above) == (bayes == 0.90) == ("far above the axis" in pareto)  # 0.90 would squash the band
        assert ("Bayes" in budgets) == (bayes is not None)  # the panels draw the ceiling whatever its height
        if bayes == 0.90:
            assert ax.get_ylim()[1] < 0.77
    finally:
        plt.close(fig)


def _marks(ax):
    """{kind: sorted budgets} of the markers on a panel's floor (infeasible x, failed square)."""
    return {c.get_gid(): sorted(np.asarray(c.get_offsets())[:, 0]) for c in ax.collections if c.get_gid()}


def test_budget_plot_has_one_panel_per_method_with_its_infeasible_and_failed_budgets(records):
    rows = aggregate(records)
    fig = budget_plot(rows, PROTOCOL)
    try:
        panels = {ax.get_title().split("\n")[0]: ax for ax in fig.axes if ax.axison}
        assert sorted(panels) == ["dhe", "hashing", "qr", "robe"]  # full is the dashed line in each panel
        assert [ax.axison for ax in fig.axes].count(True) == 4
        # dhe: no finished budget; infeasible at 0.01 and 0.1, marked with x on the panel's floor
        assert panels["dhe"].get_title() == "dhe\ninfeasible at ratio ≤ 0.1"
        assert _marks(panels["dhe"]) == {"infeasible": [0.01, 0.1]}
        # qr: finished at 0.1, failed at 0.01 (a hollow square), no infeasible budget
        assert panels["qr"].get_title() == "qr"
        assert _marks(panels["qr"]) == {"failed": [0.01]}
        assert _marks(panels["hashing"]) == {}
        # every panel: full's AUC (0.80) as a horizontal line and the best of any method per budget
        for ax in panels.values():
            ys = [tuple(line.get_ydata()) for line in ax.get_lines()]
            assert (0.80, 0.80) in [tuple(np.round(y, 6)) for y in ys]
            assert (0.75, 0.78) in [tuple(np.round(y, 6)) for y in ys]  # best at 0.01: hashing; at 0.1: hashing/qr
        legend_labels = [t.get_text() for t in fig.legends[0].get_texts()]
        assert "infeasible budget" in legend_labels and "full (ratio 1): 0.8000" in legend_labels
    finally:
        plt.close(fig)


def test_pareto_plot_labels_the_front_and_keeps_the_legend_off_the_data(records):
    rows = aggregate(records)
    fig = pareto_plot(rows, PROTOCOL)
    try:
        (ax,) = fig.axes
        labels = {t.get_text() for t in ax.texts}
        assert labels == {"full", "hashing 0.1", "hashing 0.01"}  # the front of the fixture, nothing else
        fig.canvas.draw()
        legend = ax.get_legend().get_window_extent()
        assert legend.x0 >= ax.get_window_extent().x1  # right of the axes, not over the points
        assert {"hashing", "qr", "robe", "full", "Pareto front"} <= {t.get_text() for t in ax.get_legend().get_texts()}
    finally:
        plt.close(fig)


def test_pareto_labels_of_front_points_at_almost_the_same_place_do_not_overlap():
    """Two methods on the front at one budget, 0.1% apart in bytes and 4e-4 in AUC (as `autosrh` and
    `ptq` at 0.5 on MovieLens-100K): their labels are stacked, not printed over each other."""
    runs = [record("autosrh", 0.5, s, 0.7859, 101086.0) for s in range(3)]
    runs += [record("ptq", 0.5, s, 0.7855, 100992.0) for s in range(3)]
    runs += [record("robe", 0.1, s, 0.70, 20000.0) for s in range(3)]
    fig = pareto_plot(aggregate(runs), PROTOCOL)
    try:
        (ax,) = fig.axes
        fig.canvas.draw()
        boxes = {t.get_text(): t.get_window_extent() for t in ax.texts}
        assert set(boxes) == {"autosrh 0.5", "ptq 0.5", "robe 0.1"}
        names = sorted(boxes)
        assert not any(boxes[a].overlaps(boxes[b]) for i, a in enumerate(names) for b in names[i + 1:])
    finally:
        plt.close(fig)


def test_figures_of_a_protocol_with_only_infeasible_runs_still_render():
    rows = aggregate([record("dhe", 0.1, 0, 0.0, 0.0, status="infeasible")])
    assert budget_figure(rows, PROTOCOL)[:8] == b"\x89PNG\r\n\x1a\n"
    fig = pareto_plot(rows, PROTOCOL)
    assert [t.get_text() for t in fig.axes[0].texts] == ["no finished runs"]
    plt.close(fig)


@pytest.mark.parametrize("count, panels", [(1, (1, 1)), (4, (1, 4)), (5, (2, 4)), (21, (6, 4))])
def test_panel_grid_follows_the_number_of_methods(count, panels):
    runs = [record(f"m{i:02d}", 0.1, 0, 0.7, 10.0) for i in range(count)]
    fig = budget_plot(aggregate(runs), PROTOCOL)
    try:
        grid = fig.axes[0].get_subplotspec().get_gridspec()
        assert (grid.nrows, grid.ncols) == panels
        assert [ax.axison for ax in fig.axes].count(True) == count
    finally:
        plt.close(fig)
