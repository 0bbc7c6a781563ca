"""A training process killed with SIGKILL in the middle of an epoch, run again with the same
command, resumes from its last checkpoint into the same MLflow run and ends with the metrics of an
uninterrupted run with the same seed (tolerance 1e-5; the in-process variant with a simulated
kill is tests/training/test_trainer.py::test_resume_after_kill_matches_uninterrupted_run)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
TOY_DATASET = """_target_: toy_protocol.ToyProtocol
rows: 20000
protocol: {batch_size: 128, embedding_dim: 8, bottom_mlp: [8], top_mlp: [8, 1], dense_learning_rate: 0.003,
           embedding_learning_rate: 0.1, max_epochs: 2, evals_per_epoch: 2, patience: 3}
"""


def _env(tmp_path: Path, store: str) -> dict:
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]),
                MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / store}.db", RECBENCH_ARTIFACT_ROOT=str(tmp_path / f"{store}-art"),
                RECBENCH_DATA_ROOT=str(tmp_path / "data"), RECBENCH_RUN_ROOT=str(tmp_path / f"{store}-runs"),
                OMP_NUM_THREADS="1")


def _runs(tmp_path: Path, store: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / store}.db")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], "")
    return client, runs


@pytest.mark.slow  # ~40-60 s on 2 shared cores: three CLI runs (uninterrupted, killed, resumed)
def test_sigkill_mid_epoch_then_rerun_matches_the_uninterrupted_run(tmp_path):
    (tmp_path / "conf" / "dataset").mkdir(parents=True)
    (tmp_path / "conf" / "dataset" / "toy.yaml").write_text(TOY_DATASET)
    command = [sys.executable, "-m", "recbench.cli.train", f"hydra.searchpath=[file://{tmp_path / 'conf'}]",
               "dataset=toy", "model=dlrm", "method=hashing", "budget.compression_ratio=0.5", "seed=3",
               "trainer.progress=false", "runtime.num_threads=1", "trainer.latency_repeats=1",
               "trainer.checkpoint_every_steps=20"]
    reference = subprocess.run(command, env=_env(tmp_path, "reference"), cwd=tmp_path, capture_output=True,
                               text=True, timeout=600)
    assert reference.returncode == 0, reference.stderr[-3000:]

    env = _env(tmp_path, "killed")
    victim = subprocess.Popen(command, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint, progress = None, None
    deadline = time.time() + 300
    while progress is None and time.time() < deadline and victim.poll() is None:
        time.sleep(0.05)
        for path in (tmp_path / "killed-runs").glob("*/checkpoint.pt"):
            try:
                state = torch.load(path, weights_only=True)["progress"]
            except Exception:  # being replaced right now: try again
                continue
            if state["batch"] > 0 and state["epoch"] == 0:  # mid-epoch
                os.kill(victim.pid, signal.SIGKILL)
                checkpoint, progress = path, state
                break
    victim.wait()
    assert progress is not None, "the run finished before a mid-epoch checkpoint could be taken"
    assert victim.returncode == -signal.SIGKILL and checkpoint.is_file()
    # the victim may have written its next checkpoint between our read and the kill (20 toy steps take
    # ~0.1 s): the resume starts from what is on disk now, which must still be mid-epoch
    progress = torch.load(checkpoint, weights_only=True)["progress"]
    assert progress["batch"] > 0 and progress["epoch"] == 0, progress
    print(f"killed at epoch {progress['epoch']}, batch {progress['batch']} (global step {progress['global_step']})")
    _, runs = _runs(tmp_path, "killed")
    assert [r.info.status for r in runs] == ["RUNNING"]  # left open by the kill

    resumed = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"step {progress['global_step']}" in resumed.stdout + resumed.stderr  # "resumed from ... at stage 0, step N"
    client, runs = _runs(tmp_path, "killed")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED" and runs[0].data.tags["resumed"] == "true"
    assert not checkpoint.exists()  # a finished run removes its checkpoint
    # the run's cost counts the killed process up to its checkpoint, not only the resuming one
    before = runs[0].data.metrics["run/cpu_seconds_before_resume"]
    assert 0 < before < runs[0].data.metrics["run/cpu_seconds"]
    reference_client, (ref,) = _runs(tmp_path, "reference")
    for key in ("val/auc", "test/auc", "test/logloss"):
        print(f"{key}: resumed {runs[0].data.metrics[key]:.7f}, uninterrupted {ref.data.metrics[key]:.7f}")
        assert runs[0].data.metrics[key] == pytest.approx(ref.data.metrics[key], abs=1e-5), key
    losses = [[(m.step, m.value) for m in c.get_metric_history(r.info.run_id, "val/auc")]
              for c, r in ((client, runs[0]), (reference_client, ref))]
    assert [s for s, _ in losses[0]] == [s for s, _ in losses[1]]
    assert [v for _, v in losses[0]] == pytest.approx([v for _, v in losses[1]], abs=1e-5)
