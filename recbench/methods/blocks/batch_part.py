"""Which part of the global batch this process holds, for lookups that must equal one process's.

Under ``runtime.distributed=true`` each of W ranks forwards the contiguous rows
``[start, start + rows)`` of a global batch of ``total`` rows; the trainer declares it around the
training forward and the regulariser (``placement``). Two things a module computes from "the
batch" then need it to stay equal to one process:

* per-sample random draws (OptEmbed's supernet: one random dim per sample and field):
  ``per_row(draw, rows)`` draws the whole global batch on every rank (``draw(total)``) and keeps
  this rank's rows: exactly the values one process gives those samples, and RNG streams that
  stay identical on every rank. Drawing only ``rows`` would give the first rows of every rank the
  same values, and ranks with a different share of the batch would leave the RNG in different
  states.
* sums over the batch's lookups in ``extra_loss`` (PEP's L2 on the batch's table entries):
  gradients are averaged over ranks, so a rank's sum over its rows enters with weight 1/W;
  multiplied by ``batch_sum_scale()`` (W; 1 in one process) it makes the average the global
  batch's sum. (Terms over parameters only need no factor: every rank adds the same value.)

* quantities over the whole batch that a module computes in its forward or backward (the rows
  an in-backward update touches, batch-norm statistics, a sketch of the batch's ids): W > 1
  inside ``placement`` (``world_size``) tells the module to combine every rank's part with the
  collectives below, called in the same order on every rank: ``concat_over_ranks`` (each rank's
  rows, in rank order), ``sum_over_ranks`` and ``first_holder`` (which of this rank's unique ids
  no lower rank holds: a per-unique-id quantity is counted once, as in one process).

In one process (no ``placement``) all of them are the plain computation.

Shapes: ``draw(n)`` -> (n, ...); ``per_row`` -> (rows, ...); ``concat_over_ranks``: (n_r, ...)
per rank -> (sum_r n_r, ...); ``first_holder``: (U,) -> (U,) bool.

References: docs/architecture.md section 6 (distributed runs equal one process up to summation order);
``recbench.training.distributed``.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

_PLACEMENT: Optional[Tuple[int, int, int]] = None  # (start, total, world size) of this process's rows


@contextlib.contextmanager
def placement(start: int, total: int, world_size: int) -> Iterator[None]:
    """Within this block, the batch is rows ``[start, start + rows)`` of ``total``, over ``world_size`` ranks."""
    global _PLACEMENT
    if not 0 <= int(start) < max(int(total), 1) or int(world_size) < 1:
        raise ValueError(f"placement: need 0 <= start < total and world_size >= 1, got start={start}, "
                         f"total={total}, world_size={world_size}")
    previous, _PLACEMENT = _PLACEMENT, (int(start), int(total), int(world_size))
    try:
        yield
    finally:
        _PLACEMENT = previous


def per_row(draw: Callable[[int], torch.Tensor], rows: int) -> torch.Tensor:
    """``draw(rows)`` in one process; this rank's rows of ``draw(total)`` inside ``placement``."""
    if _PLACEMENT is None:
        return draw(rows)
    start, total, _ = _PLACEMENT
    if start + rows > total:
        raise ValueError(f"per_row: {rows} rows from row {start} exceed the global batch of {total}")
    return draw(total)[start:start + rows]


def batch_sum_scale() -> float:
    """Factor of a sum over this process's rows in the loss: W inside ``placement``, else 1."""
    return float(_PLACEMENT[2]) if _PLACEMENT is not None else 1.0


def world_size() -> int:
    """W of the current placement (the ranks sharing the global batch); 1 outside one."""
    return _PLACEMENT[2] if _PLACEMENT is not None else 1


def _check_group(world: int) -> None:
    if world > 1 and not (dist.is_initialized() and dist.get_world_size() == world):
        raise RuntimeError(f"batch_part: the batch is split over {world} ranks but no process group of that size "
                           "is initialised (collectives over ranks need torch.distributed)")


def concat_over_ranks(tensors: Sequence[torch.Tensor], world: int) -> List[torch.Tensor]:
    """Each tensor (n_r, ...) joined (dim 0) over the ``world`` ranks in rank order; n_r may differ
    per rank, the trailing shape and dtype may not. Unchanged when ``world`` is 1."""
    if world == 1:
        return list(tensors)
    _check_group(world)
    sizes = torch.tensor([int(t.shape[0]) for t in tensors], dtype=torch.int64)
    every = [torch.empty_like(sizes) for _ in range(world)]
    dist.all_gather(every, sizes)
    counts = torch.stack(every)  # (W, k)
    out = []
    for i, tensor in enumerate(tensors):
        tensor = tensor.detach().contiguous()
        longest = int(counts[:, i].max())
        padded = tensor.new_zeros((longest, *tensor.shape[1:]))
        padded[: tensor.shape[0]] = tensor
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded)
        out.append(torch.cat([part[: int(counts[r, i])] for r, part in enumerate(parts)]))
    return out


def sum_over_ranks(tensor: torch.Tensor, world: int) -> torch.Tensor:
    """The sum of ``tensor`` over the ``world`` ranks (a new tensor; ``tensor`` itself when ``world`` is 1)."""
    if world == 1:
        return tensor
    _check_group(world)
    total = tensor.detach().clone()
    dist.all_reduce(total)
    return total


def first_holder(unique: torch.Tensor, world: int) -> torch.Tensor:
    """(U,) bool: which of this rank's unique ids (U,) no lower rank holds. Summed over ranks,
    ``first_holder`` counts every id of the global batch exactly once; all True when ``world`` is 1."""
    if world == 1:
        return torch.ones(unique.shape[0], dtype=torch.bool)
    rank = dist.get_rank()
    ids, owners = concat_over_ranks([unique, torch.full_like(unique, rank)], world)
    return ~torch.isin(unique, ids[owners < rank])
