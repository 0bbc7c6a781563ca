"""``alpt``: Adaptive Low-Precision Training — integer rows with learned step sizes.

References: Li, Guo, Hou, Zhang, Tang, Tang, Zhang & Li, "Adaptive Low-Precision Training for
Embeddings in Click-Through Rate Prediction", AAAI 2023 (arXiv:2212.05735); Hsword/Hetu
``tools/EmbeddingMemoryCompression/methods/scheduler/alpt.py`` and ``methods/layers/alpt.py``,
``run_compressed.py`` (commit a1cb1bcaf236c9f1d452733b105997d50c16c9df); the step-size gradient
of Esser et al., "Learned Step Size Quantization" (LSQ), ICLR 2020.

Mechanism: as ``lpt`` (integer rows only, de-quantized for the lookup, optimizer step on the
touched rows inside the backward, stochastic rounding on write), but the step size Delta (one per
row, as in the paper and Hetu, or one per field) is learned: its gradient is LSQ's
straight-through estimate at the updated rows, scaled by Hetu's 1 / sqrt(B D Q_P) (B the batch's
samples; ``gradient_scale: rows`` is recbench's earlier 1 / sqrt(N Q_P), N the values sharing the
step in the batch), and an optimizer of its own steps it: Adam (the paper's optimizer; Hetu builds
the step sizes' optimizer from the run's optimizer class, sparse Adam for per-row steps) at
``scale_learning_rate`` = 2e-5 (Hetu's ``scale_lr``); ``scale_optimizer: adagrad`` puts per-row
steps in the sparse Adagrad group (recbench's earlier rule). The updated rows are then rounded with
the new Delta (``on_step_end`` hook) — the alternating update of weights and step sizes. Step
sizes start at Hetu's constant ``init_scale`` 0.01 (``step_init``; ``lsq`` = LSQ's 2 mean|w| /
sqrt(Q_P) of the initial draw, recbench's earlier init). See ``recbench.methods.families.low_precision``.
Budget: bytes = packed integer rows (D * b / 8 per row, INT4 two and INT2 four values per byte)
+ fp32 step sizes (4 bytes per row or per field) (+ kept fields in fp32); per-field precision from
``levels`` (default 16, 8, 4, 2) as in ``lpt``. With D = 16 and per-row steps the reachable
ratios are about [0.125, 0.5625]; per-field steps reach [0.0625, 0.5].
Shapes: KJT (F keys, B bags) -> KeyedTensor (B, F * D).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List

from recbench.methods.families.low_precision import LowPrecisionFamily, LowPrecisionSettings


@dataclass
class ALPTSettings(LowPrecisionSettings):
    """Hyperparameters of ``alpt`` (defaults: Hsword/Hetu's alpt, commit a1cb1bca: per-row steps,
    ``scale_lr`` 2e-5, ``init_scale`` 0.01, its step-gradient scale and Adam)."""

    #: precisions `auto` may use (INT4 packs two values per byte, INT2 four)
    levels: List[int] = field(default_factory=lambda: [16, 8, 4, 2])
    granularity: str = "row"  #: row (one step size per embedding, as in the paper and Hetu) | field
    scale_learning_rate: float = 2.0e-5  #: learning rate of the step sizes (Hetu's scale_lr)
    #: initial step size (Hetu's init_scale) | lsq (2 mean|w| / sqrt(Q_P), recbench's earlier init); a number or lsq
    step_init: Any = 0.01
    #: batch: 1/sqrt(B D Q_P) (Hetu's scale_factor) | rows: 1/sqrt(N Q_P), N values sharing the step (earlier)
    gradient_scale: str = "batch"
    #: adam (the paper's; Hetu: the run's optimizer class, sparse Adam per row) | adagrad (earlier, per row only)
    scale_optimizer: str = "adam"


class ALPT(LowPrecisionFamily):
    """Adaptive low-precision training; hyperparameters: ``ALPTSettings`` (``bits``: auto | 16 | 8 | 4 | 2)."""

    name = "alpt"
    settings_class = ALPTSettings
    learnable = True
    allowed_levels = (16, 8, 4, 2)
    #: 3: Hetu's step-gradient scale 1/sqrt(B D Q_P), Adam on the step sizes and init_scale 0.01
    #: (methods/alpt.md, Deviations)
    revision = 3
