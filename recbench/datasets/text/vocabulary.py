"""Vocabularies of categorical fields: category codes per row, keys per distinct value, train counts.

Vocabularies and counts come from the TRAIN split only. Keys seen fewer than ``min_count`` times
in train, keys never seen in train, and missing values map to row 0 (OOV). Rows 1..V are ordered
by ascending key (``row_order="key"``, the default), an order independent of frequency as in the
references: Hetu numbers a field's values with sklearn's ``LabelEncoder`` (sorted raw tokens) and
DLRM by first appearance (``data_utils.py``). For tokens of equal length that are all hex
(Criteo's 8-digit hashes) ascending key is exactly the sorted-token order; decimal integers
without leading zeros (Avazu's numeric columns, which pandas reads as integers) come in ascending
numeric order, as ``LabelEncoder`` sorts them; FNV-keyed values come in hash order.
``row_order="frequency"`` numbers rows by descending train count, ties by ascending key.
``counts[r]`` is the train count of row ``r`` in either order; ``counts[0]`` is the number of
train values that mapped to OOV. With ``hash_cap`` a field has at most ``hash_cap`` rows plus the
OOV row.

Shapes: V kept keys per field; ``counts`` (V + 1,) int64; per-row codes (N,) uint32.

References:
    facebookresearch/dlrm ``data_utils.py`` (first-appearance numbering).
    X. Miao et al. 2022. HET: Scaling out Huge Embedding Model Training via Cache-enabled
    Distributed Framework. VLDB (Hetu's ``LabelEncoder`` numbering).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Tuple

import numpy as np
import polars as pl

from recbench.datasets.errors import DatasetError
from recbench.datasets.text.formats import LineFormat
from recbench.datasets.text.keys import MISSING_KEY, cap_keys


def _sum_by_key(keys: np.ndarray, counts: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Unique sorted keys and the summed counts of each (exact int64)."""
    if keys.size == 0:
        return keys.astype(np.uint64), counts.astype(np.int64)
    order = np.argsort(keys, kind="stable")
    keys, counts = keys[order], counts[order]
    first = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
    return keys[first], np.add.reduceat(counts, first).astype(np.int64)


#: how rows 1..V of a field are numbered (``PipelineConfig.row_order``)
ROW_ORDERS = {"key": "ascending key (frequency-independent; LabelEncoder's sorted-token order for equal-length hex tokens)",
              "frequency": "descending train count, ties by ascending key"}


@dataclass
class Vocabulary:
    """Key -> row mapping of one field; row 0 is OOV.

    Attributes:
        keys: (V,) uint64 kept keys, sorted ascending (for ``searchsorted``).
        rows: (V,) int32 row of each key in ``keys`` (1..V: ascending key, or by descending train
            count with ``row_order="frequency"``).
        counts: (V + 1,) int64 train frequency of each row; ``counts[0]`` = train values -> OOV.
    """

    keys: np.ndarray
    rows: np.ndarray
    counts: np.ndarray

    @property
    def num_embeddings(self) -> int:
        return int(self.counts.size)

    @classmethod
    def from_counts(cls, keys: np.ndarray, counts: np.ndarray, missing: int, min_count: int,
                    row_order: str = "key") -> "Vocabulary":
        """From sorted unique ``keys`` with their train ``counts`` and the train missing-value count;
        rows numbered in ``row_order`` (``ROW_ORDERS``)."""
        if row_order not in ROW_ORDERS:
            raise ValueError(f"row_order must be one of {', '.join(ROW_ORDERS)}, got {row_order!r}")
        keep = counts >= min_count
        kept_keys, kept_counts = keys[keep], counts[keep]
        if row_order == "key":  # the keys are sorted: row r is the r-th smallest kept key
            order = np.arange(kept_keys.size)
        else:
            order = np.lexsort((kept_keys, -kept_counts))  # descending count, then ascending key
        rows = np.empty(kept_keys.size, dtype=np.int32)
        rows[order] = np.arange(1, kept_keys.size + 1, dtype=np.int32)
        oov = missing + int(counts[~keep].sum())
        return cls(kept_keys, rows, np.concatenate([[oov], kept_counts[order]]).astype(np.int64))

    def lookup(self, keys: np.ndarray) -> np.ndarray:
        """(N,) int32 rows of ``keys``; 0 for missing, rare and unseen keys."""
        if self.keys.size == 0:
            return np.zeros(keys.size, dtype=np.int32)
        if self.keys.size > 1 << 16:  # large vocabulary: sorted queries walk it cache-friendly
            order = np.argsort(keys)
            pos = np.empty(keys.size, dtype=np.int64)
            pos[order] = np.searchsorted(self.keys, keys[order])
        else:
            pos = np.searchsorted(self.keys, keys)
        np.minimum(pos, self.keys.size - 1, out=pos)
        return np.where(self.keys[pos] == keys, self.rows[pos], 0).astype(np.int32)


class CategoryCodes:
    """Categorical columns read as polars ``Categorical``: codes per row, keys per distinct value.

    Every categorical column gets its own polars ``Categories`` (a random name, kept alive for
    this object's life), so a value has the same code in every chunk. Codes are stored as
    ``physical + 1`` (uint32, 0 = missing). Each sparse field's key (``fmt.category_keys``,
    hash cap applied) is computed once per distinct value, when its code first appears, and
    train occurrences are counted per code, so no per-row key is ever computed.
    """

    def __init__(self, fmt: LineFormat, hash_cap: Optional[int]):
        self.fmt, self.hash_cap = fmt, hash_cap
        self.columns = tuple(fmt.categorical_columns)
        self.dtypes = {c: pl.Categorical(pl.Categories.random("recbench-preprocessing")) for c in self.columns}
        self._keepalive = [pl.Series(c, [], dtype=d) for c, d in self.dtypes.items()]  # the mapping lives while referenced
        self.sources = tuple(fmt.sparse_sources())  # (field, column)
        self.known = {c: 0 for c in self.columns}  # codes 1..known have keys
        self.keys: Dict[str, List[np.ndarray]] = {f: [] for f, _ in self.sources}
        self.train_counts = {c: np.zeros(1, dtype=np.int64) for c in self.columns}  # [0] = missing

    def codes(self, frame: pl.DataFrame) -> Dict[str, np.ndarray]:
        """(N,) uint32 code of every row per categorical column (0 = missing) of a frame of valid
        rows (String columns): their values enter the categories here, after the field checks
        (cheaper than the CSV reader's own categorical builder, and no malformed row's value)."""
        one = pl.lit(1, dtype=pl.UInt32)
        out = frame.select([(pl.col(c).cast(self.dtypes[c]).to_physical() + one).fill_null(0).alias(c)
                            for c in self.columns])
        return {c: out.get_column(c).to_numpy() for c in self.columns}

    def learn(self, frame: pl.DataFrame, codes: Mapping[str, np.ndarray]) -> None:
        """Key the codes first seen in ``frame`` (the frame ``codes`` was computed from)."""
        for column in self.columns:
            column_codes, known = codes[column], self.known[column]
            top = int(column_codes.max(initial=0))
            if top <= known:
                continue
            if top >= np.iinfo(np.uint32).max:
                raise DatasetError(f"column {column!r} has more than {np.iinfo(np.uint32).max - 1} distinct values")
            new = np.flatnonzero(column_codes > known)
            where = np.full(top - known, -1, dtype=np.int64)
            where[column_codes[new] - known - 1] = new  # any row holding each new code
            if (where < 0).any():  # pragma: no cover - polars assigns codes densely to the values it reads
                raise RuntimeError(f"column {column!r}: categorical codes {known + 1}..{top} are not all in the chunk")
            values = frame.get_column(column).gather(where).cast(pl.String)
            for field_name, source in self.sources:
                if source == column:
                    keys = self.fmt.category_keys(field_name, values).astype(np.uint64, copy=False)
                    self.keys[field_name].append(cap_keys(keys, self.hash_cap))
            self.known[column] = top

    def count(self, codes: Mapping[str, np.ndarray], train: np.ndarray) -> None:
        """Add the train rows' codes to the counts."""
        every = bool(train.all())
        for column in self.columns:
            counts = np.bincount(codes[column] if every else codes[column][train])
            total = self.train_counts[column]
            if counts.size > total.size:
                grown = np.zeros(max(counts.size, 2 * total.size), dtype=np.int64)
                grown[:total.size] = total
                self.train_counts[column] = total = grown
            total[:counts.size] += counts

    def vocabulary(self, field_name: str, min_count: int, row_order: str = "key") -> Tuple["Vocabulary", np.ndarray]:
        """The field's vocabulary (rows in ``row_order``) and its (codes + 1,) int32 code -> row table
        (code 0 -> row 0)."""
        column = dict(self.sources)[field_name]
        known = self.known[column]
        keys = np.concatenate(self.keys[field_name]) if self.keys[field_name] else np.zeros(0, dtype=np.uint64)
        counts = np.zeros(known + 1, dtype=np.int64)
        tracked = self.train_counts[column][: known + 1]
        counts[: tracked.size] = tracked
        missing, counts = int(counts[0]), counts[1:]
        keyless = keys == MISSING_KEY  # a value without a key counts as missing, as a missing value does
        missing += int(counts[keyless].sum())
        present = (counts > 0) & ~keyless
        vocab = Vocabulary.from_counts(*_sum_by_key(keys[present], counts[present]), missing, min_count, row_order)
        table = np.zeros(known + 1, dtype=np.int32)
        table[1:] = vocab.lookup(keys)
        return vocab, table

    def close(self) -> None:
        """Release the polars categories (their values are no longer needed)."""
        self._keepalive.clear()
