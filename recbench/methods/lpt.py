"""``lpt``: low-precision training with a fixed step size — INT16/INT8 rows, stochastic rounding.

References: Li et al., "Adaptive Low-Precision Training for Embeddings in Click-Through Rate
Prediction", AAAI 2023 (arXiv:2212.05735), the LPT paradigm (their Section 3); Zhang, Yang &
Yuen, "Training with Low-precision Embedding Tables", NeurIPS 2018 Systems for ML workshop.

Mechanism: every compressed field stores its rows only as b-bit integers with one fixed step size
Delta_b = ``fixed_range`` / (2^(b-1) - 1); lookups de-quantize (Delta q), the row-sparse gradient
of the touched rows is applied by the embedding optimizer inside the backward and the rows are
written back with unbiased stochastic rounding (``recbench.methods.families.low_precision``). No fp32
master copy exists, in training or at inference.
Budget: bytes = packed integer rows (D * b / 8 per row) + 4 bytes of step size per field (+ kept
fields in fp32); per-field precision from ``levels`` (default INT16 and INT8): the largest uniform
precision within the target, then the largest fields one level up while the total fits. Reachable
ratios on D = 16: about [0.25, 0.5] (every ratio below INT8 is infeasible).
Shapes: KJT (F keys, B bags) -> KeyedTensor (B, F * D).
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

from recbench.methods.families.low_precision import LowPrecisionFamily


class LPT(LowPrecisionFamily):
    """Hyperparameters: ``bits`` (auto | 16 | 8), ``levels`` (precisions ``auto`` may use),
    ``fixed_range`` (the representable range +-fixed_range; INT8 step 1.27 / 127 = 0.01)."""

    name = "lpt"
    learnable = False
    allowed_levels = (16, 8, 4, 2)

    def __init__(self, name: Optional[str] = None, bits: Any = "auto", levels: Sequence[int] = (16, 8),
                 fixed_range: float = 1.27):
        super().__init__(name, bits, levels, fixed_range=fixed_range)
