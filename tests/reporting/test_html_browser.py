"""The HTML report opened in headless Chromium: tables and figures render (screenshot, DOM rows)."""
from __future__ import annotations

import os
import re
import shutil
import subprocess

import numpy as np
import pytest
from report_fixtures import fixture_records

from recbench.reporting.report import build_reports


@pytest.fixture(scope="session")
def chromium() -> str:
    """The headless browser (Debian package ``chromium``), installed here when missing and possible."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    if shutil.which("apt-get") and hasattr(os, "geteuid") and os.geteuid() == 0:
        subprocess.run(["apt-get", "update", "-qq"], check=False, capture_output=True, timeout=600)
        subprocess.run(["apt-get", "install", "-y", "-qq", "chromium"], check=False, capture_output=True, timeout=1200)
        if shutil.which("chromium"):
            return shutil.which("chromium")
    pytest.skip("chromium is not installed and cannot be installed here (apt-get install chromium, as root)")


FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
         "--no-first-run", "--virtual-time-budget=5000"]


def test_html_report_renders_in_headless_chromium(tmp_path, chromium):
    (report,) = build_reports(fixture_records(), tmp_path / "reports", "http://127.0.0.1:5000", "fixture")
    url = report.index.resolve().as_uri()
    home = {"HOME": str(tmp_path)}
    shot = tmp_path / "shot.png"
    subprocess.run([chromium, *FLAGS, f"--user-data-dir={tmp_path / 'p1'}", f"--screenshot={shot}",
                    "--window-size=1400,2400", url], check=True, capture_output=True, timeout=120, env=home)
    assert shot.stat().st_size > 10_000
    from matplotlib.image import imread

    pixels = imread(shot)
    assert pixels.shape[0] >= 2000 and float(np.std(pixels[..., :3])) > 0.01  # not a blank page
    dom = subprocess.run([chromium, *FLAGS, f"--user-data-dir={tmp_path / 'p2'}", "--dump-dom", url],
                         check=True, capture_output=True, timeout=120, text=True, env=home).stdout
    # rows counted in the rendered DOM: 4 budgets (1, 0.1, 0.01 and full's 1) -> fixture rows
    leaderboard_rows = len(re.findall(r'<tr class="row (?:best|tie|finished|infeasible|failed)"', dom))
    assert leaderboard_rows == len(report.rows) == 9
    assert dom.count('<table class="leaderboard"') == 3
    assert len(re.findall(r'<table class="recommendation">.*?</table>', dom, re.S)) == 1
    assert 'data-figures-rendered="2"' in dom  # both embedded PNGs decoded by the browser
    assert 'data-page-fits-width="true"' in dom  # no sideways scrolling of the whole page
