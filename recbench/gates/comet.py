"""``comet``: COMET, k soft binary trees whose leaves are the experts.

Each of the k trees has E - 1 internal nodes (heap order; ``heap_paths``) and E leaves, leaf j
being expert j. Node n of tree i sends a sample left with probability p_in(x) = S(w_in . x + b_in)
(``smooth_step`` of width gamma, w and b ~ U(-gamma/100, gamma/100)) and right with
1 - p_in(x); the probability of reaching leaf j is the product along its route, which is
exactly 0/1 once every node on it is saturated. Leaf j of tree i also carries a logit
a_ij(x) = v_ij . x + c_ij (v, c ~ U(-0.05, 0.05)). The weights are one softmax over all
k * E entries a_ij(x) + log(P_i(leaf j | x) + 1e-8), an exactly-zero probability giving
log = -inf, summed over the trees: with binary routing exactly one leaf per tree is
reachable, so at most k experts per sample.

Regularisation: entropy_reg * mean over the batch of the summed entropies of the k trees' leaf
distributions, which drives routing to exactly 0/1 ("entropic regularisation").

Inference routes each tree to its most probable leaf (identical once routing is binary).

Shapes: x (B, W) -> nodes (B, k, E - 1), leaf probabilities and scores (B, k, E), weights (B, E).

References: Ibrahim et al., "COMET: Learning Cardinality Constrained Mixture of Experts with
Trees and Local Search", KDD 2023 (section 3); mazumder-lab/COMET ``model/gates/comet.py``
(commit cf272760f49b17fe0989d58a25a8409a71f130f7); Hazimeh et al., "The Tree Ensemble Layer",
ICML 2020 (smooth-step trees).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from recbench.gates.base import SmoothStepGate
from recbench.gates.functional import entropy, heap_paths, most_probable, route_products, smooth_step


class COMETGate(SmoothStepGate):
    """COMET: x (B, W) -> weights (B, E) with <= k non-zeros once routing is binary (always at inference).

    Args (besides ``Gate``'s): gamma (smooth-step width), entropy_reg.
    """

    name = "comet"

    def __init__(self, num_experts: int, input_dim: int, k: Optional[int] = 2, gamma: float = 1.0,
                 entropy_reg: float = 0.1, **kwargs):
        super().__init__(num_experts, input_dim, k=k, gamma=gamma, entropy_reg=entropy_reg, **kwargs)
        self.register_buffer("paths", heap_paths(self.num_experts), persistent=False)
        self.nodes = nn.Linear(self.input_dim, self.k * (self.num_experts - 1))
        self.leaves = nn.Linear(self.input_dim, self.k * self.num_experts)
        for parameter in self.nodes.parameters():
            nn.init.uniform_(parameter, -self.gamma / 100.0, self.gamma / 100.0)
        for parameter in self.leaves.parameters():
            nn.init.uniform_(parameter, -0.05, 0.05)

    def node_activations(self, x: torch.Tensor) -> torch.Tensor:
        """(B, k, E - 1) the probability that node n of tree i sends x left."""
        return smooth_step(self.nodes(x).view(-1, self.k, self.num_experts - 1), self.gamma)

    def leaf_probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """(B, k, E) the probability that tree i routes x to leaf (expert) j (training form)."""
        return route_products(self.node_activations(x), self.paths)

    def components(self, x, features, hard):
        reach = self.leaf_probabilities(x)
        loss = self.entropy_reg * entropy(reach).sum(dim=1).mean() if self.training else torch.zeros((), device=x.device)
        if hard:
            reach = most_probable(reach)
        log_reach = torch.where(reach <= 0, torch.full_like(reach, float("-inf")), torch.log(reach + 1e-8))
        scores = self.leaves(x).view(-1, self.k, self.num_experts) + log_reach
        weights = torch.softmax(scores.flatten(1), dim=-1).view_as(scores)
        return weights, loss
