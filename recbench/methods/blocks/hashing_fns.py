"""The hash functions of every hashing-based method (hashing, unified, robe, dhe).

References: Carter & Wegman, "Universal Classes of Hash Functions", JCSS 18(2), 1979;
Weinberger et al., "Feature Hashing for Large Scale Multitask Learning", ICML 2009.

Family: ``h_{a,b}(x) = ((a * (x mod p) + b) mod p) mod m`` with the Mersenne prime
``p = 2^31 - 1``, ``a`` uniform in [1, p - 1] and ``b`` uniform in [0, p - 1]. For ids below p
and ``m <= p`` this is the Carter-Wegman universal family: two distinct ids collide with
probability at most about 1/m over the draw of (a, b). It runs in plain int64 without overflow:
``a * x < 2^62`` and ``+ b`` stays below 2^63, so no 128-bit arithmetic is needed. Ids are
reduced mod p first; recbench vocabularies are dense ids below ``num_embeddings``, and
``check_hashable`` rejects a table with p or more rows at build time, so the reduction never merges
two real ids.

Parameters are drawn from a ``torch.Generator`` seeded with an integer (``draw``), so a hash
function is a pure function of (seed, parameter position): modules keep them as non-persistent
buffers, regenerate them from the seed on construction, and the deployable form stores only
the seed (0 bytes; DHE's paper calls its encoder "free of storage").

``modulo`` (``x mod m``) is offered for the hashing trick as the classic baseline; it is not a
random family (no salt), so methods that need several independent functions use ``universal``.

Shapes: every function is vectorised and broadcasts ids against parameters, e.g. ids (N, 1)
against parameters (N, k) -> (N, k) hashes.
"""
from __future__ import annotations

from typing import Sequence, Tuple, Union

import torch

#: The Mersenne prime 2^31 - 1 of the universal family.
PRIME = (1 << 31) - 1
HASH_FUNCTIONS = ("universal", "modulo")

Buckets = Union[int, torch.Tensor]


def draw(seed: int, shape: Sequence[int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """(a, b) int64 tensors of ``shape``: a in [1, p - 1], b in [0, p - 1], deterministic in ``seed``."""
    generator = torch.Generator().manual_seed(int(seed))
    a = torch.randint(1, PRIME, tuple(shape), generator=generator, dtype=torch.int64)
    b = torch.randint(0, PRIME, tuple(shape), generator=generator, dtype=torch.int64)
    return a, b


def universal(ids: torch.Tensor, a: torch.Tensor, b: torch.Tensor, buckets: Buckets) -> torch.Tensor:
    """((a * (ids mod p) + b) mod p) mod buckets, int64, broadcast over ids, a, b and buckets."""
    x = torch.remainder(ids.long(), PRIME)
    return torch.remainder(torch.remainder(a * x + b, PRIME), buckets)


def modulo(ids: torch.Tensor, buckets: Buckets) -> torch.Tensor:
    """ids mod buckets (the unsalted baseline)."""
    return torch.remainder(ids.long(), buckets)


def hash_ids(kind: str, ids: torch.Tensor, a: torch.Tensor, b: torch.Tensor, buckets: Buckets) -> torch.Tensor:
    """Dispatch on ``kind`` ("universal" or "modulo"; modulo ignores a and b)."""
    if kind == "universal":
        return universal(ids, a, b, buckets)
    if kind == "modulo":
        return modulo(ids, buckets)
    raise ValueError(f"hash_function={kind!r} is not supported; allowed: {', '.join(HASH_FUNCTIONS)}")


def check_kind(method: str, kind: str) -> str:
    if kind not in HASH_FUNCTIONS:
        raise ValueError(f"method {method!r}: hash_function={kind!r} is not supported; allowed: {', '.join(HASH_FUNCTIONS)}")
    return kind


def check_hashable(method: str, names_and_rows: Sequence[Tuple[str, int]], buckets: int) -> None:
    """Raise when a table has p or more ids or the range exceeds p (the family's domain)."""
    for name, rows in names_and_rows:
        if rows > PRIME:
            raise ValueError(f"method {method!r}: table {name!r} has {rows} ids; the universal hash family "
                             f"(p = 2^31 - 1) supports at most {PRIME}")
    if buckets > PRIME:
        raise ValueError(f"method {method!r}: {buckets} hash buckets exceed p = 2^31 - 1")

