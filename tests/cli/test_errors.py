"""Each error is said once, in one line, and the exit status follows one rule (docs/cli.md, "Exit
status"): 2 when the input is wrong (argument, override, name, value, tracking URI, data), 1 when
the work itself failed. The subprocess tests read what a terminal shows: stdout and stderr together."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from recbench.quiet import is_known


def run(tmp_path, module: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}
    env.pop("RECBENCH_DEBUG", None)
    return subprocess.run([sys.executable, "-m", module, *args], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)


def said_once(done: subprocess.CompletedProcess, prog: str, fragment: str) -> str:
    """The one stderr line ``<prog>: error: ...`` holding ``fragment``, which nothing else repeats."""
    errors = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith(f"{prog}: error: "), done.stderr[-3000:]
    assert (done.stdout + done.stderr).count(fragment) == 1, done.stdout[-3000:] + done.stderr[-3000:]
    assert fragment in errors[0]
    return errors[0]


def test_a_missing_criteo_file_fails_the_job_once_with_status_2(tmp_path):
    """The job fails inside Hydra (its data is prepared there): before, the reason was logged to
    stdout by the job and printed again on stderr by the command."""
    source = tmp_path / "nosuch" / "train.txt"
    done = run(tmp_path, "recbench.cli.train", "dataset=criteo_kaggle", f"dataset.source={source}",
               "tracking=memory", f"paths.data_root={tmp_path}/data")
    line = said_once(done, "recbench", f"source file {source} does not exist")
    assert done.returncode == 2 and "RECBENCH_DEBUG=1 shows the traceback" in line
    assert "Traceback" not in done.stderr


def test_a_bad_override_is_refused_before_hydra_runs(tmp_path):
    done = run(tmp_path, "recbench.cli.train", "nokey=3")
    said_once(done, "recbench", "nokey: no setting of this name")
    assert done.returncode == 2 and not (tmp_path / "outputs").exists()


def test_recbench_data_prints_no_third_party_info(tmp_path):
    """FBGEMM announced every library it loaded at INFO (14 lines): only recbench's own INFO lines
    reach the terminal, and no Python warning."""
    done = run(tmp_path, "recbench.cli.data", "prepare", "synthetic", "dataset.rows=2000",
               f"paths.data_root={tmp_path}/data")
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert any(line.startswith("INFO recbench.datasets") for line in lines)  # recbench's own progress stays
    foreign = [line for line in lines if not re.match(r"(INFO|WARNING) recbench[.:]", line)]
    assert foreign == [] and not any(is_known(line) for line in lines), foreign


# ---------------------------------------------------------------- in-process: one line, its status


def test_recbench_data_bad_name_override_and_value_are_one_line_status_2(tmp_path, capsys):
    """An unknown dataset was exit status 1, a bad override or value a traceback."""
    from recbench.cli.data import main

    assert main(["info", "nosuch"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("recbench-data: error: unknown dataset 'nosuch'; allowed: avazu, "), err
    assert main(["prepare", "synthetic", "dataset.nokey=3"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("recbench-data: error: dataset.nokey: no setting of this name in "
                                               "dataset; allowed: name, rows, seed"), err
    assert main(["info", "synthetic", "dataset.rows=abc", f"paths.data_root={tmp_path}"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == ["recbench-data: error: dataset.rows='abc' is not a number; allowed: an integer (default 1000000)"]
    assert not list(tmp_path.iterdir())


def test_recbench_eval_refuses_a_store_that_does_not_exist_without_creating_it(tmp_path, capsys):
    from recbench.cli.eval import main

    for uri, message in [(f"sqlite:///{tmp_path}/none.db", "there is no MLflow store at"),
                         (f"sqlite:///{tmp_path}/no/folder.db", "does not exist: create it")]:
        assert main(["abc", "--tracking-uri", uri]) == 2
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and err[0].startswith("recbench-eval: error: ") and message in err[0], err
    assert not list(tmp_path.iterdir())  # reading never makes a store


def test_recbench_sweep_bad_tracking_uri_is_one_line_status_2(tmp_path, capsys):
    """Was a traceback from the planner and exit status 1."""
    from recbench.cli.sweep import main

    code = main(["smoke", f"tracking.tracking_uri=sqlite:///{tmp_path}/no/mlflow.db", "--dry-run",
                 "--root", str(tmp_path / "sweeps")])
    err = capsys.readouterr().err.splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("recbench-sweep: error: the folder ")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("argv, message", [
    ([], "a preset is required; available: "),
    (["nosuch"], "unknown preset 'nosuch'; available: "),
    (["smoke", "trainer.nosuch=1", "--dry-run"], "trainer.nosuch: no setting of this name in trainer; allowed: "),
])
def test_recbench_sweep_bad_preset_or_override_is_one_line_status_2(argv, message, tmp_path, capsys):
    """No preset printed the list on stdout with status 2; a key no config has was a traceback."""
    from recbench.cli.sweep import main

    assert main([*argv, "--root", str(tmp_path / "sweeps")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"recbench-sweep: error: {message}")


def test_the_exit_status_of_a_failed_job_separates_bad_input_from_failed_work():
    from recbench.cli.train import EXIT_FAILED, EXIT_USAGE, _exit_status
    from recbench.datasets.errors import DatasetError
    from recbench.runs.config import ConfigError
    from recbench.training.checkpoint import CheckpointWriteError

    assert (EXIT_USAGE, EXIT_FAILED) == (2, 1)
    assert _exit_status(ConfigError("budget.compression_ratio must be a number")) == 2
    assert _exit_status(DatasetError("source file x does not exist")) == 2
    assert _exit_status(CheckpointWriteError("could not write the checkpoint: no space left")) == 1
