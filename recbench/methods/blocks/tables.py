"""Plain TorchRec/FBGEMM tables with fused optimizers, shared by every table-backed method.

``FusedTables`` owns one ``FusedEmbeddingBagCollection`` over a list of physical tables. The
optimizer (SGD, Adagrad or row-wise Adagrad on CPU) runs inside FBGEMM's backward, so no dense
gradient of a table is ever materialised. Methods that transform ids (hashing, QR, unified, ...)
wrap it: they rewrite the KeyedJaggedTensor, look up, and combine.

Initialisation is seeded per block of rows (``seeded_uniform``), so any part of a table can be
drawn without the rest: a distributed run builds its tables on the meta device (``tables_on_meta``)
and every rank fills only the shards TorchRec allocates for it, with the values one process draws.

References: TorchRec ``FusedEmbeddingBagCollection``; FBGEMM ``SplitTableBatchedEmbeddingBagsCodegen``.
"""
from __future__ import annotations

import contextlib
import contextvars
import copy
import functools
import hashlib
import os
from dataclasses import dataclass
from typing import Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.modules.fused_embedding_modules import FusedEmbeddingBagCollection
from torchrec.optim import RowWiseAdagrad
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from recbench.methods.base import EmbeddingModule
from recbench.methods.blocks.quantized_tables import QUANTIZE_BITS, quantize_rows, sparse_type, with_quantized_tables
from recbench.types import FP32_BYTES, EmbeddingOptimizer, MemoryReport, TableSpec, full_embedding_bytes

_OPTIMIZER_TYPES = {
    "sgd": torch.optim.SGD,
    "adagrad": torch.optim.Adagrad,
    "rowwise_adagrad": RowWiseAdagrad,
}


@dataclass(frozen=True)
class PhysicalTable:
    """One stored table: ``rows`` x ``dim`` fp32, looked up by ``features`` (KJT keys)."""

    name: str
    rows: int
    dim: int
    features: Sequence[str]
    pooling: str = "sum"

    def config(self) -> EmbeddingBagConfig:
        # Always SUM inside FBGEMM; mean pooling is a division by the bag size afterwards
        # (``pool_outputs``). TorchRec 1.8's FusedEmbeddingBagCollection returns wrong values for
        # the second pooling group when SUM and MEAN tables are mixed (measured), and one group is
        # also one kernel call instead of two.
        return EmbeddingBagConfig(
            name=self.name,
            embedding_dim=self.dim,
            num_embeddings=self.rows,
            feature_names=list(self.features),
            pooling=PoolingType.SUM,
        )


#: environment variable naming FBGEMM's per-index bounds check for recbench's tables
#: (``none``, the default, or ``fatal``/``warning``/``ignore``); the test suite sets ``fatal``
BOUNDS_CHECK_VARIABLE = "RECBENCH_FBGEMM_BOUNDS_CHECK"


def skip_bounds_check(tbe: nn.Module) -> nn.Module:
    """Turn off FBGEMM's per-index bounds check of a TBE kernel (``bounds_check_indices``), unless
    ``RECBENCH_FBGEMM_BOUNDS_CHECK`` names a mode.

    Every embedding module's forward already rejects out-of-range ids with a specific
    ``IdOutOfRange`` (``base.check_ids``, a per-field min/max), and id rewrites (hashing, QR, ...)
    land in range by construction, so the kernel's own check (FBGEMM's default ``WARNING`` mode,
    which clamps bad ids to row 0) repeats work: measured ~30% of the fp32 forward lookup at
    B=4096, F=26 (benchmarks/lookup.py). The test suite runs with ``fatal`` so that a method whose
    rewrite left the table's range fails loudly there instead of reading out of bounds.
    """
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import BoundsCheckMode

    mode = os.environ.get(BOUNDS_CHECK_VARIABLE, "none").strip().upper()
    if mode not in BoundsCheckMode.__members__:
        raise ValueError(f"{BOUNDS_CHECK_VARIABLE}={mode.lower()!r}; allowed: none, fatal, warning, ignore")
    tbe.bounds_check_mode_int = BoundsCheckMode[mode].value
    return tbe


def check_fbgemm_dim(dim: int, where: str) -> None:
    if dim % 4 != 0 or dim <= 0:
        raise ValueError(f"{where}: FBGEMM tables need an embedding dim that is a positive multiple of 4, got {dim}")


#: rows per block of the seeded table initialisation (``seeded_uniform``)
INIT_BLOCK_ROWS = 2 ** 16

_ON_META: contextvars.ContextVar = contextvars.ContextVar("recbench_tables_on_meta", default=False)


@contextlib.contextmanager
def tables_on_meta() -> Iterator[None]:
    """``FusedTables`` built inside hold their collection on the meta device (no table memory):
    a distributed run builds its model so, and TorchRec's sharder allocates each rank's shards,
    which ``FusedTables.reset_parameters`` then fills (``recbench.training.distributed``)."""
    token = _ON_META.set(True)
    try:
        yield
    finally:
        _ON_META.reset(token)


def block_seed(seed: int, table: str, block: int) -> int:
    """The generator seed of rows ``[block * INIT_BLOCK_ROWS, (block + 1) * INIT_BLOCK_ROWS)`` of ``table``."""
    digest = hashlib.sha256(f"{int(seed)}/{table}/{int(block)}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def seeded_uniform(out: torch.Tensor, seed: int, table: str, rows: int, dim: int, bound: float,
                   row0: int = 0, col0: int = 0) -> None:
    """Fill ``out`` (R, C), the part ``[row0:row0+R, col0:col0+C]`` of table ``table`` (``rows`` x
    ``dim``), with the table's Uniform(-bound, bound) initialisation.

    The table is drawn in blocks of ``INIT_BLOCK_ROWS`` rows, block k (all ``dim`` columns, row-major)
    from its own ``torch.Generator`` seeded by ``block_seed(seed, table, k)``: a part is computed from
    the blocks it overlaps only, and every split of a table into parts (one process, row-wise or
    column-wise shards) yields the same values. Extra memory: one block (a part narrower than the
    table draws its blocks whole and keeps its columns). Values are ``(2u - 1) * bound`` from
    ``u`` ~ U[0, 1): ``2u - 1`` is exact and the product one rounding, so they do not depend on the
    CPU's SIMD level (``uniform_(-bound, bound)`` differs in the last bit between AVX2 and the
    default dispatch, measured).
    """
    count, width = out.shape
    if count == 0 or width == 0:
        return
    generator = torch.Generator()
    for block in range(row0 // INIT_BLOCK_ROWS, (row0 + count - 1) // INIT_BLOCK_ROWS + 1):
        start = block * INIT_BLOCK_ROWS
        size = min(INIT_BLOCK_ROWS, rows - start)
        lo, hi = max(row0, start), min(row0 + count, start + size)
        generator.manual_seed(block_seed(seed, table, block))
        target = out[lo - row0:hi - row0]
        whole = lo == start and hi == start + size and width == dim and target.is_contiguous()
        drawn = target if whole else torch.empty(size, dim, dtype=out.dtype)  # a whole block is drawn in place
        drawn.uniform_(0.0, 1.0, generator=generator).mul_(2.0).sub_(1.0).mul_(bound)
        if not whole:
            target.copy_(drawn[lo - start:hi - start, col0:col0 + width])


class FusedTables(nn.Module):
    """A FusedEmbeddingBagCollection over physical tables.

    forward(features: KeyedJaggedTensor with keys covering every table's features)
        -> KeyedTensor with one (B, table.dim) block per feature, in config order.

    Initialisation (``seed_init``): the DLRM one, Uniform(-1/sqrt(rows), 1/sqrt(rows)), drawn by
    ``seeded_uniform`` from ``init_seed``, one int64 that the constructor draws from torch's global
    RNG (seeded by the job before it builds the method, so no seed is passed through the methods'
    constructors): the tables are a function of the run's seed and of the build order, and each
    block of rows has its own generator, so a rank draws its shards alone and gets one process's
    values (one process draws the same blocks). These values are not those of one whole-table
    draw from the global RNG: runs recorded with such an initialisation are not reproduced bit for
    bit (the reference leaderboards are re-run with this one).

    Built inside ``tables_on_meta`` (a distributed run) with ``seed_init``, the collection is on the
    meta device: ``recbench.training.distributed`` shards it and ``reset_parameters`` fills the
    shards. A method that reads or writes the weights before sharding (``weight``: its own
    initialisation) gets whole tables at that moment (``materialise``), initialised as in one
    process; such tables are copied into the shards (``seed_init=False`` tables are always built
    whole: their owner writes them).
    """

    def __init__(self, tables: Sequence[PhysicalTable], optimizer: EmbeddingOptimizer, seed_init: bool = True,
                 bounds: Optional[Mapping[str, float]] = None):
        super().__init__()
        unknown = sorted(set(bounds or {}) - {t.name for t in tables})
        if unknown:
            raise ValueError(f"init bounds for tables {unknown} that this collection does not hold")
        self.bounds = {t.name: float((bounds or {}).get(t.name, 1.0 / max(t.rows, 1) ** 0.5)) for t in tables}
        for t in tables:
            check_fbgemm_dim(t.dim, f"table {t.name!r}")
        self.physical = list(tables)
        self.optimizer_spec = optimizer
        self.feature_order = [f for t in self.physical for f in t.features]
        self.mean_features = [f for t in self.physical if t.pooling == "mean" for f in t.features]
        self._feature_dims = [t.dim for t in self.physical for _ in t.features]
        self.init_seed = int(torch.randint(0, 2 ** 62, (1,), dtype=torch.int64))
        on_meta = seed_init and _ON_META.get()
        self.collection = self._build(torch.device("meta" if on_meta else "cpu"))
        if seed_init and not on_meta:
            self.reset_parameters()

    def _build(self, device: torch.device) -> FusedEmbeddingBagCollection:
        """The collection on ``device``. FBGEMM's own initialisation of a CPU collection draws from
        torch's global RNG, a meta one does not: the RNG state is restored after the build, so the
        draws that follow (dense layers, other modules) are the same either way."""
        kwargs = {"lr": self.optimizer_spec.learning_rate}
        if self.optimizer_spec.kind != "sgd":
            kwargs["eps"] = self.optimizer_spec.eps
        with torch.random.fork_rng(devices=[]):
            collection = FusedEmbeddingBagCollection(
                tables=[t.config() for t in self.physical],
                optimizer_type=_OPTIMIZER_TYPES[self.optimizer_spec.kind],
                optimizer_kwargs=kwargs,
                device=device,
            )
        for lookup in collection._emb_modules:  # TorchRec's wrapper around one FBGEMM TBE
            skip_bounds_check(lookup._emb_module)
        return collection

    @property
    def on_meta(self) -> bool:
        """The collection is unallocated (built inside ``tables_on_meta`` and not sharded yet)."""
        return any(p.device.type == "meta" for p in self.collection.parameters())

    def materialise(self) -> None:
        """Replace a meta collection by whole tables on CPU, initialised as in one process."""
        if self.on_meta:
            self.collection = self._build(torch.device("cpu"))
            self.reset_parameters()

    def local_parts(self, table_name: str) -> List[Tuple[int, int, torch.Tensor]]:
        """(first row, first column, tensor) of every part of ``table_name`` this process holds: the
        whole table, or, sharded by TorchRec, this rank's local shards (none when another rank holds
        it)."""
        from torch.distributed._shard.sharded_tensor import ShardedTensor

        if isinstance(self.collection, FusedEmbeddingBagCollection):
            return [(0, 0, self.weight(table_name))]
        weight = self.collection.state_dict()[f"embedding_bags.{table_name}.weight"]
        if not isinstance(weight, ShardedTensor):
            raise RuntimeError(f"table {table_name!r} is held by an unexpected {type(self.collection).__name__}")
        return [(int(s.metadata.shard_offsets[0]), int(s.metadata.shard_offsets[1]), s.tensor)
                for s in weight.local_shards()]

    def reset_parameters(self) -> None:
        """Uniform(-b, b) in every part of every table this process holds (``seeded_uniform`` from
        ``init_seed``), b = the table's ``bounds`` entry, by default 1/sqrt(rows) (the DLRM
        initialisation); FBGEMM's own init does not follow torch's seed."""
        with torch.no_grad():
            for t in self.physical:
                bound = self.bounds[t.name]
                for row0, col0, part in self.local_parts(t.name):
                    seeded_uniform(part, self.init_seed, t.name, t.rows, t.dim, bound, row0, col0)

    def weight(self, table_name: str) -> torch.Tensor:
        """The whole (rows, dim) weight of an unsharded collection (materialised first if on meta)."""
        self.materialise()
        return self.collection.embedding_bags[table_name].weight

    def forward(self, features):
        direct = self._direct_lookup(features)
        if direct is not None:
            return direct
        return self.forward_via_collection(features)

    def forward_via_collection(self, features):
        """TorchRec's own forward: split the KJT per feature, concatenate, one TBE call per group."""
        return pool_outputs(self.collection(features), features, self.feature_order, self.mean_features)

    def _direct_lookup(self, features):
        """The one TBE call of a single-group collection, fed the KJT's own values and offsets.

        ``FusedEmbeddingBagCollection.forward`` splits the KJT into per-feature tensors and
        concatenates them again before its TBE call (measured: ~40% of the lookup's CPU time at
        B=4096, F=26). When the KJT's keys already are the tables' features in config order, its
        values and offsets are exactly that concatenation, so the call is made on them directly
        (the int64 ids as they are, no conversion copy; same kernel, same fused optimizer in
        backward). Anything else (several TBE groups, weighted bags, another key order, a sharded collection) takes TorchRec's path.
        """
        collection = self.collection
        if (type(collection) is not FusedEmbeddingBagCollection or len(collection._emb_modules) != 1
                or features.weights_or_none() is not None or features.keys() != self.feature_order):
            return None
        values = collection._emb_modules[0](features.values(), features.offsets(), None)
        keyed = KeyedTensor(keys=self.feature_order, length_per_key=self._feature_dims, values=values)
        return pool_outputs(keyed, features, self.feature_order, self.mean_features)

    def fused_optimizer(self):
        return self.collection.fused_optimizer()

    def fused_parameters(self) -> List[nn.Parameter]:
        return list(self.collection.parameters())

    # ---- memory, measured from the tensors held ----
    def weight_bytes(self) -> int:
        return sum(w.numel() * w.element_size() for w in (self.collection.embedding_bags[t.name].weight
                                                          for t in self.physical))

    def optimizer_state_bytes(self) -> int:
        total = 0
        for state in self.fused_optimizer().state.values():
            for value in state.values():
                if isinstance(value, torch.Tensor):
                    total += value.numel() * value.element_size()
        return total

    def unfused_copy(self) -> "PooledCollection":
        """A plain EmbeddingBagCollection with the same weights (the deployable form)."""
        ebc = EmbeddingBagCollection(tables=[t.config() for t in self.physical], device=torch.device("cpu"))
        with torch.no_grad():
            for t in self.physical:
                ebc.embedding_bags[t.name].weight.copy_(self.weight(t.name))
        return PooledCollection(ebc, self.feature_order, self.mean_features)


def column_slices(fused: nn.Module, table: str, rows: int, owner: str) -> List[torch.Tensor]:
    """The weights of ``table`` (``rows`` rows) this process holds, as (rows, D_i) column slices:
    the whole table in one process (fused training form, or the plain collection of a deployable
    copy); under TorchRec sharding (distributed runs: table-wise, column-wise or table-column-wise,
    all of which keep whole rows) this rank's local shards, none when another rank holds the table.
    Row writes (re-initialisations, copies between rows) act on each column independently, so a
    method that applies the same writes to every slice on every rank leaves the sharded table as
    one process would. ``owner`` names the method in errors."""
    if not isinstance(fused, FusedTables):  # the deployable copy's plain collection
        return [fused.collection.embedding_bags[table].weight]
    slices = []
    for row0, _, part in fused.local_parts(table):
        if row0 != 0 or part.shape[0] != rows:
            raise RuntimeError(f"{owner}: a shard of table {table!r} holds rows {row0}..{row0 + part.shape[0]} of "
                               f"{rows}; row writes need whole rows (table-wise or column-wise sharding)")
        slices.append(part)
    return slices


class PooledCollection(nn.Module):
    """A sum-pooling embedding-bag collection + mean division and field order (see FusedTables)."""

    def __init__(self, collection: nn.Module, feature_order: Sequence[str], mean_features: Sequence[str]):
        super().__init__()
        self.collection = collection
        self.feature_order, self.mean_features = list(feature_order), list(mean_features)

    def forward(self, features):
        return pool_outputs(self.collection(features), features, self.feature_order, self.mean_features)


class QuantizedCollection(nn.Module):
    """FBGEMM's n-bit TBE over physical tables (a precision per table), looked up by their features.

    forward(KJT with keys covering the tables' features) -> KeyedTensor with one (B, table.dim)
    block per feature, in the tables' feature order (as ``FusedTables``).
    """

    def __init__(self, physical: Sequence[PhysicalTable], bits: Mapping[str, int],
                 weights: Optional[Mapping[str, torch.Tensor]] = None):
        super().__init__()
        from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation, PoolingMode
        from fbgemm_gpu.split_table_batched_embeddings_ops_inference import IntNBitTableBatchedEmbeddingBagsCodegen

        self.physical = list(physical)
        self.feature_order = [f for t in self.physical for f in t.features]
        self.mean_features = [f for t in self.physical if t.pooling == "mean" for f in t.features]
        self._feature_dims = [t.dim for t in self.physical for _ in t.features]
        self.tbe = IntNBitTableBatchedEmbeddingBagsCodegen(
            embedding_specs=[(t.name, t.rows, t.dim, sparse_type(bits[t.name]), EmbeddingLocation.HOST)
                             for t in self.physical],
            feature_table_map=[i for i, t in enumerate(self.physical) for _ in t.features],
            device="cpu", pooling_mode=PoolingMode.SUM, output_dtype=sparse_type(32))
        skip_bounds_check(self.tbe)  # ids are checked by the embedding module's guard (base.check_ids)
        self.tbe.initialize_weights()  # allocates the row storage (FBGEMM defers it)
        if weights is not None:
            with torch.no_grad():
                for t, dest in zip(self.physical, self.tbe.split_embedding_weights()):
                    for target, source in zip([x for x in dest if x is not None], quantize_rows(weights[t.name], bits[t.name])):
                        target.copy_(source)

    def weight_bytes(self) -> int:
        """Bytes of the stored rows: data, per-row scale/bias and FBGEMM's padding (measured)."""
        return int(self.tbe.weights_host.numel() * self.tbe.weights_host.element_size())

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        if features.keys() != self.feature_order:
            index = {k: i for i, k in enumerate(features.keys())}
            features = features.permute([index[k] for k in self.feature_order])
        out = self.tbe(features.values().to(torch.int64), features.offsets().to(torch.int64))
        keyed = KeyedTensor(keys=self.feature_order, length_per_key=self._feature_dims, values=out)
        return pool_outputs(keyed, features, self.feature_order, self.mean_features)



def pool_outputs(keyed: KeyedTensor, features, order: Sequence[str], mean_features: Sequence[str]) -> KeyedTensor:
    """Sum-pooled lookups -> the configured pooling, with key blocks in ``order``.

    Mean-pooled fields are divided by their bag sizes (an empty bag stays zero). Collections may
    return keys grouped by dtype or pooling, so the blocks are put back in field order.
    """
    if not mean_features and keyed.keys() == list(order):
        return keyed
    blocks = keyed.to_dict()
    for name in mean_features:
        lengths = features[name].lengths().clamp(min=1).to(blocks[name].dtype)
        blocks[name] = blocks[name] / lengths.unsqueeze(1)
    return KeyedTensor(keys=list(order), length_per_key=[blocks[k].shape[1] for k in order],
                       values=torch.cat([blocks[k] for k in order], dim=1))


def closed_form_table_bytes(tables: Sequence[PhysicalTable], optimizer: EmbeddingOptimizer) -> Dict[str, int]:
    """Closed-form fp32 weight bytes and optimizer-state bytes of physical tables."""
    weights = sum(t.rows * t.dim * FP32_BYTES for t in tables)
    state = sum(t.rows * optimizer.state_bytes_per_row(t.dim) for t in tables)
    return {"weights": int(weights), "optimizer_state": int(state)}


def table_memory(physical: Sequence[PhysicalTable], tables: Sequence[TableSpec], dim: int,
                 optimizer: EmbeddingOptimizer, **extra: int) -> MemoryReport:
    """Closed-form memory of fused fp32 tables (weights; + optimizer state while training) plus named
    ``extra`` parts (e.g. ``remap=``) held by both forms (the closed form of ``tables_report``)."""
    parts = closed_form_table_bytes(physical, optimizer)
    held = parts["weights"] + sum(extra.values())
    return MemoryReport(
        inference_bytes=held,
        training_bytes=held + parts["optimizer_state"],
        parameters=sum(t.rows * t.dim for t in physical),
        full_bytes=full_embedding_bytes(tables, dim),
        breakdown={"weights": parts["weights"], **extra},
    )


def physical_tables(tables: Sequence[TableSpec], dim: int, rows: Mapping[str, int]) -> List[PhysicalTable]:
    """One table per field: ``rows[name]`` rows when compressed, the full table otherwise."""
    return [PhysicalTable(t.name, int(rows.get(t.name, t.num_embeddings)), dim, [t.name], t.pooling) for t in tables]


class FusedIdMapEmbedding(EmbeddingModule):
    """Base of modules that rewrite the KJT's ids (``rewrite``), look up ``self.fused`` (a
    FusedTables) and assemble the per-field outputs (``combine``, identity by default)."""

    fused: nn.Module
    #: ``method.quantize`` of a composed plan: the deployable tables' storage (``compose_quantized``)
    quantize: str = "none"

    def __init_subclass__(cls, **kwargs) -> None:
        """A subclass's ``memory_report`` counts its tables at the composed precision."""
        super().__init_subclass__(**kwargs)
        if "memory_report" in cls.__dict__:
            original = cls.__dict__["memory_report"]

            @functools.wraps(original)
            def memory_report(self) -> MemoryReport:
                return self._stored_as_composed(original(self))

            cls.memory_report = memory_report

    def compose_quantized(self, quantize: str) -> None:
        """Deploy the tables row-wise quantized (``blocks/quantized_tables.py``); training is unchanged."""
        self.quantize = quantize

    def _stored_as_composed(self, report: MemoryReport) -> MemoryReport:
        if self.quantize == "none" or f"weights ({self.quantize})" in report.breakdown:  # (applied once)
            return report
        return with_quantized_tables(report, self.fused.physical, self.quantize)

    def rewrite(self, features: KeyedJaggedTensor) -> KeyedJaggedTensor:
        raise NotImplementedError

    def rewritten_keys(self, field: str) -> List[str]:
        """The keys of ``rewrite``'s output that carry ``field``'s ids (one value per id each)."""
        return [field]

    def combine(self, looked_up: KeyedTensor, features: KeyedJaggedTensor) -> KeyedTensor:
        return looked_up

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        return self.combine(self.fused(self.rewrite(features)), features)

    def fused_optimizer(self):
        return self.fused.fused_optimizer()

    def fused_parameters(self) -> List[nn.Parameter]:
        return self.fused.fused_parameters()

    def memory_report(self) -> MemoryReport:
        return self.tables_report()

    def tables_report(self, **parts: int) -> MemoryReport:
        """The tables' measured bytes plus named ``parts`` (e.g. ``remap=``) that the deployable form
        and the training module both hold; optimizer state while training."""
        weights = self.fused.weight_bytes()
        extra = sum(parts.values())
        return self._stored_as_composed(MemoryReport(
            inference_bytes=weights + extra,
            training_bytes=weights + extra + self.fused.optimizer_state_bytes(),
            parameters=sum(p.numel() for p in self.fused.fused_parameters()),
            full_bytes=full_embedding_bytes(self.tables, self.dim),
            breakdown={"weights": weights, **parts},
        ))

    def to_inference(self) -> nn.Module:
        """The same id rewrite over a plain EmbeddingBagCollection with the same weights, or, composed
        with ``method.quantize``, over FBGEMM's n-bit tables holding the rows quantized."""
        if self.quantize == "none":
            stored = self.fused.unfused_copy()
        else:
            stored = QuantizedCollection(self.fused.physical, {t.name: QUANTIZE_BITS[self.quantize] for t in self.fused.physical},
                                         {t.name: self.fused.weight(t.name).detach() for t in self.fused.physical})
        return copy.deepcopy(self, memo={id(self.fused): stored}).eval()
