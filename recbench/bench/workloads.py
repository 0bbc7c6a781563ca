"""Criteo-like workloads shared by the benchmarks: tables, id streams, batches, models, and the
plain-PyTorch reference embedding.

- ``criteo_like_tables(scale)``: 26 fields with the Criteo Kaggle cardinalities x ``scale``
  (at least 4 rows, plus the OOV row) and Zipf(1.1) train counts.
- ``field_ids``: per-field ids, Zipf(``exponent``) ranks (Criteo-like skew: a few hot rows) or
  uniform over the table; hot ranks are scattered over the table by a fixed permutation, as
  vocabulary rows of real data are not ordered by heat in memory after hashing.
- ``criteo_batches``: pre-built (dense (B, 13), KJT with F single-hot keys, labels (B,)).
- ``EmbeddingBagReference``: what most research code does: one ``nn.EmbeddingBag`` per field
  with dense gradients, updated by a stock ``torch.optim`` optimizer (DLRM's
  ``dlrm_s_pytorch.py`` without ``--sparse``), behind the same KJT -> KeyedTensor interface.

References: Criteo Kaggle Display Advertising Challenge cardinalities (recbench.datasets.criteo);
M. Naumov et al. 2019, DLRM (arXiv:1906.00091).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from recbench.datasets.criteo import KAGGLE_CARDINALITIES
from recbench.types import TableSpec

NUM_DENSE = 13
ZIPF_EXPONENT = 1.1
BOTTOM_MLP = (512, 256, 64)  # + D: DLRM's Criteo Kaggle bottom arch
TOP_MLP = (512, 256, 1)


def criteo_like_tables(scale: float, seed: int = 0) -> List[TableSpec]:
    rng = np.random.default_rng(seed)
    tables = []
    for i, n in enumerate(KAGGLE_CARDINALITIES):
        rows = max(4, int(n * scale)) + 1
        counts = (1e6 / np.arange(1, rows + 1) ** ZIPF_EXPONENT).astype(np.int64)
        tables.append(TableSpec(f"C{i + 1}", rows, rng.permutation(counts)))
    return tables


def field_ids(rng: np.random.Generator, rows: int, count: int, distribution: str = "zipf",
              permutation: Optional[np.ndarray] = None) -> np.ndarray:
    """(count,) int64 ids in [0, rows): ``zipf`` (ranks scattered by ``permutation``) or ``uniform``."""
    if distribution == "uniform":
        return rng.integers(0, rows, count, dtype=np.int64)
    if distribution != "zipf":
        raise ValueError(f"distribution must be 'zipf' or 'uniform', got {distribution!r}")
    ranks = np.minimum(rng.zipf(ZIPF_EXPONENT, count) - 1, rows - 1)
    return ranks if permutation is None else permutation[ranks]


def criteo_batches(tables: Sequence[TableSpec], batch_size: int, count: int, seed: int = 0,
                   distribution: str = "zipf") -> List[Tuple[torch.Tensor, KeyedJaggedTensor, torch.Tensor]]:
    """Pre-built (dense (B, 13), KJT (F keys, one id per bag), labels (B,)) batches."""
    rng = np.random.default_rng(seed)
    permutations = [np.random.default_rng([seed, i]).permutation(t.num_embeddings) for i, t in enumerate(tables)]
    out = []
    for _ in range(count):
        values = [field_ids(rng, t.num_embeddings, batch_size, distribution, p) for t, p in zip(tables, permutations)]
        kjt = KeyedJaggedTensor(keys=[t.name for t in tables], values=torch.from_numpy(np.concatenate(values)),
                                lengths=torch.ones(batch_size * len(tables), dtype=torch.int32))
        labels = torch.from_numpy((rng.random(batch_size) < 0.26).astype(np.float32))
        out.append((torch.randn(batch_size, NUM_DENSE), kjt, labels))
    return out


class EmbeddingBagReference(nn.Module):
    """One ``nn.EmbeddingBag`` (sum) per field. forward: KJT -> KeyedTensor (B, F * D).

    ``sparse=True`` is DLRM's own setup (``dlrm_s_pytorch.py``: ``nn.EmbeddingBag(..., sparse=True)``,
    updated by a stock optimizer that takes sparse gradients: SGD, or sparse Adagrad); ``sparse=False``
    gives every table a dense gradient of its whole size (the naive PyTorch baseline).
    """

    def __init__(self, tables: Sequence[TableSpec], dim: int, sparse: bool = False):
        super().__init__()
        self.names, self.dim = [t.name for t in tables], int(dim)
        self.bags = nn.ModuleList(nn.EmbeddingBag(t.num_embeddings, dim, mode="sum", sparse=sparse) for t in tables)
        with torch.no_grad():  # DLRM's initialisation (the same as recbench's fused tables)
            for bag, t in zip(self.bags, tables):
                bound = 1.0 / max(t.num_embeddings, 1) ** 0.5
                bag.weight.uniform_(-bound, bound)

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        jagged = features.to_dict()
        pooled = []
        for name, bag in zip(self.names, self.bags):
            field = jagged[name]
            pooled.append(bag(field.values(), field.offsets()[:-1].long()))
        return KeyedTensor(keys=self.names, length_per_key=[self.dim] * len(self.names), values=torch.cat(pooled, dim=1))

    def extra_loss(self) -> torch.Tensor:
        return torch.zeros(())


def dlrm(embedding: nn.Module, num_sparse: int, dim: int, model: str = "dlrm") -> nn.Module:
    """DLRM (or DCNv2) with DLRM's Criteo Kaggle MLPs around ``embedding``."""
    from recbench.models.dcn import DCNv2
    from recbench.models.dlrm import DLRM

    cls = DLRM if model == "dlrm" else DCNv2
    return cls(embedding, NUM_DENSE, num_sparse, dim, [*BOTTOM_MLP, dim], list(TOP_MLP))


def train_step(model: nn.Module, optimizers, batch, loss_fn) -> None:
    """One optimizer step (forward, backward, every optimizer's step)."""
    dense, kjt, labels = batch
    loss = loss_fn(model(dense, kjt), labels) + model.embedding.extra_loss()
    for opt in optimizers.values():
        opt.zero_grad(set_to_none=True)
    loss.backward()
    for opt in optimizers.values():
        opt.step()


def dense_forward_flops(model: nn.Module, batch) -> int:
    """FLOPs of one forward of ``model`` on ``batch`` (dense, kjt, labels), counted by torch's
    ``FlopCounterMode`` (matmuls and convolutions: the MLPs and interactions; lookups count 0)."""
    from torch.utils.flop_counter import FlopCounterMode

    dense, kjt, _ = batch
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(dense, kjt)
    return int(counter.get_total_flops())


def sgemm_workload(size: int = 1024, products: int = 8):
    """``(run, flops)``: ``run()`` computes ``products`` fp32 (size x size) @ (size x size) matrix
    products (``flops`` = products x 2 size^3), the machine's matmul rate once timed, e.g. in the
    same interleaved rounds as the workload it is a floor for."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    out = torch.empty(size, size)

    def run() -> None:
        for _ in range(products):
            torch.mm(a, b, out=out)

    return run, products * 2.0 * size ** 3
