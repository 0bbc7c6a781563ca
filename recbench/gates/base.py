"""The gate contract: ``Gate`` and ``SmoothStepGate`` (their tensor functions: ``recbench.gates.functional``).

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
(``gate.local_search.enabled=true``, ``recbench.gates.local_search``) permutes the expert axis of
every component with a learned permutation before the sum, so it applies to every gate.

Inference (``hard=True``, the default in eval mode) is the deployable routing: gates whose
training-form routing is soft until it converges (DSelect-k, COMET) route each selector/tree to
its most probable expert, which equals the training form once routing is exactly 0/1 and
guarantees <= k non-zeros always.

References: Ibrahim et al., "COMET: Learning Cardinality Constrained Mixture of Experts with
Trees and Local Search", KDD 2023; Hazimeh et al., "DSelect-k: Differentiable Selection in the
Mixture of Experts with Applications to Multi-Task Learning", NeurIPS 2021 (smooth-step).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from recbench.gates.functional import saturated
from recbench.gates.local_search import PermutationLocalSearch
from recbench.gates.settings import LocalSearchSettings

#: routing inputs a gate may name besides a list of field names
ROUTING_INPUTS = ("embeddings", "over_arch")


@dataclass
class GateOutput:
    """weights: (B, E) simplex rows; loss: scalar regularisation (0 outside training)."""

    weights: torch.Tensor
    loss: torch.Tensor


class Gate(nn.Module):
    """Base of every gate.

    Args:
        num_experts: E (>= 2).
        input_dim: W, the width of the routing input; or a mapping {routing input: width} with
            "embeddings" (F * D, all sparse fields) and "over_arch" (the MoE over-arch passes both).
        k: at most k non-zero weights per sample at inference (1 <= k <= E).
        feature_names: the sparse fields of the batch, in KeyedJaggedTensor order (hash routing).
        name: the config's ``name`` (must equal the class's).
        local_search: COMET+'s learned permutation of the expert order, a ``LocalSearchSettings``
            or the mapping ``gate.local_search`` of its fields (None: disabled).
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
                 local_search: Union[LocalSearchSettings, Mapping[str, Any], None] = None,
                 input: Union[str, Sequence[str]] = "embeddings",
                 lr: Optional[float] = None):
        super().__init__()
        if name is not None and name != self.name:
            raise ValueError(f"recbench/conf/gate config names {name!r} but its _target_ is the {self.name!r} gate; "
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
        self.local_search = PermutationLocalSearch.of(LocalSearchSettings.of(local_search), num_experts,
                                                      self.num_components)

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
