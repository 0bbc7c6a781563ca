"""``comet``: COMET, k soft binary trees whose leaves are the experts.

Each of the k trees has E - 1 internal nodes (heap order; ``heap_paths``) and E leaves, leaf j
being expert j. Node n of tree i sends a sample left with probability p_in(x) = S(w_in . x)
(``smooth_step`` of width gamma, W ~ U(-gamma/100, gamma/100), no bias) and right with
1 - p_in(x); the probability of reaching leaf j is the product along its route, which is
exactly 0/1 once every node on it is saturated. Leaf j of tree i also carries a logit
a_ij(x) = v_ij . x + c_ij (v ~ U(-0.05, 0.05), c = 0). The weights are one softmax over all
k * E entries a_ij(x) + log P_i(leaf j | x), with probabilities below 1e-5 treated as exact
zeros (log = -inf), summed over the trees: with binary routing exactly one leaf per tree is
reachable, so at most k experts per sample.

Regularisation: entropy_reg * mean over the batch of the summed entropies of the k trees' leaf
distributions, which drives routing to exactly 0/1 ("entropic regularisation").

Inference routes each tree to its most probable leaf (identical once routing is binary).

References: Ibrahim et al., "COMET: Learning Cardinality Constrained Mixture of Experts with
Trees and Local Search", KDD 2023 (section 3), and its reference implementation (mazumder-lab
COMET-MoE); Hazimeh et al., "The Tree Ensemble Layer", ICML 2020 (smooth-step trees).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from recbench.gates.base import ZERO_PROBABILITY, SmoothStepGate, entropy, heap_paths, most_probable, route_products, smooth_step


class COMETGate(SmoothStepGate):
    """COMET: x (B, W) -> weights (B, E) with <= k non-zeros once routing is binary (always at inference).

    Args (besides ``Gate``'s): gamma (smooth-step width), entropy_reg.
    """

    name = "comet"

    def __init__(self, num_experts: int, input_dim: int, k: Optional[int] = 2, gamma: float = 1.0,
                 entropy_reg: float = 0.1, **kwargs):
        super().__init__(num_experts, input_dim, k=k, gamma=gamma, entropy_reg=entropy_reg, **kwargs)
        self.register_buffer("paths", heap_paths(self.num_experts), persistent=False)
        self.nodes = nn.Linear(self.input_dim, self.k * (self.num_experts - 1), bias=False)
        self.leaves = nn.Linear(self.input_dim, self.k * self.num_experts)
        nn.init.uniform_(self.nodes.weight, -self.gamma / 100.0, self.gamma / 100.0)
        nn.init.uniform_(self.leaves.weight, -0.05, 0.05)
        nn.init.zeros_(self.leaves.bias)

    def leaf_probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """(B, k, E) the probability that tree i routes x to leaf (expert) j (training form)."""
        left = smooth_step(self.nodes(x).view(-1, self.k, self.num_experts - 1), self.gamma)
        return route_products(left, self.paths)

    def components(self, x, features, hard):
        reach = self.leaf_probabilities(x)
        loss = self.entropy_reg * entropy(reach).sum(dim=1).mean() if self.training else torch.zeros((), device=x.device)
        if hard:
            reach = most_probable(reach)
        log_reach = torch.where(reach < ZERO_PROBABILITY, torch.full_like(reach, float("-inf")),
                                torch.log(reach + 1e-6))
        scores = self.leaves(x).view(-1, self.k, self.num_experts) + log_reach
        weights = torch.softmax(scores.flatten(1), dim=-1).view_as(scores)
        return weights, loss
