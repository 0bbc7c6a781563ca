"""The HTML report opened in headless Chromium at 1400 px and 420 px: screenshots, the layout read back
from the rendered DOM (no sideways scrolling of the page, figures decoded, the decision table first,
contents links resolving) and the column sorting run by the page's own script."""
from __future__ import annotations

import os
import re
import shutil
import subprocess

import numpy as np
import pytest
from report_fixtures import fixture_records, record

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


def _records():
    runs = fixture_records()
    runs.append(record("pep", 0.1, 0, 0.779, 90.0, **{"stage/search/target_reached": 0.0}))  # one seed, a caveat
    return runs


def _browser(chromium, tmp_path, name, url, *args) -> str:
    profile = tmp_path / f"profile-{name}"
    return subprocess.run([chromium, *FLAGS, f"--user-data-dir={profile}", *args, url], check=True,
                          capture_output=True, timeout=120, text=True, env={"HOME": str(tmp_path)}).stdout


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """Built once for the module (the figures take a few seconds)."""
    (built,) = build_reports(_records(), tmp_path_factory.mktemp("reports"), "http://127.0.0.1:5000", "fixture `made`")
    return built


@pytest.mark.parametrize("width", [1400, 420])
def test_html_report_at_desktop_and_phone_width(tmp_path, chromium, report, width):
    url = report.index.resolve().as_uri()
    shot = tmp_path / f"report-{width}.png"
    _browser(chromium, tmp_path, f"shot{width}", url, f"--screenshot={shot}", f"--window-size={width},2400")
    from matplotlib.image import imread

    pixels = imread(shot)
    assert pixels.shape[:2] == (2400, width) and float(np.std(pixels[..., :3])) > 0.01  # not a blank page
    dom = _browser(chromium, tmp_path, f"dom{width}", url, "--dump-dom", f"--window-size={width},2400")
    leaderboard_rows = len(re.findall(r'<tr class="row (?:best|near|finished|infeasible|failed)', dom))
    assert leaderboard_rows == len(report.rows) == 10
    assert dom.count('<table class="leaderboard"') == 3
    assert re.search(r"<table[^>]*>", dom).group(0) == '<table class="recommendation">'  # the first table
    assert 'data-figures-rendered="2"' in dom  # both embedded PNGs decoded by the browser
    assert 'data-page-fits-width="true"' in dom  # no sideways scrolling of the whole page
    ids = set(re.findall(r'\sid="([^"]+)"', dom))
    toc = dom[dom.index('<nav class="toc"'):dom.index("</nav>")]
    anchors = re.findall(r'href="#([^"]+)"', toc)
    assert len(anchors) == 8 and set(anchors) <= ids  # protocol, decision, figures, 3 budgets, rules, provenance
    scrolled = int(re.search(r'data-tables-scrolled="(\d+)"', dom).group(1))
    if width == 1400:
        assert scrolled == 0  # every table fits: nothing hidden to the right
    else:
        assert scrolled > 0  # the page fits because wide tables scroll inside their own box


SORT_PROBE = """<script>window.addEventListener('load',function(){
var t=document.querySelector('table.leaderboard[data-ratio="0.1"]'),h=t.tHead.rows[0].cells;
function order(){return Array.prototype.map.call(t.tBodies[0].rows,
  function(r){return r.cells[1].textContent;}).join('|');}
function click(i){h[i].dispatchEvent(new MouseEvent('click',{bubbles:true}));return order();}
document.body.setAttribute('data-probe',[click(8),click(8),click(1),click(3)].join(';'));});</script>"""


def test_clicking_a_header_sorts_its_leaderboard_by_the_raw_numbers(tmp_path, chromium, report):
    page = report.index.read_text()
    probe = report.index.with_name("probe.html")
    probe.write_text(page.replace("</body>", SORT_PROBE + "</body>"))  # the test clicks; the page is unchanged
    dom = _browser(chromium, tmp_path, "sort", probe.resolve().as_uri(), "--dump-dom")
    bytes_up, bytes_down, by_name, by_auc = re.search(r'data-probe="([^"]*)"', dom).group(1).split(";")
    # inference bytes: pep 90 B, hashing and robe 100 B, qr 110 B (numbers, not the text "90 B" > "110 B");
    # the infeasible dhe has no number and stays at the bottom
    assert bytes_up.split("|") == ["pep †1 seed", "hashing", "robe", "qr", "dhe"]
    assert bytes_down.split("|") == ["qr", "hashing", "robe", "pep †1 seed", "dhe"]
    assert by_name.split("|") == ["hashing", "pep †1 seed", "qr", "robe", "dhe"]
    assert by_auc.split("|") == ["robe", "pep †1 seed", "hashing", "qr", "dhe"]
