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

from dataclasses import dataclass
from typing import Any, Dict, Sequence

import numpy as np

from recbench.methods.families.product_quantization import (ProductQuantizationFamily, ProductQuantizationSettings,
                                                            head_rows)
from recbench.types import TableSpec


@dataclass
class MGQESettings(ProductQuantizationSettings):
    """Hyperparameters of ``mgqe``: the family's plus the tail codebook and the head share (defaults:
    Kang et al., WWW 2020: DPQ-VQ, top 10% ids as head, K_tail = K / 4 as the paper's 256 : 64)."""

    assignment: str = "vq"  #: vq (the paper's DPQ-VQ base) | softmax
    #: K_tail for the other ids; auto = max(2, K // 4) (paper: 64), or an integer < K
    tail_codewords: Any = "auto"
    head_fraction: float = 0.1  #: top fraction of each field's ids by training frequency (TableSpec.counts)


class MGQE(ProductQuantizationFamily):
    """Multi-granular quantized embeddings; hyperparameters: ``MGQESettings`` (``codewords``: K for
    frequent ids, paper 256)."""

    name = "mgqe"
    settings_class = MGQESettings
    multi_granular = True

    def check_settings(self) -> None:
        super().check_settings()
        tail_codewords, codewords = self.tail_codewords, self.codewords
        if not 0.0 < float(self.head_fraction) < 1.0:
            raise ValueError(f"method 'mgqe': head_fraction must be in (0, 1), got {self.head_fraction!r}")
        if tail_codewords != "auto":
            if not isinstance(tail_codewords, int) or tail_codewords < 2:
                raise ValueError(f"method 'mgqe': tail_codewords must be 'auto' or an integer >= 2, got {tail_codewords!r}")
            if codewords != "auto" and tail_codewords >= codewords:
                raise ValueError(f"method 'mgqe': tail_codewords={tail_codewords} must be < codewords={codewords}")
        self.head_fraction = float(self.head_fraction)

    def tail_codebook_size(self, codewords: int) -> int:
        if self.tail_codewords != "auto":
            return min(int(self.tail_codewords), codewords)
        return max(2, codewords // 4)

    def heads(self, compressed: Sequence[TableSpec]) -> Dict[str, np.ndarray]:
        return {t.name: head_rows(t.counts, self.head_fraction, t.name) for t in compressed}
