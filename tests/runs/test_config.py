"""Composing a job's config: keys that moved groups, and Hydra's composition errors in one line."""
import subprocess
import sys

import pytest

from recbench.runs.config import MOVED_KEYS, composition_problem, moved_keys


def test_a_moved_key_is_read_at_its_new_place_with_a_note():
    overrides, notes = moved_keys(["method=qr", "trainer.num_threads=1", "++trainer.resume=false", "seed=0"])
    assert overrides == ["method=qr", "runtime.num_threads=1", "++runtime.resume=false", "seed=0"]
    assert notes == ["trainer.num_threads is now runtime.num_threads; read as runtime.num_threads=1",
                     "trainer.resume is now runtime.resume; read as ++runtime.resume=false"]
    assert set(MOVED_KEYS.values()) == {"runtime.num_threads", "runtime.resume", "runtime.distributed",
                                        "runtime.sharding_types"}
    assert moved_keys(["trainer.batch_size=8"]) == (["trainer.batch_size=8"], [])


@pytest.mark.parametrize("overrides, message", [
    (["trainer.nosuch=1"], "trainer.nosuch: no setting of this name in trainer; allowed: max_epochs, max_steps"),
    (["method=qr", "method.nosuch=1"], "method.nosuch: no setting of this name in method; allowed: operation, "
                                       "partitions"),
    (["method=qr", "method.partitions=abc"], "method.partitions: Value 'abc' of type 'str' could not be converted to "
                                             "Integer; allowed: a value of the key's type (`recbench-methods qr` lists"),
    (["runtime.nosuch=1"], "runtime.nosuch: no setting of this name in runtime; allowed: resume, num_threads"),
])
def test_a_composition_error_is_one_line_naming_the_key(overrides, message):
    problem = composition_problem(overrides)
    assert problem is not None and problem.startswith(message) and "\n" not in problem


def test_a_good_job_composes():
    assert composition_problem(["method=qr", "method.partitions=3", "runtime.num_threads=1"]) is None


def test_the_command_prints_one_line_and_exits_2_before_anything_runs(tmp_path):
    out = subprocess.run([sys.executable, "-m", "recbench.cli.train", "method=qr", "method.partitions=abc"],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "recbench: error: method.partitions: Value 'abc' of type 'str' could not be converted to Integer; allowed: "
        "a value of the key's type (`recbench-methods qr` lists each setting's type)"]
    assert not (tmp_path / "outputs").exists()
