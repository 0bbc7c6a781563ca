"""Streaming preprocessing of delimited click logs (Criteo, Avazu, synthetic) into protocol arrays.

One pipeline serves every text-file protocol. It reads the source files in chunks of
``chunk_rows`` lines, so peak memory depends on the chunk size and on the number of distinct
categorical values (the vocabularies, which are inherent), never on the file size.

Pipeline (one streaming read of the sources, then one pass over compact codes)::

    sources --(chunk of lines)--> validate (numpy + polars, vectorised) --> split assignment
        read: labels, dense transform, row extras       --> <split>/{dense,labels}.npy,
                                                            <split>/targets/<row extra>.npy
              categorical values -> polars Categorical codes (stable across chunks), spooled
              per split; TRAIN occurrences counted per code; each distinct value keyed once
        then: keys + train counts -> vocabularies       --> counts/<field>.npy
              spooled codes -> rows (one gather)        --> <split>/sparse.npy

Rules (every one is part of the protocol id through ``PipelineConfig.rules()``):

- Lines. A line is split on the format's separator; no quoting (a quote character is data).
  A trailing ``\\r`` is ignored. A malformed line is one that is not valid UTF-8, is empty, has
  the wrong number of fields, or fails a field check (label not ``0``/``1``; an integer field
  that is not a signed 64-bit integer; format-specific checks such as Avazu's ``hour``).
  Malformed lines are counted and reported with their 1-based line numbers: ``malformed=skip``
  drops them (count and the first 20 in the manifest extras and the log), ``malformed=fail``
  raises ``DatasetError`` naming file, line, field and what is allowed. Nothing is dropped
  silently.
- Dense (integer) fields: ``log(max(x, 0) + 1)`` as float32; a missing (empty) value is 0.
  Negative integers are clamped to 0 before the log, as DLRM and Hetu do.
- Categorical fields: each value gets a stable 64-bit key. A value of 1 to 15 lowercase hex
  digits (Criteo's 8-digit hashes, Avazu's ids and numbers) is keyed by its hex value plus an
  offset per length (``int(v, 16) + (16**len(v) - 16) / 15``), which is injective and below
  2**60; any other value is keyed by FNV-1a-64 of its UTF-8 bytes with the top bit set. An
  empty value is missing. With ``hash_cap`` the key becomes ``key % hash_cap`` before the
  vocabulary is built (DLRM's ``--max-ind-range``), so a field has at most ``hash_cap`` rows
  plus the OOV row.
- Vocabularies and counts come from the TRAIN split only. Keys seen fewer than ``min_count``
  times in train, keys never seen in train, and missing values map to row 0 (OOV). Rows
  1..V are ordered by ascending key (``row_order="key"``, the default), an order independent of
  frequency as in the references: Hetu numbers a field's values with sklearn's ``LabelEncoder``
  (sorted raw tokens) and DLRM by first appearance (``data_utils.py``). For tokens of equal length
  that are all hex (Criteo's 8-digit hashes) ascending key is exactly the sorted-token order;
  decimal integers without leading zeros (Avazu's numeric columns, which pandas reads as integers)
  come in ascending numeric order, as ``LabelEncoder`` sorts them; FNV-keyed values come in hash
  order. ``row_order="frequency"`` numbers rows by descending train count, ties by ascending key
  (recbench's earlier order, kept as an option). ``counts[r]`` is the train count of row ``r``
  in either order; ``counts[0]`` is the number of train values that mapped to OOV.
- Splits are assigned by data-line index in the concatenated sources (header lines excluded,
  malformed lines included), so a skipped malformed line never moves another row between
  splits, and ``chunk_rows`` never changes the arrays. Rows keep file order inside a split.
  ``dlrm_chunks``: the lines are cut into ``num_chunks`` consecutive chunks of equal size
  (the first ``L % num_chunks`` chunks one line longer; ``num_chunks=None``: one chunk per
  source file, e.g. Criteo Terabyte's days); all chunks but the last are train, the last is
  halved with ``numpy.array_split``: first half test, second half validation, exactly as
  DLRM's ``dlrm_data_pytorch.py`` and Hetu. ``random``: line ``i`` goes to train, validation
  or test by its rank ``pi(i)`` under a keyed pseudo-random permutation of ``[0, L)`` (a
  4-round Feistel network on splitmix64, cycle-walked; seed ``split_seed``): ranks below
  ``L - 2 * (L // 10)`` train, the next ``L // 10`` validation, the rest test (8:1:1 exactly,
  in O(1) memory).
- Row extras: float sidecar arrays aligned with the data lines (e.g. the synthetic true
  click probability) are gathered by data-line index and stored as ``<split>/targets/<name>.npy``.

Arrays are streamed to ``.npy`` files with plain writes (no memory maps), so the page cache of
the outputs never counts against the process.

References:
    M. Naumov et al. 2019. Deep Learning Recommendation Model for Personalization and
    Recommendation Systems. arXiv:1906.00091 (the log transform, the 7-chunk split of Criteo
    Kaggle, ``--max-ind-range``); facebookresearch/dlrm ``dlrm_data_pytorch.py`` and
    ``data_utils.py``.
    X. Miao et al. 2022. HET: Scaling out Huge Embedding Model Training via Cache-enabled
    Distributed Framework. VLDB (Hetu's Criteo/Avazu preprocessing, same split and clamp).
    G. Fowler, L. C. Noll, K.-P. Vo. FNV hash (FNV-1a, 64-bit).
    M. Luby and C. Rackoff. 1988. How to Construct Pseudorandom Permutations from
    Pseudorandom Functions. SIAM J. Comput. 17(2) (the Feistel permutation).
"""
from __future__ import annotations

import functools
import glob
import gzip
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
from tqdm.auto import tqdm

from recbench.datasets.base import DatasetError
from recbench.datasets.storage import SPLITS, CacheWriter, sha256_file, spec_to_manifest
from recbench.types import DatasetSpec, TableSpec

log = logging.getLogger(__name__)

# Bump whenever a rule below changes the arrays without changing a setting.
PIPELINE_VERSION = 1
MISSING_KEY = np.uint64(2**63 - 1)  # hex keys are < 2**60, FNV keys >= 2**63
MAX_EXAMPLES = 20  # malformed lines listed in the manifest and the log
CHECKSUM_CACHE = ".recbench-checksums.json"
_NEWLINE, _CR = 10, 13
_READ_BYTES = 1 << 20  # newline scan of a read stays in cache
_HEX_PATTERN = r"^[0-9a-f]{1,15}$"
_FNV_OFFSET = np.uint64(0xCBF29CE484222325)
_FNV_PRIME = np.uint64(0x100000001B3)
_TOP_BIT = np.uint64(1 << 63)
# number of hex strings shorter than ``length`` (lengths 1..15): makes the hex key injective
_HEX_LENGTH_OFFSET = np.array([0] + [(16**n - 16) // 15 for n in range(1, 17)], dtype=np.uint64)
INT64_RANGE = "[-9223372036854775808, 9223372036854775807]"

SourceLike = Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]]


# ------------------------------------------------------------------------------------------------
# sources: expansion, checksums and line counts (cached next to the files)
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SourceFile:
    """One source file: its sha256 (of the bytes on disk) and its number of text lines."""

    path: Path
    sha256: str
    lines: int

    def describe(self) -> Dict[str, Any]:
        return {"file": self.path.name, "sha256": self.sha256, "lines": self.lines}


def _natural_key(path: Path) -> List[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(path))]


def expand_sources(source: SourceLike, how_to_obtain: str) -> List[Path]:
    """Resolve ``source`` (a path, a glob, or a list of them) to existing files.

    Globs expand in natural order (``day_2`` before ``day_10``). A missing file or a glob that
    matches nothing raises ``DatasetError`` naming the path and ``how_to_obtain``.
    """
    items = [source] if isinstance(source, (str, os.PathLike)) else list(source)
    if not items:
        raise DatasetError(f"no source files given. {how_to_obtain}")
    paths: List[Path] = []
    for item in items:
        text = os.fspath(item)
        if glob.has_magic(text):
            matches = sorted((Path(p) for p in glob.glob(text)), key=_natural_key)
            if not matches:
                raise DatasetError(f"source pattern {text!r} matches no file. {how_to_obtain}")
            paths.extend(matches)
        else:
            paths.append(Path(text))
    for path in paths:
        if path.is_dir():
            raise DatasetError(f"source {path} is a folder; give the data file in it (or a glob such as "
                               f"{os.path.join(path, '*.txt')!r}). {how_to_obtain}")
        if not path.is_file():
            raise DatasetError(f"source file {path} does not exist. {how_to_obtain}")
    return paths


GZIP_MAGIC = b"\x1f\x8b"


def open_binary(path: Path):
    """Open a source for reading bytes; gzip files (by their magic bytes, whatever their name) are
    decompressed on the fly."""
    with open(path, "rb") as probe:
        compressed = probe.read(2) == GZIP_MAGIC
    return gzip.open(path, "rb") if compressed else open(path, "rb")


def count_lines(path: Path) -> int:
    """Text lines of a file: newlines, plus one for a final line without a newline."""
    lines, last = 0, b"\n"
    with open_binary(path) as handle:
        while True:
            block = handle.read(_READ_BYTES)
            if not block:
                break
            lines += block.count(b"\n")
            last = block[-1:]
    return lines + (last != b"\n")


_DIGESTS: Dict[Tuple[str, int, int], SourceFile] = {}


def describe_source(path: Path) -> SourceFile:
    """sha256 and line count of ``path``, cached by (path, size, mtime).

    The cache is a small JSON file (``.recbench-checksums.json``) next to the source, so the
    multi-gigabyte hash is computed once, not on every run; a read-only directory only loses
    the cache.
    """
    path = Path(path).resolve()
    stat = path.stat()
    memo_key = (str(path), stat.st_size, stat.st_mtime_ns)
    if memo_key in _DIGESTS:
        return _DIGESTS[memo_key]
    cache_path = path.parent / CHECKSUM_CACHE
    try:
        cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    except (OSError, json.JSONDecodeError):
        cache = {}
    entry = cache.get(path.name)
    if not (entry and entry.get("size") == stat.st_size and entry.get("mtime_ns") == stat.st_mtime_ns):
        log.info("computing sha256 and line count of %s (cached afterwards in %s)", path, cache_path.name)
        entry = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": sha256_file(path),
                 "lines": count_lines(path)}
        cache[path.name] = entry
        try:
            tmp = cache_path.with_name(f"{cache_path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(cache, indent=1, sort_keys=True))
            os.replace(tmp, cache_path)
        except OSError as exc:
            log.warning("cannot cache the checksum of %s (%s); it is recomputed next run", path, exc)
    described = SourceFile(path, entry["sha256"], int(entry["lines"]))
    _DIGESTS[memo_key] = described
    return described


# ------------------------------------------------------------------------------------------------
# line formats
# ------------------------------------------------------------------------------------------------


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


# ------------------------------------------------------------------------------------------------
# categorical keys
# ------------------------------------------------------------------------------------------------


def _fnv1a64(values: pl.Series) -> np.ndarray:
    """FNV-1a-64 of each string's UTF-8 bytes, vectorised over byte positions."""
    arr = pc.cast(values.to_arrow(), pa.large_binary())
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int64)[arr.offset : arr.offset + len(arr) + 1]
    data_buffer = arr.buffers()[2]
    data = np.frombuffer(data_buffer, dtype=np.uint8) if data_buffer is not None else np.zeros(0, np.uint8)
    starts, lengths = offsets[:-1], np.diff(offsets)
    digest = np.full(len(arr), _FNV_OFFSET, dtype=np.uint64)
    for position in range(int(lengths.max(initial=0))):
        active = np.flatnonzero(lengths > position)
        digest[active] = (digest[active] ^ data[starts[active] + position]) * _FNV_PRIME
    return digest


def iter_string_keys(frame: pl.DataFrame, columns: Sequence[str], plain: bool = False) -> Iterator[np.ndarray]:
    """Stable uint64 keys of the categorical string ``columns`` of ``frame`` (module docstring).

    Yields one (N,) uint64 array per column, one column at a time (bounded temporaries);
    ``MISSING_KEY`` marks missing (null) values. ``plain=True`` promises that no value contains
    ``A``-``F`` or ``+`` (checked on the raw bytes by ``parse_chunk``), the only characters
    ``str.to_integer(base=16)`` accepts outside the canonical lowercase form, so the regex check
    can be skipped with identical keys.
    """
    for name in columns:
        col = pl.col(name)
        value = col.str.to_integer(base=16, strict=False, dtype=pl.UInt64)
        exprs = [value.fill_null(0).alias("hex"), value.is_not_null().alias("parsed"),
                 col.str.len_bytes().fill_null(0).alias("length")]
        if not plain:
            exprs.append(col.str.contains(_HEX_PATTERN).fill_null(False).alias("canonical"))
        parts = frame.select(exprs)
        length = parts.get_column("length").to_numpy()
        is_hex = parts.get_column("parsed").to_numpy() & (length <= 15)
        if not plain:
            is_hex &= parts.get_column("canonical").to_numpy()
        keys = parts.get_column("hex").to_numpy() + _HEX_LENGTH_OFFSET[np.minimum(length, 16)]
        missing = length == 0  # read_csv turns empty fields into nulls
        other = np.flatnonzero(~is_hex & ~missing)
        if other.size:
            keys[other] = _fnv1a64(frame.get_column(name).gather(other)) | _TOP_BIT
        keys[missing] = MISSING_KEY
        yield keys


def string_keys(frame: pl.DataFrame, columns: Sequence[str], plain: bool = False) -> List[np.ndarray]:
    """``iter_string_keys`` as a list."""
    return list(iter_string_keys(frame, columns, plain))


def cap_keys(keys: np.ndarray, hash_cap: Optional[int]) -> np.ndarray:
    """``key % hash_cap`` for present keys (missing stays missing); identity without a cap."""
    if hash_cap is None:
        return keys
    return np.where(keys == MISSING_KEY, MISSING_KEY, keys % np.uint64(hash_cap))


# ------------------------------------------------------------------------------------------------
# chunked line reading and vectorised validation
# ------------------------------------------------------------------------------------------------


@dataclass
class LineChunk:
    """Complete lines of one source: ``data`` holds them, each ending with ``\\n`` at ``ends``.

    Attributes:
        source: the file.
        first_line: 1-based line number (in the file) of the chunk's first line.
        first_index: data-line index (in the concatenated sources) of the first line.
        data: bytes of the lines.
        ends: (n_lines,) int64 positions of each line's newline in ``data``.
    """

    source: SourceFile
    first_line: int
    first_index: int
    data: bytes
    ends: np.ndarray

    def __len__(self) -> int:
        return len(self.ends)


def iter_line_chunks(source: SourceFile, chunk_rows: int, first_index: int,
                     header: Optional[str] = None) -> Iterator[LineChunk]:
    """Stream ``source`` in chunks of ``chunk_rows`` complete lines (memory ~ one chunk).

    With ``header``, the file's first line must equal it (else ``DatasetError``) and is skipped.
    A final line without a newline gets one. The lines read must match ``source.lines``.
    """
    line, index = 1, first_index
    with open_binary(source.path) as handle:
        if header is not None:
            first = handle.readline().rstrip(b"\r\n")
            if first != header.encode():
                shown = first[:200].decode("utf-8", "replace")
                raise DatasetError(f"{source.path}:1: header is {shown!r}; allowed: exactly {header!r}")
            line = 2
        # read blocks (memoryviews: cutting them copies nothing) until chunk_rows lines are pending,
        # then join exactly one chunk's lines into one bytes object (the only copy)
        blocks: List[memoryview] = []
        newlines: List[np.ndarray] = []  # newline positions in each block's original read, minus ``base``
        base: List[int] = []  # bytes cut from the front of each block
        pending, last, eof = 0, b"\n", False
        while True:
            if not eof and pending < chunk_rows:
                block = handle.read(_READ_BYTES)
                if not block:
                    eof = True
                    block = b"" if last == b"\n" else b"\n"  # a final line without a newline gets one
                if block:
                    found = np.flatnonzero(np.frombuffer(block, dtype=np.uint8) == _NEWLINE)
                    blocks.append(memoryview(block))
                    newlines.append(found)
                    base.append(0)
                    pending += found.size
                    last = block[-1:]
                continue
            if pending == 0:
                break
            take = min(chunk_rows, pending)
            k, need = 0, take
            while newlines[k].size < need:
                need -= newlines[k].size
                k += 1
            cut = int(newlines[k][need - 1]) - base[k] + 1
            pieces = blocks[:k] + [blocks[k][:cut]]
            offsets = np.cumsum([0] + [len(b) for b in pieces[:-1]])
            ends = np.concatenate([newlines[i] + (offsets[i] - base[i]) for i in range(k)]
                                  + [newlines[k][:need] + (offsets[k] - base[k])])
            data = b"".join(pieces)
            del pieces  # the blocks' bytes are freed as soon as the chunk is consumed
            if cut < len(blocks[k]):
                blocks = [blocks[k][cut:]] + blocks[k + 1:]
                newlines = [newlines[k][need:]] + newlines[k + 1:]
                base = [base[k] + cut] + base[k + 1:]
            else:
                blocks, newlines, base = blocks[k + 1:], newlines[k + 1:], base[k + 1:]
            pending -= take
            chunk = LineChunk(source, line, index, data, ends)
            del data, ends  # the consumer may drop the chunk's bytes once parsed
            yield chunk
            del chunk
            line += take
            index += take
    if line - 1 != source.lines:
        raise DatasetError(
            f"{source.path}: read {line - 1} lines but the file had {source.lines} when its checksum was "
            "taken; it changed during preprocessing (or its checksum cache is stale: delete "
            f"{source.path.parent / CHECKSUM_CACHE})")


def invalid_utf8_positions(data: np.ndarray) -> np.ndarray:
    """Sorted positions of the bytes of ``data`` (uint8) that break UTF-8 (RFC 3629).

    Vectorised over the non-ASCII bytes: a lead byte must be followed by the right number of
    continuation bytes (with the overlong/surrogate/range limits on the second byte), and every
    continuation byte must belong to a valid sequence.
    """
    high = np.flatnonzero(data >= 0x80)
    if high.size == 0:
        return high
    byte = data[high]
    is_cont = (byte & 0xC0) == 0x80
    need = np.zeros(high.size, dtype=np.int64)
    need[(byte >= 0xC2) & (byte <= 0xDF)] = 1
    need[(byte >= 0xE0) & (byte <= 0xEF)] = 2
    need[(byte >= 0xF0) & (byte <= 0xF4)] = 3
    lead = np.flatnonzero(need > 0)
    lead_pos, lead_need, lead_byte = high[lead], need[lead], byte[lead]
    ok = np.ones(lead.size, dtype=bool)
    for k in (1, 2, 3):
        has = np.flatnonzero(lead_need >= k)
        pos = lead_pos[has] + k
        nxt = np.zeros(pos.size, dtype=np.uint8)
        inside = pos < data.size
        nxt[inside] = data[pos[inside]]
        good = inside & ((nxt & 0xC0) == 0x80)
        if k == 1:
            first = lead_byte[has]
            good &= ~(((first == 0xE0) & (nxt < 0xA0)) | ((first == 0xED) & (nxt > 0x9F))
                      | ((first == 0xF0) & (nxt < 0x90)) | ((first == 0xF4) & (nxt > 0x8F)))
        ok[has[~good]] = False
    claimed = np.concatenate([lead_pos[ok & (lead_need >= k)] + k for k in (1, 2, 3)])
    cont_pos = high[is_cont]
    stray = cont_pos[~np.isin(cont_pos, claimed)]
    invalid = high[(need == 0) & ~is_cont]  # C0, C1, F5..FF
    return np.unique(np.concatenate([invalid, lead_pos[~ok], stray]))


@dataclass(frozen=True)
class Malformed:
    """One malformed line: where, which field, what was found, what is allowed."""

    path: Path
    line: int
    field: str
    problem: str
    allowed: str

    def message(self) -> str:
        return f"{self.path}:{self.line}: {self.problem}; allowed: {self.allowed}"


@dataclass
class ParsedChunk:
    """The valid rows of a chunk.

    Attributes:
        rows: (N,) int64 line offsets (0-based, within the chunk) of the valid rows.
        frame: polars frame of the valid rows: dense columns Int64 (null = missing), the others
            String (null = empty).
        malformed: the first ``MAX_EXAMPLES`` malformed lines of the chunk, in line order.
        malformed_count: number of malformed lines in the chunk.
    """

    rows: np.ndarray
    frame: pl.DataFrame
    malformed: List[Malformed]
    malformed_count: int


def _shown(value: Optional[str]) -> str:
    if value is None:
        return "empty"
    return repr(value if len(value) <= 60 else value[:57] + "...")


def _read_lines(text: bytes, fmt: LineFormat, dtypes: Mapping[str, pl.DataType]) -> pl.DataFrame:
    schema = {c: dtypes.get(c, pl.String) for c in fmt.columns}
    return pl.read_csv(text, has_header=False, separator=fmt.separator, new_columns=list(fmt.columns),
                       schema=schema, quote_char=None)


def parse_chunk(chunk: LineChunk, fmt: LineFormat) -> ParsedChunk:
    """Validate every line of ``chunk`` and parse the valid ones (no per-line Python).


    Dense columns are parsed as Int64 by the CSV reader itself when that is provably the same
    rule: the reader accepts exactly the values the String path accepts (the field read as
    String, then ``str.cast(pl.Int64)``: optional sign, decimal digits, within int64; checked by
    ``tests/datasets/test_text_pipeline.py``) except that it also skips a leading space, so this
    fast path is taken only when the chunk has no space (and, conservatively, no carriage return
    other than line endings); a value it rejects makes the whole chunk fall back to String
    columns and the per-field check, which names the line.
    """
    data = np.frombuffer(chunk.data, dtype=np.uint8)
    ends = chunk.ends
    n = len(ends)
    starts = np.empty(n, dtype=np.int64)
    starts[:1] = 0
    starts[1:] = ends[:-1] + 1
    trailing_cr = (ends > starts) & (data[ends - 1] == _CR)
    content_end = ends - trailing_cr
    # separators per line, counted per block of lines (small, cache-resident temporaries)
    separators = np.empty(n, dtype=np.int64)
    sep = ord(fmt.separator)
    step = 1 << 12
    counter = np.int32 if n == 0 or int((ends - starts).max()) < 2**31 else np.int64  # no overflow
    for i in range(0, n, step):
        j = min(i + step, n)
        begin, end = int(starts[i]), int(ends[j - 1]) + 1
        separators[i:j] = np.add.reduceat(data[begin:end] == sep, starts[i:j] - begin, dtype=counter)
    problem = np.zeros(n, dtype=np.int8)  # 0 ok, 1 UTF-8, 2 empty, 3 field count
    problem[separators != len(fmt.columns) - 1] = 3
    problem[content_end == starts] = 2
    bad_bytes = np.zeros(0, np.int64) if chunk.data.isascii() else invalid_utf8_positions(data)
    first_bad_byte: Dict[int, int] = {}
    if bad_bytes.size:
        bad_lines, first = np.unique(np.searchsorted(ends, bad_bytes), return_index=True)
        problem[bad_lines] = 1
        first_bad_byte = dict(zip(bad_lines[:MAX_EXAMPLES].tolist(), bad_bytes[first[:MAX_EXAMPLES]].tolist()))
    structural = np.flatnonzero(problem)
    path = chunk.source.path
    found: List[Tuple[int, Malformed]] = []
    for offset in structural[:MAX_EXAMPLES].tolist():
        line = chunk.first_line + offset
        kind = int(problem[offset])
        if kind == 1:
            pos = first_bad_byte.get(offset, int(starts[offset]))
            what = (f"byte 0x{int(data[pos]):02x} at column {pos - int(starts[offset]) + 1} "
                    "is not valid UTF-8")
            found.append((offset, Malformed(path, line, "line", what, "UTF-8 text")))
        else:
            expected = f"{len(fmt.columns)} {fmt.separator_name}-separated fields ({', '.join(fmt.columns[:3])}, ...)"
            what = "empty line" if kind == 2 else f"line has {int(separators[offset]) + 1} fields"
            found.append((offset, Malformed(path, line, "line", what, expected)))
    good = np.flatnonzero(problem == 0)
    dtypes: Dict[str, pl.DataType] = {}
    dense_parsed = False
    if good.size == 0:
        frame = pl.DataFrame(schema={c: pl.String for c in fmt.columns})
    else:
        if structural.size:
            keep = np.repeat(problem == 0, ends - starts + 1)
            text = data[keep].tobytes()
        else:
            text = chunk.data
        frame = None
        only_trailing_cr = b"\r" not in text or text.count(b"\r") == int(trailing_cr[good].sum())
        if fmt.dense and b" " not in text and only_trailing_cr:
            try:
                frame = _read_lines(text, fmt, {**dtypes, **{c: pl.Int64 for c in fmt.dense}})
                dense_parsed = True
            except pl.exceptions.PolarsError:  # a value that is not an int64: the checks below name it
                frame = None
        if frame is None:
            frame = _read_lines(text, fmt, dtypes)
        del text
        if frame.height != good.size:  # a line polars split differently from the byte scan: never guess
            raise DatasetError(
                f"{chunk.source.path}:{chunk.first_line}-{chunk.first_line + n - 1}: the CSV reader found "
                f"{frame.height} rows in {good.size} well-formed lines; allowed: one record per line, no "
                "embedded line breaks")
    count = int(structural.size)
    checks = fmt.checks(dense_parsed=dense_parsed)
    if frame.height and checks:
        flags = frame.select([c.bad.fill_null(False).alias(f"_bad{k}") for k, c in enumerate(checks)]).to_numpy()
        row_bad = flags.any(axis=1)
        if row_bad.any():
            bad_rows = np.flatnonzero(row_bad)
            count += int(bad_rows.size)
            for r in bad_rows[:MAX_EXAMPLES].tolist():
                check = checks[int(np.argmax(flags[r]))]
                value = frame.get_column(check.field)[r]
                offset = int(good[r])
                found.append((offset, Malformed(path, chunk.first_line + offset, check.field,
                                                f"field {check.field!r} is {_shown(value)}", check.allowed)))
            frame = frame.filter(pl.Series(~row_bad))
            good = good[~row_bad]
    if fmt.dense and not dense_parsed:
        frame = frame.with_columns([pl.col(c).cast(pl.Int64) for c in fmt.dense])  # all valid by now
    found.sort(key=lambda item: item[0])
    return ParsedChunk(good.astype(np.int64), frame, [m for _, m in found[:MAX_EXAMPLES]], count)


# ------------------------------------------------------------------------------------------------
# splits
# ------------------------------------------------------------------------------------------------


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser (uint64 -> uint64, wrap-around arithmetic)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class FeistelPermutation:
    """A keyed pseudo-random bijection of ``[0, n)`` evaluated pointwise (O(1) memory).

    A balanced 4-round Feistel network on ``2 * half`` bits (the smallest even width with
    ``2**bits >= n``) whose round function is splitmix64 of the right half xor a round key;
    values that land outside ``[0, n)`` are re-encrypted (cycle walking), which keeps a
    bijection on ``[0, n)``.
    """

    def __init__(self, n: int, seed: int, rounds: int = 4):
        if n < 1:
            raise ValueError(f"permutation domain must be non-empty, got n={n}")
        bits = max(2, (int(n) - 1).bit_length())
        self.n, self.half = int(n), (bits + 1) // 2
        self.mask = np.uint64((1 << self.half) - 1)
        state = np.random.SeedSequence([int(seed), 0x5EED5]).generate_state(rounds, dtype=np.uint64)
        self.keys = [np.uint64(k) for k in state]

    def _encrypt(self, x: np.ndarray) -> np.ndarray:
        left, right = x >> np.uint64(self.half), x & self.mask
        for key in self.keys:
            left, right = right, left ^ (_mix64(right ^ key) & self.mask)
        return (left << np.uint64(self.half)) | right

    def __call__(self, x: np.ndarray) -> np.ndarray:
        y = self._encrypt(np.asarray(x, dtype=np.uint64))
        outside = np.flatnonzero(y >= np.uint64(self.n))
        while outside.size:
            y[outside] = self._encrypt(y[outside])
            outside = outside[y[outside] >= np.uint64(self.n)]
        return y.astype(np.int64)


SPLIT_RULES = ("dlrm_chunks", "random")
TRAIN, VAL, TEST = 0, 1, 2  # split codes, in storage.SPLITS order


class SplitAssigner:
    """Maps data-line indices (int64, concatenated sources) to split codes (0 train, 1 val, 2 test).

    Args:
        rule: ``"dlrm_chunks"`` or ``"random"`` (see the module docstring).
        total: data lines L in the concatenated sources (malformed included).
        file_lines: data lines per source file (for ``num_chunks=None``).
        num_chunks: equal chunks for ``dlrm_chunks``; None = one chunk per source file.
        seed: ``split_seed`` of the ``random`` rule.
    """

    def __init__(self, rule: str, total: int, file_lines: Sequence[int], num_chunks: Optional[int], seed: int):
        self.rule, self.total = rule, int(total)
        if rule == "dlrm_chunks":
            if num_chunks is None:
                sizes = list(file_lines)
            else:
                base, extra = divmod(self.total, int(num_chunks))
                sizes = [base + (k < extra) for k in range(int(num_chunks))]
            last_start = int(sum(sizes[:-1]))
            last = self.total - last_start
            self.test_start = last_start
            self.val_start = last_start + (last + 1) // 2  # np.array_split: the first half takes the extra line
        elif rule == "random":
            n_val = n_test = self.total // 10
            self.train_end, self.val_end = self.total - n_val - n_test, self.total - n_test
            self.permutation = FeistelPermutation(max(self.total, 1), seed)
        else:
            raise ValueError(f"unknown split rule {rule!r}; allowed: {', '.join(SPLIT_RULES)}")

    def __call__(self, index: np.ndarray) -> np.ndarray:
        index = np.asarray(index, dtype=np.int64)
        if self.rule == "dlrm_chunks":
            return np.where(index < self.test_start, TRAIN, np.where(index < self.val_start, TEST, VAL)).astype(np.int8)
        rank = self.permutation(index) if index.size else index
        return np.where(rank < self.train_end, TRAIN, np.where(rank < self.val_end, VAL, TEST)).astype(np.int8)


# ------------------------------------------------------------------------------------------------
# vocabularies
# ------------------------------------------------------------------------------------------------


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


# ------------------------------------------------------------------------------------------------
# streamed .npy output
# ------------------------------------------------------------------------------------------------


class NpyStreamWriter:
    """Writes a C-order ``.npy`` file by appending row blocks (no memory map).

    ``shape[0]`` may be None (rows unknown in advance): the header is rewritten with the rows
    written on ``close`` (numpy pads the header so that the first axis can grow in place, so the
    file is byte-identical to one written with the final shape from the start)."""

    def __init__(self, path: Path, dtype: Any, shape: Sequence[Optional[int]]):
        self.path, self.dtype = Path(path), np.dtype(dtype)
        self.shape = tuple(None if s is None else int(s) for s in shape)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._handle = open(self.path, "wb")
        self._header_bytes = self._write_header(self.shape[0] or 0)
        self.rows = 0

    def _write_header(self, rows: int) -> int:
        np.lib.format.write_array_header_1_0(
            self._handle, {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False,
                           "shape": (rows, *self.shape[1:])})
        return self._handle.tell()

    def append(self, block: np.ndarray) -> None:
        block = np.ascontiguousarray(block, dtype=self.dtype)
        if block.shape[1:] != self.shape[1:]:
            raise ValueError(f"{self.path}: block shape {block.shape} does not fit {self.shape}")
        self._handle.write(block.data)
        self.rows += block.shape[0]

    def abort(self) -> None:
        """Close without the row check (the caller discards the file)."""
        self._handle.close()

    def close(self) -> None:
        if self.shape[0] is None:
            self._handle.seek(0)
            if self._write_header(self.rows) != self._header_bytes:  # pragma: no cover - numpy pads for growth
                self._handle.close()
                raise RuntimeError(f"{self.path}: the .npy header of {self.rows} rows does not fit in place")
        self._handle.close()
        if self.shape[0] is not None and self.rows != self.shape[0]:
            raise RuntimeError(f"{self.path}: wrote {self.rows} rows, expected {self.shape[0]}")


# ------------------------------------------------------------------------------------------------
# the pipeline
# ------------------------------------------------------------------------------------------------

MALFORMED_POLICIES = ("skip", "fail")


@dataclass(frozen=True)
class PipelineConfig:
    """The preprocessing rules of a text protocol (see the module docstring).

    Attributes:
        fmt: the line format.
        split: ``"dlrm_chunks"`` or ``"random"``.
        split_seed: seed of the ``random`` split.
        num_chunks: chunks of ``dlrm_chunks`` (None: one per source file).
        min_count: train occurrences a key needs to get its own row (>= 1).
        hash_cap: None, or the number of key buckets per field (``key % hash_cap``).
        malformed: ``"skip"`` or ``"fail"``.
        chunk_rows: lines per processing chunk (memory knob; never changes the arrays).
        row_order: ``"key"`` (rows 1..V by ascending key, frequency-independent) or
            ``"frequency"`` (by descending train count).
    """

    fmt: LineFormat
    split: str = "dlrm_chunks"
    split_seed: int = 0
    num_chunks: Optional[int] = 7
    min_count: int = 1
    hash_cap: Optional[int] = None
    malformed: str = "skip"
    chunk_rows: int = 1_000_000
    row_order: str = "key"

    def __post_init__(self) -> None:
        if self.row_order not in ROW_ORDERS:
            raise ValueError(f"row_order must be one of {', '.join(ROW_ORDERS)}, got {self.row_order!r}")
        if self.split not in SPLIT_RULES:
            raise ValueError(f"split must be one of {', '.join(SPLIT_RULES)}, got {self.split!r}")
        if self.num_chunks is not None and int(self.num_chunks) < 2:
            raise ValueError(f"num_chunks must be >= 2 or null (one chunk per file), got {self.num_chunks!r}")
        if int(self.min_count) < 1:
            raise ValueError(f"min_count must be >= 1, got {self.min_count!r}")
        if self.hash_cap is not None and int(self.hash_cap) < 1:
            raise ValueError(f"hash_cap must be null or >= 1, got {self.hash_cap!r}")
        if self.malformed not in MALFORMED_POLICIES:
            raise ValueError(f"malformed must be one of {', '.join(MALFORMED_POLICIES)}, got {self.malformed!r}")
        if int(self.chunk_rows) < 1:
            raise ValueError(f"chunk_rows must be >= 1, got {self.chunk_rows!r}")

    def split_rule(self) -> Dict[str, Any]:
        if self.split == "random":
            return {"rule": "random", "fractions": [0.8, 0.1, 0.1], "split_seed": int(self.split_seed),
                    "assignment": "rank under a 4-round Feistel/splitmix64 permutation of the data lines"}
        return {"rule": "dlrm_chunks", "chunks": "one per source file" if self.num_chunks is None else int(self.num_chunks),
                "assignment": "all chunks but the last train; last chunk: first half test, second half validation"}

    def rules(self) -> Dict[str, Any]:
        """Every setting that changes the arrays (``chunk_rows`` does not)."""
        return {
            "pipeline_version": PIPELINE_VERSION,
            "line_format": self.fmt.rules(),
            "split": self.split_rule(),
            "min_count": int(self.min_count),
            "hash_cap": None if self.hash_cap is None else int(self.hash_cap),
            "oov": "row 0: missing, unseen in train, or fewer than min_count train occurrences",
            "row_order": ROW_ORDERS[self.row_order],
            "malformed": self.malformed,
        }


@dataclass(frozen=True)
class RowExtra:
    """A float sidecar array (``.npy``, shape (L,)) aligned with the data lines of the sources."""

    name: str
    path: Path

    def describe(self) -> Dict[str, Any]:
        return {"file": self.path.name, "sha256": describe_source(self.path).sha256}

    def read(self, start: int, stop: int) -> np.ndarray:
        values = np.load(self.path, mmap_mode="r")  # re-opened per chunk: resident pages stay bounded
        try:
            return np.array(values[start:stop], dtype=np.float32)
        finally:
            del values


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


class _CodeSpool:
    """Raw (N, F) uint32 category codes of one split, written in file order and read back in blocks."""

    def __init__(self, path: Path, width: int):
        self.path, self.width, self.rows = path, width, 0
        self._handle = open(path, "wb")

    def append(self, block: np.ndarray) -> None:
        self._handle.write(np.ascontiguousarray(block, dtype=np.uint32).data)
        self.rows += block.shape[0]

    def blocks(self, rows: int) -> Iterator[np.ndarray]:
        self._handle.close()
        with open(self.path, "rb") as handle:
            while True:
                block = np.fromfile(handle, dtype=np.uint32, count=rows * self.width)
                if block.size == 0:
                    break
                yield block.reshape(-1, self.width)

    def close(self) -> None:
        self._handle.close()
        self.path.unlink(missing_ok=True)


@dataclass
class _StreamResult:
    sizes: np.ndarray
    positives: np.ndarray
    malformed_count: int
    malformed_examples: List[str]


class TextPipeline:
    """Runs ``PipelineConfig`` over ``sources`` and writes the protocol through a ``CacheWriter``.

    One read of the sources: every chunk is validated and parsed once (categorical columns as
    polars ``Categorical``); labels, dense features and row extras go straight to their split's
    ``.npy`` files, the categorical codes to a per-split spool, and train occurrences are counted
    per code. The vocabularies then give a code -> row table per field, and a second, cheap pass
    over the spools (4 bytes per field and row, no text) writes ``sparse.npy``.
    """

    def __init__(self, config: PipelineConfig, sources: Sequence[SourceFile],
                 row_extras: Sequence[RowExtra] = (), description: str = "preprocessing"):
        self.config, self.sources, self.row_extras = config, list(sources), list(row_extras)
        self.description = description
        header = 1 if config.fmt.header else 0
        for source in self.sources:
            if source.lines < header:
                raise DatasetError(f"{source.path}: empty file; allowed: a header line {config.fmt.header_line()!r}")
        self.file_lines = [s.lines - header for s in self.sources]
        self.total = int(sum(self.file_lines))
        if self.total == 0:
            raise DatasetError(f"{', '.join(str(s.path) for s in self.sources)}: no data lines")
        self.assigner = SplitAssigner(config.split, self.total, self.file_lines, config.num_chunks, config.split_seed)
        for extra in self.row_extras:
            shape = np.load(extra.path, mmap_mode="r").shape
            if shape != (self.total,):
                raise DatasetError(f"row extra {extra.name!r} ({extra.path}) has shape {shape}; allowed: "
                                   f"({self.total},), one value per data line of the sources")

    # -- streaming ---------------------------------------------------------------------------

    def _chunks(self, desc: str) -> Iterator[LineChunk]:
        header = self.config.fmt.header_line() if self.config.fmt.header else None
        index = 0
        with tqdm(total=self.total, desc=desc, unit="line", unit_scale=True, disable=None) as bar:
            for source, lines in zip(self.sources, self.file_lines):
                for chunk in iter_line_chunks(source, int(self.config.chunk_rows), index, header):
                    yield chunk
                    bar.update(len(chunk))
                index += lines

    # -- the read: validation, split sizes, labels/dense/extras, codes, train counts -----------

    def stream(self, writer: CacheWriter, categories: CategoryCodes) -> Tuple[_StreamResult, List[_CodeSpool]]:
        fmt = self.config.fmt
        sources = categories.sources
        sizes, positives = np.zeros(3, dtype=np.int64), np.zeros(3, dtype=np.int64)
        malformed_count, examples = 0, []
        outputs: List[Dict[str, NpyStreamWriter]] = []
        spools: List[_CodeSpool] = []
        for split in SPLITS:
            streams = {"dense": NpyStreamWriter(writer.path(f"{split}/dense.npy"), np.float32, (None, len(fmt.dense))),
                       "labels": NpyStreamWriter(writer.path(f"{split}/labels.npy"), np.float32, (None,))}
            for extra in self.row_extras:
                streams[f"targets/{extra.name}"] = NpyStreamWriter(
                    writer.path(f"{split}/targets/{extra.name}.npy"), np.float32, (None,))
            outputs.append(streams)
            spools.append(_CodeSpool(writer.path(f"{split}/.sparse-codes"), len(sources)))
        try:
            for chunk in self._chunks(f"{self.description} 1/2 (lines)"):
                parsed = parse_chunk(chunk, fmt)
                chunk.data = b""  # the text is parsed: free it before the arrays are built
                if parsed.malformed_count:
                    if self.config.malformed == "fail":
                        raise DatasetError(f"{parsed.malformed[0].message()} (malformed=fail; set malformed=skip "
                                           "to skip malformed lines, which are then counted in the manifest)")
                    malformed_count += parsed.malformed_count
                    examples.extend(m.message() for m in parsed.malformed[: MAX_EXAMPLES - len(examples)])
                frame = parsed.frame
                if frame.height == 0:
                    continue
                codes = categories.codes(frame)
                categories.learn(frame, codes)
                split = self.assigner(chunk.first_index + parsed.rows)
                labels = fmt.labels(frame)
                sizes += np.bincount(split, minlength=3)
                positives += np.bincount(split, weights=labels, minlength=3).astype(np.int64)
                categories.count(codes, split == TRAIN)
                columns = {"labels": labels, "dense": fmt.dense_values(frame)}
                for extra in self.row_extras:
                    values = extra.read(chunk.first_index, chunk.first_index + len(chunk))
                    columns[f"targets/{extra.name}"] = values[parsed.rows]
                sparse = np.empty((frame.height, len(sources)), dtype=np.uint32)
                for f, (_, column) in enumerate(sources):
                    sparse[:, f] = codes[column]
                del frame, codes, parsed
                for code, streams in enumerate(outputs):
                    rows = np.flatnonzero(split == code)
                    if rows.size == split.size:
                        rows = slice(None)
                    elif not rows.size:
                        continue
                    for key, stream in streams.items():
                        stream.append(columns[key][rows])
                    spools[code].append(sparse[rows])
        except BaseException:
            for streams in outputs:
                for stream in streams.values():
                    stream.abort()
            for spool in spools:
                spool.close()
            raise
        for streams in outputs:
            for stream in streams.values():
                stream.close()
        if malformed_count:
            log.warning("%s: %d malformed lines skipped; first ones:\n  %s", self.description, malformed_count,
                        "\n  ".join(examples))
        return _StreamResult(sizes, positives, malformed_count, examples), spools

    # -- codes -> rows -------------------------------------------------------------------------

    def write_sparse(self, writer: CacheWriter, spools: Sequence[_CodeSpool], tables: Sequence[np.ndarray]) -> None:
        """``<split>/sparse.npy`` (N, F) int32 rows from the spooled codes and each field's code -> row table."""
        flat = np.concatenate([np.zeros(0, dtype=np.int32), *tables])
        if flat.size >= 2**32:  # pragma: no cover - 4 billion distinct values
            raise DatasetError(f"{flat.size} distinct categorical values in all; allowed: fewer than 2**32")
        offsets = np.cumsum([0] + [t.size for t in tables[:-1]]).astype(np.uint32)
        try:
            for split, spool in zip(SPLITS, spools):
                out = NpyStreamWriter(writer.path(f"{split}/sparse.npy"), np.int32, (spool.rows, len(tables)))
                try:
                    for codes in tqdm(spool.blocks(int(self.config.chunk_rows)), desc=f"{self.description} 2/2 (ids)",
                                      total=-(-spool.rows // int(self.config.chunk_rows)), disable=None):
                        codes += offsets  # one gather through the concatenated tables (uint32 indices: fast path)
                        out.append(flat[codes])
                except BaseException:
                    out.abort()
                    raise
                out.close()
                spool.close()
        finally:
            for spool in spools:
                spool.close()

    # -- everything ----------------------------------------------------------------------------

    def build(self, writer: CacheWriter, name: str, protocol_id: str,
              extras: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
        """Every array plus counts; returns the manifest dict (without ``files``)."""
        categories = CategoryCodes(self.config.fmt, self.config.hash_cap)
        try:
            scan, spools = self.stream(writer, categories)
            tables, code_tables = [], []
            for field_name, _ in categories.sources:
                vocab, code_table = categories.vocabulary(field_name, int(self.config.min_count), self.config.row_order)
                writer.save(f"counts/{field_name}.npy", vocab.counts)
                tables.append(TableSpec(field_name, vocab.num_embeddings, vocab.counts))
                code_tables.append(code_table)
        finally:
            categories.close()
        self.write_sparse(writer, spools, code_tables)
        split_sizes = {s: int(scan.sizes[k]) for k, s in enumerate(SPLITS)}
        facts: Dict[str, Any] = {
            "sources": [{"path": str(s.path), **s.describe()} for s in self.sources],
            "data_lines": self.total,
            "malformed_lines": scan.malformed_count,
            "malformed_examples": scan.malformed_examples,
            "positive_rate": {
                **{s: (float(scan.positives[k] / scan.sizes[k]) if scan.sizes[k] else None) for k, s in enumerate(SPLITS)},
                "all": float(scan.positives.sum() / max(scan.sizes.sum(), 1))},
            "split_rule": self.config.split_rule(),
        }
        facts.update(extras or {})
        spec = DatasetSpec(name=name, protocol_id=protocol_id, num_dense=len(self.config.fmt.dense),
                           tables=tuple(tables), split_sizes=split_sizes,
                           extra_targets=tuple(e.name for e in self.row_extras), extras=facts)
        log.info("%s: %s rows (train/val/test), %d malformed lines, tables %s", name,
                 "/".join(str(v) for v in split_sizes.values()), scan.malformed_count,
                 {t.name: t.num_embeddings for t in tables})
        return spec_to_manifest(spec)
