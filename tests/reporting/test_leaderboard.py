"""Scoring on fixture runs: exact means/stds, delta vs full, ties, Pareto membership, recommendation."""
from __future__ import annotations

import math

import pytest

from report_fixtures import record

from recbench.reporting.leaderboard import (
    aggregate, command, csv_rows, infeasible_from, markdown, pareto_front, recommend,
)

from report_fixtures import PROTOCOL, records  # noqa: F401 (fixture)


def by(rows, method, ratio):
    (row,) = [r for r in rows if r.method == method and r.ratio == ratio]
    return row


def test_means_stds_seeds_and_delta(records):
    rows = aggregate(records)
    full = by(rows, "full", 1.0)
    assert full.seeds == 3 and full.auc == pytest.approx(0.80) and full.auc_std == pytest.approx(0.01)
    hashing = by(rows, "hashing", 0.1)
    assert hashing.seeds == 3  # the older duplicate of seed 0 (AUC 0.5) is not counted
    assert hashing.auc == pytest.approx(0.78) and hashing.auc_std == pytest.approx(0.0)
    assert hashing.delta_auc == pytest.approx(-0.02)
    qr = by(rows, "qr", 0.1)
    assert qr.auc == pytest.approx(0.78) and qr.auc_std == pytest.approx(0.005)
    assert qr.mean["emb/bytes_inference"] == 110.0 and qr.mean["train/samples_per_s"] == pytest.approx(1001.0)
    assert by(rows, "dhe", 0.1).status == "infeasible" and "cannot reach" in by(rows, "dhe", 0.1).reason
    assert by(rows, "qr", 0.01).status == "failed"
    assert by(rows, "robe", 0.01).status == "failed"  # only a killed (RUNNING) run: not a result
    assert "RUNNING" in by(rows, "robe", 0.01).reason


def test_rank_by_mean_and_not_distinguishable_from_the_best(records):
    rows = aggregate(records)
    hashing, qr, robe = by(rows, "hashing", 0.1), by(rows, "qr", 0.1), by(rows, "robe", 0.1)
    assert robe.rank == 3 and {hashing.rank, qr.rank} <= {1, 2}
    (top,) = [r for r in (hashing, qr) if r.best]
    other = qr if top is hashing else hashing
    assert other.near_best and other.p_best > 0.05 and not robe.near_best and robe.p_best < 0.05
    assert by(rows, "hashing", 0.01).rank == 1 and by(rows, "hashing", 0.01).best


def _seeds(method, ratio, aucs, latency=2.0, nbytes=100.0):
    return [record(method, ratio, seed, auc, nbytes, **{"infer/latency_ms": latency}) for seed, auc in enumerate(aucs)]


def _spread(mean, std):
    """Three values with this mean and sample std."""
    return (mean - std, mean, mean + std)


def test_a_lower_mean_is_never_ranked_above_a_higher_one():
    """The issue's case (synthetic, ratio 0.5): unified 0.7559 ± 0.0028 was ranked 1= and lpt
    0.7589 ± 0.0010 ranked 2 by the old 2-std rule; by mean, lpt is first."""
    rows = aggregate(_seeds("unified", 0.5, _spread(0.7559, 0.0028)) + _seeds("lpt", 0.5, _spread(0.7589, 0.0010))
                     + _seeds("robe", 0.5, _spread(0.7400, 0.0010)))
    lpt, unified, robe = by(rows, "lpt", 0.5), by(rows, "unified", 0.5), by(rows, "robe", 0.5)
    assert (lpt.rank, unified.rank, robe.rank) == (1, 2, 3) and lpt.best
    assert unified.near_best and not robe.near_best


def test_welch_p_values_match_scipy():
    """Independent computation: scipy's ``ttest_ind_from_stats(equal_var=False)``."""
    from scipy.stats import ttest_ind_from_stats

    rows = aggregate(_seeds("a", 0.1, (0.760, 0.762, 0.761, 0.7605)) + _seeds("b", 0.1, (0.755, 0.761, 0.758))
                     + _seeds("c", 0.1, (0.70, 0.75, 0.72)))
    a = by(rows, "a", 0.1)
    for name in ("b", "c"):
        row = by(rows, name, 0.1)
        expected = ttest_ind_from_stats(a.auc, a.auc_std, a.seeds, row.auc, row.auc_std, row.seeds, equal_var=False).pvalue
        assert row.p_best == pytest.approx(expected, rel=1e-9)


def test_the_mark_stops_at_the_first_distinguishable_row():
    """A noisy row below a distinguishable one is not marked ≈ best, though its own test passes:
    the mark never rewards noise over a better, tighter row."""
    rows = aggregate(_seeds("a", 0.1, _spread(0.800, 0.0005)) + _seeds("b", 0.1, _spread(0.790, 0.0005))
                     + _seeds("c", 0.1, _spread(0.780, 0.05)))
    c = by(rows, "c", 0.1)
    assert by(rows, "b", 0.1).p_best < 0.05 and not by(rows, "b", 0.1).near_best
    assert c.p_best > 0.05 and not c.near_best and c.rank == 3


def test_single_seed_rows_are_flagged_and_not_tested():
    from recbench.reporting.leaderboard import fmt_auc, fmt_vs_best

    rows = aggregate(_seeds("a", 0.1, _spread(0.80, 0.001)) + _seeds("b", 0.1, (0.79,)) + _seeds("c", 0.1, _spread(0.7995, 0.001)))
    a, b, c = by(rows, "a", 0.1), by(rows, "b", 0.1), by(rows, "c", 0.1)
    assert b.single_seed and math.isnan(b.p_best) and not b.near_best and b.rank == 3
    assert c.near_best  # the untested single-seed row neither gets the mark nor ends the run
    assert fmt_vs_best(b) == "1 seed: not tested" and fmt_auc(b) == "0.7900 (1 seed)" and fmt_vs_best(a) == "best"
    text = markdown(rows)
    assert "| 3 | b | 1 | 0.7900 (1 seed) | 1 seed: not tested |" in text
    lone = aggregate(_seeds("a", 0.1, (0.80,)) + _seeds("b", 0.1, (0.79,)))
    assert [fmt_vs_best(r) for r in lone] == ["best (1 seed)", "1 seed: not tested"]


def test_the_recommendation_breaks_ties_by_latency_then_bytes():
    """The issue's case: mgqe (87 ms) was recommended over optembed (17 ms), tied with it."""
    from recbench.reporting.leaderboard import RECOMMENDATION_RULE

    rows = aggregate(_seeds("mgqe", 0.1, _spread(0.7610, 0.001), latency=87.0)
                     + _seeds("optembed", 0.1, _spread(0.7605, 0.001), latency=17.0, nbytes=120.0)
                     + _seeds("qr", 0.1, _spread(0.7604, 0.001), latency=17.0, nbytes=90.0)
                     + _seeds("robe", 0.1, _spread(0.70, 0.001), latency=1.0))
    (rec,) = recommend(rows, PROTOCOL)
    assert rec.best.method == "mgqe" and rec.pick.method == "qr"  # equal latency: fewer bytes
    assert [r.method for r in rec.candidates] == ["qr", "optembed", "mgqe"]
    text = markdown(rows)
    assert RECOMMENDATION_RULE in text
    assert "| 10x (ratio 0.1) | qr | 0.7604 ± 0.0010 | 17.00 | 90 B |" in text
    assert "| mgqe 0.7610 ± 0.0010 | optembed |" in text


def test_pareto_front_membership(records):
    rows = aggregate(records)
    front = {(r.method, r.ratio) for r in rows if r.pareto}
    assert front == {("full", 1.0), ("hashing", 0.1), ("hashing", 0.01)}
    assert pareto_front([(1, 0.5), (2, 0.6), (2, 0.4), (1, 0.5)]) == [True, True, False, True]


def test_recommendation_and_infeasibility(records):
    rows = aggregate(records)
    recs = {r.ratio: r for r in recommend(rows, PROTOCOL)}
    assert {r.method for r in recs[0.1].candidates} == {"hashing", "qr"}
    assert recs[0.1].pick.method == "hashing"  # equal latency: fewer bytes
    assert recs[0.1].infeasible == ["dhe"]
    assert recs[0.01].best.method == "hashing" and recs[0.01].failed == ["qr", "robe"]
    assert infeasible_from(rows, PROTOCOL) == {"dhe": 0.1}


def test_markdown_and_csv_carry_exact_numbers_links_and_commands(records):
    rows = aggregate(records)
    text = markdown(rows, ui_url="http://127.0.0.1:5000")
    assert "| hashing | 3 | 0.7800 ± 0.0000 |" in text and "| qr | 3 | 0.7800 ± 0.0050 |" in text
    assert "| 3 | robe | 3 | 0.7000 ± 0.0100 | p 0.0052 | -0.1000 |" in text
    assert "Reference `full` (ratio 1): test AUC 0.8000 ± 0.0100" in text
    assert "[s0](http://127.0.0.1:5000/#/experiments/7/runs/hashing-0.1-s0-100)" in text
    assert "`recbench -m sweep=fixture method=hashing budget.compression_ratio=0.1 seed=0,1,2`" in text
    table = {(r["method"], r["ratio"]): r for r in csv_rows(rows)}
    row = table[("qr", 0.1)]
    assert row["test/auc_mean"] == pytest.approx(0.78) and row["test/auc_std"] == pytest.approx(0.005)
    assert row["rank"] in (1, 2) and row["best"] + row["near_best"] == 1 and row["pareto"] == 0
    assert row["delta_auc_vs_full"] == pytest.approx(-0.02)
    assert command(by(rows, "full", 1.0)).startswith("recbench -m sweep=fixture method=full")


def test_the_row_command_carries_the_thread_count_its_seeds_ran_with():
    """Recorded and equal over the seeds: appended; mixed or not recorded (older runs): left out."""
    same = [dict(record("qr", 0.1, seed, 0.78, 100.0), num_threads="1") for seed in range(3)]
    mixed = [dict(record("robe", 0.1, seed, 0.78, 100.0), num_threads=str(1 + (seed == 2))) for seed in range(3)]
    rows = aggregate(same + mixed + [record("hashing", 0.1, 0, 0.78, 100.0)])
    assert command(by(rows, "qr", 0.1)) == "recbench -m sweep=fixture method=qr budget.compression_ratio=0.1 runtime.num_threads=1 seed=0,1,2"
    assert command(by(rows, "robe", 0.1)) == "recbench -m sweep=fixture method=robe budget.compression_ratio=0.1 seed=0,1,2"
    assert command(by(rows, "hashing", 0.1)) == "recbench sweep=fixture method=hashing budget.compression_ratio=0.1 seed=0"


def test_single_seed_has_no_std_and_no_mark():
    rows = aggregate([record("hashing", 0.1, 0, 0.78, 100.0), record("qr", 0.1, 0, 0.78 - 1e-6, 100.0)])
    assert all(math.isnan(r.std["test/auc"]) for r in rows)
    assert sorted(r.rank for r in rows) == [1, 2] and not any(r.near_best for r in rows)


def test_a_stage_that_missed_its_target_is_noted_in_markdown_csv_and_html():
    """``stage/<name>/target_reached = 0`` in some seeds: the row is marked † with the count; the
    numbers are unchanged; rows without the metric (or with 1) carry no note."""
    runs = [record("pep", 0.1, seed, 0.61, 100.0, **{"stage/search/target_reached": float(seed == 2)})
            for seed in range(3)]
    runs += [record("deeplight", 0.1, seed, 0.70, 100.0, **{"stage/prune/target_reached": 1.0}) for seed in range(3)]
    runs += [record("full", 1.0, 0, 0.80, 1000.0)]
    rows = aggregate(runs)
    pep = next(r for r in rows if r.method == "pep")
    assert pep.notes == ["stage `search` ended at its epoch cap before reaching its target in 2 of 3 seed(s)"]
    assert pep.auc == pytest.approx(0.61)
    assert all(not r.notes for r in rows if r.method != "pep")
    text = markdown(rows)
    assert "| pep † | 3 |" in text and "† pep: stage `search` ended at its epoch cap" in text
    assert "deeplight †" not in text
    assert next(c for c in csv_rows(rows) if c["method"] == "pep")["notes"] == pep.notes[0]
    from recbench.reporting.html import leaderboard_table
    html = leaderboard_table(rows, PROTOCOL, 0.1, "http://127.0.0.1:5000")
    assert "pep †" in html and "<li>† pep: stage <code>search</code>" in html


def test_an_under_budget_row_is_marked_in_markdown_csv_and_html_with_a_legend():
    """Runs tagged ``under_budget=true`` (the job's flag: the best configuration under the budget
    lands below (1 - tolerance) x the ratio) make a finished, ranked row marked ↓ with a legend line
    naming the ratio it reached; untagged rows (older records) and ``false`` ones are unmarked, and a
    report without such a row keeps its rules unchanged."""
    from html import escape

    from recbench.reporting.html import leaderboard_table, recommendation_table, render
    from recbench.reporting.leaderboard import RULES, UNDER_BUDGET_RULE

    runs = [dict(record("mixed_dim", 0.5, seed, 0.79, 441.0), under_budget="true") for seed in range(3)]
    runs += [dict(record("hashing", 0.5, seed, 0.78, 500.0), under_budget="false") for seed in range(3)]
    runs += [record("qr", 0.5, seed, 0.77, 480.0) for seed in range(3)] + [record("full", 1.0, 0, 0.80, 1000.0)]
    rows = aggregate(runs)
    mixed = by(rows, "mixed_dim", 0.5)
    assert mixed.finished and mixed.under_budget and mixed.rank == 1 and mixed.auc == pytest.approx(0.79)
    assert not by(rows, "hashing", 0.5).under_budget and not by(rows, "qr", 0.5).under_budget
    text = markdown(rows)
    assert "| 1 | mixed_dim ↓ | 3 | 0.7900 ± 0.0000 |" in text and "| hashing | 3 |" in text
    assert "| 2x (ratio 0.5) | mixed_dim ↓ | 0.7900 ± 0.0000 |" in text  # the recommendation carries the marker too
    legend = ("↓ mixed_dim: under budget: the method's best configuration under ratio 0.5 reaches 0.441, "
              "below (1 - tolerance) x 0.5; it ran at that ratio.")
    assert legend in text and f"Rules: {RULES} {UNDER_BUDGET_RULE}" in text
    table = {c["method"]: c for c in csv_rows(rows)}
    assert (table["mixed_dim"]["under_budget"], table["hashing"]["under_budget"], table["qr"]["under_budget"]) == (1, 0, 0)
    html = leaderboard_table(rows, PROTOCOL, 0.5, "http://127.0.0.1:5000")
    assert ">mixed_dim ↓</td>" in html and f"<li>{escape(legend)}</li>" in html and "hashing ↓" not in html
    assert ">mixed_dim ↓</td>" in recommendation_table(rows, PROTOCOL)
    assert escape(UNDER_BUDGET_RULE) in render("t", [], rows, "http://127.0.0.1:5000", "")
    plain = aggregate([record("qr", 0.5, 0, 0.77, 480.0)])
    assert f"Rules: {RULES}" in markdown(plain) and UNDER_BUDGET_RULE not in markdown(plain)


def test_tags_from_a_store_cannot_inject_markdown_html_or_shell():
    """Tags are copied into leaderboard.md escaped, and the command is re-quoted word by word with
    ``shlex.join`` (was: a ``status_reason`` of ``<svg onload=...>`` appeared raw, and the command
    column split the raw ``overrides`` tag on whitespace)."""
    import shlex

    failed = record("hashing", 0.1, 0, 0.0, 0.0, status="failed")
    failed["status_reason"] = "<svg onload=alert(1)> | `x` [link](http://evil)"
    failed["overrides"] = "method=hashing 'budget.compression_ratio=0.1' $(touch /tmp/pwned);rm -rf ~ seed=0"
    runs = [failed, *[record("full", 1.0, s, 0.8, 1000.0) for s in range(2)]]
    text = markdown(aggregate(runs))
    assert "<svg" not in text and "&lt;svg onload=alert(1)&gt; \\| \\`x\\` \\[link\\](http://evil)" in text
    row = by(aggregate(runs), "hashing", 0.1)
    words = shlex.split(command(row))
    assert words[:2] == ["recbench", "method=hashing"] and "budget.compression_ratio=0.1" in words
    assert "$(touch" in words and "/tmp/pwned);rm" in words  # inert words, each quoted for the shell
    assert "'$(touch'" in command(row) and "'/tmp/pwned);rm'" in command(row)


def test_ne_is_reported_and_derived_for_runs_that_predate_it():
    """``test/ne`` as logged, or (older runs) from the test log loss and positive rate by the trainer's
    own formula; shown next to the log loss and written to the CSV."""
    from recbench.training.evaluation import normalized_entropy

    old = [record("qr", 0.1, seed, 0.78, 100.0, **{"test/positive_rate": 0.25}) for seed in range(2)]
    new = [record("hashing", 0.1, seed, 0.78, 100.0, **{"test/ne": 0.9}) for seed in range(2)]
    rows = aggregate(old + new)
    expected = normalized_entropy(0.47, 0.25)  # the fixture's log loss at AUC 0.78
    assert by(rows, "qr", 0.1).mean["test/ne"] == pytest.approx(expected)
    assert by(rows, "hashing", 0.1).mean["test/ne"] == pytest.approx(0.9)
    assert "test log loss | test NE |" in markdown(rows) and f"| {expected:.4f} ± 0.0000 |" in markdown(rows)
    assert {c["method"]: c["test/ne_mean"] for c in csv_rows(rows)}["qr"] == pytest.approx(expected)


def test_budgets_read_as_compression_factors_with_their_ratio():
    from recbench.reporting.leaderboard import fmt_budget

    assert [fmt_budget(r) for r in (1.0, 0.5, 0.3, 0.1, 0.01, 0.001)] == [
        "1x (ratio 1)", "2x (ratio 0.5)", "3.33x (ratio 0.3)", "10x (ratio 0.1)", "100x (ratio 0.01)",
        "1,000x (ratio 0.001)"]


def test_a_composed_method_is_its_own_labelled_row_with_training_bytes():
    plain = [record("hashing", 0.01, s, 0.70, 10.0, **{"emb/bytes_training": 30.0}) for s in range(3)]
    composed = []
    for s in range(3):
        run = record("hashing", 0.01, s, 0.74, 10.0, **{"emb/bytes_training": 120.0})
        run.update(group_hash="g-hashing-int8", config_hash=f"h-int8-{s}", params={"method.quantize": "int8"})
        composed.append(run)
    rows = aggregate(plain + composed)
    labels = sorted(r.label for r in rows)
    assert labels == ["hashing", "hashing+int8"]
    text = markdown(rows)
    assert "| training bytes |" in text and "hashing+int8" in text
    assert [r.label for r in rows if r.best] == ["hashing+int8"]


def test_full_composed_with_quantized_tables_is_not_the_reference():
    runs = [record("full", 1.0, s, 0.80, 1000.0) for s in range(2)]
    for s in range(2):
        run = record("full", 0.35, s, 0.79, 300.0)
        run.update(group_hash="g-full-int8", params={"method.quantize": "int8"})
        runs.append(run)
    rows = aggregate(runs)
    composed = by(rows, "full", 0.35)
    assert composed.label == "full+int8" and composed.delta_auc == pytest.approx(-0.01)
    assert math.isnan(aggregate(runs[2:])[0].delta_auc)  # no uncomposed full: no reference
