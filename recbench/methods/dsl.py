"""``dsl``: Dynamic Sparse Learning — a sparse embedding trained from scratch at a fixed density.

References: Wang, Sui, Wu, Zheng & Xiong, "Dynamic Sparse Learning: A Novel Paradigm for
Efficient Recommendation", WSDM 2024 (arXiv:2402.02855); the authors' code
``shuyao-wang/DSL`` (``NeuMF/utils/core.py``, ``NeuMF/main.py``, ``NeuMF/config.py`` at commit
62a00ea4c19e367a740fbd40357afe20c8680457); the prune/regrow rule follows Evci et al., "Rigging
the Lottery: Making All Tickets Winners" (RigL), ICML 2020.

Mechanism (the reference's defaults): the table starts with a uniformly random mask of exactly
``nnz`` entries (the budget) and never holds more. Every ``update_interval`` (100) steps, with
the cosine-annealed prune fraction

    p_t = p_min + (p_0 - p_min) / 2 * (1 + cos(pi t / T_end)),

``p_0 = initial_prune_fraction`` = 0.5, ``p_min = min_prune_fraction`` = 0.005 (the reference's
``CosineDecay`` is torch's ``CosineAnnealingLR`` with ``eta_min=0.005``) and ``T_end`` the whole
training (``len(train_loader) * num_epochs``: ``anneal_epochs: null`` = the trainer's
``max_epochs``), each compressed field (the reference masks each embedding tensor on its own)
moves k_f = ceil(p_t * nnz_f) entries: its k_f active entries of smallest magnitude are pruned
and its k_f inactive entries with the largest gradient magnitude are regrown at weight 0 (RigL's
rule); when fewer than k_f inactive entries have a non-zero gradient, the rest are drawn
uniformly among the field's other inactive entries (the reference sorts |gradient| and takes
the first k_f, so zero-gradient entries fill the count in an arbitrary order). Each field keeps
its entry count, so the table keeps exactly ``nnz``. recbench's earlier variant is kept as named
options: ``scope: global`` (one magnitude / gradient ranking over all compressed fields, k =
floor(p_t nnz)), ``regrow_fill: shrink`` (k shrinks to the number of gradient candidates),
``anneal_epochs: 3.0`` and ``min_prune_fraction: 0``.

The gradient of inactive entries comes from the lookup output: the module gathers the batch's
rows with sparse gradients and multiplies them by the mask, and a tensor hook keeps
dL/d(embedding) of the batch's ids — (N, D), exactly the dense gradient of the masked table
restricted to the rows the batch touched, which are the only rows where it is non-zero (the
reference reads ``weight.grad`` of the last batch). The mask is re-applied to the touched rows
after every optimizer step, so the count of non-zero weights never exceeds ``nnz``. In a
distributed run every rank regrows from the gradients of the whole global batch (each rank's
rows joined by the trainer's ``parallel.concat_ranks``) and the random fill is drawn from a
generator seeded by ``mask_seed`` and the update count, so every rank keeps the same mask.

Budget: ``nnz`` is the largest number of kept entries whose cheapest sparse storage (values +
indices, ``sparse_storage``) fits the target; the deployable form is that sparse table.

Shapes: KJT (F keys, B bags) -> per-id (N, D) -> KeyedTensor (B, F * D).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, List, Mapping, Optional, Sequence, Tuple

import torch

from recbench.methods.base import Hook
from recbench.methods.families.pruning import MaskHook, PrunedEmbedding, PruningFamily, PruningSettings, top_k_mask
from recbench.types import Stage, TableSpec

SCOPES = ("field", "global")
REGROW_FILLS = ("random", "shrink")


def prune_fraction(step: int, end: int, initial: float, minimum: float = 0.0) -> float:
    """Cosine-annealed fraction p_t = minimum + (initial - minimum) / 2 * (1 + cos(pi t / end));
    ``minimum`` from ``end`` on."""
    if step >= end:
        return minimum
    return minimum + 0.5 * (initial - minimum) * (1.0 + math.cos(math.pi * step / end))


class DSLEmbedding(PrunedEmbedding):
    """Fixed-density masked table with magnitude prune / gradient regrow. forward: KJT -> (B, F * D)."""

    def __init__(self, tables: Sequence[TableSpec], dim: int, hparams: Mapping[str, Any]):
        super().__init__(tables, dim, hparams["kept"], hparams["nnz"])
        self.mask_seed = int(hparams["mask_seed"])
        generator = torch.Generator().manual_seed(self.mask_seed)
        with torch.no_grad():
            self.mask.copy_(top_k_mask(torch.rand(self.mask.shape, generator=generator), self.nnz))
            self.weight.mul_(self.mask)
        self._gradient: Optional[Tuple[torch.Tensor, torch.Tensor]] = None  # (rows (N,), dL/de (N, D))
        self.register_buffer("updates", torch.zeros((), dtype=torch.int64))  # prune/regrow steps done

    def effective(self, rows, fields, values):
        out = values * self.mask[rows]
        if out.requires_grad:
            out.register_hook(lambda grad: self._keep_gradient(rows, grad))
        return out

    def _keep_gradient(self, rows: torch.Tensor, grad: torch.Tensor) -> None:
        self._gradient = (rows, grad.detach())

    def field_ranges(self) -> List[Tuple[int, int]]:
        """[start, end) compressed rows of each compressed field."""
        ranges = []
        for t in self.tables:
            if t.name not in self.kept_names:
                start = int(self.row_offset[self.field_index[t.name]])
                ranges.append((start, start + t.num_embeddings))
        return ranges

    @torch.no_grad()
    def prune_and_regrow(self, fraction: float,
                         gather: Optional[Callable[[Sequence[torch.Tensor]], List[torch.Tensor]]] = None,
                         scope: str = "field", regrow_fill: str = "random") -> int:
        """One update: returns the number of entries pruned and regrown (0 without a gradient).

        ``scope="field"``: each compressed field moves ceil(fraction * its active entries);
        ``"global"``: one ranking over the table, floor(fraction * nnz). ``regrow_fill="random"``
        fills the regrowth beyond the gradient candidates with uniformly drawn inactive entries;
        ``"shrink"`` moves only as many entries as there are candidates. ``gather`` (distributed:
        the trainer's ``parallel.concat_ranks``) joins every rank's (rows, gradient) of the last
        batch, so that every rank regrows from the whole batch."""
        if self._gradient is None:
            return 0
        rows, grad = gather(self._gradient) if gather is not None else self._gradient
        touched, inverse = torch.unique(rows, return_inverse=True)
        scores = grad.new_zeros(touched.numel(), self.dim).index_add_(0, inverse, grad).abs()
        generator = torch.Generator().manual_seed(self.mask_seed * 1_000_003 + int(self.updates))
        self.updates += 1
        if scope == "global":
            return self._move(0, self.num_rows, int(fraction * self.nnz), touched, scores, regrow_fill, generator)
        moved = 0
        for start, end in self.field_ranges():
            count = int(self.mask[start:end].sum())
            moved += self._move(start, end, math.ceil(fraction * count), touched, scores, regrow_fill, generator)
        return moved

    def _move(self, start: int, end: int, k: int, touched: torch.Tensor, scores: torch.Tensor, regrow_fill: str,
              generator: torch.Generator) -> int:
        """Prune the k smallest active entries of rows [start, end) and regrow k of its inactive ones."""
        d = self.dim
        inside = (touched >= start) & (touched < end)
        rows, row_scores = touched[inside], scores[inside]
        flat_mask, flat_weight = self.mask.view(-1), self.weight.view(-1)
        if regrow_fill == "shrink":
            k = min(k, int(((row_scores > 0) & ~self.mask[rows]).sum()))
        active = flat_mask[start * d:end * d].nonzero().squeeze(1) + start * d
        k = min(k, active.numel())
        if k <= 0:
            return 0
        # prune: the k active entries of smallest magnitude
        drop = active[torch.topk(flat_weight[active].abs(), k, largest=False, sorted=False).indices]
        flat_mask[drop] = False
        # regrow: the inactive entries (after the drop) of the touched rows with the largest |gradient|
        grow_scores = row_scores.masked_fill(self.mask[rows], -1.0).flatten()
        by_gradient = min(k, int((grow_scores > 0).sum()))
        chosen = torch.topk(grow_scores, by_gradient, sorted=False).indices
        grow = rows[chosen // d] * d + chosen % d
        flat_mask[grow] = True
        if by_gradient < k:  # zero-gradient entries fill the count (uniformly among the inactive ones)
            pool = (~flat_mask[start * d:end * d]).nonzero().squeeze(1) + start * d
            fill = pool[torch.randperm(pool.numel(), generator=generator)[:k - by_gradient]]
            flat_mask[fill] = True
            grow = torch.cat([grow, fill])
        flat_weight[drop] = 0.0
        flat_weight[grow] = 0.0  # RigL: regrown entries start at zero
        return k


class PruneRegrowHook(Hook):
    """Every ``update_interval`` steps: prune + regrow at the annealed fraction."""

    def __init__(self, method: "DSL"):
        self.method = method
        self.updates = self.moved = 0

    def anneal_steps(self, context: Any) -> int:
        """T_end in steps: ``anneal_epochs`` (None: the whole training, as the reference) of this run."""
        config = context.trainer.config
        steps_per_epoch = math.ceil(len(context.trainer.split("train")) / config.batch_size)
        if self.method.anneal_epochs is not None:
            return max(1, int(round(self.method.anneal_epochs * steps_per_epoch)))
        total = context.stage.max_steps or config.max_steps
        if not total:
            epochs = context.stage.max_epochs if context.stage.max_epochs is not None else config.max_epochs
            total = math.ceil(epochs * steps_per_epoch)
        return max(1, int(total))

    def on_step_end(self, context: Any) -> Optional[bool]:
        m, module = self.method, context.embedding
        step = context.stage_step
        if step % m.update_interval:
            return None
        fraction = prune_fraction(step, self.anneal_steps(context), m.initial_prune_fraction, m.min_prune_fraction)
        if fraction > 0:
            moved = module.prune_and_regrow(fraction, context.trainer.parallel.concat_ranks, m.scope, m.regrow_fill)
            self.updates += 1
            self.moved += moved
        return None

    def on_stage_end(self, context: Any) -> Optional[Mapping[str, Any]]:
        module = context.embedding
        return {"density": module.density(), "mask_updates": self.updates, "entries_moved": self.moved}


@dataclass
class DSLSettings(PruningSettings):
    """Hyperparameters of ``dsl`` (defaults: the reference code's, shuyao-wang/DSL)."""

    update_interval: int = 100  #: ΔT: steps between prune/regrow updates (the reference's default)
    initial_prune_fraction: float = 0.5  #: p_0 of the cosine-annealed prune fraction (the reference's death_rate)
    #: p_min: the cosine's floor (the reference's CosineDecay eta_min); 0 = recbench's earlier variant
    min_prune_fraction: float = 0.005
    #: T_end: null = the whole training (trainer max_epochs, the reference); 3.0 = recbench's earlier variant
    anneal_epochs: Optional[float] = None
    #: field (each field moves ceil(p_t nnz_f), the reference) | global (one ranking, floor(p_t nnz))
    scope: str = "field"
    #: random (zero-gradient entries fill the regrowth, the reference) | shrink (k = gradient candidates)
    regrow_fill: str = "random"
    mask_seed: int = 0  #: seed of the random initial mask and of the random fill


class DSL(PruningFamily):
    """Dynamic Sparse Learning; hyperparameters: ``DSLSettings`` (and ``methods/dsl.md``)."""

    name = "dsl"
    module_class = DSLEmbedding
    settings_class = DSLSettings
    #: 2: the reference's schedule (T_end = the whole training, p_min = 0.005), per-field counts and
    #: random fill of the regrowth (methods/dsl.md, Deviations)
    revision = 2

    def check_settings(self) -> None:
        super().check_settings()
        update_interval, anneal_epochs = self.update_interval, self.anneal_epochs
        initial_prune_fraction, min_prune_fraction = self.initial_prune_fraction, self.min_prune_fraction
        scope, regrow_fill = self.scope, self.regrow_fill
        if isinstance(update_interval, bool) or int(update_interval) != update_interval or update_interval < 1:
            raise ValueError(f"method 'dsl': update_interval must be an integer >= 1, got {update_interval!r}")
        if not 0 < initial_prune_fraction <= 1:
            raise ValueError(f"method 'dsl': initial_prune_fraction must be in (0, 1], got {initial_prune_fraction!r}")
        if not 0 <= min_prune_fraction <= initial_prune_fraction:
            raise ValueError(f"method 'dsl': min_prune_fraction must be in [0, initial_prune_fraction="
                             f"{initial_prune_fraction}], got {min_prune_fraction!r}")
        if anneal_epochs is not None and not anneal_epochs > 0:
            raise ValueError(f"method 'dsl': anneal_epochs must be > 0 or null (the whole training), got {anneal_epochs!r}")
        if scope not in SCOPES:
            raise ValueError(f"method 'dsl': scope={scope!r}; allowed: {', '.join(SCOPES)}")
        if regrow_fill not in REGROW_FILLS:
            raise ValueError(f"method 'dsl': regrow_fill={regrow_fill!r}; allowed: {', '.join(REGROW_FILLS)}")
        self.update_interval, self.initial_prune_fraction = int(update_interval), float(initial_prune_fraction)
        self.min_prune_fraction = float(min_prune_fraction)
        self.anneal_epochs = None if anneal_epochs is None else float(anneal_epochs)
        self.mask_seed = int(self.mask_seed)

    def method_hparams(self):
        return {"mask_seed": self.mask_seed}

    def extra_state(self, rows: int, dim: int, num_compressed_fields: int) -> int:
        return 8  # the int64 count of prune/regrow updates (keys the random fill)

    def stages(self) -> List[Stage]:
        return [Stage("train")]

    def hooks(self) -> List[Hook]:
        # the mask is re-applied first; a prune/regrow step re-zeroes what it changes itself
        return [MaskHook(), PruneRegrowHook(self)]
