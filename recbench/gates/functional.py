"""Stateless tensor functions the gates share: smooth-step, tree routes, binary codes, route
products, the most probable route, entropy and saturation.

Shapes: B samples, C components (trees/selectors), N decisions per component (tree nodes or code
bits), L leaves (experts).

References: Hazimeh et al., "DSelect-k: Differentiable Selection in the Mixture of Experts with
Applications to Multi-Task Learning", NeurIPS 2021 (smooth-step); Ibrahim et al., "COMET:
Learning Cardinality Constrained Mixture of Experts with Trees and Local Search", KDD 2023
(tree routes, entropy); mazumder-lab/COMET ``model/gates/comet.py`` and google-research
``dselect_k_moe/dselect_k_moe.py`` (EPSILON = 1e-6).
"""
from __future__ import annotations

import math

import torch


def smooth_step(z: torch.Tensor, gamma: float) -> torch.Tensor:
    """Hazimeh et al.'s smooth-step: 0 for z <= -gamma/2, 1 for z >= gamma/2, and the cubic
    -2 z^3 / gamma^3 + 3 z / (2 gamma) + 1/2 in between (C^1, so gradients flow in the middle and
    vanish exactly where the step is saturated)."""
    half = gamma / 2.0
    cubic = (-2.0 / gamma**3) * z**3 + (3.0 / (2.0 * gamma)) * z + 0.5
    return torch.where(z <= -half, torch.zeros_like(z), torch.where(z >= half, torch.ones_like(z), cubic))


def heap_paths(num_leaves: int) -> torch.Tensor:
    """Root-to-leaf routes of a binary tree with ``num_leaves`` leaves in heap order.

    Internal nodes are 0 .. L-2 (children of n: 2n+1 left, 2n+2 right), leaves L-1 .. 2L-2, leaf
    j is expert j. Returns int8 (L, L-1): +1 where the path to leaf j goes left at node n, -1
    where it goes right, 0 where n is not on the path. With L = 2^m this is the complete tree of
    depth m; otherwise leaves sit at depths floor/ceil(log2 L)."""
    if num_leaves < 2:
        raise ValueError(f"a routing tree needs at least 2 leaves, got {num_leaves}")
    paths = torch.zeros(num_leaves, num_leaves - 1, dtype=torch.int8)
    for leaf in range(num_leaves):
        node = num_leaves - 1 + leaf
        while node > 0:
            parent = (node - 1) // 2
            paths[leaf, parent] = 1 if node == 2 * parent + 1 else -1
            node = parent
    return paths


def binary_codes(num_experts: int) -> torch.Tensor:
    """int8 (E, m), m = ceil(log2 E): +1 where bit b (most significant first) of i is 1, -1 where 0.

    DSelect-k's single-expert selector gives expert i the product over bits of s_b (bit 1) or
    1 - s_b (bit 0); in ``route_products``' convention a bit 1 is "left" (factor s)."""
    bits = max(1, math.ceil(math.log2(num_experts)))
    codes = torch.tensor([[1 if (i >> (bits - 1 - b)) & 1 else -1 for b in range(bits)] for i in range(num_experts)],
                         dtype=torch.int8)
    return codes


def route_products(probabilities: torch.Tensor, routes: torch.Tensor) -> torch.Tensor:
    """Probability of reaching each leaf.

    probabilities: (B, C, N) probability of going left at each of N decisions, for C routers.
    routes: (L, N) int8, +1 left / -1 right / 0 not on the route.
    Returns (B, C, L): the product along each route (exact zeros where a factor is 0)."""
    p = probabilities.unsqueeze(2)  # (B, C, 1, N)
    factors = torch.where(routes == 1, p, torch.where(routes == -1, 1.0 - p, torch.ones_like(p)))
    return factors.prod(dim=-1)


def most_probable(probabilities: torch.Tensor) -> torch.Tensor:
    """One-hot (same shape) of the argmax over the last axis: the deployable form of a soft router."""
    index = probabilities.argmax(dim=-1, keepdim=True)
    return torch.zeros_like(probabilities).scatter_(-1, index, 1.0)


def entropy(probabilities: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """-sum p log(p + eps) over the last axis (same leading shape), the references' entropy with
    their EPSILON = 1e-6 (COMET ``model/gates/comet.py``, DSelect-k ``dselect_k_moe.py``)."""
    return -(probabilities * torch.log(probabilities + eps)).sum(dim=-1)


def saturated(activations: torch.Tensor) -> torch.Tensor:
    """(B, ...) smooth-step outputs -> (B,) the fraction of each sample's activations that are
    exactly 0 or 1 (no gradient reaches a saturated node)."""
    flat = activations.flatten(1)
    return ((flat == 0) | (flat == 1)).float().mean(dim=1)
