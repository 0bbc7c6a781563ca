"""``robe``: Random Offset Block Embedding — every embedding read from one shared circular array.

References: Desai, Chou & Shrivastava, "Random Offset Block Embedding (ROBE) for compressed
embedding tables in deep learning recommendation systems", MLSys 2022.

Mechanism: one fp32 array A of M values is shared by every compressed field. The D values of the
embedding of id x of field f are read in blocks of Z (``block_size``) consecutive values: element
i reads A[(h_{f,c}(x) + i mod Z) mod M] with c = floor(i / Z) and h_{f,c} a universal hash into
[0, M) — a random offset per block, wrapping around the end of the array (ROBE-Z). An optional
sign hash g_{f,i}(x) in {-1, +1} multiplies each element (``sign_hash``). The lookup is a gather
with sparse gradients (``F.embedding(..., sparse=True)`` over A viewed as (M, 1)), so no dense
gradient of A is ever built; A is a "sparse" parameter group (Adagrad). A bag pools the per-id
vectors (``recbench.methods.blocks.per_id``).
Budget: M is the knob: inference bytes = M * 4 (+ kept fields in full); M = floor(remaining / 4),
so the ratio lands on the target up to 4 bytes. Training bytes = 2 x (Adagrad state of the array).
Shapes: KJT (F keys, N values) -> indices (N, D) into A -> per-id (N, D) -> KeyedTensor (B, F * D).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from recbench.methods.blocks import hashing_fns
from recbench.methods.base import CompressionMethod, InfeasibleBudget
from recbench.methods.blocks.budget import kept_bytes, land, split_tables, target_bytes
from recbench.methods.blocks.budget import check_auto
from recbench.methods.blocks.per_id import PerIdEmbedding
from recbench.types import FP32_BYTES, Budget, EmbeddingOptimizer, MemoryReport, Plan, TableSpec, full_embedding_bytes


class RobeEmbedding(PerIdEmbedding):
    """ROBE-Z over one circular array. forward: KJT (F keys, B bags) -> KeyedTensor (B, F * D).

    Args:
        size: M, values in the shared array.
        block_size: Z, consecutive values read from one random offset.
        sign_hash: multiply each element by a hashed sign.
        kept: fields that keep their own full table.
        hash_seed: seed of the offset and sign hash parameters.
    """

    breakdown_name = "array"

    def __init__(self, tables: Sequence[TableSpec], dim: int, size: int, block_size: int, sign_hash: bool,
                 kept: Sequence[str], hash_seed: int):
        super().__init__(tables, dim, kept)
        self.size, self.block_size, self.sign_hash = int(size), int(block_size), bool(sign_hash)
        hashing_fns.check_hashable("robe", [(t.name, t.num_embeddings) for t in self.tables], self.size)
        blocks = math.ceil(dim / self.block_size)
        element = torch.arange(dim)
        self.register_buffer("block_of", element // self.block_size, persistent=False)
        self.register_buffer("within", element % self.block_size, persistent=False)
        a, b = hashing_fns.draw(hash_seed, (2, len(self.tables), max(blocks, dim)))
        self.register_buffer("offset_a", a[0, :, :blocks].contiguous(), persistent=False)
        self.register_buffer("offset_b", b[0, :, :blocks].contiguous(), persistent=False)
        self.register_buffer("sign_a", a[1, :, :dim].contiguous(), persistent=False)
        self.register_buffer("sign_b", b[1, :, :dim].contiguous(), persistent=False)
        self.array = nn.Parameter(torch.empty(self.size, 1))
        bound = 1.0 / max(1, self.size // dim) ** 0.5  # DLRM's rule for a table of the same size
        with torch.no_grad():
            self.array.uniform_(-bound, bound)

    def indices(self, fields: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """(N,) fields, ids -> (N, D) positions in the array: (h_{f,c}(x) + i mod Z) mod M."""
        offsets = hashing_fns.universal(ids.unsqueeze(1), self.offset_a[fields], self.offset_b[fields], self.size)
        return torch.remainder(offsets[:, self.block_of] + self.within, self.size)

    def signs(self, fields: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """(N, D) in {-1, +1}: g_{f,i}(x) = 1 - 2 * (universal hash mod 2)."""
        bits = hashing_fns.universal(ids.unsqueeze(1), self.sign_a[fields], self.sign_b[fields], 2)
        return 1.0 - 2.0 * bits.to(torch.float32)

    def encode(self, fields: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        values = F.embedding(self.indices(fields, ids), self.array, sparse=True).squeeze(-1)
        return values * self.signs(fields, ids) if self.sign_hash else values

    def sparse_parameters(self) -> List[nn.Parameter]:
        return [self.array] + super().sparse_parameters()


@dataclass
class RobeSettings:
    """Hyperparameters of ``robe`` (defaults: recbench's ROBE-Z with Z = 32, methods/robe.md "Deviations")."""

    size: Any = "auto"  #: M, values in the shared array, solved from the budget
    block_size: int = 32  #: Z, consecutive values read from one hashed offset (ROBE-Z)
    sign_hash: bool = True  #: multiply each element by a hashed sign in {-1, +1}
    hash_seed: int = 0  #: seed of the offset and sign hash parameters


class Robe(CompressionMethod):
    """ROBE; hyperparameters: ``RobeSettings``."""

    name = "robe"
    settings_class = RobeSettings
    table_backed = False

    def check_settings(self) -> None:
        check_auto(self.name, "size", self.size)
        if int(self.block_size) < 1:
            raise ValueError(f"method 'robe': block_size must be >= 1, got {self.block_size}")
        self.block_size, self.sign_hash, self.hash_seed = int(self.block_size), bool(self.sign_hash), int(self.hash_seed)

    def solve_hparams(self, tables: Sequence[TableSpec], dim: int, budget: Budget) -> Dict[str, Any]:
        compressed, kept = split_tables(tables, budget)
        if not compressed:
            raise InfeasibleBudget(self.name, budget.compression_ratio, 1.0, 1.0,
                                   "every field is below min_rows_to_compress")
        fixed = kept_bytes(kept, dim)
        size = (target_bytes(tables, dim, budget) - fixed) // FP32_BYTES
        full = full_embedding_bytes(tables, dim)
        land(self.name, fixed + max(size, 1) * FP32_BYTES, tables, dim, budget, fixed + FP32_BYTES, full,
             "the kept fields alone exceed the budget" if size < 1 else "")
        return {"size": int(size), "block_size": self.block_size, "sign_hash": self.sign_hash,
                "kept": [t.name for t in kept], "hash_seed": self.hash_seed}

    def memory(self, tables: Sequence[TableSpec], dim: int, hparams: Mapping[str, Any],
               optimizer: EmbeddingOptimizer = EmbeddingOptimizer()) -> MemoryReport:
        kept = [t for t in tables if t.name in set(hparams["kept"])]
        array, fixed = int(hparams["size"]) * FP32_BYTES, kept_bytes(kept, dim)
        return MemoryReport(
            inference_bytes=array + fixed,
            # sparse parameters are trained by Adagrad (training/optim.py): state = one fp32 per value
            training_bytes=2 * (array + fixed),
            parameters=int(hparams["size"]) + sum(t.num_embeddings for t in kept) * dim,
            full_bytes=full_embedding_bytes(tables, dim),
            breakdown={"array": array, "kept": fixed},
        )

    def build(self, tables: Sequence[TableSpec], dim: int, plan: Plan,
              optimizer: EmbeddingOptimizer = EmbeddingOptimizer()) -> RobeEmbedding:
        hp = plan.hparams
        return RobeEmbedding(tables, dim, hp["size"], hp["block_size"], hp["sign_hash"], hp["kept"], self.hash_seed)
