"""``dhe``: Deep Hash Embedding — no table; k dense hash encodings decoded by an MLP.

References: Kang, Cheng, Yao, Yi, Chen, Hong & Chi, "Learning to Embed Categorical Features
without Embedding Tables for Recommendation" (Deep Hash Embedding, DHE), KDD 2021.

Mechanism: id x of field f is encoded by k universal hashes into [0, m) (k = ``num_hashes``,
m = ``hash_buckets``; salted per field), each transformed to a real: uniform on [-1, 1]
(2 h / (m - 1) - 1) or standard Gaussian (Box-Muller on pairs of (h + 1) / m), giving a dense
(N, k) encoding that is deterministic and storage-free. A shared MLP decoder — ``hidden_layers``
blocks of Linear -> BatchNorm -> Mish (or ReLU), then Linear(h, D) — maps it to the D-dim
embedding. Each id is decoded, then the bag is pooled (``recbench.methods.per_id``): pooled
encodings are never decoded. The whole decoder runs on the batch's U unique (field, id) pairs
and the result is gathered back to the N values: every layer is row-wise except BatchNorm, whose
training statistics are weighted by each unique id's occurrence count
(``count_weighted_batch_norm``) — identical to BatchNorm over all N occurrences, values and
gradients — so the work shrinks by N / U (Zipf-skewed batches repeat their hot ids).
Budget: the hidden width h (for the configured depth) is the knob: inference bytes are the
decoder's weights with BatchNorm folded into the Linear layers,
4 * (sum_l (in_l * h + h) + h * D + D), in_1 = k, in_l = h; h is the largest width within the target
(infeasible, with the reachable range, when even h = 1 exceeds it). Training bytes add BatchNorm's
affine parameters and running statistics and Adam's two moments per dense parameter.
Shapes: KJT (F keys, N values) -> encodings (U, k) of the U unique ids -> (U, h) -> (U, D) -> (N, D) per id
-> KeyedTensor (B, F * D).
"""
from __future__ import annotations

import copy
import math
from typing import Any, Dict, List, Mapping, Sequence

import torch
from torch import nn

from recbench.methods import hashing_fns
from recbench.methods.base import CompressionMethod, InfeasibleBudget
from recbench.methods.budget import kept_bytes, land, largest_integer_within, split_tables, target_bytes
from recbench.methods.budget import check_auto
from recbench.methods.per_id import PerIdEmbedding
from recbench.types import FP32_BYTES, Budget, EmbeddingOptimizer, MemoryReport, TableSpec, full_embedding_bytes

DISTRIBUTIONS = ("uniform", "gaussian")
ACTIVATIONS = {"mish": nn.Mish, "relu": nn.ReLU}
INT64_BYTES = 8


def encode_hashes(hashes: torch.Tensor, buckets: int, distribution: str) -> torch.Tensor:
    """(U, k) hash values in [0, buckets) -> (U, k) float32 encodings (DHE's transforms)."""
    h = hashes.to(torch.float64)
    if distribution == "uniform":
        return (h * (2.0 / (buckets - 1)) - 1.0).to(torch.float32)
    u = (h + 1.0) / buckets  # in (0, 1]
    radius = torch.sqrt(-2.0 * torch.log(u[:, 0::2]))
    angle = 2.0 * math.pi * u[:, 1::2]
    return torch.cat([radius * torch.cos(angle), radius * torch.sin(angle)], dim=1).to(torch.float32)


def count_weighted_batch_norm(norm: nn.BatchNorm1d, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """BatchNorm of the N rows that ``x`` (U, h) stands for, row u repeated ``counts[u]`` times.

    Training mode: batch mean and (biased) variance weighted by ``counts`` — identical to
    ``norm`` applied to the N repeated rows — and the running statistics updated with the
    unbiased variance of those N rows, as ``nn.BatchNorm1d`` does. Eval mode: ``norm(x)``.
    """
    if not norm.training:
        return norm(x)
    weights = counts.to(x.dtype).unsqueeze(1)
    total = weights.sum()
    mean = (weights * x).sum(0) / total
    centred = x - mean
    var = (weights * centred * centred).sum(0) / total
    with torch.no_grad():
        norm.num_batches_tracked.add_(1)
        momentum = norm.momentum if norm.momentum is not None else 1.0 / float(norm.num_batches_tracked)
        unbiased = var * (total / (total - 1).clamp(min=1))
        norm.running_mean.lerp_(mean.detach(), momentum)
        norm.running_var.lerp_(unbiased.detach(), momentum)
    return centred * torch.rsqrt(var + norm.eps) * norm.weight + norm.bias


def decode(network: nn.Sequential, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Run the decoder on (U, k) unique encodings standing for ``counts`` (U,) occurrences each."""
    for layer in network:
        x = count_weighted_batch_norm(layer, x, counts) if isinstance(layer, nn.BatchNorm1d) else layer(x)
    return x


def decoder(num_hashes: int, width: int, depth: int, dim: int, activation: str, batch_norm: bool) -> nn.Sequential:
    layers: List[nn.Module] = []
    for layer in range(depth):
        layers.append(nn.Linear(num_hashes if layer == 0 else width, width, bias=not batch_norm))
        if batch_norm:
            layers.append(nn.BatchNorm1d(width))
        layers.append(ACTIVATIONS[activation]())
    layers.append(nn.Linear(width, dim))
    return nn.Sequential(*layers)


def fold_batch_norm(network: nn.Sequential) -> nn.Sequential:
    """Linear -> BatchNorm (eval statistics) folded into one Linear with bias; other layers copied."""
    out: List[nn.Module] = []
    for layer in network:
        if isinstance(layer, nn.BatchNorm1d):
            linear = out.pop()
            scale = layer.weight / torch.sqrt(layer.running_var + layer.eps)
            bias = linear.bias if linear.bias is not None else torch.zeros_like(layer.running_mean)
            folded = nn.Linear(linear.in_features, linear.out_features)
            with torch.no_grad():
                folded.weight.copy_(linear.weight * scale.unsqueeze(1))
                folded.bias.copy_((bias - layer.running_mean) * scale + layer.bias)
            out.append(folded)
        else:
            out.append(copy.deepcopy(layer))
    return nn.Sequential(*out)


class DheEmbedding(PerIdEmbedding):
    """Hash encodings + MLP decoder. forward: KJT (F keys, B bags) -> KeyedTensor (B, F * D)."""

    breakdown_name = "decoder"

    def __init__(self, tables: Sequence[TableSpec], dim: int, width: int, hidden_layers: int, num_hashes: int,
                 hash_buckets: int, distribution: str, activation: str, batch_norm: bool, kept: Sequence[str],
                 hash_seed: int):
        super().__init__(tables, dim, kept)
        hashing_fns.check_hashable("dhe", [(t.name, t.num_embeddings) for t in self.tables], hash_buckets)
        self.num_hashes, self.hash_buckets, self.distribution = int(num_hashes), int(hash_buckets), distribution
        self.max_rows = max(t.num_embeddings for t in self.tables)
        a, b = hashing_fns.draw(hash_seed, (len(self.tables), self.num_hashes))
        self.register_buffer("a", a, persistent=False)
        self.register_buffer("b", b, persistent=False)
        self.decoder = decoder(num_hashes, width, hidden_layers, dim, activation, batch_norm)

    def encodings(self, fields: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """(N,) fields, ids -> (N, k) dense hash encodings."""
        hashes = hashing_fns.universal(ids.unsqueeze(1), self.a[fields], self.b[fields], self.hash_buckets)
        return encode_hashes(hashes, self.hash_buckets, self.distribution)

    def encode(self, fields: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        if ids.numel() == 0:
            return torch.zeros(0, self.dim)
        unique, inverse, counts = torch.unique(fields * self.max_rows + ids, return_inverse=True, return_counts=True)
        encodings = self.encodings(unique // self.max_rows, unique % self.max_rows)
        return decode(self.decoder, encodings, counts)[inverse]

    def to_inference(self) -> nn.Module:
        """BatchNorm folded into the Linear layers (eval statistics); the same hash encodings."""
        return copy.deepcopy(self, memo={id(self.decoder): fold_batch_norm(self.decoder)}).eval()


def layer_sizes(num_hashes: int, width: int, depth: int, dim: int) -> List[tuple]:
    return [(num_hashes if layer == 0 else width, width) for layer in range(depth)] + [(width, dim)]


class Dhe(CompressionMethod):
    name = "dhe"
    table_backed = False
    #: folding BatchNorm into the Linear layers reorders fp32 arithmetic
    inference_tolerance = 1e-5

    def __init__(self, name: str | None = None, width: Any = "auto", hidden_layers: int = 2, num_hashes: int = 1024,
                 hash_buckets: int = 1_000_000, distribution: str = "uniform", activation: str = "mish",
                 batch_norm: bool = True, hash_seed: int = 0):
        super().__init__(name, width=width, hidden_layers=hidden_layers, num_hashes=num_hashes,
                         hash_buckets=hash_buckets, distribution=distribution, activation=activation,
                         batch_norm=batch_norm, hash_seed=hash_seed)
        check_auto(self.name, "width", width)
        if distribution not in DISTRIBUTIONS:
            raise ValueError(f"method 'dhe': distribution={distribution!r}; allowed: {', '.join(DISTRIBUTIONS)}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"method 'dhe': activation={activation!r}; allowed: {', '.join(ACTIVATIONS)}")
        if int(hidden_layers) < 1 or int(num_hashes) < 2 or int(hash_buckets) < 2:
            raise ValueError("method 'dhe': hidden_layers >= 1, num_hashes >= 2 and hash_buckets >= 2 are required")
        if distribution == "gaussian" and int(num_hashes) % 2:
            raise ValueError(f"method 'dhe': the gaussian (Box-Muller) encoding needs an even num_hashes, got {num_hashes}")
        self.hidden_layers, self.num_hashes, self.hash_buckets = int(hidden_layers), int(num_hashes), int(hash_buckets)
        self.distribution, self.activation, self.batch_norm = distribution, activation, bool(batch_norm)
        self.hash_seed = int(hash_seed)

    def decoder_bytes(self, width: int, dim: int) -> int:
        """Inference bytes of the decoder (BatchNorm folded: every layer is a Linear with bias)."""
        return FP32_BYTES * sum(i * o + o for i, o in layer_sizes(self.num_hashes, width, self.hidden_layers, dim))

    def solve(self, tables: Sequence[TableSpec], dim: int, budget: Budget) -> Dict[str, Any]:
        compressed, kept = split_tables(tables, budget)
        if not compressed:
            raise InfeasibleBudget(self.name, budget.compression_ratio, 1.0, 1.0,
                                   "every field is below min_rows_to_compress")
        fixed, limit = kept_bytes(kept, dim), target_bytes(tables, dim, budget)
        most = max(1, limit // (FP32_BYTES * self.num_hashes))  # the first layer alone is k * h floats

        def bytes_at(width: int) -> int:
            return fixed + self.decoder_bytes(width, dim)

        width = largest_integer_within(bytes_at, 1, most, limit)
        land(self.name, bytes_at(max(width, 1)), tables, dim, budget, bytes_at(1),
             max(bytes_at(most), full_embedding_bytes(tables, dim)),
             f"even width 1 needs {bytes_at(1)} bytes" if width < 1 else "")
        return {"width": width, "hidden_layers": self.hidden_layers, "kept": [t.name for t in kept]}

    def memory(self, tables: Sequence[TableSpec], dim: int, hparams: Mapping[str, Any],
               optimizer: EmbeddingOptimizer = EmbeddingOptimizer()) -> MemoryReport:
        kept = [t for t in tables if t.name in set(hparams["kept"])]
        width, depth, fixed = int(hparams["width"]), int(hparams["hidden_layers"]), kept_bytes(kept, dim)
        sizes = layer_sizes(self.num_hashes, width, depth, dim)
        decoder_params = sum(i * o for i, o in sizes) + dim  # weights + output bias
        decoder_params += depth * (2 * width if self.batch_norm else width)  # BatchNorm affine or Linear biases
        statistics = depth * (2 * width * FP32_BYTES + INT64_BYTES) if self.batch_norm else 0
        inference = fixed + self.decoder_bytes(width, dim)
        return MemoryReport(
            inference_bytes=inference,
            # dense decoder: parameters + Adam's two moments; kept tables: parameters + Adagrad state
            training_bytes=3 * decoder_params * FP32_BYTES + statistics + 2 * fixed,
            parameters=decoder_params + fixed // FP32_BYTES,
            full_bytes=full_embedding_bytes(tables, dim),
            breakdown={"decoder": inference - fixed, "kept": fixed},
        )

    def build(self, tables: Sequence[TableSpec], dim: int, budget: Budget,
              optimizer: EmbeddingOptimizer = EmbeddingOptimizer()) -> DheEmbedding:
        hp = self.solve(tables, dim, budget)
        return DheEmbedding(tables, dim, hp["width"], self.hidden_layers, self.num_hashes, self.hash_buckets,
                            self.distribution, self.activation, self.batch_norm, hp["kept"], self.hash_seed)
