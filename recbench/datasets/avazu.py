"""The ``avazu`` protocol: Avazu mobile-ad click logs (Kaggle CTR prediction, 2014).

``train.csv`` (or ``train.gz``): comma-separated with a header, 40,428,967 lines over 10 days
(2014-10-21 .. 2014-10-30) in time order, 24 columns::

    id, click, hour (YYMMDDHH), C1, banner_pos, site_id, site_domain, site_category, app_id,
    app_domain, app_category, device_id, device_ip, device_model, device_type,
    device_conn_type, C14, C15, C16, C17, C18, C19, C20, C21

Rules: ``id`` is dropped; the label is ``click`` (0/1); ``hour`` becomes two categorical fields,
``hour_of_day`` (0-23) and ``weekday`` (ISO, 1 = Monday .. 7 = Sunday), placed first; every other
column is categorical (23 tables in total). No dense features: dense arrays have shape (N, 0).
A line whose ``hour`` is not 8 digits forming a valid date and an hour 00-23 is malformed.
Everything else (keys, thresholds, OOV row 0, hash cap, malformed-line policy, splits) is the
shared pipeline of ``recbench.datasets.text.pipeline``.

Splits: ``random`` 8:1:1 by ``split_seed`` (default); ``dlrm_chunks`` with ``num_chunks``
equal chunks in file order (default 10, about one per day since the file is sorted by hour),
the last halved into test then validation. Hetu's Avazu split uses the exact last day
(4,218,938 lines); ours is the last tenth of the file.

The data is never downloaded by recbench (Kaggle's competition rules apply): the user
supplies ``train.gz``/``train.csv``; see ``datasets/avazu/README.md``.

References:
    Avazu. Click-Through Rate Prediction (Kaggle competition, 2014),
    https://www.kaggle.com/c/avazu-ctr-prediction
    X. Miao et al. 2022. HET: Scaling out Huge Embedding Model Training via Cache-enabled
    Distributed Framework. VLDB (Hetu's Avazu preprocessing and split).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import polars as pl

from recbench.datasets.base import DatasetProtocol
from recbench.datasets.errors import DatasetError
from recbench.datasets.storage import CacheWriter
from recbench.datasets.text.formats import FieldCheck, LineFormat
from recbench.datasets.text.keys import MISSING_KEY
from recbench.datasets.text.pipeline import PipelineConfig, TextPipeline
from recbench.datasets.text.sources import SourceFile, SourceLike, describe_source, expand_sources

COLUMNS = ("id", "click", "hour", "C1", "banner_pos", "site_id", "site_domain", "site_category", "app_id",
           "app_domain", "app_category", "device_id", "device_ip", "device_model", "device_type",
           "device_conn_type", "C14", "C15", "C16", "C17", "C18", "C19", "C20", "C21")
CATEGORICAL = COLUMNS[3:]
HOUR_FIELDS = ("hour_of_day", "weekday")

HOW_TO_OBTAIN = (
    "recbench does not download Avazu data (Kaggle competition rules apply). Download train.gz from "
    "https://www.kaggle.com/c/avazu-ctr-prediction/data (40,428,967 lines with a header), place it (or the "
    "extracted train.csv) in <data_root>/avazu/raw/ or point dataset.source at it; see datasets/avazu/README.md."
)


def fetch(data_root: Path) -> Path:
    """``recbench-data fetch``: nothing is downloaded; returns ``<data_root>/avazu/raw`` when it holds
    ``train.gz`` or ``train.csv``, else raises ``DatasetError`` saying how to obtain it."""
    raw = Path(data_root) / "avazu" / "raw"
    if (raw / "train.gz").is_file() or (raw / "train.csv").is_file():
        return raw
    raise DatasetError(f"no Avazu file in {raw}. {HOW_TO_OBTAIN}")


class AvazuFormat(LineFormat):
    """Avazu's CSV layout: ``hour`` expanded into ``hour_of_day`` and ``weekday``, ``id`` dropped."""

    def __init__(self) -> None:
        super().__init__("avazu", COLUMNS, ",", "click", dense=(), categorical=CATEGORICAL, header=True)

    @property
    def sparse_fields(self):
        return HOUR_FIELDS + self.categorical

    @property
    def categorical_columns(self):
        return ("hour",) + self.categorical

    def sparse_sources(self):
        return tuple((name, "hour") for name in HOUR_FIELDS) + super().sparse_sources()

    @staticmethod
    def _hour_parts():
        hour = pl.col("hour")
        return hour.str.slice(0, 6).str.to_date("%y%m%d", strict=False), hour.str.slice(6, 2).str.to_integer(strict=False)

    def checks(self, dense_parsed: bool = False) -> List[FieldCheck]:
        date, hh = self._hour_parts()
        shape_ok = pl.col("hour").str.contains("^[0-9]{8}$").fill_null(False)
        bad = ~shape_ok | date.is_null() | (hh > 23).fill_null(True)
        return super().checks(dense_parsed) + [FieldCheck("hour", bad, "YYMMDDHH: 8 digits, a valid date and an hour 00-23")]

    def category_keys(self, field: str, values: pl.Series) -> np.ndarray:
        if field not in HOUR_FIELDS:
            return super().category_keys(field, values)
        date, hh = self._hour_parts()
        part = (hh if field == "hour_of_day" else date.dt.weekday()).cast(pl.UInt64)  # values passed the hour check
        return values.to_frame("hour").select(part.fill_null(MISSING_KEY)).to_series().to_numpy()

    def rules(self) -> Dict[str, Any]:
        rules = super().rules()
        rules["dropped"] = ["id"]
        rules["hour"] = "YYMMDDHH -> hour_of_day = HH (0-23), weekday = ISO weekday of 20YY-MM-DD (1-7)"
        return rules


AVAZU_FORMAT = AvazuFormat()


class AvazuProtocol(DatasetProtocol):
    """Avazu, streamed from the user's ``train.csv``/``train.gz``.

    Args:
        source: path, glob or list of paths of Avazu CSV files (each with the header; ``.gz`` allowed).
        split: ``"random"`` (default, 8:1:1) or ``"dlrm_chunks"``.
        split_seed: seed of the ``random`` split.
        num_chunks: chunks of ``dlrm_chunks`` (default 10, about one per day).
        min_count: train occurrences a value needs for its own row (default 1).
        hash_cap: null, or at most this many rows per field.
        malformed: ``"skip"`` or ``"fail"``.
        chunk_rows: lines per streaming chunk (memory knob; does not change the arrays or the id).
        name: protocol name (default ``avazu``).
        row_order: ``"key"`` (default: rows by ascending key, frequency-independent) or
            ``"frequency"`` (by descending train count).
    """

    name = "avazu"

    def __init__(self, source: SourceLike, split: str = "random", split_seed: int = 0, num_chunks: int = 10,
                 min_count: int = 1, hash_cap: Optional[int] = None, malformed: str = "skip",
                 chunk_rows: int = 500_000, name: str = "avazu", row_order: str = "key"):
        self.config = PipelineConfig(
            fmt=AVAZU_FORMAT, split=split, split_seed=int(split_seed), num_chunks=int(num_chunks),
            min_count=int(min_count), hash_cap=None if hash_cap is None else int(hash_cap), malformed=malformed,
            chunk_rows=int(chunk_rows), row_order=row_order)
        self.source = source if isinstance(source, (str, os.PathLike)) else list(source)
        self.name = name

    def sources(self) -> List[SourceFile]:
        return [describe_source(p) for p in expand_sources(self.source, HOW_TO_OBTAIN)]

    def settings(self) -> Dict[str, Any]:
        return {"dataset": "avazu", "sources": [s.describe() for s in self.sources()], "rules": self.config.rules()}

    def build(self, writer: CacheWriter) -> Dict[str, Any]:
        pipeline = TextPipeline(self.config, self.sources(), description=self.name)
        return pipeline.build(writer, self.name, self.protocol_id())
