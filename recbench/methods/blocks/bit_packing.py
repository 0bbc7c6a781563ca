"""Dense bit packing of small unsigned integers (quantized rows, product-quantization codes).

A sequence of N values of ``bits`` bits each (1 <= bits <= 16) is stored as one little-endian
bit stream of ceil(N * bits / 8) bytes (``torch.uint8``): value i occupies bits
[i * bits, (i + 1) * bits) of the stream — no per-value or per-row padding, so the bytes held are
exactly the information bits rounded up once. Reads are vectorised random access: a value spans
at most 3 bytes (shift <= 7, bits <= 16), so it is assembled from a 3-byte window (widths 1, 2,
4, 8 and 16 take a direct path).

Quantized embedding rows of D values at b bits are row-aligned when D * b is a multiple of 8;
``write_rows`` then replaces whole rows in place (what low-precision training does every step).

Shapes: values (N,) int64 in [0, 2^bits) -> stream (ceil(N * bits / 8),) uint8;
positions (...,) int64 -> values (...,) int64.

References: docs/architecture.md section 3 ("Budget and memory": codes and quantized rows at their stored width).
"""
from __future__ import annotations

import math

import torch

MAX_BITS = 16
_CHUNK = 1 << 22  # values packed per chunk (bounds the temporary bit matrix)


def check_bits(bits: int, where: str = "bit packing") -> int:
    bits = int(bits)
    if not 1 <= bits <= MAX_BITS:
        raise ValueError(f"{where}: bits must be in [1, {MAX_BITS}], got {bits}")
    return bits


def bits_for(count: int) -> int:
    """Smallest code width (bits) that distinguishes ``count`` >= 1 values (1 for count <= 2)."""
    return max(1, math.ceil(math.log2(max(int(count), 2))))


def packed_bytes(count: int, bits: int) -> int:
    """Bytes of a stream of ``count`` values at ``bits`` bits."""
    return -(-int(count) * int(bits) // 8)


def pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """(N,) int values in [0, 2^bits) -> (ceil(N * bits / 8),) uint8 little-endian stream."""
    bits = check_bits(bits)
    values = values.reshape(-1).to(torch.int64)
    if values.numel() and (int(values.min()) < 0 or int(values.max()) >= 1 << bits):
        raise ValueError(f"pack_bits: values must lie in [0, {1 << bits}), got [{int(values.min())}, {int(values.max())}]")
    if bits == 8:
        return values.to(torch.uint8)
    if bits == 16:
        return torch.where(values >= 1 << 15, values - (1 << 16), values).to(torch.int16).view(torch.uint8)
    if 8 % bits == 0:  # several whole values per byte
        per_byte = 8 // bits
        pad = (-values.numel()) % per_byte
        grouped = torch.cat([values, values.new_zeros(pad)]).view(-1, per_byte)
        return (grouped << (bits * torch.arange(per_byte))).sum(1).to(torch.uint8)
    out = torch.zeros(packed_bytes(values.numel(), bits), dtype=torch.uint8)
    shifts = torch.arange(bits, dtype=torch.int64)
    weights = (1 << torch.arange(8, dtype=torch.int64))
    step = _CHUNK - _CHUNK % 8  # chunks start on a byte boundary: (start * bits) % 8 == 0
    for start in range(0, values.numel(), step):
        chunk = values[start:start + step]
        stream = ((chunk.unsqueeze(1) >> shifts) & 1).reshape(-1)  # (n * bits,) bits, LSB first
        pad = (-stream.numel()) % 8
        if pad:
            stream = torch.cat([stream, stream.new_zeros(pad)])
        byte_values = (stream.view(-1, 8) * weights).sum(1).to(torch.uint8)
        first = start * bits // 8
        out[first:first + byte_values.numel()] = byte_values
    return out


def read_bits(stream: torch.Tensor, bits: int, positions: torch.Tensor) -> torch.Tensor:
    """Values at ``positions`` (any shape, int64) of a stream packed by ``pack_bits``."""
    bits = check_bits(bits)
    if bits == 8:
        return stream[positions].to(torch.int64)
    if bits == 16:
        return stream.view(torch.int16)[positions].to(torch.int64) & 0xFFFF
    if 8 % bits == 0:  # a value never crosses a byte
        offset = positions.to(torch.int64) * bits
        return (stream[offset >> 3].to(torch.int64) >> (offset & 7)) & ((1 << bits) - 1)
    offset = positions.to(torch.int64) * bits
    byte, shift = offset >> 3, offset & 7
    last = stream.numel() - 1
    window = stream[byte].to(torch.int64)
    for k in (1, 2):  # bytes beyond the end of the stream read as zero
        nxt = byte + k
        extra = stream[nxt.clamp(max=last)].to(torch.int64) * (nxt <= last)
        window = window | (extra << (8 * k))
    return (window >> shift) & ((1 << bits) - 1)


def row_bytes(dim: int, bits: int) -> int:
    """Bytes of one row of ``dim`` values when rows are byte-aligned (dim * bits % 8 == 0)."""
    if (int(dim) * int(bits)) % 8:
        raise ValueError(f"rows of {dim} values at {bits} bits are not byte-aligned (need dim * bits % 8 == 0)")
    return int(dim) * int(bits) // 8


def read_rows(stream: torch.Tensor, bits: int, dim: int, rows: torch.Tensor) -> torch.Tensor:
    """(U,) row indices -> (U, dim) int64 values of byte-aligned rows of ``dim`` values."""
    positions = rows.to(torch.int64).unsqueeze(1) * dim + torch.arange(dim, dtype=torch.int64, device=rows.device)
    return read_bits(stream, bits, positions)


def write_rows(stream: torch.Tensor, bits: int, dim: int, rows: torch.Tensor, values: torch.Tensor) -> None:
    """In place: rows ``rows`` (U,) of a byte-aligned stream get ``values`` (U, dim) in [0, 2^bits)."""
    width = row_bytes(dim, bits)
    packed = pack_bits(values.reshape(-1), bits).view(-1, width)
    stream.view(-1, width).index_copy_(0, rows.to(torch.int64), packed)
