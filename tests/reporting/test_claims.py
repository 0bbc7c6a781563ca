"""Claims table: each verdict rule on small hand-made record sets (holds / does not hold / not testable,
infeasible and under-budget rows), and the committed reports/claims.md rebuilt byte for byte."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from report_fixtures import record

from recbench.reporting import claims as C

REPO = Path(__file__).resolve().parents[2]


def seeds(method, ratio, aucs, nbytes=100.0, **tags):
    runs = [record(method, ratio, seed, auc, nbytes) for seed, auc in enumerate(aucs)]
    return [{**r, **tags} for r in runs]


def grid(*runs):
    (g,) = C.grids([r for group in runs for r in group])
    return g


def claim(rule, method, baselines=(), budgets=(0.1,), tolerance=None):
    return C.Claim("t", "test claim", "paper", "quote", "setting", "https://example.org", rule, method,
                   baselines=baselines, budgets=budgets, tolerance=tolerance)


FULL = seeds("full", 1.0, (0.800, 0.801, 0.799), nbytes=1000.0)


def verdicts(checks):
    return [c.verdict for c in checks]


def test_beats_holds_only_for_a_higher_mean_that_welch_distinguishes():
    g = grid(FULL, seeds("qr", 0.1, (0.790, 0.791, 0.789)), seeds("hashing", 0.1, (0.780, 0.781, 0.779)),
             seeds("robe", 0.1, (0.781, 0.790, 0.772)))
    assert verdicts(C.rule_beats(claim("beats", "qr", ("hashing",)), g)) == [C.HOLDS]
    assert verdicts(C.rule_beats(claim("beats", "hashing", ("qr",)), g)) == [C.FAILS]
    # a higher mean (0.781 vs 0.780) that the seeds cannot tell apart does not count as beating
    assert verdicts(C.rule_beats(claim("beats", "robe", ("hashing",)), g)) == [C.FAILS]


def test_an_infeasible_or_missing_method_is_not_testable_with_the_solvers_reason():
    infeasible = [record("qr", 0.01, s, 0.0, 0.0, status="infeasible") for s in range(3)]
    g = grid(FULL, infeasible, seeds("hashing", 0.01, (0.70, 0.71, 0.69)))
    (check,) = C.rule_beats(claim("beats", "qr", ("hashing",), budgets=(0.01,)), g)
    assert check.verdict == C.UNTESTABLE and "infeasible" in check.reason and "qr cannot reach 0.01" in check.reason
    (check,) = C.rule_beats(claim("beats", "dsl", ("magnitude",), budgets=(0.01,)), g)
    assert check.verdict == C.UNTESTABLE and "no `dsl` run" in check.reason
    assert C.overall([check]) == C.UNTESTABLE


def test_same_as_full_needs_welch_and_the_tolerance():
    g = grid(FULL, seeds("robe", 0.1, (0.7995, 0.8005, 0.7990)), seeds("tt_rec", 0.1, (0.60, 0.61, 0.59)),
             seeds("mixed_dim", 0.1, (0.790, 0.812, 0.780)))
    assert verdicts(C.rule_same_as_full(claim("same_as_full", "robe", tolerance=0.001), g)) == [C.HOLDS]
    assert verdicts(C.rule_same_as_full(claim("same_as_full", "tt_rec"), g)) == [C.FAILS]
    # not distinguishable by Welch (noisy seeds) but |Δ| = 0.006 > 0.1% of full: does not hold
    (check,) = C.rule_same_as_full(claim("same_as_full", "mixed_dim", tolerance=0.001), g)
    assert check.verdict == C.FAILS and "Welch p" in check.measured


def test_loss_within_tolerance_and_noise_larger_than_it():
    g = grid(FULL, seeds("tt_rec", 0.1, (0.799, 0.800, 0.798)), seeds("tt_rec", 0.05, (0.70, 0.701, 0.699)),
             seeds("tt_rec", 0.01, (0.80, 0.78, 0.76)))
    rule = claim("loss_within", "tt_rec", budgets=(0.1, 0.05, 0.01), tolerance=0.003)
    assert verdicts(C.rule_loss_within(rule, g)) == [C.HOLDS, C.FAILS, C.UNTESTABLE]
    assert C.overall(C.rule_loss_within(rule, g)) == C.FAILS


def test_overall_verdict_over_budgets():
    holds, fails, untestable = (C.Check(0.1, v, "") for v in (C.HOLDS, C.FAILS, C.UNTESTABLE))
    assert C.overall([holds, untestable]) == C.HOLDS
    assert C.overall([holds, fails, untestable]) == C.FAILS
    assert C.overall([untestable]) == C.UNTESTABLE


def test_pareto_better_needs_a_win_and_no_loss():
    method = seeds("unified", 0.1, (0.79, 0.791, 0.789)) + seeds("unified", 0.01, (0.75, 0.751, 0.749))
    base = seeds("hashing", 0.1, (0.78, 0.781, 0.779)) + seeds("hashing", 0.01, (0.76, 0.761, 0.759))
    rule = claim("pareto_better", "unified", ("hashing",), budgets=(0.1, 0.01, 0.001))
    (check,) = C.rule_pareto_better(rule, grid(FULL, method, base))
    assert check.verdict == C.FAILS and "beats `hashing` at 1 of 2" in check.measured
    assert "0.001" in check.reason  # the budget no run covers is named, not silently dropped
    better = seeds("unified", 0.01, (0.77, 0.771, 0.769))
    (check,) = C.rule_pareto_better(rule, grid(FULL, method[:3], better, base))
    assert check.verdict == C.HOLDS


def test_reaches_below_the_baselines_reach():
    qr = seeds("qr", 0.1, (0.78, 0.781, 0.779)) + [record("qr", 0.01, s, 0, 0, status="infeasible") for s in range(3)]
    mde = [record("mixed_dim", r, 0, 0, 0, status="infeasible") for r in (0.1, 0.01)]
    cafe = seeds("cafe", 0.1, (0.78, 0.781, 0.779)) + seeds("cafe", 0.01, (0.75, 0.751, 0.749))
    hashing = seeds("hashing", 0.1, (0.77, 0.771, 0.769)) + seeds("hashing", 0.01, (0.70, 0.701, 0.699))
    rule = claim("reaches_below", "cafe", ("qr", "mixed_dim", "hashing"), budgets=(0.1, 0.01))
    checks = C.rule_reaches_below(rule, grid(FULL, qr, mde, cafe, hashing))
    assert [c.ratio for c in checks] == [None, 0.01] and verdicts(checks) == [C.HOLDS, C.HOLDS]
    assert "`mixed_dim` no budget" in checks[0].measured
    stuck = [record("cafe", 0.01, s, 0, 0, status="infeasible") for s in range(3)]
    checks = C.rule_reaches_below(rule, grid(FULL, qr, mde, cafe[:3], stuck, hashing))
    assert verdicts(checks) == [C.FAILS, C.UNTESTABLE]


def test_best_or_tied_uses_the_leaderboards_marks():
    g = grid(FULL, seeds("magnitude", 0.1, (0.79, 0.791, 0.789)), seeds("dsl", 0.1, (0.789, 0.795, 0.786)),
             seeds("magnitude", 0.01, (0.70, 0.701, 0.699)), seeds("dsl", 0.01, (0.75, 0.751, 0.749)))
    rule = claim("best_or_tied", "magnitude", budgets=(0.1, 0.01))
    assert verdicts(C.rule_best_or_tied(rule, g)) == [C.HOLDS, C.FAILS]


def test_under_budget_rows_show_their_achieved_ratio():
    g = grid(FULL, seeds("optembed", 0.1, (0.79, 0.791, 0.789), nbytes=50.0, under_budget="true"),
             seeds("pep", 0.1, (0.78, 0.781, 0.779)))
    (check,) = C.rule_beats(claim("beats", "optembed", ("pep",)), g)
    assert check.verdict == C.HOLDS and "under budget: achieved ratio 0.05" in check.measured


def gate_runs(gate, aucs, local_search="False"):
    return [{**r, "protocol": f"toy-abc/{gate}", "group_hash": f"g-{gate}-{local_search}",
             "params": {"gate.name": gate, "gate.local_search.enabled": local_search}}
            for r in seeds("full", 1.0, aucs)]


def test_gate_claims_read_the_moe_runs_only():
    moe = gate_runs("comet", (0.79, 0.791, 0.789)) + gate_runs("hash", (0.78, 0.781, 0.779)) \
        + gate_runs("topk", (0.789, 0.795, 0.786)) + gate_runs("comet", (0.5, 0.5, 0.5), local_search="True")
    g = grid(FULL, moe)
    assert g.protocol == "toy-abc/1234" and {r.method for r in g.rows} == {"full"}  # MoE runs not in the grid
    checks = C.rule_gate_beats(claim("gate_beats", "comet", ("hash", "topk")), g)
    assert verdicts(checks) == [C.HOLDS, C.FAILS] and "+1.28% relative" in checks[0].measured
    (check, _) = C.rule_gate_beats(claim("gate_beats", "comet", ("hash", "topk")), grid(FULL))
    assert check.verdict == C.UNTESTABLE and "no finished MoE run" in check.reason


def test_every_claim_names_a_rule_and_a_source():
    assert {c.rule for c in C.CLAIMS} <= set(C.RULES)
    assert all(c.source.startswith("http") and c.quote for c in C.CLAIMS)


def test_committed_claims_md_is_rebuilt_byte_for_byte(monkeypatch):
    monkeypatch.chdir(REPO)
    paths = [Path("reports/reference/movielens100k/runs.json"), Path("reports/reference/synthetic/runs.json")]
    assert C.from_records(paths, Path("reports/claims.md")) == (REPO / "reports/claims.md").read_text()


def test_cli_writes_the_file_and_refuses_missing_records(tmp_path, capsys):
    out = tmp_path / "claims.md"
    records = tmp_path / "runs.json"
    records.write_text(json.dumps(FULL + seeds("qr", 0.1, (0.79, 0.791, 0.789))))
    assert C.main(["--records", str(records), "--out", str(out)]) == 0
    assert out.read_text().startswith("# Paper claims") and "| QR (`qr`) beats hashing" in out.read_text()
    assert C.main(["--records", str(tmp_path / "missing.json"), "--out", str(out)]) == 2
    assert "missing.json" in capsys.readouterr().err


@pytest.mark.parametrize("content, message", [
    ('{"runs":', "not a JSON records file"),
    ('{"a": 1}', "a JSON dict, not a list of run records"),
])
def test_a_bad_records_file_is_one_line_naming_the_file_and_nothing_is_written(tmp_path, capsys, content, message):
    bad, out = tmp_path / "runs.json", tmp_path / "claims.md"
    bad.write_text(content)
    assert C.main(["--records", str(bad), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(bad) in err[0] and message in err[0]
    assert not out.exists()
