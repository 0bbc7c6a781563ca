"""Runs left RUNNING by a process that no longer exists are recognised (host, pid, start time)."""
import os
import subprocess
import sys

from recbench.tracking.base import orphan_reason, owner_tags


def test_a_live_process_owns_its_run():
    assert orphan_reason(owner_tags()) is None


def test_a_dead_process_is_an_orphan_and_a_recycled_pid_is_recognised():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    tags = {**owner_tags(), "pid": str(child.pid)}
    assert "ended without closing its run" in orphan_reason(tags)
    recycled = {**owner_tags(), "process_start": str(float(owner_tags()["process_start"]) - 3600)}
    assert "pid now belongs to another process" in orphan_reason(recycled)


def test_other_hosts_and_untagged_runs_are_never_declared_orphans():
    assert orphan_reason({**owner_tags(), "host": "elsewhere", "pid": "1"}) is None
    assert orphan_reason({}) is None
    assert orphan_reason({"host": os.uname().nodename}) is None
