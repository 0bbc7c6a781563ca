"""``qr``: compositional embeddings from complementary partitions (quotient-remainder trick).

References: Shi, Mudigere, Naumov, Yang, "Compositional Embeddings Using Complementary Partitions
for Memory-Efficient Recommendation Systems", KDD 2020 (arXiv:1909.02107); Hsword/Hetu
tools/EmbeddingMemoryCompression methods/layers/compo.py and methods/scheduler/compo.py (the
default); facebookresearch/dlrm tricks/qr_embedding_bag.py; HugoZHL/CAFE
ArtifactEvaluation/embeddings/init_embed.py.

Mechanism: a field with n ids is covered by k complementary partitions given by the mixed-radix
digits of the id: the k-1 low digits have radix c (the collision count, ``remainder_rows``), the
top digit has radix ceil(n / c^(k-1)); for k=2 this is the quotient-remainder pair
(id // c, id % c): a remainder table of c rows and a quotient table of ceil(n / c) rows. Every id
of the field gets a unique digit tuple, so every id gets a unique composed vector. Digit j is
looked up in its own FBGEMM table ``<field>/p<j>`` (j=0 the most significant digit: the quotient)
and the k vectors are combined by ``mult`` (elementwise product), ``add`` (sum) or ``concat``
(D/k per partition). A multi-hot bag composes per id before pooling: for ``mult`` every id is
looked up as its own bag (lengths rewritten to ones), the product is taken per id, and the per-id
vectors are segment-summed back into the bags (then divided for mean pooling); ``add`` and
``concat`` commute with pooling, so the pooled fused lookups are exact.

Budget (``partition``):
- ``shared_collisions`` (default, Hetu's scheduler): one collision count c for every field, the
  smallest integer c in [1, ceil(N^(1/k))] (N = total rows of all fields) whose bytes fit the
  target; a field is composed only where that is smaller than its plain table (Hetu's
  ``min(n, ceil(n/c) + c)``), else it stays a plain table.
- ``per_field_largest``: a knob r in [0, 1] gives each compressed field the largest m (>= the m
  minimising its rows) whose bytes stay within r times the field's full bytes; r is bisected so
  the total lands in [1 - tolerance, 1] x target.
Fields with fewer than ``budget.min_rows_to_compress`` rows stay plain fp32 tables (charged in full).

Shapes: KJT with F keys and B bags per key -> KeyedTensor (B, F * D).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from recbench.methods.blocks import budget as budget_lib
from recbench.methods.base import CompressionMethod, EmbeddingModule, InfeasibleBudget
from recbench.methods.blocks.tables import FusedTables, PhysicalTable
from recbench.types import FP32_BYTES, Budget, EmbeddingOptimizer, MemoryReport, Plan, TableSpec, full_embedding_bytes

OPERATIONS = ("mult", "add", "concat")
PARTITION_RULES = ("shared_collisions", "per_field_largest")
INITS = ("uniform_largest_field", "variance_preserving")


# ----------------------------------------------------------------------------- pure helpers
def radices(num_embeddings: int, partitions: int, remainder_rows: int) -> List[int]:
    """Mixed radices (most significant first): [ceil(n / m^(k-1)), m, ..., m]."""
    m, k = int(remainder_rows), int(partitions)
    top = -(-int(num_embeddings) // (m ** (k - 1)))
    return [max(top, 1)] + [m] * (k - 1)


def digits(ids: torch.Tensor, partitions: int, remainder_rows: int) -> List[torch.Tensor]:
    """The k mixed-radix digits of ``ids`` (most significant first); for k=2: [id // m, id % m]."""
    m = int(remainder_rows)
    out, rest = [], ids
    for _ in range(int(partitions) - 1):
        out.append(rest % m)
        rest = rest // m
    out.append(rest)
    return out[::-1]


def partition_dim(dim: int, operation: str, partitions: int) -> int:
    if operation != "concat":
        return int(dim)
    if dim % (4 * partitions):
        raise ValueError(f"qr: operation=concat splits D={dim} into {partitions} parts; D must be a multiple of "
                         f"4 * partitions = {4 * partitions} (FBGEMM rows are multiples of 4)")
    return dim // partitions


def field_bytes(num_embeddings: int, partitions: int, remainder_rows: int, part_dim: int) -> int:
    return sum(radices(num_embeddings, partitions, remainder_rows)) * part_dim * FP32_BYTES


def smallest_remainder_rows(num_embeddings: int, partitions: int) -> int:
    """The m minimising the total rows ceil(n / m^(k-1)) + (k-1) m (near n^(1/k))."""
    n, k = int(num_embeddings), int(partitions)
    centre = n ** (1.0 / k)
    candidates = range(max(1, int(centre / 2)), int(2 * centre) + 2)
    return min(candidates, key=lambda m: (sum(radices(n, k, m)), m))


def composes(num_embeddings: int, partitions: int, remainder_rows: int, dim: int, part_dim: int) -> bool:
    """True where the composition is smaller than the plain table (Hetu keeps the field plain otherwise)."""
    return field_bytes(num_embeddings, partitions, remainder_rows, part_dim) < int(num_embeddings) * dim * FP32_BYTES


def shared_collision_bytes(sizes: Sequence[int], kept_rows: int, dim: int, partitions: int, collisions: int,
                           part_dim: int) -> int:
    """Inference bytes with one collision count for the fields of ``sizes``: each field the smaller
    of its composition and its plain table (Hetu's ``min(n, ceil(n/c) + c)``), plus kept tables."""
    plain = lambda n: n * dim * FP32_BYTES  # noqa: E731
    total = sum(min(plain(n), field_bytes(n, partitions, collisions, part_dim)) for n in sizes)
    return int(total + plain(kept_rows))


def _check_choice(key: str, value: Any, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"qr: {key} must be one of {', '.join(allowed)}, got {value!r}")


def _check(operation: str, partitions: int) -> None:
    _check_choice("operation", operation, OPERATIONS)
    if int(partitions) < 2:
        raise ValueError(f"qr: partitions must be >= 2, got {partitions!r}")


# ----------------------------------------------------------------------------- module
class _QRForward(nn.Module):
    """The QR lookup over two table sets (fused while training, plain in the deployable form).

    ``pooled``: tables looked up with the original bags (plain fields; every partition for add and
    concat). ``per_id``: tables looked up with one id per bag (every partition for mult).
    """

    def __init__(self, tables: Sequence[TableSpec], dim: int, hparams: Mapping[str, Any],
                 pooled: Optional[nn.Module], per_id: Optional[nn.Module]):
        super().__init__()
        self.tables, self.dim = list(tables), int(dim)
        self.operation, self.partitions = hparams["operation"], int(hparams["partitions"])
        self.remainder_rows: Dict[str, int] = dict(hparams["remainder_rows"])
        self.pooled, self.per_id = pooled, per_id

    def part_keys(self, name: str) -> List[str]:
        return [f"{name}/p{j}" for j in range(self.partitions)]

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        jagged = features.to_dict()
        batch = features.stride()
        pooled_inputs: Dict[str, tuple] = {}
        per_id_inputs: Dict[str, torch.Tensor] = {}
        for t in self.tables:
            values, lengths = jagged[t.name].values(), jagged[t.name].lengths()
            if t.name not in self.remainder_rows:
                pooled_inputs[t.name] = (values, lengths)
                continue
            for key, digit in zip(self.part_keys(t.name), digits(values, self.partitions, self.remainder_rows[t.name])):
                if self.operation == "mult":
                    per_id_inputs[key] = digit
                else:
                    pooled_inputs[key] = (digit, lengths)
        pooled_out = self._lookup(self.pooled, pooled_inputs) if pooled_inputs else {}
        per_id_out = self._lookup_per_id(per_id_inputs) if per_id_inputs else {}
        blocks = []
        for t in self.tables:
            if t.name not in self.remainder_rows:
                blocks.append(pooled_out[t.name])
                continue
            keys = self.part_keys(t.name)
            if self.operation == "add":
                blocks.append(torch.stack([pooled_out[k] for k in keys]).sum(0))
            elif self.operation == "concat":
                blocks.append(torch.cat([pooled_out[k] for k in keys], dim=1))
            else:
                blocks.append(self._compose_per_id(t, [per_id_out[k] for k in keys], jagged[t.name].lengths(), batch))
        return KeyedTensor(keys=[t.name for t in self.tables], length_per_key=[self.dim] * len(self.tables),
                           values=torch.cat(blocks, dim=1))

    @staticmethod
    def _lookup(collection: nn.Module, inputs: Mapping[str, tuple]) -> Dict[str, torch.Tensor]:
        order = collection.feature_order
        kjt = KeyedJaggedTensor(keys=list(order), values=torch.cat([inputs[k][0] for k in order]),
                                lengths=torch.cat([inputs[k][1].to(torch.int32) for k in order]))
        return collection(kjt).to_dict()

    def _lookup_per_id(self, inputs: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Every id its own bag: stride = the largest id count over the keys (zero-padded bags)."""
        order = self.per_id.feature_order
        stride = max(1, max(int(inputs[k].numel()) for k in order))
        lengths = []
        for k in order:
            n = int(inputs[k].numel())
            lengths.append(torch.cat([torch.ones(n, dtype=torch.int32), torch.zeros(stride - n, dtype=torch.int32)]))
        kjt = KeyedJaggedTensor(keys=list(order), values=torch.cat([inputs[k] for k in order]),
                                lengths=torch.cat(lengths))
        out = self.per_id(kjt).to_dict()
        return {k: out[k][: int(inputs[k].numel())] for k in order}

    def _compose_per_id(self, table: TableSpec, parts: List[torch.Tensor], lengths: torch.Tensor,
                        batch: int) -> torch.Tensor:
        """Product of the partition vectors per id (N, D), segment-summed into the B bags."""
        per_id = parts[0]
        for p in parts[1:]:
            per_id = per_id * p
        bag_of_id = torch.repeat_interleave(torch.arange(batch), lengths.to(torch.long))
        pooled = torch.zeros(batch, self.dim, dtype=per_id.dtype).index_add_(0, bag_of_id, per_id)
        if table.pooling == "mean":
            pooled = pooled / lengths.clamp(min=1).to(pooled.dtype).unsqueeze(1)
        return pooled


def _only(bounds: Mapping[str, float], physical: Sequence[PhysicalTable]) -> Dict[str, float]:
    names = {p.name for p in physical}
    return {name: b for name, b in bounds.items() if name in names}


def physical_tables(tables: Sequence[TableSpec], dim: int, hparams: Mapping[str, Any]):
    """(pooled, per_id) physical tables of the solved configuration."""
    operation, k = hparams["operation"], int(hparams["partitions"])
    part_dim = partition_dim(dim, operation, k)
    pooled, per_id = [], []
    for t in tables:
        m = hparams["remainder_rows"].get(t.name)
        if m is None:
            pooled.append(PhysicalTable(t.name, t.num_embeddings, dim, [t.name], t.pooling))
            continue
        for j, rows in enumerate(radices(t.num_embeddings, k, m)):
            name = f"{t.name}/p{j}"
            if operation == "mult":
                per_id.append(PhysicalTable(name, rows, part_dim, [name], "sum"))
            else:
                pooled.append(PhysicalTable(name, rows, part_dim, [name], t.pooling))
    return pooled, per_id


class QREmbedding(EmbeddingModule):
    """Quotient-remainder compositional embedding. forward: KJT (F keys, B bags) -> (B, F * D)."""

    def __init__(self, tables: Sequence[TableSpec], dim: int, hparams: Mapping[str, Any],
                 optimizer: EmbeddingOptimizer):
        super().__init__(tables, dim)
        self.hparams = dict(hparams)
        pooled, per_id = physical_tables(tables, dim, hparams)
        bounds = self._init_bounds()  # drawn by the tables themselves: a distributed rank draws only its shards
        self.pooled = FusedTables(pooled, optimizer, bounds=_only(bounds, pooled)) if pooled else None
        self.per_id = FusedTables(per_id, optimizer, bounds=_only(bounds, per_id)) if per_id else None
        self.core = _QRForward(tables, dim, hparams, self.pooled, self.per_id)

    def _collections(self) -> List[FusedTables]:
        return [c for c in (self.pooled, self.per_id) if c is not None]

    def _init_bounds(self) -> Dict[str, float]:
        """The init bound b of each physical table, drawn U(-b, b). ``uniform_largest_field`` (Hetu's
        trainer default): every table of the layer, partition or plain, b = 1/sqrt(max_f n_f).
        ``variance_preserving``: partition tables get the b for which the composed vector of an id has
        the variance of the plain table's init, uniform(+-1/sqrt(n)), i.e. 1 / (3 n) per coordinate;
        plain tables keep uniform(+-1/sqrt(n)) (FusedTables' default, not listed)."""
        operation, k = self.hparams["operation"], int(self.hparams["partitions"])
        init = self.hparams.get("init", "variance_preserving")
        largest = max(t.num_embeddings for t in self.tables)
        pooled, per_id = physical_tables(self.tables, self.dim, self.hparams)
        bounds: Dict[str, float] = {}
        for p in [*pooled, *per_id]:
            field = p.name.rsplit("/", 1)[0] if "/" in p.name else None
            composed = field is not None and field in self.hparams["remainder_rows"]
            if init == "uniform_largest_field":
                bounds[p.name] = 1.0 / math.sqrt(largest)
            elif composed:
                n = next(t.num_embeddings for t in self.tables if t.name == field)
                if operation == "mult":
                    bounds[p.name] = math.sqrt(3.0) * (3.0 * n) ** (-1.0 / (2 * k))
                elif operation == "add":
                    bounds[p.name] = 1.0 / math.sqrt(k * n)
                else:
                    bounds[p.name] = 1.0 / math.sqrt(n)
        return bounds

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        return self.core(features)

    def fused_optimizer(self):
        from torchrec.optim.keyed import CombinedOptimizer

        optimizers = [(name, c.fused_optimizer()) for name, c in (("pooled", self.pooled), ("per_id", self.per_id))
                      if c is not None]
        return optimizers[0][1] if len(optimizers) == 1 else CombinedOptimizer(optimizers)

    def fused_parameters(self):
        return [p for c in self._collections() for p in c.fused_parameters()]

    def memory_report(self) -> MemoryReport:
        weights = sum(c.weight_bytes() for c in self._collections())
        state = sum(c.optimizer_state_bytes() for c in self._collections())
        return MemoryReport(
            inference_bytes=weights, training_bytes=weights + state,
            parameters=sum(p.numel() for p in self.fused_parameters()),
            full_bytes=full_embedding_bytes(self.tables, self.dim), breakdown={"weights": weights},
        )

    def to_inference(self) -> nn.Module:
        """Plain EmbeddingBagCollections with the same weights, the same digit rule and composition."""
        pooled = self.pooled.unfused_copy() if self.pooled is not None else None
        per_id = self.per_id.unfused_copy() if self.per_id is not None else None
        return _QRForward(self.tables, self.dim, self.hparams, pooled, per_id).eval()


# ----------------------------------------------------------------------------- method
@dataclass
class QRSettings:
    """Hyperparameters of ``qr`` (defaults: Hetu's ``compo``/``qr``)."""

    operation: str = "mult"  #: mult | add | concat (concat: D / partitions per partition, a multiple of 4)
    partitions: int = 2  #: k >= 2 complementary partitions (mixed-radix digits of the id)
    remainder_rows: Any = "auto"  #: collision count c (remainder rows): auto (solved from the budget) or one integer for every field
    partition: str = "shared_collisions"  #: shared_collisions (one c for all fields, Hetu) | per_field_largest (largest m per field)
    init: str = "uniform_largest_field"  #: uniform_largest_field (U(+-1/sqrt(max_f n_f)), Hetu) | variance_preserving


class QR(CompressionMethod):
    """Compositional embeddings; hyperparameters: ``QRSettings``."""

    name = "qr"
    settings_class = QRSettings

    def check_settings(self) -> None:
        _check(self.operation, int(self.partitions))
        _check_choice("partition", self.partition, PARTITION_RULES)
        _check_choice("init", self.init, INITS)
        remainder_rows = self.remainder_rows
        if remainder_rows != "auto" and not (isinstance(remainder_rows, int) and remainder_rows >= 1):
            raise ValueError(f"qr: remainder_rows must be 'auto' or a positive integer, got {remainder_rows!r}")
        self.partitions = int(self.partitions)

    def _base(self) -> Dict[str, Any]:
        return {"operation": self.operation, "partitions": self.partitions, "partition": self.partition,
                "init": self.init}

    def _shared(self, compressed: Sequence[TableSpec], dim: int, collisions: int) -> Dict[str, int]:
        """Field -> c for the fields where c composes smaller than the plain table."""
        part_dim = partition_dim(dim, self.operation, self.partitions)
        return {t.name: int(collisions) for t in compressed
                if composes(t.num_embeddings, self.partitions, collisions, dim, part_dim)}

    def _candidates(self, tables: Sequence[TableSpec], dim: int, budget: Budget) -> Dict[str, int]:
        """Compressible fields -> the m minimising their rows (fields where it beats the plain table)."""
        part_dim = partition_dim(dim, self.operation, self.partitions)
        compressed, _ = budget_lib.split_tables(tables, budget)
        out = {}
        for t in compressed:
            m0 = smallest_remainder_rows(t.num_embeddings, self.partitions)
            if composes(t.num_embeddings, self.partitions, m0, dim, part_dim):
                out[t.name] = m0
        return out

    def _assign(self, tables, dim, smallest: Mapping[str, int], fraction: float) -> Dict[str, int]:
        part_dim = partition_dim(dim, self.operation, self.partitions)
        out = {}
        for t in tables:
            if t.name not in smallest:
                continue
            n, m0 = t.num_embeddings, smallest[t.name]
            limit = int(fraction * n * dim * FP32_BYTES)
            m = budget_lib.largest_integer_within(lambda x: field_bytes(n, self.partitions, x, part_dim), m0, n, limit)
            out[t.name] = max(m, m0)
        return out

    def solve_hparams(self, tables: Sequence[TableSpec], dim: int, budget: Budget) -> Dict[str, Any]:
        partition_dim(dim, self.operation, self.partitions)  # concat: D must split
        target = budget_lib.target_bytes(tables, dim, budget)
        compressed, _ = budget_lib.split_tables(tables, budget)
        if self.remainder_rows != "auto":  # one fixed c for every field, either rule
            chosen = self._shared(compressed, dim, int(self.remainder_rows))
            hp = dict(self._base(), remainder_rows=chosen)
            achieved = self.memory(tables, dim, hp).inference_bytes
            if achieved > target:
                full = full_embedding_bytes(tables, dim)
                raise InfeasibleBudget(self.name, budget.compression_ratio, achieved / full, achieved / full,
                                       f"remainder_rows={self.remainder_rows} gives ratio {achieved / full:.4g}")
            return hp
        if self.partition == "shared_collisions":
            return dict(self._base(), remainder_rows=self._shared(compressed, dim,
                                                                  self._collisions(tables, dim, budget)))
        smallest = self._candidates(tables, dim, budget)

        def total(fraction: float) -> int:
            hp = dict(self._base(), remainder_rows=self._assign(tables, dim, smallest, fraction))
            return self.memory(tables, dim, hp).inference_bytes

        fraction = budget_lib.bisect_continuous(total, 0.0, 1.0, target)
        hp = dict(self._base(), remainder_rows=self._assign(tables, dim, smallest, fraction))
        budget_lib.land(self.name, self.memory(tables, dim, hp).inference_bytes, tables, dim, budget,
                        total(0.0), total(1.0))
        return hp

    def _collisions(self, tables: Sequence[TableSpec], dim: int, budget: Budget) -> int:
        """Hetu's collision count: the smallest integer c in [1, ceil(N^(1/k))] whose bytes fit the
        target (Hetu bisects the same range for the crossing of target - memory(c)).

        Raises InfeasibleBudget when no c in the range fits."""
        part_dim = partition_dim(dim, self.operation, self.partitions)
        compressed, kept = budget_lib.split_tables(tables, budget)
        sizes, kept_rows = [t.num_embeddings for t in compressed], sum(t.num_embeddings for t in kept)
        total_rows = sum(t.num_embeddings for t in tables)
        target = budget_lib.target_bytes(tables, dim, budget)
        top = max(1, math.ceil(total_rows ** (1.0 / self.partitions)))
        smallest = None
        for c in range(1, top + 1):
            achieved = shared_collision_bytes(sizes, kept_rows, dim, self.partitions, c, part_dim)
            if achieved <= target:
                return c
            smallest = achieved if smallest is None else min(smallest, achieved)
        full = full_embedding_bytes(tables, dim)
        raise InfeasibleBudget(self.name, budget.compression_ratio, smallest / full, 1.0,
                               f"no collision count in [1, {top}] fits (smallest ratio {smallest / full:.4g})")

    def memory(self, tables: Sequence[TableSpec], dim: int, hparams: Mapping[str, Any],
               optimizer: EmbeddingOptimizer = EmbeddingOptimizer()) -> MemoryReport:
        pooled, per_id = physical_tables(tables, dim, hparams)
        physical = pooled + per_id
        weights = sum(p.rows * p.dim * FP32_BYTES for p in physical)
        state = sum(p.rows * optimizer.state_bytes_per_row(p.dim) for p in physical)
        return MemoryReport(
            inference_bytes=int(weights), training_bytes=int(weights + state),
            parameters=int(sum(p.rows * p.dim for p in physical)),
            full_bytes=full_embedding_bytes(tables, dim), breakdown={"weights": int(weights)},
        )

    def build(self, tables: Sequence[TableSpec], dim: int, plan: Plan,
              optimizer: EmbeddingOptimizer = EmbeddingOptimizer()) -> QREmbedding:
        return QREmbedding(tables, dim, plan.hparams, optimizer)
