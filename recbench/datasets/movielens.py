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
  pip, extracts only those files and verifies their sha256 (``movielens_fetch``).
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
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd

from recbench.datasets.base import DatasetProtocol
from recbench.datasets.errors import DatasetError
from recbench.datasets.movielens_fetch import (
    RECBOLE_FILES,
    RECBOLE_REQUIREMENT,
    checksum_problems,
    fetch_recbole,
    verify_recbole_files,
)
from recbench.datasets.movielens_parsing import (
    GENRES,
    GROUPLENS_FILES,
    RATINGS,
    RawMovieLens,
    load_grouplens,
    load_recbole,
)
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
# Bump whenever a rule of this protocol (here or in movielens_parsing) changes the arrays without changing a setting.
PROTOCOL_FORMAT_VERSION = 1

SINGLE_HOT_FIELDS = ("user", "item", "age", "gender", "occupation", "zip", "release_year")
MULTI_HOT_FIELD = "genres"
FIELDS = SINGLE_HOT_FIELDS + (MULTI_HOT_FIELD,)
DENSE_FEATURES = ("age", "release_year")
SPLIT_RULES = ("random", "temporal")
SOURCES = ("recbole", "grouplens")

# ----------------------------------------------------------------------------------------------
# the raw files
# ----------------------------------------------------------------------------------------------


def raw_dir_of(data_root: Path) -> Path:
    """``<data_root>/movielens100k/raw``: where the RecBole files are fetched to."""
    return Path(data_root) / DATASET_DIR / "raw"


def fetch(data_root: Path, force: bool = False) -> Path:
    """Fetch the default (RecBole) source into ``<data_root>/movielens100k/raw``; return that path."""
    return fetch_recbole(raw_dir_of(data_root), force=force)


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
            _, mismatched = checksum_problems(self.grouplens_dir, self.source_sha256())
            if mismatched:
                raise DatasetError(f"{self.grouplens_dir}: {', '.join(mismatched)} changed while preparing")
            return load_grouplens(self.grouplens_dir)
        root = Path(data_root) if data_root is not None else self._data_root
        if root is None:
            raise DatasetError("movielens100k: no data root; call prepare(data_root)")
        raw_dir = raw_dir_of(root)
        missing, _ = checksum_problems(raw_dir, RECBOLE_FILES)
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
