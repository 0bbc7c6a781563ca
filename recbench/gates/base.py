"""The gate contract and the pieces gates share (smooth-step, tree paths, entropy).

A gate maps its routing input x (B, W) (and, for hash routing, the batch's sparse features) to
expert weights (B, E) on the simplex: non-negative, summing to 1, with at most k non-zeros per
sample at inference. ``forward`` returns a ``GateOutput`` of the weights and the gate's
regularisation loss (0 outside training).

Routing input (``input``): ``embeddings`` (default, as the COMET reference routes on its bottom's
output, the concatenated sparse-field embeddings: x (B, F * D)), a list of field names (those
fields' embeddings, (B, len * D); the reference's MovieLens has only ``[user, item]``), or
``over_arch`` (the interaction output the experts consume, (B, W)). The MoE over-arch passes
every available input; the gate picks its own. ``lr`` gives the gate's parameters an Adam
learning rate of their own (``MixtureOfExpertsArch.dense_param_groups``); null trains them
with the dense learning rate.

Every gate computes *components* (B, C, E): C non-negative rows whose total mass is 1 (one row
per selector of DSelect-k, per tree of COMET, per hash function; one row for softmax and Top-k).
The weights are the components summed over C. COMET+'s permutation local search
(``local_search=True``, ``recbench.gates.local_search``) permutes the expert axis of every
component with a learned permutation before the sum, so it applies to every gate.

Inference (``hard=True``, the default in eval mode) is the deployable routing: gates whose
training-form routing is soft until it converges (DSelect-k, COMET) route each selector/tree to
its most probable expert, which equals the training form once routing is exactly 0/1 and
guarantees <= k non-zeros always.

References: Ibrahim et al., "COMET: Learning Cardinality Constrained Mixture of Experts with
Trees and Local Search", KDD 2023; Hazimeh et al., "DSelect-k: Differentiable Selection in the
Mixture of Experts with Applications to Multi-Task Learning", NeurIPS 2021 (smooth-step).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

#: routing inputs a gate may name besides a list of field names
ROUTING_INPUTS = ("embeddings", "over_arch")


@dataclass
class GateOutput:
    """weights: (B, E) simplex rows; loss: scalar regularisation (0 outside training)."""

    weights: torch.Tensor
    loss: torch.Tensor


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


class Gate(nn.Module):
    """Base of every gate.

    Args:
        num_experts: E (>= 2).
        input_dim: W, the width of the routing input; or a mapping {routing input: width} with
            "embeddings" (F * D, all sparse fields) and "over_arch" (the MoE over-arch passes both).
        k: at most k non-zero weights per sample at inference (1 <= k <= E).
        feature_names: the sparse fields of the batch, in KeyedJaggedTensor order (hash routing).
        name: the config's ``name`` (must equal the class's).
        local_search: learn a permutation of the expert order per component (COMET+).
        local_search_steps: training steps over which the permutation is learned; afterwards it is
            frozen at the nearest hard permutation.
        local_search_per_component: one permutation per component (tree/selector/hash); else one shared.
        local_search_entropy_reg: weight of the permutation's entropy regulariser.
        local_search_noise: scale of the Gumbel noise added to the permutation logits.
        local_search_tau_initial / local_search_tau_final: Sinkhorn temperature, annealed log-linearly.
        input: the routing input: "embeddings" | "over_arch" | a list of field names (see the module docstring).
        lr: the Adam learning rate of the gate's parameters (null: the dense learning rate).

    Subclasses set ``name`` and ``sparse_in_training`` and implement ``num_components`` and
    ``components``.
    """

    name = "gate"
    #: True when the training-form weights are exactly k-sparse and zero weights carry no gradient
    #: (so the over-arch may compute only the selected experts while training too)
    sparse_in_training = False

    def __init__(self, num_experts: int, input_dim: Union[int, Mapping[str, int]], k: Optional[int] = None,
                 feature_names: Sequence[str] = (), name: Optional[str] = None,
                 local_search: bool = False, local_search_steps: int = 1000,
                 local_search_per_component: bool = False, local_search_entropy_reg: float = 1e-4,
                 local_search_noise: float = 0.0, local_search_tau_initial: float = 1e-3,
                 local_search_tau_final: float = 1e-7, input: Union[str, Sequence[str]] = "embeddings",
                 lr: Optional[float] = None):
        super().__init__()
        if name is not None and name != self.name:
            raise ValueError(f"conf/gate config names {name!r} but its _target_ is the {self.name!r} gate; "
                             "the config file name, `name` and the class must agree")
        self.feature_names = list(feature_names)
        self.routing_input, self.fields = self._routing(input)
        input_dim = self._input_width(input_dim)
        if lr is not None and not (isinstance(lr, (int, float)) and lr > 0):
            raise ValueError(f"gate {self.name!r}: lr must be a positive number or null (the dense learning rate), got {lr!r}")
        self.learning_rate = None if lr is None else float(lr)
        num_experts = int(num_experts)
        if num_experts < 2:
            raise ValueError(f"gate {self.name!r}: num_experts must be >= 2, got {num_experts}")
        k = num_experts if k is None else int(k)
        if not 1 <= k <= num_experts:
            raise ValueError(f"gate {self.name!r}: k must be in [1, num_experts={num_experts}], got {k}")
        self.num_experts, self.input_dim, self.k = num_experts, input_dim, k
        self.local_search: Optional[nn.Module] = None
        if local_search:
            from recbench.gates.local_search import PermutationLocalSearch

            self.local_search = PermutationLocalSearch(
                num_experts, self.num_components if local_search_per_component else 1, steps=local_search_steps,
                entropy_reg=local_search_entropy_reg, noise=local_search_noise,
                tau_initial=local_search_tau_initial, tau_final=local_search_tau_final)

    def _routing(self, spec) -> Tuple[str, Optional[List[int]]]:
        """``input`` -> (the routing input the MoE over-arch passes, field indices to keep or None)."""
        if isinstance(spec, str):
            if spec not in ROUTING_INPUTS:
                raise ValueError(f"gate {self.name!r}: input must be one of {list(ROUTING_INPUTS)} or a list of "
                                 f"sparse field names, got {spec!r}")
            return spec, None
        names = [str(f) for f in spec]
        unknown = [f for f in names if f not in self.feature_names]
        if not names or unknown or len(set(names)) != len(names):
            raise ValueError(f"gate {self.name!r}: input {names} must list distinct sparse fields of "
                             f"{self.feature_names} (or be one of {list(ROUTING_INPUTS)})")
        return "embeddings", [self.feature_names.index(f) for f in names]

    def _input_width(self, input_dim) -> int:
        """The width of the routing input this gate reads (after its field selection)."""
        if isinstance(input_dim, Mapping):
            if input_dim.get(self.routing_input) is None:
                raise ValueError(f"gate {self.name!r}: input={self.routing_input!r} is not available here "
                                 f"(available: {sorted(k for k, v in input_dim.items() if v is not None)})")
            input_dim = input_dim[self.routing_input]
        input_dim = int(input_dim)
        if self.fields is not None:
            if input_dim % len(self.feature_names):
                raise ValueError(f"gate {self.name!r}: embeddings width {input_dim} is not a multiple of the "
                                 f"{len(self.feature_names)} sparse fields")
            self.field_dim = input_dim // len(self.feature_names)
            input_dim = self.field_dim * len(self.fields)
        return input_dim

    def select(self, x: torch.Tensor) -> torch.Tensor:
        """The routing input (B, F * D) or (B, W) -> the part this gate reads (B, input_dim)."""
        if self.fields is None:
            return x
        index = torch.as_tensor(self.fields, device=x.device)
        return x.view(x.shape[0], len(self.feature_names), self.field_dim).index_select(1, index).flatten(1)

    def saturated_fraction(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """(B,) the fraction of each sample's smooth-step nodes that are exactly 0 or 1 (None for
        gates without smooth-steps)."""
        return None

    @property
    def num_components(self) -> int:
        """C, the number of component rows ``components`` returns."""
        return 1

    @property
    def sparse_training(self) -> bool:
        """The next training-form weights are k-sparse with no gradient through zeros (a soft
        permutation, during the local-search window, breaks that; the frozen hard one does not)."""
        return self.sparse_in_training and (self.local_search is None or not self.local_search.learning)

    def components(self, x: torch.Tensor, features, hard: bool) -> Tuple[torch.Tensor, torch.Tensor]:
        """(B, C, E) non-negative components of total mass 1 per sample, and the regularisation (scalar)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, features=None, hard: Optional[bool] = None) -> GateOutput:
        """x (B, W), features: the batch's KeyedJaggedTensor (hash routing) -> GateOutput((B, E), loss).

        ``hard`` (default: not training) selects the deployable routing."""
        hard = (not self.training) if hard is None else bool(hard)
        x = self.select(x)
        components, loss = self.components(x, features, hard)
        if self.local_search is not None:
            components, permutation_loss = self.local_search(components)
            loss = loss + permutation_loss
        weights = components.sum(dim=1)
        weights = weights / weights.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(weights.dtype).tiny)
        if not self.training:
            loss = torch.zeros((), device=x.device)
        return GateOutput(weights, loss)

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, input_dim={self.input_dim}, k={self.k}, "
                f"input={self.routing_input if self.fields is None else self.fields}, lr={self.learning_rate}")


class SmoothStepGate(Gate):
    """A gate whose routing is made of smooth-steps (DSelect-k, COMET): k components, the
    smooth-step width ``gamma`` and the weight ``entropy_reg`` of the entropy that drives its
    routing to exactly 0/1."""

    def __init__(self, num_experts: int, input_dim: int, k: Optional[int] = 2, gamma: float = 1.0,
                 entropy_reg: float = 0.1, **kwargs):
        super().__init__(num_experts, input_dim, k=k, **kwargs)
        if not gamma > 0:
            raise ValueError(f"gate {self.name!r}: gamma must be > 0, got {gamma}")
        if entropy_reg < 0:
            raise ValueError(f"gate {self.name!r}: entropy_reg must be >= 0, got {entropy_reg}")
        self.gamma, self.entropy_reg = float(gamma), float(entropy_reg)

    @property
    def num_components(self) -> int:
        return self.k

    def node_activations(self, x: torch.Tensor) -> torch.Tensor:
        """(B, k, N) the smooth-step outputs of the k components' N nodes (tree nodes or code bits)."""
        raise NotImplementedError

    def saturated_fraction(self, x: torch.Tensor) -> torch.Tensor:
        return saturated(self.node_activations(self.select(x)))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, gamma={self.gamma:g}, entropy_reg={self.entropy_reg:g}"
