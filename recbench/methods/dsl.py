"""``dsl``: Dynamic Sparse Learning — a sparse embedding trained from scratch at a fixed density.

References: Wang, Yang, Chen, Cai, Liu, Xu, Lin, Zheng, Zhang, Wang, Yin, "Dynamic Sparse
Learning: A Novel Paradigm for Efficient Recommendation", WSDM 2024 (arXiv:2402.02855); the
prune/regrow rule follows Evci et al., "Rigging the Lottery: Making All Tickets Winners"
(RigL), ICML 2020.

Mechanism: the table starts with a uniformly random mask of exactly ``nnz`` entries (the budget)
and never holds more. Every ``update_interval`` steps until ``anneal_epochs`` have passed, with
the prune fraction ``p_t = p_0 / 2 * (1 + cos(pi t / T_end))`` (``p_0 = initial_prune_fraction``
= 0.5, cosine annealing): k = floor(p_t * nnz) active entries with the smallest magnitude are
pruned, and the k inactive entries with the largest gradient magnitude are regrown (at weight 0,
RigL's rule). The gradient of inactive entries comes from the lookup output: the module gathers
the batch's rows with sparse gradients and multiplies them by the mask, and a tensor hook keeps
dL/d(embedding) of the batch's ids — (N, D), exactly the dense gradient of the masked table
restricted to the rows the batch touched, which are the only rows where it is non-zero. So the
regrow candidates are the inactive entries of the current batch's rows (all others have a zero
gradient); when fewer than k of them have a non-zero gradient, k shrinks to that number. The mask
is re-applied to the touched rows after every optimizer step, so the count of non-zero weights
never exceeds ``nnz``. In a distributed run every rank regrows from the gradients of the whole
global batch (each rank's rows joined by the trainer's ``parallel.concat_ranks``), so every
rank keeps the same mask.

Budget: ``nnz`` is the largest number of kept entries whose cheapest sparse storage (values +
indices, ``sparse_storage``) fits the target; the deployable form is that sparse table.

Shapes: KJT (F keys, B bags) -> per-id (N, D) -> KeyedTensor (B, F * D).
"""
from __future__ import annotations

import math
from typing import Any, Callable, List, Mapping, Optional, Sequence, Tuple

import torch

from recbench.methods.base import Hook
from recbench.methods.budget import check_auto
from recbench.methods.pruning import MaskHook, PrunedEmbedding, PruningMethod, top_k_mask
from recbench.types import Stage, TableSpec


def prune_fraction(step: int, end: int, initial: float) -> float:
    """Cosine-annealed fraction p_t = initial / 2 * (1 + cos(pi t / end)); 0 from ``end`` on."""
    if step >= end:
        return 0.0
    return 0.5 * initial * (1.0 + math.cos(math.pi * step / end))


class DSLEmbedding(PrunedEmbedding):
    """Fixed-density masked table with magnitude prune / gradient regrow. forward: KJT -> (B, F * D)."""

    def __init__(self, tables: Sequence[TableSpec], dim: int, hparams: Mapping[str, Any]):
        super().__init__(tables, dim, hparams["kept"], hparams["nnz"])
        generator = torch.Generator().manual_seed(int(hparams["mask_seed"]))
        with torch.no_grad():
            self.mask.copy_(top_k_mask(torch.rand(self.mask.shape, generator=generator), self.nnz))
            self.weight.mul_(self.mask)
        self._gradient: Optional[Tuple[torch.Tensor, torch.Tensor]] = None  # (rows (N,), dL/de (N, D))

    def effective(self, rows, fields, values):
        out = values * self.mask[rows]
        if out.requires_grad:
            out.register_hook(lambda grad: self._keep_gradient(rows, grad))
        return out

    def _keep_gradient(self, rows: torch.Tensor, grad: torch.Tensor) -> None:
        self._gradient = (rows, grad.detach())

    @torch.no_grad()
    def prune_and_regrow(self, fraction: float,
                         gather: Optional[Callable[[Sequence[torch.Tensor]], List[torch.Tensor]]] = None) -> int:
        """One update: returns k, the number of entries pruned and regrown (0 without a gradient).

        ``gather`` (distributed: the trainer's ``parallel.concat_ranks``) joins every rank's
        (rows, gradient) of the last batch, so that every rank regrows from the whole batch."""
        if self._gradient is None:
            return 0
        rows, grad = gather(self._gradient) if gather is not None else self._gradient
        touched, inverse = torch.unique(rows, return_inverse=True)
        scores = grad.new_zeros(touched.numel(), self.dim).index_add_(0, inverse, grad).abs()
        inactive = ~self.mask[touched]
        candidates = int(((scores > 0) & inactive).sum())
        k = min(int(fraction * self.nnz), candidates)
        if k <= 0:
            return 0
        # prune: the k active entries of smallest magnitude, over the whole table
        active = self.mask.flatten().nonzero().squeeze(1)
        drop = active[torch.topk(self.weight.flatten()[active].abs(), k, largest=False, sorted=False).indices]
        flat_mask = self.mask.view(-1)
        flat_mask[drop] = False
        # regrow: the k inactive entries (after the drop) of the touched rows with the largest |gradient|
        grow_scores = scores.masked_fill(self.mask[touched], -1.0).flatten()
        chosen = torch.topk(grow_scores, k, sorted=False).indices
        grow = touched[chosen // self.dim] * self.dim + chosen % self.dim
        flat_mask[grow] = True
        self.weight.view(-1)[drop] = 0.0
        self.weight.view(-1)[grow] = 0.0  # RigL: regrown entries start at zero
        return k


class PruneRegrowHook(Hook):
    """Every ``update_interval`` steps until ``anneal_epochs``: prune + regrow at the annealed fraction."""

    def __init__(self, method: "DSL"):
        self.method = method
        self.updates = self.moved = 0

    def on_step_end(self, context: Any) -> Optional[bool]:
        m, module = self.method, context.embedding
        step = context.stage_step
        if step % m.update_interval:
            return None
        steps_per_epoch = math.ceil(len(context.trainer.split("train")) / context.trainer.config.batch_size)
        end = max(1, int(round(m.anneal_epochs * steps_per_epoch)))
        fraction = prune_fraction(step, end, m.initial_prune_fraction)
        if fraction > 0:
            moved = module.prune_and_regrow(fraction, context.trainer.parallel.concat_ranks)
            self.updates += 1
            self.moved += moved
        return None

    def on_stage_end(self, context: Any) -> Optional[Mapping[str, Any]]:
        module = context.embedding
        return {"density": module.density(), "mask_updates": self.updates, "entries_moved": self.moved}


class DSL(PruningMethod):
    """Hyperparameters: see ``conf/method/dsl.yaml`` and ``methods/dsl.md``."""

    name = "dsl"
    module_class = DSLEmbedding

    def __init__(self, name: Optional[str] = None, nnz: Any = "auto", update_interval: int = 100,
                 initial_prune_fraction: float = 0.5, anneal_epochs: float = 3.0, mask_seed: int = 0):
        super().__init__(name, nnz=nnz, update_interval=update_interval,
                         initial_prune_fraction=initial_prune_fraction, anneal_epochs=anneal_epochs,
                         mask_seed=mask_seed)
        check_auto(self.name, "nnz", nnz)
        if int(update_interval) < 1:
            raise ValueError(f"method 'dsl': update_interval must be >= 1, got {update_interval}")
        if not 0 < initial_prune_fraction <= 1:
            raise ValueError(f"method 'dsl': initial_prune_fraction must be in (0, 1], got {initial_prune_fraction}")
        if not anneal_epochs > 0:
            raise ValueError(f"method 'dsl': anneal_epochs must be > 0, got {anneal_epochs}")
        self.update_interval, self.initial_prune_fraction = int(update_interval), float(initial_prune_fraction)
        self.anneal_epochs, self.mask_seed = float(anneal_epochs), int(mask_seed)

    def method_hparams(self):
        return {"mask_seed": self.mask_seed}

    def stages(self) -> List[Stage]:
        return [Stage("train")]

    def hooks(self) -> List[Hook]:
        # the mask is re-applied first; a prune/regrow step re-zeroes what it changes itself
        return [MaskHook(), PruneRegrowHook(self)]
