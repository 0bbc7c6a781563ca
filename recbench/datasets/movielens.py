"""The ``movielens100k`` protocols: MovieLens-100K as click-through prediction.

100,000 ratings (1-5) of 1,682 movies by 943 users. A rating >= ``label_threshold`` (4 by
default, about 55% of the rows) is a positive; the raw rating is kept as the extra target
``rating``. Eight categorical fields, in table order::

    user, item, age, gender, occupation, zip, release_year, genres (multi-hot, mean pooling)

plus two dense features (age and release year, standardised with training-split statistics;
a missing release year is 0). Vocabularies and frequency counts come from the training split
only; row 0 of every table is the OOV row (a value unseen in training, or missing).

Splits: ``random`` (default, protocol ``movielens100k``): 8:1:1 by a seeded permutation;
``temporal`` (protocol ``movielens100k_temporal``): the rows sorted by timestamp (ties in file
order), first 80% train, next 10% validation, last 10% test.

Sources (both give the same protocol arrays; only the source checksum in the id differs):

- ``recbole`` (default, offline-friendly): the atomic files shipped inside the PyPI wheel
  ``recbole==1.2.1`` at ``recbole/dataset_example/ml-100k/``; ``fetch`` downloads the wheel with
  pip, extracts only those files and verifies their sha256 against the constants below.
- ``grouplens``: the original ``u.data``, ``u.user`` and ``u.item`` from a directory the user
  gives (``grouplens_dir``).

The release year is the year in the last ``(yyyy)`` of the movie title: RecBole derived its
``release_year`` column that way (it ships no release date), so the same rule applied to the
GroupLens titles gives identical arrays. Item 267 ("unknown") has no year and maps to OOV.

References:
    F. Maxwell Harper and Joseph A. Konstan. 2015. The MovieLens Datasets: History and Context.
    ACM Transactions on Interactive Intelligent Systems 5, 4, Article 19.
    GroupLens Research, MovieLens 100K Dataset, https://grouplens.org/datasets/movielens/100k/
    W. X. Zhao et al. 2021. RecBole: Towards a Unified, Comprehensive and Efficient Framework
    for Recommendation Algorithms. CIKM 2021 (the atomic-file copy used as the default source).
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import pandas as pd

from recbench.datasets.base import DatasetError, DatasetProtocol
from recbench.datasets.storage import (
    FORMAT_VERSION,
    CacheWriter,
    PreparedDataset,
    sha256_file,
    spec_to_manifest,
    write_split,
)
from recbench.types import DatasetSpec, TableSpec

log = logging.getLogger(__name__)

DATASET_DIR = "movielens100k"  # <data_root>/movielens100k/raw holds the fetched files
# Bump whenever a rule in this module changes the arrays without changing a setting.
PROTOCOL_FORMAT_VERSION = 1

RECBOLE_REQUIREMENT = "recbole==1.2.1"
RECBOLE_WHEEL_FOLDER = "recbole/dataset_example/ml-100k"
# sha256 of the files inside recbole-1.2.1-py3-none-any.whl
# (wheel sha256 9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407).
RECBOLE_FILES: Dict[str, str] = {
    "ml-100k.inter": "4edb74e2a81178c2ba9ff381495f754f996c4aea351b1272ca36b43da0935eff",
    "ml-100k.user": "4f670007d9cfbeb9807e757209af1555b9bcc186bde25e767f67cb67c6dd5972",
    "ml-100k.item": "51d7cdf777ce5c0f5b32c1d947a4a81fe07d75e78abbe761e0cd4d0756064532",
}

# u.genre order: the 19 flag columns of u.item, and the genres' row order in the table.
GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
    "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance",
    "Sci-Fi", "Thriller", "War", "Western",
)
# u.occupation
OCCUPATIONS = (
    "administrator", "artist", "doctor", "educator", "engineer", "entertainment", "executive",
    "healthcare", "homemaker", "lawyer", "librarian", "marketing", "none", "other", "programmer",
    "retired", "salesman", "scientist", "student", "technician", "writer",
)
GENDERS = ("F", "M")
RATINGS = (1, 2, 3, 4, 5)
AGE_RANGE = (0, 130)

SINGLE_HOT_FIELDS = ("user", "item", "age", "gender", "occupation", "zip", "release_year")
MULTI_HOT_FIELD = "genres"
FIELDS = SINGLE_HOT_FIELDS + (MULTI_HOT_FIELD,)
DENSE_FEATURES = ("age", "release_year")
SPLIT_RULES = ("random", "temporal")
SOURCES = ("recbole", "grouplens")

_TITLE_YEAR = r".*\((\d{4})\)"  # greedy: the last "(yyyy)" of a title


# ----------------------------------------------------------------------------------------------
# fetching and verifying the raw files
# ----------------------------------------------------------------------------------------------


def raw_dir_of(data_root: Path) -> Path:
    """``<data_root>/movielens100k/raw``: where the RecBole files are fetched to."""
    return Path(data_root) / DATASET_DIR / "raw"


def _checksum_problems(directory: Path, expected: Mapping[str, str]) -> Tuple[List[str], Dict[str, str]]:
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
    missing, mismatched = _checksum_problems(raw_dir, RECBOLE_FILES)
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
    missing, mismatched = _checksum_problems(raw_dir, RECBOLE_FILES)
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
        _, bad = _checksum_problems(staging, RECBOLE_FILES)
        if bad:
            raise _mismatch_error(staging, RECBOLE_FILES, bad)
        for name in RECBOLE_FILES:
            os.replace(staging / name, raw_dir / name)
    log.info("movielens100k: verified %s in %s", ", ".join(RECBOLE_FILES), raw_dir)
    return raw_dir


def fetch(data_root: Path, force: bool = False) -> Path:
    """Fetch the default (RecBole) source into ``<data_root>/movielens100k/raw``; return that path."""
    return fetch_recbole(raw_dir_of(data_root), force=force)


# ----------------------------------------------------------------------------------------------
# parsing: both sources -> one normalised form
# ----------------------------------------------------------------------------------------------


@dataclass
class RawMovieLens:
    """Normalised source tables.

    interactions: user, item (int64), rating (int64), timestamp (int64), line (file line number).
    users: indexed by user id: age (int64), gender, occupation, zip (str).
    items: indexed by item id: release_year (Int64, <NA> when unknown).
    item_genres: one row per (item, genre) pair: item (int64), genre (str).
    files: the source files by role ("interactions", "users", "items"), for error messages.
    """

    interactions: pd.DataFrame
    users: pd.DataFrame
    items: pd.DataFrame
    item_genres: pd.DataFrame
    files: Dict[str, Path]


def _read_delimited(
    path: Path, separator: str, columns: Sequence[str], encoding: str, header: bool
) -> pd.DataFrame:
    """Read a delimited text file as strings; every line must have exactly len(columns) fields.

    With ``header``, the first line names the columns (any order, extra columns ignored) and
    ``columns`` are selected by name. The result has a ``line`` column (1-based file line).
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: file not found")
    try:
        text = path.read_bytes().decode(encoding)
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{path}: not valid {encoding} text ({exc})") from exc
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    first_line = 1
    if header:
        if not lines:
            raise DatasetError(f"{path}: empty file (expected a header line)")
        names = lines[0].rstrip("\r").split(separator)
        lost = [c for c in columns if c not in names]
        if lost:
            raise DatasetError(f"{path}:1: header lacks column(s) {lost}; found {names}")
        lines, first_line, width = lines[1:], 2, len(names)
    else:
        names, width = list(columns), len(columns)
    series = pd.Series(lines, dtype=object).str.rstrip("\r")
    numbers = np.arange(first_line, first_line + len(series))
    field_counts = series.str.count(re.escape(separator)).to_numpy() + 1
    bad = np.flatnonzero(field_counts != width)
    if len(bad):
        first = int(bad[0])
        raise DatasetError(
            f"{path}:{numbers[first]}: expected {width} {separator!r}-separated columns, found"
            f" {field_counts[first]} ({len(bad)} malformed line(s) in the file)"
        )
    if len(series) == 0:
        raise DatasetError(f"{path}: no data lines")
    table = series.str.split(separator, expand=True, regex=False)
    table.columns = names
    out = table[list(columns)].copy()
    out["line"] = numbers
    return out.reset_index(drop=True)


def _fail_rows(path: Path, frame: pd.DataFrame, bad: np.ndarray, column: str, field: str, allowed: str) -> None:
    """Raise a DatasetError naming the first row flagged in ``bad`` (a boolean mask)."""
    rows = np.flatnonzero(bad)
    if len(rows):
        first = rows[0]
        raise DatasetError(
            f"{path}:{frame['line'].iat[first]}: field {field!r} has value {frame[column].iat[first]!r};"
            f" allowed: {allowed} ({len(rows)} bad row(s) in the file)"
        )


#: the largest integer bound a field may have: float64 (the parse below) holds every integer up to
#: 2**53 exactly, so a larger id or timestamp would be rounded or wrapped silently
MAX_EXACT_INTEGER = 2**53


def _integers(path: Path, frame: pd.DataFrame, column: str, field: str, low: int, high: Optional[int] = None) -> np.ndarray:
    """Parse a column of decimal integers in [low, high] (a trailing ``.0`` is accepted);
    ``high=None`` means ``MAX_EXACT_INTEGER``."""
    text = frame[column].str.strip()
    numbers = pd.to_numeric(text.where(text.str.fullmatch(r"[+-]?\d+(\.0*)?"), None), errors="coerce")
    values = numbers.to_numpy(dtype=np.float64, na_value=np.nan)
    high = MAX_EXACT_INTEGER if high is None else high
    bad = np.isnan(values) | (values < low) | (values > high)
    allowed = f"integers in [{low}, {high}]"
    _fail_rows(path, frame, bad, column, field, allowed)
    return values.astype(np.int64)


def _choice(path: Path, frame: pd.DataFrame, column: str, field: str, allowed: Sequence[str]) -> pd.Series:
    values = frame[column].str.strip()
    _fail_rows(path, frame, ~values.isin(allowed).to_numpy(), column, field, ", ".join(map(str, allowed)))
    return values


def _unique_ids(path: Path, frame: pd.DataFrame, column: str, ids: np.ndarray, field: str) -> None:
    duplicated = pd.Series(ids).duplicated().to_numpy()
    _fail_rows(path, frame, duplicated, column, field, "each id once per file")


def _title_years(titles: pd.Series) -> pd.Series:
    return pd.to_numeric(titles.str.extract(_TITLE_YEAR, expand=False), errors="coerce").astype("Int64")


def _normalise_users(path: Path, frame: pd.DataFrame, columns: Sequence[str]) -> pd.DataFrame:
    user_column, age_column, gender_column, occupation_column, zip_column = columns
    ids = _integers(path, frame, user_column, "user", 1)
    _unique_ids(path, frame, user_column, ids, "user")
    return pd.DataFrame(
        {
            "age": _integers(path, frame, age_column, "age", *AGE_RANGE),
            "gender": _choice(path, frame, gender_column, "gender", GENDERS).to_numpy(),
            "occupation": _choice(path, frame, occupation_column, "occupation", OCCUPATIONS).to_numpy(),
            "zip": frame[zip_column].str.strip().str.upper().to_numpy(),
        },
        index=pd.Index(ids, name="user"),
    )


def _normalise_interactions(path: Path, frame: pd.DataFrame, columns: Sequence[str]) -> pd.DataFrame:
    user_column, item_column, rating_column, timestamp_column = columns
    rating = _integers(path, frame, rating_column, "rating", RATINGS[0], RATINGS[-1])
    return pd.DataFrame(
        {
            "user": _integers(path, frame, user_column, "user", 1),
            "item": _integers(path, frame, item_column, "item", 1),
            "rating": rating,
            "timestamp": _integers(path, frame, timestamp_column, "timestamp", 0),
            "line": frame["line"].to_numpy(),
        }
    )


@dataclass(frozen=True)
class _Layout:
    """How one source lays out its three files (names by role, separators, columns)."""

    files: Mapping[str, str]
    separators: Mapping[str, str]
    encoding: str
    header: bool
    interaction_columns: Tuple[str, ...]  # user, item, rating, timestamp
    user_columns: Tuple[str, ...]  # user, age, gender, occupation, zip
    item_columns: Tuple[str, ...]  # item id first


RECBOLE_LAYOUT = _Layout(
    files={"interactions": "ml-100k.inter", "users": "ml-100k.user", "items": "ml-100k.item"},
    separators={"interactions": "\t", "users": "\t", "items": "\t"},
    encoding="utf-8",
    header=True,
    interaction_columns=("user_id:token", "item_id:token", "rating:float", "timestamp:float"),
    user_columns=("user_id:token", "age:token", "gender:token", "occupation:token", "zip_code:token"),
    item_columns=("item_id:token", "movie_title:token_seq", "release_year:token", "class:token_seq"),
)
GROUPLENS_LAYOUT = _Layout(
    files={"interactions": "u.data", "users": "u.user", "items": "u.item"},
    separators={"interactions": "\t", "users": "|", "items": "|"},
    encoding="latin-1",
    header=False,
    interaction_columns=("user", "item", "rating", "timestamp"),
    user_columns=("user", "age", "gender", "occupation", "zip"),
    item_columns=("item", "title", "release_date", "video_release_date", "imdb_url")
    + tuple(f"genre_{i}" for i in range(len(GENRES))),
)
GROUPLENS_FILES = tuple(GROUPLENS_LAYOUT.files.values())


def _read_source(directory: Path, layout: _Layout):
    """Parse interactions and users, and read the item file: (files, interactions, users, item frame, item ids)."""
    files = {role: Path(directory) / name for role, name in layout.files.items()}

    def read(role: str, columns: Sequence[str]) -> pd.DataFrame:
        return _read_delimited(files[role], layout.separators[role], columns, layout.encoding, layout.header)

    interactions = _normalise_interactions(
        files["interactions"], read("interactions", layout.interaction_columns), layout.interaction_columns
    )
    users = _normalise_users(files["users"], read("users", layout.user_columns), layout.user_columns)
    frame = read("items", layout.item_columns)
    item_ids = _integers(files["items"], frame, layout.item_columns[0], "item", 1)
    _unique_ids(files["items"], frame, layout.item_columns[0], item_ids, "item")
    return files, interactions, users, frame, item_ids


def load_recbole(raw_dir: Path) -> RawMovieLens:
    """Parse the RecBole atomic files (tab-separated, typed headers, UTF-8)."""
    files, interactions, users, frame, item_ids = _read_source(raw_dir, RECBOLE_LAYOUT)
    # RecBole's release_year is the title's "(yyyy)"; two titles were split differently
    # ("unkonwn" and "V"), so the year falls back to a "(yyyy)" left in its title.
    year_token = frame["release_year:token"].str.strip()
    years = pd.to_numeric(year_token.where(year_token.str.fullmatch(r"\d{4}"), None), errors="coerce").astype("Int64")
    years = years.fillna(_title_years(frame["movie_title:token_seq"]))
    tokens = frame["class:token_seq"].str.strip().str.split(" ")
    per_item = tokens.str.len().to_numpy()
    pairs = pd.DataFrame(
        {
            "item": np.repeat(item_ids, per_item),
            "genre": np.concatenate(tokens.to_numpy()),
            "line": np.repeat(frame["line"].to_numpy(), per_item),
        }
    )
    pairs = pairs[pairs["genre"] != ""].reset_index(drop=True)
    _fail_rows(files["items"], pairs, ~pairs["genre"].isin(GENRES).to_numpy(), "genre", "genres", ", ".join(GENRES))
    items = pd.DataFrame({"release_year": years.to_numpy()}, index=pd.Index(item_ids, name="item"))
    return RawMovieLens(interactions, users, items, pairs[["item", "genre"]], files)


def load_grouplens(directory: Path) -> RawMovieLens:
    """Parse the original GroupLens files: u.data (tab), u.user and u.item ('|', latin-1)."""
    files, interactions, users, frame, item_ids = _read_source(directory, GROUPLENS_LAYOUT)
    flag_columns = GROUPLENS_LAYOUT.item_columns[5:]
    flags = np.stack(
        [_integers(files["items"], frame, c, f"genres flag {g!r}", 0, 1) for g, c in zip(GENRES, flag_columns)], axis=1
    )
    item_rows, genre_columns = np.nonzero(flags)
    pairs = pd.DataFrame({"item": item_ids[item_rows], "genre": np.asarray(GENRES, dtype=object)[genre_columns]})
    items = pd.DataFrame({"release_year": _title_years(frame["title"]).to_numpy()}, index=pd.Index(item_ids, name="item"))
    return RawMovieLens(interactions, users, items, pairs, files)


def _lookup(index: pd.Index, ids: np.ndarray, raw: RawMovieLens, field: str, role: str) -> np.ndarray:
    """Positions of ``ids`` in ``index``; an id missing from the side file is an error."""
    positions = index.get_indexer(ids)
    missing = np.flatnonzero(positions < 0)
    if len(missing):
        first = missing[0]
        raise DatasetError(
            f"{raw.files['interactions']}:{raw.interactions['line'].iat[first]}: {field} {ids[first]} is not in"
            f" {raw.files[role]} ({len(missing)} interaction(s) reference unknown {field}s)"
        )
    return positions


# ----------------------------------------------------------------------------------------------
# splits, vocabularies, features
# ----------------------------------------------------------------------------------------------


def bags_of(values: np.ndarray, offsets: np.ndarray, index: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Concatenate the bags ``values[offsets[i]:offsets[i + 1]]`` for each i in ``index``.

    Returns (values, lengths); vectorised (no Python loop over bags).
    """
    starts = offsets[index]
    lengths = offsets[index + 1] - starts
    shift = np.repeat(starts - (np.cumsum(lengths) - lengths), lengths)
    return values[shift + np.arange(int(lengths.sum()))], lengths


def split_sizes(num_rows: int, fractions: Sequence[float]) -> Tuple[int, int, int]:
    train = int(round(num_rows * fractions[0]))
    val = int(round(num_rows * fractions[1]))
    return train, val, num_rows - train - val


def split_rows(
    num_rows: int, rule: str, seed: int, fractions: Sequence[float], timestamps: Optional[np.ndarray] = None
) -> Dict[str, np.ndarray]:
    """Row indices (into the interactions file, 0-based) of each split.

    ``random``: a permutation seeded by ``seed``; each split's rows are kept in file order.
    ``temporal``: a stable sort by timestamp (ties keep file order), cut into consecutive parts.
    """
    if rule == "random":
        order = np.random.default_rng(seed).permutation(num_rows)
    elif rule == "temporal":
        if timestamps is None or len(timestamps) != num_rows:
            raise ValueError("the temporal split needs one timestamp per row")
        order = np.argsort(timestamps, kind="stable")
    else:
        raise ValueError(f"unknown split rule {rule!r}; allowed: {', '.join(SPLIT_RULES)}")
    train, val, _ = split_sizes(num_rows, fractions)
    parts = {"train": order[:train], "val": order[train : train + val], "test": order[train + val :]}
    if rule == "random":
        parts = {name: np.sort(rows) for name, rows in parts.items()}
    return {name: rows.astype(np.int64) for name, rows in parts.items()}


def encode_field(values: pd.Series, train_rows: np.ndarray) -> Tuple[np.ndarray, List[Any], np.ndarray]:
    """Map values to table rows: 1.. for the values seen in ``train_rows`` (sorted), 0 for unseen or missing.

    Returns (codes int64 for every row, vocabulary list for rows 1.., training counts int64).
    """
    vocabulary = sorted(values.iloc[train_rows].dropna().unique().tolist())
    codes = pd.Categorical(values, categories=vocabulary).codes.astype(np.int64) + 1
    counts = np.bincount(codes[train_rows], minlength=len(vocabulary) + 1).astype(np.int64)
    return codes, vocabulary, counts


def _standardise(values: np.ndarray, train_rows: np.ndarray) -> Tuple[np.ndarray, Dict[str, float]]:
    """(x - train mean) / train std; NaN (missing) becomes 0, the training mean."""
    train = values[train_rows]
    mean = float(np.nanmean(train))
    std = float(np.nanstd(train)) or 1.0
    out = np.nan_to_num((values - mean) / std, nan=0.0).astype(np.float32)
    return out, {"mean": mean, "std": std}


# ----------------------------------------------------------------------------------------------
# the protocol
# ----------------------------------------------------------------------------------------------


class MovieLens100K(DatasetProtocol):
    """MovieLens-100K click-through protocol (see the module docstring for every rule).

    Args:
        split: "random" (protocol ``movielens100k``) or "temporal" (``movielens100k_temporal``).
        split_seed: permutation seed of the random split (not part of the temporal protocol).
        split_fractions: train/val/test fractions, summing to 1.
        label_threshold: a rating >= this is a positive; in (1, 5].
        source: "recbole" (fetched from PyPI) or "grouplens" (files in ``grouplens_dir``).
        grouplens_dir: directory with u.data, u.user, u.item (source "grouplens" only).
        zip_prefix_length: leading characters of the zip code kept as the ``zip`` category
            (3: the US sectional centre / Canadian forward sortation area).
    """

    def __init__(
        self,
        split: str = "random",
        split_seed: int = 0,
        split_fractions: Sequence[float] = (0.8, 0.1, 0.1),
        label_threshold: float = 4.0,
        source: str = "recbole",
        grouplens_dir: Optional[str] = None,
        zip_prefix_length: int = 3,
    ):
        if split not in SPLIT_RULES:
            raise ValueError(f"movielens100k: split must be one of {', '.join(SPLIT_RULES)}, got {split!r}")
        if source not in SOURCES:
            raise ValueError(f"movielens100k: source must be one of {', '.join(SOURCES)}, got {source!r}")
        if source == "grouplens" and not grouplens_dir:
            raise ValueError("movielens100k: source 'grouplens' needs grouplens_dir (u.data, u.user, u.item)")
        fractions = tuple(float(f) for f in split_fractions)
        if len(fractions) != 3 or min(fractions) <= 0 or abs(sum(fractions) - 1.0) > 1e-9:
            raise ValueError(f"movielens100k: split_fractions must be 3 positive numbers summing to 1, got {fractions}")
        if not (RATINGS[0] < float(label_threshold) <= RATINGS[-1]):
            raise ValueError(f"movielens100k: label_threshold must be in (1, 5], got {label_threshold}")
        if int(zip_prefix_length) < 1:
            raise ValueError(f"movielens100k: zip_prefix_length must be >= 1, got {zip_prefix_length}")
        self.split = split
        self.split_seed = int(split_seed)
        self.split_fractions = fractions
        self.label_threshold = float(label_threshold)
        self.source = source
        self.grouplens_dir = Path(grouplens_dir) if grouplens_dir else None
        self.zip_prefix_length = int(zip_prefix_length)
        self.name = "movielens100k" if split == "random" else f"movielens100k_{split}"
        self._source_sha256: Optional[Dict[str, str]] = None
        self._data_root: Optional[Path] = None

    # -- identity ------------------------------------------------------------------------------

    def source_sha256(self) -> Dict[str, str]:
        """sha256 of the source files (constants for RecBole; hashed once for GroupLens)."""
        if self._source_sha256 is None:
            if self.source == "recbole":
                self._source_sha256 = dict(RECBOLE_FILES)
            else:
                assert self.grouplens_dir is not None
                missing = [n for n in GROUPLENS_FILES if not (self.grouplens_dir / n).is_file()]
                if missing:
                    raise DatasetError(
                        f"{self.grouplens_dir}: missing {', '.join(missing)} (grouplens source needs"
                        f" {', '.join(GROUPLENS_FILES)})"
                    )
                self._source_sha256 = {n: sha256_file(self.grouplens_dir / n) for n in GROUPLENS_FILES}
        return self._source_sha256

    def settings(self) -> Dict[str, Any]:
        split: Dict[str, Any] = {"rule": self.split, "fractions": list(self.split_fractions)}
        if self.split == "random":
            split["seed"] = self.split_seed
        source: Dict[str, Any] = {"kind": self.source, "sha256": self.source_sha256()}
        if self.source == "recbole":
            source["package"] = RECBOLE_REQUIREMENT
        return {
            "protocol_format_version": PROTOCOL_FORMAT_VERSION,
            "storage_format_version": FORMAT_VERSION,
            "source": source,
            "fields": list(FIELDS),
            "field_rules": {
                "age": "raw_years",
                "zip": f"prefix{self.zip_prefix_length}_upper",
                "release_year": "title_last_paren_year",
                "genres": "multi_hot_mean_missing_oov",
                "vocabulary": "train_only_sorted_oov0",
            },
            "dense": {"features": list(DENSE_FEATURES), "rule": "train_standardised_missing_zero"},
            "label": {"rule": "rating_at_least", "threshold": self.label_threshold},
            "targets": ["rating"],
            "split": split,
        }

    # -- building ------------------------------------------------------------------------------

    def prepare(self, data_root: Path, force: bool = False) -> PreparedDataset:
        self._data_root = Path(data_root)
        return super().prepare(data_root, force=force)

    def load_raw(self, data_root: Optional[Path] = None) -> RawMovieLens:
        """Verify (fetching the RecBole files if they are missing) and parse the source."""
        if self.source == "grouplens":
            assert self.grouplens_dir is not None
            _, mismatched = _checksum_problems(self.grouplens_dir, self.source_sha256())
            if mismatched:
                raise DatasetError(f"{self.grouplens_dir}: {', '.join(mismatched)} changed while preparing")
            return load_grouplens(self.grouplens_dir)
        root = Path(data_root) if data_root is not None else self._data_root
        if root is None:
            raise DatasetError("movielens100k: no data root; call prepare(data_root)")
        raw_dir = raw_dir_of(root)
        missing, _ = _checksum_problems(raw_dir, RECBOLE_FILES)
        if missing:
            log.info("movielens100k: %s missing in %s; fetching them from PyPI (%s)", ", ".join(missing), raw_dir, RECBOLE_REQUIREMENT)
            fetch_recbole(raw_dir)
        verify_recbole_files(raw_dir)
        return load_recbole(raw_dir)

    def build(self, writer: CacheWriter) -> Dict[str, Any]:
        raw = self.load_raw()
        inter = raw.interactions
        num_rows = len(inter)
        splits = split_rows(num_rows, self.split, self.split_seed, self.split_fractions, inter["timestamp"].to_numpy())
        train = splits["train"]

        user_pos = _lookup(raw.users.index, inter["user"].to_numpy(), raw, "user", "users")
        item_pos = _lookup(raw.items.index, inter["item"].to_numpy(), raw, "item", "items")
        users = raw.users.iloc[user_pos].reset_index(drop=True)
        zips = users["zip"].str.slice(0, self.zip_prefix_length)
        release_year = raw.items["release_year"].iloc[item_pos].reset_index(drop=True)
        columns = {
            "user": inter["user"],
            "item": inter["item"],
            "age": users["age"],
            "gender": users["gender"],
            "occupation": users["occupation"],
            "zip": zips.where(zips != "", None),
            "release_year": release_year,
        }
        sparse = np.zeros((num_rows, len(SINGLE_HOT_FIELDS)), dtype=np.int32)
        vocabularies: Dict[str, List[Any]] = {}
        counts: Dict[str, np.ndarray] = {}
        for column, field in enumerate(SINGLE_HOT_FIELDS):
            codes, vocabularies[field], counts[field] = encode_field(pd.Series(columns[field]).reset_index(drop=True), train)
            sparse[:, column] = codes
        genre_values, genre_offsets, vocabularies[MULTI_HOT_FIELD], counts[MULTI_HOT_FIELD] = self._genre_bags(raw, item_pos, train)

        age_dense, age_stats = _standardise(users["age"].to_numpy(dtype=np.float64), train)
        year_dense, year_stats = _standardise(release_year.to_numpy(dtype=np.float64, na_value=np.nan), train)
        dense = np.stack([age_dense, year_dense], axis=1)
        rating = inter["rating"].to_numpy()
        labels = (rating >= self.label_threshold).astype(np.float32)

        for name, rows in splits.items():
            values, lengths = bags_of(genre_values, genre_offsets, rows)
            offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
            write_split(
                writer, name, dense[rows], sparse[rows], labels[rows],
                multi={MULTI_HOT_FIELD: (values, offsets)},
                targets={"rating": rating[rows].astype(np.float32)},
            )
            writer.save(f"{name}/source_rows.npy", rows)
        for field in FIELDS:
            writer.save(f"counts/{field}.npy", counts[field])
            writer.path(f"vocab/{field}.json").write_text(json.dumps(vocabularies[field]))

        tables = [TableSpec(f, len(counts[f]), counts[f], "sum", False) for f in SINGLE_HOT_FIELDS]
        tables.append(TableSpec(MULTI_HOT_FIELD, len(counts[MULTI_HOT_FIELD]), counts[MULTI_HOT_FIELD], "mean", True))
        spec = DatasetSpec(
            name=self.name,
            protocol_id=self.protocol_id(),
            num_dense=dense.shape[1],
            tables=tuple(tables),
            split_sizes={name: len(rows) for name, rows in splits.items()},
            extra_targets=("rating",),
            extras={
                "dense_features": list(DENSE_FEATURES),
                "dense_standardisation": {"age": age_stats, "release_year": year_stats},
                "positive_rate": {name: float(labels[rows].mean()) for name, rows in splits.items()},
                "source": self.source,
            },
        )
        manifest = spec_to_manifest(spec)
        manifest["settings"] = self.settings()
        return manifest

    def _genre_bags(self, raw: RawMovieLens, item_pos: np.ndarray, train: np.ndarray):
        """Genre bags of every interaction row, the genre vocabulary and its training counts.

        Returns (values, offsets) over all rows in file order (ids sorted inside a bag), the
        vocabulary (the genres of training rows' movies, in u.genre order) and counts over the
        training rows (each genre of a row's movie counts once). A genre unseen in training maps
        to row 0; a movie without any genre gets the bag [0].
        """
        pairs = raw.item_genres
        pair_item = raw.items.index.get_indexer(pairs["item"].to_numpy())
        if (pair_item < 0).any():  # cannot happen: pairs are built from the item file
            raise DatasetError(f"{raw.files['items']}: genre rows for unknown items")
        in_train = np.zeros(len(raw.items), dtype=bool)
        in_train[item_pos[train]] = True
        seen = pairs["genre"][in_train[pair_item]]
        vocabulary = [g for g in GENRES if g in set(seen.tolist())]
        codes = pd.Categorical(pairs["genre"], categories=vocabulary).codes.astype(np.int64) + 1
        # items with no known genre get the OOV/missing row 0
        empty = np.setdiff1d(np.arange(len(raw.items)), pair_item)
        item_of = np.concatenate([pair_item, empty])
        code_of = np.concatenate([codes, np.zeros(len(empty), dtype=np.int64)])
        order = np.lexsort((code_of, item_of))
        item_of, code_of = item_of[order], code_of[order]
        lengths = np.bincount(item_of, minlength=len(raw.items))
        item_offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        # per-row bags of every interaction, then counted over the training rows
        train_values, _ = bags_of(code_of, item_offsets, item_pos[train])
        counts = np.bincount(train_values, minlength=len(vocabulary) + 1).astype(np.int64)
        row_values, row_lengths = bags_of(code_of, item_offsets, item_pos)
        row_offsets = np.concatenate([[0], np.cumsum(row_lengths)]).astype(np.int64)
        return row_values, row_offsets, vocabulary, counts
