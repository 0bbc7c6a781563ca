"""Outside a terminal (a pipe, nohup, a cluster log) or with ``trainer.progress=false`` the trainer
logs one line per evaluation: step, epoch, val AUC, best, evaluations without gain, elapsed time and
an upper bound of the time left (issue "For the people who use it", honest progress)."""
from __future__ import annotations

import logging
import re

from recbench.runs.job import run_job
from recbench.tracking.base import InMemoryTracker
from toy_protocol import toy_cfg


def test_one_progress_line_per_evaluation_without_a_bar(tmp_path, caplog):
    cfg = toy_cfg(tmp_path, "trainer.progress=false")
    with caplog.at_level(logging.INFO, logger="recbench.training.trainer"):
        result = run_job(cfg, InMemoryTracker())
    assert result.status == "finished"
    lines = [r.getMessage() for r in caplog.records if " step " in r.getMessage() and "val AUC" in r.getMessage()]
    pattern = (r"full:train step (\d+)/(\d+) \(epoch [\d.]+\): val AUC 0\.\d{4}, best 0\.\d{4} "
               r"\(\d+ eval\(s\) without gain of 3\), \d+ s elapsed, at most \d+ s left")
    assert lines and all(re.fullmatch(pattern, line) for line in lines), lines
    steps = [int(re.match(r"full:train step (\d+)", line).group(1)) for line in lines]
    assert steps == sorted(steps) and len(steps) == len(set(steps))
