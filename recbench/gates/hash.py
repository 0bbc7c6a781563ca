"""``hash``: hash routing by an id field (no learned router).

Each sample is routed by the id of one sparse field (``field``; default the first field, the
user on MovieLens): k independent universal hash functions h_1..h_k map the id to experts and
each gets weight 1/k (two functions that collide give their expert 2/k), so at most k experts
per sample in training and at inference, with no gate parameters and no regularisation. A
multi-hot field routes on the first id of its bag; an empty bag routes as the OOV id 0.

References: Roller et al., "Hash Layers For Large Sparse Models", NeurIPS 2021 (random hash
routing; k functions generalise its top-1 routing to k experts); the hash family is
``recbench.methods.blocks.hashing_fns.universal`` (Carter & Wegman 1979).
"""
from __future__ import annotations

from typing import Optional

import torch

from recbench.gates.base import Gate
from recbench.methods.blocks.hashing_fns import draw, universal


def first_ids(features, field: str) -> torch.Tensor:
    """(B,) the first id of each sample's bag in ``field`` of a KeyedJaggedTensor (0 for an empty bag)."""
    jagged = features[field]
    values, lengths = jagged.values(), jagged.lengths()
    if values.numel() == 0:
        return torch.zeros(lengths.shape[0], dtype=torch.int64, device=lengths.device)
    starts = jagged.offsets()[:-1].clamp(max=values.numel() - 1)
    return torch.where(lengths > 0, values[starts].long(), torch.zeros_like(starts, dtype=torch.int64))


class HashGate(Gate):
    """Hash routing: (x (B, W), features) -> weights (B, E), 1/k on each of the k hashed experts.

    Args (besides ``Gate``'s): field (sparse field to route on; None: the first), seed (of the
    hash functions).
    """

    name = "hash"
    sparse_in_training = True

    def __init__(self, num_experts: int, input_dim, k: Optional[int] = 1, field: Optional[str] = None,
                 seed: int = 0, **kwargs):
        kwargs.setdefault("input", "over_arch")  # routes on ids; the dense input is never read
        super().__init__(num_experts, input_dim, k=k, **kwargs)
        if not self.feature_names:
            raise ValueError("gate 'hash' needs the batch's sparse field names (the model passes its embedding's)")
        if field is None:
            field = self.feature_names[0]
        if field not in self.feature_names:
            raise ValueError(f"gate.field={field!r} is not a sparse field of this dataset; allowed: {self.feature_names}")
        self.field, self.seed = field, int(seed)
        a, b = draw(self.seed, (1, self.k))
        self.register_buffer("a", a, persistent=False)
        self.register_buffer("b", b, persistent=False)

    @property
    def num_components(self) -> int:
        return self.k

    def components(self, x, features, hard):
        if features is None:
            raise ValueError("gate 'hash' routes on the batch's sparse features; pass them to the gate")
        experts = universal(first_ids(features, self.field).unsqueeze(1), self.a, self.b, self.num_experts)  # (B, k)
        one_hot = torch.nn.functional.one_hot(experts, self.num_experts).to(x.dtype)
        return one_hot / self.k, torch.zeros((), device=x.device)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, field={self.field!r}, seed={self.seed}"
