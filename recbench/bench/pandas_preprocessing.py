"""A chunked-pandas implementation of recbench's Criteo preprocessing rules: the benchmark's reference.

It is what a careful engineer would write with pandas alone: ``pandas.read_csv`` in chunks of
``chunk_rows`` lines (C parser, categorical columns as strings, dense columns as float64), two
passes over the file (recbench's pipeline reads it once):

1. train-split value counts per categorical column (``value_counts`` per chunk, summed);
   the vocabulary of each field is its counted strings ordered by ascending key
   (``row_order="key"``; ``"frequency"``: by descending count, ties by ascending key), the key of a
   string computed once per distinct string, as recbench's rule defines it: lowercase hex of 1-15
   digits -> ``int(v, 16) + (16**len - 16) / 15``, else FNV-1a-64 | 2**63;
2. per chunk: dense ``log(max(x, 0) + 1)`` as float32 (missing -> 0), categorical strings ->
   rows through ``pandas.Index.get_indexer`` (unseen or missing -> 0, the OOV row), labels,
   row extras; rows appended to ``<split>/{dense,sparse,labels}.npy`` and
   ``<split>/targets/<name>.npy`` with plain writes.

Split assignment is recbench's rule object (``SplitAssigner``: DLRM chunks or the keyed random
permutation): it is a few vectorised numpy lines that pandas has no equivalent of, and both sides
pay the same for it. The data-line count comes from the same cached source description recbench
uses. The reference assumes a well-formed file (it skips recbench's malformed-line and UTF-8
checks, which favours it). Its arrays are checked equal to recbench's on the benchmark's file.

References: recbench.datasets.text.pipeline (the rules); pandas ``read_csv(chunksize=...)``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np
import pandas as pd

from recbench.datasets.storage import SPLITS
from recbench.datasets.text.sources import describe_source
from recbench.datasets.text.splits import SplitAssigner

FNV_OFFSET, FNV_PRIME, MASK64 = 0xCBF29CE484222325, 0x100000001B3, (1 << 64) - 1
HEX_DIGITS = frozenset("0123456789abcdef")


def string_key(value: str) -> int:
    """recbench's stable 64-bit key of one categorical string."""
    if 1 <= len(value) <= 15 and HEX_DIGITS.issuperset(value):
        return int(value, 16) + (16 ** len(value) - 16) // 15
    digest = FNV_OFFSET
    for byte in value.encode("utf-8"):
        digest = ((digest ^ byte) * FNV_PRIME) & MASK64
    return digest | (1 << 63)


class _NpyAppender:
    """A ``.npy`` file of known shape written by appending row blocks (plain writes)."""

    def __init__(self, path: Path, dtype, shape: Sequence[int]):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.handle, self.dtype = open(path, "wb"), np.dtype(dtype)
        np.lib.format.write_array_header_1_0(self.handle, {"descr": np.lib.format.dtype_to_descr(self.dtype),
                                                           "fortran_order": False, "shape": tuple(shape)})

    def append(self, block: np.ndarray) -> None:
        self.handle.write(np.ascontiguousarray(block, dtype=self.dtype).tobytes())

    def close(self) -> None:
        self.handle.close()


def preprocess(source: Path, output: Path, num_dense: int = 13, num_sparse: int = 26, split: str = "random",
               split_seed: int = 0, num_chunks: Optional[int] = 7, chunk_rows: int = 500_000,
               row_extras: Optional[Mapping[str, Path]] = None, row_order: str = "key") -> Dict[str, int]:
    """Criteo-format ``source`` (label, dense..., categorical... tab-separated) -> arrays under ``output``.

    Returns the rows per split. ``counts/<field>.npy`` holds each field's train frequencies
    (row 0 = OOV), as recbench writes them.
    """
    dense_cols = [f"I{i}" for i in range(1, num_dense + 1)]
    sparse_cols = [f"C{i}" for i in range(1, num_sparse + 1)]
    names = ["label", *dense_cols, *sparse_cols]
    dtypes = {"label": np.int8, **{c: np.float64 for c in dense_cols}, **{c: str for c in sparse_cols}}
    total = describe_source(Path(source)).lines
    assigner = SplitAssigner(split, total, [total], num_chunks, split_seed)
    extras = {name: np.load(path, mmap_mode="r") for name, path in sorted((row_extras or {}).items())}

    def chunks():
        return pd.read_csv(source, sep="\t", header=None, names=names, dtype=dtypes, chunksize=chunk_rows,
                           quoting=3, engine="c", keep_default_na=False, na_values=[""])

    # pass 1: split sizes and train value counts
    sizes = np.zeros(3, dtype=np.int64)
    counts: List[Optional[pd.Series]] = [None] * num_sparse
    missing = np.zeros(num_sparse, dtype=np.int64)
    start = 0
    for frame in chunks():
        codes = assigner(np.arange(start, start + len(frame)))
        start += len(frame)
        sizes += np.bincount(codes, minlength=3)
        train = frame[codes == 0]
        for f, column in enumerate(sparse_cols):
            values = train[column]
            missing[f] += int(values.isna().sum())
            chunk_counts = values.value_counts()
            counts[f] = chunk_counts if counts[f] is None else counts[f].add(chunk_counts, fill_value=0)

    vocabularies, output = [], Path(output)
    for f, column in enumerate(sparse_cols):
        field_counts = counts[f] if counts[f] is not None else pd.Series(dtype=np.int64)
        strings = field_counts.index.to_numpy(dtype=object)
        keys = np.fromiter((string_key(s) for s in strings), dtype=np.uint64, count=len(strings))
        order = (np.argsort(keys) if row_order == "key"
                 else np.lexsort((keys, -field_counts.to_numpy(dtype=np.int64))))
        vocabularies.append(pd.Index(strings[order]))
        (output / "counts").mkdir(parents=True, exist_ok=True)
        np.save(output / "counts" / f"{column}.npy",
                np.concatenate([[missing[f]], field_counts.to_numpy(dtype=np.int64)[order]]).astype(np.int64))

    # pass 2: arrays
    writers = []
    for code, name in enumerate(SPLITS):
        n = int(sizes[code])
        streams = {"dense": _NpyAppender(output / name / "dense.npy", np.float32, (n, num_dense)),
                   "sparse": _NpyAppender(output / name / "sparse.npy", np.int32, (n, num_sparse)),
                   "labels": _NpyAppender(output / name / "labels.npy", np.float32, (n,))}
        for extra in extras:
            streams[f"targets/{extra}"] = _NpyAppender(output / name / "targets" / f"{extra}.npy", np.float32, (n,))
        writers.append(streams)
    start = 0
    for frame in chunks():
        codes = assigner(np.arange(start, start + len(frame)))
        columns = {
            "labels": frame["label"].to_numpy(dtype=np.float32),
            "dense": np.log1p(frame[dense_cols].clip(lower=0).fillna(0.0).to_numpy(dtype=np.float64)).astype(np.float32),
            "sparse": np.empty((len(frame), num_sparse), dtype=np.int32),
        }
        for f, column in enumerate(sparse_cols):
            columns["sparse"][:, f] = vocabularies[f].get_indexer(frame[column]) + 1  # -1 (unseen, NaN) -> 0
        for extra, values in extras.items():
            columns[f"targets/{extra}"] = np.asarray(values[start:start + len(frame)], dtype=np.float32)
        start += len(frame)
        for code, streams in enumerate(writers):
            rows = np.flatnonzero(codes == code)
            if rows.size:
                for key, stream in streams.items():
                    stream.append(columns[key][rows])
    for streams in writers:
        for stream in streams.values():
            stream.close()
    return {name: int(sizes[code]) for code, name in enumerate(SPLITS)}
