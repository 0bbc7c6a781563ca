"""Tracking at cluster scale: ``scripts/tracking_server.sh`` (``make tracking-server``) starts an MLflow
tracking server over a PostgreSQL backend, both on loopback; real recbench sweeps against it lose and
duplicate nothing: 4 parallel jobs are recorded once each, and a sweep killed mid-job and re-launched
skips what finished (by config hash), closes the killed job's run and runs the rest.

The server tests are slow (a PostgreSQL cluster and an MLflow server are started once for the module:
about 1 min on 2 loaded cores, then two sweeps) and skip when PostgreSQL's server binaries, the
``psycopg2`` driver (``make tracking-server`` installs it) or, as root, the ``postgres`` user are missing.
The sqlite counterparts are tests/cli/test_sweep.py."""
from __future__ import annotations

import glob
import importlib.util
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from toy_protocol import SWEEP_DATASET, sweep_preset

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "tracking_server.sh"
ARTIFACT_ROOT = "mlflow-artifacts:///recbench"  # artifacts go through the server (docs/tracking.md)
TOY_DATASET, TOY_PRESET = SWEEP_DATASET, sweep_preset("0,1,2")
#: one grid of 4 jobs (no reference point: a sweep launches its grids one after the other)
TOY4_PRESET = sweep_preset("0,1,2,3", reference=False)


def run_script(command: str, env: dict, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), command], env=env, capture_output=True, text=True, timeout=timeout)


def test_bad_settings_are_refused_in_one_line_before_anything_starts(tmp_path):
    env = dict(os.environ, TRACKING_SERVER_DIR=str(tmp_path / "ts"))
    for setting, value, message in [("PG_PORT", "54x", "PG_PORT=54x is not a port number"),
                                    ("MLFLOW_WORKERS", "0", "MLFLOW_WORKERS=0: allowed: 1 or more"),
                                    ("PG_DB", "Ml-flow", "PG_DB=Ml-flow: allowed: lower-case letters, digits and _")]:
        done = run_script("start", dict(env, **{setting: value}))
        assert done.returncode == 2 and done.stderr.strip() == f"tracking_server: error: {message}", done.stderr
    done = run_script("start", dict(env, PG_BIN=str(tmp_path / "nowhere")))
    assert done.returncode == 2 and "PostgreSQL's server binaries (initdb, pg_ctl) were not found" in done.stderr
    assert "apt-get install postgresql" in done.stderr and not (tmp_path / "ts").exists()
    done = run_script("restart", env)
    assert done.returncode == 2 and "usage:" in done.stderr


def test_both_servers_bind_to_loopback_unless_told_otherwise():
    """PostgreSQL always listens on 127.0.0.1 (only MLflow talks to it), MLflow by default (the
    listening sockets themselves are checked by the server tests below)."""
    text = SCRIPT.read_text()
    assert "listen_addresses = '127.0.0.1'" in text and "MLFLOW_HOST=${MLFLOW_HOST:-127.0.0.1}" in text
    assert text.count("--host \"$MLFLOW_HOST\"") == 1 and "postgresql+psycopg2://$PG_USER@127.0.0.1:" in text
    target = re.search(r"^tracking-server:.*?\n((?:\t.*\n)+)", (REPO / "Makefile").read_text(), re.M)
    assert target and "scripts/tracking_server.sh start" in target.group(1) and "0.0.0.0" not in target.group(1)


def postgres_missing() -> str | None:
    """Why the server tests cannot run here, or None."""
    found = os.environ.get("PG_BIN") or next(iter(sorted(glob.glob("/usr/lib/postgresql/*/bin"))), None)
    if not (found and os.access(os.path.join(found, "initdb"), os.X_OK)) and not shutil.which("initdb"):
        return "PostgreSQL's server binaries are not installed (apt-get install postgresql)"
    if importlib.util.find_spec("psycopg2") is None:
        return "the PostgreSQL driver psycopg2 is not installed (make tracking-server installs it)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root without a 'postgres' user to run PostgreSQL"
    if not (Path(sys.executable).parent / "mlflow").is_file():
        return "no mlflow command next to this Python"
    return None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def listening_addresses(port: int) -> set:
    """The local addresses with a socket LISTENing on ``port`` (from /proc/net/tcp and tcp6)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            address, hex_port = fields[1].split(":")
            if fields[3] == "0A" and int(hex_port, 16) == port:
                found.add(socket.inet_ntoa(bytes.fromhex(address)[::-1]) if len(address) == 8 else address)
    return found


@dataclass
class Server:
    uri: str
    pg_port: int
    folder: Path  # TRACKING_SERVER_DIR
    start_seconds: float


@pytest.fixture(scope="module")
def server():
    reason = postgres_missing()
    if reason:
        pytest.skip(reason)
    # not under pytest's tmp_path: it is private to root (0700) and PostgreSQL runs as 'postgres'
    base = Path(tempfile.mkdtemp(prefix="recbench-pg-"))
    base.chmod(0o755)
    pg_port, mlflow_port = free_port(), free_port()
    env = dict(os.environ, TRACKING_SERVER_DIR=str(base / "ts"), PG_PORT=str(pg_port), MLFLOW_PORT=str(mlflow_port),
               MLFLOW_WORKERS="2", MLFLOW_BIN=str(Path(sys.executable).parent / "mlflow"), START_TIMEOUT="300")
    try:
        started = time.time()
        done = run_script("start", env, timeout=400)
        assert done.returncode == 0, done.stdout + done.stderr + _tail(base / "ts" / "mlflow.log")
        uri = f"http://127.0.0.1:{mlflow_port}"
        assert f"export MLFLOW_TRACKING_URI={uri}" in done.stdout
        yield Server(uri, pg_port, base / "ts", time.time() - started)
    finally:
        stopped = run_script("stop", env, timeout=120)
        try:
            assert stopped.returncode == 0, stopped.stderr
            assert not listening_addresses(mlflow_port) and not listening_addresses(pg_port)
        finally:
            shutil.rmtree(base, ignore_errors=True)


def _tail(path: Path) -> str:
    return path.read_text()[-3000:] if path.is_file() else ""


@pytest.fixture
def sweep(server, tmp_path):
    """``recbench-sweep toy`` against the server, in a fresh working folder."""
    conf = tmp_path / "conf"
    (conf / "dataset").mkdir(parents=True)
    (conf / "sweep").mkdir()
    (conf / "dataset" / "toy.yaml").write_text(TOY_DATASET)
    (conf / "sweep" / "toy.yaml").write_text(TOY_PRESET)
    (conf / "sweep" / "toy4.yaml").write_text(TOY4_PRESET)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]),
               MLFLOW_TRACKING_URI=server.uri, RECBENCH_ARTIFACT_ROOT=ARTIFACT_ROOT,
               RECBENCH_DATA_ROOT=str(tmp_path / "data"), RECBENCH_RUN_ROOT=str(tmp_path / "runs"))
    command = [str(Path(sys.executable).parent / "recbench-sweep"), "toy", f"hydra.searchpath=[file://{conf}]",
               "--root", str(tmp_path / "sweeps")]
    return command, env, tmp_path


def runs_of(uri: str, sweep_id: str, status: str | None = None):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    found = client.search_runs(experiments, f"tags.sweep_id = '{sweep_id}'", max_results=1000)
    return [r for r in found if status is None or r.info.status == status]


def rows_in_postgres(server: Server, sweep_id: str) -> dict:
    """run id -> status, read from PostgreSQL itself (not through MLflow)."""
    import psycopg2

    with psycopg2.connect(host="127.0.0.1", port=server.pg_port, dbname="mlflow", user="mlflow",
                          passfile=str(server.folder / "pgpass"), connect_timeout=10) as connection:
        with connection.cursor() as cursor:
            cursor.execute("SELECT r.run_uuid, r.status FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid "
                           "WHERE t.key = 'sweep_id' AND t.value = %s", (sweep_id,))
            rows = dict(cursor.fetchall())
    connection.close()
    return rows


def most_at_once(runs) -> int:
    """The largest number of runs open at the same moment (from their start and end times)."""
    events = sorted([(r.info.start_time, 1) for r in runs] + [(r.info.end_time, -1) for r in runs])
    open_, most = 0, 0
    for _, change in events:
        open_ += change
        most = max(most, open_)
    return most


def counts(text: str) -> dict:
    line = re.findall(r"this launch:.*", text)[-1]
    return {k: int(v) for k, v in re.findall(r"(finished|skipped|infeasible|failed) (\d+)", line)}


@pytest.mark.slow  # ~1 min for the server (once per module), then 4 toy jobs at once on 2 shared cores
def test_four_parallel_jobs_on_the_postgresql_server_are_each_recorded_once(server, sweep):
    command, env, tmp = sweep
    assert listening_addresses(server.pg_port) == {"127.0.0.1"}  # loopback only, both of them
    assert listening_addresses(int(server.uri.rsplit(":", 1)[1])) == {"127.0.0.1"}
    command[1] = "toy4"
    started = time.time()
    done = subprocess.run(command + ["--jobs", "4", "--sweep-id", "pg-parallel"], env=env, cwd=tmp,
                          capture_output=True, text=True, timeout=900)
    wall = time.time() - started
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-3000:]
    assert ": 4 jobs in 1 grid(s)" in out and counts(out) == {"finished": 4, "skipped": 0, "infeasible": 0,
                                                                "failed": 0}, out[-2000:]
    every = runs_of(server.uri, "pg-parallel")
    hashes = [r.data.tags["config_hash"] for r in every]
    assert len(every) == 4 and len(set(hashes)) == 4 and all(r.info.status == "FINISHED" for r in every)
    assert sorted((r.data.tags["method"], r.data.tags["seed"]) for r in every) == [("hashing", s) for s in "0123"]
    assert all("test/auc" in r.data.metrics for r in every)
    # the runs are rows of PostgreSQL, and their artifacts went through the server to its folder
    assert rows_in_postgres(server, "pg-parallel") == {r.info.run_id: "FINISHED" for r in every}
    for run in every:
        assert run.info.artifact_uri.startswith("mlflow-artifacts:/recbench/")
        assert list(server.folder.glob(f"artifacts/recbench/*/{run.info.run_id}/artifacts/config.yaml"))
    at_once = most_at_once(every)
    assert at_once >= 2, "the jobs did not overlap: not a parallel test"
    print(f"\nfigures: server start {server.start_seconds:.0f} s; 4 jobs (--jobs 4, {at_once} open at once), "
          f"{len(every)} runs recorded, {len(hashes) - len(set(hashes))} duplicates, sweep wall {wall:.0f} s")


@pytest.mark.slow  # ~2-4 min on 2 shared cores: one launch killed mid-job, then the re-launch with 4 jobs
def test_a_killed_sweep_relaunched_against_the_server_loses_and_duplicates_nothing(server, sweep):
    command, env, tmp = sweep
    command = command + ["dataset.rows=1600", "--sweep-id", "pg-killed"]  # its own protocol: no run shared
    log = open(tmp / "first.log", "w")
    started = time.time()
    first = subprocess.Popen(command + ["--jobs", "1"], env=env, cwd=tmp, stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True)
    killed = None
    deadline = time.time() + 600
    try:
        while killed is None and time.time() < deadline and first.poll() is None:
            time.sleep(1)
            if len(runs_of(server.uri, "pg-killed", "FINISHED")) < 2:
                continue
            running = runs_of(server.uri, "pg-killed", "RUNNING")
            if not running:
                continue
            os.killpg(first.pid, signal.SIGSTOP)  # freeze the sweep; kill it only if the job is still open
            if runs_of(server.uri, "pg-killed", "RUNNING"):
                killed = running[0].info.run_id
                os.killpg(first.pid, signal.SIGKILL)  # the whole sweep, mid-job (launcher, Hydra, job)
            else:
                os.killpg(first.pid, signal.SIGCONT)
        assert killed is not None, "no job to kill mid-run: " + (tmp / "first.log").read_text()[-3000:]
        first.wait(timeout=60)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait()
    done_before = len(runs_of(server.uri, "pg-killed", "FINISHED"))
    total = 6  # hashing x seeds 0-2, then the `full` reference with the same seeds
    assert 2 <= done_before < total
    assert [r.info.run_id for r in runs_of(server.uri, "pg-killed", "RUNNING")] == [killed]

    second = subprocess.run(command + ["--jobs", "4"], env=env, cwd=tmp, capture_output=True, text=True, timeout=900)
    wall = time.time() - started
    out = second.stdout + second.stderr
    assert second.returncode == 0, out[-3000:]
    assert f": {total} jobs in 2 grid(s)" in out
    assert f"before launch: {done_before} already FINISHED (will be skipped), {total - done_before} to run" in out
    assert "closed 1 run(s) left RUNNING by killed processes" in out, out[-2000:]
    assert counts(out) == {"finished": total - done_before, "skipped": done_before, "infeasible": 0, "failed": 0}
    finished = runs_of(server.uri, "pg-killed", "FINISHED")
    hashes = [r.data.tags["config_hash"] for r in finished]
    assert len(finished) == total and len(set(hashes)) == total  # every job once: nothing re-run, nothing lost
    others = [r for r in runs_of(server.uri, "pg-killed") if r.info.status != "FINISHED"]
    from mlflow.tracking import MlflowClient

    again = MlflowClient(server.uri).get_run(killed)
    if again.info.status == "FINISHED":  # the killed job resumed from its checkpoint into its own run
        assert again.data.tags.get("resumed") == "true" and others == []
        outcome = "resumed into its own run"
    else:  # no checkpoint yet: its run stays KILLED with the reason, and the job ran again, once
        assert [(r.info.run_id, r.info.status) for r in others] == [(killed, "KILLED")]
        assert "ended without closing its run" in others[0].data.tags["status_reason"]
        assert others[0].data.tags["config_hash"] in hashes
        outcome = "its run left KILLED, the job run again"
    assert rows_in_postgres(server, "pg-killed") == {r.info.run_id: r.info.status for r in finished + others}
    print(f"\nfigures: {total} jobs, killed after {done_before} finished with 1 job open (closed KILLED by the "
          f"re-launch, then {outcome}); re-launch with --jobs 4: {len(finished)} FINISHED runs, "
          f"{len(hashes) - len(set(hashes))} duplicates, wall {wall:.0f} s")


def _writer(uri: str, worker: int, runs: int) -> int:
    """One process writing ``runs`` runs (150 params, 20 metrics x 10 steps each) through the server."""
    from recbench.tracking.mlflow_tracker import MLflowTracker

    tracker = MLflowTracker(uri, ARTIFACT_ROOT)
    for i in range(runs):
        tracker.start_run("pg-writers", f"w{worker}-{i}", {"method": "m", "worker": str(worker)},
                          {f"p{k}": k for k in range(150)})
        for step in range(10):
            tracker.log_metrics({f"m{k}": step * k for k in range(20)}, step=step)
        tracker.set_tags({"status": "finished"})
        tracker.end_run()
    return worker


@pytest.mark.slow  # ~1-2 min on 2 shared cores: 4 processes start (importing MLflow) and write at once
def test_four_parallel_writers_lose_no_run_and_no_value_on_the_server(server):
    """The 4-writer race of tests/cli/test_sweep.py (SQLite) against the server: one experiment created
    by whichever writer comes first, every run, param and metric step kept."""
    from joblib import Parallel, delayed
    from mlflow.tracking import MlflowClient

    done = Parallel(n_jobs=4, backend="loky")(delayed(_writer)(server.uri, w, 3) for w in range(4))
    assert sorted(done) == [0, 1, 2, 3]
    client = MlflowClient(server.uri)
    experiments = [e.experiment_id for e in client.search_experiments() if e.name == "pg-writers"]
    assert len(experiments) == 1
    runs = client.search_runs(experiments, max_results=1000)
    assert len(runs) == 12 and len({r.info.run_name for r in runs}) == 12
    assert all(r.info.status == "FINISHED" and len(r.data.params) == 150 and len(r.data.metrics) == 20 for r in runs)
    assert all([m.step for m in client.get_metric_history(r.info.run_id, "m7")] == list(range(10)) for r in runs)
    print(f"\nfigures: 4 writer processes x 3 runs: {len(runs)} runs recorded, 0 duplicates, "
          f"{most_at_once(runs)} open at once")
