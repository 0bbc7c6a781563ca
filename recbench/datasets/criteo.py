"""The ``criteo_kaggle`` and ``criteo_terabyte`` protocols: Criteo display-ad click logs.

Both sources share one line format: tab-separated, no header, 40 columns::

    label (0/1), I1..I13 (integer counts, may be empty or negative), C1..C26 (8-digit hex hashes, may be empty)

- Criteo Kaggle (Display Advertising Challenge): one file ``train.txt``, 45,840,617 lines,
  7 days in time order. Default split ``dlrm_chunks``: the lines cut into 7 equal chunks
  (DLRM's "days"), chunks 1-6 train, chunk 7 halved: first half test, second half validation.
- Criteo Terabyte (1TB Click Logs): ``day_0`` .. ``day_23`` (plain or ``.gz``), about 4.4 billion
  lines. Default split ``dlrm_chunks`` with one chunk per file: days 0-22 train, day 23 halved
  into test then validation (MLPerf DLRM); the dataset config also caps every field at
  40,000,000 rows (``hash_cap``, DLRM/MLPerf ``--max-ind-range=40000000``).

Tables are ``C1``..``C26`` (row 0 = OOV; rows 1..V in ascending key order, i.e. sorted hex
token, by default), 13 dense features ``log(max(x, 0) + 1)`` with missing
-> 0. Every rule (thresholds, hash cap, split, malformed-line policy) and the sha256 and line
count of every source file are in the protocol id; see ``recbench.datasets.text.pipeline``
for the exact rules. The data is never downloaded by recbench (Criteo's licence terms apply):
the user supplies the files, see ``datasets/criteo/README.md``.

Row extras: float ``.npy`` sidecars aligned with the source lines (one value per data line)
can be attached with ``row_extras={name: path}``; they are split with the rows and stored as
``<split>/targets/<name>.npy`` (the synthetic protocol stores its true click probability so).

References:
    Criteo AI Lab. Kaggle Display Advertising Challenge Dataset (2014) and Criteo 1TB Click
    Logs (2015), https://ailab.criteo.com/ressources/
    M. Naumov et al. 2019. Deep Learning Recommendation Model for Personalization and
    Recommendation Systems. arXiv:1906.00091; facebookresearch/dlrm (split, log transform,
    ``--max-ind-range``).
    P. Mattson et al. 2020. MLPerf Training Benchmark. MLSys (the Terabyte day-23 split).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

from recbench.datasets.base import DatasetProtocol
from recbench.datasets.errors import DatasetError
from recbench.datasets.storage import CacheWriter
from recbench.datasets.text.formats import LineFormat
from recbench.datasets.text.pipeline import PipelineConfig, TextPipeline
from recbench.datasets.text.sources import RowExtra, SourceFile, SourceLike, describe_source, expand_sources

DENSE_FIELDS = tuple(f"I{i}" for i in range(1, 14))
SPARSE_FIELDS = tuple(f"C{i}" for i in range(1, 27))
CRITEO_FORMAT = LineFormat("criteo", ("label", *DENSE_FIELDS, *SPARSE_FIELDS), "\t", "label",
                           dense=DENSE_FIELDS, categorical=SPARSE_FIELDS)

# Distinct values per categorical field of Criteo Kaggle train.txt (C1..C26), as reported by DLRM.
KAGGLE_CARDINALITIES = (1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194, 27,
                        14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572)

FORMATS = ("kaggle", "terabyte")
DEFAULT_NAMES = {"kaggle": "criteo_kaggle", "terabyte": "criteo_terabyte"}
STORAGE_DIR = "criteo"  # <data_root>/criteo/{raw,processed}: one folder (and card) for both sources

_NO_DOWNLOAD = "recbench does not download Criteo data (Criteo's licence terms apply)."
_GET = {
    "kaggle": ("Get the Kaggle Display Advertising Challenge archive (dac.tar.gz) from Criteo AI Lab "
               "(https://ailab.criteo.com/ressources/) and extract train.txt (45,840,617 lines)"),
    "terabyte": "Get the Criteo 1TB Click Logs (day_0 .. day_23, plain or .gz) from Criteo AI Lab "
                "(https://ailab.criteo.com/ressources/)",
}
_PLACE = "into <data_root>/criteo/raw/ or point dataset.source at the file(s); see datasets/criteo/README.md."
HOW_TO_OBTAIN = {fmt: f"{_NO_DOWNLOAD} {get} {_PLACE}" for fmt, get in _GET.items()}


def fetch(data_root: Path) -> Path:
    """``recbench-data fetch``: nothing is downloaded; returns ``<data_root>/criteo/raw`` when it holds
    ``train.txt`` or ``day_*`` files, else raises ``DatasetError`` saying how to obtain them."""
    raw = Path(data_root) / STORAGE_DIR / "raw"
    if (raw / "train.txt").is_file() or any(raw.glob("day_*")):
        return raw
    raise DatasetError(f"no Criteo files in {raw}. {_NO_DOWNLOAD} Criteo Kaggle: {_GET['kaggle']}. Criteo Terabyte: "
                       f"{_GET['terabyte']}. Put them {_PLACE}")


def criteo_config(format: str = "kaggle", split: str = "dlrm_chunks", split_seed: int = 0, min_count: int = 1,
                  hash_cap: Optional[int] = None, malformed: str = "skip",
                  chunk_rows: int = 500_000, row_order: str = "key") -> PipelineConfig:
    """The Criteo preprocessing rules; ``dlrm_chunks`` uses 7 chunks (kaggle) or one per file (terabyte)."""
    if format not in FORMATS:
        raise ValueError(f"criteo format must be one of {', '.join(FORMATS)}, got {format!r}")
    return PipelineConfig(
        fmt=CRITEO_FORMAT, split=split, split_seed=int(split_seed), num_chunks=7 if format == "kaggle" else None,
        min_count=int(min_count), hash_cap=None if hash_cap is None else int(hash_cap), malformed=malformed,
        chunk_rows=int(chunk_rows), row_order=row_order)


class CriteoProtocol(DatasetProtocol):
    """Criteo Kaggle or Terabyte, streamed from the user's text files.

    Args:
        source: path, glob (natural order: ``day_2`` before ``day_10``) or list of paths of the
            raw files (``.gz`` allowed).
        format: ``"kaggle"`` (one ``train.txt``, 7 DLRM chunks) or ``"terabyte"`` (day files,
            one chunk per day).
        split: ``"dlrm_chunks"`` (default) or ``"random"`` (8:1:1).
        split_seed: seed of the ``random`` split.
        min_count: train occurrences a value needs for its own row (default 1: every train value).
        hash_cap: null, or at most this many rows per field (``key % hash_cap`` before the vocabulary).
        malformed: ``"skip"`` (count, list and drop malformed lines) or ``"fail"`` (raise ``DatasetError``).
        chunk_rows: lines per streaming chunk (memory knob; does not change the arrays or the id).
        name: protocol name (default ``criteo_kaggle`` / ``criteo_terabyte``).
        row_extras: ``{target_name: path}`` of float ``.npy`` arrays aligned with the data lines.
        row_order: ``"key"`` (default: rows by ascending key, i.e. sorted hex token, frequency-independent)
            or ``"frequency"`` (by descending train count).
    """

    name = "criteo_kaggle"

    def __init__(self, source: SourceLike, format: str = "kaggle", split: str = "dlrm_chunks", split_seed: int = 0,
                 min_count: int = 1, hash_cap: Optional[int] = None, malformed: str = "skip",
                 chunk_rows: int = 500_000, name: Optional[str] = None,
                 row_extras: Optional[Mapping[str, str]] = None, row_order: str = "key"):
        self.config = criteo_config(format, split, split_seed, min_count, hash_cap, malformed, chunk_rows, row_order)
        self.format = format
        self.source = source if isinstance(source, (str, os.PathLike)) else list(source)
        self.name = name or DEFAULT_NAMES[format]
        self.row_extras = [RowExtra(k, Path(v)) for k, v in sorted((row_extras or {}).items())]

    def sources(self) -> List[SourceFile]:
        paths = expand_sources(self.source, HOW_TO_OBTAIN[self.format])
        if self.config.num_chunks is None and self.config.split == "dlrm_chunks" and len(paths) < 2:
            raise DatasetError(
                f"format 'terabyte' with split 'dlrm_chunks' uses one chunk per day file and needs at least 2 "
                f"files (day_0 .. day_23), got {[str(p) for p in paths]}; use format 'kaggle' for a single file")
        for extra in self.row_extras:
            if not extra.path.is_file():
                raise DatasetError(f"row extra {extra.name!r}: file {extra.path} does not exist")
        return [describe_source(p) for p in paths]

    def settings(self) -> Dict[str, Any]:
        return {
            "dataset": "criteo",
            "format": self.format,
            "sources": [s.describe() for s in self.sources()],
            "rules": self.config.rules(),
            "row_extras": {e.name: e.describe() for e in self.row_extras},
        }

    def cache_dir(self, data_root: Path) -> Path:
        return Path(data_root) / STORAGE_DIR / "processed" / self.protocol_id()

    def pipeline(self) -> TextPipeline:
        return TextPipeline(self.config, self.sources(), self.row_extras, description=self.name)

    def build(self, writer: CacheWriter) -> Dict[str, Any]:
        return self.pipeline().build(writer, self.name, self.protocol_id(), extras={"format": self.format})
