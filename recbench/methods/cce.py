"""``cce``: Clustered Compositional Embeddings (clustering the sketch).

References: Tsang & Ahle, "Clustering Embedding Tables, Without First Learning Them", NeurIPS 2023
(arXiv:2210.05974); thomasahle/cce ``cce/cce.py`` (``CCEmbedding``), ``cce/_tools.py`` (``KMeans``,
a Faiss wrapper), ``cce/__init__.py`` (``make_embedding``) and ``examples/movielens.py`` (the
schedule) at commit 5b8a93c1a3f4d3741872338d659702aee3ddae34.

Mechanism: the D dims of a field are split into c columns (``n_chunks``, D / c each). Column j of
field f has two (M, D / c) tables T0_j and T1_j; id x reads row h0[x, j] of T0_j and row h1_j(x)
of T1_j, and its vector is the concatenation over j of T0_j[h0[x, j]] + T1_j[h1_j(x)]. h0 is an
(n_f, c) array: random at the start, then, at every clustering, the id's nearest k-means centre;
h1_j is a random hash function drawn afresh at every clustering (the reference stores it as a
random array too; see the card). Clustering (after each of the first int(0.75 x epochs)
epochs): per column, the current vectors of up to ``sample_factor`` x M ids (all ids when fewer)
are clustered into M centres by Lloyd's k-means (``kmeans_iterations``, Faiss's initialisation and
empty-cluster split); every id of the field is reassigned to its nearest centre (new h0), T0_j
becomes the centres, a fresh h1_j is drawn and T1_j[b] becomes the mean residual (vector - centre)
of the ids hashed to b (0 when none is). Concatenation over columns and the sum of the two tables
commute with pooling, so a bag's fused lookups are exact: the 2c tables of a field are FBGEMM
tables looked up with rewritten ids (fused optimizer, no dense gradient).

Budget: one row count M for every compressed field (the reference gives every table the same
parameter count, num_params // D // 2 rows per table; on Criteo it caps the largest table). A
field is stored as CCE when that is smaller than its full table, otherwise in full. Inference
bytes of a CCE field: 2 M D x 4 (tables) + the h0 array bit-packed at ceil(log2 M) bits per
(id, column) + the hash parameters (a, b int64 per column). M is the largest integer whose total
fits the target. Training bytes: tables + optimizer state + h0 as int32 + hash parameters + two
int64 counters (the clustering seed and round).

Shapes: KJT (F keys, B bags) -> values rewritten to (2c keys per CCE field) -> (B, F * D).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from recbench.methods.base import CompressionMethod, EmbeddingModule, Hook
from recbench.methods.blocks import bit_packing, hashing_fns
from recbench.methods.blocks.budget import check_auto, land, largest_integer_within, split_tables, target_bytes
from recbench.methods.blocks.tables import FusedTables, PhysicalTable
from recbench.types import FP32_BYTES, Budget, EmbeddingOptimizer, MemoryReport, Plan, TableSpec, full_embedding_bytes

#: bytes of one hash parameter (a or b, int64) and of one h0 entry while training (int32)
HASH_PARAM_BYTES, TRAIN_INDEX_BYTES = 8, 4
#: bytes of the two training-only counters (clustering seed and round, int64)
COUNTER_BYTES = 16
#: Faiss's relative perturbation when an empty cluster takes half of another (Clustering.cpp EPS)
SPLIT_EPS = 1.0 / 1024.0


def chunk_dim(dim: int, n_chunks: int) -> int:
    """D / c, which must be an integer and a multiple of 4 (FBGEMM table width)."""
    if n_chunks < 1 or dim % n_chunks or (dim // n_chunks) % 4:
        raise ValueError(f"method 'cce': n_chunks={n_chunks} must divide embedding_dim={dim} into columns whose "
                         "width is a multiple of 4 (FBGEMM tables)")
    return dim // n_chunks


def cce_field_bytes(num_embeddings: int, dim: int, n_chunks: int, rows: int) -> int:
    """Inference bytes of one CCE field: 2 (M, D) fp32 tables, packed h0, hash parameters."""
    return (2 * rows * dim * FP32_BYTES + bit_packing.packed_bytes(num_embeddings * n_chunks, bit_packing.bits_for(rows))
            + 2 * n_chunks * HASH_PARAM_BYTES)


def field_rows(tables: Sequence[TableSpec], dim: int, n_chunks: int, rows: int,
               compressible: Sequence[str]) -> Dict[str, int]:
    """Field -> M for the compressible fields whose CCE bytes are below their full table's."""
    names = set(compressible)
    return {t.name: int(rows) for t in tables if t.name in names
            and cce_field_bytes(t.num_embeddings, dim, n_chunks, rows) < t.num_embeddings * dim * FP32_BYTES}


def physical_tables(tables: Sequence[TableSpec], dim: int, n_chunks: int, rows: Mapping[str, int]) -> List[PhysicalTable]:
    """Per CCE field the 2c tables ``<f>/t<k>c<j>`` (k = 0, 1 outer, column j inner); others full."""
    width, out = chunk_dim(dim, n_chunks), []
    for t in tables:
        if t.name not in rows:
            out.append(PhysicalTable(t.name, t.num_embeddings, dim, [t.name], t.pooling))
            continue
        for k in range(2):
            for j in range(n_chunks):
                name = f"{t.name}/t{k}c{j}"
                out.append(PhysicalTable(name, int(rows[t.name]), width, [name], t.pooling))
    return out


# ----------------------------------------------------------------------------- k-means
def nearest(x: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """(n,) int64 index of the nearest centre (L2) of every row of x (n, d), in row batches."""
    if not x.shape[0]:
        return torch.zeros(0, dtype=torch.int64)
    batch = max(1, 10 ** 8 // max(1, centres.shape[0]))
    norms = (centres * centres).sum(1)  # argmin ||x - c||^2 = argmin ||c||^2 - 2 x.c
    return torch.cat([torch.addmm(norms, x[i:i + batch], centres.t(), alpha=-2.0).argmin(1)
                      for i in range(0, x.shape[0], batch)])


def split_empty(centres: torch.Tensor, counts: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Faiss's ``split_clusters``: each empty centre copies a cluster drawn with probability
    proportional to (size - 1), both perturbed by +-EPS alternately per coordinate, sizes halved.
    The loop runs over empty clusters only (never over points)."""
    counts = counts.to(torch.float64).clone()
    sign = 1.0 - 2.0 * (torch.arange(centres.shape[1]) % 2).to(centres.dtype)
    for ci in (counts == 0).nonzero().flatten().tolist():
        cj = int(torch.multinomial((counts - 1).clamp(min=0), 1, generator=generator))
        centres[ci] = centres[cj] * (1 + SPLIT_EPS * sign)
        centres[cj] = centres[cj] * (1 - SPLIT_EPS * sign)
        counts[ci] = counts[cj] / 2
        counts[cj] -= counts[ci]
    return centres


def kmeans(x: torch.Tensor, k: int, iterations: int, generator: torch.Generator) -> torch.Tensor:
    """(k, d) centres of x (n, d): Lloyd's algorithm as Faiss runs it for the reference (k distinct
    random points to start, ``iterations`` assign/update rounds, empty clusters split). With
    n <= k: the n points plus N(0, 1/d) random centres (the reference's ``KMeans.fit``)."""
    n, d = x.shape
    if n <= k:
        centres = torch.randn(k, d, generator=generator, dtype=x.dtype) / math.sqrt(d)
        centres[:n] = x
        return centres
    centres = x[torch.randperm(n, generator=generator)[:k]].clone()
    for _ in range(int(iterations)):
        assign = nearest(x, centres)
        counts = torch.bincount(assign, minlength=k)
        sums = torch.zeros_like(centres).index_add_(0, assign, x)
        centres = torch.where((counts > 0).unsqueeze(1), sums / counts.clamp(min=1).unsqueeze(1).to(x.dtype), centres)
        if bool((counts == 0).any()):
            centres = split_empty(centres, counts, generator)
    return centres


def reassign(old: torch.Tensor, centres: torch.Tensor, new_h1: torch.Tensor, rows: int):
    """The reference's reassignment of one column, given its centres and the fresh hash.

    Args: old (n, w) current vectors of every id; centres (M, w); new_h1 (n,) int64 rows of T1.
    Returns: (h0 (n,) nearest centre, T0 = centres, T1 (M, w) mean residual per T1 row, 0 if empty).
    """
    h0 = nearest(old, centres)
    residual = old - centres[h0]
    sums = torch.zeros(rows, old.shape[1], dtype=old.dtype).index_add_(0, new_h1, residual)
    counts = torch.bincount(new_h1, minlength=rows).to(old.dtype).unsqueeze(1)
    return h0, centres.clone(), torch.where(counts > 0, sums / counts.clamp(min=1), torch.zeros_like(sums))


# ----------------------------------------------------------------------------- lookup
def compose(collection: nn.Module, tables: Sequence[TableSpec], dim: int, n_chunks: int, rows: Mapping[str, int],
            index: Mapping[str, int], a: torch.Tensor, b: torch.Tensor,
            h0_of: Callable[[int, torch.Tensor], torch.Tensor], features: KeyedJaggedTensor) -> KeyedTensor:
    """(B, F * D): ids rewritten to the 2c rows per CCE field, one fused lookup, T0 + T1 per column."""
    jagged = features.to_dict()
    values, lengths, widths = [], [], []
    for t in tables:
        ids, bag = jagged[t.name].values().long(), jagged[t.name].lengths()
        if t.name not in rows:
            values.append(ids)
            lengths.append(bag)
            widths.append(dim)
            continue
        i = index[t.name]
        first = h0_of(i, ids)  # (N, c)
        second = hashing_fns.universal(ids.unsqueeze(1), a[i], b[i], rows[t.name])  # (N, c)
        values.append(torch.cat([first.t().reshape(-1), second.t().reshape(-1)]))
        lengths.append(bag.repeat(2 * n_chunks))
        widths.append(2 * dim)
    kjt = KeyedJaggedTensor(keys=list(collection.feature_order), values=torch.cat(values),
                            lengths=torch.cat(lengths).to(torch.int32))
    looked_up = collection(kjt).values()
    blocks, start = [], 0
    for t, width in zip(tables, widths):
        block = looked_up[:, start:start + width]
        blocks.append(block if width == dim else block[:, :dim] + block[:, dim:])
        start += width
    return KeyedTensor(keys=[t.name for t in tables], length_per_key=[dim] * len(tables), values=torch.cat(blocks, 1))


class CCEInference(nn.Module):
    """The deployable form: plain tables, h0 bit-packed (ceil(log2 M) bits per id and column), hash
    parameters. forward: KJT (F keys, B bags) -> KeyedTensor (B, F * D)."""

    def __init__(self, source: "CCEEmbedding"):
        super().__init__()
        self.tables, self.dim, self.n_chunks = source.tables, source.dim, source.n_chunks
        self.rows, self.index = dict(source.rows), dict(source.index)
        self.bits = {i: bit_packing.bits_for(self.rows[name]) for name, i in self.index.items()}
        self.collection = source.fused.unfused_copy()
        self.register_buffer("a", source.a.clone())
        self.register_buffer("b", source.b.clone())
        for name, i in self.index.items():
            bits = bit_packing.bits_for(self.rows[name])
            self.register_buffer(f"h0_{i}", bit_packing.pack_bits(source.h0(i).reshape(-1).long(), bits))

    def h0(self, i: int, ids: torch.Tensor) -> torch.Tensor:
        positions = ids.unsqueeze(1) * self.n_chunks + torch.arange(self.n_chunks)
        return bit_packing.read_bits(getattr(self, f"h0_{i}"), self.bits[i], positions)

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        return compose(self.collection, self.tables, self.dim, self.n_chunks, self.rows, self.index, self.a, self.b,
                       self.h0, features)


class CCEEmbedding(EmbeddingModule):
    """Clustered compositional embeddings over fused tables. forward: KJT (F keys, B bags) -> (B, F * D).

    Args:
        hparams: ``rows`` (field -> M of the CCE fields), ``n_chunks``.
    """

    def __init__(self, tables: Sequence[TableSpec], dim: int, hparams: Mapping[str, Any], optimizer: EmbeddingOptimizer):
        super().__init__(tables, dim)
        self.n_chunks = int(hparams["n_chunks"])
        self.rows = {k: int(v) for k, v in hparams["rows"].items()}
        self.index = {t.name: i for i, t in enumerate(t for t in self.tables if t.name in self.rows)}
        hashing_fns.check_hashable("cce", [(t.name, t.num_embeddings) for t in self.tables if t.name in self.rows],
                                   max(self.rows.values(), default=1))
        self.fused = FusedTables(physical_tables(self.tables, dim, self.n_chunks, self.rows), optimizer)
        # initialisation (the reference's reset_parameters): tables U(-D^-1/2, D^-1/2), h0 uniform random
        bound = dim ** -0.5
        with torch.no_grad():
            for p in self.fused.physical:
                if p.name not in self.feature_names:
                    w = self.fused.weight(p.name)
                    w.copy_(torch.empty_like(w).uniform_(-bound, bound))
        for t in self.tables:
            if t.name in self.rows:
                self.register_buffer(f"h0_{self.index[t.name]}", torch.randint(
                    self.rows[t.name], (t.num_embeddings, self.n_chunks), dtype=torch.int32))
        a, b = hashing_fns.draw(int(torch.randint(0, 2 ** 62, ())), (len(self.index), self.n_chunks))
        self.register_buffer("a", a)
        self.register_buffer("b", b)
        # the clustering generator: seeded from the run's RNG at build, one stream per round
        self.register_buffer("cluster_seed", torch.randint(0, 2 ** 62, (), dtype=torch.int64))
        self.register_buffer("cluster_round", torch.zeros((), dtype=torch.int64))

    def h0(self, i: int, ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        table = getattr(self, f"h0_{i}")
        return table if ids is None else table[ids].long()

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        return compose(self.fused, self.tables, self.dim, self.n_chunks, self.rows, self.index, self.a, self.b,
                       self.h0, features)

    def vectors(self, name: str, j: int, ids: torch.Tensor) -> torch.Tensor:
        """(n, D / c) current column-j vectors of ``ids`` of field ``name``."""
        i, m = self.index[name], self.rows[name]
        first = self.fused.weight(f"{name}/t0c{j}")[self.h0(i, ids)[:, j]]
        second = self.fused.weight(f"{name}/t1c{j}")[hashing_fns.universal(ids, self.a[i, j], self.b[i, j], m)]
        return first + second

    @torch.no_grad()
    def cluster(self, iterations: int, sample_factor: int) -> Dict[str, float]:
        """One clustering round over every CCE field and column (the reference's ``cluster``).

        Returns ``distortion``: the k-means error sum ||v - centre||^2 over every id and column,
        relative to the vectors' spread sum ||v - mean||^2 (0: the centres lose nothing; 1: no
        better than one centre per column)."""
        generator = torch.Generator().manual_seed((int(self.cluster_seed) * 1_000_003 + int(self.cluster_round)) % 2 ** 63)
        lost, spread = 0.0, 0.0
        for t in self.tables:
            if t.name not in self.rows:
                continue
            i, m, n = self.index[t.name], self.rows[t.name], t.num_embeddings
            every = torch.arange(n)
            samples = sample_factor * m
            for j in range(self.n_chunks):
                old = self.vectors(t.name, j, every)
                sample = torch.randperm(n, generator=generator)[:samples] if samples < n else every
                centres = kmeans(old[sample], m, iterations, generator)
                a, b = hashing_fns.draw(int(torch.randint(0, 2 ** 62, (), generator=generator)), (1,))
                new_h1 = hashing_fns.universal(every, a, b, m)
                h0, t0, t1 = reassign(old, centres, new_h1, m)
                lost += float(((old - centres[h0]) ** 2).sum())
                spread += float(((old - old.mean(0)) ** 2).sum())
                self.h0(i)[:, j] = h0.to(torch.int32)
                self.a[i, j], self.b[i, j] = a[0], b[0]
                self.fused.weight(f"{t.name}/t0c{j}").copy_(t0)
                self.fused.weight(f"{t.name}/t1c{j}").copy_(t1)
        self.cluster_round += 1
        return {"distortion": lost / spread if spread > 0 else 0.0}

    def fused_optimizer(self):
        return self.fused.fused_optimizer()

    def fused_parameters(self) -> List[nn.Parameter]:
        return self.fused.fused_parameters()

    def memory_report(self) -> MemoryReport:
        weights = self.fused.weight_bytes()
        assignments = sum(bit_packing.packed_bytes(self.h0(i).numel(), bit_packing.bits_for(self.rows[name]))
                          for name, i in self.index.items())
        hashes = (self.a.numel() + self.b.numel()) * HASH_PARAM_BYTES
        held = sum(self.h0(i).numel() * self.h0(i).element_size() for i in self.index.values())
        counters = (self.cluster_seed.numel() + self.cluster_round.numel()) * 8 if self.index else 0
        return MemoryReport(
            inference_bytes=weights + assignments + hashes,
            training_bytes=weights + self.fused.optimizer_state_bytes() + held + hashes + counters,
            parameters=sum(p.numel() for p in self.fused.fused_parameters()),
            full_bytes=full_embedding_bytes(self.tables, self.dim),
            breakdown={"weights": weights, "assignments": assignments, "hash": hashes},
        )

    def to_inference(self) -> nn.Module:
        return CCEInference(self).eval()


# ----------------------------------------------------------------------------- schedule
class ClusterHook(Hook):
    """Clusters after each epoch e (0-based) with e < the last clustering epoch, after that epoch's
    validation when one falls on its last step (the reference validates, then clusters)."""

    def __init__(self, method: "CCE"):
        self.method = method
        self.pending = False
        self.rounds: List[float] = []

    @staticmethod
    def steps_per_epoch(context: Any) -> int:
        return max(1, math.ceil(len(context.trainer.split("train")) / context.trainer.config.batch_size))

    def last_epoch(self, context: Any) -> int:
        """Clustering stops after this many epochs: ``last_cluster_epoch`` or int(0.75 x epochs)."""
        if self.method.last_cluster_epoch != "auto":
            return int(self.method.last_cluster_epoch)
        config, stage = context.trainer.config, context.stage
        steps = stage.max_steps or config.max_steps
        epochs = steps / self.steps_per_epoch(context) if steps else (
            stage.max_epochs if stage.max_epochs is not None else config.max_epochs)
        return int(0.75 * epochs)

    def on_step_end(self, context: Any) -> Optional[bool]:
        per_epoch = self.steps_per_epoch(context)
        if context.stage_step % per_epoch or context.stage_step // per_epoch > self.last_epoch(context):
            return None
        config = context.trainer.config
        eval_every = max(1, per_epoch // config.evals_per_epoch)
        steps = context.stage.max_steps or config.max_steps or math.ceil(
            (context.stage.max_epochs if context.stage.max_epochs is not None else config.max_epochs) * per_epoch)
        if context.stage_step >= steps:
            return None  # training ends here: nothing would learn from the new assignment
        if context.stage_step % eval_every == 0:
            self.pending = True  # validate the trained epoch first
        else:
            self._cluster(context)
        return None

    def on_eval_end(self, context: Any, metrics: Mapping[str, float]) -> Optional[bool]:
        if self.pending:
            self.pending = False
            self._cluster(context)
        return None

    def _cluster(self, context: Any) -> None:
        result = context.embedding.cluster(self.method.kmeans_iterations, self.method.sample_factor)
        self.rounds.append(result["distortion"])

    def on_stage_end(self, context: Any) -> Optional[Mapping[str, Any]]:
        return {"cluster_rounds": len(self.rounds),
                "last_cluster_distortion": self.rounds[-1] if self.rounds else 0.0}


# ----------------------------------------------------------------------------- method
@dataclass
class CCESettings:
    """Hyperparameters of ``cce`` (defaults: thomasahle/cce's ``CCEmbedding`` and ``examples/movielens.py``)."""

    rows: Any = "auto"  #: M rows per table and column, one for every CCE field: auto (solved from the budget)
    n_chunks: int = 4  #: c columns (the reference's --n-chunks); D / c must be a multiple of 4 (FBGEMM)
    kmeans_iterations: int = 100  #: Lloyd iterations per clustering (the reference's niter)
    sample_factor: int = 200  #: k-means on at most sample_factor x M ids per column (the reference's)
    #: cluster after each epoch e < this (0-based): auto = int(0.75 x epochs) (the reference's --last-cluster -1); 0 never
    last_cluster_epoch: Any = "auto"


class CCE(CompressionMethod):
    """Clustered compositional embeddings; hyperparameters: ``CCESettings``."""

    name = "cce"
    settings_class = CCESettings

    def check_settings(self) -> None:
        check_auto(self.name, "rows", self.rows)
        for key in ("n_chunks", "kmeans_iterations", "sample_factor"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"method 'cce': {key}={value!r}; allowed: a positive integer")
        last = self.last_cluster_epoch
        if last != "auto" and (isinstance(last, bool) or not isinstance(last, int) or last < 0):
            raise ValueError(f"method 'cce': last_cluster_epoch={last!r}; allowed: 'auto' or an integer >= 0")

    def solve_hparams(self, tables: Sequence[TableSpec], dim: int, budget: Budget) -> Dict[str, Any]:
        chunk_dim(dim, self.n_chunks)
        compressed, _ = split_tables(tables, budget)
        names = [t.name for t in compressed]
        largest = max((t.num_embeddings for t in compressed), default=1)

        def bytes_at(m: int) -> int:
            return self.memory(tables, dim, {"rows": field_rows(tables, dim, self.n_chunks, m, names),
                                             "n_chunks": self.n_chunks}).inference_bytes

        limit = target_bytes(tables, dim, budget)
        m = max(1, largest_integer_within(bytes_at, 1, largest, limit))
        land(self.name, bytes_at(m), tables, dim, budget, bytes_at(1), bytes_at(largest),
             "one row per table and column (plus the packed assignments) already exceeds the budget"
             if bytes_at(1) > limit else "")
        return {"rows": field_rows(tables, dim, self.n_chunks, m, names), "row_count": int(m),
                "n_chunks": self.n_chunks}

    def memory(self, tables: Sequence[TableSpec], dim: int, hparams: Mapping[str, Any],
               optimizer: EmbeddingOptimizer = EmbeddingOptimizer()) -> MemoryReport:
        n_chunks, rows = int(hparams["n_chunks"]), hparams["rows"]
        physical = physical_tables(tables, dim, n_chunks, rows)
        weights = sum(p.rows * p.dim * FP32_BYTES for p in physical)
        state = sum(p.rows * optimizer.state_bytes_per_row(p.dim) for p in physical)
        cce = [t for t in tables if t.name in rows]
        assignments = sum(bit_packing.packed_bytes(t.num_embeddings * n_chunks, bit_packing.bits_for(rows[t.name]))
                          for t in cce)
        hashes = 2 * n_chunks * HASH_PARAM_BYTES * len(cce)
        held = sum(t.num_embeddings * n_chunks * TRAIN_INDEX_BYTES for t in cce)
        return MemoryReport(
            inference_bytes=int(weights + assignments + hashes),
            training_bytes=int(weights + state + held + hashes + (COUNTER_BYTES if cce else 0)),
            parameters=int(sum(p.rows * p.dim for p in physical)),
            full_bytes=full_embedding_bytes(tables, dim),
            breakdown={"weights": int(weights), "assignments": int(assignments), "hash": int(hashes)},
        )

    def build(self, tables: Sequence[TableSpec], dim: int, plan: Plan,
              optimizer: EmbeddingOptimizer = EmbeddingOptimizer()) -> CCEEmbedding:
        return CCEEmbedding(tables, dim, plan.hparams, optimizer)

    def hooks(self) -> List[Hook]:
        return [ClusterHook(self)]
