"""Which part of the global batch this process holds, for lookups that must equal one process's.

Under ``trainer.distributed=true`` each of W ranks forwards the contiguous rows
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

In one process (no ``placement``) both are the plain computation.

Shapes: ``draw(n)`` -> (n, ...); ``per_row`` -> (rows, ...).

References: DESIGN.md section 6 (distributed runs equal one process up to summation order);
``recbench.training.distributed``.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional, Tuple

import torch

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
