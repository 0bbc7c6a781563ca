"""Per-sample random draws of a training forward that equal one process's draws when distributed.

A module that draws random values per sample of the batch (OptEmbed's supernet: one random dim
per sample and field) calls ``per_row(draw, rows)`` with ``draw(n)`` returning n rows of draws
from the global torch RNG. In one process this is ``draw(rows)``, the plain call. Under
``trainer.distributed=true`` each rank holds the contiguous rows ``[start, start + rows)`` of a
global batch of ``total`` rows, which the trainer declares around the forward (``placement``):
every rank draws the whole global batch (so the RNG streams stay identical on every rank and
equal one process's stream) and keeps its own rows, which are exactly the values one process
would give those samples. Without it, every rank would draw the same values for its first rows
(samples of different ranks would share their draws) and ranks with a different batch share
would leave the RNG in different states.

Shapes: ``draw(n)`` -> (n, ...); ``per_row`` -> (rows, ...).

References: DESIGN.md section 6 (distributed runs equal one process up to summation order).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional, Tuple

import torch

_PLACEMENT: Optional[Tuple[int, int]] = None  # (start, total): this process's rows of the global batch


@contextlib.contextmanager
def placement(start: int, total: int) -> Iterator[None]:
    """Within this block, the batch being forwarded is rows ``[start, start + rows)`` of ``total``."""
    global _PLACEMENT
    if not 0 <= int(start) < max(int(total), 1):
        raise ValueError(f"placement: start must be in [0, {total}), got {start}")
    previous, _PLACEMENT = _PLACEMENT, (int(start), int(total))
    try:
        yield
    finally:
        _PLACEMENT = previous


def per_row(draw: Callable[[int], torch.Tensor], rows: int) -> torch.Tensor:
    """``draw(rows)`` in one process; this rank's rows of ``draw(total)`` inside ``placement``."""
    if _PLACEMENT is None:
        return draw(rows)
    start, total = _PLACEMENT
    if start + rows > total:
        raise ValueError(f"per_row: {rows} rows from row {start} exceed the global batch of {total}")
    return draw(total)[start:start + rows]
