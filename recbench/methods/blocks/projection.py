"""Per-field linear projections d_f -> D for methods whose stored rows are narrower than D.

Mixed-dimension embeddings (and later methods with per-field or per-block widths) store rows of
width ``d_f`` and map them to the model's common dim with a bias-free linear map
``P_f in R^{d_f x D}``: (B, d_f) -> (B, D). A part whose width already equals D needs no
projection and holds no parameter. Projections are small dense parameters (trained with Adam,
``ParamGroup(kind="dense")``) and part of the deployable form, so their bytes are inference bytes.

References: Ginart et al., "Mixed Dimension Embeddings with Application to Memory-Efficient
Recommendation Systems", ISIT 2021 (the projection of each block to the base dim).
"""
from __future__ import annotations

import math
from typing import Dict, Mapping

import torch
from torch import nn

from recbench.types import FP32_BYTES


def projection_parameters(in_dims: Mapping[str, int], out_dim: int) -> int:
    """Closed form: scalars of the projections of parts with ``in_dims`` to ``out_dim``."""
    return int(sum(d * out_dim for d in in_dims.values() if d != out_dim))


def projection_bytes(in_dims: Mapping[str, int], out_dim: int) -> int:
    """Closed form: fp32 bytes of the projections (zero for parts already ``out_dim`` wide)."""
    return projection_parameters(in_dims, out_dim) * FP32_BYTES


def _key(name: str) -> str:
    # ParameterDict keys may not contain "."; field names may.
    return name.replace(".", "\u2024")


class Projections(nn.Module):
    """One bias-free linear map per named part.

    forward(name, x: (B, d_name)) -> (B, D); identity for parts whose width is already D.
    Init: uniform(-1/sqrt(d), 1/sqrt(d)) (``nn.Linear``'s default for its weight), from torch's
    global RNG.
    """

    def __init__(self, in_dims: Mapping[str, int], out_dim: int):
        super().__init__()
        self.in_dims: Dict[str, int] = {k: int(v) for k, v in in_dims.items()}
        self.out_dim = int(out_dim)
        self.weights = nn.ParameterDict()
        for name, d in self.in_dims.items():
            if d <= 0:
                raise ValueError(f"projection {name!r}: input width must be positive, got {d}")
            if d == self.out_dim:
                continue
            bound = 1.0 / math.sqrt(d)
            self.weights[_key(name)] = nn.Parameter(torch.empty(d, self.out_dim).uniform_(-bound, bound))

    def has(self, name: str) -> bool:
        return _key(name) in self.weights

    def forward(self, name: str, x: torch.Tensor) -> torch.Tensor:
        key = _key(name)
        if key not in self.weights:
            return x
        return x @ self.weights[key]

    # ---- measured ----
    def parameter_count(self) -> int:
        return int(sum(p.numel() for p in self.weights.values()))

    def weight_bytes(self) -> int:
        return int(sum(p.numel() * p.element_size() for p in self.weights.values()))
