"""Committed results name no path of the machine that produced them (a user's machine has none)."""
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_committed_results_and_reports_hold_no_absolute_path_of_this_checkout():
    offenders = []
    for folder in (ROOT / "benchmarks" / "results", ROOT / "reports" / "reference"):
        for path in folder.rglob("*"):
            if path.suffix in {".json", ".md", ".html", ".csv"} and str(ROOT) in path.read_text(errors="ignore"):
                offenders.append(str(path.relative_to(ROOT)))
    assert not offenders, offenders
