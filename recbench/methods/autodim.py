"""``autodim``: AutoDim — per-field Gumbel-softmax search over candidate widths, then retrain.

References: Zhao, Liu, Guo, Yin, Liu, Tang, Tang, "AutoDim: Field-aware Embedding Dimension Search in
Recommender Systems", WWW 2021 (arXiv:2002.11252); Hsword/Hetu ``tools/EmbeddingMemoryCompression``
``methods/layers/autodim.py`` (``AutoDimEmbedding``, ``AutoDimRetrainEmbedding``),
``methods/scheduler/autodim.py`` (``AutoDimOverallTrainer``, ``AutoDimTrainer``, ``AutoDimRetrainer``),
``methods/scheduler/base.py`` (default initializer) and ``run_compressed.py`` (alpha_lr 1e-3, r 1e-2,
reset_retrain 0, ignore_second 1) @ a1cb1bcaf236c9f1d452733b105997d50c16c9df.

Mechanism (Hetu's defaults). Candidates 2, 4, 8, ..., D (doubling from 2, the last one set to D).
``search`` stage: every candidate d has a table over all rows (R, d), per-field projections
W_d (F, d, D) and biases b_d (F, D), and a BatchNorm over D without scale or shift (momentum 0.1,
eps 1e-5) applied to the (B * F, D) projected rows. Architecture weights alpha (F, C). The output of
field f is sum_c p_fc BN_c(e_c W_c[f] + b_c[f]) with
p_f = softmax((log_softmax(alpha_f) + g_f) / tau), g ~ Gumbel(0, 1) drawn once per forward
((F, C), shared by the batch), tau = max(0.01, 1 - 2.5e-8 * batch_size * t) after t training steps.
Each training step updates tables, projections and the dense model on a training batch (alpha
excluded); then alpha takes one plain SGD step (lr ``alpha_learning_rate``) on the next validation
batch with BatchNorm on its running statistics and tau not advanced (Hetu's first-order update,
``ignore_second=1``). The stage ends on its best validation checkpoint. The chosen width of field f
is argmax_c alpha_fc. ``retrain`` stage: field f keeps the (n_f, d_f) slice of its chosen
candidate's table, W_{d_f}[f] and b_{d_f}[f] (``retrain_init: inherit``, Hetu's reset_retrain 0;
BatchNorm is dropped), as a linear map with bias to D; fresh optimizer state.

Budget (Hetu ignores ``compress_rate`` for AutoDim; recbench's rule is added): deployable bytes =
sum_f (n_f d_f + d_f D + D) * 4 over the compressed fields + kept fields at D. When the argmax
widths exceed the target, fields step down to their next smaller candidate, cheapest first
(least loss of log-softmax(alpha) per byte saved), until they fit. The solver refuses a budget the
all-2 structure exceeds; the plan's closed form is the cap min(target, all-D structure), the
search module reports that cap as its inference bytes, and the retrain module measures its own.

Shapes: KJT (F keys, B bags) -> pooled (F, B, d) per candidate -> (F, B, D, C) -> KeyedTensor (B, F * D).
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

from recbench.methods.autosrh import SelectionStep
from recbench.methods.blocks.restore_best import RestoreBest
from recbench.methods.base import CompressionMethod, EmbeddingModule, Hook, InfeasibleBudget, ParamGroup
from recbench.methods.blocks import budget as budget_lib
from recbench.models.tasks import training_loss
from recbench.types import FP32_BYTES, Budget, EmbeddingOptimizer, MemoryReport, Plan, Stage, TableSpec, full_embedding_bytes

RETRAIN_INITS = ("inherit", "scratch")
BN_MOMENTUM, BN_EPS = 0.1, 1e-5  # Hetu's batch_normalization_op defaults
TEMPERATURE_DECAY_PER_SAMPLE = 0.00005 / 2000  # Hetu: temperature_decay = 0.00005 / 2000 * batch_size


# ----------------------------------------------------------------------------- pure helpers
def dim_candidates(dim: int) -> List[int]:
    """Hetu's ``get_dim_candidates``: 2, 4, 8, ... doubling while below D, the last set to D."""
    out = [2]
    while out[-1] < dim:
        out.append(2 * out[-1])
    out[-1] = dim
    return out


def field_bytes(rows: int, d: int, dim: int) -> int:
    """Deployable fp32 bytes of one searched field: table (rows, d), projection (d, D), bias (D)."""
    return (rows * d + d * dim + dim) * FP32_BYTES


def deployable_bytes(compressed: Sequence[TableSpec], kept: Sequence[TableSpec], dims: Sequence[int], dim: int) -> int:
    return int(sum(field_bytes(t.num_embeddings, d, dim) for t, d in zip(compressed, dims))
               + budget_lib.kept_bytes(kept, dim))


def mixture_weights(alpha: torch.Tensor, gumbel: torch.Tensor, temperature: float) -> torch.Tensor:
    """(F, C) Hetu's p = softmax((log_softmax(alpha) + g) / tau) over the candidates."""
    return torch.softmax((torch.log_softmax(alpha, dim=-1) + gumbel) / temperature, dim=-1)


def choose_dims(alpha: np.ndarray, candidates: Sequence[int], rows: Sequence[int], dim: int, limit: int) -> List[int]:
    """Candidate index per field: argmax alpha (Hetu's ``make_retrain``); while the searched fields'
    bytes exceed ``limit``, the field whose step to its next smaller candidate loses the least
    log-softmax(alpha) per byte saved steps down (ties: the lower field index)."""
    alpha = np.asarray(alpha, dtype=np.float64)
    logp = alpha - alpha.max(axis=1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(axis=1, keepdims=True))
    index = [int(i) for i in np.argmax(alpha, axis=1)]

    def total() -> int:
        return sum(field_bytes(n, candidates[i], dim) for n, i in zip(rows, index))

    while total() > limit:
        best, best_cost = None, math.inf
        for f, i in enumerate(index):
            if i == 0:
                continue
            saved = field_bytes(rows[f], candidates[i], dim) - field_bytes(rows[f], candidates[i - 1], dim)
            cost = (logp[f, i] - logp[f, i - 1]) / saved
            if cost < best_cost:
                best, best_cost = f, cost
        if best is None:
            raise InfeasibleBudget("autodim", float("nan"), 0.0, 0.0, "every field is at its smallest candidate")
        index[best] -= 1
    return index


class _Bags:
    """One batch's field-major bags of a field set (``jagged``: the KJT's ``to_dict()``): ids (N,)
    shifted by each field's row start, bag offsets (F * B,), per-(field, bag) bias counts (F, B) (the
    bag size under sum pooling, 1 for a non-empty mean-pooled bag) and divisors (F, B, 1)."""

    def __init__(self, jagged: Mapping[str, Any], batch: int, tables: Sequence[TableSpec], starts: Sequence[int]):
        self.tables, self.batch = list(tables), int(batch)
        ids, lengths = [], []
        for t, start in zip(tables, starts):
            ids.append(jagged[t.name].values().to(torch.long) + start)
            lengths.append(jagged[t.name].lengths().to(torch.long))
        length = torch.stack(lengths)
        flat = length.flatten()
        self.ids = torch.cat(ids)
        self.offsets = torch.cat([flat.new_zeros(1), torch.cumsum(flat, 0)[:-1]])
        mean = torch.tensor([t.pooling == "mean" for t in tables]).unsqueeze(1)
        self.counts = torch.where(mean, (length > 0).to(length.dtype), length)
        self.divisor = torch.where(mean, length.clamp(min=1), torch.ones_like(length)).to(torch.float32).unsqueeze(-1)

    def lookup(self, weight: torch.Tensor) -> torch.Tensor:
        """(F, B, d) pooled rows of ``weight`` (stacked rows of every field), row-sparse gradients."""
        out = F.embedding_bag(self.ids, weight, self.offsets, mode="sum", sparse=True)
        return out.view(len(self.tables), self.batch, -1) / self.divisor


def _starts(tables: Sequence[TableSpec]) -> List[int]:
    return [int(x) for x in np.cumsum([0] + [t.num_embeddings for t in tables])[:-1]]


# ----------------------------------------------------------------------------- modules
class AutoDimRetrainEmbedding(EmbeddingModule):
    """Searched field f: table (n_f, d_f), projection (d_f, D) and bias (D) (Hetu's
    ``AutoDimRetrainEmbedding``: lookup then ``linear_op``); kept fields: (n, D) tables.
    forward: KJT (F keys, B bags) -> (B, F * D); a bag of ids x is sum_x (e_x W_f + b_f) (mean: / n)."""

    def __init__(self, tables: Sequence[TableSpec], dim: int, hparams: Mapping[str, Any], dims: Mapping[str, int]):
        super().__init__(tables, dim)
        self.hparams, self.dims = dict(hparams), {k: int(v) for k, v in dims.items()}
        self.searched = [t for t in self.tables if t.name in self.dims]
        self.kept = [t for t in self.tables if t.name not in self.dims]
        self.weights = nn.ParameterList([nn.Parameter(torch.zeros(t.num_embeddings, self.dims[t.name]))
                                         for t in self.searched])
        self.projections = nn.ParameterList([nn.Parameter(torch.zeros(self.dims[t.name], dim)) for t in self.searched])
        self.biases = nn.ParameterList([nn.Parameter(torch.zeros(dim)) for _ in self.searched])
        self.kept_weight = nn.Parameter(torch.zeros(sum(t.num_embeddings for t in self.kept), dim)) if self.kept else None

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        out, jagged, batch = {}, features.to_dict(), features.stride()
        for i, t in enumerate(self.searched):
            bags = _Bags(jagged, batch, [t], [0])
            out[t.name] = bags.lookup(self.weights[i])[0] @ self.projections[i] + bags.counts[0].unsqueeze(-1) * self.biases[i]
        if self.kept:
            bags = _Bags(jagged, batch, self.kept, _starts(self.kept))
            for t, x in zip(self.kept, bags.lookup(self.kept_weight)):
                out[t.name] = x
        return self.keyed_output(torch.cat([out[t.name] for t in self.tables], dim=1))

    def sparse_parameters(self) -> List[nn.Parameter]:
        return list(self.weights) + ([self.kept_weight] if self.kept_weight is not None else [])

    def param_groups(self) -> List[ParamGroup]:
        dense = list(self.projections) + list(self.biases)
        return ([ParamGroup("tables", self.sparse_parameters(), kind="sparse")]
                + ([ParamGroup("projections", dense)] if dense else []))

    def memory_report(self) -> MemoryReport:
        tables = sum(p.numel() for p in self.sparse_parameters()) * FP32_BYTES
        projections = sum(p.numel() for p in list(self.projections) + list(self.biases)) * FP32_BYTES
        return MemoryReport(
            inference_bytes=int(tables + projections),
            training_bytes=int(2 * tables + 3 * projections),  # Adagrad's sum; Adam's two moments
            parameters=int((tables + projections) // FP32_BYTES), full_bytes=full_embedding_bytes(self.tables, self.dim),
            breakdown={"weights": int(tables), "projections": int(projections)})

    def to_inference(self) -> nn.Module:
        return copy.deepcopy(self).eval()


class AutoDimSearchEmbedding(EmbeddingModule):
    """Hetu's ``AutoDimEmbedding`` over the searched fields (kept fields: plain (n, D) tables).

    Train mode: the Gumbel-softmax mixture of the candidates (BatchNorm on batch statistics, or on
    running statistics while ``alpha_step`` is set). Eval mode: the deployable form of the current
    choice (``chosen``), BatchNorm's running statistics folded into each field's projection.
    forward: KJT (F keys, B bags) -> (B, F * D); alpha (F_s, C).
    """

    def __init__(self, tables: Sequence[TableSpec], dim: int, hparams: Mapping[str, Any]):
        super().__init__(tables, dim)
        self.hparams = dict(hparams)
        kept = set(hparams["kept"])
        self.searched = [t for t in self.tables if t.name not in kept]
        self.kept = [t for t in self.tables if t.name in kept]
        self.candidates = [int(d) for d in hparams["candidates"]]
        fs, rows = len(self.searched), sum(t.num_embeddings for t in self.searched)
        self.starts = _starts(self.searched)
        self.tables_c = nn.ParameterList([nn.Parameter(torch.zeros(rows, d)) for d in self.candidates])
        self.projections = nn.ParameterList([nn.Parameter(torch.zeros(fs, d, dim)) for d in self.candidates])
        self.biases = nn.ParameterList([nn.Parameter(torch.zeros(fs, dim)) for _ in self.candidates])
        for i, _ in enumerate(self.candidates):
            self.register_buffer(f"bn_mean_{i}", torch.zeros(dim))
            self.register_buffer(f"bn_var_{i}", torch.ones(dim))
        # stepped by ``ArchitectureStep`` only (Hetu: excluded from the model's optimizer)
        self.alpha = nn.Parameter(torch.zeros(fs, len(self.candidates)), requires_grad=False)
        self.kept_weight = nn.Parameter(torch.zeros(sum(t.num_embeddings for t in self.kept), dim)) if self.kept else None
        self.register_buffer("temperature_step", torch.zeros((), dtype=torch.int64))
        self.temperature_decay = 0.0  # per step; set from the batch size at the stage start (``ArchitectureStep``)
        self.alpha_step = False
        self.initialise()

    @torch.no_grad()
    def initialise(self) -> None:
        """Hetu's default initializer U(-b, b), b = sqrt(1 / max_f n_f), for tables, projections and
        alpha; zero biases."""
        bound = math.sqrt(1.0 / max(t.num_embeddings for t in self.tables))
        for p in list(self.tables_c) + list(self.projections) + [self.alpha]:
            p.uniform_(-bound, bound)
        for p in self.biases:
            p.zero_()
        if self.kept_weight is not None:
            self.kept_weight.uniform_(-bound, bound)

    def bn_stats(self, i: int) -> Tuple[torch.Tensor, torch.Tensor]:
        return getattr(self, f"bn_mean_{i}"), getattr(self, f"bn_var_{i}")

    def temperature(self) -> float:
        return max(float(self.hparams["temperature_min"]), 1.0 - self.temperature_decay * int(self.temperature_step))

    def gumbel_noise(self) -> torch.Tensor:
        """(F, C) Gumbel(0, 1) draws -log(E), E ~ Exp(1) (Hetu's ``gumbel_sample_op``: one per forward)."""
        return -torch.empty_like(self.alpha).exponential_().log()

    def chosen(self) -> List[int]:
        """Candidate index per searched field: budget-constrained argmax of alpha (``choose_dims``)."""
        return choose_dims(self.alpha.detach().numpy(), self.candidates, [t.num_embeddings for t in self.searched],
                           self.dim, int(self.hparams["searched_limit"]))

    def candidate_output(self, bags: "_Bags", i: int, batch_stats: bool) -> torch.Tensor:
        """(F, B, D) BN_c(pooled e_c W_c + counts b_c) of candidate i."""
        x = torch.einsum("fbd,fde->fbe", bags.lookup(self.tables_c[i]), self.projections[i])
        mean, var = self.bn_stats(i)
        if batch_stats:
            x = x + bags.counts.unsqueeze(-1) * self.biases[i].unsqueeze(1)
            return F.batch_norm(x.reshape(-1, self.dim), mean, var, None, None, True, BN_MOMENTUM, BN_EPS).view_as(x)
        return (x + bags.counts.unsqueeze(-1) * (self.biases[i] - mean).unsqueeze(1)) / torch.sqrt(var + BN_EPS)

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        out, jagged, batch = {}, features.to_dict(), features.stride()
        if self.searched:
            bags = _Bags(jagged, batch, self.searched, self.starts)
            if self.training:
                stacked = torch.stack([self.candidate_output(bags, i, not self.alpha_step)
                                       for i in range(len(self.candidates))], dim=-1)  # (F, B, D, C)
                p = mixture_weights(self.alpha, self.gumbel_noise(), self.temperature())
                x = torch.einsum("fbec,fc->fbe", stacked, p)
            else:
                index = torch.tensor(self.chosen())
                x = torch.zeros(len(self.searched), bags.batch, self.dim)
                for i in sorted(set(index.tolist())):
                    x = torch.where((index == i).view(-1, 1, 1), self.candidate_output(bags, i, False), x)
            out.update({t.name: x[f] for f, t in enumerate(self.searched)})
        if self.kept:
            bags = _Bags(jagged, batch, self.kept, _starts(self.kept))
            out.update({t.name: v for t, v in zip(self.kept, bags.lookup(self.kept_weight))})
        return self.keyed_output(torch.cat([out[t.name] for t in self.tables], dim=1))

    @torch.no_grad()
    def deployable(self, fold_batch_norm: bool) -> AutoDimRetrainEmbedding:
        """The retrain / deployable module of the current choice: field f takes rows of its chosen
        candidate's table, W_c[f] and b_c[f]; ``fold_batch_norm`` folds BN's running statistics in
        (the exact eval-mode output), otherwise BN is dropped (Hetu's retrain)."""
        index = self.chosen()
        dims = {t.name: self.candidates[i] for t, i in zip(self.searched, index)}
        module = AutoDimRetrainEmbedding(self.tables, self.dim, self.hparams, dims)
        for f, (t, i) in enumerate(zip(self.searched, index)):
            start = self.starts[f]
            w, b = self.projections[i][f].clone(), self.biases[i][f].clone()
            if fold_batch_norm:
                mean, var = self.bn_stats(i)
                scale = torch.sqrt(var + BN_EPS)
                w, b = w / scale, (b - mean) / scale
            module.weights[f].copy_(self.tables_c[i][start:start + t.num_embeddings])
            module.projections[f].copy_(w)
            module.biases[f].copy_(b)
        if self.kept_weight is not None:
            module.kept_weight.copy_(self.kept_weight)
        return module

    def sparse_parameters(self) -> List[nn.Parameter]:
        return list(self.tables_c) + ([self.kept_weight] if self.kept_weight is not None else [])

    def param_groups(self) -> List[ParamGroup]:
        return [ParamGroup("tables", self.sparse_parameters(), kind="sparse"),
                ParamGroup("projections", list(self.projections) + list(self.biases))]

    def memory_report(self) -> MemoryReport:
        tables = sum(p.numel() for p in self.sparse_parameters()) * FP32_BYTES
        dense = sum(p.numel() for p in list(self.projections) + list(self.biases)) * FP32_BYTES
        buffers = sum(b.numel() * b.element_size() for b in self.buffers())
        alpha = self.alpha.numel() * FP32_BYTES
        return MemoryReport(
            inference_bytes=int(self.hparams["cap_bytes"]),
            training_bytes=int(2 * tables + 3 * dense + alpha + buffers),
            parameters=int((tables + dense + alpha) // FP32_BYTES), full_bytes=full_embedding_bytes(self.tables, self.dim),
            breakdown={"cap": int(self.hparams["cap_bytes"])})

    def to_inference(self) -> nn.Module:
        return self.deployable(fold_batch_norm=True).eval()


# ----------------------------------------------------------------------------- hooks
class RestoreBestSearch(RestoreBest):
    """The search stage ends on its best validation checkpoint (Hetu's ``load_best_ckpt``)."""

    STAGES = ("search",)


class ArchitectureStep(SelectionStep):
    """Stage ``search``: the temperature's step count advances after every training step, then alpha
    takes one SGD step on the next validation batch (Hetu's ``first_stage_train_step_without_second_order``:
    the ``alpha`` subexecutor on validation data, inference mode, so BN uses its running statistics)."""

    def on_stage_start(self, context: Any) -> None:
        super().on_stage_start(context)
        module = context.embedding
        if isinstance(module, AutoDimSearchEmbedding):
            decay = module.hparams["temperature_decay"]
            module.temperature_decay = (TEMPERATURE_DECAY_PER_SAMPLE * context.trainer.config.batch_size
                                        if decay == "auto" else float(decay))

    def on_step_end(self, context: Any) -> Optional[bool]:
        module = context.embedding
        if context.stage.name != "search" or not isinstance(module, AutoDimSearchEmbedding):
            return None
        module.temperature_step += 1
        batch = self.validation_batch(context)
        model = getattr(context.model, "inner", None) or context.model
        parallel = context.trainer.parallel
        module.alpha.requires_grad_(True)
        module.alpha_step = True
        try:
            with parallel.placement(batch):
                output = model(batch.dense_features, batch.sparse_features)
            loss = training_loss(model, output, batch, parallel.row_scale(batch))
            (grad,) = torch.autograd.grad(loss, [module.alpha])
        finally:
            module.alpha_step = False
            module.alpha.requires_grad_(False)
        grad = torch.stack(parallel.concat_ranks([grad])[0].split(grad.shape[0])).mean(0)
        with torch.no_grad():
            module.alpha.sub_(float(module.hparams["alpha_learning_rate"]) * grad)
        return None


class ChoiceReport(Hook):
    """Stage artifacts of the search (after ``RestoreBestSearch``): alpha, argmax and chosen widths,
    and how far the search moved alpha from its start (largest change; fields whose argmax changed)."""

    def __init__(self):
        self.start: Optional[torch.Tensor] = None

    def on_stage_start(self, context: Any) -> None:
        module = context.embedding
        self.start = module.alpha.detach().clone() if isinstance(module, AutoDimSearchEmbedding) else None

    def on_stage_end(self, context: Any) -> Optional[Mapping[str, Any]]:
        module = context.embedding
        if context.stage.name != "search" or not isinstance(module, AutoDimSearchEmbedding):
            return None
        alpha = module.alpha.detach()
        argmax = [module.candidates[int(i)] for i in alpha.argmax(dim=1)]
        chosen = [module.candidates[i] for i in module.chosen()]
        moved = {}
        if self.start is not None and self.start.shape == alpha.shape:
            moved = {"alpha_max_change": float((alpha - self.start).abs().max()) if alpha.numel() else 0.0,
                     "argmax_changed_fields": float((alpha.argmax(dim=1) != self.start.argmax(dim=1)).sum())}
        return {**moved, "alpha": alpha.clone(), "argmax_dims": {t.name: d for t, d in zip(module.searched, argmax)},
                "dims": {t.name: d for t, d in zip(module.searched, chosen)},
                "budget_stepped_down": float(sum(a != c for a, c in zip(argmax, chosen))),
                "temperature": module.temperature()}


# ----------------------------------------------------------------------------- method
@dataclass
class AutoDimSettings:
    """Hyperparameters of ``autodim`` (defaults: Hetu's autodim, VLDB 2024 artifact, commit a1cb1bc)."""

    #: auto: Hetu's 2, 4, ..., D | a list of increasing widths in [1, D] (e.g. [1, 2, 4, 8, 16] reaches lower budgets)
    candidates: Any = "auto"
    alpha_learning_rate: float = 1.0e-3  #: SGD step of alpha on validation batches (Hetu's alpha_lr)
    #: auto: 2.5e-8 * batch_size per step (Hetu: 0.00005 / 2000 * batch_size) | a number >= 0
    temperature_decay: Any = "auto"
    temperature_min: float = 0.01  #: floor of tau = max(temperature_min, 1 - decay * step) (Hetu: 0.01)
    #: inherit (Hetu reset_retrain=0: chosen table slice, W and b from the search) | scratch (re-drawn, dense re-initialised)
    retrain_init: str = "inherit"
    search_max_epochs: Optional[float] = None  #: cap of the search stage (null: trainer.max_epochs)
    retrain_max_epochs: Optional[float] = None  #: cap of the retrain stage (null: trainer.max_epochs)


class AutoDim(CompressionMethod):
    """AutoDim; hyperparameters: ``AutoDimSettings`` (and ``methods/autodim.md``)."""

    name = "autodim"
    settings_class = AutoDimSettings
    table_backed = False

    def check_settings(self) -> None:
        cands = self.candidates
        if cands != "auto" and not (isinstance(cands, (list, tuple)) and len(cands) >= 1
                                    and all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in cands)
                                    and list(cands) == sorted(set(cands))):
            raise ValueError(f"method 'autodim': candidates={cands!r}; allowed: 'auto' or a list of increasing "
                             "integers >= 1")
        if not (isinstance(self.alpha_learning_rate, (int, float)) and self.alpha_learning_rate > 0):
            raise ValueError(f"method 'autodim': alpha_learning_rate={self.alpha_learning_rate!r}; allowed: a number > 0")
        decay = self.temperature_decay
        if decay != "auto" and not (isinstance(decay, (int, float)) and not isinstance(decay, bool) and decay >= 0):
            raise ValueError(f"method 'autodim': temperature_decay={decay!r}; allowed: 'auto' or a number >= 0")
        if not (isinstance(self.temperature_min, (int, float)) and 0 < self.temperature_min <= 1):
            raise ValueError(f"method 'autodim': temperature_min={self.temperature_min!r}; allowed: a number in (0, 1]")
        if self.retrain_init not in RETRAIN_INITS:
            raise ValueError(f"method 'autodim': retrain_init={self.retrain_init!r}; allowed: {', '.join(RETRAIN_INITS)}")

    def solve_hparams(self, tables: Sequence[TableSpec], dim: int, budget: Budget) -> Dict[str, Any]:
        compressed, kept = budget_lib.split_tables(tables, budget)
        candidates = dim_candidates(dim) if self.candidates == "auto" else [int(d) for d in self.candidates]
        if candidates[-1] > dim:
            raise ValueError(f"method 'autodim': candidates={self.candidates!r}; allowed: widths <= D={dim}")
        target = budget_lib.target_bytes(tables, dim, budget)
        low = deployable_bytes(compressed, kept, [candidates[0]] * len(compressed), dim)
        high = deployable_bytes(compressed, kept, [candidates[-1]] * len(compressed), dim)
        full = full_embedding_bytes(tables, dim)
        if low > target:
            raise InfeasibleBudget(self.name, budget.compression_ratio, low / full, high / full,
                                   f"every searched field at width {candidates[0]} has ratio {low / full:.4g}")
        cap = min(target, high)
        return {"candidates": candidates, "kept": [t.name for t in kept], "cap_bytes": int(cap),
                "searched_limit": int(cap - budget_lib.kept_bytes(kept, dim)),
                "alpha_learning_rate": float(self.alpha_learning_rate), "temperature_decay": self.temperature_decay,
                "temperature_min": float(self.temperature_min), "retrain_init": self.retrain_init}

    def memory(self, tables: Sequence[TableSpec], dim: int, hparams: Mapping[str, Any],
               optimizer: EmbeddingOptimizer = EmbeddingOptimizer()) -> MemoryReport:
        kept = set(hparams["kept"])
        searched = [t for t in tables if t.name not in kept]
        candidates = hparams["candidates"]
        rows, fs, c = sum(t.num_embeddings for t in searched), len(searched), len(candidates)
        kept_rows = sum(t.num_embeddings for t in tables if t.name in kept)
        table = (rows * sum(candidates) + kept_rows * dim) * FP32_BYTES
        dense = fs * (sum(candidates) * dim + c * dim) * FP32_BYTES
        alpha = fs * c * FP32_BYTES
        buffers = 2 * c * dim * FP32_BYTES + 8  # BN running mean/var per candidate; the int64 step count
        return MemoryReport(inference_bytes=int(hparams["cap_bytes"]),
                            training_bytes=int(2 * table + 3 * dense + alpha + buffers),
                            parameters=int((table + dense + alpha) // FP32_BYTES),
                            full_bytes=full_embedding_bytes(tables, dim), breakdown={"cap": int(hparams["cap_bytes"])})

    def build(self, tables: Sequence[TableSpec], dim: int, plan: Plan,
              optimizer: EmbeddingOptimizer = EmbeddingOptimizer()) -> AutoDimSearchEmbedding:
        return AutoDimSearchEmbedding(tables, dim, plan.hparams)

    def stages(self) -> List[Stage]:
        return [Stage("search", max_epochs=self.search_max_epochs),
                Stage("retrain", max_epochs=self.retrain_max_epochs, reset_optimizer=True,
                      reinit=self.retrain_init == "scratch")]

    def hooks(self) -> List[Hook]:
        return [RestoreBestSearch(), ArchitectureStep(), ChoiceReport()]

    def rebuild(self, module: nn.Module, stage_result: Mapping[str, Any]) -> nn.Module:
        if not isinstance(module, AutoDimSearchEmbedding):
            return module
        retrain = module.deployable(fold_batch_norm=False)
        if self.retrain_init == "scratch":
            bound = math.sqrt(1.0 / max(t.num_embeddings for t in module.tables))
            with torch.no_grad():
                for p in retrain.sparse_parameters() + list(retrain.projections):
                    p.uniform_(-bound, bound)
                for p in retrain.biases:
                    p.zero_()
        return retrain
