"""``softmax``: the dense gate of (multi-gate) mixtures of experts, the baseline sparse gates are
measured against.

g(x) = softmax(W x + b) over the E experts: every expert gets a non-zero weight, so k = E and
the over-arch computes all experts for every sample.

References: Jacobs et al., "Adaptive Mixtures of Local Experts", Neural Computation 1991; Ma et
al., "Modeling Task Relationships in Multi-task Learning with Multi-gate Mixture-of-Experts"
(MMoE), KDD 2018.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from recbench.gates.base import Gate


class SoftmaxGate(Gate):
    """Dense softmax gate: x (B, W) -> weights (B, E), all non-zero. ``k`` must be None or E."""

    name = "softmax"

    def __init__(self, num_experts: int, input_dim: int, k: Optional[int] = None, **kwargs):
        if k is not None and int(k) != int(num_experts):
            raise ValueError(f"gate 'softmax' is dense: k must be null or num_experts={num_experts}, got {k} "
                             "(use topk, dselect_k or comet for a sparse gate)")
        super().__init__(num_experts, input_dim, k=None, **kwargs)
        self.logits = nn.Linear(self.input_dim, self.num_experts)

    def components(self, x, features, hard):
        return torch.softmax(self.logits(x), dim=-1).unsqueeze(1), torch.zeros((), device=x.device)
