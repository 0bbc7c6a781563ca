"""``mgqe``: Multi-Granular Quantized Embeddings — more codewords for frequent ids.

References: Kang, Cheng, Chen, Yi, Lin, Hong & Chi, "Learning Multi-granular Quantized
Embeddings for Large-Vocab Categorical Features in Recommender Systems", WWW 2020
(arXiv:2002.08530).

Mechanism: DPQ (``recbench.methods.families.product_quantization``; DPQ-VQ by default, as in the paper)
where the rows of each field are split by training frequency (``TableSpec.counts``): the top
``head_fraction`` (10%) may use all K codewords, the rest only the first K_tail (the paper's
256 / 64). Deployable form: head codes at ceil(log2 K) bits and tail codes at ceil(log2 K_tail)
bits in two packed streams, the shared value codebooks, and a head bitmap with one int32 rank per
64 rows that finds a row's slot (both code widths and the map are counted).
Budget: ``parts`` P and ``codewords`` K are solved as in ``dpq`` with K_tail = max(2, K // 4)
(the paper's 256 : 64 ratio); with ``codewords: 256`` and ``tail_codewords: 64`` (the paper's
setting, too large for small vocabularies) only P is solved.
Shapes: KJT (F keys, B bags) -> KeyedTensor (B, F * D).
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

import numpy as np

from recbench.methods.families.product_quantization import ProductQuantizationFamily, head_rows
from recbench.types import TableSpec


class MGQE(ProductQuantizationFamily):
    """Hyperparameters: ``parts`` (auto | int), ``codewords`` (K, auto | int), ``tail_codewords``
    (auto | int < K), ``head_fraction``, plus DPQ's ``assignment``, ``codebooks``,
    ``normalize_logits``, ``temperature``, ``commitment``."""

    name = "mgqe"
    multi_granular = True

    def __init__(self, name: Optional[str] = None, parts: Any = "auto", codewords: Any = "auto",
                 tail_codewords: Any = "auto", max_codewords: int = 256, head_fraction: float = 0.1, assignment: str = "vq",
                 codebooks: str = "shared", normalize_logits: bool = True, temperature: float = 1.0,
                 commitment: float = 0.25):
        super().__init__(name, parts, codewords, max_codewords, assignment, codebooks, normalize_logits, temperature, commitment,
                         tail_codewords=tail_codewords, head_fraction=head_fraction)
        if not 0.0 < float(head_fraction) < 1.0:
            raise ValueError(f"method 'mgqe': head_fraction must be in (0, 1), got {head_fraction!r}")
        if tail_codewords != "auto":
            if not isinstance(tail_codewords, int) or tail_codewords < 2:
                raise ValueError(f"method 'mgqe': tail_codewords must be 'auto' or an integer >= 2, got {tail_codewords!r}")
            if codewords != "auto" and tail_codewords >= codewords:
                raise ValueError(f"method 'mgqe': tail_codewords={tail_codewords} must be < codewords={codewords}")
        self.fixed_tail, self.head_fraction = tail_codewords, float(head_fraction)

    def tail_codewords(self, codewords: int) -> int:
        if self.fixed_tail != "auto":
            return min(int(self.fixed_tail), codewords)
        return max(2, codewords // 4)

    def heads(self, compressed: Sequence[TableSpec]) -> Dict[str, np.ndarray]:
        return {t.name: head_rows(t.counts, self.head_fraction, t.name) for t in compressed}
