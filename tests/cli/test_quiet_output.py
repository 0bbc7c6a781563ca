"""What a user sees is recbench's own: the known third-party notices (``recbench.quiet``) are
dropped by message and emitting module at the entry points, in the launcher and in its parallel
workers, and nothing else is hidden."""
from __future__ import annotations

import logging
import subprocess
import warnings

import pytest

from recbench.quiet import KNOWN_LOG_RECORDS, KNOWN_WARNINGS, quiet_known_warnings
from test_sweep import TOY_PRESET as SWEEP_PRESET, toy_sweep  # noqa: F401 (the fixture)

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


TOY_PRESET = SWEEP_PRESET.replace("method: hashing", "method: robe,hashing").replace("seed: 0,1,2", "seed: 0")


@pytest.mark.slow  # ~70 s (two joblib workers and two launches); the filters themselves are tested above, and
# tests/cli/test_errors.py checks a command's output for third-party lines in the default suite
def test_a_parallel_sweep_prints_no_third_party_warning(toy_sweep):
    """robe's sparse Adagrad step raised torch's sparse-invariant notice and TorchRec's KJT code
    the is_fx_tracing notice, in every joblib worker; the sweep's output has neither (nor any other
    Python warning) and still has recbench's own lines."""
    assert "method: robe,hashing" in TOY_PRESET and "seed: 0\n" in TOY_PRESET
    command, env, tmp_path = toy_sweep
    (tmp_path / "conf" / "sweep" / "toy.yaml").write_text(TOY_PRESET)
    env.pop("PYTHONWARNINGS", None)
    done = subprocess.run(command + ["--jobs", "2"], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=400)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-3000:]
    assert "finished 3" in out, out[-3000:]  # robe, hashing and the full reference ran
    lines = [line for line in out.splitlines() if "Warning" in line or "is_fx_tracing" in line]
    assert lines == [], "\n".join(lines)
