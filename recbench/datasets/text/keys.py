"""Stable 64-bit keys of categorical values, and the keyed permutation of line indices.

Categorical keys: a value of 1 to 15 lowercase hex digits (Criteo's 8-digit hashes, Avazu's ids
and numbers) is keyed by its hex value plus an offset per length
(``int(v, 16) + (16**len(v) - 16) / 15``), which is injective and below 2**60; any other value is
keyed by FNV-1a-64 of its UTF-8 bytes with the top bit set. An empty value is missing
(``MISSING_KEY``). With ``hash_cap`` the key becomes ``key % hash_cap`` before the vocabulary is
built (DLRM's ``--max-ind-range``).

``FeistelPermutation``: a keyed pseudo-random bijection of ``[0, n)`` (a 4-round Feistel network
on splitmix64, cycle-walked) evaluated pointwise in O(1) memory; the ``random`` split ranks the
data lines with it.

References:
    G. Fowler, L. C. Noll, K.-P. Vo. FNV hash (FNV-1a, 64-bit).
    M. Naumov et al. 2019. Deep Learning Recommendation Model for Personalization and
    Recommendation Systems. arXiv:1906.00091 (``--max-ind-range``).
    M. Luby and C. Rackoff. 1988. How to Construct Pseudorandom Permutations from
    Pseudorandom Functions. SIAM J. Comput. 17(2) (the Feistel permutation).
"""
from __future__ import annotations

from typing import Iterator, List, Optional, Sequence

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

MISSING_KEY = np.uint64(2**63 - 1)  # hex keys are < 2**60, FNV keys >= 2**63
_HEX_PATTERN = r"^[0-9a-f]{1,15}$"
_FNV_OFFSET = np.uint64(0xCBF29CE484222325)
_FNV_PRIME = np.uint64(0x100000001B3)
_TOP_BIT = np.uint64(1 << 63)
# number of hex strings shorter than ``length`` (lengths 1..15): makes the hex key injective
_HEX_LENGTH_OFFSET = np.array([0] + [(16**n - 16) // 15 for n in range(1, 17)], dtype=np.uint64)


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
