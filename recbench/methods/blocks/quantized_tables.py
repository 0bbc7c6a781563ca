"""The bytes and the budget solver of row-wise quantized tables (FBGEMM's n-bit table-batched
kernel): the deployable form of ``ptq`` and of any table-backed method composed with
``method.quantize``; the kernel's module is ``blocks.tables.QuantizedCollection``. A leaf module:
``methods.base`` (the composed solve) and ``blocks.tables`` import it.

Each physical table stores its rows at one precision: fp32, fp16, or INT8/INT4/INT2 with FBGEMM's
row-wise asymmetric quantizer (``FloatToFusedNBitRowwiseQuantizedSBHalf``: a per-row fp16 scale
(max - min) / (2^b - 1) and fp16 bias = min stored with the row). Bytes per row: 4D, 2D, D + 4,
D/2 + 4, D/4 + 4; each table padded to a multiple of 128 bytes (FBGEMM's cache-line alignment).

References: Guan et al., "Post-Training 4-bit Quantization on Embedding Tables" (arXiv:1911.02079);
FBGEMM ``IntNBitTableBatchedEmbeddingBagsCodegen``; TorchRec ``quantize_embeddings`` (the same swap
of fp32 collections for n-bit ones at deployment).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Mapping, Sequence

import torch

from recbench.types import (FP32_BYTES, Budget, EmbeddingOptimizer, InfeasibleBudget, MemoryReport, TableSpec,
                            full_embedding_bytes)

LEVELS = (32, 16, 8, 4, 2)
SCALE_BIAS_BYTES = 4  # fp16 scale + fp16 bias per quantized row
TABLE_ALIGNMENT = 128  # FBGEMM pads each table's storage to a 128-byte cache line
#: ``method.quantize`` values (a table method's deployable tables stored row-wise quantized) -> bits
QUANTIZE_BITS = {"none": 32, "fp16": 16, "int8": 8, "int4": 4, "int2": 2}
QUANTIZE_OPTIONS = tuple(QUANTIZE_BITS)


def row_bytes(dim: int, bits: int) -> int:
    """Bytes of one stored row (FBGEMM's unpadded_row_size_in_bytes; CPU row alignment is 1)."""
    return {32: 4 * dim, 16: 2 * dim, 8: dim + SCALE_BIAS_BYTES, 4: dim // 2 + SCALE_BIAS_BYTES,
            2: dim // 4 + SCALE_BIAS_BYTES}[int(bits)]


def table_bytes(rows: int, dim: int, bits: int) -> int:
    raw = rows * row_bytes(dim, bits)
    return -(-raw // TABLE_ALIGNMENT) * TABLE_ALIGNMENT


def check_quantizable_dim(dim: int, bits: int, where: str) -> None:
    """INT-b rows pack 8/b values per byte: D must be a multiple of 8/b (and of 4 for FBGEMM)."""
    step = max(4, 8 // int(bits)) if bits < 16 else 4
    if dim % step:
        raise ValueError(f"{where}: a {bits}-bit table needs a dim that is a multiple of {step}, got {dim}")


def sparse_type(bits: int):
    from fbgemm_gpu.split_embedding_configs import SparseType

    return {32: SparseType.FP32, 16: SparseType.FP16, 8: SparseType.INT8, 4: SparseType.INT4,
            2: SparseType.INT2}[int(bits)]


def quantize_rows(weight: torch.Tensor, bits: int) -> List[torch.Tensor]:
    """fp32 rows -> [data] (fp32/fp16 as bytes) or [data, fp16 scale+bias] as uint8, FBGEMM layout."""
    if bits == 32:
        return [weight.contiguous().view(torch.uint8)]
    if bits == 16:
        return [weight.to(torch.float16).contiguous().view(torch.uint8)]
    fused = torch.ops.fbgemm.FloatToFusedNBitRowwiseQuantizedSBHalf(weight.contiguous(), int(bits))
    return [fused[:, :-SCALE_BIAS_BYTES], fused[:, -SCALE_BIAS_BYTES:]]


def row_error_bound(weight: torch.Tensor, bits: int) -> float:
    """Stated bound on |dequantized - fp32| per element of one id, max over the table's rows.

    INT-b: half a step (max - min) / (2^b - 1) plus fp16 rounding of scale and bias
    (2^-10 (range + |min|)); FP16: round-to-nearest, 2^-11 |w|; FP32: exact.
    """
    if bits == 32 or weight.numel() == 0:
        return 0.0
    if bits == 16:
        return float(weight.abs().max()) * 2.0 ** -11
    lo, hi = weight.min(1).values, weight.max(1).values
    step = (hi - lo) / (2 ** bits - 1)
    return float((0.5 * step + 2.0 ** -10 * ((hi - lo) + lo.abs())).max())


def quantized_bytes(physical: Sequence[Any], bits: int) -> int:
    """Closed-form bytes of the physical tables (``rows``, ``dim``) stored at ``bits`` (what
    ``tables.QuantizedCollection`` holds)."""
    return sum(table_bytes(t.rows, t.dim, bits) for t in physical)


def fp32_bytes(physical: Sequence[Any]) -> int:
    return sum(t.rows * t.dim * FP32_BYTES for t in physical)


def quantized_memory(method, tables: Sequence[TableSpec], dim: int, hparams: Mapping[str, Any],
                     quantize: str, optimizer: EmbeddingOptimizer = EmbeddingOptimizer()) -> MemoryReport:
    """``method``'s closed-form memory with its physical tables stored as ``quantize``: the fp32 rows
    leave the inference bytes and the quantized rows (``quantized_bytes``) enter; training is
    unchanged (the tables train in fp32)."""
    report = method.memory(tables, dim, hparams, optimizer)
    return with_quantized_tables(report, method.physical_tables(tables, dim, hparams), quantize)


def with_quantized_tables(report: MemoryReport, physical: Sequence[Any], quantize: str) -> MemoryReport:
    """``report`` (fp32 tables ``physical`` among its inference bytes) with the tables stored as ``quantize``."""
    stored, before = quantized_bytes(physical, QUANTIZE_BITS[quantize]), fp32_bytes(physical)
    breakdown = {k: v for k, v in report.breakdown.items() if k != "weights"}
    return dataclasses.replace(report, inference_bytes=report.inference_bytes - before + stored,
                               breakdown={f"weights ({quantize})": stored, **breakdown})


def solve_composed(method, tables: Sequence[TableSpec], dim: int, budget: Budget, quantize: str,
                   optimizer: EmbeddingOptimizer = EmbeddingOptimizer()) -> Dict[str, Any]:
    """Solve ``method`` composed with quantized tables: the largest budget r' handed to the method's
    own solver whose quantized memory fits ``budget``; returns its hparams plus ``quantize``.

    The fitting r' form an interval: the method is feasible from its smallest ratio up, and the
    quantized bytes grow with r'. r' is searched between the requested ratio (or the method's
    smallest, when the request is below it) and the ratio at which quantized tables would be as
    large as fp32 ones at the request (4D / row_bytes x the request), by bisection (60 halvings).
    """
    bits = QUANTIZE_BITS[quantize]
    full, target = full_embedding_bytes(tables, dim), budget.compression_ratio * full_embedding_bytes(tables, dim)

    def attempt(ratio: float):
        try:
            hparams = method.solve_hparams(tables, dim, dataclasses.replace(budget, compression_ratio=ratio))
        except InfeasibleBudget as error:
            return None, error
        for t in method.physical_tables(tables, dim, hparams):
            check_quantizable_dim(t.dim, bits, f"{method.name} method.quantize={quantize}, table {t.name!r}")
        return hparams, quantized_memory(method, tables, dim, hparams, quantize, optimizer).inference_bytes

    low = budget.compression_ratio
    hparams, outcome = attempt(low)
    if hparams is None:  # below the method's own range: start at its smallest ratio
        low = min(outcome.min_ratio * (1 + 1e-9), 1.0)
        hparams, outcome = attempt(low)
        if hparams is None:
            raise outcome
    if outcome > target:
        largest, largest_bytes = attempt(1.0)
        raise InfeasibleBudget(method.name, budget.compression_ratio, outcome / full,
                               largest_bytes / full if largest is not None else outcome / full,
                               f"with method.quantize={quantize} the smallest solution has ratio {outcome / full:.4g}")
    best = hparams
    high = min(low * 4 * dim / row_bytes(dim, bits), 1.0)  # (a budget is at most the full tables)
    top, top_bytes = attempt(high)
    if top is not None and top_bytes <= target:
        best = top
    else:
        for _ in range(60):
            mid = (low + high) / 2
            trial, trial_bytes = attempt(mid)
            if trial is not None and trial_bytes <= target:
                low, best = mid, trial
            else:
                high = mid
            if high - low <= 1e-6 * high:
                break
    return {**best, "quantize": quantize}
