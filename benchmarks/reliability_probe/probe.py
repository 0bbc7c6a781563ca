"""Fault and bad-input probe of recbench (issue #31): process kills, damaged checkpoints and caches,
an unusable store, concurrent launches, leftover temporary files, injected tags, and bad settings,
data files and command-line values, each run through the real command-line tools of a source tree.

    python benchmarks/reliability_probe/probe.py --tree /tmp/probe/src --scratch /tmp/probe/run

Every case runs in its own scratch folder (its own MLflow SQLite store, data root and run root) and
records what was done, what was expected, what was observed (exit codes, the non-log stderr lines,
the store's runs per config hash and status, leftover temporary files) and a verdict. Results:
``<scratch>/results.json`` and ``<scratch>/results.md``.

References: issue #31 (the defects and the probe this re-measures); docs/robustness.md.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Callable, Dict, List, Optional

DATA = ["dataset=synthetic", "dataset.rows=20000"]
TRAINER = ["runtime.num_threads=1", "trainer.progress=false", "trainer.latency_repeats=1"]
#: a tiny job: a few steps, done in seconds
BASE = DATA + TRAINER + ["method=hashing", "budget.compression_ratio=0.5", "trainer.max_steps=10"]
#: a job long enough to be killed at a chosen point: 200 steps of 64 rows, a checkpoint every 25
LONG = DATA + TRAINER + ["method=hashing", "budget.compression_ratio=0.5", "trainer.batch_size=64",
                         "trainer.max_steps=200", "trainer.patience=100", "trainer.checkpoint_every_steps=25"]
#: the sweep every sweep case runs (3 jobs: hashing and qr at 0.5, plus the `full` reference)
SWEEP = ["demo", "--jobs", "1", *DATA, "method=hashing,qr", "budget.compression_ratio=0.5",
         "trainer.max_steps=10", "runtime.num_threads=1", "trainer.latency_repeats=1"]
DEAD_PID = 999999
PYTHON: List[Path] = []  # the venv's interpreter (set by main)
LOG_LINE = re.compile(r"^\[\d{4}-\d\d-\d\d ")
HINTS = ("set RECBENCH_DEBUG=1", "Set the environment variable HYDRA_FULL_ERROR=1")
ALLOWED = re.compile(r"allowed|must|available|expected|needs|give|one of|more than|>=|\bin \[|\bin \(|run `|check|set |"
                     r"not a|no data|does not exist|not found|no such|invalid choice|usage", re.I)


class Probe:
    def __init__(self, tree: Path, scratch: Path, bin_dir: Path, movielens_raw: Optional[Path]):
        self.tree, self.scratch, self.bin, self.movielens_raw = tree, scratch, bin_dir, movielens_raw
        self.template: Optional[Path] = None

    def case_dir(self, name: str) -> "Case":
        return Case(self, self.scratch / "cases" / name)

    def build_template(self) -> Path:
        """A data root with the synthetic cache, and a store with one FINISHED BASE run."""
        if self.template is None:
            case = Case(self, self.scratch / "template")
            if not (case.dir / "mlflow.db").exists():
                case.run("recbench", BASE, timeout=600, check=True)
            self.template = case.dir
        return self.template


class Case:
    def __init__(self, probe: Probe, directory: Path, uri: Optional[str] = None):
        self.probe, self.dir = probe, directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.db = self.dir / "mlflow.db"
        self.env = dict(os.environ, PYTHONPATH=str(probe.tree), OMP_NUM_THREADS="1",
                        MLFLOW_TRACKING_URI=uri or f"sqlite:///{self.db}",
                        RECBENCH_DATA_ROOT=str(self.dir / "data"), RECBENCH_RUN_ROOT=str(self.dir / "runs"),
                        RECBENCH_ARTIFACT_ROOT=str(self.dir / "mlartifacts"))
        self.env.pop("RECBENCH_SWEEP_ID", None)
        self.calls: List[dict] = []
        self.n = 0

    # --- setup ---------------------------------------------------------------------------------
    def from_template(self, store: bool = True) -> "Case":
        template = self.probe.build_template()
        shutil.copytree(template / "data", self.dir / "data", symlinks=True)
        if store:
            shutil.copy2(template / "mlflow.db", self.db)
            with sqlite3.connect(str(self.db)) as con:  # artifacts of this case's runs go to its own folder
                con.execute("update experiments set artifact_location = replace(artifact_location, ?, ?)",
                            (str(template / "mlartifacts"), str(self.dir / "mlartifacts")))
            shutil.copytree(template / "mlartifacts", self.dir / "mlartifacts")
            shutil.copytree(template / "runs", self.dir / "runs")
        return self

    # --- processes -----------------------------------------------------------------------------
    def command(self, tool: str, args: List[str]) -> List[str]:
        return [str(self.probe.bin / tool), *args]

    def start(self, tool: str, args: List[str], env: Optional[dict] = None, preexec=None) -> dict:
        self.n += 1
        out, err = self.dir / f"call{self.n}.out", self.dir / f"call{self.n}.err"
        cmd = self.command(tool, args)
        proc = subprocess.Popen(cmd, cwd=self.dir, env=env or self.env, stdout=out.open("w"), stderr=err.open("w"),
                                start_new_session=True, preexec_fn=preexec)
        call = {"cmd": " ".join([tool, *args]), "proc": proc, "out": out, "err": err, "t0": time.time()}
        self.calls.append(call)
        return call

    def wait(self, call: dict, timeout: float = 900) -> dict:
        try:
            call["proc"].wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(call["proc"].pid, signal.SIGKILL)
            call["proc"].wait()
            call["timeout"] = True
        call["rc"] = call["proc"].returncode
        call["seconds"] = round(time.time() - call["t0"], 1)
        return call

    def run(self, tool: str, args: List[str], timeout: float = 900, check: bool = False, env=None, preexec=None) -> dict:
        call = self.wait(self.start(tool, args, env=env, preexec=preexec), timeout)
        if check and call["rc"] != 0:
            raise RuntimeError(f"{call['cmd']} exited {call['rc']}: {self.text(call)[-2000:]}")
        return call

    def kill(self, call: dict, sig: int = signal.SIGKILL) -> None:
        try:
            os.killpg(call["proc"].pid, sig)
        except ProcessLookupError:
            pass
        self.wait(call, 120)
        call["killed"] = sig

    def text(self, call: dict) -> str:
        """stdout, stderr and the Hydra logs (outputs/**/*.log) written since the call started."""
        logs = [p for p in (self.dir / "outputs").rglob("*.log") if p.stat().st_mtime >= call["t0"] - 1]
        return "".join(p.read_text(errors="replace") for p in [call["out"], call["err"], *logs])

    @staticmethod
    def error_lines(call: dict) -> List[str]:
        """stderr without log lines, hints and blank lines."""
        lines = call["err"].read_text(errors="replace").splitlines()
        return [ln for ln in lines if ln.strip() and not LOG_LINE.match(ln) and not any(h in ln for h in HINTS)]

    def until(self, predicate: Callable[[], bool], call: Optional[dict] = None, timeout: float = 600) -> bool:
        t0 = time.time()
        while time.time() - t0 < timeout:
            if predicate():
                return True
            if call is not None and call["proc"].poll() is not None:
                return False
            time.sleep(0.1)
        return False

    def log_has(self, call: dict, needle: str) -> bool:
        return needle in self.text(call)

    # --- state ---------------------------------------------------------------------------------
    def runs(self, db: Optional[Path] = None) -> List[dict]:
        db = db or self.db
        if not db.exists():
            return []
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=60)
        try:
            rows = con.execute("select r.run_uuid, r.status, r.lifecycle_stage, "
                               "(select value from tags t where t.run_uuid=r.run_uuid and t.key='config_hash'), "
                               "(select value from tags t where t.run_uuid=r.run_uuid and t.key='status_reason'), "
                               "(select value from tags t where t.run_uuid=r.run_uuid and t.key='resumed') "
                               "from runs r").fetchall()
        except sqlite3.Error:
            return []
        finally:
            con.close()
        return [{"id": r[0], "status": r[1], "stage": r[2], "hash": r[3], "reason": r[4], "resumed": r[5]}
                for r in rows if r[2] != "deleted"]

    def store(self, db: Optional[Path] = None) -> Dict[str, Dict[str, int]]:
        table: Dict[str, Dict[str, int]] = {}
        for run in self.runs(db):
            per = table.setdefault(run["hash"] or "?", {})
            per[run["status"]] = per.get(run["status"], 0) + 1
        return table

    def count(self, status: str, db: Optional[Path] = None) -> int:
        return sum(per.get(status, 0) for per in self.store(db).values())

    def duplicates(self, db: Optional[Path] = None) -> int:
        """FINISHED runs beyond the first, per config hash."""
        return sum(max(0, per.get("FINISHED", 0) - 1) for per in self.store(db).values())

    def repeated_steps(self) -> int:
        """(run, metric, step) triples logged more than once."""
        if not self.db.exists():
            return 0
        con = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True)
        try:
            return len(con.execute("select run_uuid, key, step from metrics group by run_uuid, key, step "
                                   "having count(*) > 1").fetchall())
        finally:
            con.close()

    def metric(self, key: str) -> List[float]:
        con = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True)
        try:
            return [r[0] for r in con.execute("select m.value from latest_metrics m join runs r on r.run_uuid=m.run_uuid "
                                              "where m.key=? and r.status='FINISHED'", (key,))]
        finally:
            con.close()

    def leftovers(self) -> List[str]:
        found = []
        for root, dirs, files in os.walk(self.dir):
            if "outputs" in Path(root).relative_to(self.dir).parts[:1]:
                continue
            for name in dirs + files:
                if ".tmp-" in name or name.endswith(".tmp"):
                    found.append(str(Path(root, name).relative_to(self.dir)))
        return found

    def checkpoints(self) -> List[Path]:
        return sorted((self.dir / "runs").glob("*/checkpoint.pt"))

    def observed(self) -> dict:
        return {"calls": [{"cmd": c["cmd"], "rc": c.get("rc"), "seconds": c.get("seconds"),
                           "killed": c.get("killed"), "timeout": c.get("timeout", False),
                           "stderr": self.error_lines(c)[:6]} for c in self.calls],
                "store": self.store(), "leftover_tmp": self.leftovers(),
                "running": self.count("RUNNING"), "duplicate_finished": self.duplicates()}


# ------------------------------------------------------------------------------------------------
# verdicts

def judge(problems: List[str], clear_error: bool = False) -> str:
    if problems:
        return "FAILED: " + "; ".join(problems)
    return "clear error, nothing recorded" if clear_error else "survived"


def expect_clear(case: Case, call: dict, names: List[str]) -> List[str]:
    """One line naming the key or file, what was wrong and what is allowed; no traceback; nothing
    recorded; exit code non-zero."""
    problems = []
    lines = case.error_lines(call)
    text = call["err"].read_text(errors="replace")
    if call.get("rc") in (0, None):
        problems.append(f"exit code {call.get('rc')}")
    if "Traceback" in text:
        problems.append("traceback")
    if case.runs():
        problems.append(f"{len(case.runs())} run(s) recorded ({case.store()})")
    named = [ln for ln in lines if any(n.lower() in ln.lower() for n in names)]
    if not named:
        problems.append(f"no stderr line names {names}")
    elif not any(ALLOWED.search(ln) for ln in named):
        problems.append("the line does not say what is allowed")
    body = [ln for ln in lines if not ln.startswith((" ", "\t"))]
    if len(body) > 1 and "Traceback" not in text:
        problems.append(f"{len(body)} message lines")
    return problems


def finished_once(case: Case, hashes: int = 1) -> List[str]:
    problems = []
    store = case.store()
    finished = {h: per.get("FINISHED", 0) for h, per in store.items() if per.get("FINISHED")}
    if len(finished) != hashes:
        problems.append(f"{len(finished)} config hash(es) FINISHED, expected {hashes} ({store})")
    if case.duplicates():
        problems.append(f"{case.duplicates()} duplicate FINISHED run(s)")
    if case.count("RUNNING"):
        problems.append(f"{case.count('RUNNING')} run(s) left RUNNING")
    if case.leftovers():
        problems.append(f"leftover temp files {case.leftovers()}")
    return problems


def rc_zero(*calls: dict) -> List[str]:
    return [f"`{c['cmd'][:60]}…` exited {c.get('rc')}" for c in calls if c.get("rc") != 0]


# ------------------------------------------------------------------------------------------------
# fault cases: each returns a list of problems (empty: survived)

def kill_after_checkpoint(case: Case, args: List[str], sig: int = signal.SIGKILL) -> dict:
    call = case.start("recbench", args)
    if not case.until(lambda: bool(case.checkpoints()), call):
        raise RuntimeError(f"no checkpoint before the job ended: {case.text(call)[-1500:]}")
    time.sleep(1.0)
    case.kill(call, sig)
    return call


def reference_metrics(probe: Probe) -> Dict[str, List[float]]:
    ref = Case(probe, probe.scratch / "reference_long")
    if not ref.db.exists() or not ref.metric("test/auc"):
        ref.from_template(store=False)
        ref.run("recbench", LONG, check=True)
    return {k: ref.metric(k) for k in ("val/auc", "test/auc", "test/log_loss")}


def reference_repeats(probe: Probe) -> int:
    """(metric, step) pairs an uninterrupted LONG run logs twice (its last evaluation, at max_steps)."""
    reference_metrics(probe)
    return Case(probe, probe.scratch / "reference_long").repeated_steps()


def f_kill_mid_epoch(case: Case) -> List[str]:
    case.from_template(store=False)
    kill_after_checkpoint(case, LONG)
    again = case.run("recbench", LONG)
    problems = rc_zero(again) + finished_once(case)
    if "resumed from" not in case.text(again):
        problems.append("did not resume")
    ref = reference_metrics(case.probe)
    if case.repeated_steps() > reference_repeats(case.probe):
        problems.append(f"{case.repeated_steps()} (metric, step) pairs logged twice, the uninterrupted run "
                        f"{reference_repeats(case.probe)}")
    for key, values in ref.items():
        got = case.metric(key)
        if got != values:
            problems.append(f"{key} {got} differs from the uninterrupted run's {values}")
    return problems


def f_kill_sigterm(case: Case) -> List[str]:
    case.from_template(store=False)
    kill_after_checkpoint(case, LONG, signal.SIGTERM)
    again = case.run("recbench", LONG)
    return rc_zero(again) + finished_once(case)


def f_kill_before_checkpoint(case: Case) -> List[str]:
    case.from_template(store=False)
    args = LONG + ["trainer.checkpoint_every_steps=100000"]
    call = case.start("recbench", args)
    case.until(lambda: case.count("RUNNING") > 0, call)
    time.sleep(2)
    case.kill(call)
    again = case.run("recbench", args)
    return rc_zero(again) + finished_once(case)


def f_kill_during_prepare(case: Case) -> List[str]:
    args = [a for a in LONG if not a.startswith("dataset.rows")] + ["dataset.rows=200000"]
    call = case.start("recbench", args)
    case.until(lambda: any((case.dir / "data").rglob("*")), call)
    time.sleep(1.0)
    case.kill(call)
    stage = [p.name for p in (case.dir / "data").rglob("*")][:8]
    again = case.run("recbench", args[:-1] + ["dataset.rows=200000", "trainer.max_steps=10"])
    problems = rc_zero(again) + finished_once(case)
    if not stage:
        problems.append("killed before anything was written (inconclusive)")
    return problems


def f_kill_after_training(case: Case) -> List[str]:
    case.from_template(store=False)
    call = case.start("recbench", LONG)
    case.until(lambda: case.log_has(call, "finished in"), call)
    case.kill(call)
    again = case.run("recbench", LONG)
    return rc_zero(again) + finished_once(case)


def f_store_lost(case: Case) -> List[str]:
    case.from_template(store=False)
    kill_after_checkpoint(case, LONG)
    case.db.rename(case.dir / "mlflow.db.lost")
    again = case.run("recbench", LONG)
    problems = rc_zero(again) + finished_once(case)
    if not any(r.get("resumed") == "true" for r in case.runs()):
        problems.append("the checkpoint was not resumed (no resumed=true run)")
    return problems


def f_uri_changed(case: Case) -> List[str]:
    case.from_template(store=False)
    kill_after_checkpoint(case, LONG)
    other = Case(case.probe, case.dir, uri=f"sqlite:///{case.dir / 'other.db'}")
    other.db = case.dir / "other.db"
    again = other.run("recbench", LONG)
    case.calls.append(again)
    problems = rc_zero(again)
    abandoned = case.store()
    case.db = other.db  # observed: the store in use (the old one keeps the killed run RUNNING: nobody uses it)
    case.abandoned_store = abandoned
    store = other.store()
    if sum(p.get("FINISHED", 0) for p in store.values()) != 1 or other.count("RUNNING"):
        problems.append(f"new store {store}")
    return problems


def f_store_restored(case: Case) -> List[str]:
    case.from_template()
    export = case.run("recbench-report", ["--export", "runs.json", "--out", "reports", "--no-figures"])
    case.db.rename(case.dir / "mlflow.db.lost")
    imp = case.run("python", ["-m", "recbench.reporting.import_records", "runs.json"])
    again = case.run("recbench", BASE)
    problems = rc_zero(export, imp, again) + finished_once(case)
    if "skip" not in case.text(again).lower():
        problems.append("the relaunch did not say it skipped the finished job")
    return problems


def damaged_checkpoint(damage: Callable[[Path], None]) -> Callable[[Case], List[str]]:
    def run(case: Case) -> List[str]:
        case.from_template(store=False)
        kill_after_checkpoint(case, LONG)
        checkpoint = case.checkpoints()[0]
        damage(checkpoint)
        again = case.run("recbench", LONG)
        problems = rc_zero(again) + finished_once(case)
        if "resumed from" in case.text(again):
            problems.append("resumed from the damaged checkpoint")
        if not list(checkpoint.parent.glob("*.unreadable")):
            problems.append("the damaged checkpoint was not set aside")
        if not any(r["status"] == "KILLED" for r in case.runs()):
            problems.append(f"the killed run was not closed KILLED ({case.store()})")
        return problems
    return run


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def not_a_checkpoint(path: Path) -> None:
    subprocess.run([str(PYTHON[0]), "-c", "import sys, torch; torch.save({'hello': torch.zeros(3)}, sys.argv[1])",
                    str(path)], check=True)


def flip_tensor_byte(path: Path) -> None:
    with zipfile.ZipFile(path) as archive:
        info = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    raw = bytearray(path.read_bytes())
    name_len = int.from_bytes(raw[info.header_offset + 26: info.header_offset + 28], "little")
    extra_len = int.from_bytes(raw[info.header_offset + 28: info.header_offset + 30], "little")
    start = info.header_offset + 30 + name_len + extra_len
    raw[start + info.file_size // 2] ^= 0x10
    path.write_bytes(bytes(raw))


def f_leftover_checkpoint_tmp(case: Case) -> List[str]:
    case.from_template()
    folder = next((case.dir / "runs").iterdir())
    (folder / f"checkpoint.pt.tmp-{DEAD_PID}").write_bytes(b"half")
    again = case.run("recbench", BASE)
    return rc_zero(again) + finished_once(case)


def cache_version(case: Case) -> Path:
    link = next(p for p in (case.dir / "data" / "synthetic" / "processed").iterdir() if p.is_symlink())
    return link.resolve()


def damaged_cache(damage: Callable[[Path], None]) -> Callable[[Case], List[str]]:
    def run(case: Case) -> List[str]:
        case.from_template(store=False)
        damage(cache_version(case))
        again = case.run("recbench", BASE)
        problems = rc_zero(again) + finished_once(case)
        if "rebuild" not in case.text(again).lower():
            problems.append("no 'rebuilding' message")
        return problems
    return run


def flip_cache(version: Path) -> None:
    path = version / "train" / "sparse.npy"
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF
    path.write_bytes(bytes(raw))


def truncate_cache(version: Path) -> None:
    path = version / "train" / "sparse.npy"
    path.write_bytes(path.read_bytes()[:-7])


def delete_cache_file(version: Path) -> None:
    (version / "val" / "labels.npy").unlink() if (version / "val" / "labels.npy").exists() else \
        next((version / "val").glob("*.npy")).unlink()


def garbage_manifest(version: Path) -> None:
    (version / "manifest.json").write_text("{not json")


def f_bit_rot(case: Case) -> List[str]:
    case.from_template(store=False)
    path = next((cache_version(case) / "val").glob("*.npy"))
    stat = path.stat()
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0x01
    path.write_bytes(bytes(raw))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    call = case.run("recbench-data", ["verify", "synthetic", "dataset.rows=20000"])
    problems = []
    if call["rc"] == 0:
        problems.append("verify exited 0")
    if path.name not in case.text(call):
        problems.append("verify did not name the file")
    return problems


def f_leftover_cache_tmp(case: Case) -> List[str]:
    case.from_template()
    link = cache_version(case)
    leftover = link.parent / f".{link.name.split('.v-')[0].lstrip('.')}.tmp-{DEAD_PID}"
    leftover.mkdir()
    (leftover / "half.npy").write_bytes(b"x")
    again = case.run("recbench", BASE)
    return rc_zero(again) + finished_once(case)


def f_leftover_raw_tmp(case: Case) -> List[str]:
    case.from_template()
    raw = case.dir / "data" / "synthetic" / "raw"
    (raw / f"{next(raw.glob('*.txt')).name}.tmp-{DEAD_PID}").write_text("half")
    again = case.run("recbench", BASE)
    return rc_zero(again) + finished_once(case)


LOCKER = """
import sqlite3, sys, time
con = sqlite3.connect(sys.argv[1], timeout=60, isolation_level=None)
con.execute("BEGIN EXCLUSIVE"); print("locked", flush=True); time.sleep(float(sys.argv[2])); con.execute("COMMIT")
"""


def f_store_locked(case: Case) -> List[str]:
    case.from_template()
    locker = case.start("python", ["-c", LOCKER, str(case.db), "25"])
    case.until(lambda: "locked" in locker["out"].read_text())
    job = case.run("recbench", BASE + ["seed=1"])
    case.wait(locker)
    problems = rc_zero(job) + finished_once(case, hashes=2)
    con = sqlite3.connect(str(case.db))
    check = con.execute("PRAGMA integrity_check").fetchone()[0]
    con.close()
    if check != "ok":
        problems.append(f"integrity_check {check}")
    return problems


def mounted_store(case: Case, size_kb: Optional[int], read_only: bool) -> List[str]:
    case.from_template()
    mount = case.dir / "mnt"
    mount.mkdir()
    db_kb = case.db.stat().st_size // 1024
    size = f"{(size_kb or db_kb + 2048)}k"
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], check=True)
    try:
        shutil.copy2(case.db, mount / "mlflow.db")
        if size_kb:  # fill the rest
            with open(mount / "filler", "wb", buffering=0) as f:
                try:
                    while True:
                        f.write(b"\0" * 4096)
                except OSError:
                    pass
        if read_only:
            subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
        store = Case(case.probe, case.dir, uri=f"sqlite:///{mount / 'mlflow.db'}")
        store.db = mount / "mlflow.db"
        call = store.run("recbench", BASE + ["seed=1"], timeout=300)
        case.calls.append(call)
        problems = []
        if call["rc"] == 0:
            problems.append("exit 0")
        if "Traceback" in call["err"].read_text(errors="replace"):
            problems.append("traceback")
        lines = case.error_lines(call)
        if not any("store" in ln.lower() for ln in lines):
            problems.append(f"no line about the store: {lines[-3:]}")
        if call["seconds"] > 60:
            problems.append(f"took {call['seconds']} s (retries?)")
        if store.count("FINISHED") != 1 or store.count("RUNNING"):
            problems.append(f"store now {store.store()}")
        return problems
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def f_store_read_only(case: Case) -> List[str]:
    return mounted_store(case, None, read_only=True)


def f_store_full(case: Case) -> List[str]:
    return mounted_store(case, case.probe.build_template().joinpath("mlflow.db").stat().st_size // 1024 + 64,
                         read_only=False)


def f_efbig_checkpoint(case: Case) -> List[str]:
    import resource
    case.from_template()
    limit = case.db.stat().st_size + 1_500_000
    args = [a for a in LONG if not a.startswith("method=")] + ["method=full"]
    args = [a for a in args if not a.startswith("budget.")] + ["budget.compression_ratio=1.0"]
    call = case.run("recbench", args, preexec=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    problems = []
    if call["rc"] == 0:
        problems.append("exit 0 under the file-size limit (checkpoint smaller than the limit?)")
    if "Traceback" in call["err"].read_text(errors="replace"):
        problems.append("traceback")
    if not any("checkpoint" in ln and ("ulimit" in ln or "space" in ln) for ln in case.error_lines(call)):
        problems.append(f"no clear line: {case.error_lines(call)[-3:]}")
    again = case.run("recbench", args)
    problems += rc_zero(again)
    if case.leftovers():
        problems.append(f"leftover {case.leftovers()}")
    if case.count("RUNNING"):
        problems.append("RUNNING run left")
    if case.duplicates():
        problems.append("duplicate FINISHED runs")
    return problems


def f_killed_sweep(case: Case) -> List[str]:
    case.from_template(store=False)
    call = case.start("recbench-sweep", SWEEP)
    case.until(lambda: case.count("FINISHED") >= 1 and case.count("RUNNING") >= 1, call)
    case.kill(call)
    again = case.run("recbench-sweep", SWEEP)
    return rc_zero(again) + finished_once(case, hashes=3)


def f_killed_multirun(case: Case) -> List[str]:
    case.from_template(store=False)
    args = ["-m", *LONG, "seed=0,1"]
    args = [a if a != "trainer.max_steps=200" else "trainer.max_steps=120" for a in args]
    call = case.start("recbench", args)
    case.until(lambda: case.count("FINISHED") >= 1 and bool(case.checkpoints()), call)
    time.sleep(1)
    case.kill(call)
    again = case.run("recbench", args)
    return rc_zero(again) + finished_once(case, hashes=2)


def f_same_job_together(case: Case) -> List[str]:
    case.from_template(store=False)
    a, b = case.start("recbench", BASE), case.start("recbench", BASE)
    case.wait(a), case.wait(b)
    return rc_zero(a, b) + finished_once(case)


def f_same_job_staggered(case: Case) -> List[str]:
    case.from_template(store=False)
    a = case.start("recbench", LONG)
    case.until(lambda: case.count("RUNNING") > 0, a)
    time.sleep(2)
    b = case.start("recbench", LONG)
    case.wait(a), case.wait(b)
    problems = rc_zero(a, b) + finished_once(case)
    if case.repeated_steps() > reference_repeats(case.probe):
        problems.append(f"{case.repeated_steps()} (metric, step) pairs logged twice, the uninterrupted run "
                        f"{reference_repeats(case.probe)}")
    if any(r.get("resumed") == "true" for r in case.runs()):
        problems.append("the live run was adopted (resumed=true)")
    return problems


def f_same_sweep_together(case: Case) -> List[str]:
    case.from_template(store=False)
    a, b = case.start("recbench-sweep", SWEEP), case.start("recbench-sweep", SWEEP)
    case.wait(a), case.wait(b)
    problems = rc_zero(a, b) + finished_once(case, hashes=3)
    outcomes = list((case.dir / "outputs").rglob("outcome.json"))
    if len({p.parent.parent for p in outcomes}) < 2 and len(outcomes) > 3:
        problems.append("both launches wrote the same sweep folder")
    return problems


READER = """
import sys, time
from pathlib import Path
from recbench.datasets.storage import try_load
link, stop = Path(sys.argv[1]), Path(sys.argv[2])
reads = errors = 0
while not stop.exists():
    try:
        loaded = try_load(link)
        assert loaded is not None, "cache missing"
        n = len(loaded.split("train"))
        reads += 1
    except Exception as exc:
        errors += 1
        print("ERROR", repr(exc)[:200], flush=True)
print("reads", reads, "errors", errors, flush=True)
"""


def f_rebuild_with_reader(case: Case) -> List[str]:
    case.from_template(store=False)
    link = next(p for p in (case.dir / "data" / "synthetic" / "processed").iterdir() if p.is_symlink())
    stop = case.dir / "stop"
    reader = case.start("python", ["-c", READER, str(link), str(stop)])
    builds = [case.run("recbench-data", ["prepare", "synthetic", "dataset.rows=20000", "--force"]) for _ in range(2)]
    stop.touch()
    case.wait(reader, 120)
    out = reader["out"].read_text()
    problems = rc_zero(*builds)
    match = re.search(r"reads (\d+) errors (\d+)", out)
    if not match:
        problems.append(f"reader: {out[-300:]} {reader['err'].read_text()[-300:]}")
    elif int(match.group(2)) or not int(match.group(1)):
        problems.append(f"reader: {match.group(0)}; {out.splitlines()[:2]}")
    return problems


def f_parallel_fresh_data(case: Case) -> List[str]:
    a, b = case.start("recbench", BASE), case.start("recbench", BASE + ["seed=1"])
    case.wait(a), case.wait(b)
    problems = rc_zero(a, b) + finished_once(case, hashes=2)
    versions = list((case.dir / "data" / "synthetic" / "processed").glob(".*.v-*"))
    if len(versions) != 1:
        problems.append(f"{len(versions)} cache versions built")
    return problems


def f_injected_tags(case: Case) -> List[str]:
    case.from_template()
    export = case.run("recbench-report", ["--export", "runs.json", "--out", "reports0", "--no-figures"])
    records = json.loads((case.dir / "runs.json").read_text())
    items = records if isinstance(records, list) else records.get("runs", records.get("records", []))
    injected = []
    for i, rec in enumerate(items):  # records are flat: tags are top-level keys
        for status, run_status, digit in (("finished", "FINISHED", "e"), ("failed", "FAILED", "f")):
            bad = dict(rec, status=status, run_status=run_status, run_id=digit * 31 + str(i),
                       config_hash=digit * 15 + str(i), status_reason="<svg onload=alert(1)>|`x`](http://evil)",
                       overrides="method=hashing 'x=$(touch /tmp/pwned)' y=`id`;rm -rf ~")
            bad["command"] = "recbench " + bad["overrides"]
            injected.append(bad)
    items[:] = injected
    (case.dir / "runs.json").write_text(json.dumps(records))
    fresh = Case(case.probe, case.dir, uri=f"sqlite:///{case.dir / 'imported.db'}")
    fresh.db = case.dir / "imported.db"
    imp = fresh.run("python", ["-m", "recbench.reporting.import_records", "runs.json"])
    report = fresh.run("recbench-report", ["--out", "reports", "--no-figures"])
    case.calls += [imp, report]
    problems = rc_zero(export, imp, report)
    boards = list((case.dir / "reports").rglob("leaderboard.md"))
    if not boards:
        return problems + ["no leaderboard.md written"]
    text = "\n".join(p.read_text() for p in boards)
    if "pwned" not in text and "svg" not in text:
        problems.append("the injected tags do not appear in leaderboard.md (nothing tested)")
    if "<svg" in text:
        problems.append("raw <svg in leaderboard.md")
    if "$(touch" in text and "'x=$(touch /tmp/pwned)'" not in text:
        problems.append("shell syntax unquoted in a command")
    if ";rm -rf" in text and "';rm -rf ~'" not in text and "'y=`id`;rm'" not in text:
        problems.append("`;rm -rf` unquoted in a command")
    return problems


FAULTS = [
    ("kill_mid_epoch", "SIGKILL after the first checkpoint (200-step job, checkpoint every 25), same command again",
     "resumes into the same run; 1 FINISHED, 0 RUNNING; no (metric, step) logged twice; metrics equal an uninterrupted run's", f_kill_mid_epoch),
    ("kill_sigterm", "SIGTERM after the first checkpoint, same command again", "resumes or restarts; 1 FINISHED, 0 RUNNING", f_kill_sigterm),
    ("kill_before_first_checkpoint", "SIGKILL 2 s after the run exists, checkpoint_every_steps=100000; again",
     "orphan closed; 1 FINISHED, 0 RUNNING", f_kill_before_checkpoint),
    ("kill_during_prepare", "SIGKILL while the synthetic data (200k rows) is generated/cached; again",
     "rebuilds; 1 FINISHED, 0 RUNNING, no temp files", f_kill_during_prepare),
    ("kill_after_training", "SIGKILL once the log says the training stage finished (evaluation/latency/closing); again",
     "1 FINISHED, 0 RUNNING", f_kill_after_training),
    ("kill_then_store_lost", "SIGKILL after a checkpoint, mlflow.db moved away, same command (issue #31 item 1)",
     "the checkpoint resumes into a new run (resumed=true); exit 0", f_store_lost),
    ("kill_then_tracking_uri_changed", "SIGKILL after a checkpoint, relaunch with another MLFLOW_TRACKING_URI (runs/ kept)",
     "1 FINISHED in the new store, exit 0", f_uri_changed),
    ("store_lost_restored_from_export", "finished run exported (recbench-report --export), store deleted, import_records, relaunch",
     "the relaunch skips the job; 1 FINISHED", f_store_restored),
    ("checkpoint_truncated", "killed run's checkpoint.pt cut to half, relaunch",
     "set aside (.unreadable), killed run closed KILLED, restart; 1 FINISHED", damaged_checkpoint(truncate)),
    ("checkpoint_not_a_checkpoint", "checkpoint.pt replaced by a torch file that loads but is not a checkpoint",
     "as above", damaged_checkpoint(not_a_checkpoint)),
    ("checkpoint_flipped_tensor_byte", "one byte flipped inside the largest tensor of checkpoint.pt",
     "as above (CRC check), never resumed silently", damaged_checkpoint(flip_tensor_byte)),
    ("checkpoint_empty", "checkpoint.pt truncated to 0 bytes", "as above", damaged_checkpoint(lambda p: p.write_bytes(b""))),
    ("leftover_checkpoint_tmp", f"runs/<hash>/checkpoint.pt.tmp-{DEAD_PID} (dead pid) left, relaunch",
     "temp file removed", f_leftover_checkpoint_tmp),
    ("cache_byte_flipped", "last byte of train/sparse.npy flipped, run", "cache rejected and rebuilt; FINISHED",
     damaged_cache(flip_cache)),
    ("cache_truncated", "train/sparse.npy truncated by 7 bytes, run", "as above", damaged_cache(truncate_cache)),
    ("cache_file_deleted", "one val/*.npy deleted, run", "as above", damaged_cache(delete_cache_file)),
    ("cache_manifest_garbage", "manifest.json replaced by `{not json`, run", "as above", damaged_cache(garbage_manifest)),
    ("cache_bit_rot_same_mtime", "one byte of val/*.npy flipped, size and mtime kept; recbench-data verify",
     "verify exits non-zero naming the file (a normal load does not re-hash: documented)", f_bit_rot),
    ("leftover_cache_tmp_dir", f"data/synthetic/processed/.<id>.tmp-{DEAD_PID}/ left, run", "removed", f_leftover_cache_tmp),
    ("leftover_raw_tmp", f"data/synthetic/raw/<file>.tmp-{DEAD_PID} left, run", "removed", f_leftover_raw_tmp),
    ("store_locked", "another process holds BEGIN EXCLUSIVE on mlflow.db for 25 s while a job runs",
     "the job waits and finishes; integrity_check ok", f_store_locked),
    ("store_read_only", "store on a tmpfs remounted read-only", "one line naming the store, no retries, no traceback",
     f_store_read_only),
    ("store_full", "store on a full tmpfs (64 kB over the db, filled)", "as above", f_store_full),
    ("efbig_checkpoint", "RLIMIT_FSIZE = db size + 1.5 MB, method=full 200-step job; then again without the limit",
     "one line naming the checkpoint and ulimit; the relaunch finishes; no temp files", f_efbig_checkpoint),
    ("killed_sweep", "recbench-sweep (3 jobs, --jobs 1) SIGKILLed as a group after the first FINISHED run; relaunched",
     "3 FINISHED, 3 hashes, 0 RUNNING", f_killed_sweep),
    ("killed_multirun", "`recbench -m ... seed=0,1` killed during its second job (after a checkpoint); relaunched",
     "2 FINISHED, 0 RUNNING", f_killed_multirun),
    ("same_job_simultaneous", "two identical `recbench` jobs started together", "1 FINISHED run, both exit 0",
     f_same_job_together),
    ("same_job_staggered", "the second identical job started 2 s after the first's run exists",
     "the second waits then skips; 1 FINISHED; no adopted run, no step logged twice", f_same_job_staggered),
    ("same_sweep_simultaneous", "the same recbench-sweep launched twice at once", "3 FINISHED, 3 hashes, separate folders",
     f_same_sweep_together),
    ("cache_rebuild_with_reader", "two `recbench-data prepare --force` while another process loads the cache in a loop",
     "the reader never fails", f_rebuild_with_reader),
    ("parallel_jobs_fresh_data_root", "two jobs (seeds 0, 1) on an empty data root at once",
     "both finish; the dataset is built once", f_parallel_fresh_data),
    ("imported_store_injected_tags", "exported records with `<svg onload>` status_reason and shell syntax in overrides, "
     "imported into a new store, recbench-report", "leaderboard.md escaped, commands shlex-quoted", f_injected_tags),
]


# ------------------------------------------------------------------------------------------------
# bad inputs: (name, tool, args, names that the error line must contain, expected); `data` builds files

def criteo_line(rng: random.Random) -> str:
    ints = [str(rng.randint(0, 50)) if rng.random() > 0.1 else "" for _ in range(13)]
    cats = ["%08x" % rng.randint(0, 40) for _ in range(26)]
    return "\t".join([str(rng.randint(0, 1)), *ints, *cats])


def criteo_file(path: Path, lines: int = 700, bad: Optional[Callable[[List[str]], None]] = None) -> Path:
    rng = random.Random(0)
    rows = [criteo_line(rng) for _ in range(lines)]
    if bad:
        bad(rows)
    path.write_text("\n".join(rows) + "\n")
    return path


def make_data(case: Case, kind: str) -> str:
    d = case.dir / "files"
    d.mkdir(exist_ok=True)
    if kind == "dir":
        criteo_file(d / "train.txt")
        return str(d)
    if kind == "gzip_txt":
        data = criteo_file(d / "plain.txt").read_bytes()
        (d / "train.txt").write_bytes(gzip.compress(data))
        return str(d / "train.txt")
    if kind == "bad_utf8":
        p = criteo_file(d / "train.txt")
        raw = p.read_bytes().split(b"\n")
        raw[29] = raw[29][:-3] + b"\xe9\xff1"
        p.write_bytes(b"\n".join(raw))
        return str(p)
    if kind == "missing_column":
        return str(criteo_file(d / "train.txt", bad=lambda rows: rows.__setitem__(9, rows[9].rsplit("\t", 1)[0])))
    if kind == "all_missing_columns":
        return str(criteo_file(d / "train.txt", bad=lambda rows: rows.__setitem__(
            slice(None), [r.rsplit("\t", 1)[0] for r in rows])))
    if kind == "label_2":
        return str(criteo_file(d / "train.txt", bad=lambda rows: rows.__setitem__(4, "2" + rows[4][1:])))
    if kind == "non_numeric":
        return str(criteo_file(d / "train.txt", bad=lambda rows: rows.__setitem__(
            19, "\t".join([rows[19].split("\t")[0], "12a", *rows[19].split("\t")[2:]]))))
    if kind == "empty":
        (d / "train.txt").write_bytes(b"")
        return str(d / "train.txt")
    if kind == "blank_lines":
        (d / "train.txt").write_text("\n\n\n")
        return str(d / "train.txt")
    if kind == "binary":
        (d / "train.txt").write_bytes(random.Random(1).randbytes(20000))
        return str(d / "train.txt")
    if kind == "missing":
        return str(d / "nosuch.txt")
    if kind == "avazu_header":
        (d / "train.csv").write_text("id,clk,hour\n1,0,14102100\n")
        return str(d / "train.csv")
    raise ValueError(kind)


CRITEO = ["dataset=criteo_kaggle", "dataset.malformed=fail", "trainer.max_steps=5", *TRAINER]
MOE = ["model=dcn_moe"]

INPUTS: List[tuple] = [
    # (name, tool, args, names, data kind or None)
    ("method_unknown", "recbench", ["method=nosuch"], ["method"], None),
    ("dataset_unknown", "recbench", ["dataset=nosuch"], ["dataset"], None),
    ("ratio_negative", "recbench", ["budget.compression_ratio=-0.1"], ["budget.compression_ratio"], None),
    ("ratio_zero", "recbench", ["budget.compression_ratio=0"], ["budget.compression_ratio"], None),
    ("ratio_above_1", "recbench", ["budget.compression_ratio=1.5"], ["budget.compression_ratio"], None),
    ("ratio_nan", "recbench", ["budget.compression_ratio=nan"], ["budget.compression_ratio"], None),
    ("ratio_inf", "recbench", ["budget.compression_ratio=inf"], ["budget.compression_ratio"], None),
    ("ratio_text", "recbench", ["budget.compression_ratio=abc"], ["budget.compression_ratio"], None),
    ("embedding_dim_18", "recbench", ["model.embedding_dim=18"], ["model.embedding_dim"], None),
    ("embedding_dim_0", "recbench", ["model.embedding_dim=0"], ["model.embedding_dim"], None),
    ("embedding_dim_-4", "recbench", ["model.embedding_dim=-4"], ["model.embedding_dim"], None),
    ("embedding_dim_huge", "recbench", ["model.embedding_dim=1048576"], ["model.embedding_dim"], None),
    ("seed_negative", "recbench", ["seed=-1"], ["seed"], None),
    ("seed_text", "recbench", ["seed=abc"], ["seed"], None),
    ("eval_batch_size_0", "recbench", ["trainer.eval_batch_size=0"], ["trainer.eval_batch_size"], None),
    ("max_epochs_-1", "recbench", ["trainer.max_epochs=-1"], ["trainer.max_epochs"], None),
    ("max_steps_-1", "recbench", ["trainer.max_steps=-1"], ["trainer.max_steps"], None),
    ("max_steps_-5", "recbench", ["trainer.max_steps=-5"], ["trainer.max_steps"], None),
    ("batch_size_text", "recbench", ["trainer.batch_size=big"], ["trainer.batch_size"], None),
    ("num_threads_-1", "recbench", ["runtime.num_threads=-1"], ["runtime.num_threads"], None),
    ("log_every_steps_0", "recbench", ["trainer.log_every_steps=0"], ["trainer.log_every_steps"], None),
    ("latency_repeats_0", "recbench", ["trainer.latency_repeats=0"], ["trainer.latency_repeats"], None),
    ("min_delta_nan", "recbench", ["trainer.min_delta=nan"], ["trainer.min_delta"], None),
    ("checkpoint_every_-1", "recbench", ["trainer.checkpoint_every_steps=-1"], ["trainer.checkpoint_every_steps"], None),
    ("patience_-1", "recbench", ["trainer.patience=-1"], ["trainer.patience"], None),
    ("evals_per_epoch_0", "recbench", ["trainer.evals_per_epoch=0"], ["trainer.evals_per_epoch"], None),
    ("dense_lr_-1", "recbench", ["optimizer.dense.learning_rate=-1"], ["optimizer.dense.learning_rate"], None),
    ("dense_lr_nan", "recbench", ["optimizer.dense.learning_rate=nan"], ["optimizer.dense.learning_rate"], None),
    ("embedding_lr_inf", "recbench", ["optimizer.embedding.learning_rate=inf"], ["optimizer.embedding.learning_rate"], None),
    ("tolerance_2", "recbench", ["budget.tolerance=2"], ["budget.tolerance"], None),
    ("unknown_trainer_key", "recbench", ["+trainer.nosuch=1"], ["nosuch"], None),
    ("unknown_budget_key", "recbench", ["+budget.nosuch=1"], ["nosuch"], None),
    ("unknown_method_key", "recbench", ["method=hashing", "+method.nosuch=1"], ["nosuch"], None),
    ("key_not_in_struct", "recbench", ["nosuchkey=1"], ["nosuchkey"], None),
    ("key_not_in_group", "recbench", ["trainer.nosuch=1"], ["trainer.nosuch", "allowed"], None),
    ("method_setting_not_in_schema", "recbench", ["method=qr", "method.nosuch=1"], ["method.nosuch", "partitions"], None),
    ("method_setting_wrong_type", "recbench", ["method=qr", "method.partitions=abc"], ["method.partitions", "Integer"], None),
    ("comet_gate_on_dcn", "recbench", ["+gate=comet"], ["gate"], None),
    ("topk_k_0", "recbench", MOE + ["gate=topk", "gate.k=0"], ["gate.k"], None),
    ("topk_k_100", "recbench", MOE + ["gate=topk", "gate.k=100"], ["gate.k"], None),
    ("num_experts_0", "recbench", MOE + ["model.num_experts=0"], ["model.num_experts"], None),
    ("tasks_unknown", "recbench", MOE + ["model.tasks=[click,nosuch]"], ["model.tasks"], None),
    ("sharding_row_wise_cpu", "recbench", ["runtime.sharding_types=[row_wise]"], ["row_wise"], None),
    ("distributed_without_torchrun", "recbench", ["runtime.distributed=true"], ["torchrun"], None),
    ("synthetic_rows_5", "recbench", ["dataset.rows=5"], ["rows"], None),
    ("synthetic_rows_10", "recbench", ["dataset.rows=10"], ["rows", "split"], None),
    ("synthetic_rows_text", "recbench", ["dataset.rows=abc"], ["rows"], None),
    ("synthetic_split_unknown", "recbench", ["dataset.split=nosuch"], ["split"], None),
    ("source_is_a_folder", "recbench", CRITEO, ["folder", "files"], "dir"),
    ("source_missing", "recbench", CRITEO, ["nosuch.txt"], "missing"),
    ("criteo_empty_file", "recbench", CRITEO, ["train.txt"], "empty"),
    ("criteo_blank_lines", "recbench", CRITEO, ["train.txt", "rows"], "blank_lines"),
    ("criteo_binary_garbage", "recbench", CRITEO, ["train.txt"], "binary"),
    ("criteo_bad_utf8", "recbench", CRITEO, ["train.txt:30"], "bad_utf8"),
    ("criteo_missing_column", "recbench", CRITEO, ["train.txt:10"], "missing_column"),
    ("criteo_all_lines_missing_a_column", "recbench", [a for a in CRITEO if "malformed" not in a],
     ["train.txt", "rows"], "all_missing_columns"),
    ("criteo_label_2", "recbench", CRITEO, ["train.txt:5", "label"], "label_2"),
    ("criteo_non_numeric_int", "recbench", CRITEO, ["train.txt:20", "I1"], "non_numeric"),
    ("avazu_wrong_header", "recbench", ["dataset=avazu", "dataset.malformed=fail", *TRAINER], ["train.csv", "header"],
     "avazu_header"),
    ("movielens_raw_tampered", "recbench", ["dataset=movielens100k", *TRAINER], ["ml-100k.user"], "movielens_tampered"),
    ("movielens_grouplens_dir_empty", "recbench", ["dataset=movielens100k", "dataset.source=grouplens", *TRAINER],
     ["u.data", "grouplens"], "grouplens_empty"),
    ("sweep_unknown_preset", "recbench-sweep", ["nosuch"], ["nosuch"], None),
    ("sweep_jobs_0", "recbench-sweep", ["demo", "--jobs", "0", "--dry-run"], ["jobs"], None),
    ("sweep_jobs_text", "recbench-sweep", ["demo", "--jobs", "abc"], ["jobs"], None),
    ("data_unknown_dataset", "recbench-data", ["prepare", "nosuch"], ["nosuch"], None),
    ("data_verify_never_prepared", "recbench-data", ["verify", "synthetic", "dataset.rows=20000"], ["synthetic"], None),
    ("report_unknown_dataset", "recbench-report", ["--dataset", "nosuch", "--no-figures", "--out", "reports"], ["nosuch"], None),
]
#: the recbench inputs without a dataset of their own get this tiny synthetic job around them
INPUT_BASE = ["dataset=synthetic", "dataset.rows=2000", "trainer.max_steps=5", *TRAINER]


def run_input(case: Case, tool: str, args: List[str], names: List[str], data: Optional[str]) -> dict:
    if data == "movielens_tampered" or data == "grouplens_empty":
        raw = case.probe.movielens_raw
        if data == "movielens_tampered":
            if raw is None:
                return {"verdict": "not run (no --movielens-raw)", "problems": ["not run"]}
            target = case.dir / "data" / "movielens100k" / "raw"
            shutil.copytree(raw, target)
            with open(target / "ml-100k.user", "a") as f:
                f.write("944\t30\tM\tprobe\t00000\n")
        else:
            (case.dir / "grouplens").mkdir()
            args = args + [f"dataset.grouplens_dir={case.dir / 'grouplens'}"]
    elif data:
        args = args + [f"dataset.source={make_data(case, data)}"]
    if tool == "recbench" and not any(a.startswith("dataset=") for a in args):
        args = [a for a in INPUT_BASE if not any(a.split("=")[0] == b.split("=")[0] for b in args)] + args
    call = case.run(tool, args, timeout=600)
    problems = expect_clear(case, call, names)
    return {"problems": problems}


# ------------------------------------------------------------------------------------------------

def record(case: Case, name: str, kind: str, done: str, expected: str, problems: List[str], t0: float) -> dict:
    return {"name": name, "kind": kind, "done": done, "expected": expected,
            "verdict": judge(problems, clear_error=kind == "input"), "ok": not problems,
            "seconds": round(time.time() - t0, 1), "observed": case.observed()}


def run_all(probe: Probe, only: Optional[str], kinds: List[str], results_path: Path) -> List[dict]:
    results = json.loads(results_path.read_text()) if results_path.exists() else []
    done = {r["name"] for r in results}
    todo = []
    if "fault" in kinds:
        todo += [("fault", *f) for f in FAULTS]
    if "input" in kinds:
        todo += [("input", name, f"`{tool} {' '.join(args)}`" + (f" with data `{data}`" if data else ""),
                  "exit non-zero, one line naming the key/file and what is allowed, no traceback, no run",
                  (tool, args, names, data)) for name, tool, args, names, data in INPUTS]
    for kind, name, what, expected, fn in todo:
        if (only and not re.search(only, name)) or name in done:
            continue
        case = probe.case_dir(name)
        if case.dir.exists() and any(case.dir.iterdir()):
            shutil.rmtree(case.dir)
            case = probe.case_dir(name)
        t0 = time.time()
        print(f"[probe] {time.strftime('%H:%M:%S')} {kind} {name} ...", flush=True)
        try:
            problems = fn(case) if kind == "fault" else run_input(case, *fn)["problems"]
        except Exception as exc:  # noqa: BLE001 - a probe error is reported as the case's failure
            problems = [f"probe error: {type(exc).__name__}: {exc}"[:600]]
            for call in case.calls:
                if call["proc"].poll() is None:
                    case.kill(call)
        result = record(case, name, kind, what, expected, problems, t0)
        print(f"[probe]   {result['verdict']} ({result['seconds']} s)", flush=True)
        results = [r for r in results if r["name"] != name] + [result]
        results_path.write_text(json.dumps(results, indent=1, default=str))
    return results


def rejudge(probe: Probe, result: dict) -> dict:
    """Judge a bad-input case again from its folder (after a change of the criteria)."""
    case = Case(probe, probe.scratch / "cases" / result["name"])
    calls = result["observed"]["calls"]
    if not calls:
        return result
    names = next(n for name, _, _, n, _ in INPUTS if name == result["name"])
    call = {"rc": calls[-1]["rc"], "err": case.dir / f"call{len(calls)}.err"}
    problems = expect_clear(case, call, names)
    return dict(result, verdict=judge(problems, clear_error=True), ok=not problems)


def markdown(results: List[dict]) -> str:
    faults = [r for r in results if r["kind"] == "fault"]
    inputs = [r for r in results if r["kind"] == "input"]
    dup = sum(r["observed"]["duplicate_finished"] for r in faults)
    running = sum(r["observed"]["running"] for r in faults)
    cell = (lambda s, n=300: (s if len(s) <= n else s[: n - 1] + "…").replace("|", "\\|").replace("\n", " "))
    lines = [f"Faults survived: **{sum(r['ok'] for r in faults)} / {len(faults)}**; bad inputs with one clear error "
             f"and nothing recorded: **{sum(r['ok'] for r in inputs)} / {len(inputs)}**; duplicate FINISHED runs per "
             f"config hash over the fault cases: **{dup}**; runs left RUNNING after the fault cases: **{running}**.", "",
             "| fault case | what was done | expected | exit codes | verdict |", "|---|---|---|---|---|"]
    for r in faults:
        rcs = ", ".join(str(c["rc"]) + (" (killed)" if c.get("killed") else "") for c in r["observed"]["calls"])
        lines.append(f"| `{r['name']}` | {cell(r['done'])} | {cell(r['expected'])} | {rcs} | {cell(r['verdict'], 240)} |")
    lines += ["", "| bad input | input | exit | message (first non-log stderr line) | verdict |", "|---|---|---|---|---|"]
    for r in inputs:
        calls = r["observed"]["calls"]
        message = next((c["stderr"][0] for c in reversed(calls) if c["stderr"]), "(none)")
        rc = calls[-1]["rc"] if calls else ""
        lines.append(f"| `{r['name']}` | {cell(r['done'], 200)} | {rc} | {cell(message, 220)} | {cell(r['verdict'], 160)} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", type=Path, required=True, help="the recbench source tree (PYTHONPATH)")
    parser.add_argument("--scratch", type=Path, required=True, help="a folder for the cases (one sub-folder each)")
    parser.add_argument("--bin", type=Path, default=Path(sys.executable).parent,
                        help="folder of the recbench entry points (default: this interpreter's)")
    parser.add_argument("--movielens-raw", type=Path, default=None, help="folder with ml-100k.inter/.item/.user")
    parser.add_argument("--only", default=None, help="regex of case names")
    parser.add_argument("--kind", choices=["fault", "input", "all"], default="all")
    parser.add_argument("--results", type=Path, default=None,
                        help="results file (default <scratch>/results.json, or results_<kind>.json with --kind)")
    parser.add_argument("--fresh", action="store_true", help="forget earlier results in the scratch folder")
    parser.add_argument("--report", nargs="*", type=Path, default=None, metavar="RESULTS_JSON",
                        help="only write the Markdown table of these results files (merged) to <scratch>/results.md")
    args = parser.parse_args(argv)
    args.scratch.mkdir(parents=True, exist_ok=True)
    if args.report is not None:
        by_name = {r["name"]: r for path in args.report or [args.scratch / "results.json"]
                   for r in json.loads(path.read_text())}  # a later file's result of a case wins
        merged = [r for r in by_name.values()]
        merged.sort(key=lambda r: ([n for n, *_ in FAULTS] + [n for n, *_ in INPUTS]).index(r["name"]))
        probe = Probe(args.tree.resolve(), args.scratch.resolve(), args.bin, args.movielens_raw)
        merged = [rejudge(probe, r) if r["kind"] == "input" else r for r in merged]
        (args.scratch / "results.json").write_text(json.dumps(merged, indent=1, default=str))
        (args.scratch / "results.md").write_text(markdown(merged))
        print(markdown(merged).split("\n")[0])
        return 0
    results_path = args.results or args.scratch / ("results.json" if args.kind == "all" else f"results_{args.kind}.json")
    if args.fresh and results_path.exists():
        results_path.unlink()
    PYTHON.append(args.bin / "python")
    probe = Probe(args.tree.resolve(), args.scratch.resolve(), args.bin, args.movielens_raw)
    kinds = ["fault", "input"] if args.kind == "all" else [args.kind]
    results = run_all(probe, args.only, kinds, results_path)
    (results_path.with_suffix(".md")).write_text(markdown(results))
    print(markdown(results).split("\n")[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
