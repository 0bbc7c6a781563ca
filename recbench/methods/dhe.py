"""``dhe``: Deep Hash Embedding — no table; k dense hash encodings decoded by an MLP.

References: Kang, Cheng, Yao, Yi, Chen, Hong & Chi, "Learning to Embed Categorical Features
without Embedding Tables for Recommendation" (Deep Hash Embedding, DHE), KDD 2021; Hsword/Hetu
tools/EmbeddingMemoryCompression methods/layers/dhe.py, methods/scheduler/dhe.py and
run_compressed.py (commit a1cb1bc, the VLDB 2024 artifact).

Mechanism (Hetu's defaults): id x of field f is encoded by k = ``num_hashes`` (1024) hashes
h_j(x) = ((a_j x + b_j) mod p_j) mod m, m = ``hash_buckets`` (10^6), with a_j, b_j uniform in
[1, m) and p_j a random prime in [m, 2^31) (the next prime after a uniform start), drawn per field (``hash_family: hetu``; ``universal`` is
recbench's Carter-Wegman family with p = 2^31 - 1, ``recbench.methods.blocks.hashing_fns``). Each hash is
transformed to a real: ``uniform``, 2 h / (m - 1) - 1 on [-1, 1]; ``gaussian``, Box-Muller on the
pairs (u_{2i}, u_{2i+1}), u = max(h / (m - 1), 1e-12), written back to columns 2i (cos) and 2i + 1
(sin). The dense (N, k) encoding is deterministic and storage-free; it is computed field run by
field run in cache-sized chunks, the hetu hashes in float64 arithmetic (vectorised division; exact,
equal to the int64 arithmetic, while a x + b + p < 2^53, ``float64_is_exact``). A decoder —
``hidden_layers`` (5: Hetu's 1 + 4) blocks of Linear -> BatchNorm -> Mish (or ReLU), then
Linear(h, D) — maps it to the D-dim embedding. ``layout: per_field`` (Hetu's use_multi = 1) builds
one decoder per field; ``layout: shared`` one decoder for all fields (per-field hash salts).
Init (``init: hetu``): every Linear weight uniform(+-sqrt(1 / max_f n_f)) (the trainer's
default initialiser), biases 0; ``init: torch`` keeps PyTorch's Linear init.
Each id is decoded, then the bag is pooled (``recbench.methods.blocks.per_id``): pooled encodings are
never decoded. Each decoder runs on the batch's unique (field, id) pairs of its fields and the
result is gathered back to the N values: every layer is row-wise except BatchNorm, whose training
statistics are weighted by each unique id's occurrence count (``count_weighted_batch_norm``) —
identical to BatchNorm over all N occurrences, values and gradients.
Budget: one hidden width h for every decoder is the knob (Hetu's ``_get_dim``). Inference bytes of
a decoder are its weights with BatchNorm folded into the Linear layers,
4 * (sum_l (in_l * h + h) + h * D + D), in_1 = k, in_l = h. With ``per_field`` a field keeps its
plain table when that is not larger than a decoder (Hetu's min(plain, DHE) per field); h is the
largest width whose total is within the target (infeasible, with the reachable range, when even
h = 1 exceeds it). Training bytes add BatchNorm's affine parameters and running statistics and
Adam's two moments per dense parameter.
Shapes: KJT (F keys, N values) -> encodings (U, k) of the U unique ids -> (U, h) -> (U, D) -> (N, D) per id
-> KeyedTensor (B, F * D).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from recbench.methods.blocks import hashing_fns
from recbench.methods.base import CompressionMethod, InfeasibleBudget
from recbench.methods.blocks.budget import kept_bytes, land, largest_integer_within, split_tables, target_bytes
from recbench.methods.blocks.budget import check_auto
from recbench.methods.blocks.per_id import PerIdEmbedding
from recbench.types import FP32_BYTES, Budget, EmbeddingOptimizer, MemoryReport, Plan, TableSpec, full_embedding_bytes

DISTRIBUTIONS = ("uniform", "gaussian")
ACTIVATIONS = {"mish": nn.Mish, "relu": nn.ReLU}
LAYOUTS = ("per_field", "shared")
HASH_FAMILIES = ("hetu", "universal")
INITS = ("hetu", "torch")
INT64_BYTES = 8
#: Hetu's floor of u before the logarithm of Box-Muller.
BOX_MULLER_EPS = 1e-12


#: Hetu's hash arithmetic is int32: every p_j lies below 2^31.
PRIME_LIMIT = (1 << 31) - 1
#: Bases of a Miller-Rabin test that is deterministic below 3,215,031,751 > 2^31.
MILLER_RABIN_BASES = (2, 3, 5, 7)
#: Head room below PRIME_LIMIT for the scan to the next prime (prime gaps below 2^31 are at most 292).
PRIME_GAP = 300
#: Integers up to 2^53 are exact in float64.
FLOAT64_INTEGERS = 1 << 53
#: Hash values computed at a time (rows x k): the temporaries of a chunk stay in cache.
ENCODING_CHUNK = 1 << 17


def is_prime(n: int) -> bool:
    """Primality of 0 <= n < 2^31 (deterministic Miller-Rabin with ``MILLER_RABIN_BASES``)."""
    if n < 2:
        return False
    for q in MILLER_RABIN_BASES:
        if n % q == 0:
            return n == q
    d, s = n - 1, 0
    while d % 2 == 0:
        d, s = d // 2, s + 1
    for base in MILLER_RABIN_BASES:
        x = pow(base, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def next_prime(start: int) -> int:
    """The smallest prime >= start (start < 2^31 - 300, below which prime gaps are at most 292)."""
    n = start
    while not is_prime(n):
        n += 1
    return n


def draw_hetu_hashes(seed: int, shape: Sequence[int], buckets: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(a, b, p) int64 of ``shape``: a, b uniform in [1, m); p the next prime after a uniform start in [m, 2^31)."""
    generator = torch.Generator().manual_seed(int(seed))
    a = torch.randint(1, buckets, tuple(shape), generator=generator, dtype=torch.int64)
    b = torch.randint(1, buckets, tuple(shape), generator=generator, dtype=torch.int64)
    starts = torch.randint(max(buckets, 8), PRIME_LIMIT - PRIME_GAP, tuple(shape), generator=generator,
                           dtype=torch.int64)
    primes = torch.tensor([next_prime(int(x)) for x in starts.flatten().tolist()], dtype=torch.int64)
    return a, b, primes.view(tuple(shape))


def float64_is_exact(buckets: int, max_rows: int) -> bool:
    """Whether ``hetu_hashes_float64`` is exact for ids below ``max_rows``: a x + b + p < 2^53."""
    return (buckets - 1) * max(max_rows - 1, 0) + (buckets - 1) + PRIME_LIMIT < FLOAT64_INTEGERS


def hetu_hashes_float64(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, p: torch.Tensor,
                        buckets: int) -> torch.Tensor:
    """((a x + b) mod p) mod m in float64 arithmetic: ids x (n, 1), parameters (k,) -> (n, k) float64.

    Exact — equal to the int64 computation — whenever a x + b + p < 2^53 (``float64_is_exact``):
    a x + b is an integer below 2^53, so exact; for integers 0 <= v and 0 < q with v + q < 2^53,
    floor(fl(v / q)) = floor(v / q) (v / q lies at least 1 / q below the next integer, more than
    half an ulp there), and v - floor(v / q) q is exact. Vectorised float64 division replaces the
    scalar int64 one.
    """
    v = torch.addcmul(b, a, x)  # a x + b
    v.sub_(torch.div(v, p).floor_().mul_(p))  # mod p
    return v.sub_(torch.div(v, buckets).floor_().mul_(buckets))  # mod m


def encode_hashes(hashes: torch.Tensor, buckets: int, distribution: str,
                  out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(U, k) hash values in [0, buckets) (int64 or float64) -> (U, k) float32 encodings (Hetu's
    ``learn_hash`` transforms), computed in float64 and rounded once; written into ``out`` when given."""
    out = torch.empty(hashes.shape, dtype=torch.float32) if out is None else out
    if distribution == "uniform":  # 2 u - 1: dividing by (m - 1) / 2 rounds as 2 (h / (m - 1)) does (exact halving)
        return torch.sub(hashes.to(torch.float64) / ((buckets - 1) / 2), 1.0, out=out)
    u = hashes.to(torch.float64) / (buckets - 1)
    radius = torch.sqrt(-2.0 * torch.log(u[:, 0::2].clamp(min=BOX_MULLER_EPS)))
    angle = 2.0 * math.pi * u[:, 1::2]
    out[:, 0::2], out[:, 1::2] = radius * torch.cos(angle), radius * torch.sin(angle)
    return out


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


def hetu_init_(network: nn.Sequential, max_rows: int) -> nn.Sequential:
    """Hetu's default initialiser on every Linear: weight uniform(+-sqrt(1 / max_rows)), bias 0."""
    bound = math.sqrt(1.0 / max_rows)
    with torch.no_grad():
        for layer in network:
            if isinstance(layer, nn.Linear):
                layer.weight.uniform_(-bound, bound)
                if layer.bias is not None:
                    layer.bias.zero_()
    return network


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
    """Hash encodings + MLP decoders. forward: KJT (F keys, B bags) -> KeyedTensor (B, F * D).

    ``decoders[j]`` serves the fields with ``field_decoder == j`` (-1: a kept table); ``per_field``
    has one decoder per compressed field (field order), ``shared`` one for all.
    """

    breakdown_name = "decoder"

    def __init__(self, tables: Sequence[TableSpec], dim: int, width: int, hidden_layers: int, num_hashes: int,
                 hash_buckets: int, distribution: str, activation: str, batch_norm: bool, kept: Sequence[str],
                 hash_seed: int, layout: str = "per_field", hash_family: str = "hetu", init: str = "hetu"):
        super().__init__(tables, dim, kept)
        hashing_fns.check_hashable("dhe", [(t.name, t.num_embeddings) for t in self.tables], hash_buckets)
        self.num_hashes, self.hash_buckets, self.distribution = int(num_hashes), int(hash_buckets), distribution
        self.hash_family = hash_family
        self.max_rows = max(t.num_embeddings for t in self.tables)
        shape = (len(self.tables), self.num_hashes)
        if hash_family == "hetu":
            a, b, p = draw_hetu_hashes(hash_seed, shape, self.hash_buckets)
        else:
            (a, b), p = hashing_fns.draw(hash_seed, shape), torch.zeros(0, dtype=torch.int64)
        self.register_buffer("a", a, persistent=False)
        self.register_buffer("b", b, persistent=False)
        self.register_buffer("p", p, persistent=False)
        self.hetu_in_float64 = hash_family == "hetu" and float64_is_exact(self.hash_buckets, self.max_rows)
        compressed = [i for i, t in enumerate(self.tables) if t.name not in set(kept)]
        field_decoder = torch.full((len(self.tables),), -1, dtype=torch.int64)
        for j, i in enumerate(compressed):
            field_decoder[i] = j if layout == "per_field" else 0
        self.register_buffer("field_decoder", field_decoder, persistent=False)
        count = len(compressed) if layout == "per_field" else min(1, len(compressed))
        self.decoders = nn.ModuleList()
        for _ in range(count):
            network = decoder(num_hashes, width, hidden_layers, dim, activation, batch_norm)
            self.decoders.append(hetu_init_(network, self.max_rows) if init == "hetu" else network)

    def hashes(self, field: int, ids: torch.Tensor) -> torch.Tensor:
        """(n,) ids of one field -> (n, k) hash values in [0, m): float64 when ``hetu_in_float64``, else int64."""
        a, b = self.a[field], self.b[field]
        if self.hash_family == "universal":
            return hashing_fns.universal(ids.unsqueeze(1), a, b, self.hash_buckets)
        p = self.p[field]
        if self.hetu_in_float64:
            return hetu_hashes_float64(ids.to(torch.float64).unsqueeze(1), a.double(), b.double(), p.double(),
                                       self.hash_buckets)
        return torch.remainder(torch.remainder(a * ids.unsqueeze(1) + b, p), self.hash_buckets)

    def encodings(self, fields: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """(N,) fields, ids -> (N, k) float32 dense hash encodings.

        Computed run by run of equal consecutive fields (``encode`` passes rows sorted by field),
        ``ENCODING_CHUNK`` values at a time so that the temporaries stay in cache."""
        out = torch.empty(ids.numel(), self.num_hashes)
        chunk = max(1, ENCODING_CHUNK // self.num_hashes)
        runs, lengths = torch.unique_consecutive(fields, return_counts=True)
        start = 0
        for field, length in zip(runs.tolist(), lengths.tolist()):
            for lo in range(start, start + length, chunk):
                hi = min(lo + chunk, start + length)
                encode_hashes(self.hashes(field, ids[lo:hi]), self.hash_buckets, self.distribution, out[lo:hi])
            start += length
        return out

    def encode(self, fields: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        if ids.numel() == 0:
            return torch.zeros(0, self.dim)
        unique, inverse, counts = torch.unique(fields * self.max_rows + ids, return_inverse=True, return_counts=True)
        unique_fields, unique_ids = unique // self.max_rows, unique % self.max_rows
        which = self.field_decoder[unique_fields]
        if len(self.decoders) == 1:
            return decode(self.decoders[0], self.encodings(unique_fields, unique_ids), counts)[inverse]
        out = torch.zeros(len(unique), self.dim)
        for j, network in enumerate(self.decoders):
            rows = (which == j).nonzero().flatten()
            if rows.numel():
                encodings = self.encodings(unique_fields[rows], unique_ids[rows])
                out = out.index_put((rows,), decode(network, encodings, counts[rows]))
        return out[inverse]

    def to_inference(self) -> nn.Module:
        """BatchNorm folded into the Linear layers (eval statistics); the same hash encodings."""
        memo = {id(network): fold_batch_norm(network) for network in self.decoders}
        return copy.deepcopy(self, memo=memo).eval()


def layer_sizes(num_hashes: int, width: int, depth: int, dim: int) -> List[tuple]:
    return [(num_hashes if layer == 0 else width, width) for layer in range(depth)] + [(width, dim)]


@dataclass
class DheSettings:
    """Hyperparameters of ``dhe`` (defaults: Hetu's VLDB 2024 artifact and the paper)."""

    width: Any = "auto"  #: decoder hidden width (one for every decoder), solved from the budget
    hidden_layers: int = 5  #: Linear -> BatchNorm -> activation blocks before the output Linear (Hetu: 1 + 4)
    num_hashes: int = 1024  #: k, hash encodings per id (Hetu and the paper: 1024)
    hash_buckets: int = 1000000  #: m, range of each hash before the real-valued transform (Hetu: 1e6)
    distribution: str = "uniform"  #: uniform on [-1, 1] (Hetu) | gaussian (Box-Muller)
    activation: str = "mish"  #: mish (Hetu) | relu
    batch_norm: bool = True  #: BatchNorm1d after each hidden Linear (Hetu: yes) | false: Linear -> activation only
    layout: str = "per_field"  #: per_field: one decoder per field (Hetu use_multi=1) | shared: one for all fields
    hash_family: str = "hetu"  #: hetu: ((a x + b) mod p_j) mod m, random primes p_j >= m | universal: p = 2^31 - 1
    init: str = "hetu"  #: hetu: Linear weights uniform(+-sqrt(1/max_rows)), biases 0 | torch: PyTorch default
    hash_seed: int = 0  #: seed of the per-(field, hash) parameters


class Dhe(CompressionMethod):
    """Deep Hash Embedding; hyperparameters: ``DheSettings`` (see methods/dhe.md)."""

    name = "dhe"
    settings_class = DheSettings
    table_backed = False
    #: folding BatchNorm into the Linear layers reorders fp32 arithmetic
    inference_tolerance = 1e-5

    def check_settings(self) -> None:
        check_auto(self.name, "width", self.width)
        distribution, num_hashes = self.distribution, self.num_hashes
        for key, value, allowed in (("distribution", distribution, DISTRIBUTIONS), ("activation", self.activation, ACTIVATIONS),
                                    ("layout", self.layout, LAYOUTS), ("hash_family", self.hash_family, HASH_FAMILIES),
                                    ("init", self.init, INITS)):
            if value not in allowed:
                raise ValueError(f"method 'dhe': {key}={value!r}; allowed: {', '.join(allowed)}")
        if int(self.hidden_layers) < 1 or int(num_hashes) < 2 or int(self.hash_buckets) < 2:
            raise ValueError("method 'dhe': hidden_layers >= 1, num_hashes >= 2 and hash_buckets >= 2 are required")
        if distribution == "gaussian" and int(num_hashes) % 2:
            raise ValueError(f"method 'dhe': the gaussian (Box-Muller) encoding needs an even num_hashes, got {num_hashes}")
        self.hidden_layers, self.num_hashes, self.hash_buckets = int(self.hidden_layers), int(num_hashes), int(self.hash_buckets)
        self.batch_norm, self.hash_seed = bool(self.batch_norm), int(self.hash_seed)

    def decoder_bytes(self, width: int, dim: int) -> int:
        """Inference bytes of one decoder (BatchNorm folded: every layer is a Linear with bias)."""
        return FP32_BYTES * sum(i * o + o for i, o in layer_sizes(self.num_hashes, width, self.hidden_layers, dim))

    def split(self, compressed: Sequence[TableSpec], width: int, dim: int) -> Tuple[List[TableSpec], List[TableSpec]]:
        """(decoded, plain) fields at ``width``: ``per_field`` keeps a field plain when its table is not
        larger than a decoder (Hetu's min(plain, DHE)); ``shared`` decodes every compressed field."""
        if self.layout == "shared":
            return list(compressed), []
        one = self.decoder_bytes(width, dim)
        decoded = [t for t in compressed if kept_bytes([t], dim) > one]
        return decoded, [t for t in compressed if kept_bytes([t], dim) <= one]

    def solve_hparams(self, tables: Sequence[TableSpec], dim: int, budget: Budget) -> Dict[str, Any]:
        compressed, kept = split_tables(tables, budget)
        if not compressed:
            raise InfeasibleBudget(self.name, budget.compression_ratio, 1.0, 1.0,
                                   "every field is below min_rows_to_compress")
        limit = target_bytes(tables, dim, budget)
        most = max(1, limit // (FP32_BYTES * self.num_hashes))  # the first layer alone is k * h floats

        def bytes_at(width: int) -> int:
            decoded, plain = self.split(compressed, width, dim)
            decoders = len(decoded) if self.layout == "per_field" else min(1, len(decoded))
            return kept_bytes(list(kept) + plain, dim) + decoders * self.decoder_bytes(width, dim)

        width = largest_integer_within(bytes_at, 1, most, limit)
        land(self.name, bytes_at(max(width, 1)), tables, dim, budget, bytes_at(1),
             max(bytes_at(most), full_embedding_bytes(tables, dim)),
             f"even width 1 needs {bytes_at(1)} bytes" if width < 1 else "")
        _, plain = self.split(compressed, max(width, 1), dim)
        return {"width": width, "hidden_layers": self.hidden_layers, "layout": self.layout,
                "kept": [t.name for t in tables if t in kept or t in plain]}

    def decoder_count(self, tables: Sequence[TableSpec], hparams: Mapping[str, Any]) -> int:
        decoded = sum(t.name not in set(hparams["kept"]) for t in tables)
        return decoded if hparams.get("layout", self.layout) == "per_field" else min(1, decoded)

    def memory(self, tables: Sequence[TableSpec], dim: int, hparams: Mapping[str, Any],
               optimizer: EmbeddingOptimizer = EmbeddingOptimizer()) -> MemoryReport:
        kept = [t for t in tables if t.name in set(hparams["kept"])]
        width, depth, fixed = int(hparams["width"]), int(hparams["hidden_layers"]), kept_bytes(kept, dim)
        count = self.decoder_count(tables, hparams)
        sizes = layer_sizes(self.num_hashes, width, depth, dim)
        decoder_params = sum(i * o for i, o in sizes) + dim  # weights + output bias
        decoder_params += depth * (2 * width if self.batch_norm else width)  # BatchNorm affine or Linear biases
        statistics = depth * (2 * width * FP32_BYTES + INT64_BYTES) if self.batch_norm else 0
        inference = fixed + count * self.decoder_bytes(width, dim)
        return MemoryReport(
            inference_bytes=inference,
            # dense decoders: parameters + Adam's two moments; kept tables: parameters + Adagrad state
            training_bytes=count * (3 * decoder_params * FP32_BYTES + statistics) + 2 * fixed,
            parameters=count * decoder_params + fixed // FP32_BYTES,
            full_bytes=full_embedding_bytes(tables, dim),
            breakdown={"decoder": inference - fixed, "kept": fixed},
        )

    def build(self, tables: Sequence[TableSpec], dim: int, plan: Plan,
              optimizer: EmbeddingOptimizer = EmbeddingOptimizer()) -> DheEmbedding:
        hp = plan.hparams
        return DheEmbedding(tables, dim, hp["width"], self.hidden_layers, self.num_hashes, self.hash_buckets,
                            self.distribution, self.activation, self.batch_norm, hp["kept"], self.hash_seed,
                            self.layout, self.hash_family, self.init)
