"""Typed contracts shared by every layer of recbench.

Nothing here imports torch modules or other recbench packages: ``types`` is the root of the
dependency graph (``types`` <- ``datasets``, ``methods``, ``gates``, ``models`` <- ``training`` <- ``cli``).

References: docs/architecture.md section 3 (contracts) and section 4a (protocols).
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import numpy as np

from recbench.checks import check_number

FP32_BYTES = 4
#: ``Budget.sparse_index``: how the index of a pruned (sparse) table is charged
#: (``recbench.methods.blocks.sparse_storage``)
SPARSE_INDEX_RULES = ("compact", "hetu")


def check_sparse_index(value: Any) -> None:
    """ValueError unless ``value`` is one of SPARSE_INDEX_RULES."""
    if value not in SPARSE_INDEX_RULES:
        raise ValueError(f"budget.sparse_index={value!r} is not supported; allowed: {', '.join(SPARSE_INDEX_RULES)}")


@dataclass(frozen=True)
class TableSpec:
    """One sparse field.

    Attributes:
        name: field name; also the TorchRec feature and table name.
        num_embeddings: rows of the uncompressed table, OOV row (index 0) included.
        counts: id frequencies on the training split only, shape (num_embeddings,), int64;
            may be None for tests that do not need them.
        pooling: "sum" or "mean" (how a multi-hot bag is pooled).
        multi_hot: True when a sample can carry several ids for this field.
    """

    name: str
    num_embeddings: int
    counts: Optional[np.ndarray] = field(default=None, compare=False, repr=False)
    pooling: str = "sum"
    multi_hot: bool = False

    def __post_init__(self) -> None:
        if self.num_embeddings < 1:
            raise ValueError(f"table {self.name!r}: num_embeddings must be >= 1, got {self.num_embeddings}")
        if self.pooling not in ("sum", "mean"):
            raise ValueError(f"table {self.name!r}: pooling must be 'sum' or 'mean', got {self.pooling!r}")
        if self.counts is not None and len(self.counts) != self.num_embeddings:
            raise ValueError(
                f"table {self.name!r}: counts has {len(self.counts)} entries, expected {self.num_embeddings}"
            )


@dataclass(frozen=True)
class DatasetSpec:
    """A prepared dataset protocol.

    Attributes:
        name: short protocol name, e.g. "movielens100k".
        protocol_id: name + hash of every setting that changes the numbers.
        num_dense: number of dense features (0 allowed).
        tables: one TableSpec per sparse field, in KeyedJaggedTensor key order.
        split_sizes: rows per split ("train", "val", "test").
        extra_targets: names of extra per-row targets (e.g. "rating"), besides the click label.
        extras: protocol facts worth logging (e.g. the synthetic Bayes-optimal metrics).
    """

    name: str
    protocol_id: str
    num_dense: int
    tables: Sequence[TableSpec]
    split_sizes: Mapping[str, int]
    extra_targets: Sequence[str] = ()
    extras: Mapping[str, Any] = field(default_factory=dict)

    @property
    def feature_names(self) -> List[str]:
        return [t.name for t in self.tables]


def full_embedding_bytes(tables: Sequence[TableSpec], dim: int) -> int:
    """Bytes of the uncompressed fp32 embedding layer: sum_i rows_i * dim * 4."""
    return int(sum(t.num_embeddings for t in tables) * dim * FP32_BYTES)


@dataclass(frozen=True)
class Budget:
    """A memory budget for the embedding layer.

    Attributes:
        compression_ratio: target inference_bytes / full_bytes, in (0, 1].
        min_rows_to_compress: fields with fewer rows stay uncompressed (charged in full).
        tolerance: a solution below (1 - tolerance) x the target still runs, flagged ``under_budget``;
            a budget is infeasible only when nothing the method can build fits under it.
        sparse_index: how the pruning methods' sparse tables are charged (``SPARSE_INDEX_RULES``):
            ``compact`` — the bytes recbench stores (cheapest of dense, CSR, COO, bitmap at the
            narrowest index widths); ``hetu`` — the VLDB 2024 artifact's rule (CSR with int32
            indices or COO with int32 rows and columns, one 4-byte word per value and per index).
    """

    compression_ratio: float = 1.0
    min_rows_to_compress: int = 0
    tolerance: float = 0.1
    sparse_index: str = "compact"

    def __post_init__(self) -> None:
        for key in ("compression_ratio", "tolerance"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"budget.{key} must be a number, got {value!r}")
        if not (0.0 < float(self.compression_ratio) <= 1.0):
            raise ValueError(
                f"budget.compression_ratio must be in (0, 1], got {self.compression_ratio!r}"
            )
        if self.min_rows_to_compress < 0:
            raise ValueError(f"budget.min_rows_to_compress must be >= 0, got {self.min_rows_to_compress}")
        if not (0.0 < self.tolerance < 1.0):
            raise ValueError(f"budget.tolerance must be in (0, 1), got {self.tolerance}")
        check_sparse_index(self.sparse_index)


def under_budget(achieved_ratio: float, budget: Budget) -> bool:
    """Whether a solved ratio lands below ``(1 - tolerance)`` x the requested ratio (tag ``under_budget``)."""
    return achieved_ratio < (1.0 - budget.tolerance) * budget.compression_ratio


@dataclass
class MemoryReport:
    """Bytes of an embedding layer.

    Attributes:
        inference_bytes: every tensor the deployable form needs, at its stored dtype.
        training_bytes: inference-form-independent training state: parameters, optimizer
            state, masks and other buffers held while training.
        parameters: number of trainable scalars while training.
        full_bytes: the uncompressed fp32 reference for the same tables and dim.
        breakdown: named parts of inference_bytes (e.g. {"weights": ..., "remap": ...}).
    """

    inference_bytes: int
    training_bytes: int
    parameters: int
    full_bytes: int
    breakdown: Dict[str, int] = field(default_factory=dict)

    @property
    def compression_ratio(self) -> float:
        return self.inference_bytes / self.full_bytes if self.full_bytes else float("nan")

    def as_metrics(self) -> Dict[str, float]:
        return {
            "emb/bytes_inference": float(self.inference_bytes),
            "emb/bytes_training": float(self.training_bytes),
            "emb/parameters": float(self.parameters),
            "emb/bytes_full": float(self.full_bytes),
            "emb/compression_ratio": float(self.compression_ratio),
        }


class InfeasibleBudget(Exception):
    """The method cannot reach the requested budget: a recorded, skipped run, not a crash."""

    def __init__(self, method: str, requested: float, min_ratio: float, max_ratio: float, reason: str = ""):
        self.method, self.requested = method, requested
        self.min_ratio, self.max_ratio = min_ratio, max_ratio
        detail = f": {reason}" if reason else ""
        super().__init__(
            f"method {method!r} cannot reach compression_ratio={requested:g}; reachable range is "
            f"[{min_ratio:.3g}, {max_ratio:.3g}]{detail}"
        )


@dataclass(frozen=True)
class Plan:
    """What a method's budget solver decided for one job, solved once (``CompressionMethod.solve``);
    ``build`` builds exactly this plan and the job logs it.

    Attributes:
        method: the method's name.
        hparams: the solved, concrete hyperparameters (no ``auto`` left); read-only by convention.
        memory: the closed-form memory of ``hparams`` (``CompressionMethod.memory``).
        requested_ratio: ``budget.compression_ratio``.
        under_budget: the solution lands below (1 - tolerance) x the requested ratio (the run goes
            ahead at the ratio it reaches, tagged ``under_budget=true``).
    """

    method: str
    hparams: Mapping[str, Any]
    memory: MemoryReport
    requested_ratio: float
    under_budget: bool

    @property
    def achieved_ratio(self) -> float:
        """Closed-form inference bytes / full fp32 bytes of the solved hyperparameters."""
        return self.memory.compression_ratio


@dataclass(frozen=True)
class Stage:
    """One stage of a method's training schedule.

    Attributes:
        name: stage name, used as a metric prefix and in checkpoints.
        kind: "train" (the trainer's loop) or "search" (runs ``run`` instead of training).
        max_steps / max_epochs: length limits (None: the trainer's default).
        reset_optimizer: start the stage with fresh optimizer state.
        reinit: re-initialise the model's ``nn.Linear`` layers outside the embedding (the bottom and
            top MLPs) at the stage start. DCNv2's low-rank cross
            kernels (``LowRankCrossNet``'s parameter lists), MoE expert banks and the no-dense
            bias vector keep their trained values: the recorded runs of ``pep``, ``optembed`` and
            ``autosrh`` were made so (PEP's card measured re-initialising the cross network too:
            -0.0012 test AUC, within noise).
        run: for kind="search", a callable(context) -> dict of results.
        early_stopping: end the stage after ``trainer.patience`` evaluations without a val AUC
            gain; False for schedule stages that must run to their end (or until a hook ends
            them), e.g. a pruning schedule whose early, denser checkpoints are not deployable.
        evaluate_at_start: a stage that continues from the previous stage's model evaluates it
            before its first step and counts it as its first checkpoint, so early stopping keeps
            it when the stage only makes validation AUC worse (e.g. a fine-tune after pruning).
    """

    name: str = "train"
    kind: str = "train"
    max_steps: Optional[int] = None
    max_epochs: Optional[float] = None
    reset_optimizer: bool = False
    reinit: bool = False
    run: Optional[Callable[..., Dict[str, Any]]] = None
    early_stopping: bool = True
    evaluate_at_start: bool = False

    def __post_init__(self) -> None:
        if self.kind not in ("train", "search"):
            raise ValueError(f"stage {self.name!r}: kind must be 'train' or 'search', got {self.kind!r}")
        if self.kind == "search" and self.run is None:
            raise ValueError(f"stage {self.name!r}: a search stage needs a run callable")


def format_duration(seconds: float) -> str:
    """A duration for people: ``45 s``, ``12.5 min``, ``3.1 h``."""
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def format_bytes(value: Optional[float], missing: str = "—") -> str:
    """A byte count for people: ``14.6 MB``, ``146 kB``, ``512 B`` (SI units, 3 significant digits);
    ``missing`` when unknown (None or NaN)."""
    if value is None or math.isnan(value):
        return missing
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if value >= size:
            return f"{value / size:.3g} {unit}"
    return f"{value:.0f} B"


def settings_hash(settings: Mapping[str, Any], length: int = 10) -> str:
    """Stable short hash of a JSON-serialisable settings mapping."""
    blob = json.dumps(settings, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


EMBEDDING_OPTIMIZERS = ("sgd", "adagrad", "rowwise_adagrad")


@dataclass(frozen=True)
class EmbeddingOptimizer:
    """Optimizer of embedding parameters.

    Table-backed methods fuse it into FBGEMM's backward (no dense gradient of a table is ever
    built); CPU supports SGD, Adagrad and row-wise Adagrad. Custom-lookup methods use the same
    rule on their own (sparse or small) parameters.
    """

    kind: str = "rowwise_adagrad"
    learning_rate: float = 0.05
    eps: float = 1e-8

    def __post_init__(self) -> None:
        if self.kind not in EMBEDDING_OPTIMIZERS:
            raise ValueError(
                f"optimizer.embedding.kind={self.kind!r} is not supported; allowed: {', '.join(EMBEDDING_OPTIMIZERS)}"
                " (FBGEMM's fused CPU optimizers; Adam is not available for fused tables on CPU)"
            )
        check_number("optimizer.embedding.learning_rate", self.learning_rate, low=0, low_open=True)
        check_number("optimizer.embedding.eps", self.eps, low=0)

    def state_bytes_per_row(self, dim: int) -> int:
        """fp32 optimizer-state bytes per table row."""
        return {"sgd": 0, "adagrad": dim * FP32_BYTES, "rowwise_adagrad": FP32_BYTES}[self.kind]


@dataclass
class ParamGroup:
    """A named group of non-fused trainable parameters (declared by embedding modules and models,
    e.g. MoE gates; optimised by ``recbench.training.optim.build_optimizers``).

    Attributes:
        name: e.g. "embedding", "thresholds", "scales".
        params: the parameters.
        learning_rate: None uses the trainer's rule for ``kind``.
        kind: "dense" (Adam with the dense learning rate) or "sparse" (row-sparse gradients,
            trained with the embedding optimizer's rule and learning rate).
        optimizer: None uses the kind's default (dense: "adam", sparse: "adagrad"); a reference
            that trains a group with another rule names it: dense "adam" | "sgd", sparse
            "adagrad" | "sgd" | "sparse_adam" (``recbench.training.optim.GROUP_OPTIMIZERS``).
        weight_decay: L2 decay of this group (dense optimizers only; torch's sparse optimizers
            take none, so a method that decays sparse rows adds the penalty to its loss).
    """

    name: str
    params: List[Any]  # torch.nn.Parameter (types imports no torch)
    learning_rate: Optional[float] = None
    kind: str = "dense"
    optimizer: Optional[str] = None
    weight_decay: Optional[float] = None
