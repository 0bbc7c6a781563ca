"""Per-id gradient norms of looked-up rows, read from the gradient of the pooled output.

Importance-driven methods (AdaEmbed, CAFE) score every id by the L2 norm of the gradient its
embedding row receives. With fused FBGEMM tables the row gradients never exist as tensors (the
optimizer runs inside the backward), and ids without a row of their own (AdaEmbed's unallocated
ids, CAFE's cold ids) have no row to read a gradient from at all. Both are served by the gradient
of the module's output: for sum pooling every id of a bag receives the bag's output gradient,
for mean pooling that gradient divided by the bag size. Summing these per-value gradients over
the occurrences of an id in the batch gives exactly the gradient its own row would receive,
d loss / d e_id, whether or not the id owns a row.

``attach(values, features, ...)`` registers a hook on the (B, F * D) output; during the backward
it calls ``callback(keys (U,), norms (U,), counts (U,))`` with the batch's unique keys, the L2 norm
of each key's summed row gradient and its number of occurrences. Only (D,)-sized vectors per
unique id are formed, never a table-sized gradient.

References: Lai et al., "AdaEmbed: Adaptive Embedding for Large-Scale Recommendation Models",
OSDI 2023 (importance from access frequency and gradient magnitude); Zhang et al., "CAFE: Towards
Compact, Adaptive, and Fast Embedding for Large-scale Recommendation Models", SIGMOD 2024
(HotSketch importance scores = gradient norms).
"""
from __future__ import annotations

from typing import Callable, Mapping

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recbench.methods.blocks import batch_part
from recbench.methods.blocks.per_id import value_fields

Callback = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]


def value_layout(features: KeyedJaggedTensor, index: Mapping[str, int], is_mean: torch.Tensor):
    """(fields (N,), samples (N,), scale (N,)) of every value: its module field index, its sample
    in the batch and the factor its bag's output gradient reaches it with (1, or 1/len for mean)."""
    batch = features.stride()
    lengths = features.lengths().long()
    bags = torch.repeat_interleave(torch.arange(lengths.numel(), device=lengths.device), lengths)
    fields = value_fields(features, index)
    scale = torch.where(is_mean[fields], 1.0 / lengths[bags].clamp(min=1).float(), torch.ones(()))
    return fields, bags % max(batch, 1), scale


def attach(values: torch.Tensor, features: KeyedJaggedTensor, index: Mapping[str, int], is_mean: torch.Tensor,
           keys: torch.Tensor, select: torch.Tensor, dim: int, callback: Callback, world: int = 1) -> None:
    """Report per-key row-gradient norms of ``features``' values during the backward of ``values``.

    Args:
        values: the module's (B, F * D) output, fields in module order.
        features: the KJT the output was computed from.
        index: field name -> module field index.
        is_mean: (F,) bool, mean-pooled fields.
        keys: (N,) int64 key of every value (e.g. a global id).
        select: (N,) bool, the values to report (e.g. compressed fields only).
        dim: D.
        callback: called once per backward with (keys (U,), norms (U,), counts (U,)).
        world: W > 1 in a distributed training step (``batch_part.world_size``): every rank's
            unique keys, (U_r, D) summed gradients and counts are joined in the backward
            (``batch_part.concat_over_ranks``) and the callback gets the whole global batch's keys,
            norms and counts on every rank. A rank's gradients are of its loss scaled by W, so the
            joined sum is divided by W: the gradient of the global mean loss, as in one process.
    """
    if not (values.requires_grad and torch.is_grad_enabled()):
        return
    fields, samples, scale = value_layout(features, index, is_mean)
    chosen = select.nonzero().flatten()
    if not chosen.numel() and world == 1:  # distributed: every rank joins the collective, even with no value
        return
    unique, inverse, counts = torch.unique(keys[chosen], return_inverse=True, return_counts=True)
    fields, samples, scale = fields[chosen], samples[chosen], scale[chosen]
    num_fields = len(index)

    def hook(grad: torch.Tensor) -> None:
        with torch.no_grad():
            per_value = grad.detach().view(grad.shape[0], num_fields, dim)[samples, fields] * scale.unsqueeze(1)
            summed = per_value.new_zeros(unique.numel(), dim).index_add_(0, inverse, per_value)
            if world == 1:
                callback(unique, summed.norm(dim=1), counts)
                return
            every_key, every_sum, every_count = batch_part.concat_over_ranks([unique, summed, counts], world)
            keys_all, where = torch.unique(every_key, return_inverse=True)
            if not keys_all.numel():  # no value in the whole batch: one process reports nothing either
                return
            total = summed.new_zeros(keys_all.numel(), dim).index_add_(0, where, every_sum) / world
            callback(keys_all, total.norm(dim=1), torch.zeros_like(keys_all).index_add_(0, where, every_count))

    values.register_hook(hook)
