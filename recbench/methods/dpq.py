"""``dpq``: Differentiable Product Quantization — codes + codebooks, learned end to end.

References: Chen, Li & Sun, "Differentiable Product Quantization for End-to-End Embedding
Compression", ICML 2020 (arXiv:1908.09756).

Mechanism: each row's query vector is split into P parts; each part picks one of K codewords by
a soft-to-hard assignment — softmax over dot-product logits with a straight-through one-hot
(``assignment: softmax``, DPQ-SX) or the nearest codeword with a straight-through copy and
VQ-VAE losses (``assignment: vq``, DPQ-VQ). The deployable form keeps only the codes (bit-packed
at ceil(log2 K) bits) and the value codebooks. Training keeps the full query table, as in the
paper (its bytes are in the training bytes). See ``recbench.methods.families.product_quantization``.
Budget: ``parts`` (a divisor of D) and ``codewords`` K solved from the budget: for every P the
largest K within the target; the landing pair with the most code bits per row wins.
Shapes: KJT (F keys, B bags) -> KeyedTensor (B, F * D).
"""
from __future__ import annotations

from typing import Any, Optional

from recbench.methods.families.product_quantization import ProductQuantizationFamily


class DPQ(ProductQuantizationFamily):
    """Hyperparameters: ``parts``, ``codewords`` (auto or integers), ``assignment`` (softmax | vq),
    ``codebooks`` (shared | per_field), ``normalize_logits``, ``temperature``, ``commitment``."""

    name = "dpq"

    def __init__(self, name: Optional[str] = None, parts: Any = "auto", codewords: Any = "auto", max_codewords: int = 256,
                 assignment: str = "softmax", codebooks: str = "shared", normalize_logits: bool = True,
                 temperature: float = 1.0, commitment: float = 0.25):
        super().__init__(name, parts, codewords, max_codewords, assignment, codebooks, normalize_logits, temperature, commitment)
