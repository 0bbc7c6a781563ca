"""``topk``: the noisily gated Top-k mixture of experts of Shazeer et al.; ``topk_plain``: the
Top-k baseline of the COMET reference (no noise, no balancing loss).

H(x) = x W_g + eps * softplus(x W_noise) with eps ~ N(0, 1) in training only; the k largest
entries of H are kept and the weights are their softmax (zeros elsewhere), so the routing is
exactly k-sparse in training and at inference, and zero weights carry no gradient. The
regularisation is the paper's balancing loss: w_importance * CV(importance)^2 + w_load *
CV(load)^2, with importance_e = sum over the batch of g_e(x) and load_e the smooth estimator
sum over the batch of P(H_e(x) stays in the top k when only e's noise is redrawn).

W_g and W_noise start at zero (the paper's initialisation: equal logits, random top-k by noise).

``topk_plain`` is the COMET reference's Top-k (``topk.json``: ``"jitter": false``, no load
balancing): H(x) = x W_g + b, W_g Glorot-uniform, b = 0 (Keras' defaults there), top k, softmax
over them; no noise and no regularisation.

Shapes: x (B, W) -> logits (B, E) -> weights (B, E) with k non-zeros per row.

References: Shazeer et al., "Outrageously Large Neural Networks: The Sparsely-Gated
Mixture-of-Experts Layer", ICLR 2017 (eq. 3-5, 6-10 and appendix A); mazumder-lab/COMET
``model/gates/topk.py``, ``config/model_config/movielens2M/topk.json`` (commit
cf272760f49b17fe0989d58a25a8409a71f130f7).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from recbench.gates.base import Gate

#: the paper's epsilon floor on the noise standard deviation is implicit; this keeps the load estimator finite
NOISE_FLOOR = 1e-2


def squared_cv(values: torch.Tensor) -> torch.Tensor:
    """Squared coefficient of variation of a (E,) vector (0 for a constant vector)."""
    if values.numel() < 2:
        return torch.zeros((), device=values.device)
    return values.float().var() / (values.float().mean() ** 2 + 1e-10)


class TopKGate(Gate):
    """Noisy Top-k gate: x (B, W) -> weights (B, E) with exactly k non-zeros.

    Args (besides ``Gate``'s): noisy (add the tunable Gaussian noise in training),
    importance_weight, load_weight (the balancing losses' weights).
    """

    name = "topk"
    sparse_in_training = True
    #: the gate logits' bias and initialisation ("zeros" or "glorot")
    bias, init = False, "zeros"

    def __init__(self, num_experts: int, input_dim, k: Optional[int] = 2, noisy: bool = True,
                 importance_weight: float = 0.01, load_weight: float = 0.01, **kwargs):
        super().__init__(num_experts, input_dim, k=k, **kwargs)
        self.noisy = bool(noisy)
        self.importance_weight, self.load_weight = float(importance_weight), float(load_weight)
        self.w_gate = nn.Linear(self.input_dim, self.num_experts, bias=self.bias)
        if self.init == "glorot":
            nn.init.xavier_uniform_(self.w_gate.weight)
        else:
            nn.init.zeros_(self.w_gate.weight)
        if self.bias:
            nn.init.zeros_(self.w_gate.bias)
        self.w_noise = None
        if self.noisy:
            self.w_noise = nn.Linear(self.input_dim, self.num_experts, bias=False)
            nn.init.zeros_(self.w_noise.weight)

    def components(self, x, features, hard):
        clean = self.w_gate(x)
        noisy = self.noisy and self.training and not hard
        if noisy:
            std = nn.functional.softplus(self.w_noise(x)) + NOISE_FLOOR
            logits = clean + torch.randn_like(clean) * std
        else:
            logits = clean
        k = self.k
        top_values, top_index = logits.topk(min(k + 1, self.num_experts), dim=-1)
        weights = torch.zeros_like(logits).scatter(-1, top_index[:, :k], torch.softmax(top_values[:, :k], dim=-1))
        loss = torch.zeros((), device=x.device)
        if self.training and (self.importance_weight or self.load_weight):
            importance = weights.sum(dim=0)
            if noisy and k < self.num_experts:
                load = self._load(clean, logits, std, top_values).sum(dim=0)
            else:
                load = (weights > 0).float().sum(dim=0)
            loss = self.importance_weight * squared_cv(importance) + self.load_weight * squared_cv(load)
        return weights.unsqueeze(1), loss

    def _load(self, clean, noisy_logits, std, top_values):
        """P(expert e is in the top k) per sample (B, E), each expert's noise redrawn (appendix A)."""
        k = self.k
        threshold_if_in = top_values[:, k:k + 1]  # the (k+1)-th value: e stays if above it
        threshold_if_out = top_values[:, k - 1:k]  # the k-th value: e enters if above it
        is_in = noisy_logits > threshold_if_in
        normal = torch.distributions.Normal(torch.zeros((), device=clean.device), torch.ones((), device=clean.device))
        prob_if_in = normal.cdf((clean - threshold_if_in) / std)
        prob_if_out = normal.cdf((clean - threshold_if_out) / std)
        return torch.where(is_in, prob_if_in, prob_if_out)


class TopKPlainGate(TopKGate):
    """The COMET reference's Top-k: x (B, W) -> weights (B, E) with exactly k non-zeros; logits
    x W_g + b (Glorot-uniform W_g, zero b), no noise, no balancing loss."""

    name = "topk_plain"
    bias, init = True, "glorot"

    def __init__(self, num_experts: int, input_dim, k: Optional[int] = 2, **kwargs):
        super().__init__(num_experts, input_dim, k=k, noisy=False, importance_weight=0.0, load_weight=0.0, **kwargs)
