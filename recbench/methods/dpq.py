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

from dataclasses import dataclass

from recbench.methods.families.product_quantization import ProductQuantizationFamily, ProductQuantizationSettings


@dataclass
class DPQSettings(ProductQuantizationSettings):
    """Hyperparameters of ``dpq``: the family's (defaults: DPQ-SX of Chen et al., ICML 2020, with
    batch-normalised logits, one shared codebook set and K, P solved from the budget)."""


class DPQ(ProductQuantizationFamily):
    """Differentiable product quantization; hyperparameters: ``DPQSettings``."""

    name = "dpq"
    settings_class = DPQSettings
