"""``mch``: TorchRec's managed-collision embeddings (MCH: sorted zero-collision hashing with LFU eviction).

References: pytorch/torchrec ``torchrec/modules/mc_modules.py`` (``MCHManagedCollisionModule``,
``ManagedCollisionCollection``, ``LFU_EvictionPolicy``, ``DistanceLFU_EvictionPolicy``),
``torchrec/modules/mc_embedding_modules.py`` (``ManagedCollisionEmbeddingBagCollection``),
``torchrec/distributed/mc_embedding_modules.py`` (``_evict``: evicted rows and their optimizer state
are reset) and ``torchrec/modules/mc_adapter.py`` (``eviction_interval`` default 1) at
a48cef79ebc333da92af1311c04b041ee21a8e75; run with the installed torchrec 1.8.0.

Mechanism (TorchRec's own modules, not a re-implementation): a managed field f owns a table of m_f
rows (``zch_size``) and an ``MCHManagedCollisionModule`` holding, per slot, the raw id that owns it
(``_mch_sorted_raw_ids``, kept sorted), its row (``_mch_remapped_ids_mapping``) and the eviction
metadata (``_mch_counts``; DistanceLFU adds ``_mch_last_access_iter``). A forward in training mode
appends the batch's ids to a history; every ``eviction_interval`` training forwards the history is
coalesced (unique ids and counts), owned ids' counts grow, and the m_f best of {owned slots, new ids}
by score (LFU: count; DistanceLFU: count / (iter - last_access + 1)^decay) keep or take the slots;
the last slot never leaves (its score is the int64 max) and is the shared row of every id that owns
no slot. Ids are then remapped by a binary search of the sorted raw ids. Evicted slots' rows are
re-initialised (uniform +-1/sqrt(m_f), the EmbeddingBagConfig init) with their optimizer state
zeroed, as TorchRec's sharded MC-EBC does (``reset_evicted``). Eval mode only remaps.
Training form: TorchRec's ``ManagedCollisionCollection`` followed by fused FBGEMM tables (as in
TorchRec's sharded MC-EBC: fused optimizer, no dense gradient). Deployable form: TorchRec's
``ManagedCollisionEmbeddingBagCollection`` over a plain ``EmbeddingBagCollection`` with the same
weights and a copy of the MCH state.

Budget (the per-field rule of ``hashing``, TorchRec prescribes none): ``allocation: cap`` gives every
compressed field m_f = min(n_f, M), M the largest integer whose bytes fit; ``proportional`` gives
m_f = ceil(r n_f), r bisected. A field is managed only when its managed form is smaller than its full
table (m_f (4 D + 8 S) < 4 D n_f, S = 2 + the policy's metadata per slot: 3 for LFU, 4 for
DistanceLFU); otherwise it keeps one row per id, looked up unchanged. Inference bytes = the stored rows
x 4 D + 8 S bytes per managed slot (raw id, row, counters); ``charge_fixed_buffers`` adds each MCH
module's table-size-independent buffers (1025 int64 output segments + the iteration counter, 8,208 B).
Training bytes add the fixed buffers and the tables' optimizer state. Not counted: the history buffer
TorchRec allocates on the first training batch (1.25 x eviction_interval x the batch's ids of the
field, int64; x2 for DistanceLFU), a working buffer sized by the batch, not by the table.
Shapes: KJT (F keys, B bags) -> managed fields' ids remapped to slots -> KeyedTensor (B, F * D).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.modules.mc_embedding_modules import ManagedCollisionEmbeddingBagCollection
from torchrec.modules.mc_modules import (DistanceLFU_EvictionPolicy, LFU_EvictionPolicy, ManagedCollisionCollection,
                                         MCHManagedCollisionModule)
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from recbench.methods.base import CompressionMethod, EmbeddingModule
from recbench.methods.blocks.budget import (bisect_continuous, check_auto, land, largest_integer_within, split_tables,
                                            target_bytes)
from recbench.methods.blocks.per_id import with_values
from recbench.methods.blocks.tables import FusedTables, closed_form_table_bytes, physical_tables, pool_outputs
from recbench.types import FP32_BYTES, Budget, EmbeddingOptimizer, MemoryReport, Plan, TableSpec, full_embedding_bytes

ID_BYTES = 8  #: int64 per slot entry (raw id, row, each metadata counter)
#: MCH buffers whose size does not depend on zch_size: 1025 output segments + the iteration counter
FIXED_BUFFERS = ("_output_segments_tensor", "_current_iter_tensor")
FIXED_BYTES = (1025 + 1) * ID_BYTES
POLICIES = {"lfu": LFU_EvictionPolicy, "distance_lfu": DistanceLFU_EvictionPolicy}


def slot_entries(policy: str) -> int:
    """S: int64 entries per slot — the sorted raw id, the row, and the policy's per-slot metadata."""
    metadata = POLICIES[policy]().metadata_info
    return 2 + sum(1 for m in metadata if m.is_mch_metadata)


def make_policy(policy: str, decay_exponent: float):
    return LFU_EvictionPolicy() if policy == "lfu" else DistanceLFU_EvictionPolicy(decay_exponent=decay_exponent)


def managed_bytes(rows: int, dim: int, entries: int, fixed: bool) -> int:
    """Inference bytes of one managed field of ``rows`` slots."""
    return rows * (dim * FP32_BYTES + entries * ID_BYTES) + (FIXED_BYTES if fixed else 0)


def mch_state_bytes(mcc: Optional[ManagedCollisionCollection]) -> Dict[str, int]:
    """Bytes of the MCH modules' persistent state (their state_dict): per-slot buffers and the
    fixed-size ones (``FIXED_BUFFERS``)."""
    slot = fixed = 0
    for module in (mcc._managed_collision_modules.values() if mcc is not None else []):
        for key, value in module.state_dict().items():
            size = value.numel() * value.element_size()
            if key in FIXED_BUFFERS:
                fixed += size
            else:
                slot += size
    return {"slot": slot, "fixed": fixed}


def mch_memory(tables: Sequence[TableSpec], dim: int, weights: int, optimizer_state: int, parameters: int,
               mch: Mapping[str, int], charge_fixed: bool) -> MemoryReport:
    """Inference: weights + per-slot MCH state (+ fixed buffers when charged); training: + fixed
    buffers + optimizer state."""
    breakdown = {"weights": weights, "mch_slot_state": mch["slot"]}
    if charge_fixed:
        breakdown["mch_fixed_buffers"] = mch["fixed"]
    return MemoryReport(
        inference_bytes=weights + mch["slot"] + (mch["fixed"] if charge_fixed else 0),
        training_bytes=weights + mch["slot"] + mch["fixed"] + optimizer_state,
        parameters=parameters,
        full_bytes=full_embedding_bytes(tables, dim),
        breakdown=breakdown,
    )


def _validate_after_load(module: MCHManagedCollisionModule, incompatible_keys: Any) -> None:
    """TorchRec's load_state_dict post hook of a managed-collision module (re-sorts its buffers)."""
    module.validate_state()


def picklable(module: MCHManagedCollisionModule) -> MCHManagedCollisionModule:
    """``module`` with TorchRec's post-load hook (a closure defined in
    ``ManagedCollisionModule.__init__``, which pickle cannot store) replaced by the same hook at
    module level, so the deployable model can be saved whole (``torch.save``) as every run does."""
    module._load_state_dict_post_hooks.clear()
    module.register_load_state_dict_post_hook(_validate_after_load)
    return module


def managed_rows(tables: Sequence[TableSpec], dim: int, rows: Mapping[str, int], entries: int,
                 fixed: bool) -> Dict[str, int]:
    """{field: m_f} of the fields whose managed form is smaller than their full table."""
    return {t.name: int(rows[t.name]) for t in tables
            if t.name in rows and managed_bytes(int(rows[t.name]), dim, entries, fixed) < t.num_embeddings * dim * FP32_BYTES}


class MCHEmbedding(EmbeddingModule):
    """Managed fields: TorchRec MCH remap + fused tables; others: their full tables.
    forward: KJT (F keys, B bags) -> KeyedTensor (B, F * D).

    Args:
        rows: zch_size m_f of each managed field (absent fields keep one row per id).
        policy: "lfu" or "distance_lfu"; decay_exponent: DistanceLFU's exponent.
        eviction_interval: training forwards between two coalesce/evict steps.
        reset_evicted: re-initialise evicted slots' rows and zero their optimizer state.
        charge_fixed: count the MCH modules' fixed-size buffers in the inference bytes.
    """

    def __init__(self, tables: Sequence[TableSpec], dim: int, rows: Mapping[str, int], policy: str,
                 eviction_interval: int, decay_exponent: float, reset_evicted: bool, optimizer: EmbeddingOptimizer,
                 charge_fixed: bool = False):
        super().__init__(tables, dim)
        self.policy, self.reset_evicted, self.charge_fixed = policy, bool(reset_evicted), bool(charge_fixed)
        self.managed = [t.name for t in self.tables if t.name in rows]
        self.managed_index = [self.feature_names.index(n) for n in self.managed]
        self.rows = {n: int(rows[n]) for n in self.managed}
        self.configs = [EmbeddingBagConfig(name=n, embedding_dim=dim, num_embeddings=self.rows[n], feature_names=[n],
                                           pooling=PoolingType.SUM) for n in self.managed]
        sizes = {t.name: t.num_embeddings for t in self.tables}
        modules = {n: picklable(MCHManagedCollisionModule(zch_size=self.rows[n], device=torch.device("cpu"),
                                                          eviction_policy=make_policy(policy, decay_exponent),
                                                          eviction_interval=int(eviction_interval),
                                                          input_hash_size=sizes[n], name=n)) for n in self.managed}
        self.mcc = ManagedCollisionCollection(modules, self.configs) if self.managed else None
        self.fused = FusedTables(physical_tables(self.tables, dim, self.rows), optimizer)

    # ----- lookup -----
    def rewrite(self, features: KeyedJaggedTensor) -> KeyedJaggedTensor:
        """The KJT with managed fields' ids replaced by their slots (MCH profiles and evicts in training)."""
        if features.keys() != self.feature_names:
            features = features.permute([features.keys().index(n) for n in self.feature_names])
        if self.mcc is None:
            return features
        everything = len(self.managed) == len(self.feature_names)
        remapped = self.mcc(features if everything else features.permute(self.managed_index))
        self.apply_evictions(self.mcc.evict())
        if everything:
            return with_values(features, remapped.values())
        parts = list(features.values().split(features.length_per_key()))
        for index, values in zip(self.managed_index, remapped.values().split(remapped.length_per_key())):
            parts[index] = values
        return with_values(features, torch.cat(parts))

    def rewritten_keys(self, field: str) -> List[str]:
        """The keys of ``rewrite``'s output carrying ``field``'s rows (one per id): the field itself."""
        return [field]

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        return self.fused(self.rewrite(features))

    @torch.no_grad()
    def apply_evictions(self, evictions: Mapping[str, Optional[torch.Tensor]]) -> None:
        """Rows handed to new ids: uniform(+-1/sqrt(m_f)) weights, zero optimizer state (TorchRec's
        sharded ``_evict``: ``reset_embedding_weight_momentum`` then the table's ``init_fn``)."""
        if not self.reset_evicted:
            return
        state = self.fused.fused_optimizer().state
        for name, rows in evictions.items():
            if rows is None or not rows.numel():
                continue
            rows = rows.long()
            weight = self.fused.weight(name)
            bound = 1.0 / math.sqrt(self.rows[name])
            weight[rows] = torch.empty(rows.numel(), weight.shape[1], dtype=weight.dtype).uniform_(-bound, bound)
            for key, per_param in state.items():  # keyed by FBGEMM's view of each table's weights
                if isinstance(key, torch.Tensor) and key.data_ptr() == weight.data_ptr():
                    for value in per_param.values():
                        if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == weight.shape[0]:
                            value[rows] = 0

    # ----- contract -----
    def fused_optimizer(self):
        return self.fused.fused_optimizer()

    def fused_parameters(self) -> List[nn.Parameter]:
        return self.fused.fused_parameters()

    def mch_modules(self) -> Dict[str, MCHManagedCollisionModule]:
        return dict(self.mcc._managed_collision_modules.items()) if self.mcc is not None else {}

    def memory_report(self) -> MemoryReport:
        return mch_memory(self.tables, self.dim, self.fused.weight_bytes(), self.fused.optimizer_state_bytes(),
                          sum(p.numel() for p in self.fused.fused_parameters()), mch_state_bytes(self.mcc),
                          self.charge_fixed)

    def to_inference(self) -> nn.Module:
        """TorchRec's ManagedCollisionEmbeddingBagCollection (plain EBC, same weights, a copy of the
        MCH state) for managed fields; a plain collection for the others."""
        plain = self.fused.unfused_copy().collection
        mc_ebc = None
        if self.mcc is not None:
            mcc = copy.deepcopy(self.mcc)
            ebc = EmbeddingBagCollection(tables=list(mcc.embedding_configs()), device=torch.device("cpu"))
            with torch.no_grad():
                for name in self.managed:
                    ebc.embedding_bags[name].weight.copy_(self.fused.weight(name))
            mc_ebc = ManagedCollisionEmbeddingBagCollection(ebc, mcc)
        others = [t for t in self.fused.physical if t.name not in set(self.managed)]
        rest = None
        if others:
            rest = EmbeddingBagCollection(tables=[t.config() for t in others], device=torch.device("cpu"))
            with torch.no_grad():
                for t in others:
                    rest.embedding_bags[t.name].weight.copy_(plain.embedding_bags[t.name].weight)
        return MCHInference(self.tables, self.dim, mc_ebc, rest, self.managed_index, self.charge_fixed).eval()


class MCHInference(EmbeddingModule):
    """Deployable form: TorchRec MC-EBC (managed fields) + a plain EBC (the rest).
    forward: KJT (F keys, B bags) -> KeyedTensor (B, F * D)."""

    def __init__(self, tables: Sequence[TableSpec], dim: int, mc_ebc: Optional[nn.Module], rest: Optional[nn.Module],
                 managed_index: Sequence[int], charge_fixed: bool = False):
        super().__init__(tables, dim)
        self.mc_ebc, self.rest, self.charge_fixed = mc_ebc, rest, charge_fixed
        self.managed_index = list(managed_index)
        self.rest_index = [i for i in range(len(self.tables)) if i not in set(self.managed_index)]
        self.mean_features = [t.name for t in self.tables if t.pooling == "mean"]

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        if features.keys() != self.feature_names:
            features = features.permute([features.keys().index(n) for n in self.feature_names])
        blocks: Dict[str, torch.Tensor] = {}
        if self.mc_ebc is not None:
            part = features if not self.rest_index else features.permute(self.managed_index)
            blocks.update(self.mc_ebc(part)[0].to_dict())
        if self.rest is not None:
            part = features if not self.managed_index else features.permute(self.rest_index)
            blocks.update(self.rest(part).to_dict())
        keyed = KeyedTensor(keys=self.feature_names, length_per_key=[self.dim] * len(self.feature_names),
                            values=torch.cat([blocks[n] for n in self.feature_names], dim=1))
        return pool_outputs(keyed, features, self.feature_names, self.mean_features)

    def memory_report(self) -> MemoryReport:
        """The deployable bytes (no optimizer state)."""
        weights = sum(p.numel() * p.element_size() for p in self.parameters())
        mcc = self.mc_ebc._managed_collision_collection if self.mc_ebc is not None else None
        return mch_memory(self.tables, self.dim, weights, 0, sum(p.numel() for p in self.parameters()),
                          mch_state_bytes(mcc), self.charge_fixed)


@dataclass
class MCHSettings:
    """Hyperparameters of ``mch`` (defaults: TorchRec's MCH with LFU eviction at every training batch)."""

    zch_size: Any = "auto"  #: slots (table rows) per managed field, solved from the budget by `allocation`
    #: cap: m_f = min(n_f, M), M solved (hashing's default) | proportional: m_f = ceil(r * n_f), r solved
    allocation: str = "cap"
    eviction_policy: str = "lfu"  #: lfu (LFU_EvictionPolicy) | distance_lfu (DistanceLFU_EvictionPolicy)
    eviction_interval: int = 1  #: training forwards between evictions (TorchRec's McEmbeddingCollectionAdapter: 1)
    decay_exponent: float = 1.0  #: distance_lfu only: score = count / (iter - last_access + 1) ** decay_exponent
    #: True: evicted slots get a fresh row and zero optimizer state (TorchRec's sharded MC-EBC) |
    #: False: they keep the evicted id's row (unsharded MC-EBC, whose evict() is a no-op)
    reset_evicted: bool = True
    #: True: inference bytes also count each MCH module's fixed 8,208 B (1025 int64 output segments +
    #: the iteration counter: tensors the deployable MC-EBC holds and its remap reads) | False: only the
    #: tables and the per-slot MCH state (a named variant: the per-field constant left out)
    charge_fixed_buffers: bool = True


class MCH(CompressionMethod):
    """TorchRec managed-collision embeddings; hyperparameters: ``MCHSettings``."""

    name = "mch"
    settings_class = MCHSettings

    ALLOCATIONS = ("cap", "proportional")

    def check_settings(self) -> None:
        check_auto(self.name, "zch_size", self.zch_size)
        if self.allocation not in self.ALLOCATIONS:
            raise ValueError(f"method 'mch': allocation={self.allocation!r}; allowed: {', '.join(self.ALLOCATIONS)}")
        if self.eviction_policy not in POLICIES:
            raise ValueError(f"method 'mch': eviction_policy={self.eviction_policy!r}; allowed: {', '.join(POLICIES)}")
        if isinstance(self.eviction_interval, bool) or not isinstance(self.eviction_interval, int) \
                or self.eviction_interval < 1:
            raise ValueError(f"method 'mch': eviction_interval={self.eviction_interval!r}; allowed: an integer >= 1")
        if not float(self.decay_exponent) > 0:
            raise ValueError(f"method 'mch': decay_exponent={self.decay_exponent!r}; allowed: a number > 0")
        self.decay_exponent = float(self.decay_exponent)
        for key in ("reset_evicted", "charge_fixed_buffers"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"method 'mch': {key}={getattr(self, key)!r}; allowed: true, false")
        self.entries = slot_entries(self.eviction_policy)

    def field_rows(self, compressed: Sequence[TableSpec], knob) -> Dict[str, int]:
        if self.allocation == "cap":
            return {t.name: max(1, min(t.num_embeddings, int(knob))) for t in compressed}
        return {t.name: max(1, min(t.num_embeddings, math.ceil(knob * t.num_embeddings))) for t in compressed}

    def solve_hparams(self, tables: Sequence[TableSpec], dim: int, budget: Budget) -> Dict[str, Any]:
        compressed, _ = split_tables(tables, budget)
        limit = target_bytes(tables, dim, budget)

        def rows_at(knob) -> Dict[str, int]:
            return managed_rows(tables, dim, self.field_rows(compressed, knob), self.entries, self.charge_fixed_buffers)

        def bytes_at(knob) -> int:
            return self.memory(tables, dim, {"rows": rows_at(knob)}).inference_bytes

        extra: Dict[str, Any] = {}
        if self.allocation == "cap":
            largest = max((t.num_embeddings for t in compressed), default=1)
            knob = max(largest_integer_within(bytes_at, 1, largest, limit), 1)
            low, high = bytes_at(1), bytes_at(largest)
            extra["row_cap"] = int(knob)
        else:
            knob = bisect_continuous(bytes_at, 0.0, 1.0, limit)
            low, high = bytes_at(0.0), bytes_at(1.0)
            extra["row_fraction"] = float(knob)
        land(self.name, bytes_at(knob), tables, dim, budget, low, high,
             "one slot per compressed field already exceeds the budget")
        return {"rows": rows_at(knob), **extra, "allocation": self.allocation,
                "eviction_policy": self.eviction_policy, "eviction_interval": int(self.eviction_interval)}

    def memory(self, tables: Sequence[TableSpec], dim: int, hparams: Mapping[str, Any],
               optimizer: EmbeddingOptimizer = EmbeddingOptimizer()) -> MemoryReport:
        rows = {k: int(v) for k, v in hparams["rows"].items()}
        layout = physical_tables(tables, dim, rows)
        parts = closed_form_table_bytes(layout, optimizer)
        mch = {"slot": sum(rows.values()) * self.entries * ID_BYTES, "fixed": len(rows) * FIXED_BYTES}
        return mch_memory(tables, dim, parts["weights"], parts["optimizer_state"], sum(p.rows * p.dim for p in layout),
                          mch, self.charge_fixed_buffers)

    def build(self, tables: Sequence[TableSpec], dim: int, plan: Plan,
              optimizer: EmbeddingOptimizer = EmbeddingOptimizer()) -> MCHEmbedding:
        return MCHEmbedding(tables, dim, plan.hparams["rows"], self.eviction_policy, self.eviction_interval,
                            self.decay_exponent, self.reset_evicted, optimizer, self.charge_fixed_buffers)
