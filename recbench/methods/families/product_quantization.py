"""Base of the product-quantization family: differentiable product quantization of embedding rows.

``ProductQuantizationFamily`` is subclassed by ``dpq`` and ``mgqe``.

References: Chen, Li & Sun, "Differentiable Product Quantization for End-to-End Embedding
Compression", ICML 2020 (DPQ); Kang, Cheng, Chen, Yi, Lin, Hong & Chi, "Learning Multi-granular
Quantized Embeddings for Large-Vocab Categorical Features in Recommender Systems", WWW 2020 (MGQE).

Mechanism (training form). Every compressed row keeps a full query vector q (the paper's query
embedding, fp32, sparse gradients) split into P parts of d = D / P values. Each part j has K
key codewords and K value codewords (one codebook for all compressed fields, or one per field).
The logits of part j are <q_j, key_jk> (``assignment: softmax``) or -||q_j - key_jk||^2
(``assignment: vq``), optionally batch-normalised without affine parameters (the paper's BN on
the logits); the code is c_j = argmax_k logit_jk. softmax: the output part is
sum_k onehot(c_j)_k value_jk in the forward, with the gradient of softmax(logit_j / tau)
(straight-through, DPQ-SX). vq: keys are the values; the output part is
q_j + sg(key_jc - q_j) (straight-through) and ``extra_loss`` adds the VQ-VAE terms
mean ||sg(q_j) - key_jc||^2 + beta mean ||q_j - sg(key_jc)||^2 (DPQ-VQ). MGQE restricts the rows
outside a field's top ``head_fraction`` by training frequency (``TableSpec.counts``) to the first
K_tail < K codewords (their logits beyond K_tail are masked).

Deployable form (``to_inference``): the codes of every row, computed once in hard mode from the
final query table (evaluation in the training form uses the same all-row codes, so both forms
agree exactly), bit-packed at the smallest width ceil(log2 K) (``bit_packing``), plus the value
codebooks; MGQE stores head and tail codes in two streams at their two widths and a head bitmap
with one int32 rank per 64 rows to find a row's slot. The query table and keys are dropped.

Budget: inference bytes = packed codes + value codebooks (books x K x D x 4) (+ MGQE's bitmap and
ranks) (+ kept fields in fp32). ``parts`` (a divisor of D) and ``codewords`` are solved: for
every allowed P the largest K <= ``max_codewords`` (default 256) (and <= the number of rows) within the target,
then the landing pair with the most code bits per row P log2 K. Training bytes add the query table and its Adagrad state, the keys, Adam's
moments of the codebooks and the batch-norm statistics.

Shapes: KJT (F keys, N values) -> U unique rows -> queries (U, P, d) -> logits (U, P, K)
-> codes (U, P) -> per id (N, D) -> KeyedTensor (B, F * D).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from recbench.methods.blocks import batch_part, bit_packing, sync_batch_norm
from recbench.methods.base import CompressionMethod, InfeasibleBudget
from recbench.methods.blocks.budget import kept_bytes, largest_integer_within, split_tables, target_bytes
from recbench.methods.blocks.per_id import PerIdEmbedding
from recbench.types import FP32_BYTES, Budget, EmbeddingOptimizer, MemoryReport, Plan, TableSpec, full_embedding_bytes

ASSIGNMENTS = ("softmax", "vq")
CODEBOOKS = ("shared", "per_field")
MAX_CODEWORDS = 1 << bit_packing.MAX_BITS
RANK_BLOCK = 64  # rows per int32 rank entry of MGQE's head bitmap
INT32_BYTES, INT64_BYTES = 4, 8
_CHUNK_LOGITS = 1 << 22  # logits per chunk when coding every row (bounds the temporary memory)


def head_rows(counts: Optional[np.ndarray], fraction: float, name: str) -> np.ndarray:
    """Indices of the ceil(fraction * n) most frequent rows of a field (ties: lower id first)."""
    if counts is None:
        raise ValueError(f"mgqe: table {name!r} has no training counts (TableSpec.counts); the head/tail split needs them")
    count = int(math.ceil(fraction * len(counts)))
    order = np.lexsort((np.arange(len(counts)), -np.asarray(counts, dtype=np.int64)))
    return np.sort(order[:count])


#: (64,) int64: the bits below position r of a 64-bit word, (1 << r) - 1
_LOW_BITS = torch.tensor([(1 << r) - 1 for r in range(RANK_BLOCK)], dtype=torch.int64)
#: (256,) int64: the set bits of each byte value
_BYTE_POPCOUNT = torch.tensor([bin(v).count("1") for v in range(256)], dtype=torch.int64)


def group_map_bytes(rows: int) -> int:
    """MGQE's head bitmap (1 bit per row) + one int32 rank per RANK_BLOCK rows."""
    return bit_packing.packed_bytes(rows, 1) + -(-rows // RANK_BLOCK) * INT32_BYTES


class HeadIndex(nn.Module):
    """Which rows are head rows and each row's slot in its group (rank/select on a bitmap).

    Buffers: ``bitmap`` (ceil(R / 8),) uint8, ``ranks`` (ceil(R / 64),) int32 = head rows before
    each block of 64 rows. ``slots(rows)`` -> (is_head (U,) bool, slot (U,) int64): the index among
    head rows for head rows, among tail rows for tail rows.
    """

    def __init__(self, is_head: torch.Tensor):
        super().__init__()
        rows = is_head.numel()
        self.register_buffer("bitmap", bit_packing.pack_bits(is_head.to(torch.int64), 1))
        blocks = -(-rows // RANK_BLOCK)
        padded = torch.zeros(blocks * RANK_BLOCK, dtype=torch.int64)
        padded[:rows] = is_head.to(torch.int64)
        per_block = padded.view(blocks, RANK_BLOCK).sum(1)
        self.register_buffer("ranks", (torch.cumsum(per_block, 0) - per_block).to(torch.int32))

    def slots(self, rows: torch.Tensor):
        # the bitmap read as little-endian 64-bit words (zero-padded to whole words): word w holds
        # rows [64 w, 64 w + 64) at bits 0..63, so the head rows before ``row`` in its block are
        # the set bits of its word below bit row % 64 (popcount by a byte table)
        pad = (-self.bitmap.numel()) % 8
        words = torch.cat([self.bitmap, self.bitmap.new_zeros(pad)]).view(torch.int64)
        word = words[rows // RANK_BLOCK]
        within = rows % RANK_BLOCK
        below = (word & _LOW_BITS[within]).view(torch.uint8).view(-1, 8)
        head_before = self.ranks[rows // RANK_BLOCK].to(torch.int64) + _BYTE_POPCOUNT[below.long()].sum(1)
        is_head = ((word >> within) & 1).bool()
        return is_head, torch.where(is_head, head_before, rows - head_before)


class CodeLookup(PerIdEmbedding):
    """The deployable form: packed codes + value codebooks (+ MGQE's head index).

    forward: KJT -> KeyedTensor (B, F * D); per id: codes (P,) -> concat_j values[book, j, c_j].
    """

    breakdown_name = "codes_and_codebooks"

    def __init__(self, source: "ProductQuantizedEmbedding", codes: torch.Tensor):
        super().__init__(source.tables, source.dim, source.kept_names)
        if source.kept_table is not None:
            with torch.no_grad():
                self.kept_table.copy_(source.kept_table)
        self.parts, self.codewords, self.tail_codewords = source.parts, source.codewords, source.tail_codewords
        for name in ("compressed_index", "row_start", "row_end", "book_of_field"):
            self.register_buffer(name, getattr(source, name).clone(), persistent=False)
        book_values = source.values if source.values is not None else source.keys
        self.register_buffer("codebooks", book_values.detach().clone())
        if source.is_head is None:
            self.head_index = None
            self.register_buffer("codes", bit_packing.pack_bits(codes.reshape(-1), bit_packing.bits_for(self.codewords)))
        else:
            self.head_index = HeadIndex(source.is_head)
            self.register_buffer("codes", bit_packing.pack_bits(codes[source.is_head].reshape(-1),
                                                                bit_packing.bits_for(self.codewords)))
            self.register_buffer("tail_codes", bit_packing.pack_bits(codes[~source.is_head].reshape(-1),
                                                                     bit_packing.bits_for(self.tail_codewords)))

    def read_codes(self, rows: torch.Tensor) -> torch.Tensor:
        """(U,) global compressed rows -> (U, P) codes."""
        parts = torch.arange(self.parts, dtype=torch.int64)
        if self.head_index is None:
            return bit_packing.read_bits(self.codes, bit_packing.bits_for(self.codewords), rows.unsqueeze(1) * self.parts + parts)
        is_head, slot = self.head_index.slots(rows)
        out = torch.empty(rows.numel(), self.parts, dtype=torch.int64)
        for members, stream, count in ((is_head, self.codes, self.codewords), (~is_head, self.tail_codes, self.tail_codewords)):
            index = members.nonzero().flatten()
            if index.numel():
                out[index] = bit_packing.read_bits(stream, bit_packing.bits_for(count), slot[index].unsqueeze(1) * self.parts + parts)
        return out

    def encode(self, fields: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        rows = self.row_start[self.compressed_index[fields]] + ids
        books = self.book_of_field[fields]
        codes = self.read_codes(rows)
        parts = torch.arange(self.parts)
        return self.codebooks[books.unsqueeze(1), parts, codes].reshape(-1, self.dim)


class ProductQuantizedEmbedding(PerIdEmbedding):
    """DPQ / MGQE training form. forward: KJT (F keys, B bags) -> KeyedTensor (B, F * D).

    Args:
        tables, dim, kept: as ``PerIdEmbedding``.
        parts: P (divides D). codewords: K. tail_codewords: K_tail (== K for DPQ).
        head: field name -> head row ids (MGQE) or None (DPQ: every row uses K codewords).
        assignment: "softmax" (DPQ-SX) or "vq" (DPQ-VQ). codebooks: "shared" or "per_field".
        normalize_logits: batch-normalise the logits (no affine parameters).
        temperature: tau of the softmax relaxation. commitment: beta of DPQ-VQ.
    """

    breakdown_name = "codes_and_codebooks"

    def __init__(self, tables: Sequence[TableSpec], dim: int, kept: Sequence[str], parts: int, codewords: int,
                 tail_codewords: int, head: Optional[Mapping[str, np.ndarray]], assignment: str, codebooks: str,
                 normalize_logits: bool, temperature: float, commitment: float):
        super().__init__(tables, dim, kept)
        if dim % parts:
            raise ValueError(f"product quantization: parts={parts} must divide the embedding dim {dim}")
        self.parts, self.codewords, self.tail_codewords = int(parts), int(codewords), int(tail_codewords)
        self.assignment, self.temperature, self.commitment = assignment, float(temperature), float(commitment)
        compressed = [t for t in self.tables if t.name not in set(self.kept_names)]
        sizes = torch.tensor([t.num_embeddings for t in compressed], dtype=torch.int64)
        index = torch.full((len(self.tables),), -1, dtype=torch.int64)
        for i, t in enumerate(compressed):
            index[self.field_index[t.name]] = i
        self.register_buffer("compressed_index", index, persistent=False)
        self.register_buffer("row_start", torch.cumsum(sizes, 0) - sizes, persistent=False)
        self.register_buffer("row_end", torch.cumsum(sizes, 0), persistent=False)
        books = len(compressed) if codebooks == "per_field" else 1
        self.register_buffer("book_of_field", index.clamp(min=0) if codebooks == "per_field" else torch.zeros_like(index),
                             persistent=False)
        self.num_rows = int(sizes.sum())
        is_head = None
        if head is not None:
            is_head = torch.zeros(self.num_rows, dtype=torch.bool)
            for i, t in enumerate(compressed):
                is_head[int(self.row_start[i]) + torch.as_tensor(head[t.name], dtype=torch.int64)] = True
        self.register_buffer("is_head", is_head, persistent=False)
        self.query = nn.Parameter(torch.empty(self.num_rows, dim))
        part_dim = dim // self.parts
        with torch.no_grad():
            for i, t in enumerate(compressed):
                bound = 1.0 / t.num_embeddings ** 0.5
                start = int(self.row_start[i])
                self.query[start:start + t.num_embeddings].uniform_(-bound, bound)
        self.keys = nn.Parameter(self._data_init(books, compressed).view(books, self.parts, self.codewords, part_dim))
        self.values = (nn.Parameter(self._data_init(books, compressed).view(books, self.parts, self.codewords, part_dim))
                       if assignment == "softmax" else None)
        self.norm = nn.BatchNorm1d(self.codewords, affine=False) if normalize_logits else None
        self._extra = None
        self._codes = None  # all-row hard codes, cached while not training

    @torch.no_grad()
    def _data_init(self, books: int, compressed: Sequence[TableSpec]) -> torch.Tensor:
        """Codewords drawn from the initial query rows of the book's fields (+ tiny noise)."""
        out = []
        for b in range(books):
            start, end = (0, self.num_rows) if books == 1 else (int(self.row_start[b]), int(self.row_end[b]))
            picks = torch.randint(start, end, (self.codewords,))
            rows = self.query[picks]
            out.append(rows + 1e-3 * rows.abs().mean() * torch.randn_like(rows))
        stacked = torch.stack(out)  # (books, K, D)
        return stacked.view(books, self.codewords, self.parts, -1).transpose(1, 2).contiguous()

    # ----- assignment -----
    def logits(self, queries: torch.Tensor, books: torch.Tensor, world: int = 1,
               owned: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(U, P, d) queries of rows in ``books`` (U,) -> (U, P, K) logits (normalised, masked later).

        ``world`` W > 1 (a distributed training step): the batch norm's statistics are those of
        the whole global batch's unique rows, ``owned`` (U,) bool marking the rows this rank counts
        (``batch_part.first_holder``; ``sync_batch_norm``)."""
        out = None
        for book, members in self._book_members(books):
            keys = self.keys[book]
            q = queries if members is None else queries[members]
            part = torch.einsum("upd,pkd->upk", q, keys)
            if self.assignment == "vq":  # 2 <q, k> - |q|^2 - |k|^2, in place (the einsum's output is not saved)
                part = part.mul_(2).sub_((q * q).sum(-1, keepdim=True)).sub_((keys * keys).sum(-1).unsqueeze(0))
            if members is None:
                out = part
            else:
                out = queries.new_empty(queries.shape[0], self.parts, self.codewords) if out is None else out
                out = out.index_copy(0, members, part)
        if self.norm is not None:
            flat = out.reshape(-1, self.codewords)
            weights = None if owned is None else owned.to(flat.dtype).repeat_interleave(self.parts)
            values = flat.shape[0] if weights is None else int(batch_part.sum_over_ranks(weights.sum(), world))
            use_batch = self.norm.training and values > 1
            flat = sync_batch_norm.batch_norm(flat, self.norm, use_batch, world, weights)
            if use_batch:
                self.norm.num_batches_tracked.add_(1)
            out = flat.view_as(out)
        return out

    @staticmethod
    def _book_members(books: torch.Tensor):
        """(book, row positions or None for all rows) per codebook used by ``books`` (U,)."""
        present = torch.unique(books).tolist()
        if len(present) == 1:
            return [(present[0], None)]
        return [(book, (books == book).nonzero().flatten()) for book in present]

    def mask_tail(self, logits: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """MGQE: tail rows may use only the first K_tail codewords."""
        if self.is_head is None or self.tail_codewords >= self.codewords:
            return logits
        banned = (~self.is_head[rows]).view(-1, 1, 1) & (torch.arange(self.codewords, device=rows.device) >= self.tail_codewords)
        if logits.requires_grad:
            return logits.masked_fill(banned, float("-inf"))
        return logits.masked_fill_(banned, float("-inf"))  # logits only select codes: masked in place

    def book_rows(self, rows: torch.Tensor) -> torch.Tensor:
        fields = torch.searchsorted(self.row_end, rows, right=True)
        return fields if self.keys.shape[0] > 1 else torch.zeros_like(rows)

    @torch.no_grad()
    def all_codes(self) -> torch.Tensor:
        """(R, P) hard codes of every compressed row (eval-mode normalisation), in chunks."""
        was_training = self.training
        self.eval()
        chunks = []
        chunk = max(1, _CHUNK_LOGITS // (self.parts * self.codewords))
        for start in range(0, self.num_rows, chunk):
            rows = torch.arange(start, min(start + chunk, self.num_rows))
            queries = self.query[rows].view(len(rows), self.parts, -1)
            chunks.append(self.mask_tail(self.logits(queries, self.book_rows(rows)), rows).argmax(-1))
        self.train(was_training)
        return torch.cat(chunks) if chunks else torch.zeros(0, self.parts, dtype=torch.int64)

    def codeword_values(self) -> torch.Tensor:
        return self.values if self.values is not None else self.keys

    def encode(self, fields: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        rows_of_ids = self.row_start[self.compressed_index[fields]] + ids
        part = torch.arange(self.parts, device=ids.device)
        if not self.training:  # hard mode: the codes of the deployable form
            if self._codes is None:
                self._codes = self.all_codes()
            books = self.book_rows(rows_of_ids)
            return self.codeword_values()[books.unsqueeze(1), part, self._codes[rows_of_ids]].reshape(-1, self.dim)
        self._codes = None
        rows, inverse = torch.unique(rows_of_ids, return_inverse=True)
        world = batch_part.world_size()  # > 1: batch statistics and means over the global batch's unique rows
        owned = batch_part.first_holder(rows, world) if world > 1 else None
        books = self.book_rows(rows)
        queries = F.embedding(rows, self.query, sparse=True).view(len(rows), self.parts, -1)
        # vq: the logits only select the codes (no gradient reaches them), so they build no graph
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.assignment == "softmax"):
            logits = self.mask_tail(self.logits(queries, books, world, owned), rows)
        codes = logits.argmax(-1)
        if self.assignment == "softmax":
            # forward: the hard codeword; backward: values get the one-hot gradient, logits the
            # softmax's (straight-through onehot + p - sg(p), without building the one-hot)
            soft = torch.softmax(logits if self.temperature == 1.0 else logits / self.temperature, dim=-1)
            relaxed = soft - soft.detach()  # zero-valued
            out = self.values[books.unsqueeze(1), part, codes]
            for book, members in self._book_members(books):
                values = self.values[book].detach()
                if members is None:
                    out = out + torch.einsum("upk,pkd->upd", relaxed, values)
                else:
                    out = out.index_add(0, members, torch.einsum("upk,pkd->upd", relaxed[members], values))
        else:
            chosen = self.keys[books.unsqueeze(1), part, codes]
            self._extra = (_row_mean_squares(chosen, queries.detach(), world, owned)
                           + self.commitment * _row_mean_squares(queries, chosen.detach(), world, owned))
            out = queries + (chosen - queries).detach()
        return out.reshape(len(rows), self.dim)[inverse]

    def extra_loss(self) -> torch.Tensor:
        extra, self._extra = self._extra, None
        return extra if extra is not None else torch.zeros(())

    def sparse_parameters(self) -> List[nn.Parameter]:
        return [self.query] + super().sparse_parameters()

    def train(self, mode: bool = True):
        self._codes = None
        return super().train(mode)

    def _load_from_state_dict(self, *args, **kwargs):
        self._codes = None
        super()._load_from_state_dict(*args, **kwargs)

    def to_inference(self) -> nn.Module:
        return CodeLookup(self, self.all_codes()).eval()


def _row_mean_squares(a: torch.Tensor, b: torch.Tensor, world: int, owned: Optional[torch.Tensor]) -> torch.Tensor:
    """mean((a - b)^2) over the unique rows' (U, P, d) entries; distributed (``world`` W > 1): this
    rank's share of the global batch's mean, W * sum over its ``owned`` rows / global entries, so the
    ranks' average (their losses and gradients are averaged) is one process's value."""
    if world == 1:
        return F.mse_loss(a, b)
    weights = owned.to(a.dtype).view(-1, *([1] * (a.dim() - 1)))
    entries = batch_part.sum_over_ranks(owned.sum().to(a.dtype), world) * math.prod(a.shape[1:])
    return ((a - b) ** 2 * weights).sum() * world / entries


# ----------------------------------------------------------------------------- budget
@dataclass
class ProductQuantizationSettings:
    """Hyperparameters shared by the product-quantization family (``dpq``, ``mgqe``); defaults:
    DPQ-SX of Chen et al., ICML 2020 (``mgqe`` re-declares ``assignment``)."""

    #: P sub-vectors per row (a divisor of the embedding dim), solved from the budget (auto) or an integer
    parts: Any = "auto"
    #: K codewords per part, solved from the budget (auto) or an integer (codes take ceil(log2 K) bits)
    codewords: Any = "auto"
    #: upper bound of an auto K (training costs K logits per part and row; 256 = byte codes)
    max_codewords: int = 256
    assignment: str = "softmax"  #: softmax (DPQ-SX: dot-product logits, straight-through one-hot) | vq (DPQ-VQ)
    codebooks: str = "shared"  #: shared (one set of codebooks for all fields) | per_field
    normalize_logits: bool = True  #: batch-normalise the logits (no affine parameters), as in the paper
    temperature: float = 1.0  #: tau of the softmax relaxation
    commitment: float = 0.25  #: beta of DPQ-VQ's commitment loss (vq only)


class ProductQuantizationFamily(CompressionMethod):
    """Base of the product-quantization family: shared solver, closed-form memory and build of ``dpq`` and ``mgqe``."""

    table_backed = False
    multi_granular = False
    settings_class = ProductQuantizationSettings

    def check_settings(self) -> None:
        parts, codewords, max_codewords = self.parts, self.codewords, self.max_codewords
        if not isinstance(max_codewords, int) or not 2 <= max_codewords <= MAX_CODEWORDS:
            raise ValueError(f"method {self.name!r}: max_codewords must be an integer in [2, {MAX_CODEWORDS}], got {max_codewords!r}")
        self.max_codewords = int(max_codewords)
        if self.assignment not in ASSIGNMENTS:
            raise ValueError(f"method {self.name!r}: assignment={self.assignment!r}; allowed: {', '.join(ASSIGNMENTS)}")
        if self.codebooks not in CODEBOOKS:
            raise ValueError(f"method {self.name!r}: codebooks={self.codebooks!r}; allowed: {', '.join(CODEBOOKS)}")
        for key, value in (("parts", parts), ("codewords", codewords)):
            if value != "auto" and (not isinstance(value, int) or value < (1 if key == "parts" else 2)):
                raise ValueError(f"method {self.name!r}: {key} must be 'auto' or an integer >= {1 if key == 'parts' else 2}, got {value!r}")
        if isinstance(codewords, int) and codewords > MAX_CODEWORDS:
            raise ValueError(f"method {self.name!r}: codewords must be <= {MAX_CODEWORDS} (16-bit codes), got {codewords}")
        if not float(self.temperature) > 0 or float(self.commitment) < 0:
            raise ValueError(f"method {self.name!r}: temperature must be > 0 and commitment >= 0")
        self.normalize_logits, self.temperature, self.commitment = (bool(self.normalize_logits), float(self.temperature),
                                                                    float(self.commitment))

    # subclasses: the tail codebook size for K head codewords and the head rows per field
    # (not ``tail_codewords``: that name is ``mgqe``'s setting, an attribute of the method)
    def tail_codebook_size(self, codewords: int) -> int:
        return codewords

    def heads(self, compressed: Sequence[TableSpec]) -> Optional[Dict[str, np.ndarray]]:
        return None

    def _books(self, compressed: Sequence[TableSpec]) -> int:
        return len(compressed) if self.codebooks == "per_field" else 1

    def _inference_bytes(self, compressed, head_count: int, dim: int, parts: int, codewords: int, fixed: int) -> int:
        rows = sum(t.num_embeddings for t in compressed)
        books = self._books(compressed) * codewords * dim * FP32_BYTES
        if not self.multi_granular:
            return bit_packing.packed_bytes(rows * parts, bit_packing.bits_for(codewords)) + books + fixed
        tail = self.tail_codebook_size(codewords)
        return (bit_packing.packed_bytes(head_count * parts, bit_packing.bits_for(codewords))
                + bit_packing.packed_bytes((rows - head_count) * parts, bit_packing.bits_for(tail))
                + group_map_bytes(rows) + books + fixed)

    def solve_hparams(self, tables: Sequence[TableSpec], dim: int, budget: Budget) -> Dict[str, Any]:
        compressed, kept = split_tables(tables, budget)
        if not compressed:
            raise InfeasibleBudget(self.name, budget.compression_ratio, 1.0, 1.0, "every field is below min_rows_to_compress")
        heads = self.heads(compressed)
        head_count = sum(len(h) for h in heads.values()) if heads is not None else 0
        fixed, limit = kept_bytes(kept, dim), target_bytes(tables, dim, budget)
        full = full_embedding_bytes(tables, dim)
        divisors = [p for p in range(1, dim + 1) if dim % p == 0]
        part_options = divisors if self.parts == "auto" else [int(self.parts)]
        if any(dim % p for p in part_options):
            raise ValueError(f"method {self.name!r}: parts={self.parts} must divide the embedding dim {dim}")
        rows = sum(t.num_embeddings for t in compressed)
        k_high = min(self.max_codewords, max(2, rows)) if self.codewords == "auto" else int(self.codewords)
        k_low = 2 if self.codewords == "auto" else int(self.codewords)

        def bytes_at(parts: int, codewords: int) -> int:
            return self._inference_bytes(compressed, head_count, dim, parts, codewords, fixed)

        best = None
        for parts in part_options:
            k = largest_integer_within(lambda c: bytes_at(parts, c), k_low, k_high, limit)
            if k < k_low:
                continue
            # solutions within the tolerance of the target first, then the most code bits per row
            score = (bytes_at(parts, k) >= (1 - budget.tolerance) * limit, parts * math.log2(k), k)
            if best is None or score > best[0]:
                best = (score, parts, k)
        if best is None:
            lowest = min(bytes_at(p, k_low) for p in part_options)
            highest = max(bytes_at(p, k_high) for p in part_options)
            raise InfeasibleBudget(self.name, budget.compression_ratio, lowest / full, highest / full,
                                   f"even P={min(part_options)}, K={k_low} needs ratio {lowest / full:.4g}")
        _, parts, codewords = best
        return {"parts": parts, "codewords": codewords, "tail_codewords": self.tail_codebook_size(codewords),
                "kept": [t.name for t in kept], "head_rows": head_count}

    def memory(self, tables: Sequence[TableSpec], dim: int, hparams: Mapping[str, Any],
               optimizer: EmbeddingOptimizer = EmbeddingOptimizer()) -> MemoryReport:
        kept_names = set(hparams["kept"])
        compressed = [t for t in tables if t.name not in kept_names]
        fixed = kept_bytes([t for t in tables if t.name in kept_names], dim)
        parts, codewords = int(hparams["parts"]), int(hparams["codewords"])
        inference = self._inference_bytes(compressed, int(hparams["head_rows"]), dim, parts, codewords, fixed)
        rows = sum(t.num_embeddings for t in compressed)
        query = rows * dim * FP32_BYTES
        codebook = self._books(compressed) * codewords * dim * FP32_BYTES
        codebooks = codebook * (2 if self.assignment == "softmax" else 1)
        statistics = (2 * codewords * FP32_BYTES + INT64_BYTES) if self.normalize_logits else 0
        return MemoryReport(
            inference_bytes=inference,
            # query + kept: parameter + Adagrad state (sparse); codebooks: parameter + Adam's two moments
            training_bytes=2 * (query + fixed) + 3 * codebooks + statistics,
            parameters=(query + fixed + codebooks) // FP32_BYTES,
            full_bytes=full_embedding_bytes(tables, dim),
            breakdown={"codes_and_codebooks": inference - fixed, "kept": fixed},
        )

    def build(self, tables: Sequence[TableSpec], dim: int, plan: Plan,
              optimizer: EmbeddingOptimizer = EmbeddingOptimizer()) -> ProductQuantizedEmbedding:
        hp = plan.hparams
        compressed = [t for t in tables if t.name not in set(hp["kept"])]
        return ProductQuantizedEmbedding(tables, dim, hp["kept"], hp["parts"], hp["codewords"], hp["tail_codewords"],
                                         self.heads(compressed), self.assignment, self.codebooks,
                                         self.normalize_logits, self.temperature, self.commitment)
