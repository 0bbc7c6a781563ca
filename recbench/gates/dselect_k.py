"""``dselect_k``: DSelect-k, k differentiable single-expert selectors with binary encoding.

With m = ceil(log2 E) bits, selector i (of k) computes m smooth-step activations
s_ib = S(z_ib(x)) (``smooth_step``, width gamma) and gives expert e the product over bits of s_ib
where e's binary code has a 1 and 1 - s_ib where it has a 0: a distribution over the 2^m codes
that becomes one-hot once every s_ib is exactly 0 or 1. The selectors are mixed by
alpha(x) = softmax(W_alpha x): weights(x) = sum_i alpha_i(x) * selector_i(x), so at most k
experts once the selectors are binary. Per-example routing: z(x) = W_z x + b_z,
W_z, b_z ~ U(-gamma/100, gamma/100); W_alpha, b_alpha ~ U(-0.05, 0.05).

Regularisation: entropy_reg * mean over the batch of the summed entropies of the k selectors
(pushes them to binary); when E is not a power of 2, also the mean over the batch of
sum_i 1 / (mass selector i puts on real experts), which keeps selectors off unused codes.

Inference routes each selector to its most probable expert (identical once it is binary).

Shapes: x (B, W) -> bits (B, k, m), selectors (B, k, E), weights (B, E).

References: Hazimeh et al., "DSelect-k: Differentiable Selection in the Mixture of Experts with
Applications to Multi-Task Learning", NeurIPS 2021 (eq. 2-5, section 3.2);
google-research/google-research ``dselect_k_moe/dselect_k_moe.py`` (commit
ccc94ce348360ddcd41c749d4088d468ccfd1eaf) and its adaptation in mazumder-lab/COMET
``model/gates/dselect_k.py`` (commit cf272760f49b17fe0989d58a25a8409a71f130f7; entropy averaged
over the batch).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from recbench.gates.base import SmoothStepGate
from recbench.gates.functional import binary_codes, entropy, most_probable, route_products, smooth_step


class DSelectKGate(SmoothStepGate):
    """DSelect-k: x (B, W) -> weights (B, E) with <= k non-zeros once selectors are binary (always at inference).

    Args (besides ``Gate``'s): gamma (smooth-step width), entropy_reg.
    """

    name = "dselect_k"

    def __init__(self, num_experts: int, input_dim: int, k: Optional[int] = 2, gamma: float = 1.0,
                 entropy_reg: float = 0.1, **kwargs):
        super().__init__(num_experts, input_dim, k=k, gamma=gamma, entropy_reg=entropy_reg, **kwargs)
        codes = binary_codes(self.num_experts)
        self.num_bits = codes.shape[1]
        self.power_of_two = self.num_experts == 2**self.num_bits
        self.register_buffer("codes", codes, persistent=False)
        self.z_logits = nn.Linear(self.input_dim, self.k * self.num_bits)
        self.w_logits = nn.Linear(self.input_dim, self.k)
        bound = self.gamma / 100.0
        for parameter in self.z_logits.parameters():
            nn.init.uniform_(parameter, -bound, bound)
        for parameter in self.w_logits.parameters():
            nn.init.uniform_(parameter, -0.05, 0.05)

    def node_activations(self, x: torch.Tensor) -> torch.Tensor:
        """(B, k, m) the smooth-step activation of each selector's code bits."""
        return smooth_step(self.z_logits(x).view(-1, self.k, self.num_bits), self.gamma)

    def selectors(self, x: torch.Tensor) -> torch.Tensor:
        """(B, k, E) the single-expert selectors' training-form outputs (mass on real experts only)."""
        return route_products(self.node_activations(x), self.codes)

    def components(self, x, features, hard):
        selectors = self.selectors(x)
        loss = torch.zeros((), device=x.device)
        if self.training:
            loss = self.entropy_reg * entropy(selectors).sum(dim=1).mean()
            if not self.power_of_two:
                loss = loss + (1.0 / selectors.sum(dim=-1).clamp_min(1e-6)).sum(dim=1).mean()
        if hard:
            selectors = most_probable(selectors)
        alpha = torch.softmax(self.w_logits(x), dim=-1)  # (B, k)
        return alpha.unsqueeze(-1) * selectors, loss
