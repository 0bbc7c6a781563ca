"""Safety rules (docs/architecture.md section 8), checked over the source: checkpoints load with
``weights_only=True``; no shell string is built (no ``shell=True``, ``os.system``, ``os.popen``);
the MLflow UI of ``make dashboard`` binds to 127.0.0.1."""
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
            if re.search(pattern, line) and not line.lstrip().startswith("#")]
    assert hits == [], f"{why}: {hits}"


def test_dashboard_binds_to_loopback():
    dashboard = re.search(r"^dashboard:.*?\n((?:\t.*\n)+)", (REPO / "Makefile").read_text(), re.M)
    assert dashboard and "--host 127.0.0.1" in dashboard.group(1)
