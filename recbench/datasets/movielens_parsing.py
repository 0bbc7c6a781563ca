"""Parsing the MovieLens-100K source files (RecBole atomic files or GroupLens originals) into one form.

Both sources give the same tables (``RawMovieLens``). Every field is validated: a bad value is a
``DatasetError`` naming the file, line, field and what is allowed. The release year is the year
in the last ``(yyyy)`` of the movie title (RecBole derived its ``release_year`` column that way);
item 267 ("unknown") has no year.

References:
    F. Maxwell Harper and Joseph A. Konstan. 2015. The MovieLens Datasets: History and Context.
    ACM Transactions on Interactive Intelligent Systems 5, 4, Article 19.
    GroupLens Research, MovieLens 100K Dataset, https://grouplens.org/datasets/movielens/100k/
    (u.data, u.user, u.item, u.genre, u.occupation).
    W. X. Zhao et al. 2021. RecBole: Towards a Unified, Comprehensive and Efficient Framework
    for Recommendation Algorithms. CIKM 2021 (the atomic-file layout).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Mapping, Optional, Sequence, Tuple

import numpy as np
import pandas as pd

from recbench.datasets.errors import DatasetError

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

_TITLE_YEAR = r".*\((\d{4})\)"  # greedy: the last "(yyyy)" of a title


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
