"""Optimizers of the non-fused parameters.

Dense parameters (MLPs, projections, thresholds, ...) use Adam; parameter groups that an
embedding module marks ``kind="sparse"`` (row-sparse gradients of custom-lookup tables) use
Adagrad, which accepts sparse gradients, so no dense gradient of a table is ever built. A group
may name another rule (``ParamGroup.optimizer``) when its reference trains it so, e.g. SGD for
OptEmbed's thresholds; such groups get an optimizer of their own. Tables of
table-backed methods are updated inside FBGEMM's backward (``EmbeddingModule.fused_optimizer``).

References: Kingma & Ba, "Adam", ICLR 2015; Duchi et al., "Adaptive Subgradient Methods", JMLR 2011.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Tuple

import torch
from torch import nn

from recbench.checks import check_number
from recbench.types import EmbeddingOptimizer


@dataclass(frozen=True)
class DenseOptimizer:
    learning_rate: float = 1e-3
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        check_number("optimizer.dense.learning_rate", self.learning_rate, low=0, low_open=True)
        check_number("optimizer.dense.weight_decay", self.weight_decay, low=0)


# optimizer rules a ``ParamGroup`` may name, per kind; the first is the kind's default
GROUP_OPTIMIZERS = {"dense": ("adam", "sgd"), "sparse": ("adagrad", "sgd", "sparse_adam")}


def _optimizer_name(kind: str, rule: str) -> str:
    """"dense" and "sparse" for the default rules (the names checkpoints have always used)."""
    return kind if rule == GROUP_OPTIMIZERS[kind][0] else f"{kind}_{rule}"


def build_optimizers(model: nn.Module, embedding, dense: DenseOptimizer,
                     sparse: EmbeddingOptimizer) -> Dict[str, torch.optim.Optimizer]:
    """Optimizers over every trainable non-fused parameter of ``model`` (each exactly once).

    Returns a dict name -> optimizer: "dense" (Adam) and, when present, "sparse" (Adagrad), plus
    one per other rule a parameter group names ("dense_sgd", "sparse_sgd", "sparse_sparse_adam").
    """
    fused = {id(p) for p in embedding.fused_parameters()}
    grouped = set()
    groups: Dict[Tuple[str, str], List[dict]] = {}
    for group in embedding.param_groups():
        params = [p for p in group.params if p.requires_grad and id(p) not in fused and id(p) not in grouped]
        grouped.update(id(p) for p in params)
        if not params:
            continue
        if group.kind not in GROUP_OPTIMIZERS:
            raise ValueError(f"param group {group.name!r}: kind must be 'dense' or 'sparse', got {group.kind!r}")
        rule = group.optimizer or GROUP_OPTIMIZERS[group.kind][0]
        if rule not in GROUP_OPTIMIZERS[group.kind]:
            raise ValueError(f"param group {group.name!r}: optimizer of a {group.kind} group must be one of "
                             f"{list(GROUP_OPTIMIZERS[group.kind])}, got {rule!r}")
        if group.weight_decay and group.kind == "sparse":
            raise ValueError(f"param group {group.name!r}: torch's sparse optimizers take no weight_decay; "
                             "add the L2 penalty of the rows a batch touches to the loss instead")
        default_lr = sparse.learning_rate if group.kind == "sparse" else dense.learning_rate
        entry = {"params": params, "lr": group.learning_rate or default_lr, "name": group.name}
        if group.kind == "dense":
            entry["weight_decay"] = dense.weight_decay if group.weight_decay is None else group.weight_decay
        groups.setdefault((group.kind, rule), []).append(entry)
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in fused and id(p) not in grouped]
    if rest:
        groups.setdefault(("dense", "adam"), []).insert(
            0, {"params": rest, "lr": dense.learning_rate, "name": "dense", "weight_decay": dense.weight_decay})
    optimizers: Dict[str, torch.optim.Optimizer] = {}
    for (kind, rule), entries in groups.items():
        if rule == "adam":
            # foreach: one multi-tensor kernel per update term instead of a Python loop over parameters
            # (PyTorch's CPU default); the same arithmetic (benchmarks/hot_paths.py)
            opt = torch.optim.Adam(entries, lr=dense.learning_rate, weight_decay=dense.weight_decay, foreach=True)
        elif rule == "sgd":
            opt = torch.optim.SGD(entries, lr=entries[0]["lr"])
        elif rule == "adagrad":
            opt = torch.optim.Adagrad(entries, lr=sparse.learning_rate, eps=sparse.eps)
        else:
            opt = torch.optim.SparseAdam(entries, lr=entries[0]["lr"])
        optimizers[_optimizer_name(kind, rule)] = opt
    return optimizers
