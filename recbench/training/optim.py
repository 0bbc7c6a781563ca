"""Optimizers of the non-fused parameters.

Dense parameters (MLPs, projections, thresholds, ...) use Adam; parameter groups that an
embedding module marks ``kind="sparse"`` (row-sparse gradients of custom-lookup tables) use
Adagrad, which accepts sparse gradients, so no dense gradient of a table is ever built. Tables of
table-backed methods are updated inside FBGEMM's backward (``EmbeddingModule.fused_optimizer``).

References: Kingma & Ba, "Adam", ICLR 2015; Duchi et al., "Adaptive Subgradient Methods", JMLR 2011.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List

import torch
from torch import nn

from recbench.types import EmbeddingOptimizer


@dataclass(frozen=True)
class DenseOptimizer:
    learning_rate: float = 1e-3
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        if not self.learning_rate > 0:
            raise ValueError(f"optimizer.dense.learning_rate must be > 0, got {self.learning_rate}")


def build_optimizers(model: nn.Module, embedding, dense: DenseOptimizer,
                     sparse: EmbeddingOptimizer) -> Dict[str, torch.optim.Optimizer]:
    """Optimizers over every trainable non-fused parameter of ``model`` (each exactly once).

    Returns a dict name -> optimizer: "dense" (Adam) and, when present, "sparse" (Adagrad).
    """
    fused = {id(p) for p in embedding.fused_parameters()}
    grouped = set()
    dense_groups: List[dict] = []
    sparse_groups: List[dict] = []
    for group in embedding.param_groups():
        params = [p for p in group.params if p.requires_grad and id(p) not in fused and id(p) not in grouped]
        grouped.update(id(p) for p in params)
        if not params:
            continue
        if group.kind == "sparse":
            sparse_groups.append({"params": params, "lr": group.learning_rate or sparse.learning_rate,
                                  "name": group.name})
        elif group.kind == "dense":
            dense_groups.append({"params": params, "lr": group.learning_rate or dense.learning_rate,
                                 "name": group.name})
        else:
            raise ValueError(f"param group {group.name!r}: kind must be 'dense' or 'sparse', got {group.kind!r}")
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in fused and id(p) not in grouped]
    if rest:
        dense_groups.insert(0, {"params": rest, "lr": dense.learning_rate, "name": "dense"})
    optimizers: Dict[str, torch.optim.Optimizer] = {}
    if dense_groups:
        # foreach: one multi-tensor kernel per update term instead of a Python loop over parameters
        # (PyTorch's CPU default); the same arithmetic (benchmarks/hot_paths.py)
        optimizers["dense"] = torch.optim.Adam(dense_groups, lr=dense.learning_rate, weight_decay=dense.weight_decay,
                                               foreach=True)
    if sparse_groups:
        optimizers["sparse"] = torch.optim.Adagrad(sparse_groups, lr=sparse.learning_rate, eps=sparse.eps)
    return optimizers
