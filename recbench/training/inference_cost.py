"""Compute per sample at inference, counted during the final test evaluation.

``infer/flops_per_sample``: the floating-point operations of one forward of the deployable model
(the embedding's ``to_inference()`` form, the model in eval mode, so a mixture of experts runs
only its selected experts), counted by ``torch.utils.flop_counter.FlopCounterMode`` over every
batch of the test split and divided by its rows. FlopCounterMode counts the matmul family (mm,
addmm, bmm, baddbmm, ...; a multiply-add is 2 FLOPs); element-wise ops and embedding lookups are
not counted. A model with ``diagnostics(dense, sparse) -> {key: sum over the batch}`` (the MoE
models: experts computed, gate non-zeros, over-arch FLOPs) gets those keys averaged per sample too.

The counter wraps the forwards of the one test pass the trainer makes for ``test/auc`` (a counted
forward computes the same outputs), so the split is walked once.

References: docs/architecture.md ("Evaluation"); ``torch.utils.flop_counter``.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


class CostCounter:
    """Counts FLOPs, rows and the model's diagnostics over the forwards it runs.

    Usage: ``counter.forward(batch)`` in place of ``model(batch.dense_features, batch.sparse_features)``
    for every batch of the split, then ``counter.per_sample(concat_ranks)``.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.diagnostics = getattr(model, "diagnostics", None)
        self.flops, self.rows = 0, 0
        self.sums: Dict[str, float] = {}

    @torch.no_grad()
    def forward(self, batch) -> Any:
        with FlopCounterMode(display=False) as counter:
            output = self.model(batch.dense_features, batch.sparse_features)
        self.flops += counter.get_total_flops()
        self.rows += int(batch.labels.shape[0])
        if self.diagnostics is not None:
            for key, value in self.diagnostics(batch.dense_features, batch.sparse_features).items():
                self.sums[key] = self.sums.get(key, 0.0) + float(value)
        return output

    def per_sample(self, concat_ranks: Callable[[Sequence[torch.Tensor]], Sequence[torch.Tensor]] = list
                   ) -> Dict[str, float]:
        """{"infer/flops_per_sample": ..., <diagnostics>: ...} over every row counted (summed over
        the ranks of a distributed run with ``concat_ranks``: the parallel strategy's)."""
        keys = sorted(self.sums)
        local = torch.tensor([float(self.flops), float(self.rows), *(self.sums[k] for k in keys)], dtype=torch.float64)
        total = concat_ranks([local[None]])[0].sum(0)  # (ranks, K) -> (K,)
        rows = float(total[1])
        if rows == 0:
            raise ValueError("no rows were counted (empty split)")
        return {"infer/flops_per_sample": float(total[0]) / rows,
                **{key: float(value) / rows for key, value in zip(keys, total[2:].tolist())}}
