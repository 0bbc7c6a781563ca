"""Cluster launchers: ``hydra/launcher=ray`` and ``hydra/launcher=submitit_slurm`` compose and
match their plugins' schemas (checked when the optional plugins are installed; submitit is tested
by composition only: no SLURM here); a sweep on a local Ray instance records every job exactly
once, also when the Ray worker running a job is killed with SIGKILL mid-training (Ray re-runs
the task and the job resumes from its checkpoint into the same MLflow run); the same fault under
the local joblib launcher loses and duplicates nothing once the sweep is re-launched (the
whole-sweep kill is tests/cli/test_sweep.py)."""
from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from recbench.runs.config import compose

from test_sweep import toy_sweep  # noqa: F401  (fixture: a toy sweep preset and its environment)

REPO = Path(__file__).resolve().parents[2]


def launcher_config(name: str):
    cfg = compose([f"hydra/launcher={name}"], return_hydra_config=True)
    return cfg.hydra


def test_ray_launcher_config():
    hydra = launcher_config("ray")
    assert hydra.launcher._target_ == "hydra_plugins.hydra_ray_launcher.ray_launcher.RayLauncher"
    assert hydra.launcher.ray.init.address is None  # a local Ray instance unless told otherwise
    assert hydra.launcher.ray.remote.max_calls == 1 and hydra.launcher.ray.remote.max_retries >= 1


def test_submitit_slurm_launcher_config():
    hydra = launcher_config("submitit_slurm")
    assert hydra.launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert str(hydra.launcher.submitit_folder).startswith(str(hydra.sweep.dir))
    assert hydra.launcher.timeout_min > 0 and hydra.launcher.max_num_timeout >= 1


def test_launcher_keys_match_the_installed_plugin_schemas():
    schemas = []
    try:
        from hydra_plugins.hydra_submitit_launcher.config import SlurmQueueConf
        schemas.append(("submitit_slurm", {f.name for f in dataclasses.fields(SlurmQueueConf)}))
    except ImportError:
        pass
    try:
        import ray  # noqa: F401
        schemas.append(("ray", {"_target_", "ray"}))
    except ImportError:
        pass
    if not schemas:
        pytest.skip("no cluster launcher plugin installed (make setup-cluster)")
    for name, fields in schemas:
        keys = set(launcher_config(name).launcher.keys())
        assert keys <= fields, f"recbench/conf/hydra/launcher/{name}.yaml: unknown keys {sorted(keys - fields)}"
    if any(name == "ray" for name, _ in schemas):  # the remote options are ray.remote() task options
        from ray._common.ray_option_utils import task_options

        assert set(launcher_config("ray").launcher.ray.remote) <= set(task_options)


TOY_DATASET = """_target_: toy_protocol.ToyProtocol
rows: 60000
protocol: {batch_size: 128, embedding_dim: 8, bottom_mlp: [8], top_mlp: [8, 1], dense_learning_rate: 0.003,
           embedding_learning_rate: 0.1, max_epochs: 2, evals_per_epoch: 2, patience: 3}
"""


@pytest.mark.slow  # ~1-2 min on 2 shared cores: a local Ray instance, two jobs, one worker killed and re-run
def test_ray_sweep_records_every_job_once_when_a_worker_is_killed(tmp_path):
    pytest.importorskip("ray")
    pytest.importorskip("hydra_plugins.hydra_ray_launcher")
    from mlflow.tracking import MlflowClient

    (tmp_path / "conf" / "dataset").mkdir(parents=True)
    (tmp_path / "conf" / "dataset" / "toy.yaml").write_text(TOY_DATASET)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]),
               MLFLOW_TRACKING_URI=uri, RECBENCH_ARTIFACT_ROOT=str(tmp_path / "art"),
               RECBENCH_DATA_ROOT=str(tmp_path / "data"), RECBENCH_RUN_ROOT=str(tmp_path / "runs"),
               OMP_NUM_THREADS="1", RAY_USAGE_STATS_ENABLED="0")
    subprocess.run([sys.executable, "-c", "import toy_protocol, yaml, sys; from pathlib import Path; "
                    "toy_protocol.ToyProtocol(rows=60000).prepare(Path(sys.argv[1]))", str(tmp_path / "data")],
                   env=env, check=True, timeout=300)  # one cache before the two jobs start
    command = [sys.executable, "-m", "recbench.cli.train", "-m", "hydra/launcher=ray",
               f"hydra.searchpath=[file://{tmp_path / 'conf'}]", f"hydra.sweep.dir={tmp_path / 'sweep'}",
               "+hydra.launcher.ray.init.num_cpus=2", "+hydra.launcher.ray.init.include_dashboard=false",
               "hydra.launcher.ray.remote.num_cpus=1", "dataset=toy", "model=dlrm", "method=full,hashing",
               "budget.compression_ratio=0.5", "trainer.progress=false", "runtime.num_threads=1",
               "trainer.latency_repeats=1", "trainer.checkpoint_every_steps=20", "sweep_id=ray-test"]
    log = open(tmp_path / "sweep.log", "w")
    sweep = subprocess.Popen(command, env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True)
    killed = None
    deadline = time.time() + 300
    try:
        while killed is None and time.time() < deadline and sweep.poll() is None:
            time.sleep(0.2)
            for run_dir in (tmp_path / "runs").glob("*"):
                if (run_dir / "checkpoint.pt").is_file() and (run_dir / "run_id.txt").is_file():
                    run = MlflowClient(uri).get_run((run_dir / "run_id.txt").read_text().strip())
                    if run.info.status == "RUNNING" and run.data.tags.get("pid"):
                        killed = (run.info.run_id, int(run.data.tags["pid"]), run.data.tags["config_hash"])
                        os.kill(killed[1], signal.SIGKILL)  # the Ray worker executing this job
                        break
        assert killed is not None, "no job reached a checkpoint to kill: " + (tmp_path / "sweep.log").read_text()[-3000:]
        assert sweep.wait(timeout=600) == 0, (tmp_path / "sweep.log").read_text()[-3000:]
    finally:
        if sweep.poll() is None:
            os.killpg(sweep.pid, signal.SIGKILL)
    client = MlflowClient(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], "")
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs), [(r.info.status, r.data.tags) for r in runs]
    assert sorted(r.data.tags["method"] for r in runs) == ["full", "hashing"]
    again = next(r for r in runs if r.info.run_id == killed[0])  # the killed job resumed into its own run
    assert again.data.tags["resumed"] == "true" and again.data.tags["pid"] != str(killed[1])
    assert len({r.data.tags["config_hash"] for r in runs}) == 2


@pytest.mark.slow  # ~2-3 min on 2 shared cores: a joblib sweep, a worker killed, the sweep re-launched
def test_joblib_sweep_with_a_killed_worker_relaunched_loses_and_duplicates_nothing(toy_sweep):
    """SIGKILL of one joblib worker (the process running a job; its pid is in the run's tags) aborts
    the launch (loky's TerminatedWorkerError); the re-launched sweep skips what finished, resumes the
    killed job from its checkpoint into its own MLflow run and runs the rest: 6 jobs, 6 runs."""
    from mlflow.tracking import MlflowClient

    from test_sweep import finished_runs

    command, env, tmp = toy_sweep
    command = command + ["--jobs", "2", "dataset.rows=20000", "trainer.checkpoint_every_steps=10"]
    uri = env["MLFLOW_TRACKING_URI"]
    log = open(tmp / "first.log", "w")
    first = subprocess.Popen(command, env=env, cwd=tmp, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    killed = None
    deadline = time.time() + 400
    try:
        while killed is None and time.time() < deadline and first.poll() is None:
            time.sleep(0.2)
            for run_dir in (tmp / "runs").glob("*"):
                if (run_dir / "checkpoint.pt").is_file() and (run_dir / "run_id.txt").is_file():
                    run = MlflowClient(uri).get_run((run_dir / "run_id.txt").read_text().strip())
                    if run.info.status != "RUNNING" or not run.data.tags.get("pid"):
                        continue
                    # freeze the worker, then kill it only if its job is still unfinished: a toy job
                    # can end between the look above and the kill (was: flaky, "resumed" None)
                    pid = int(run.data.tags["pid"])
                    os.kill(pid, signal.SIGSTOP)
                    if MlflowClient(uri).get_run(run.info.run_id).info.status == "RUNNING":
                        killed = (run.info.run_id, pid)
                        os.kill(pid, signal.SIGKILL)  # one worker, not the launcher
                        break
                    os.kill(pid, signal.SIGCONT)
        assert killed is not None, (tmp / "first.log").read_text()[-3000:]
        first.wait(timeout=600)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    assert "TerminatedWorkerError" in (tmp / "first.log").read_text()
    done_before = len(finished_runs(uri))

    second = subprocess.run(command, env=env, cwd=tmp, capture_output=True, text=True, timeout=900)
    out = second.stdout + second.stderr
    assert second.returncode == 0, out[-3000:]
    assert f"before launch: {done_before} already FINISHED (will be skipped), {6 - done_before} to run" in out
    runs = finished_runs(uri)
    assert len(runs) == 6 and len({r.data.tags["config_hash"] for r in runs}) == 6
    again = next(r for r in runs if r.info.run_id == killed[0])
    assert again.data.tags.get("resumed") == "true"
    client = MlflowClient(uri)
    left = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])
            if r.info.status == "RUNNING"]
    assert left == []
