"""Report-test fixtures: the fixture runs and a headless Chromium."""
from __future__ import annotations

import os
import shutil
import subprocess
from typing import Any, Dict, List

import pytest
from report_fixtures import fixture_records


@pytest.fixture
def records() -> List[Dict[str, Any]]:
    return fixture_records()


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
