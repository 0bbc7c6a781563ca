"""Line formats of delimited click logs: column layout, field checks, labels and the dense transform.

- Label: the 0/1 label column (any other value makes the line malformed).
- Dense (integer) fields: ``log(max(x, 0) + 1)`` as float32; a missing (empty) value is 0.
  Negative integers are clamped to 0 before the log, as DLRM and Hetu do. A value that is not a
  signed 64-bit integer makes the line malformed.
- Categorical fields: keyed per distinct value (``recbench.datasets.text.keys``); a subclass
  adds derived fields (Avazu's hour) and format-specific checks.

References:
    M. Naumov et al. 2019. Deep Learning Recommendation Model for Personalization and
    Recommendation Systems. arXiv:1906.00091 (the log transform); facebookresearch/dlrm
    ``dlrm_data_pytorch.py``.
    X. Miao et al. 2022. HET: Scaling out Huge Embedding Model Training via Cache-enabled
    Distributed Framework. VLDB (Hetu's Criteo/Avazu preprocessing, same clamp).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np
import polars as pl

from recbench.datasets.text.keys import iter_string_keys

INT64_RANGE = "[-9223372036854775808, 9223372036854775807]"


@dataclass(frozen=True)
class FieldCheck:
    """A vectorised per-field check: ``bad`` is a boolean polars expression (null = fine)."""

    field: str
    bad: pl.Expr
    allowed: str


class LineFormat:
    """A delimited text format: the column layout and the per-field parsing rules.

    Args:
        name: format name used in messages and settings (e.g. ``"criteo"``).
        columns: raw column names, in file order.
        separator: one-byte field separator (``"\\t"`` or ``","``).
        label: the 0/1 label column.
        dense: integer columns (log-transformed, missing -> 0).
        categorical: string columns keyed as categorical fields, in table order.
        header: the first line of every file is the header ``separator.join(columns)``.

    Categorical columns are read as polars ``Categorical``; a sparse field is keyed from the
    distinct values of its column (``category_keys``), once per distinct value. Subclasses add
    derived fields (Avazu's hour) by overriding ``sparse_fields``, ``categorical_columns``,
    ``sparse_sources``, ``checks`` and ``category_keys``.
    """

    #: polars dtype of the parsed dense columns (``parse_chunk`` casts them to it after ``checks``);
    #: a subclass that keeps decimal values (``recbench.datasets.bars``) sets ``pl.Float64``
    dense_dtype: pl.DataType = pl.Int64

    def __init__(self, name: str, columns: Sequence[str], separator: str, label: str,
                 dense: Sequence[str] = (), categorical: Sequence[str] = (), header: bool = False):
        if len(separator.encode()) != 1:
            raise ValueError(f"separator must be one byte, got {separator!r}")
        self.name, self.columns, self.separator = name, tuple(columns), separator
        self.label, self.dense, self.categorical, self.header = label, tuple(dense), tuple(categorical), header

    @property
    def sparse_fields(self) -> Tuple[str, ...]:
        return self.categorical

    @property
    def separator_name(self) -> str:
        return {"\t": "tab", ",": "comma"}.get(self.separator, repr(self.separator))

    def header_line(self) -> str:
        return self.separator.join(self.columns)

    @property
    def categorical_columns(self) -> Tuple[str, ...]:
        """Columns read as polars ``Categorical`` (every column a sparse field derives from)."""
        return self.categorical

    def sparse_sources(self) -> Tuple[Tuple[str, str], ...]:
        """``(sparse field, categorical column it derives from)`` in table order."""
        return tuple((name, name) for name in self.categorical)

    def checks(self, dense_parsed: bool = False) -> List[FieldCheck]:
        """Per-field checks of a parsed frame. ``dense_parsed``: the CSV reader already parsed the
        dense columns as Int64 (see ``parse_chunk``), which proves their check."""
        label = pl.col(self.label)
        out = [FieldCheck(self.label, ~label.is_in(["0", "1"]).fill_null(False), "0 or 1")]
        for name in () if dense_parsed else self.dense:
            col = pl.col(name)
            out.append(FieldCheck(name, col.is_not_null() & col.cast(pl.Int64, strict=False).is_null(),
                                  f"an integer in {INT64_RANGE}, or empty for missing"))
        return out

    def labels(self, frame: pl.DataFrame) -> np.ndarray:
        """(N,) float32 labels of validated rows."""
        return (frame.get_column(self.label) == "1").to_numpy().astype(np.float32)

    def dense_values(self, frame: pl.DataFrame) -> np.ndarray:
        """(N, num_dense) float32: ``log(max(x, 0) + 1)``, missing -> 0."""
        if not self.dense:
            return np.zeros((frame.height, 0), dtype=np.float32)
        values = frame.select([pl.col(c).cast(pl.Int64).clip(lower_bound=0).fill_null(0) for c in self.dense])
        out = np.empty((frame.height, len(self.dense)), dtype=np.float32)
        table = _log1p_table()
        for j, column in enumerate(values.get_columns()):
            x = column.to_numpy()
            small = x < table.size
            if small.all():
                out[:, j] = table[x]
            else:
                out[:, j] = table[np.where(small, x, 0)]
                big = np.flatnonzero(~small)
                out[big, j] = log1p_float32(x[big])
        return out

    def category_keys(self, field: str, values: pl.Series) -> np.ndarray:
        """(K,) uint64 keys of ``field`` for K distinct non-null String values of its column
        (values of valid rows only: they passed ``checks``). ``MISSING_KEY`` counts as missing."""
        return next(iter_string_keys(values.to_frame("value"), ["value"]))

    def rules(self) -> Dict[str, Any]:
        return {
            "format": self.name, "columns": list(self.columns), "separator": self.separator,
            "header": self.header, "label": f"{self.label} in {{0, 1}}",
            "dense": {"fields": list(self.dense), "transform": "log(max(x, 0) + 1) as float32; missing -> 0"},
            "sparse_fields": list(self.sparse_fields),
            "categorical_key": "lowercase hex (1-15 digits): int(v, 16) + (16**len - 16) / 15; "
                               "else FNV-1a-64 of the UTF-8 bytes | 2**63; empty -> missing (OOV)",
        }


def log1p_float32(values: np.ndarray) -> np.ndarray:
    """float32 ``log(x + 1)`` of int64 ``values`` >= 0: polars' Float64 ``log1p`` rounded to Float32."""
    return pl.Series(values).cast(pl.Float64).log1p().cast(pl.Float32).to_numpy()


@functools.lru_cache(maxsize=1)
def _log1p_table() -> np.ndarray:
    """``log1p_float32`` of 0 .. 2**16 - 1: dense values (counts) are mostly small, and a gather from
    this table gives exactly what computing each value gives."""
    return log1p_float32(np.arange(1 << 16, dtype=np.int64))
