"""``mixed_dim``: mixed-dimension embeddings (power-law widths by popularity, projected to D).

References: Ginart, Naumov, Mudigere, Yang, Zou, "Mixed Dimension Embeddings with Application to
Memory-Efficient Recommendation Systems", ISIT 2021 (arXiv:1909.11810); facebookresearch/dlrm
``tricks/md_embedding_bag.py`` (``md_solver``, ``PrEmbeddingBag``) @ 090956e; Hsword/Hetu
``tools/EmbeddingMemoryCompression/methods/scheduler/md.py`` and ``methods/layers/mde.py`` @ a1cb1bc.

Mechanism: every compressed field is one block (``blocks_per_field: auto``, the references'
blocking: one table per field), or is split into ``blocks_per_field`` blocks of equal row count by
descending training count (``TableSpec.counts``). Block i has popularity p_i: 1/n of its field
(``popularity: rows``, the references' proxy) or the mean training count per row of the block
(``popularity: counts``). Its width follows the power law d_i = D (p_i / max_j p_j)^alpha (the most
popular block keeps D, DLRM's ``d0`` anchor), floored at ``min_dim`` (1), rounded to the nearest
integer and then to the nearest power of two (``rounding: pow2``, DLRM/Hetu ``round_dim=True``),
never above D. A block is a table of width d_i and, when d_i < D, a bias-free projection
P_i (d_i x D): a bag is sum_ids W_i[id] @ P_i (pooling commutes with the linear map). Widths that
are multiples of 4 live in FBGEMM tables (fused optimizer); narrower or odd widths live in plain
``F.embedding_bag`` tables with row-sparse gradients (Adagrad, ``ParamGroup(kind="sparse")``).

Budget: ``alpha: auto`` is bisected in [0, 1] with step 1e-3 as Hetu's
``get_dims_from_compress_rate`` (bytes = tables + projections + remap); the solver returns the
feasible end of the final bracket, so bytes never exceed the target. The floor is every block but
the anchor at ``min_dim`` (alpha = 1); below it the budget is infeasible.

Shapes: KJT with F keys, B bags per key -> KeyedTensor (B, F * D); block i: (B, d_i) -> (B, D).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from recbench.methods.blocks import budget as budget_lib
from recbench.methods.base import CompressionMethod, EmbeddingModule, InfeasibleBudget, ParamGroup
from recbench.methods.blocks.projection import Projections, projection_bytes, projection_parameters
from recbench.methods.blocks.projection import _key as _pkey  # ParameterDict key of a name holding "."
from recbench.methods.blocks.tables import FusedTables, PhysicalTable
from recbench.types import FP32_BYTES, Budget, EmbeddingOptimizer, MemoryReport, Plan, TableSpec, full_embedding_bytes

REMAP_BYTES = 4  # int32 frequency rank per id, held only by fields split into several blocks
ALPHA_RANGE = (0.0, 1.0)  # Hetu's bisection interval
ALPHA_EPS = 1e-3  # Hetu's bisection stop width
ROUNDINGS = ("pow2", "nearest", "multiple_of_4")
POPULARITIES = ("rows", "counts")
INITS = ("hetu", "dlrm", "uniform_rows")


# ----------------------------------------------------------------------------- pure helpers
def block_rows(num_embeddings: int, blocks: int) -> List[int]:
    """Rows per block: equal blocks of ceil(n / blocks) rows, the last one smaller."""
    size = -(-num_embeddings // blocks)
    return [min(size, num_embeddings - j * size) for j in range(-(-num_embeddings // size))]


def frequency_order(table: TableSpec) -> np.ndarray:
    """Ids by descending training count (ties by id)."""
    return np.lexsort((np.arange(table.num_embeddings), -np.asarray(table.counts)))


def block_popularity(table: TableSpec, blocks: int, popularity: str) -> List[float]:
    """Popularity of each block of ``table``: 1/n (``rows``) or the mean training count per row."""
    rows = block_rows(table.num_embeddings, blocks)
    if popularity == "rows":
        return [1.0 / table.num_embeddings] * len(rows)
    if table.counts is None:
        raise ValueError(f"mixed_dim: popularity=counts needs training counts of field {table.name!r} "
                         "(TableSpec.counts); use popularity=rows for the 1/n proxy")
    sorted_counts = np.asarray(table.counts, dtype=np.float64)[frequency_order(table)]
    bounds = np.cumsum([0] + rows)
    return [float(sorted_counts[a:b].mean()) for a, b in zip(bounds[:-1], bounds[1:])]


def raw_dims(popularity: Sequence[float], alpha: float, dim: int) -> np.ndarray:
    """The power law before rounding: d_i = D (p_i / max_j p_j)^alpha (the most popular keeps D)."""
    p = np.asarray(popularity, dtype=np.float64)
    return dim * (p / p.max()) ** alpha


def round_dims(raw: np.ndarray, dim: int, min_dim: int, rounding: str = "pow2") -> np.ndarray:
    """Integer widths in [min_dim, D]: ``pow2`` = 2^round(log2(round(max(raw, min_dim)))) (DLRM's
    ``pow_2_round`` after ``alpha_power_rule``), ``nearest`` = round(max(raw, min_dim)),
    ``multiple_of_4`` = nearest multiple of 4."""
    raw = np.asarray(raw, dtype=np.float64)
    if rounding == "multiple_of_4":
        d = np.round(raw / 4.0) * 4
    else:
        d = np.round(np.maximum(raw, min_dim))
        if rounding == "pow2":
            d = 2.0 ** np.round(np.log2(d))
    return np.clip(d, min_dim, dim).astype(np.int64)


def bisect_alpha(bytes_of, target: float, low: float = ALPHA_RANGE[0], high: float = ALPHA_RANGE[1],
                 eps: float = ALPHA_EPS) -> Tuple[float, float]:
    """Hetu's ``binary_search`` on alpha: (left, right) with bytes(left) > target >= bytes(right)
    and right - left <= eps (a midpoint landing exactly on the target counts as feasible)."""
    left, right = low, high
    while right - left > eps:
        middle = (left + right) / 2
        if bytes_of(middle) > target:
            left = middle
        else:
            right = middle
    return left, right


def fbgemm_width(d: int) -> bool:
    return d % 4 == 0


# ----------------------------------------------------------------------------- module
class PlainTables(nn.Module):
    """Tables whose width FBGEMM cannot hold (not a multiple of 4): ``F.embedding_bag`` (SUM) with
    row-sparse gradients. forward({name: (ids (N,), lengths (B,))}) -> {name: (B, d_name)}."""

    def __init__(self, tables: Sequence[PhysicalTable]):
        super().__init__()
        self.physical = list(tables)
        # initialised by the owner (``MixedDimEmbedding``), like the FBGEMM tables
        self.weights = nn.ParameterDict({_pkey(t.name): nn.Parameter(torch.zeros(t.rows, t.dim)) for t in tables})

    def weight(self, name: str) -> nn.Parameter:
        return self.weights[_pkey(name)]

    def forward(self, inputs: Mapping[str, Tuple[torch.Tensor, torch.Tensor]]) -> Dict[str, torch.Tensor]:
        out = {}
        for t in self.physical:
            ids, lengths = inputs[t.name]
            offsets = torch.cat([lengths.new_zeros(1), torch.cumsum(lengths, 0)[:-1]]).to(torch.long)
            out[t.name] = F.embedding_bag(ids.to(torch.long), self.weight(t.name), offsets, mode="sum", sparse=True)
        return out

    def weight_bytes(self) -> int:
        return int(sum(p.numel() * p.element_size() for p in self.weights.values()))


class _MDForward(nn.Module):
    """Block lookups (FBGEMM for widths that are multiples of 4, plain otherwise) + projections."""

    def __init__(self, tables: Sequence[TableSpec], dim: int, hparams: Mapping[str, Any], lookup: Optional[nn.Module],
                 plain: PlainTables, projections: Projections, ranks: Mapping[str, torch.Tensor]):
        super().__init__()
        self.tables, self.dim = list(tables), int(dim)
        self.block_rows: Dict[str, List[int]] = {k: list(v) for k, v in hparams["block_rows"].items()}
        self.lookup, self.plain, self.projections = lookup, plain, projections
        self.rank_names = {}
        for name, rank in ranks.items():
            buffer = "rank_" + name.replace(".", "_")
            self.register_buffer(buffer, rank)
            self.rank_names[name] = buffer

    def block_inputs(self, features: KeyedJaggedTensor) -> Dict[str, tuple]:
        """{block key: (local ids, lengths (B,))}, routing each id to its frequency block."""
        jagged = features.to_dict()
        batch = features.stride()
        inputs: Dict[str, tuple] = {}
        for t in self.tables:
            values, lengths = jagged[t.name].values(), jagged[t.name].lengths()
            rows = self.block_rows[t.name]
            if len(rows) == 1:
                inputs[f"{t.name}/b0"] = (values, lengths)
                continue
            rank = getattr(self, self.rank_names[t.name])[values].to(torch.long)
            block = rank // rows[0]
            local = rank - block * rows[0]
            bag = torch.repeat_interleave(torch.arange(batch), lengths.to(torch.long))
            for j in range(len(rows)):
                mask = block == j
                inputs[f"{t.name}/b{j}"] = (local[mask], torch.bincount(bag[mask], minlength=batch))
        return inputs

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        inputs = self.block_inputs(features)
        pooled = self.plain(inputs)
        if self.lookup is not None:
            order = self.lookup.feature_order
            kjt = KeyedJaggedTensor(keys=list(order), values=torch.cat([inputs[k][0] for k in order]),
                                    lengths=torch.cat([inputs[k][1].to(torch.int32) for k in order]))
            pooled.update(self.lookup(kjt).to_dict())
        jagged = features.to_dict()
        out = []
        for t in self.tables:
            keys = [f"{t.name}/b{j}" for j in range(len(self.block_rows[t.name]))]
            field = self.projections(keys[0], pooled[keys[0]])
            for k in keys[1:]:
                field = field + self.projections(k, pooled[k])
            if t.pooling == "mean":
                field = field / jagged[t.name].lengths().clamp(min=1).to(field.dtype).unsqueeze(1)
            out.append(field)
        return KeyedTensor(keys=[t.name for t in self.tables], length_per_key=[self.dim] * len(self.tables),
                           values=torch.cat(out, dim=1))


def physical_tables(tables: Sequence[TableSpec], hparams: Mapping[str, Any]) -> List[PhysicalTable]:
    return [PhysicalTable(f"{t.name}/b{j}", rows, int(d), [f"{t.name}/b{j}"], "sum")
            for t in tables
            for j, (rows, d) in enumerate(zip(hparams["block_rows"][t.name], hparams["dims"][t.name]))]


def block_dims(tables: Sequence[TableSpec], hparams: Mapping[str, Any]) -> Dict[str, int]:
    return {f"{t.name}/b{j}": int(d) for t in tables for j, d in enumerate(hparams["dims"][t.name])}


def _init_bounds(init: str, rows: int, d: int, dim: int, max_rows: int) -> Tuple[float, float]:
    """(table bound, projection bound) of the uniform init U(-b, b) of a block."""
    if init == "hetu":  # EmbeddingTrainer's default initializer, for tables and projections alike
        return math.sqrt(1.0 / max_rows), math.sqrt(1.0 / max_rows)
    if init == "dlrm":  # PrEmbeddingBag: xavier_uniform_ on (rows, d) and on nn.Linear's (D, d)
        return math.sqrt(6.0 / (rows + d)), math.sqrt(6.0 / (d + dim))
    return 1.0 / math.sqrt(rows), 1.0 / math.sqrt(d)  # uniform_rows: DLRM create_emb + nn.Linear default


class MixedDimEmbedding(EmbeddingModule):
    """Per-block widths d_i <= D, projected to D. forward: KJT (F keys, B bags) -> (B, F * D)."""

    def __init__(self, tables: Sequence[TableSpec], dim: int, hparams: Mapping[str, Any],
                 optimizer: EmbeddingOptimizer):
        super().__init__(tables, dim)
        self.hparams = dict(hparams)
        physical = physical_tables(tables, hparams)
        fused = [p for p in physical if fbgemm_width(p.dim)]
        max_rows = max(t.num_embeddings for t in tables)
        bounds = {p.name: _init_bounds(hparams["init"], p.rows, p.dim, dim, max_rows)[0] for p in fused}
        # FBGEMM-width tables draw their own init (a distributed rank draws only its shards)
        self.fused = FusedTables(fused, optimizer, bounds=bounds) if fused else None
        self.plain = PlainTables([p for p in physical if not fbgemm_width(p.dim)])
        self.projections = Projections(block_dims(tables, hparams), dim)
        self._initialise(physical, hparams["init"], max(t.num_embeddings for t in tables))
        ranks = {}
        for t in tables:
            if len(hparams["block_rows"][t.name]) > 1:
                rank = np.empty(t.num_embeddings, dtype=np.int32)
                rank[frequency_order(t)] = np.arange(t.num_embeddings, dtype=np.int32)
                ranks[t.name] = torch.from_numpy(rank)
        self.core = _MDForward(tables, dim, hparams, self.fused, self.plain, self.projections, ranks)

    def table_weight(self, block: str) -> torch.Tensor:
        """The stored (rows, d) weight of a block (``<field>/b<j>``)."""
        if self.fused is not None and any(p.name == block for p in self.fused.physical):
            return self.fused.weight(block)
        return self.plain.weight(block)

    def _initialise(self, physical: Sequence[PhysicalTable], init: str, max_rows: int) -> None:
        """U(-b, b) for the plain (narrow) tables and the projections, in block order; the FBGEMM
        tables were drawn by ``FusedTables`` with the same bounds."""
        fused = {p.name for p in self.fused.physical} if self.fused is not None else set()
        with torch.no_grad():
            for p in physical:
                table_bound, proj_bound = _init_bounds(init, p.rows, p.dim, self.dim, max_rows)
                if p.name not in fused:
                    w = self.table_weight(p.name)
                    w.copy_(torch.empty_like(w).uniform_(-table_bound, table_bound))
                if self.projections.has(p.name):
                    proj = self.projections.weights[_pkey(p.name)]
                    proj.uniform_(-proj_bound, proj_bound)

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        return self.core(features)

    def fused_optimizer(self):
        return self.fused.fused_optimizer() if self.fused is not None else None

    def fused_parameters(self):
        return self.fused.fused_parameters() if self.fused is not None else []

    def param_groups(self) -> List[ParamGroup]:
        groups = []
        plain = list(self.plain.parameters())
        if plain:
            groups.append(ParamGroup("narrow_tables", plain, kind="sparse"))
        params = list(self.projections.parameters())
        if params:
            groups.append(ParamGroup("projections", params))
        return groups

    def memory_report(self) -> MemoryReport:
        fused = self.fused.weight_bytes() if self.fused is not None else 0
        fused_state = self.fused.optimizer_state_bytes() if self.fused is not None else 0
        plain = self.plain.weight_bytes()
        weights = fused + plain
        projections = self.projections.weight_bytes()
        remap = sum(b.numel() * b.element_size() for b in self.core.buffers())
        inference = weights + projections + remap
        return MemoryReport(
            inference_bytes=inference,
            # fused optimizer state; Adagrad's sum of the plain tables; Adam's 2 moments of the projections
            training_bytes=inference + fused_state + plain + 2 * projections,
            parameters=(sum(p.numel() for p in self.fused_parameters()) + sum(p.numel() for p in self.plain.parameters())
                        + self.projections.parameter_count()),
            full_bytes=full_embedding_bytes(self.tables, self.dim),
            breakdown={"weights": weights, "projections": projections, "remap": remap},
        )

    def to_inference(self) -> nn.Module:
        """Plain EmbeddingBagCollection + plain narrow tables with the same weights, projections and remap."""
        ranks = {t: getattr(self.core, b).clone() for t, b in self.core.rank_names.items()}
        lookup = self.fused.unfused_copy() if self.fused is not None else None
        return _MDForward(self.tables, self.dim, self.hparams, lookup, copy.deepcopy(self.plain),
                          copy.deepcopy(self.projections), ranks).eval()


# ----------------------------------------------------------------------------- method
@dataclass
class MixedDimSettings:
    """Hyperparameters of ``mixed_dim`` (defaults: DLRM tricks/md_embedding_bag.py ``md_solver`` and
    Hetu methods/scheduler/md.py)."""

    alpha: Any = "auto"  #: power-law temperature: auto = bisected in [0, 1] for the budget (Hetu), or a number >= 0
    #: auto: one block per field (the references) | integer >= 1: equal-row frequency blocks (needs popularity=counts)
    blocks_per_field: Any = "auto"
    popularity: str = "rows"  #: rows: 1/n of the field (references) | counts: mean training count per row of a block
    #: pow2: nearest power of 2 (round_dim=True) | nearest: nearest integer | multiple_of_4 (previous recbench)
    rounding: str = "pow2"
    min_dim: int = 1  #: smallest width (references: 1; previous recbench: 4)
    #: hetu: U(+-sqrt(1/max_n)) tables and projections | dlrm: xavier_uniform | uniform_rows: U(+-1/sqrt(rows)), U(+-1/sqrt(d))
    init: str = "hetu"


class MixedDim(CompressionMethod):
    """Mixed-dimension embeddings; hyperparameters: ``MixedDimSettings``."""

    name = "mixed_dim"
    settings_class = MixedDimSettings

    def check_settings(self) -> None:
        alpha, blocks_per_field, popularity = self.alpha, self.blocks_per_field, self.popularity
        rounding, min_dim, init = self.rounding, self.min_dim, self.init

        def bad(key, value, allowed):
            return ValueError(f"mixed_dim: {key}={value!r} is not allowed; allowed: {allowed}")

        if alpha != "auto" and not (isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and alpha >= 0):
            raise bad("alpha", alpha, "'auto' or a number >= 0")
        if popularity not in POPULARITIES:
            raise bad("popularity", popularity, ", ".join(POPULARITIES))
        if rounding not in ROUNDINGS:
            raise bad("rounding", rounding, ", ".join(ROUNDINGS))
        if init not in INITS:
            raise bad("init", init, ", ".join(INITS))
        if blocks_per_field != "auto" and not (isinstance(blocks_per_field, int) and blocks_per_field >= 1):
            raise bad("blocks_per_field", blocks_per_field, "'auto' (one block per field) or an integer >= 1")
        blocks = 1 if blocks_per_field == "auto" else int(blocks_per_field)
        if blocks > 1 and popularity == "rows":
            raise bad("blocks_per_field", blocks_per_field, "'auto' or 1 with popularity=rows (1/n gives every "
                      "block of a field the same width); use popularity=counts for frequency blocks")
        if not isinstance(min_dim, int) or min_dim < 1 or (rounding == "multiple_of_4" and min_dim % 4):
            raise bad("min_dim", min_dim, "an integer >= 1 (a multiple of 4 with rounding=multiple_of_4)")
        self.blocks, self.min_dim = blocks, int(min_dim)

    def popularities(self, tables: Sequence[TableSpec], budget: Budget) -> Dict[str, List[float]]:
        """Block popularities of the compressed fields (kept fields are absent)."""
        compressed, _ = budget_lib.split_tables(tables, budget)
        return {t.name: block_popularity(t, self.blocks, self.popularity) for t in compressed}

    def hparams_at(self, tables: Sequence[TableSpec], dim: int, popularity: Mapping[str, List[float]],
                   alpha: float) -> Dict[str, Any]:
        """Widths and block rows of every field at temperature ``alpha``."""
        if dim < self.min_dim or (self.rounding == "multiple_of_4" and dim % 4):
            raise ValueError(f"mixed_dim: D={dim} must be >= min_dim={self.min_dim} (and a multiple of 4 "
                             f"with rounding=multiple_of_4)")
        names = list(popularity)
        flat = np.concatenate([popularity[n] for n in names]) if names else np.zeros(0)
        dims = round_dims(raw_dims(flat, alpha, dim), dim, self.min_dim, self.rounding) if len(flat) else flat
        out_dims, out_rows, start = {}, {}, 0
        for t in tables:
            if t.name not in popularity:
                out_dims[t.name], out_rows[t.name] = [dim], [t.num_embeddings]
                continue
            rows = block_rows(t.num_embeddings, self.blocks)
            ds = [int(d) for d in dims[start:start + len(rows)]]
            start += len(rows)
            if len(rows) > 1 and len(set(ds)) == 1:
                rows, ds = [t.num_embeddings], ds[:1]  # one width: one table, no remap
            out_dims[t.name], out_rows[t.name] = ds, rows
        return {"alpha": float(alpha), "blocks_per_field": self.blocks_per_field, "popularity": self.popularity,
                "rounding": self.rounding, "min_dim": self.min_dim, "init": self.init,
                "dims": out_dims, "block_rows": out_rows}

    def solve_hparams(self, tables: Sequence[TableSpec], dim: int, budget: Budget) -> Dict[str, Any]:
        popularity = self.popularities(tables, budget)
        target = budget_lib.target_bytes(tables, dim, budget)
        full = full_embedding_bytes(tables, dim)

        def total(alpha: float) -> int:
            return self.memory(tables, dim, self.hparams_at(tables, dim, popularity, alpha)).inference_bytes

        if self.alpha != "auto":
            hp = self.hparams_at(tables, dim, popularity, float(self.alpha))
            achieved = self.memory(tables, dim, hp).inference_bytes
            if achieved > target:
                raise InfeasibleBudget(self.name, budget.compression_ratio, achieved / full, achieved / full,
                                       f"alpha={self.alpha} gives ratio {achieved / full:.4g}")
            return hp
        low, high = total(ALPHA_RANGE[1]), total(ALPHA_RANGE[0])
        if high <= target:
            return self.hparams_at(tables, dim, popularity, ALPHA_RANGE[0])
        if low > target:
            raise InfeasibleBudget(self.name, budget.compression_ratio, low / full, high / full,
                                   f"alpha in [0, 1] reaches at least ratio {low / full:.4g} (widths >= {self.min_dim})")
        _, alpha = bisect_alpha(total, target)
        return self.hparams_at(tables, dim, popularity, alpha)

    def memory(self, tables: Sequence[TableSpec], dim: int, hparams: Mapping[str, Any],
               optimizer: EmbeddingOptimizer = EmbeddingOptimizer()) -> MemoryReport:
        physical = physical_tables(tables, hparams)
        weights = sum(p.rows * p.dim for p in physical) * FP32_BYTES
        # FBGEMM tables: the fused optimizer's state; plain tables: torch Adagrad's per-element sum
        state = sum(p.rows * (optimizer.state_bytes_per_row(p.dim) if fbgemm_width(p.dim) else p.dim * FP32_BYTES)
                    for p in physical)
        dims = block_dims(tables, hparams)
        projections = projection_bytes(dims, dim)
        remap = sum(t.num_embeddings * REMAP_BYTES for t in tables if len(hparams["block_rows"][t.name]) > 1)
        inference = weights + projections + remap
        return MemoryReport(
            inference_bytes=int(inference), training_bytes=int(inference + state + 2 * projections),
            parameters=int(sum(p.rows * p.dim for p in physical) + projection_parameters(dims, dim)),
            full_bytes=full_embedding_bytes(tables, dim),
            breakdown={"weights": int(weights), "projections": int(projections), "remap": int(remap)},
        )

    def build(self, tables: Sequence[TableSpec], dim: int, plan: Plan,
              optimizer: EmbeddingOptimizer = EmbeddingOptimizer()) -> MixedDimEmbedding:
        return MixedDimEmbedding(tables, dim, plan.hparams, optimizer)
