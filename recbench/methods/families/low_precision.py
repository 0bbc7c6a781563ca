"""Base of the low-precision family: integer embedding rows only, updated with stochastic rounding.

``LowPrecisionFamily`` is subclassed by ``lpt`` (fixed step size) and ``alpt`` (learned step size).

References: Li, Guo, Hou, Zhang, Tang, Tang, Zhang & Li, "Adaptive Low-Precision Training for
Embeddings in Click-Through Rate Prediction", AAAI 2023 (arXiv:2212.05735) — LPT and ALPT;
Esser et al., "Learned Step Size Quantization", ICLR 2020 (the step-size gradient);
Gupta et al., "Deep Learning with Limited Numerical Precision", ICML 2015 (stochastic rounding).

Mechanism. Every compressed field f holds its rows only as b_f-bit signed integers
q in [-2^(b-1), 2^(b-1) - 1], bit-packed (``recbench.methods.blocks.bit_packing``), plus a step size
Delta (one per field, or one per row). There is no fp32 master copy, in training or inference.
Forward: the batch's unique rows are read and de-quantized, e = Delta * q, then pooled per bag
(``per_id``). Backward (``LowPrecisionLookup``): the row-sparse gradient G (U, D) of the U
touched rows goes straight into the embedding optimizer's rule (SGD, Adagrad or row-wise Adagrad,
whose fp32 state is the only other per-row tensor), giving the updated rows w' = e - lr * G', and
is never materialised for the whole table. The rows are written back as integers with unbiased
stochastic rounding, q' = floor(clip(w' / Delta) + u), u ~ U[0, 1): E[Delta q'] = w' inside the
range. The noise u of entry (r, c) at the t-th write is drawn from a counter-based stream keyed
by (seed, t, r, c) (``counter_uniform``; the seed is torch's seed when the module is built;
seed and t are buffers saved in checkpoints), so a row's rounding does not depend on the
other rows of the batch or on how the batch is split across ranks. With a learned step size (ALPT) the backward also returns dL/dDelta by the LSQ estimator
evaluated at the updated rows, dQ(w'; Delta)/dDelta = round(v) - v for v = w'/Delta inside
[-Q_N, Q_P], -Q_N below, Q_P above, times G, scaled by Hetu's 1 / sqrt(B * D * Q_P) (B = the
batch's samples; ``gradient_scale="batch"``) or LSQ's 1 / sqrt(N * Q_P) (N = values sharing the
step in the batch; ``"rows"``); the trainer's optimizer (``scale_optimizer``) steps Delta with its
own learning rate (``param_groups``) and the rows are committed (rounded with the *updated* Delta) by the
``on_step_end`` hook, as in ALPT's alternating update.

Distributed runs (``runtime.distributed=true``): the integer rows, step sizes and optimizer
state are replicated; a rank's backward gathers every rank's touched row ids and (U_r, D) row
gradients (never a table-sized gradient), so each rank updates the global batch's rows with the
global gradient and the same counter-keyed rounding noise: W ranks keep identical tables, equal
to one process's up to float summation order (the row gradients are sums over the batch in
another order; a last-bit difference can move a stochastic rounding across an integer, see
``tests/training/test_distributed_batch_methods.py``).

Budget: bytes = sum_f ceil(n_f * D * b_f / 8) (packed integers) + step sizes (4 bytes per field
or per row) + fields below ``min_rows_to_compress`` in fp32. Precisions come from ``levels``:
the largest uniform level within the target, then each field (largest first) raised to the
highest level that keeps the total within it; a fixed ``bits`` uses that level everywhere.

Shapes: KJT (F keys, N values) -> U unique rows (U, D) int -> (U, D) fp32 -> per id (N, D)
-> KeyedTensor (B, F * D).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch
from torch import nn

from recbench.methods.blocks import batch_part, bit_packing
from recbench.methods.base import CompressionMethod, Hook, InfeasibleBudget, ParamGroup
from recbench.methods.blocks.budget import kept_bytes, land, split_tables, target_bytes
from recbench.methods.blocks.per_id import PerIdEmbedding, tensor_bytes
from recbench.types import FP32_BYTES, Budget, EmbeddingOptimizer, MemoryReport, Plan, TableSpec, full_embedding_bytes

GRANULARITIES = ("field", "row")
#: ALPT's step-size gradient scale: "batch" = 1 / sqrt(B D Q_P) with B the batch's samples (Hetu's
#: ``scale_factor``); "rows" = LSQ's 1 / sqrt(N Q_P) with N the values sharing the step in the batch
GRADIENT_SCALES = ("batch", "rows")
#: ALPT's step-size optimizer: "adam" (the paper's and Hetu's, the run's optimizer class: sparse Adam
#: for per-row steps) or "adagrad" (per-row steps in the sparse Adagrad group; per-field steps are Adam)
SCALE_OPTIMIZERS = ("adam", "adagrad")
MIN_STEP = 1e-12
#: the rounding noise's key held in training (int64 seed and write counter)
NOISE_KEY_BYTES = 16


def q_range(bits: int):
    """(Q_N, Q_P) of a signed b-bit integer: q in [-Q_N, Q_P]."""
    return 2 ** (int(bits) - 1), 2 ** (int(bits) - 1) - 1


MASK32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, constant: int) -> torch.Tensor:
    """(x * constant) mod 2^32 for int64 ``x`` in [0, 2^32), without int64 overflow (16-bit halves)."""
    low, high = constant & 0xFFFF, constant >> 16
    return (x * low + (((x * high) & 0xFFFF) << 16)) & MASK32


def mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (Wellons' "lowbias32") of int64 ``x`` in [0, 2^32), elementwise."""
    x = x & MASK32
    x = _mul32(x ^ (x >> 16), 0x7FEB352D)
    x = _mul32(x ^ (x >> 15), 0x846CA68B)
    return x ^ (x >> 16)


def counter_uniform(seed: torch.Tensor, counter: torch.Tensor, rows: torch.Tensor, dim: int) -> torch.Tensor:
    """(U, D) float32 uniforms in [0, 1) (multiples of 2^-24) keyed by (seed, counter, row, column).

    A counter-based stream: the noise of entry (r, c) at write ``counter`` is a hash of the four
    integers, so it does not depend on which other rows are written with it, in what order, or
    on how a batch is split over ranks (a generator's draws would depend on its consumption).
    ``seed``, ``counter``: 0-dim int64; ``rows``: (U,) int64 global row numbers.
    """
    stream = mix32(seed ^ mix32(counter + 0x9E3779B9))
    keyed = mix32(stream ^ rows.unsqueeze(1))
    columns = mix32(torch.arange(dim, dtype=torch.int64, device=rows.device) + 0x632BE5AB)
    return (mix32(keyed ^ columns) >> 8).to(torch.float32) * 2.0 ** -24


def stochastic_round(x: torch.Tensor, uniform: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Unbiased rounding to an integer: floor(x + u), u ~ U[0, 1) (``uniform``, else torch's global RNG)."""
    return torch.floor(x + (torch.rand_like(x) if uniform is None else uniform))


def quantize(weights: torch.Tensor, step: torch.Tensor, q_low: torch.Tensor, q_high: torch.Tensor,
             uniform: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(U, D) fp32 rows, (U, 1) steps and bounds -> (U, D) int64 q = SR(clip(w / step)) with the
    rounding noise ``uniform`` (U, D) (default: torch's global RNG)."""
    scaled = torch.minimum(torch.maximum(weights / step, q_low), q_high)
    return torch.minimum(torch.maximum(stochastic_round(scaled, uniform), q_low), q_high).to(torch.int64)


def lsq_step_derivative(weights: torch.Tensor, step: torch.Tensor, q_low: torch.Tensor,
                        q_high: torch.Tensor) -> torch.Tensor:
    """d(step * round(clip(w / step))) / d step with the straight-through round (LSQ):
    round(v) - v inside [q_low, q_high], the bound outside; (U, D)."""
    v = weights / step
    inside = torch.round(v) - v
    return torch.where(v < q_low, q_low.expand_as(v), torch.where(v > q_high, q_high.expand_as(v), inside))


def row_optimizer_step(kind: str, learning_rate: float, eps: float, weights: torch.Tensor, grad: torch.Tensor,
                       state: Optional[torch.Tensor]):
    """One optimizer step on the touched rows only: (U, D) rows, gradients and state rows
    ((U, D) Adagrad, (U, 1) row-wise Adagrad, None for SGD) -> (new rows, new state rows)."""
    if kind == "sgd":
        return weights - learning_rate * grad, None
    if kind == "adagrad":
        state = state + grad * grad
    elif kind == "rowwise_adagrad":
        state = state + (grad * grad).mean(1, keepdim=True)
    else:
        raise ValueError(f"unsupported embedding optimizer {kind!r}")
    return weights - learning_rate * grad / (state.sqrt() + eps), state


def optimizer_state_width(kind: str, dim: int) -> int:
    return {"sgd": 0, "adagrad": dim, "rowwise_adagrad": 1}[kind]


class LowPrecisionLookup(torch.autograd.Function):
    """De-quantized rows whose backward updates the integer rows in place (fused update).

    forward(trigger, step, q (U, D) int64, rows (U,), fields (U,), store, world) -> (U, D) fp32 = step * q.
    ``trigger`` is a fresh empty tensor requiring grad, so the backward runs even when the step
    size is fixed (LPT); ``step`` is the module's step-size tensor (per field (F_c,) or per row
    (R, 1)); its gradient (ALPT) is the LSQ estimate at the updated rows (row-sparse for per-row
    steps). No gradient of the integer table exists. With ``world`` W > 1 (a distributed run,
    ``batch_part.world_size``) the backward first joins every rank's touched rows and row
    gradients (``global_rows``): every rank applies the whole batch's update, as one process does,
    and returns the whole batch's step-size gradient (identical on every rank, so the ranks'
    average is that gradient).
    """

    @staticmethod
    def forward(ctx, trigger, step, q, rows, fields, store, world=1):
        step_rows = store.step_of(step.detach(), rows, fields)
        ctx.store, ctx.step_shape, ctx.world = store, tuple(step.shape), int(world)
        ctx.save_for_backward(q, rows, fields, step_rows)
        return step_rows * q.to(step_rows.dtype)

    @staticmethod
    def backward(ctx, grad):
        store = ctx.store
        q, rows, fields, step_rows = ctx.saved_tensors
        if ctx.world > 1:  # the whole batch's rows and gradients, as one process has them
            rows, fields, grad = store.global_rows(rows, grad, ctx.world)
            q, step_rows = store.read(rows, fields), store.step_of(store.step.detach(), rows, fields)
        updated = store.apply_gradient(rows, step_rows * q.to(step_rows.dtype), grad)
        step_grad = store.step_gradient(rows, fields, step_rows, updated, grad, ctx.step_shape) if store.learnable else None
        store.stage(rows, fields, updated)
        return None, step_grad, None, None, None, None, None


class LowPrecisionEmbedding(PerIdEmbedding):
    """Integer embedding rows trained in low precision. forward: KJT -> KeyedTensor (B, F * D).

    Args:
        tables, dim, kept: as ``PerIdEmbedding``.
        bits: field name -> b for every compressed field.
        learnable: learn the step sizes (ALPT) or keep them fixed (LPT).
        granularity: "field" (one step per field) or "row" (one per row).
        fixed_range: LPT's representable range: step = fixed_range / Q_P(b).
        scale_learning_rate: ALPT's step-size learning rate (its own param group).
        optimizer: the embedding optimizer rule applied to the touched rows in the backward.
        step_init: ALPT's initial step: "lsq" (2 mean|w| / sqrt(Q_P) of the initial draw) or a number
            (Hetu's constant ``init_scale``).
        gradient_scale: ALPT's step-gradient scale, one of ``GRADIENT_SCALES``.
        scale_optimizer: ALPT's step-size optimizer, one of ``SCALE_OPTIMIZERS``.
    """

    breakdown_name = "integer_rows"

    def __init__(self, tables: Sequence[TableSpec], dim: int, bits: Mapping[str, int], kept: Sequence[str],
                 learnable: bool, granularity: str, fixed_range: float, scale_learning_rate: float,
                 optimizer: EmbeddingOptimizer, step_init: Any = "lsq", gradient_scale: str = "rows",
                 scale_optimizer: str = "adagrad"):
        super().__init__(tables, dim, kept)
        self.learnable, self.granularity = bool(learnable), granularity
        self.scale_learning_rate = float(scale_learning_rate)
        self.step_init, self.gradient_scale, self.scale_optimizer = step_init, gradient_scale, scale_optimizer
        self._batch_size = 1  # samples of the last training forward's global batch, for gradient_scale="batch"
        self.optimizer_spec = optimizer
        compressed = [t for t in self.tables if t.name not in set(self.kept_names)]
        self.compressed_names = [t.name for t in compressed]
        self.bits = {t.name: int(bits[t.name]) for t in compressed}
        for t in compressed:
            bit_packing.row_bytes(dim, self.bits[t.name])  # rows must be byte-aligned
        self.levels = sorted(set(self.bits.values()), reverse=True)
        sizes = torch.tensor([t.num_embeddings for t in compressed], dtype=torch.int64)
        self.register_buffer("row_start", torch.cumsum(sizes, 0) - sizes, persistent=False)
        self.register_buffer("row_end", torch.cumsum(sizes, 0), persistent=False)
        compressed_index = torch.full((len(self.tables),), -1, dtype=torch.int64)
        for i, t in enumerate(compressed):
            compressed_index[self.field_index[t.name]] = i
        self.register_buffer("compressed_index", compressed_index, persistent=False)
        level_of = torch.tensor([self.levels.index(self.bits[t.name]) for t in compressed], dtype=torch.int64)
        level_start = torch.zeros(len(compressed), dtype=torch.int64)
        for level in range(len(self.levels)):
            members = (level_of == level).nonzero().flatten()
            level_start[members] = torch.cumsum(sizes[members], 0) - sizes[members]
        self.register_buffer("level_of", level_of, persistent=False)
        self.register_buffer("level_start", level_start, persistent=False)
        bounds = torch.tensor([q_range(self.bits[t.name]) for t in compressed], dtype=torch.float32).reshape(-1, 2)
        self.register_buffer("q_low", -bounds[:, 0], persistent=False)
        self.register_buffer("q_high", bounds[:, 1], persistent=False)
        self.num_rows = int(sizes.sum())
        for level, b in enumerate(self.levels):
            rows = int(sizes[level_of == level].sum())
            self.register_buffer(f"codes_{b}", torch.zeros(bit_packing.packed_bytes(rows * dim, b), dtype=torch.uint8))
        width = optimizer_state_width(optimizer.kind, dim)
        self.register_buffer("optimizer_state", torch.zeros(self.num_rows, width) if width else None)
        self._pending = None
        # the rounding noise's key: the seed torch's RNG was given (the run's seed; read, not drawn,
        # so building the module consumes no random numbers) and the number of writes so far
        # (the initial write is 0)
        self.register_buffer("noise_seed", torch.tensor(torch.initial_seed() & MASK32, dtype=torch.int64))
        self.register_buffer("noise_counter", torch.zeros((), dtype=torch.int64))
        self._initialise(compressed, sizes, fixed_range)

    # ----- storage -----
    def _initialise(self, compressed: Sequence[TableSpec], sizes: torch.Tensor, fixed_range: float) -> None:
        """DLRM's uniform(+-1/sqrt(n_f)) drawn per field, stored as integers (no fp32 copy kept)."""
        steps = []
        for i, t in enumerate(compressed):
            bound = 1.0 / t.num_embeddings ** 0.5
            weights = torch.empty(t.num_embeddings, self.dim).uniform_(-bound, bound)
            q_p = q_range(self.bits[t.name])[1]
            if not self.learnable:
                step = torch.full((t.num_embeddings, 1), fixed_range / q_p)
            elif self.step_init != "lsq":  # a constant initial step (Hetu's init_scale)
                step = torch.full((t.num_embeddings, 1), float(self.step_init))
            elif self.granularity == "row":  # LSQ's initialisation: 2 mean|w| / sqrt(Q_P)
                step = 2.0 * weights.abs().mean(1, keepdim=True) / q_p ** 0.5
            else:
                step = torch.full((t.num_embeddings, 1), 2.0 * float(weights.abs().mean()) / q_p ** 0.5)
            steps.append(step if self.granularity == "row" else step[:1, 0])
            rows = torch.arange(t.num_embeddings) + int(self.row_start[i])
            fields = torch.full_like(rows, i)
            self._write(rows, fields, weights, step.clamp(min=MIN_STEP))
        step = torch.cat(steps).clamp(min=MIN_STEP)
        if self.learnable:
            self.step = nn.Parameter(step)
        else:
            self.register_buffer("step", step)

    def _stream(self, level: int) -> torch.Tensor:
        return getattr(self, f"codes_{self.levels[level]}")

    def _positions(self, rows: torch.Tensor, fields: torch.Tensor) -> torch.Tensor:
        return self.level_start[fields] + rows - self.row_start[fields]

    def read(self, rows: torch.Tensor, fields: torch.Tensor) -> torch.Tensor:
        """(U,) global compressed rows and their compressed-field indices -> (U, D) int64 q."""
        out = torch.empty(rows.numel(), self.dim, dtype=torch.int64, device=rows.device)
        positions, level = self._positions(rows, fields), self.level_of[fields]
        for index, b in enumerate(self.levels):
            members = (level == index).nonzero().flatten()
            if members.numel():
                out[members] = bit_packing.read_rows(self._stream(index), b, self.dim, positions[members]) - 2 ** (b - 1)
        return out

    def _write(self, rows: torch.Tensor, fields: torch.Tensor, weights: torch.Tensor, step_rows: torch.Tensor) -> None:
        uniform = counter_uniform(self.noise_seed, self.noise_counter, rows, self.dim)
        q = quantize(weights, step_rows, self.q_low[fields].unsqueeze(1), self.q_high[fields].unsqueeze(1), uniform)
        positions, level = self._positions(rows, fields), self.level_of[fields]
        for index, b in enumerate(self.levels):
            members = (level == index).nonzero().flatten()
            if members.numel():
                bit_packing.write_rows(self._stream(index), b, self.dim, positions[members], q[members] + 2 ** (b - 1))

    def step_of(self, step: torch.Tensor, rows: torch.Tensor, fields: torch.Tensor) -> torch.Tensor:
        """(U, 1) step size of each row."""
        return (step[rows] if self.granularity == "row" else step[fields].unsqueeze(1))

    def fields_of(self, rows: torch.Tensor) -> torch.Tensor:
        return torch.searchsorted(self.row_end, rows, right=True)

    # ----- training -----
    def apply_gradient(self, rows: torch.Tensor, weights: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """The embedding optimizer's step on the touched rows (state updated in place) -> new rows."""
        spec = self.optimizer_spec
        state = self.optimizer_state[rows] if self.optimizer_state is not None else None
        updated, state = row_optimizer_step(spec.kind, spec.learning_rate, spec.eps, weights, grad, state)
        if state is not None:
            self.optimizer_state[rows] = state
        return updated

    def global_rows(self, rows: torch.Tensor, grad: torch.Tensor, world: int):
        """Distributed backward: this rank's touched rows (U_r,) and their gradients (U_r, D) ->
        (rows (U,), fields (U,), gradients (U, D)) of the whole global batch, on every rank.

        Only ids and (U_r, D) row gradients travel (``batch_part.concat_over_ranks``). A rank's
        gradients are of its loss scaled by W (``ProcessGroupParallel.row_scale``): their sum over
        ranks divided by W is the gradient of the global batch's mean loss. The rows come out
        sorted, as ``torch.unique`` gives them to one process, so the stochastic-rounding noise
        (the global RNG, in the same state on every rank) falls on the same entries."""
        every_row, every_grad = batch_part.concat_over_ranks([rows, grad], world)
        unique, inverse = torch.unique(every_row, return_inverse=True)
        total = every_grad.new_zeros(unique.numel(), grad.shape[1]).index_add_(0, inverse, every_grad)
        return unique, self.fields_of(unique), total / world

    def step_gradient(self, rows, fields, step_rows, updated, grad, shape) -> torch.Tensor:
        """LSQ gradient of the loss w.r.t. the step sizes at the updated rows (per field dense (F_c,),
        per row sparse (R, 1))."""
        q_low, q_high = self.q_low[fields].unsqueeze(1), self.q_high[fields].unsqueeze(1)
        per_row = (grad * lsq_step_derivative(updated, step_rows, q_low, q_high)).sum(1)
        if self.gradient_scale == "batch":  # Hetu: 1 / sqrt(B D Q_P), B the (global) batch's samples
            samples = self._batch_size
            if self.granularity == "row":
                scale = (samples * self.dim * q_high.squeeze(1)) ** -0.5
                return torch.sparse_coo_tensor(rows.unsqueeze(0), (per_row * scale).unsqueeze(1),
                                               size=shape, check_invariants=False).coalesce()
            total = torch.zeros(shape).index_add_(0, fields, per_row)
            return total * (samples * self.dim * self.q_high.clamp(min=1.0)) ** -0.5
        if self.granularity == "row":
            scale = (self.dim * q_high.squeeze(1)) ** -0.5
            return torch.sparse_coo_tensor(rows.unsqueeze(0), (per_row * scale).unsqueeze(1),
                                           size=shape, check_invariants=False).coalesce()
        sharing = torch.bincount(fields, minlength=shape[0]).to(per_row.dtype)
        total = torch.zeros(shape).index_add_(0, fields, per_row)
        q_p = self.q_high.clamp(min=1.0)
        return total * (sharing.clamp(min=1.0) * self.dim * q_p) ** -0.5

    def stage(self, rows: torch.Tensor, fields: torch.Tensor, updated: torch.Tensor) -> None:
        """Hold the updated rows until the step sizes are updated; commit now when they are fixed."""
        self._pending = (rows, fields, updated.detach())
        if not self.learnable:
            self.commit()

    @torch.no_grad()
    def commit(self) -> None:
        """Write the pending updated rows as integers (stochastic rounding with the current steps)."""
        if self._pending is None:
            return
        rows, fields, updated = self._pending
        self._pending = None
        if self.learnable:
            self.step.clamp_(min=MIN_STEP)
        self.noise_counter += 1
        self._write(rows, fields, updated, self.step_of(self.step.detach(), rows, fields))

    def _load_from_state_dict(self, *args, **kwargs):
        self._pending = None  # updates staged before a checkpoint load belong to a discarded step
        super()._load_from_state_dict(*args, **kwargs)

    def forward(self, features):
        """As ``PerIdEmbedding.forward``; first records B, the samples of the (global) batch, for
        ``gradient_scale="batch"`` (a distributed rank adds up every rank's part)."""
        if self.learnable and self.gradient_scale == "batch" and self.training:
            samples, world = torch.tensor(int(features.stride())), batch_part.world_size()
            self._batch_size = int(batch_part.sum_over_ranks(samples, world))
        return super().forward(features)

    def encode(self, fields: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        self.commit()
        compressed = self.compressed_index[fields]
        unique, inverse = torch.unique(self.row_start[compressed] + ids, return_inverse=True)
        row_fields = self.fields_of(unique)
        q = self.read(unique, row_fields)
        if self.training and torch.is_grad_enabled():
            trigger = torch.empty(0, requires_grad=True, device=q.device)
            rows = LowPrecisionLookup.apply(trigger, self.step, q, unique, row_fields, self, batch_part.world_size())
        else:
            rows = self.step_of(self.step, unique, row_fields) * q.to(torch.float32)
        return rows[inverse]

    def sparse_parameters(self) -> List[nn.Parameter]:
        steps = [self.step] if self.learnable and self.granularity == "row" else []
        return steps + super().sparse_parameters()

    def param_groups(self) -> List[ParamGroup]:
        groups = [ParamGroup("embedding", super().sparse_parameters(), kind="sparse")] if self.kept_table is not None else []
        if self.learnable:
            kind = "sparse" if self.granularity == "row" else "dense"
            rule = "sparse_adam" if kind == "sparse" and self.scale_optimizer == "adam" else None
            groups.append(ParamGroup("step_sizes", [self.step], learning_rate=self.scale_learning_rate, kind=kind,
                                     optimizer=rule))
        return groups

    # ----- memory and deployment -----
    def memory_report(self) -> MemoryReport:
        report = super().memory_report()
        report.parameters += self.num_rows * self.dim  # the integer entries are trained too
        if self.learnable and self.granularity == "row" and self.scale_optimizer == "adam":
            report.training_bytes += tensor_bytes([self.step])  # sparse Adam: 2 state values per step
        return report

    def to_inference(self) -> nn.Module:
        """The same integer rows and step sizes, without the optimizer state; identical outputs."""
        self.commit()
        clone = copy.deepcopy(self)
        clone.optimizer_state = clone.noise_seed = clone.noise_counter = None  # training-only state
        return clone.eval()


class CommitRows(Hook):
    """ALPT's alternating update: rows are rounded with the step sizes of *this* step's update."""

    def on_step_end(self, context: Any) -> Optional[bool]:
        commit = getattr(context.embedding, "commit", None)
        if commit is not None:
            commit()
        return None


@dataclass
class LowPrecisionSettings:
    """Hyperparameters shared by the low-precision family (``lpt``, ``alpt``); each method's settings
    add their own (``LPTSettings``, ``ALPTSettings``)."""

    bits: Any = "auto"  #: auto (per-field precision from `levels`, landing the budget) | one of the allowed levels
    levels: List[int] = field(default_factory=list)  #: precisions `auto` may use (empty: every allowed level)


class LowPrecisionFamily(CompressionMethod):
    """Base of the low-precision family: shared solver, closed-form memory and build of ``lpt`` and ``alpt``.

    Subclasses set ``name``, ``learnable``, ``allowed_levels`` and ``settings_class``. A step-size
    attribute that is not a setting of the subclass keeps the class default below (``lpt``: fixed
    per-field steps; ``alpt``: no ``fixed_range``).
    """

    table_backed = False
    learnable = False
    allowed_levels: tuple = ()
    settings_class = LowPrecisionSettings
    #: 2: the rounding noise comes from the counter-keyed stream (``counter_uniform``)
    revision = 2
    # step-size attributes of a subclass without that setting
    granularity: str = "field"
    fixed_range: float = 1.0
    scale_learning_rate: float = 1.0
    step_init: Any = "lsq"
    gradient_scale: str = "rows"
    scale_optimizer: str = "adagrad"

    def check_settings(self) -> None:
        levels, bits, granularity = self.levels, self.bits, self.granularity
        step_init, gradient_scale, scale_optimizer = self.step_init, self.gradient_scale, self.scale_optimizer
        self.levels = sorted({int(b) for b in (levels or self.allowed_levels)}, reverse=True)
        bad = [b for b in self.levels if b not in self.allowed_levels]
        if bad or not self.levels:
            raise ValueError(f"method {self.name!r}: levels {list(levels)} must be a non-empty subset of {list(self.allowed_levels)}")
        if bits != "auto" and int(bits) not in self.allowed_levels:
            raise ValueError(f"method {self.name!r}: bits must be 'auto' or one of {list(self.allowed_levels)}, got {bits!r}")
        if granularity not in GRANULARITIES:
            raise ValueError(f"method {self.name!r}: granularity={granularity!r}; allowed: {', '.join(GRANULARITIES)}")
        if not float(self.fixed_range) > 0 or not float(self.scale_learning_rate) > 0:
            raise ValueError(f"method {self.name!r}: fixed_range and scale_learning_rate must be > 0")
        if step_init != "lsq" and (isinstance(step_init, (bool, str)) or not float(step_init) > 0):
            raise ValueError(f"method {self.name!r}: step_init must be 'lsq' or a number > 0, got {step_init!r}")
        if gradient_scale not in GRADIENT_SCALES:
            raise ValueError(f"method {self.name!r}: gradient_scale={gradient_scale!r}; allowed: {', '.join(GRADIENT_SCALES)}")
        if scale_optimizer not in SCALE_OPTIMIZERS:
            raise ValueError(f"method {self.name!r}: scale_optimizer={scale_optimizer!r}; allowed: "
                             f"{', '.join(SCALE_OPTIMIZERS)}")
        if self.learnable and granularity == "field" and scale_optimizer == "adagrad":
            raise ValueError(f"method {self.name!r}: scale_optimizer='adagrad' needs granularity='row' "
                             "(per-field step sizes are a dense parameter, trained by Adam)")
        self.step_init = step_init if step_init == "lsq" else float(step_init)
        self.granularity = granularity if self.learnable else "field"
        self.fixed_range, self.scale_learning_rate = float(self.fixed_range), float(self.scale_learning_rate)

    # ----- closed form -----
    def _step_bytes(self, compressed: Sequence[TableSpec]) -> int:
        if self.granularity == "row":
            return sum(t.num_embeddings for t in compressed) * FP32_BYTES
        return len(compressed) * FP32_BYTES

    def _inference_bytes(self, tables: Sequence[TableSpec], dim: int, bits: Mapping[str, int], kept: Sequence[str]) -> int:
        compressed = [t for t in tables if t.name not in set(kept)]
        rows_per_level: Dict[int, int] = {}
        for t in compressed:
            rows_per_level[bits[t.name]] = rows_per_level.get(bits[t.name], 0) + t.num_embeddings
        codes = sum(bit_packing.packed_bytes(rows * dim, b) for b, rows in rows_per_level.items())
        return codes + self._step_bytes(compressed) + kept_bytes([t for t in tables if t.name in set(kept)], dim)

    def solve_hparams(self, tables: Sequence[TableSpec], dim: int, budget: Budget) -> Dict[str, Any]:
        for b in self.levels:
            bit_packing.row_bytes(dim, b)
        compressed, kept = split_tables(tables, budget)
        if not compressed:
            raise InfeasibleBudget(self.name, budget.compression_ratio, 1.0, 1.0, "every field is below min_rows_to_compress")
        kept_names = [t.name for t in kept]
        limit = target_bytes(tables, dim, budget)

        def total(bits: Mapping[str, int]) -> int:
            return self._inference_bytes(tables, dim, bits, kept_names)

        def uniform(level: int) -> Dict[str, int]:
            return {t.name: level for t in compressed}

        levels = self.levels if self.bits == "auto" else [int(self.bits)]
        lowest, highest = total(uniform(min(levels))), total(uniform(max(levels)))
        fitting = [b for b in levels if total(uniform(b)) <= limit]
        if not fitting:
            land(self.name, lowest, tables, dim, budget, lowest, highest)
        bits = uniform(fitting[0])
        higher = levels[:levels.index(fitting[0])]
        for t in sorted(compressed, key=lambda t: -t.num_embeddings):  # largest fields first
            for level in higher:  # the highest precision that still fits
                trial = dict(bits, **{t.name: level})
                if total(trial) <= limit:
                    bits = trial
                    break
        land(self.name, total(bits), tables, dim, budget, lowest, highest)
        return {"bits": bits, "kept": kept_names, "granularity": self.granularity}

    def memory(self, tables: Sequence[TableSpec], dim: int, hparams: Mapping[str, Any],
               optimizer: EmbeddingOptimizer = EmbeddingOptimizer()) -> MemoryReport:
        kept_names = list(hparams["kept"])
        compressed = [t for t in tables if t.name not in set(kept_names)]
        fixed = kept_bytes([t for t in tables if t.name in set(kept_names)], dim)
        inference = self._inference_bytes(tables, dim, hparams["bits"], kept_names)
        rows = sum(t.num_embeddings for t in compressed)
        steps = self._step_bytes(compressed)
        state = rows * optimizer_state_width(optimizer.kind, dim) * FP32_BYTES
        # step sizes: Adam (2 x) per field or per row (sparse Adam), sparse Adagrad (1 x) per row;
        # kept tables: Adagrad (1 x)
        adagrad_steps = self.granularity == "row" and self.scale_optimizer == "adagrad"
        step_state = (0 if not self.learnable else steps if adagrad_steps else 2 * steps)
        return MemoryReport(
            inference_bytes=inference,
            training_bytes=inference + state + step_state + fixed + NOISE_KEY_BYTES,
            parameters=rows * dim + (steps // FP32_BYTES if self.learnable else 0) + fixed // FP32_BYTES,
            full_bytes=full_embedding_bytes(tables, dim),
            breakdown={"integer_rows": inference - fixed, "kept": fixed},
        )

    def build(self, tables: Sequence[TableSpec], dim: int, plan: Plan,
              optimizer: EmbeddingOptimizer = EmbeddingOptimizer()) -> LowPrecisionEmbedding:
        hp = plan.hparams
        return LowPrecisionEmbedding(tables, dim, hp["bits"], hp["kept"], self.learnable, self.granularity,
                                     self.fixed_range, self.scale_learning_rate, optimizer, self.step_init,
                                     self.gradient_scale, self.scale_optimizer)

    def hooks(self) -> List[Hook]:
        return [CommitRows()] if self.learnable else []
