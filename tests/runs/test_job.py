"""One job end to end through the composed Hydra config, with the in-memory and the MLflow tracker."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from recbench.runs.identity import config_hash
from recbench.runs.job import command_with_threads, run_job
from recbench.runs.result import format_result
from recbench.tracking.base import FAILED, FINISHED, InMemoryTracker
from toy_protocol import TOY, toy_cfg

def test_full_job_logs_the_contract_metrics_and_tags(tmp_path):
    tracker = InMemoryTracker()
    result = run_job(toy_cfg(tmp_path, "seed=3"), tracker)
    run = tracker.current
    assert result.status == "finished" and run.status == FINISHED
    for key in ("val/auc", "test/auc", "test/logloss", "emb/bytes_inference", "emb/bytes_training",
                "emb/compression_ratio", "train/samples_per_s", "infer/latency_ms", "infer/latency_ms_single",
                "sys/peak_rss_mb", "emb/bytes_training_weights", "emb/bytes_training_optimizer_state",
                "emb/bytes_training_buffers", "emb/bytes_training_runtime", "emb/collision_rate"):
        assert key in run.metrics, key
    assert run.latest("emb/bytes_training_weights") + run.latest("emb/bytes_training_optimizer_state") \
        == run.latest("emb/bytes_training")  # full: the measured split sums to the closed form
    assert run.latest("emb/collision_rate") == 0.0  # one row per id
    assert run.latest("emb/compression_ratio") == 1.0
    assert run.latest("emb/closed_form_matches") == 1.0
    # the run's cost: CPU and wall seconds of training + evaluation (sweep_cost reads them)
    assert 0 < run.latest("run/cpu_seconds") and 0 < run.latest("run/wall_seconds")
    assert run.latest("run/wall_seconds") >= run.latest("train/seconds")
    assert run.tags["method"] == "full" and run.tags["seed"] == "3" and run.tags["model"] == "dcn"
    assert run.tags["dataset_protocol_id"].startswith("toy-") and run.tags["status"] == "finished"
    assert run.params["trainer.batch_size"] == 64  # flattened resolved config
    assert {Path(a).name for a in run.artifacts} >= {"metrics.json", "config.yaml"}
    table = format_result(toy_cfg(tmp_path), result)
    assert "test AUC" in table and "compression ratio" in table and "measured: optimizer state" in table


def test_a_run_records_its_thread_count_in_a_tag_and_in_its_command(tmp_path):
    """The thread count is outside the config hash but moves the numbers at float tolerance, so the
    command that reproduces a run carries the count it ran with (unless the command set one)."""
    tracker = InMemoryTracker()
    cfg = toy_cfg(tmp_path, "runtime.num_threads=2")
    cfg.trainer.max_steps = 5
    run_job(cfg, tracker, extra_tags={"command": "recbench method=full seed=0"})
    assert tracker.current.tags["num_threads"] == "2"
    assert tracker.current.tags["command"] == "recbench method=full seed=0 runtime.num_threads=2"
    assert config_hash(OmegaConf.to_container(cfg, resolve=True)) == config_hash(
        OmegaConf.to_container(toy_cfg(tmp_path, "runtime.num_threads=1", "trainer.max_steps=5"), resolve=True))


@pytest.mark.parametrize("command, expected", [
    ("recbench method=qr seed=1", "recbench method=qr seed=1 runtime.num_threads=3"),
    ("recbench method=qr runtime.num_threads=1 seed=1", "recbench method=qr runtime.num_threads=1 seed=1"),
    ("recbench -m method=qr ++runtime.num_threads=2 seed=0,1", "recbench -m method=qr ++runtime.num_threads=2 seed=0,1"),
])
def test_command_with_threads_keeps_a_count_the_command_set(command, expected):
    assert command_with_threads(command, 3) == expected


def test_infeasible_budget_is_a_recorded_skipped_run(tmp_path):
    tracker = InMemoryTracker()
    result = run_job(toy_cfg(tmp_path, "budget.compression_ratio=0.1"), tracker)
    assert result.status == "infeasible"
    assert tracker.current.status == FINISHED and tracker.current.tags["status"] == "infeasible"
    assert "reachable range" in tracker.current.tags["status_reason"]
    assert tracker.current.latest("budget/min_reachable_ratio") == 1.0


def test_a_solution_under_the_budget_runs_finished_and_flagged(tmp_path):
    """ptq on the toy tables at ratio 0.32: its best bit widths under the budget reach 0.2828 (the
    next ones up exceed 0.32), below 0.9 x 0.32: the run goes ahead at 0.2828, FINISHED, tagged
    ``under_budget=true``; a run landing within the tolerance is tagged ``false``."""
    tracker = InMemoryTracker()
    cfg = toy_cfg(tmp_path, "method=ptq", "budget.compression_ratio=0.32")
    cfg.trainer.max_steps = 5
    result = run_job(cfg, tracker)
    run = tracker.current
    assert result.status == "finished" and run.status == FINISHED and run.tags["status"] == "finished"
    assert result.under_budget and run.tags["under_budget"] == "true"
    assert run.latest("emb/compression_ratio") == pytest.approx(28 / 99)
    assert run.latest("budget/requested_ratio") == 0.32 and run.latest("budget/solved_ratio") < 0.9 * 0.32
    assert float(run.tags["achieved_ratio"]) == pytest.approx(28 / 99, rel=1e-5)
    assert "under budget" in format_result(cfg, result)
    within = toy_cfg(tmp_path, "method=ptq", "budget.compression_ratio=0.33")
    within.trainer.max_steps = 5
    assert not run_job(within, tracker).under_budget and tracker.current.tags["under_budget"] == "false"


def test_failed_job_is_recorded_with_its_reason(tmp_path):
    tracker = InMemoryTracker()
    cfg = toy_cfg(tmp_path, "optimizer.dense.learning_rate=1e9", "optimizer.embedding.learning_rate=1e9")
    cfg.trainer.max_steps = 200
    try:
        result = run_job(cfg, tracker)
        assert result.status == "failed"  # degenerate AUC
    except Exception:
        pass  # diverged: recorded and re-raised
    assert tracker.current.status == FAILED
    assert tracker.current.tags["status_reason"]


def test_config_hash_ignores_tracking_and_paths(tmp_path):
    a = OmegaConf.to_container(toy_cfg(tmp_path), resolve=True)
    b = OmegaConf.to_container(toy_cfg(tmp_path / "other", "trainer.progress=true"), resolve=True)
    c = OmegaConf.to_container(toy_cfg(tmp_path, "seed=1"), resolve=True)
    assert config_hash(a) == config_hash(b) != config_hash(c)


def test_config_hash_ignores_where_a_generated_dataset_is_written(tmp_path):
    """``dataset.raw_dir`` follows ``paths.data_root``: a sweep launched with an absolute data root
    must recognise the runs finished with a relative one (and the report keep them in one row)."""
    a = OmegaConf.to_container(toy_cfg(tmp_path), resolve=True)
    b = OmegaConf.to_container(toy_cfg(tmp_path), resolve=True)
    a["dataset"]["raw_dir"], b["dataset"]["raw_dir"] = "datasets/synthetic/raw", "/abs/datasets/synthetic/raw"
    assert config_hash(a) == config_hash(b)
    b["dataset"]["rows"] = 12345
    assert config_hash(a) != config_hash(b)


def test_an_option_added_later_at_its_default_keeps_the_hash_of_runs_recorded_before_it(tmp_path):
    import copy

    current = OmegaConf.to_container(toy_cfg(tmp_path), resolve=True)
    before = copy.deepcopy(current)
    before.pop("runtime")  # a run recorded before the runtime group (and these options) existed
    assert config_hash(current) == config_hash(before)
    current["runtime"]["distributed"] = True
    assert config_hash(current) != config_hash(before)
    legacy = copy.deepcopy(before)  # ... or one that kept them under `trainer`, at their defaults
    legacy["trainer"].update(num_threads=1, resume=True, distributed=False, sharding_types=None)
    assert config_hash(legacy) == config_hash(before)


@pytest.mark.parametrize("group, key, value", [
    ("trainer", "search_cache_mb", 0), ("trainer", "progress", True), ("runtime", "num_threads", 1),
    ("runtime", "distributed", True), ("runtime", "sharding_types", ["table_wise"]),
    ("trainer", "num_threads", 1), ("trainer", "distributed", True)])  # (recorded before the runtime group)
def test_protocol_tag_ignores_what_never_changes_the_numbers(tmp_path, group, key, value):
    """A trainer option that does not change the numbers (NON_NUMERIC_KEYS) or how a run is
    parallelised must not start a new leaderboard protocol, whether it is set, changed or absent
    (runs recorded before ``search_cache_mb`` existed landed in another protocol until this held)."""
    import copy

    from recbench.runs.identity import protocol_tag

    current = OmegaConf.to_container(toy_cfg(tmp_path), resolve=True)
    changed, before = copy.deepcopy(current), copy.deepcopy(current)
    changed.setdefault(group, {})[key] = value
    before.get(group, {}).pop(key, None)
    assert protocol_tag("p", current) == protocol_tag("p", changed) == protocol_tag("p", before)
    other = copy.deepcopy(current)
    other["trainer"]["patience"] = 7
    assert protocol_tag("p", other) != protocol_tag("p", current)


def test_a_method_revision_above_one_enters_the_config_hash(tmp_path, monkeypatch):
    """Runs finished by an older revision of a method are not "finished" for its current revision;
    revision 1 (every method until a fix changes its numbers) leaves hashes as they were."""
    from recbench.runs.identity import method_revision
    from recbench.methods.full import Full

    resolved = OmegaConf.to_container(toy_cfg(tmp_path), resolve=True)
    assert method_revision(resolved) == Full.revision == 1
    before = config_hash(resolved)
    stripped = {k: v for k, v in resolved.items() if k != "method"}
    assert method_revision(stripped) == 1
    monkeypatch.setattr(Full, "revision", 2)
    assert method_revision(resolved) == 2
    assert config_hash(resolved) != before


def test_mlflow_run_contents_and_skip_finished(tmp_path):
    from mlflow.tracking import MlflowClient

    cfg = toy_cfg(tmp_path, tracking="mlflow")
    first = run_job(cfg)
    assert first.status == "finished"
    client = MlflowClient(cfg.tracking.tracking_uri)
    run = client.get_run(first.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["method"] == "full" and run.data.tags["mlflow.runName"].startswith("full@1/")
    assert run.data.tags["method_revision"] == "1"
    from recbench.runs.identity import git_sha
    assert run.data.tags.get("mlflow.source.git.commit", "") == git_sha()  # the checkout's commit (40 hex digits)
    assert len(git_sha()) in (0, 40)
    assert set(run.data.metrics) >= {"val/auc", "test/auc", "emb/compression_ratio", "train/samples_per_s"}
    assert run.data.params["trainer.batch_size"] == "64"
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # MLflow 3's classic view
    assert experiment.name in experiment.tags["mlflow.note.content"]  # the description names the protocol
    history = client.get_metric_history(first.run_id, "val/auc")
    assert len(history) >= 2
    artifacts = {a.path for a in client.list_artifacts(first.run_id)}
    assert {"metrics.json", "config.yaml"} <= artifacts
    local = client.download_artifacts(first.run_id, "metrics.json", str(tmp_path))
    assert json.loads(Path(local).read_text())["test/auc"] == pytest.approx(run.data.metrics["test/auc"])
    second = run_job(cfg)
    assert second.status == "skipped" and second.run_id == first.run_id


@pytest.mark.parametrize("override, message", [
    ("budget.compression_ratio=1.5", "must be in \\(0, 1\\]"),
    ("budget.compression_ratio=-0.1", "must be in \\(0, 1\\]"),
    ("optimizer.embedding.kind=adam", "allowed: sgd, adagrad, rowwise_adagrad"),
    ("trainer.batch_size=0", "trainer.batch_size must be an integer >= 1, got 0"),
])
def test_impossible_settings_fail_before_any_run_is_recorded(tmp_path, override, message):
    from recbench.runs.config import ConfigError

    tracker = InMemoryTracker()
    with pytest.raises(ConfigError, match=message):
        run_job(toy_cfg(tmp_path, override), tracker)
    assert tracker.runs == []


@pytest.mark.parametrize("damage", ["truncated", "not_a_checkpoint", "flipped_byte"])
def test_an_unreadable_checkpoint_restarts_the_run_and_closes_the_killed_one(tmp_path, damage):
    """A killed run whose ``checkpoint.pt`` was damaged (truncated; replaced by another file) cannot
    resume: the damaged file is set aside, the killed MLflow run is closed KILLED with the reason,
    and the job restarts as a new run with the numbers of an uninterrupted one (was: every re-run
    failed with PyTorch's zip error until ``runtime.resume=false``)."""
    import torch
    from mlflow.tracking import MlflowClient

    from recbench.tracking.mlflow_tracker import MLflowTracker

    reference = run_job(toy_cfg(tmp_path / "reference", "seed=1"), InMemoryTracker())
    cfg = toy_cfg(tmp_path, "seed=1", tracking="mlflow")
    run_dir = Path(cfg.paths.run_root) / config_hash(OmegaConf.to_container(cfg, resolve=True))
    run_dir.mkdir(parents=True)
    killed = MLflowTracker(cfg.tracking.tracking_uri, cfg.tracking.artifact_root)
    killed_id = killed.start_run("toy-killed", "killed", {"status": "running"}, {})
    (run_dir / "run_id.txt").write_text(killed_id)
    checkpoint = run_dir / "checkpoint.pt"
    if damage == "truncated":
        torch.save({"model": {"w": torch.zeros(1000)}, "progress": {"global_step": 3}}, checkpoint)
        checkpoint.write_bytes(checkpoint.read_bytes()[: checkpoint.stat().st_size // 2])
    elif damage == "flipped_byte":  # still loads with torch.load; only the archive's CRC-32 tells
        torch.save({"model": {"w": torch.arange(1000.0)}, "progress": {"global_step": 3}}, checkpoint)
        data = bytearray(checkpoint.read_bytes())
        data[data.index(torch.arange(1000.0)[500:502].numpy().tobytes())] ^= 1
        checkpoint.write_bytes(bytes(data))
        assert torch.load(checkpoint, weights_only=True)["progress"]["global_step"] == 3
    else:
        torch.save({"something": torch.zeros(3)}, checkpoint)
    result = run_job(cfg)
    assert result.status == "finished" and result.run_id != killed_id
    client = MlflowClient(cfg.tracking.tracking_uri)
    assert client.get_run(result.run_id).data.metrics["test/auc"] == pytest.approx(reference.metrics["test/auc"], abs=1e-6)
    closed = client.get_run(killed_id)
    assert closed.info.status == "KILLED" and closed.data.tags["status"] == "killed"
    assert "unreadable" in closed.data.tags["status_reason"] and "checkpoint.pt" in closed.data.tags["status_reason"]
    assert (run_dir / "checkpoint.pt.unreadable").is_file() and not checkpoint.exists()


def test_a_checkpoint_whose_run_left_the_store_resumes_into_a_new_run(tmp_path, monkeypatch):
    """The store lost the run that ``run_id.txt`` names (tracking URI changed, store restored from
    an export): the job resumes the checkpoint into a new run tagged with the old id, and ends with
    the numbers of an uninterrupted run (was: "Run with id=... not found" on every attempt)."""
    from mlflow.tracking import MlflowClient

    import recbench.training.trainer as trainer_module

    reference = run_job(toy_cfg(tmp_path / "reference", "seed=1", "trainer.checkpoint_every_steps=2"),
                        InMemoryTracker())
    cfg = toy_cfg(tmp_path, "seed=1", "trainer.checkpoint_every_steps=2", tracking="mlflow")
    save = trainer_module.save_checkpoint

    def save_then_die(path, payload):  # the process is killed right after its first checkpoint
        save(path, payload)
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer_module, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run_job(cfg)
    monkeypatch.setattr(trainer_module, "save_checkpoint", save)
    lost_id = next(Path(cfg.paths.run_root).glob("*/run_id.txt")).read_text()
    cfg.tracking.tracking_uri = f"sqlite:///{tmp_path}/new-store.db"
    result = run_job(cfg)
    assert result.status == "finished" and result.run_id != lost_id
    run = MlflowClient(cfg.tracking.tracking_uri).get_run(result.run_id)
    assert run.data.tags["resumed_from_run_id"] == lost_id and run.data.tags["resumed"] == "true"
    assert run.data.metrics["test/auc"] == pytest.approx(reference.metrics["test/auc"], abs=1e-9)


def test_two_launches_of_one_job_give_one_run(tmp_path):
    """Two processes started together on one job: one runs it, the other waits on the job's lock
    and then skips it as FINISHED (was: two FINISHED runs with one config hash, or the second
    adopting the first's live run)."""
    import subprocess
    import sys

    from mlflow.tracking import MlflowClient

    cfg = toy_cfg(tmp_path, "seed=2", tracking="mlflow")
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(OmegaConf.to_yaml(cfg))
    script = ("import json; from omegaconf import OmegaConf; from recbench.runs.job import run_job; "
              f"r = run_job(OmegaConf.load({str(cfg_file)!r})); print(json.dumps([r.status, r.run_id]))")
    # the data is prepared once first, so both processes reach the lock (the cache build has its own)
    run_job(OmegaConf.merge(cfg, {"seed": 3}))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                        os.environ.get("PYTHONPATH", "")])}  # toy_protocol
    launches = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True, env=env) for _ in range(2)]
    outputs = [p.communicate(timeout=600) for p in launches]
    assert all(p.returncode == 0 for p in launches), [err[-2000:] for _, err in outputs]
    outcomes = sorted(json.loads(out.strip().splitlines()[-1]) for out, _ in outputs)
    assert [status for status, _ in outcomes] == ["finished", "skipped"]
    assert outcomes[0][1] == outcomes[1][1]  # the skipped launch names the run the other one finished
    client = MlflowClient(cfg.tracking.tracking_uri)
    chash = config_hash(OmegaConf.to_container(cfg, resolve=True))
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], f"tags.config_hash = '{chash}'")
    assert [r.info.status for r in runs] == ["FINISHED"]


def test_the_run_records_the_malformed_lines_its_dataset_build_skipped(tmp_path):
    """A Criteo file with malformed lines (``malformed=skip``): the run logs their count
    (``data/malformed_lines``) and the dataset facts (first lines as ``file:line: reason``, sources
    with sha256) as ``dataset_facts.json``, so a skipped line is visible from the run itself."""
    import numpy as np

    rng = np.random.default_rng(0)
    cats = rng.integers(0, 5, (700, 26))
    labels = (cats[:, 0] < 2) ^ (rng.random(700) < 0.1)  # learnable from C1 (a run with AUC ~0.5 is refused)
    lines = ["\t".join([str(int(y)), *map(str, rng.integers(0, 9, 13)), *[f"{v:08x}" for v in row]])
             for y, row in zip(labels, cats)]
    lines[10], lines[500] = "1\tnot-enough-fields", ""
    source = tmp_path / "train.txt"
    source.write_text("\n".join(lines) + "\n")
    from mlflow.tracking import MlflowClient

    cfg = OmegaConf.to_container(toy_cfg(tmp_path, tracking="mlflow"))
    cfg["dataset"] = {"_target_": "recbench.datasets.criteo.CriteoProtocol", "name": "criteo_small",
                      "source": str(source), "split": "random", "chunk_rows": 256,
                      "protocol": {**TOY["protocol"], "max_epochs": 1}}
    cfg = OmegaConf.create(cfg)
    result = run_job(cfg)
    assert result.status == "finished"
    client = MlflowClient(cfg.tracking.tracking_uri)
    metrics = client.get_run(result.run_id).data.metrics
    assert metrics["data/malformed_lines"] == 2 and metrics["data/data_lines"] == 700
    facts = json.loads(Path(client.download_artifacts(result.run_id, "dataset_facts.json", str(tmp_path))).read_text())
    assert facts["malformed_lines"] == 2
    assert [e.split(": ")[0] for e in facts["malformed_examples"]] == [f"{source}:11", f"{source}:501"]
    assert facts["sources"][0]["sha256"]


def test_half_written_checkpoints_of_killed_processes_are_removed(tmp_path):
    cfg = toy_cfg(tmp_path, "seed=4")
    run_dir = Path(cfg.paths.run_root) / config_hash(OmegaConf.to_container(cfg, resolve=True))
    run_dir.mkdir(parents=True)
    (run_dir / "checkpoint.pt.tmp-999999").write_bytes(b"half")
    assert run_job(cfg, InMemoryTracker()).status == "finished"
    assert not list(run_dir.glob("*.tmp-*"))


@pytest.mark.slow  # ~29 s (a real multirun); a failed job's record: test_failed_job_is_recorded_with_its_reason
def test_a_failed_job_and_a_multirun_with_a_failed_job_exit_non_zero(tmp_path):
    """Was: ``recbench dataset=synthetic dataset.rows=10`` printed ``status failed`` and exited 0."""
    import subprocess
    import sys

    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/m.db", "RECBENCH_DATA_ROOT": str(tmp_path / "d"),
           "RECBENCH_RUN_ROOT": str(tmp_path / "r"), "RECBENCH_ARTIFACT_ROOT": str(tmp_path / "a")}
    base = [sys.executable, "-c", "import sys; from recbench.cli.train import main; sys.exit(main())"]
    args = ["dataset=synthetic", "trainer.progress=false", f"hydra.run.dir={tmp_path}/o", f"hydra.sweep.dir={tmp_path}/m"]
    single = subprocess.run([*base, *args, "dataset.rows=10"], env=env, cwd=tmp_path, capture_output=True, text=True,
                            timeout=600)
    assert single.returncode != 0, single.stdout[-2000:] + single.stderr[-2000:]
    multi = subprocess.run([*base, "-m", *args, "dataset.rows=10,11"], env=env, cwd=tmp_path, capture_output=True,
                           text=True, timeout=600)
    assert multi.returncode == 1, multi.stdout[-2000:] + multi.stderr[-2000:]
    assert "2 of 2 job(s) of this multirun failed" in multi.stderr
