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

from dataclasses import dataclass, field
from typing import List

from recbench.methods.families.low_precision import LowPrecisionFamily, LowPrecisionSettings


@dataclass
class LPTSettings(LowPrecisionSettings):
    """Hyperparameters of ``lpt`` (defaults: INT16/INT8 with a +-1.27 range, INT8 step 0.01)."""

    levels: List[int] = field(default_factory=lambda: [16, 8])  #: precisions `auto` may use (INT16 and INT8)
    fixed_range: float = 1.27  #: representable range +-fixed_range: step = fixed_range / (2^(b-1) - 1) (INT8: 0.01)


class LPT(LowPrecisionFamily):
    """Low-precision training with a fixed step size; hyperparameters: ``LPTSettings``
    (``bits``: auto | 16 | 8 | 4 | 2)."""

    name = "lpt"
    settings_class = LPTSettings
    learnable = False
    allowed_levels = (16, 8, 4, 2)
