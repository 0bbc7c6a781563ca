"""Fetching MovieLens-100K from the ``recbole==1.2.1`` wheel on PyPI, and verifying its files.

``fetch_recbole`` downloads the wheel with pip (``--no-deps --only-binary=:all:``), extracts only
the three atomic files at ``recbole/dataset_example/ml-100k/`` into a staging folder, verifies
their sha256 against ``RECBOLE_FILES`` and renames them into place, so the raw folder never holds
a partial or unverified file.

References:
    W. X. Zhao et al. 2021. RecBole: Towards a Unified, Comprehensive and Efficient Framework
    for Recommendation Algorithms. CIKM 2021 (the atomic-file copy of MovieLens-100K).
    F. Maxwell Harper and Joseph A. Konstan. 2015. The MovieLens Datasets: History and Context.
    ACM Transactions on Interactive Intelligent Systems 5, 4, Article 19.
"""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Dict, List, Mapping, Tuple

from recbench.datasets.errors import DatasetError
from recbench.datasets.storage import sha256_file

log = logging.getLogger(__name__)

RECBOLE_REQUIREMENT = "recbole==1.2.1"
RECBOLE_WHEEL_FOLDER = "recbole/dataset_example/ml-100k"
# sha256 of the files inside recbole-1.2.1-py3-none-any.whl
# (wheel sha256 9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407).
RECBOLE_FILES: Dict[str, str] = {
    "ml-100k.inter": "4edb74e2a81178c2ba9ff381495f754f996c4aea351b1272ca36b43da0935eff",
    "ml-100k.user": "4f670007d9cfbeb9807e757209af1555b9bcc186bde25e767f67cb67c6dd5972",
    "ml-100k.item": "51d7cdf777ce5c0f5b32c1d947a4a81fe07d75e78abbe761e0cd4d0756064532",
}


def checksum_problems(directory: Path, expected: Mapping[str, str]) -> Tuple[List[str], Dict[str, str]]:
    """(missing file names, {name: actual sha256} of files whose checksum differs)."""
    missing, mismatched = [], {}
    for name, digest in expected.items():
        path = directory / name
        if not path.is_file():
            missing.append(name)
            continue
        actual = sha256_file(path)
        if actual != digest:
            mismatched[name] = actual
    return missing, mismatched


def _mismatch_error(directory: Path, expected: Mapping[str, str], mismatched: Mapping[str, str]) -> DatasetError:
    lines = [
        f"{directory / name}: sha256 mismatch (expected {expected[name]}, got {actual})"
        for name, actual in mismatched.items()
    ]
    return DatasetError(
        "; ".join(lines)
        + ". The file was modified or is not the recbole==1.2.1 copy of MovieLens-100K; delete it"
        " and run `recbench-data fetch movielens100k` (or call fetch(data_root, force=True))."
    )


def verify_recbole_files(raw_dir: Path) -> Dict[str, str]:
    """Check that every RecBole file is present with its known sha256; return the checksums."""
    raw_dir = Path(raw_dir)
    missing, mismatched = checksum_problems(raw_dir, RECBOLE_FILES)
    if missing:
        raise DatasetError(
            f"{raw_dir}: missing {', '.join(missing)}; run `recbench-data fetch movielens100k`"
            " or prepare() the protocol, which fetches them"
        )
    if mismatched:
        raise _mismatch_error(raw_dir, RECBOLE_FILES, mismatched)
    return dict(RECBOLE_FILES)


def fetch_recbole(raw_dir: Path, force: bool = False, python: str = sys.executable) -> Path:
    """Download the ``recbole==1.2.1`` wheel with pip and extract only its MovieLens-100K files.

    Does nothing when every file is already present with its known checksum. The files are
    extracted into a temporary directory next to ``raw_dir``, verified, then renamed into place,
    so ``raw_dir`` never holds a partial or unverified file. A present file with a wrong
    checksum is an error unless ``force`` (then it is replaced).
    """
    raw_dir = Path(raw_dir)
    missing, mismatched = checksum_problems(raw_dir, RECBOLE_FILES)
    if not missing and not mismatched:
        return raw_dir
    if mismatched and not force:
        raise _mismatch_error(raw_dir, RECBOLE_FILES, mismatched)
    raw_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=raw_dir.parent) as tmp:
        download_dir, staging = Path(tmp) / "download", Path(tmp) / "staging"
        staging.mkdir()
        command = [
            python, "-m", "pip", "download", RECBOLE_REQUIREMENT,
            "--no-deps", "--only-binary=:all:", "--disable-pip-version-check", "-d", str(download_dir),
        ]
        log.info("movielens100k: downloading the %s wheel with pip to extract MovieLens-100K", RECBOLE_REQUIREMENT)
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-5:])
            raise DatasetError(
                f"`{' '.join(command)}` failed with exit code {result.returncode}:\n{tail}\n"
                "PyPI must be reachable through pip; otherwise set source=grouplens and"
                " grouplens_dir to a directory holding u.data, u.user and u.item."
            )
        wheels = sorted(download_dir.glob("recbole-*.whl"))
        if len(wheels) != 1:
            raise DatasetError(f"{download_dir}: expected one recbole wheel after pip download, found {wheels}")
        with zipfile.ZipFile(wheels[0]) as wheel:
            for name in RECBOLE_FILES:
                member = f"{RECBOLE_WHEEL_FOLDER}/{name}"
                try:
                    source = wheel.open(member)
                except KeyError as exc:
                    raise DatasetError(f"{wheels[0].name}: has no member {member}") from exc
                with source, open(staging / name, "wb") as target:
                    shutil.copyfileobj(source, target)
        _, bad = checksum_problems(staging, RECBOLE_FILES)
        if bad:
            raise _mismatch_error(staging, RECBOLE_FILES, bad)
        for name in RECBOLE_FILES:
            os.replace(staging / name, raw_dir / name)
    log.info("movielens100k: verified %s in %s", ", ".join(RECBOLE_FILES), raw_dir)
    return raw_dir
