"""Vectorised batches from memory-mapped split arrays.

One batch = one fancy-index gather per array (no per-sample Python). Sparse features become a
``KeyedJaggedTensor`` with keys in ``DatasetSpec.tables`` order; single-hot fields have length
1 per sample, multi-hot fields their bag sizes.

References: torchrec.datasets.utils.Batch; docs/architecture.md sections 2 and 6.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, Iterator

import numpy as np
import torch
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recbench.datasets.storage import SplitArrays
from recbench.types import DatasetSpec


@dataclass
class RecBatch(Batch):
    """torchrec ``Batch`` plus optional extra per-sample targets (e.g. rating), each (B,)."""

    targets: Dict[str, torch.Tensor] = field(default_factory=dict)

    def to(self, device: torch.device, non_blocking: bool = False) -> "RecBatch":
        return RecBatch(
            dense_features=self.dense_features.to(device=device, non_blocking=non_blocking),
            sparse_features=self.sparse_features.to(device=device, non_blocking=non_blocking),
            labels=self.labels.to(device=device, non_blocking=non_blocking),
            targets={k: v.to(device=device, non_blocking=non_blocking) for k, v in self.targets.items()},
        )


def _gather_bags(values: np.ndarray, offsets: np.ndarray, rows: np.ndarray):
    """Concatenate the bags of ``rows`` (vectorised): returns (values, lengths)."""
    starts = offsets[rows]
    lengths = offsets[rows + 1] - starts
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64), lengths
    # position of each output element inside its bag, added to its bag's start
    bag_of = np.repeat(np.arange(len(rows)), lengths)
    within = np.arange(total) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    return values[starts[bag_of] + within].astype(np.int64), lengths


def make_batch(spec: DatasetSpec, split: SplitArrays, rows: np.ndarray) -> RecBatch:
    """Build one batch from row indices (B,)."""
    rows = np.asarray(rows, dtype=np.int64)
    if len(rows) > 1 and np.all(np.diff(rows) == 1):  # contiguous: cheap slices
        sl = slice(int(rows[0]), int(rows[-1]) + 1)
        dense, sparse, labels = split.dense[sl], split.sparse[sl], split.labels[sl]
    else:
        dense, sparse, labels = split.dense[rows], split.sparse[rows], split.labels[rows]
    batch_size = len(rows)
    value_parts, length_parts = [], []
    single_col = 0
    for table in spec.tables:
        if table.multi_hot:
            vals, lens = _gather_bags(split.multi_values[table.name], split.multi_offsets[table.name], rows)
            value_parts.append(vals)
            length_parts.append(lens)
        else:
            value_parts.append(np.asarray(sparse[:, single_col], dtype=np.int64))
            length_parts.append(np.ones(batch_size, dtype=np.int64))
            single_col += 1
    kjt = KeyedJaggedTensor(
        keys=spec.feature_names,
        values=torch.from_numpy(np.concatenate(value_parts)) if value_parts else torch.zeros(0, dtype=torch.long),
        lengths=torch.from_numpy(np.concatenate(length_parts).astype(np.int32)) if length_parts else torch.zeros(0, dtype=torch.int32),
    )
    targets = {}
    for name, arr in split.targets.items():
        targets[name] = torch.from_numpy(np.asarray(arr[rows], dtype=np.float32))
    return RecBatch(
        dense_features=torch.from_numpy(np.array(dense, dtype=np.float32)),
        sparse_features=kjt,
        labels=torch.from_numpy(np.array(labels, dtype=np.float32)),
        targets=targets,
    )


class BatchIterator:
    """Iterates a split in batches; shuffled per epoch with a seeded permutation.

    Args:
        spec: the dataset spec (table order, multi-hot fields).
        split: memory-mapped split arrays.
        batch_size: rows per batch (the last batch may be smaller unless drop_last).
        shuffle: permute rows each epoch (seeded by ``seed`` and the epoch number).
        seed: base seed.
        drop_last: drop a final incomplete batch.
    """

    def __init__(
        self,
        spec: DatasetSpec,
        split: SplitArrays,
        batch_size: int,
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = False,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.spec, self.split, self.batch_size = spec, split, int(batch_size)
        self.shuffle, self.seed, self.drop_last = shuffle, int(seed), drop_last

    def __len__(self) -> int:
        n = len(self.split)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def order(self, epoch: int) -> np.ndarray:
        n = len(self.split)
        if not self.shuffle:
            return np.arange(n, dtype=np.int64)
        return np.random.default_rng([self.seed, epoch]).permutation(n).astype(np.int64)

    def epoch_rows(self, epoch: int = 0, start_batch: int = 0) -> Iterator[np.ndarray]:
        """Row indices of each batch of one epoch, optionally starting at ``start_batch``."""
        order = self.order(epoch)
        for b in range(start_batch, len(self)):
            rows = order[b * self.batch_size : (b + 1) * self.batch_size]
            if self.shuffle:
                rows = np.sort(rows)  # sequential page access inside the batch; order within a batch is irrelevant
            yield rows

    def epoch(self, epoch: int = 0, start_batch: int = 0) -> Iterator[RecBatch]:
        """Batches of one epoch, optionally starting at ``start_batch`` (for resume)."""
        for rows in self.epoch_rows(epoch, start_batch):
            yield make_batch(self.spec, self.split, rows)

    def __iter__(self) -> Iterator[RecBatch]:
        return self.epoch(0)
