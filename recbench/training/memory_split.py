"""The training memory of an embedding layer split as TorchRec's planner reports it: weights,
optimizer state and runtime, measured from the tensors a trained module and its optimizers hold.

TorchRec's planner (``EmbeddingStats``) prints per compute kernel "Embedding Weights", "Optimizer
State" and a "Total Estimated Memory (weights + optimizer + IO + pipeline)"; recbench measures the
same parts of a training run's embedding, plus the method's own buffers, which TorchRec's
embedding tables do not have:

* ``weights``: every trainable tensor of the embedding (tables, codebooks, projections), fused or not;
* ``optimizer_state``: what the optimizers hold for those tensors (FBGEMM's fused state, e.g. the
  row-wise Adagrad accumulator, and the torch optimizers' state of the embedding's parameter groups);
* ``buffers``: the method's other state held while training (masks, remaps, sketches, counters);
* ``runtime``: one training step's input and output of the layer, as the planner's IO estimate:
  the ids and offsets of a (B, F) batch and the pooled (B, F * D) fp32 output and its gradient.

Each tensor is counted once, by storage (FBGEMM registers its optimizer state as module buffers).

References: torchrec/distributed/planner/stats.py (``EmbeddingStats``: weights, optimizer state,
IO); docs/architecture.md section 3 ("Budget and memory").
"""
from __future__ import annotations

from typing import Dict, Iterable, Mapping

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

FP32_BYTES = 4

#: the parts, in the order reports show them
PARTS = ("weights", "optimizer_state", "buffers", "runtime")


def _tensors_of_state(state: Mapping) -> Iterable[torch.Tensor]:
    for per_param in state.values():
        if isinstance(per_param, Mapping):
            for value in per_param.values():
                if isinstance(value, torch.Tensor):
                    yield value


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def training_memory_split(embedding: nn.Module, optimizers: Iterable[torch.optim.Optimizer],
                          features: KeyedJaggedTensor, dim: int) -> Dict[str, int]:
    """Bytes of ``embedding``'s training state by part (``PARTS``).

    Args:
        embedding: the training-form embedding module (a recbench ``EmbeddingModule``).
        optimizers: the run's torch optimizers; only their state of ``embedding``'s parameters counts.
        features: one training batch's (B, F) sparse features (for the runtime part).
        dim: D, the width of each field's pooled output.
    """
    seen = set()

    def count(tensors: Iterable[torch.Tensor]) -> int:
        total = 0
        for tensor in tensors:
            if tensor.numel() == 0:
                continue
            key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tensor.numel())
            if key in seen:
                continue
            seen.add(key)
            total += _nbytes(tensor)
        return total

    params = [p for p in embedding.parameters()]
    weights = count(p.detach() for p in params)
    own = {id(p) for p in params}
    fused = embedding.fused_optimizer() if hasattr(embedding, "fused_optimizer") else None
    optimizer_tensors = list(_tensors_of_state(fused.state)) if fused is not None else []
    for opt in optimizers:
        optimizer_tensors += [v for p, s in opt.state.items() if id(p) in own
                              for v in s.values() if isinstance(v, torch.Tensor)]
    optimizer_state = count(optimizer_tensors)
    buffers = count(b for b in embedding.buffers())
    batch = len(features.lengths()) // max(1, len(features.keys()))
    ids = _nbytes(features.values()) + _nbytes(features.lengths()) + (features.lengths().numel() + 1) * 8
    runtime = ids + 2 * batch * len(features.keys()) * dim * FP32_BYTES
    return {"weights": weights, "optimizer_state": optimizer_state, "buffers": buffers, "runtime": runtime}


def as_metrics(split: Mapping[str, int]) -> Dict[str, float]:
    """MLflow metrics ``emb/bytes_training_<part>``."""
    return {f"emb/bytes_training_{part}": float(split[part]) for part in PARTS}
