"""A finished run keeps its deployable model (artifact model.pt); ``recbench.load_run`` gives it back,
and it reproduces the run's recorded test AUC on the test split."""
import re

import pytest

import recbench
from recbench.cli.eval import main as eval_main
from recbench.runs.config import ConfigError
from recbench.runs.job import run_job
from recbench.runs.kept import evaluate_model
from recbench.tracking.base import InMemoryTracker
from toy_protocol import toy_cfg


@pytest.mark.parametrize("method", ["qr", "pep"])
def test_a_finished_run_keeps_its_deployable_model_and_load_run_reproduces_its_test_auc(tmp_path, method):
    cfg = toy_cfg(tmp_path, f"method={method}", "budget.compression_ratio=0.5", tracking="mlflow")
    result = run_job(cfg, keep_model=True)
    assert result.status == "finished"
    model, config = recbench.load_run(result.run_id, cfg.tracking.tracking_uri)
    assert config.method.name == method and not model.training
    assert type(model.embedding).__name__ == type(result.model.embedding).__name__  # the deployable form
    again = evaluate_model(model, config)
    assert again["auc"] == pytest.approx(result.metrics["test/auc"], abs=1e-6)
    assert again["logloss"] == pytest.approx(result.metrics["test/logloss"], abs=1e-6)


def test_recbench_eval_reevaluates_a_kept_model(tmp_path, capsys):
    cfg = toy_cfg(tmp_path, "method=hashing", "budget.compression_ratio=0.5", tracking="mlflow")
    result = run_job(cfg)
    assert eval_main([result.run_id, "--tracking-uri", cfg.tracking.tracking_uri]) == 0
    out = capsys.readouterr().out
    assert re.search(rf"test/auc\s+{result.metrics['test/auc']:.6f}", out) and "difference" in out
    assert eval_main(["nosuchrun", "--tracking-uri", cfg.tracking.tracking_uri]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_keep_model_none_keeps_nothing_and_load_run_says_so(tmp_path):
    cfg = toy_cfg(tmp_path, "tracking.keep_model=none", tracking="mlflow")
    result = run_job(cfg)
    assert result.status == "finished" and result.model is None  # run_job drops it unless asked
    with pytest.raises(FileNotFoundError, match=f"run {result.run_id} kept no model"):
        recbench.load_run(result.run_id, cfg.tracking.tracking_uri)


def test_keep_model_is_checked(tmp_path):
    with pytest.raises(ConfigError, match="tracking.keep_model='all'; allowed: deployable, none"):
        run_job(toy_cfg(tmp_path, "tracking.keep_model=all"), InMemoryTracker())
