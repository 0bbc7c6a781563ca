"""Per-id lookups for custom-lookup methods (ROBE, DHE) and KJT id rewriting (hashing).

A KeyedJaggedTensor is flattened to its N values with the field index of each value; a method
computes one D-dim vector per (field, id) — ``PerIdEmbedding.encode(fields (N,), ids (N,)) -> (N, D)``
— and the vectors are pooled into their bags (sum, or mean by the bag size) with one
``index_add``: a multi-hot bag is the pool of its per-id vectors, never a function of pooled parts.
Fields smaller than ``budget.min_rows_to_compress`` stay full: their rows live in one fp32 table
(all kept fields stacked, per-field row offsets) looked up with sparse gradients.

Memory is measured from the tensors held: inference bytes are the state of ``to_inference()``
(every persistent tensor of the deployable form at its dtype), training bytes the state of this
module plus optimizer state — Adam (2 x) for dense parameters, Adagrad (1 x) for sparse ones
(``recbench.training.optim``). Hash parameters are non-persistent buffers regenerated from the
method's seed (``recbench.methods.blocks.hashing_fns``) and cost 0 bytes.

Shapes: features KJT (F keys, B bags each) -> KeyedTensor values (B, F * D).

References: docs/architecture.md section 3 ("Compression method", "Budget and memory").
"""
from __future__ import annotations

import abc
from typing import Dict, List, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from recbench.methods.base import EmbeddingModule, ParamGroup
from recbench.types import MemoryReport, TableSpec, full_embedding_bytes


def field_positions(features: KeyedJaggedTensor, index: Mapping[str, int]) -> torch.Tensor:
    """(F_kjt,) int64: the module's field index of each KJT key."""
    try:
        return torch.tensor([index[k] for k in features.keys()], dtype=torch.int64, device=features.values().device)
    except KeyError as exc:
        raise KeyError(f"feature {exc.args[0]!r} is not one of the embedding's fields {sorted(index)}") from None


def value_fields(features: KeyedJaggedTensor, index: Mapping[str, int]) -> torch.Tensor:
    """(N,) int64: the module's field index of every value of ``features`` (in value order)."""
    counts = torch.tensor(features.length_per_key(), dtype=torch.int64, device=features.values().device)
    return torch.repeat_interleave(field_positions(features, index), counts)


def with_values(features: KeyedJaggedTensor, values: torch.Tensor) -> KeyedJaggedTensor:
    """The same keys and bags with new values."""
    return KeyedJaggedTensor(keys=features.keys(), values=values, lengths=features.lengths(),
                             stride=features.stride())


class BagPooling:
    """The bag structure of ``features`` (which values pool into which output column block),
    computed once and applied to any per-id vectors of those values.

    ``BagPooling(features, index, mean)(per_id (N, D)) -> (B, F * D)`` in the module's field order;
    ``mean`` (F,) bool marks mean-pooled fields (divided by the bag size; empty bags stay 0).
    Search stages keep one per validation batch (``PerIdEmbedding.precompute``) instead of
    re-deriving it from the KJT at every evaluation.
    """

    def __init__(self, features: KeyedJaggedTensor, index: Mapping[str, int], mean: torch.Tensor):
        self.batch = features.stride()
        positions = field_positions(features, index)
        lengths = features.lengths().long()
        self.num_bags, self.num_fields = lengths.numel(), len(positions)
        self.bag_of_value = torch.repeat_interleave(torch.arange(lengths.numel(), device=lengths.device), lengths)
        self.divisor = torch.where(mean[positions].repeat_interleave(self.batch), lengths.clamp(min=1), 1)
        order = torch.empty_like(positions)
        order[positions] = torch.arange(len(positions), device=positions.device)
        self.order = order

    def __call__(self, per_id: torch.Tensor) -> torch.Tensor:
        dim = per_id.shape[1]
        pooled = per_id.new_zeros(self.num_bags, dim).index_add(0, self.bag_of_value, per_id)
        pooled = (pooled / self.divisor.unsqueeze(1).to(pooled.dtype)).view(self.num_fields, self.batch, dim)
        return pooled[self.order].permute(1, 0, 2).reshape(self.batch, self.num_fields * dim)

    def value_order(self) -> Optional[torch.Tensor]:
        """(N,) the values in output order (B, F) when every bag holds exactly one value (pooling is
        then that permutation: a sum of one value, divided by 1), else None."""
        if self.bag_of_value.numel() != self.num_bags or not torch.equal(self.bag_of_value, torch.arange(self.num_bags)):
            return None
        return (self.order.unsqueeze(0) * self.batch + torch.arange(self.batch).unsqueeze(1)).reshape(-1)

    def tensors(self) -> List[torch.Tensor]:
        return [self.bag_of_value, self.divisor, self.order]


def pool_bags(per_id: torch.Tensor, features: KeyedJaggedTensor, index: Mapping[str, int],
              mean: torch.Tensor) -> torch.Tensor:
    """Pool per-id vectors (N, D) into (B, F * D) in the module's field order (``BagPooling``).

    ``mean`` (F,) bool marks mean-pooled fields (divided by the bag size; empty bags stay 0).
    """
    return BagPooling(features, index, mean)(per_id)


def tensor_bytes(tensors) -> int:
    return int(sum(t.numel() * t.element_size() for t in tensors))


class PerIdEmbedding(EmbeddingModule):
    """Base of custom-lookup modules: ``encode`` per id, kept fields as one sparse fp32 table.

    Args:
        tables: one TableSpec per field (KJT key order).
        dim: D.
        kept: names of the fields that stay uncompressed.
    """

    #: name of the method's own part of the inference bytes in ``MemoryReport.breakdown``
    breakdown_name = "weights"

    def __init__(self, tables: Sequence[TableSpec], dim: int, kept: Sequence[str]):
        super().__init__(tables, dim)
        self.field_index: Dict[str, int] = {t.name: i for i, t in enumerate(self.tables)}
        unknown = set(kept) - set(self.field_index)
        if unknown:
            raise ValueError(f"kept fields {sorted(unknown)} are not among the tables")
        self.kept_names = [t.name for t in self.tables if t.name in set(kept)]
        is_kept = torch.tensor([t.name in set(kept) for t in self.tables], dtype=torch.bool)
        rows = torch.tensor([t.num_embeddings if k else 0 for t, k in zip(self.tables, is_kept.tolist())])
        self.register_buffer("is_kept", is_kept, persistent=False)
        self.register_buffer("kept_offset", torch.cumsum(rows, 0) - rows, persistent=False)
        self.register_buffer("is_mean", torch.tensor([t.pooling == "mean" for t in self.tables]), persistent=False)
        kept_rows = int(rows.sum())
        self.kept_table = nn.Parameter(torch.empty(kept_rows, dim)) if kept_rows else None
        if self.kept_table is not None:
            with torch.no_grad():  # DLRM initialisation per kept field
                for t in self.tables:
                    if t.name in self.kept_names:
                        start = int(self.kept_offset[self.field_index[t.name]])
                        bound = 1.0 / t.num_embeddings ** 0.5
                        self.kept_table[start:start + t.num_embeddings].uniform_(-bound, bound)

    @abc.abstractmethod
    def encode(self, fields: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """(N,) field indices of compressed fields, (N,) ids -> (N, D) per-id embeddings."""

    def per_id(self, fields: torch.Tensor, ids: torch.Tensor, encode=None) -> torch.Tensor:
        """(N,) fields and ids -> (N, D): kept fields' rows, ``encode`` (default ``self.encode``) for the rest."""
        encode = encode or self.encode
        if self.kept_table is None:
            return encode(fields, ids)
        kept = self.is_kept[fields]
        out = ids.new_zeros((ids.numel(), self.dim), dtype=torch.float32)
        k_idx, c_idx = kept.nonzero().flatten(), (~kept).nonzero().flatten()
        rows = self.kept_offset[fields[k_idx]] + ids[k_idx]
        out = out.index_put((k_idx,), F.embedding(rows, self.kept_table, sparse=True))
        if c_idx.numel():
            out = out.index_put((c_idx,), encode(fields[c_idx], ids[c_idx]))
        return out

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        fields = value_fields(features, self.field_index)
        per_id = self.per_id(fields, features.values().long())
        return self.keyed_output(pool_bags(per_id, features, self.field_index, self.is_mean))

    # ----- optimisation -----
    def sparse_parameters(self) -> List[nn.Parameter]:
        """Parameters with row-sparse gradients (trained by Adagrad, see training/optim.py)."""
        return [self.kept_table] if self.kept_table is not None else []

    def param_groups(self) -> List[ParamGroup]:
        sparse = {id(p) for p in self.sparse_parameters()}
        dense = [p for p in self.parameters() if p.requires_grad and id(p) not in sparse]
        groups = [ParamGroup("embedding", self.sparse_parameters(), kind="sparse")] if sparse else []
        return groups + ([ParamGroup("decoder", dense)] if dense else [])

    # ----- memory, measured -----
    def memory_report(self) -> MemoryReport:
        deployable = self.to_inference()
        inference = tensor_bytes(deployable.state_dict().values())
        sparse = {id(p) for p in self.sparse_parameters()}
        trainable = [p for p in self.parameters() if p.requires_grad]
        dense_bytes = tensor_bytes(p for p in trainable if id(p) not in sparse)
        sparse_bytes = tensor_bytes(p for p in trainable if id(p) in sparse)
        state = tensor_bytes(self.state_dict().values())
        kept = tensor_bytes([self.kept_table]) if self.kept_table is not None else 0
        return MemoryReport(
            inference_bytes=inference,
            training_bytes=state + 2 * dense_bytes + sparse_bytes,
            parameters=sum(p.numel() for p in trainable),
            full_bytes=full_embedding_bytes(self.tables, self.dim),
            breakdown={self.breakdown_name: inference - kept, "kept": kept},
        )

