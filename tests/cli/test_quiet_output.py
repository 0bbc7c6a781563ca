"""What a user sees is recbench's own: the known third-party notices (``recbench.quiet``) are
dropped by message and emitting module at the entry points, in the launcher and in its parallel
workers, and nothing else is hidden."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from recbench.quiet import KNOWN_LOG_RECORDS, KNOWN_WARNINGS, quiet_known_warnings

REPO = Path(__file__).resolve().parents[2]
SPARSE_NOTICE = "Sparse invariant checks are implicitly disabled. Memory errors (e.g. SEGFAULT) will occur"


def _warn_from(module: str, message: str) -> list:
    """Warnings recorded when ``message`` is warned from code whose module is ``module``."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_known_warnings()
        exec(compile("import warnings\nwarnings.warn(MESSAGE, UserWarning)", "<x>", "exec"),
             {"__name__": module, "MESSAGE": message})
    return [str(w.message) for w in caught]


def test_known_warning_is_dropped_only_from_its_module():
    assert _warn_from("torch.optim.adagrad", SPARSE_NOTICE) == []
    assert _warn_from("recbench.methods.robe", SPARSE_NOTICE) == [SPARSE_NOTICE]  # not a blanket ignore
    assert _warn_from("torch.optim.adagrad", "some other torch warning") == ["some other torch warning"]


def test_known_log_record_is_dropped_only_for_its_logger(caplog):
    quiet_known_warnings()
    quiet_known_warnings()  # idempotent: one filter
    name, prefix = KNOWN_LOG_RECORDS[0]
    assert sum(type(f).__name__ == "_DropKnown" for f in logging.getLogger(name).filters) == 1
    with caplog.at_level(logging.WARNING):
        logging.getLogger(name).warning(prefix + ". Please use ...")
        logging.getLogger(name).warning("another fx notice")
        logging.getLogger("somewhere.else").warning(prefix)
    assert [r.getMessage() for r in caplog.records] == ["another fx notice", prefix]


def test_every_entry_names_a_module():
    assert all(module and message for _, message, module in KNOWN_WARNINGS)


TOY_DATASET = """_target_: toy_protocol.ToyProtocol
rows: 1500
protocol: {batch_size: 128, embedding_dim: 8, bottom_mlp: [8], top_mlp: [8, 1], dense_learning_rate: 0.003,
           embedding_learning_rate: 0.1, max_epochs: 1, evals_per_epoch: 1, patience: 1}
"""
TOY_PRESET = """# @package _global_
defaults:
  - override /dataset: toy
  - override /model: dlrm
trainer: {progress: false, latency_repeats: 1}
sweep_preset:
  reference: {method: full, budget.compression_ratio: 1.0}
hydra:
  sweeper:
    params:
      method: robe,hashing
      budget.compression_ratio: 0.5
      seed: 0
"""


def test_a_parallel_sweep_prints_no_third_party_warning(tmp_path):
    """robe's sparse Adagrad step raised torch's sparse-invariant notice and TorchRec's KJT code
    the is_fx_tracing notice, in every joblib worker; the sweep's output has neither (nor any other
    Python warning) and still has recbench's own lines."""
    conf = tmp_path / "conf"
    (conf / "dataset").mkdir(parents=True)
    (conf / "sweep").mkdir()
    (conf / "dataset" / "toy.yaml").write_text(TOY_DATASET)
    (conf / "sweep" / "toy.yaml").write_text(TOY_PRESET)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]),
               MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path}/mlflow.db", RECBENCH_ARTIFACT_ROOT=str(tmp_path / "art"),
               RECBENCH_DATA_ROOT=str(tmp_path / "data"), RECBENCH_RUN_ROOT=str(tmp_path / "runs"))
    for key in ("RECBENCH_SWEEP_ID", "PYTHONWARNINGS"):
        env.pop(key, None)
    command = [str(Path(sys.executable).parent / "recbench-sweep"), "toy", f"hydra.searchpath=[file://{conf}]",
               "--root", str(tmp_path / "sweeps"), "--jobs", "2"]
    done = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=400)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-3000:]
    assert "finished 3" in out, out[-3000:]  # robe, hashing and the full reference ran
    lines = [line for line in out.splitlines() if "Warning" in line or "is_fx_tracing" in line]
    assert lines == [], "\n".join(lines)
