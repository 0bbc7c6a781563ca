"""The ``bars_criteo_x1`` and ``bars_avazu_x4`` protocols: BARS's pre-split CTR benchmarks, read as shipped.

BARS (reczoo, the open CTR benchmark) distributes each split as its own CSV file with a header
(``train.csv``, ``valid.csv``, ``test.csv``; reczoo/Datasets, Hugging Face ``reczoo/Criteo_x1`` and
``reczoo/Avazu_x4``). The split is the file (``split: given``): rows keep file order, vocabularies
and counts come from ``train.csv`` only, and nothing is re-split, so ``full`` can be checked against
BARS's published test AUC. Cards with the published numbers: ``docs/protocols/``.

- ``Criteo_x1`` (``CriteoX1Format``): comma-separated, header ``label,I1..I13,C1..C26``; 33,003,326 /
  8,250,124 / 4,587,167 lines (AFN's random 7:2:1 split of Criteo Kaggle, converted from AFN's libsvm
  files by ``convert_criteo_x1.py``). ``I1..I13`` are decimal numbers as shipped and are used AS GIVEN
  (float32; missing -> 0; no log transform), as FuxiCTR reads a numeric column without a normalizer;
  ``C1..C26`` are categorical (AFN's integer feature ids).
- ``Avazu_x4`` (``AvazuX4Format``): Avazu's own CSV layout and header (``id,click,hour,C1,...,C21``),
  32,343,172 / 4,042,897 / 4,042,898 lines (StratifiedKFold(10, shuffle, seed 2018) folds: fold 0 test,
  fold 1 validation, folds 2-9 train). ``id`` is dropped; ``hour`` (YYMMDDHH) becomes FuxiCTR's three
  fields ``hour_of_day`` (HH), ``weekday`` (``strftime('%w')``: 0 = Sunday .. 6 = Saturday) and
  ``weekend`` (1 on Saturday and Sunday, else 0); tables in FuxiCTR's order: ``hour_of_day``,
  ``C1`` .. ``C21``, ``weekday``, ``weekend`` (24 tables; no dense features).

Vocabulary (both): a value needs ``min_count`` train occurrences for its own row (FuxiCTR's
``min_categr_count``: 1 for Criteo_x1, 2 for Avazu_x4_001), everything else is row 0 (OOV);
rows 1..V by descending train count, ties by ascending key (``row_order: frequency``, FuxiCTR's
``Tokenizer.build_vocab`` order). Lines, malformed lines, keys and OOV are the shared text pipeline's
rules (``recbench.datasets.text.pipeline``); bad input names file, line and field.

The data is never downloaded by recbench: the user supplies the three files.

References:
    J. Zhu et al. 2022. BARS: Towards Open Benchmarking for Recommender Systems. SIGIR;
    J. Zhu et al. 2021. Open Benchmarking for Click-Through Rate Prediction. CIKM.
    reczoo/Datasets ``Criteo/Criteo_x1``, ``Avazu/Avazu_x4`` (README, convert scripts) at
    71dc5774c14decbdbe3da38ba93e12c6b6be00b0; reczoo/FuxiCTR v1.1.1 ``fuxictr/preprocess.py``
    (``Tokenizer``), ``fuxictr/datasets/avazu.py`` (``convert_hour``/``convert_weekday``/``convert_weekend``).
    W. Cheng, Y. Shen, L. Huang. 2020. Adaptive Factorization Network. AAAI (the Criteo_x1 split).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import polars as pl

from recbench.datasets.avazu import AvazuFormat
from recbench.datasets.base import DatasetProtocol
from recbench.datasets.errors import DatasetError
from recbench.datasets.storage import SPLITS, CacheWriter
from recbench.datasets.text.formats import FieldCheck, LineFormat
from recbench.datasets.text.keys import MISSING_KEY
from recbench.datasets.text.pipeline import PipelineConfig, TextPipeline
from recbench.datasets.text.sources import SourceFile, SourceLike, describe_source, expand_sources

log = logging.getLogger(__name__)

FILES = ("train.csv", "valid.csv", "test.csv")  # BARS's names, in split order (train, validation, test)
FLOAT32_MAX = float(np.finfo(np.float32).max)


class CriteoX1Format(LineFormat):
    """Criteo_x1's CSV: ``label,I1..I13,C1..C26`` with a header; dense values are decimals kept as given."""

    dense_dtype = pl.Float64

    def __init__(self) -> None:
        dense = tuple(f"I{i}" for i in range(1, 14))
        categorical = tuple(f"C{i}" for i in range(1, 27))
        super().__init__("criteo_x1", ("label", *dense, *categorical), ",", "label", dense=dense,
                         categorical=categorical, header=True)

    def checks(self, dense_parsed: bool = False) -> List[FieldCheck]:
        out = super().checks(dense_parsed=True)  # the label check; the integer checks do not apply
        for name in self.dense:
            col = pl.col(name)
            value = col.cast(pl.Float64, strict=False)
            bad = col.is_not_null() & ~(value.is_finite() & (value.abs() <= FLOAT32_MAX)).fill_null(False)
            out.append(FieldCheck(name, bad, "a finite decimal number within float32 range (e.g. 0.25, 3, 1e-3), "
                                             "or empty for missing"))
        return out

    def dense_values(self, frame: pl.DataFrame) -> np.ndarray:
        """(N, 13) float32: the values as given; missing -> 0."""
        if frame.height == 0:
            return np.zeros((0, len(self.dense)), dtype=np.float32)
        values = frame.select([pl.col(c).fill_null(0.0).cast(pl.Float32) for c in self.dense])
        return values.to_numpy().astype(np.float32, copy=False).reshape(frame.height, len(self.dense))

    def rules(self) -> Dict[str, Any]:
        rules = super().rules()
        rules["dense"] = {"fields": list(self.dense), "transform": "as given (decimal -> float32); missing -> 0"}
        return rules


DERIVED = ("hour_of_day", "weekday", "weekend")


class AvazuX4Format(AvazuFormat):
    """Avazu_x4's CSV (Avazu's own layout and header); ``hour`` becomes FuxiCTR's three fields."""

    def __init__(self) -> None:
        super().__init__()
        self.name = "avazu_x4"

    @property
    def sparse_fields(self) -> Tuple[str, ...]:
        return ("hour_of_day",) + self.categorical + ("weekday", "weekend")

    def sparse_sources(self) -> Tuple[Tuple[str, str], ...]:
        return (("hour_of_day", "hour"),) + tuple((c, c) for c in self.categorical) + (
            ("weekday", "hour"), ("weekend", "hour"))

    def category_keys(self, field: str, values: pl.Series) -> np.ndarray:
        if field not in DERIVED:
            return LineFormat.category_keys(self, field, values)
        date, hh = self._hour_parts()
        iso = date.dt.weekday()  # 1 = Monday .. 7 = Sunday
        part = {"hour_of_day": hh, "weekday": iso % 7, "weekend": (iso >= 6).cast(pl.Int64)}[field]
        return values.to_frame("hour").select(part.cast(pl.UInt64).fill_null(MISSING_KEY)).to_series().to_numpy()

    def rules(self) -> Dict[str, Any]:
        rules = super().rules()
        rules["hour"] = ("YYMMDDHH -> hour_of_day = HH (0-23), weekday = strftime('%w') of 20YY-MM-DD "
                         "(0 = Sunday .. 6 = Saturday), weekend = 1 on Saturday and Sunday else 0 (FuxiCTR)")
        return rules


class BarsProtocol(DatasetProtocol):
    """A BARS benchmark read from its three pre-split CSV files (``split: given``).

    Args:
        source: a folder holding ``train.csv``, ``valid.csv`` and ``test.csv`` (plain or gzip), or a
            list of the three files in the order train, validation, test.
        min_count: train occurrences a value needs for its own row (FuxiCTR ``min_categr_count``).
        row_order: ``"frequency"`` (default, FuxiCTR's order) or ``"key"``.
        malformed: ``"skip"`` (count, list and drop malformed lines) or ``"fail"``.
        chunk_rows: lines per streaming chunk (memory knob; does not change the arrays or the id).
        name: protocol name (default: the class's).
    """

    name = "bars"
    benchmark = ""
    line_format: LineFormat
    published_sizes: Dict[str, int] = {}
    how_to_obtain = ""

    def __init__(self, source: SourceLike, min_count: int = 1, row_order: str = "frequency",
                 malformed: str = "skip", chunk_rows: int = 500_000, name: Optional[str] = None):
        self.config = PipelineConfig(fmt=self.line_format, split="given", num_chunks=None, min_count=int(min_count),
                                     hash_cap=None, malformed=malformed, chunk_rows=int(chunk_rows), row_order=row_order)
        self.source = source if isinstance(source, (str, os.PathLike)) else list(source)
        self.name = name or type(self).name

    def source_paths(self) -> List[Path]:
        """The three files, in split order; a clear ``DatasetError`` when they are not there."""
        allowed = (f"allowed: a folder holding {', '.join(FILES)} or a list of three files in the order train, "
                   f"validation, test. {self.how_to_obtain}")
        if isinstance(self.source, (str, os.PathLike)):
            folder = Path(self.source)
            if not folder.is_dir():
                raise DatasetError(f"dataset.source={str(folder)!r} is not a folder; {allowed}")
            missing = [f for f in FILES if not (folder / f).is_file()]
            if missing:
                raise DatasetError(f"{folder}: no {', '.join(missing)}; {allowed}")
            return [folder / f for f in FILES]
        paths = expand_sources(self.source, self.how_to_obtain)
        if len(paths) != 3:
            raise DatasetError(f"dataset.source lists {len(paths)} file(s) {[str(p) for p in paths]}; {allowed}")
        return paths

    def sources(self) -> List[SourceFile]:
        return [describe_source(p) for p in self.source_paths()]

    def settings(self) -> Dict[str, Any]:
        return {"dataset": "bars", "benchmark": self.benchmark, "sources": [s.describe() for s in self.sources()],
                "rules": self.config.rules()}

    def build(self, writer: CacheWriter) -> Dict[str, Any]:
        sources = self.sources()
        header = 1 if self.line_format.header else 0
        lines = {split: s.lines - header for split, s in zip(SPLITS, sources)}
        published = dict(self.published_sizes)
        if lines != published:
            log.warning("%s: data lines per file %s differ from BARS's published %s: these are not BARS's files "
                        "(or a changed copy), so the published numbers do not apply", self.name, lines, published)
        extras = {"benchmark": self.benchmark, "published_split_sizes": published,
                  "matches_published_split_sizes": lines == published}
        pipeline = TextPipeline(self.config, sources, description=self.name)
        return pipeline.build(writer, self.name, self.protocol_id(), extras=extras)


class BarsCriteoX1Protocol(BarsProtocol):
    """BARS ``Criteo_x1`` (see the module docstring); default ``min_count`` 1 as BARS."""

    name = "bars_criteo_x1"
    benchmark = "Criteo_x1"
    line_format = CriteoX1Format()
    published_sizes = {"train": 33_003_326, "val": 8_250_124, "test": 4_587_167}
    how_to_obtain = ("recbench does not download BARS data. Get train.csv, valid.csv and test.csv of Criteo_x1 "
                     "from https://huggingface.co/datasets/reczoo/Criteo_x1 (md5 in reczoo/Datasets "
                     "Criteo/Criteo_x1/README.md) and place them in <data_root>/bars_criteo_x1/raw/ or point "
                     "dataset.source at their folder; see docs/protocols/bars_criteo_x1.md.")


class BarsAvazuX4Protocol(BarsProtocol):
    """BARS ``Avazu_x4`` (see the module docstring); ``min_count`` 2 is ``Avazu_x4_001``, 1 ``Avazu_x4_002``."""

    name = "bars_avazu_x4"
    benchmark = "Avazu_x4"
    line_format = AvazuX4Format()
    published_sizes = {"train": 32_343_172, "val": 4_042_897, "test": 4_042_898}
    how_to_obtain = ("recbench does not download BARS data. Get train.csv, valid.csv and test.csv of Avazu_x4 "
                     "from https://huggingface.co/datasets/reczoo/Avazu_x4 (md5 in reczoo/Datasets "
                     "Avazu/Avazu_x4/README.md) and place them in <data_root>/bars_avazu_x4/raw/ or point "
                     "dataset.source at their folder; see docs/protocols/bars_avazu_x4.md.")

    def __init__(self, source: SourceLike, min_count: int = 2, row_order: str = "frequency",
                 malformed: str = "skip", chunk_rows: int = 500_000, name: Optional[str] = None):
        super().__init__(source, min_count, row_order, malformed, chunk_rows, name)


def fetch(data_root: Path) -> Path:
    """``recbench-data fetch``: nothing is downloaded; returns the raw folder of either benchmark that
    holds the three files, else raises ``DatasetError`` saying how to obtain them."""
    for protocol in (BarsCriteoX1Protocol, BarsAvazuX4Protocol):
        raw = Path(data_root) / protocol.name / "raw"
        if all((raw / f).is_file() for f in FILES):
            return raw
    raise DatasetError(f"no BARS files in {Path(data_root) / 'bars_criteo_x1' / 'raw'} or "
                       f"{Path(data_root) / 'bars_avazu_x4' / 'raw'}. {BarsCriteoX1Protocol.how_to_obtain} "
                       f"{BarsAvazuX4Protocol.how_to_obtain}")
