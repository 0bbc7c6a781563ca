"""Chunked reading and vectorised validation of delimited lines (no per-line Python).

A line is split on the format's separator; no quoting (a quote character is data). A trailing
``\\r`` is ignored. A malformed line is one that is not valid UTF-8 (RFC 3629), is empty, has the
wrong number of fields, or fails a field check of its format (``LineFormat.checks``). Every
malformed line is counted; the first ``MAX_EXAMPLES`` of a chunk are described with file, line,
field and what is allowed (``Malformed``).

Shapes: a chunk of n lines has ``ends`` (n,) int64; a parsed chunk keeps N <= n valid rows.

References: RFC 3629 (UTF-8); polars ``read_csv``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Mapping, Optional, Tuple

import numpy as np
import polars as pl

from recbench.datasets.errors import DatasetError
from recbench.datasets.text import sources
from recbench.datasets.text.formats import LineFormat
from recbench.datasets.text.sources import CHECKSUM_CACHE, SourceFile, open_binary

MAX_EXAMPLES = 20  # malformed lines listed in the manifest and the log
_NEWLINE, _CR = 10, 13


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
                block = handle.read(sources.READ_BYTES)
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
        frame: polars frame of the valid rows: dense columns ``fmt.dense_dtype`` (Int64 unless the
            format says otherwise; null = missing), the others
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
        if fmt.dense and fmt.dense_dtype == pl.Int64 and b" " not in text and only_trailing_cr:
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
        frame = frame.with_columns([pl.col(c).cast(fmt.dense_dtype) for c in fmt.dense])  # all valid by now
    found.sort(key=lambda item: item[0])
    return ParsedChunk(good.astype(np.int64), frame, [m for _, m in found[:MAX_EXAMPLES]], count)
