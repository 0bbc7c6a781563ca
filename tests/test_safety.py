"""Safety rules (docs/architecture.md section 8), checked over the source: checkpoints load with
``weights_only=True``; no shell string is built (no ``shell=True``, ``os.system``, ``os.popen``);
the MLflow UI of ``make dashboard`` binds to 127.0.0.1.

One call is allowed by name, with its reason: a run's kept model (``recbench.load_run``,
``recbench-eval``) is a whole pickled module, as ``mlflow.pytorch.load_model`` reads one.
``weights_only=True`` cannot rebuild it: its modules carry hooks (``functools.partial``), numpy
dtypes and the module classes of multi-stage methods rebuilt between stages; allowing those
globals would allow arbitrary callables anyway. The README and the docstrings say: load only
runs you trust."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SOURCES = sorted((REPO / "recbench").rglob("*.py")) + sorted((REPO / "benchmarks").rglob("*.py"))


@pytest.mark.parametrize("pattern, why", [
    (r"shell\s*=\s*True", "a shell string built from values"),
    (r"\bos\.system\(", "a shell string built from values"),
    (r"\bos\.popen\(", "a shell string built from values"),
    (r"torch\.load\((?![^)]*weights_only\s*=\s*True)", "torch.load without weights_only=True"),
])
def test_no_unsafe_calls(pattern, why):
    hits = [f"{p.relative_to(REPO)}:{n}" for p in SOURCES
            for n, line in enumerate(p.read_text().splitlines(), 1)
            if re.search(pattern, line) and not line.lstrip().startswith("#")
            and not (p.relative_to(REPO).as_posix() in ALLOWED and ALLOWED[p.relative_to(REPO).as_posix()] in line)]
    assert hits == [], f"{why}: {hits}"


#: {file: the one call allowed there} (see the module docstring)
ALLOWED = {"recbench/runs/kept.py": "torch.load(client.download_artifacts(run_id, MODEL_ARTIFACT, tmp), weights_only=False)"}


def test_the_allowed_call_is_the_kept_model_loader_only():
    text = (REPO / "recbench" / "runs" / "kept.py").read_text()
    assert text.count("torch.load(") == 1 and ALLOWED["recbench/runs/kept.py"] in text


def test_dashboard_binds_to_loopback():
    dashboard = re.search(r"^dashboard:.*?\n((?:\t.*\n)+)", (REPO / "Makefile").read_text(), re.M)
    assert dashboard and "--host 127.0.0.1" in dashboard.group(1)
