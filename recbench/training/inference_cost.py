"""Compute per sample at inference, measured on a whole split.

``infer/flops_per_sample``: the floating-point operations of one forward of the deployable model
(the embedding's ``to_inference()`` form, the model in eval mode, so a mixture of experts runs
only its selected experts), counted by ``torch.utils.flop_counter.FlopCounterMode`` over every
batch of the split and divided by its rows. FlopCounterMode counts the matmul family (mm, addmm,
bmm, baddbmm, ...; a multiply-add is 2 FLOPs); element-wise ops and embedding lookups are not
counted. A model with ``diagnostics(dense, sparse) -> {key: sum over the batch}`` (the MoE
models: experts computed, gate non-zeros, over-arch FLOPs) gets those keys averaged per sample too.

References: DESIGN.md section 4 (timing and cost measured inside each run).
"""
from __future__ import annotations

from typing import Dict

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from recbench.datasets.batching import BatchIterator


@torch.no_grad()
def inference_cost(model: nn.Module, dataset, batch_size: int, split: str = "test") -> Dict[str, float]:
    """{"infer/flops_per_sample": ..., <model diagnostics>: ...} averaged over the rows of ``split``."""
    training_embedding, was_training = model.embedding, model.training
    diagnostics = getattr(model, "diagnostics", None)
    model.embedding = training_embedding.to_inference()
    model.eval()
    flops, rows, sums = 0, 0, {}
    try:
        for batch in BatchIterator(dataset.spec, dataset.split(split), batch_size):
            with FlopCounterMode(display=False) as counter:
                model(batch.dense_features, batch.sparse_features)
            flops += counter.get_total_flops()
            rows += batch.labels.shape[0]
            if diagnostics is not None:
                for key, value in diagnostics(batch.dense_features, batch.sparse_features).items():
                    sums[key] = sums.get(key, 0.0) + float(value)
    finally:
        model.embedding = training_embedding
        model.train(was_training)
    if rows == 0:
        raise ValueError(f"split {split!r} is empty")
    return {"infer/flops_per_sample": flops / rows, **{key: value / rows for key, value in sums.items()}}
