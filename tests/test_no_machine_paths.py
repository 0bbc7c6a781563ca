"""Committed results name no path of the machine that produced them (a user's machine has none)."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: this checkout, or the usual places of someone's machine (a relative path or a URI like sqlite:///x is fine)
MACHINE_PATH = re.compile(re.escape(str(ROOT)) + r"|(?<![\w:/])/(?:work|home|tmp|Users|root|opt)/")


def test_committed_results_and_reports_hold_no_absolute_machine_path():
    offenders = []
    for folder in (ROOT / "benchmarks" / "results", ROOT / "reports" / "reference"):
        for path in folder.rglob("*"):
            if path.suffix in {".json", ".md", ".html", ".csv"} and MACHINE_PATH.search(path.read_text(errors="ignore")):
                offenders.append(str(path.relative_to(ROOT)))
    assert not offenders, offenders
