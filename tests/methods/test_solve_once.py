"""A job solves the budget once: ``method.solve`` is called one time, and the run logs that plan."""
from __future__ import annotations

import pytest
from hydra.utils import get_class

from recbench.methods.base import CompressionMethod
from recbench.runs.job import run_job
from recbench.tracking.base import InMemoryTracker, flatten
from toy_protocol import toy_cfg


@pytest.mark.parametrize("method, ratio", [("qr", 0.5), ("pep", 0.5)])  # one stage; several stages with rebuilds
def test_a_job_calls_solve_once_and_logs_the_plan_it_built(tmp_path, monkeypatch, method, ratio):
    cfg = toy_cfg(tmp_path, f"method={method}", f"budget.compression_ratio={ratio}", "trainer.max_steps=6")
    cls = get_class(cfg.method._target_)
    plans, hparam_calls = [], []
    solve, solve_hparams = CompressionMethod.solve, cls.solve_hparams

    def counted_solve(self, *args, **kwargs):
        plans.append(solve(self, *args, **kwargs))
        return plans[-1]

    def counted_solve_hparams(self, *args, **kwargs):
        hparam_calls.append(1)
        return solve_hparams(self, *args, **kwargs)

    monkeypatch.setattr(CompressionMethod, "solve", counted_solve)
    monkeypatch.setattr(cls, "solve_hparams", counted_solve_hparams)
    tracker = InMemoryTracker()
    assert run_job(cfg, tracker).status == "finished"
    assert len(plans) == 1 and len(hparam_calls) == 1
    (plan,), run = plans, tracker.current
    assert plan.method == method and plan.requested_ratio == ratio
    assert run.latest("budget/requested_ratio") == plan.requested_ratio
    assert run.latest("budget/solved_ratio") == plan.achieved_ratio
    assert run.tags["under_budget"] == str(plan.under_budget).lower()
    logged = {k[len("hparam."):]: v for k, v in run.tags.items() if k.startswith("hparam.")}
    assert logged and logged == {k: str(v) for k, v in flatten(plan.hparams).items()}
    assert run.latest("emb/closed_form_matches") == 1.0
