"""The streaming text pipeline: delimited click logs (Criteo, Avazu, synthetic) into protocol arrays.

It reads the source files in chunks of ``chunk_rows`` lines, so peak memory depends on the chunk
size and on the number of distinct categorical values (the vocabularies, which are inherent),
never on the file size.

Pipeline (one streaming read of the sources, then one pass over compact codes)::

    sources --(chunk of lines)--> validate (numpy + polars, vectorised) --> split assignment
        read: labels, dense transform, row extras       --> <split>/{dense,labels}.npy,
                                                            <split>/targets/<row extra>.npy
              categorical values -> polars Categorical codes (stable across chunks), spooled
              per split; TRAIN occurrences counted per code; each distinct value keyed once
        then: keys + train counts -> vocabularies       --> counts/<field>.npy
              spooled codes -> rows (one gather)        --> <split>/sparse.npy

Rules (every one is part of the protocol id through ``PipelineConfig.rules()``), each in the
module that applies it: lines and malformed lines (``parsing``), labels and the dense transform
(``formats``), categorical keys and ``hash_cap`` (``keys``), vocabularies, OOV and row order
(``vocabulary``), splits (``splits``), sources and row extras (``sources``). Malformed lines are
counted and reported with their 1-based line numbers: ``malformed=skip`` drops them (count and the
first 20 in the manifest extras and the log), ``malformed=fail`` raises ``DatasetError`` naming
file, line, field and what is allowed. Nothing is dropped silently.

Shapes: per split of N rows, ``dense.npy`` (N, num_dense) float32, ``labels.npy`` (N,) float32,
``sparse.npy`` (N, F) int32; ``counts/<field>.npy`` (V + 1,) int64.

References:
    M. Naumov et al. 2019. Deep Learning Recommendation Model for Personalization and
    Recommendation Systems. arXiv:1906.00091 (the log transform, the 7-chunk split of Criteo
    Kaggle, ``--max-ind-range``); facebookresearch/dlrm ``dlrm_data_pytorch.py`` and
    ``data_utils.py``.
    X. Miao et al. 2022. HET: Scaling out Huge Embedding Model Training via Cache-enabled
    Distributed Framework. VLDB (Hetu's Criteo/Avazu preprocessing, same split and clamp).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from tqdm.auto import tqdm

from recbench.datasets.errors import DatasetError
from recbench.datasets.storage import SPLITS, CacheWriter, spec_to_manifest
from recbench.datasets.text.formats import LineFormat
from recbench.datasets.text.parsing import MAX_EXAMPLES, LineChunk, iter_line_chunks, parse_chunk
from recbench.datasets.text.sources import RowExtra, SourceFile
from recbench.datasets.text.splits import SPLIT_RULES, TRAIN, SplitAssigner
from recbench.datasets.text.vocabulary import ROW_ORDERS, CategoryCodes
from recbench.datasets.text.writer import CodeSpool, NpyStreamWriter
from recbench.types import DatasetSpec, TableSpec

log = logging.getLogger(__name__)

# Bump whenever a rule of this package changes the arrays without changing a setting.
PIPELINE_VERSION = 1

MALFORMED_POLICIES = ("skip", "fail")


@dataclass(frozen=True)
class PipelineConfig:
    """The preprocessing rules of a text protocol (see the module docstring).

    Attributes:
        fmt: the line format.
        split: ``"dlrm_chunks"``, ``"random"`` or ``"given"`` (three files: train, validation, test).
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
        if self.split == "given":
            return {"rule": "given", "files": ["train", "validation", "test"],
                    "assignment": "one source file per split, in that order; rows keep file order"}
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
        if config.split == "given" and len(self.sources) != 3:
            raise DatasetError(f"split 'given' reads one file per split; allowed: exactly 3 source files in the order "
                               f"train, validation, test, got {[str(s.path) for s in self.sources]}")
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

    def stream(self, writer: CacheWriter, categories: CategoryCodes) -> Tuple[_StreamResult, List[CodeSpool]]:
        fmt = self.config.fmt
        sources = categories.sources
        sizes, positives = np.zeros(3, dtype=np.int64), np.zeros(3, dtype=np.int64)
        malformed_count, examples = 0, []
        outputs: List[Dict[str, NpyStreamWriter]] = []
        spools: List[CodeSpool] = []
        for split in SPLITS:
            streams = {"dense": NpyStreamWriter(writer.path(f"{split}/dense.npy"), np.float32, (None, len(fmt.dense))),
                       "labels": NpyStreamWriter(writer.path(f"{split}/labels.npy"), np.float32, (None,))}
            for extra in self.row_extras:
                streams[f"targets/{extra.name}"] = NpyStreamWriter(
                    writer.path(f"{split}/targets/{extra.name}.npy"), np.float32, (None,))
            outputs.append(streams)
            spools.append(CodeSpool(writer.path(f"{split}/.sparse-codes"), len(sources)))
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

    def write_sparse(self, writer: CacheWriter, spools: Sequence[CodeSpool], tables: Sequence[np.ndarray]) -> None:
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
