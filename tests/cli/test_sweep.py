"""Sweep bookkeeping: parallel writers on one SQLite store lose nothing; a killed sweep, re-launched,
skips its finished jobs and completes; the preset grid covers every registered method."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from toy_protocol import SWEEP_DATASET, sweep_preset

from recbench.runs.sweep_launch import hydra_command, job_environment, job_threads
from recbench.runs.sweep_plan import build_plan, default_sweep_id, presets

REPO = Path(__file__).resolve().parents[2]
METHODS = sorted(p.stem for p in (REPO / "recbench" / "conf" / "method").glob("*.yaml"))
TOY_DATASET, TOY_PRESET = SWEEP_DATASET, sweep_preset("0,1,2")


@pytest.fixture
def toy_sweep(tmp_path):
    conf = tmp_path / "conf"
    (conf / "dataset").mkdir(parents=True)
    (conf / "sweep").mkdir()
    (conf / "dataset" / "toy.yaml").write_text(TOY_DATASET)
    (conf / "sweep" / "toy.yaml").write_text(TOY_PRESET)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]),
               MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path}/mlflow.db", RECBENCH_ARTIFACT_ROOT=str(tmp_path / "art"),
               RECBENCH_DATA_ROOT=str(tmp_path / "data"), RECBENCH_RUN_ROOT=str(tmp_path / "runs"))
    command = [str(Path(sys.executable).parent / "recbench-sweep"), "toy", f"hydra.searchpath=[file://{conf}]",
               "--root", str(tmp_path / "sweeps")]
    return command, env, tmp_path


def finished_runs(uri):
    from recbench.tracking.mlflow_tracker import init_store

    client = init_store(uri)  # under the store lock: the sweep may be creating the schema right now
    experiments = [e.experiment_id for e in client.search_experiments()]
    return [r for r in client.search_runs(experiments, "tags.method != ''", max_results=1000)
            if r.info.status == "FINISHED"]


def _writer(uri: str, art: str, worker: int, runs: int) -> int:
    from recbench.tracking.mlflow_tracker import MLflowTracker

    tracker = MLflowTracker(uri, art)
    for i in range(runs):
        tracker.start_run("shared-experiment", f"w{worker}-{i}", {"method": "m", "worker": str(worker)},
                          {f"p{k}": k for k in range(150)})
        for step in range(10):
            tracker.log_metrics({f"m{k}": step * k for k in range(20)}, step=step)
        tracker.set_tags({"status": "finished"})
        tracker.end_run()
    return worker


@pytest.mark.slow  # ~32 s; the same guarantee on the PostgreSQL server: tests/tracking/test_postgres_server.py (slow too)
def test_four_parallel_joblib_writers_lose_no_run_on_one_sqlite_store(tmp_path):
    from joblib import Parallel, delayed

    uri = f"sqlite:///{tmp_path}/fresh.db"  # fresh: schema creation and experiment creation race too
    done = Parallel(n_jobs=4, backend="loky")(delayed(_writer)(uri, str(tmp_path / "art"), w, 3) for w in range(4))
    assert sorted(done) == [0, 1, 2, 3]
    runs = finished_runs(uri)
    assert len(runs) == 12 and len({r.info.run_name for r in runs}) == 12
    assert all(len(r.data.metrics) == 20 and len(r.data.params) == 150 for r in runs)
    from mlflow.tracking import MlflowClient

    assert [e.name for e in MlflowClient(uri).search_experiments()].count("shared-experiment") == 1


def test_leaderboard_presets_cover_every_registered_method():
    for preset in ("leaderboard_synthetic", "leaderboard_movielens100k"):
        plan = build_plan(preset, [])
        grid_methods = {o.split("=", 1)[1] for g in plan.grids for job in g.jobs for o in job if o.startswith("method=")}
        assert grid_methods == set(METHODS)
        assert plan.jobs_total == (len(METHODS) - 1) * 6 * 3 + 3
        ratios = {o.split("=", 1)[1] for job in plan.grids[0].jobs for o in job if o.startswith("budget.compression_ratio=")}
        assert ratios == {"0.5", "0.2", "0.1", "0.05", "0.01", "0.001"}
    assert {"smoke", "demo", "leaderboard_synthetic", "leaderboard_movielens100k"} <= set(presets())
    smoke = build_plan("smoke", [])
    assert smoke.jobs_total == len(METHODS)  # every method once (+ full as the reference)
    assert default_sweep_id("demo", ["seed=1"]) == default_sweep_id("demo", ["seed=1"]) != default_sweep_id("demo", [])
    # launcher, threads and progress do not change the numbers: the same sweep continues
    assert default_sweep_id("demo", ["seed=1", "hydra/launcher=ray", "runtime.num_threads=1",
                                     "trainer.progress=false", "tracking.tracking_uri=x"]) == default_sweep_id("demo", ["seed=1"])


def test_thread_count_per_parallel_job_reaches_the_jobs_as_config():
    assert job_threads(4) == max(1, len(os.sched_getaffinity(0)) // 4)
    assert job_threads(1, ["seed=0", "runtime.num_threads=3"]) == 3  # a user's choice stands
    env = job_environment(job_threads(4), base={})
    assert env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == str(job_threads(4))
    assert not any(name.startswith("RECBENCH_") for name in env)
    plan = build_plan("demo", [], "demo-x")
    command = hydra_command(plan, plan.grids[0], 2, Path("/tmp/sweeps"))
    assert "sweep_id=demo-x" in command and f"runtime.num_threads={job_threads(2)}" in command
    user = build_plan("demo", ["runtime.num_threads=1"], "demo-y")
    threads = [o for o in hydra_command(user, user.grids[0], 2, Path("/tmp/sweeps")) if o.startswith("runtime.num_threads=")]
    assert threads == ["runtime.num_threads=1"]


def test_plan_counts_jobs_already_finished(toy_sweep, monkeypatch):
    """The pre-launch count of a re-launched sweep: FINISHED jobs (same config hash) are skipped."""
    from omegaconf import OmegaConf

    from recbench.runs.job import run_job
    from recbench.runs.sweep_launch import summary
    from recbench.runs.sweep_plan import _job_configs, check_plan

    command, env, tmp = toy_sweep
    for key in ("MLFLOW_TRACKING_URI", "RECBENCH_ARTIFACT_ROOT", "RECBENCH_DATA_ROOT", "RECBENCH_RUN_ROOT"):
        monkeypatch.setenv(key, env[key])
    overrides = [command[2]]
    plan = check_plan(build_plan("toy", overrides))
    assert (plan.jobs_total, plan.already_finished) == (6, 0)
    (job, cfg), = [(j, c) for j, c in _job_configs(plan.grids[0].jobs) if "seed=1" in j]
    cfg = OmegaConf.merge(cfg, {"trainer": {"max_steps": 5}})
    assert run_job(cfg).status == "finished"
    assert check_plan(build_plan("toy", overrides)).already_finished == 0  # max_steps changed the config hash
    (job, cfg), = [(j, c) for j, c in _job_configs(plan.grids[0].jobs) if "seed=1" in j]
    assert run_job(cfg).status == "finished"
    again = check_plan(build_plan("toy", overrides))
    assert (again.jobs_total, again.already_finished) == (6, 1)
    # the 2 hashing jobs left are priced by the finished one (the max_steps=5 run is another protocol)
    latest = max(finished_runs(env["MLFLOW_TRACKING_URI"]), key=lambda r: r.info.start_time)
    assert (again.estimated_jobs, dict(again.unestimated)) == (2, {"full": 3})
    assert again.estimated_cpu_seconds == pytest.approx(2 * latest.data.metrics["run/cpu_seconds"])
    assert "not estimated (no finished run of the method on this protocol): full x3" in summary(again)
    assert run_job(cfg).status == "skipped"
    # the store is lost, its runs were exported: imported into a new store, the job is still skipped
    from recbench.reporting.import_records import main as import_main
    from recbench.reporting.runs import load_mlflow_runs, save_records

    save_records(load_mlflow_runs(env["MLFLOW_TRACKING_URI"]), tmp / "runs.json")
    fresh = f"sqlite:///{tmp}/fresh.db"
    assert import_main([str(tmp / "runs.json"), "--tracking-uri", fresh, "--artifact-root", str(tmp / "art2")]) == 0
    monkeypatch.setenv("MLFLOW_TRACKING_URI", fresh)
    carried = check_plan(build_plan("toy", overrides))
    assert (carried.jobs_total, carried.already_finished) == (6, 1)
    (job, cfg), = [(j, c) for j, c in _job_configs(carried.grids[0].jobs) if "seed=1" in j]
    assert cfg.tracking.tracking_uri == fresh and run_job(cfg).status == "skipped"


def test_plan_sets_apart_the_jobs_the_budget_solver_rejects_and_the_job_agrees(toy_sweep, monkeypatch):
    """Jobs whose method cannot meet the budget are counted apart and not priced; the job itself
    reaches the same verdict and records an infeasible run."""
    from omegaconf import OmegaConf

    from recbench.runs.job import run_job
    from recbench.runs.sweep_launch import summary
    from recbench.runs.sweep_plan import _job_configs, check_plan

    command, env, tmp = toy_sweep
    for key in ("MLFLOW_TRACKING_URI", "RECBENCH_ARTIFACT_ROOT", "RECBENCH_DATA_ROOT", "RECBENCH_RUN_ROOT"):
        monkeypatch.setenv(key, env[key])
    # ptq at 0.32 on the toy tables: its best bit widths under the budget reach 0.2828 < 0.9 x 0.32,
    # a feasible job (priced like any other) that runs flagged under_budget
    plan = check_plan(build_plan("toy", [command[2], "method=ptq", "budget.compression_ratio=0.5,0.32,0.001"]))
    assert (plan.jobs_total, plan.already_finished, dict(plan.infeasible)) == (12, 0, {"ptq": 3})
    assert dict(plan.under_budget) == {"ptq": 3}
    assert dict(plan.unestimated) == {"ptq": 6, "full": 3}  # the feasible ones only
    text = summary(plan, jobs=2)
    assert ("of these, 3 infeasible by the method's budget solver (each recorded as an infeasible run in "
            "seconds): ptq x3") in text and "not estimated (no finished run of the method on this protocol): " \
        "full x3, ptq x6" in text
    assert "3 run under budget (the method's best configuration under the budget lands below (1 - tolerance) x " \
        "the target; tagged under_budget=true): ptq x3" in text
    (job, cfg), = [(j, c) for j, c in _job_configs(plan.grids[0].jobs) if "seed=0" in j and "budget.compression_ratio=0.001" in j]
    result = run_job(OmegaConf.merge(cfg, {"trainer": {"max_steps": 5}}))
    assert result.status == "infeasible" and "cannot reach compression_ratio=0.001" in result.reason
    # a solver that fails for another reason (ptq needs D % 8 == 0) leaves the job to fail and be
    # recorded on its own: the plan goes on and prices it like any other
    broken = check_plan(build_plan("toy", [command[2], "method=ptq", "budget.compression_ratio=0.5",
                                           "model.embedding_dim=12"]))
    assert (dict(broken.infeasible), dict(broken.unestimated), dict(broken.under_budget)) == ({}, {"ptq": 3, "full": 3}, {})


def test_cost_book_prices_by_method_protocol_and_budget():
    """The median CPU seconds of finished runs of the same method and protocol at the same budget,
    else at any budget; infeasible runs (seconds long) and other protocols do not count."""
    from recbench.runs.sweep_launch import cost_line
    from recbench.runs.sweep_plan import CostBook, SweepPlan as Plan

    book = CostBook()
    for status, protocol, method, ratio, seconds in [
            ("finished", "p/1", "qr", "0.1", 100.0), ("finished", "p/1", "qr", "0.1", 300.0),
            ("finished", "p/1", "qr", "0.1", 120.0), ("finished", "p/1", "qr", "0.01", 50.0),
            ("infeasible", "p/1", "qr", "0.001", 0.5), ("finished", "p/2", "qr", "0.1", 9.0)]:
        book.add({"status": status, "protocol": protocol, "method": method, "compression_ratio": ratio,
                  "config_hash": f"{method}{ratio}{seconds}"}, {"run/cpu_seconds": seconds})
    assert book.estimate("p/1", "qr", 0.1) == 120.0  # median of 100, 120, 300
    assert book.estimate("p/1", "qr", 0.001) == 110.0  # no finished run at 0.001: median at any budget
    assert book.estimate("p/2", "qr", 0.5) == 9.0 and book.estimate("p/1", "dhe", 0.1) is None
    assert len(book.hashes) == 6  # every FINISHED run counts as done, infeasible ones too
    plan = Plan("x", "x", [], estimated_cpu_seconds=7200.0, estimated_jobs=3)
    assert cost_line(plan, 1).startswith("estimated 2.0 h CPU for 3 job(s), about 2.0 h wall at 1 parallel job(s)")


def test_periodic_export_writes_the_plans_experiments_atomically_and_outlives_a_failed_export(tmp_path):
    """``--export``: the records of the plan's experiments only, rewritten at each tick and at the
    end; a failing export is reported and the sweep (here: the with-block) goes on."""
    from recbench.runs.sweep_launch import PeriodicExport
    from recbench.reporting.runs import load_records
    from recbench.tracking.mlflow_tracker import MLflowTracker

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = MLflowTracker(uri, str(tmp_path / "art"))
    for experiment, method in (("exp-a", "hashing"), ("exp-a", "qr"), ("exp-b", "full")):
        tracker.start_run(experiment, method, {"method": method, "status": "finished"}, {"seed": 0})
        tracker.log_metrics({"test/auc": 0.7})
        tracker.end_run()
    lines = []
    with PeriodicExport({uri: ["exp-a"]}, tmp_path / "runs.json", minutes=0.002, log=lines.append) as exporter:
        deadline = time.time() + 30
        while exporter.exports < 2 and time.time() < deadline:
            time.sleep(0.05)
    assert exporter.exports >= 3, lines  # two ticks at least, then the one at the end
    records = load_records(tmp_path / "runs.json")
    assert sorted(r["method"] for r in records) == ["hashing", "qr"] and {r["experiment"] for r in records} == {"exp-a"}
    assert records[0]["metrics"] == {"test/auc": 0.7}
    assert re.search(r"exported 2 run record\(s\) \(finished 2\) to .*runs\.json$", lines[-1])
    assert not [p.name for p in tmp_path.iterdir() if "partial" in p.name]  # no half-written file left

    lines.clear()
    with PeriodicExport({uri: ["exp-a"]}, tmp_path / "gone" / "runs.json", minutes=60, log=lines.append) as failing:
        pass
    assert failing.exports == 0 and len(lines) == 1
    assert "failed (FileNotFoundError" in lines[0] and lines[0].endswith("the sweep goes on")


@pytest.mark.parametrize("target, options, message", [
    ("runs.json", ["--no-check"], "--export needs the pre-launch check"),
    ("runs.json", ["--export-every", "0"], "--export-every > 0 (got 0.0)"),
    ("runs.json", ["--export-every", "-5"], "(got -5.0)"),
    ("no/runs.json", [], "folder {tmp}/no does not exist"),
])
def test_export_options_are_checked_before_anything_runs(tmp_path, capsys, target, options, message):
    from recbench.cli.sweep import main

    assert main(["smoke", "--export", str(tmp_path / target), *options]) == 2
    assert message.format(tmp=tmp_path) in capsys.readouterr().err and not list(tmp_path.iterdir())


@pytest.mark.parametrize("jobs", ["0", "-2"])
def test_a_job_count_below_one_is_refused_before_anything_runs(tmp_path, capsys, jobs):
    from recbench.cli.sweep import main

    assert main(["smoke", "--jobs", jobs, "--root", str(tmp_path / "sweeps")]) == 2
    assert f"--jobs {jobs}: needs 1 or more parallel jobs" in capsys.readouterr().err and not list(tmp_path.iterdir())


def test_a_job_count_that_is_not_a_number_is_one_line_naming_what_is_allowed(tmp_path, capsys):
    from recbench.cli.sweep import main

    with pytest.raises(SystemExit) as exit_:
        main(["smoke", "--jobs", "abc", "--root", str(tmp_path / "sweeps")])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1 and "'abc' is not a whole number; allowed: 1 or more" in err[0]
    assert not list(tmp_path.iterdir())


def _counts(text: str) -> dict:
    line = re.findall(r"this launch:.*", text)[-1]
    return {k: int(v) for v, k in [(m[1], m[0]) for m in re.findall(r"(finished|skipped|infeasible|failed) (\d+)", line)]}


@pytest.mark.slow  # ~55 s on 2 cores: two launches, Hydra + 4 joblib workers (the acceptance scenario)
def test_killed_sweep_relaunched_skips_finished_jobs_and_parallel_jobs_lose_no_run(toy_sweep):
    command, env, tmp = toy_sweep
    uri = env["MLFLOW_TRACKING_URI"]
    log = open(tmp / "first.log", "w")
    first = subprocess.Popen(command + ["--jobs", "1"], env=env, cwd=tmp, stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and first.poll() is None:
        time.sleep(1)
        if (tmp / "mlflow.db").exists() and len(finished_runs(uri)) >= 2:
            break
    os.killpg(first.pid, signal.SIGKILL)  # kill the whole sweep halfway (launcher, Hydra, job)
    first.wait()
    done_before = len(finished_runs(uri))
    total = 6  # hashing x seeds 0-2, then the `full` reference with the same seeds
    assert 1 <= done_before < total, (tmp / "first.log").read_text()[-3000:]

    second = subprocess.run(command + ["--jobs", "4", "--export", str(tmp / "runs.json")], env=env, cwd=tmp,
                            capture_output=True, text=True, timeout=400)
    out = second.stdout + second.stderr
    assert second.returncode == 0, out[-3000:]
    assert f": {total} jobs in 2 grid(s)" in out
    assert f"before launch: {done_before} already FINISHED (will be skipped), {total - done_before} to run" in out
    counts = _counts(out)
    assert counts["skipped"] == done_before and counts["finished"] == total - done_before, out[-2000:]
    runs = finished_runs(uri)
    hashes = [r.data.tags["config_hash"] for r in runs]
    assert len(runs) == total and len(set(hashes)) == total  # every job once: nothing re-run, nothing lost
    assert {r.data.tags["sweep_id"] for r in runs} == {default_sweep_id("toy", [command[2]])}
    assert sorted(r.data.tags["seed"] for r in runs if r.data.tags["method"] == "hashing") == ["0", "1", "2"]
    assert all(r.data.tags["command"].startswith("recbench ") for r in runs)
    # --export: the records at the end of the launch, every run of the sweep's experiment
    from recbench.reporting.runs import load_records

    exported = load_records(tmp / "runs.json")
    assert sorted(r["config_hash"] for r in exported if r["status"] == "finished") == sorted(hashes)
    assert re.search(rf"exported {len(exported)} run record\(s\) .* to .*runs\.json", out), out[-2000:]
    # the job killed mid-run left its MLflow run RUNNING; the relaunch closed it as KILLED with a reason
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    others = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])
              if r.info.status != "FINISHED"]
    assert all(r.info.status == "KILLED" and "ended without closing its run" in r.data.tags["status_reason"]
               for r in others), [(r.info.status, r.data.tags.get("status_reason")) for r in others]
    if others:
        assert f"closed {len(others)} run(s) left RUNNING by killed processes" in out


@pytest.mark.parametrize("isolate", [False, pytest.param(True, marks=pytest.mark.slow)])  # ~40 s each on 2 cores
def test_grids_run_in_the_planners_process_unless_isolated(toy_sweep, isolate):
    """Default: both grids (main and the `full` reference) run inside the recbench-sweep process, so
    imports and the store's setup are paid once; --isolate: one recbench process per grid."""
    command, env, tmp = toy_sweep
    done = subprocess.run(command + ["seed=0", "--jobs", "1", *(["--isolate"] if isolate else [])], env=env, cwd=tmp,
                          capture_output=True, text=True, timeout=300)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-3000:]
    assert _counts(out)["finished"] == 2, out[-2000:]
    runs = finished_runs(env["MLFLOW_TRACKING_URI"])
    assert sorted(r.data.tags["method"] for r in runs) == ["full", "hashing"]
    pids = {r.data.tags["pid"] for r in runs}
    assert len(pids) == (2 if isolate else 1), pids
    assert "hydra/sweeper=recbench_planned" in out  # the planner composed the jobs: Hydra does not again


def test_options_may_follow_the_preset_and_its_overrides(capsys):
    from recbench.cli.sweep import main

    assert main(["smoke", "--dry-run", "runtime.num_threads=1", "--no-check"]) == 0
    out = capsys.readouterr().out
    assert "sweep smoke" in out and "runtime.num_threads=1" in out


def test_a_sweep_override_replaces_the_presets_axis_and_the_reference_point_wins():
    plan = build_plan("leaderboard_synthetic", ["method=hashing,qr", "seed=0"])
    main, reference = plan.grids
    assert len(main.jobs) == 2 * 6 and {o for job in main.jobs for o in job if o.startswith("method=")} == {
        "method=hashing", "method=qr"}
    assert [o for o in reference.overrides if o.startswith("method=")] == ["method=full"]
    assert plan.jobs_total == 13


def test_planned_job_configs_equal_a_direct_composition_of_each_job():
    """The planner composes once per set of config choices and applies each job's values after it:
    every job's config equals Hydra composing that job alone."""
    from omegaconf import OmegaConf

    from recbench.runs.sweep_plan import _compose, _job_configs

    for preset, extra in [("demo", []), ("leaderboard_movielens100k", ["method=hashing,optembed", "seed=0,2"])]:
        plan = build_plan(preset, extra)
        jobs = [job for grid in plan.grids for job in grid.jobs]
        planned = list(_job_configs(jobs))
        assert [job for job, _ in planned] == jobs and len(jobs) > 4
        for job, cfg in planned:
            assert OmegaConf.to_container(cfg) == OmegaConf.to_container(_compose(job)), job


def test_a_grid_value_the_configs_refuse_is_one_line_naming_the_job(tmp_path, capsys):
    from recbench.cli.sweep import main

    assert main(["demo", "trainer.nonexistent_key=1,2", "--dry-run", "--root", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "trainer.nonexistent_key=1` does not compose: Could not override 'trainer.nonexistent_key'" in err[0]
