"""The report figures on fixture runs: what each panel and legend holds, not only that a PNG came out."""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pytest
from report_fixtures import PROTOCOL, record, records  # noqa: F401 (fixture)

from recbench.reporting.leaderboard import aggregate
from recbench.reporting.plots import budget_figure, budget_plot, method_styles, pareto_plot


def test_every_method_of_a_full_leaderboard_has_its_own_look():
    names = [f"method{i:02d}" for i in range(23)]
    styles = method_styles(reversed(names))
    assert len({(s.color, s.marker) for s in styles.values()}) == 23
    assert styles == method_styles(names)  # the same look whatever order the rows come in


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
