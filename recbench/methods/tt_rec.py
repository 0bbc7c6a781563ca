"""``tt_rec``: TT-Rec — tensor-train embedding tables.

References: Yin, Acun, Wu, Liu, "TT-Rec: Tensor Train Compression for Deep Learning
Recommendation Model Embeddings", MLSys 2021 (arXiv:2101.11714); Hsword/Hetu
tools/EmbeddingMemoryCompression methods/layers/tensortrain.py and methods/scheduler/tensortrain.py
(commit a1cb1bc, the VLDB 2024 artifact); facebookresearch/FBTT-Embedding tt_embeddings_ops.py
(commit b95947c, ``weight_dist="approx-normal"``).

Mechanism (Hetu's layout): a field with n rows is a virtual (N0 N1 N2) x (d0 d1 d2) matrix,
n <= N0 N1 N2, with m1 = ceil(n^(1/3)), m2 = ceil(sqrt(n / m1)), m3 = ceil(n / m1 / m2) and
(N0, N1, N2) = (m3, m2, m1); D = d0 d1 d2 as Hetu's ``_get_decomp_dim`` (powers of two >= 8:
start at (2, 2, 2) and double d2, d1, d0, d2, ... in turn; else the divisor nearest D^(1/3) and so
on, sorted). The cores are G0 (N0, d0, r), G1 (N1, r, d1, r), G2 (N2, r, d2) of rank r. Id i has
digits i0 = i mod N0, i1 = (i // N0) mod N1, i2 = i // (N0 N1) (the least significant digit
indexes the first core) and row W[i] = G0[i0] x G1[i1] x G2[i2] contracted over the ranks,
reshaped (d0, d1, d2) -> D. fbgemm_gpu 1.8.0's CPU build has no TT ops, so the lookup contracts the
core slices with batched GEMMs (as FBTT's kernels do), each distinct id of the batch once: G0[i0]
G1[i1] per distinct prefix (i0, i1), times G2[i2] per distinct id; the rows are gathered back to
the N values, then segment-summed into the bags (divided for mean pooling). Cores are small dense
parameters (Adam).

Init (``init``): ``hetu`` (default) draws every core entry from Hetu's reversed truncated normal —
z ~ N(0, 1) conditioned on |z| >= 2 — times s = (3 / (N0 N1 N2))^(1/6); ``fbtt`` is FBTT-Embedding's
"approx-normal", the same tails times (3 n)^(-1/6); ``variance_matched`` draws N(0, s^2) with
s = (3 n r^2)^(-1/6) so a reconstructed entry has the variance 1 / (3 n) of a uniform(+-1/sqrt(n))
table. A reconstructed entry is a sum of r^2 products of three independent core entries, so its
variance is r^2 (v s^2)^3 with v = E[z^2 | |z| >= 2] (``TAIL_VARIANCE``; v = 1 for the Gaussian).

Budget: the rank r (shared by all TT fields) is the largest whose bytes fit the target
(``budget.largest_integer_within``), as Hetu's ``_get_rank``; a field whose cores would not be
smaller than its plain table, or with fewer than ``budget.min_rows_to_compress`` rows, stays a
plain FBGEMM table.

Shapes: KJT with F keys, B bags per key -> KeyedTensor (B, F * D).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from recbench.methods.blocks import budget as budget_lib
from recbench.methods.base import CompressionMethod, EmbeddingModule, ParamGroup
from recbench.methods.blocks.tables import FusedTables, PhysicalTable
from recbench.types import FP32_BYTES, Budget, EmbeddingOptimizer, MemoryReport, Plan, TableSpec, full_embedding_bytes

MAX_RANK = 1024
INITS = ("hetu", "fbtt", "variance_matched")
#: |z| >= TAIL for the reversed truncated normal of Hetu and FBTT.
TAIL = 2.0
#: E[z^2 | |z| >= 2] for z ~ N(0, 1): 1 + 2 phi(2) / Q(2).
TAIL_VARIANCE = 1.0 + TAIL * math.exp(-TAIL * TAIL / 2) / math.sqrt(2 * math.pi) / (0.5 * math.erfc(TAIL / math.sqrt(2)))


def row_factors(num_embeddings: int) -> Tuple[int, int, int]:
    """(N0, N1, N2), the rows of the three cores, as Hetu's ``_get_decomp_emb``; N0 N1 N2 >= n."""
    m1 = math.ceil(num_embeddings ** (1.0 / 3.0))
    m2 = math.ceil((num_embeddings / m1) ** 0.5)
    m3 = math.ceil(num_embeddings / m1 / m2)
    return m3, m2, m1


def balanced_dim_factors(dim: int) -> Tuple[int, int, int]:
    """d0 <= d1 <= d2 with d0 d1 d2 = D, the most balanced factorisation."""
    best = None
    for d1 in range(1, dim + 1):
        if dim % d1:
            continue
        for d2 in range(d1, dim // d1 + 1):
            if (dim // d1) % d2 or dim // d1 // d2 < d2:
                continue
            d3 = dim // d1 // d2
            if best is None or d3 - d1 < best[2] - best[0]:
                best = (d1, d2, d3)
    return best


def dim_factors(dim: int) -> Tuple[int, int, int]:
    """(d0, d1, d2) as Hetu's ``_get_decomp_dim``; powers of two below 8 (Hetu asserts) use the balanced split."""
    if dim & (dim - 1) == 0:
        if dim < 8:
            return balanced_dim_factors(dim)
        factors, position, rest = [2, 2, 2], 2, dim // 8
        while rest != 1:
            factors[position] *= 2
            rest //= 2
            position = (position - 1) % 3
        return tuple(factors)
    first = math.ceil(dim ** (1.0 / 3.0))
    while dim % first:
        first -= 1
    rest = dim // first
    second = math.ceil(rest ** 0.5)
    while rest % second:
        second -= 1
    return tuple(sorted([first, second, rest // second]))


def core_parameters(num_embeddings: int, dim: int, rank: int) -> int:
    (n0, n1, n2), (d0, d1, d2) = row_factors(num_embeddings), dim_factors(dim)
    return n0 * d0 * rank + n1 * rank * d1 * rank + n2 * rank * d2


def tt_fields(tables: Sequence[TableSpec], dim: int, budget: Budget, rank: int) -> List[str]:
    compressed, _ = budget_lib.split_tables(tables, budget)
    return [t.name for t in compressed if core_parameters(t.num_embeddings, dim, rank) < t.num_embeddings * dim]


def core_scale(init: str, num_embeddings: int, rank: int) -> float:
    """The scale s of every core entry (see the module docstring)."""
    if init == "hetu":
        return (3.0 / math.prod(row_factors(num_embeddings))) ** (1.0 / 6.0)
    if init == "fbtt":
        return (3.0 * num_embeddings) ** (-1.0 / 6.0)
    return (3.0 * num_embeddings * rank * rank) ** (-1.0 / 6.0)


def entry_std(init: str, num_embeddings: int, rank: int) -> float:
    """Std of a reconstructed table entry at init: r (v s^2)^(3/2)."""
    tail = 1.0 if init == "variance_matched" else TAIL_VARIANCE
    return rank * (tail * core_scale(init, num_embeddings, rank) ** 2) ** 1.5


def reversed_truncated_normal(shape: Sequence[int]) -> torch.Tensor:
    """z ~ N(0, 1) conditioned on |z| >= 2, by inverting the tail's CDF: float32 of ``shape``."""
    tail_mass = 0.5 * math.erfc(TAIL / math.sqrt(2))  # P(z <= -2)
    u = torch.rand(tuple(shape), dtype=torch.float64).clamp_(min=1e-300)
    sign = torch.where(torch.rand(tuple(shape)) < 0.5, -1.0, 1.0).to(torch.float64)
    return (sign * torch.special.ndtri(u * tail_mass)).to(torch.float32)


class TTCores(nn.Module):
    """Three TT cores of one field. forward(ids: (N,)) -> rows (N, D)."""

    def __init__(self, num_embeddings: int, dim: int, rank: int, init: str = "hetu"):
        super().__init__()
        (self.n0, self.n1, self.n2), (d0, d1, d2) = row_factors(num_embeddings), dim_factors(dim)
        self.dim, self.rank = dim, rank
        shapes = [(self.n0, d0, rank), (self.n1, rank, d1, rank), (self.n2, rank, d2)]
        scale = core_scale(init, num_embeddings, rank)
        draw = torch.randn if init == "variance_matched" else reversed_truncated_normal
        self.core1, self.core2, self.core3 = (nn.Parameter(draw(shape) * scale) for shape in shapes)

    def digits(self, ids: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(N,) ids -> the core rows (i0, i1, i2), least significant digit first."""
        return ids % self.n0, (ids // self.n0) % self.n1, ids // (self.n0 * self.n1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """(N,) ids -> (N, D): each distinct id's row is contracted once (``unique_rows``) and gathered."""
        unique, inverse = torch.unique(ids, return_inverse=True)
        return self.unique_rows(unique).index_select(0, inverse)

    def unique_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """(U,) distinct ids -> (U, D): the product G0[i0] G1[i1] (d0, d1 r) of each distinct prefix
        (i0, i1) by one batched GEMM, then times G2[i2] (r, d2) per id by another. Each row is the
        same two contractions as ``W[i]`` above."""
        block = self.n0 * self.n1  # gathers by index_select: their gradients are index_add sums
        prefixes, prefix_of_id = torch.unique(ids % block, return_inverse=True)
        core1, core2 = self.core1.index_select(0, prefixes % self.n0), self.core2.index_select(0, prefixes // self.n0)
        left = torch.bmm(core1, core2.flatten(2))  # (P, d0, d1 r)
        left = left.view(len(prefixes), -1, self.rank).index_select(0, prefix_of_id)  # (U, d0 d1, r)
        return torch.bmm(left, self.core3.index_select(0, ids // block)).reshape(len(ids), self.dim)

    def full_table(self) -> torch.Tensor:
        """The whole virtual (N0 N1 N2, D) table in id order (tests and small fields only)."""
        return self(torch.arange(self.n0 * self.n1 * self.n2))


class _TTForward(nn.Module):
    def __init__(self, tables: Sequence[TableSpec], dim: int, cores: nn.ModuleDict, plain: Optional[nn.Module]):
        super().__init__()
        self.tables, self.dim, self.cores, self.plain = list(tables), dim, cores, plain

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        jagged = features.to_dict()
        batch = features.stride()
        plain_out = {}
        if self.plain is not None:
            order = self.plain.feature_order
            kjt = KeyedJaggedTensor(keys=list(order), values=torch.cat([jagged[k].values() for k in order]),
                                    lengths=torch.cat([jagged[k].lengths() for k in order]))
            plain_out = self.plain(kjt).to_dict()
        blocks = []
        for t in self.tables:
            if t.name not in self.cores:
                blocks.append(plain_out[t.name])
                continue
            values, lengths = jagged[t.name].values(), jagged[t.name].lengths().to(torch.long)
            rows = self.cores[t.name](values)
            bag = torch.repeat_interleave(torch.arange(batch), lengths)
            pooled = torch.zeros(batch, self.dim, dtype=rows.dtype).index_add_(0, bag, rows)
            if t.pooling == "mean":
                pooled = pooled / lengths.clamp(min=1).to(rows.dtype).unsqueeze(1)
            blocks.append(pooled)
        return KeyedTensor(keys=[t.name for t in self.tables], length_per_key=[self.dim] * len(self.tables),
                           values=torch.cat(blocks, dim=1))


class TTRecEmbedding(EmbeddingModule):
    """TT cores for large fields, plain fused tables for the rest. forward: KJT -> (B, F * D)."""

    def __init__(self, tables: Sequence[TableSpec], dim: int, hparams: Mapping[str, Any],
                 optimizer: EmbeddingOptimizer):
        super().__init__(tables, dim)
        self.hparams = dict(hparams)
        rank, tt = int(hparams["rank"]), set(hparams["tt_fields"])
        self.cores = nn.ModuleDict({t.name: TTCores(t.num_embeddings, dim, rank, self.hparams.get("init", "hetu")) for t in tables if t.name in tt})
        plain = [PhysicalTable(t.name, t.num_embeddings, dim, [t.name], t.pooling) for t in tables if t.name not in tt]
        self.plain = FusedTables(plain, optimizer) if plain else None
        self.core = _TTForward(tables, dim, self.cores, self.plain)

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        return self.core(features)

    def fused_optimizer(self):
        return self.plain.fused_optimizer() if self.plain is not None else None

    def fused_parameters(self):
        return self.plain.fused_parameters() if self.plain is not None else []

    def param_groups(self) -> List[ParamGroup]:
        params = list(self.cores.parameters())
        return [ParamGroup("tt_cores", params)] if params else []

    def memory_report(self) -> MemoryReport:
        cores = sum(p.numel() * p.element_size() for p in self.cores.parameters())
        plain = self.plain.weight_bytes() if self.plain is not None else 0
        state = self.plain.optimizer_state_bytes() if self.plain is not None else 0
        return MemoryReport(
            inference_bytes=cores + plain, training_bytes=cores + plain + state + 2 * cores,  # Adam: 2 moments
            parameters=sum(p.numel() for p in self.cores.parameters()) + sum(p.numel() for p in self.fused_parameters()),
            full_bytes=full_embedding_bytes(self.tables, self.dim), breakdown={"tt_cores": cores, "weights": plain},
        )

    def to_inference(self) -> nn.Module:
        plain = self.plain.unfused_copy() if self.plain is not None else None
        return _TTForward(self.tables, self.dim, copy.deepcopy(self.cores), plain).eval()


@dataclass
class TTRecSettings:
    """Hyperparameters of ``tt_rec`` (defaults: Hetu's VLDB 2024 layout and initialisation)."""

    rank: Any = "auto"  #: TT rank shared by every TT field, solved from the budget (or a positive integer)
    init: str = "hetu"  #: hetu (reversed truncated normal, Hetu) | fbtt (FBTT approx-normal) | variance_matched


class TTRec(CompressionMethod):
    """TT-Rec; hyperparameters: ``TTRecSettings``."""

    name = "tt_rec"
    settings_class = TTRecSettings
    table_backed = False

    def check_settings(self) -> None:
        rank, init = self.rank, self.init
        if rank != "auto" and not (isinstance(rank, int) and rank >= 1):
            raise ValueError(f"method 'tt_rec': rank={rank!r}; allowed: 'auto' or a positive integer")
        if init not in INITS:
            raise ValueError(f"method 'tt_rec': init={init!r}; allowed: {', '.join(INITS)}")

    def _hparams(self, tables, dim, budget, rank: int) -> Dict[str, Any]:
        return {"rank": int(rank), "tt_fields": tt_fields(tables, dim, budget, rank), "init": self.init}

    def solve_hparams(self, tables: Sequence[TableSpec], dim: int, budget: Budget) -> Dict[str, Any]:
        target = budget_lib.target_bytes(tables, dim, budget)

        def total(rank: int) -> int:
            return self.memory(tables, dim, self._hparams(tables, dim, budget, rank)).inference_bytes

        lowest, highest = total(1), full_embedding_bytes(tables, dim)
        if self.rank != "auto":
            hp = self._hparams(tables, dim, budget, int(self.rank))
            if total(int(self.rank)) > target:
                budget_lib.land(self.name, total(int(self.rank)), tables, dim, budget, lowest, highest,
                                f"rank={self.rank} exceeds the budget")
            return hp
        rank = max(budget_lib.largest_integer_within(total, 1, MAX_RANK, target), 1)
        budget_lib.land(self.name, total(rank), tables, dim, budget, lowest, highest)
        return self._hparams(tables, dim, budget, rank)

    def memory(self, tables: Sequence[TableSpec], dim: int, hparams: Mapping[str, Any],
               optimizer: EmbeddingOptimizer = EmbeddingOptimizer()) -> MemoryReport:
        tt = set(hparams["tt_fields"])
        core_params = sum(core_parameters(t.num_embeddings, dim, hparams["rank"]) for t in tables if t.name in tt)
        plain_rows = sum(t.num_embeddings for t in tables if t.name not in tt)
        cores, plain = core_params * FP32_BYTES, plain_rows * dim * FP32_BYTES
        state = plain_rows * optimizer.state_bytes_per_row(dim)
        return MemoryReport(
            inference_bytes=int(cores + plain), training_bytes=int(cores + plain + state + 2 * cores),
            parameters=int(core_params + plain_rows * dim), full_bytes=full_embedding_bytes(tables, dim),
            breakdown={"tt_cores": int(cores), "weights": int(plain)},
        )

    def build(self, tables: Sequence[TableSpec], dim: int, plan: Plan,
              optimizer: EmbeddingOptimizer = EmbeddingOptimizer()) -> TTRecEmbedding:
        return TTRecEmbedding(tables, dim, plan.hparams, optimizer)
