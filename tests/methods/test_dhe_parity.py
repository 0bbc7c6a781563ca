"""DHE parity with the VLDB 2024 artifact.

Reference: Hsword/Hetu, commit a1cb1bcaf236c9f1d452733b105997d50c16c9df,
tools/EmbeddingMemoryCompression/methods/layers/dhe.py (``DeepHashEmbedding``: slopes and biases
uniform in [1, num_buckets), a random prime >= num_buckets per hash, ``make_layers``: Linear(k, h),
BatchNorm, Mish, then 4 x (Linear(h, h), BatchNorm, Mish), then Linear(h, D)),
python/hetu/gpu_ops/CompressedEmbedding.py (``LearnHashOp.compute``, the CPU path of the encoding),
methods/scheduler/dhe.py (``_get_single_memory``, ``_get_dim``, ``get_embed_layer`` with
use_multi = 1: one DHE per field whose table is larger than a DHE), methods/scheduler/base.py (the
default initialiser uniform(+-sqrt(1 / max n_f))) and run_compressed.py (num_buckets 1e6,
num_hash 1024, dist uniform; use_multi forced to 1 for dhe).

The reference computations are re-implemented here in numpy, independently of recbench's code.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from recbench.methods.dhe import Dhe, is_prime
from recbench.types import Budget, TableSpec
from solve_build import solve_and_build

DIM = 16
TABLES = [TableSpec("user", 943), TableSpec("item", 1682), TableSpec("gender", 2), TableSpec("zip", 795)]


def hetu_learn_hash(x, slopes, biases, primes, nbucket, dist, eps=1e-12):
    """LearnHashOp.compute (CPU): (N,) ids -> (N, k) encodings."""
    x = np.expand_dims(x, -1)
    results = (slopes * x + biases) % primes % nbucket
    scale_pos = results / (nbucket - 1)
    scale_both = scale_pos * 2 - 1
    if dist != "uniform":
        for i in range(0, slopes.shape[0], 2):
            left = np.sqrt(-2 * np.log(np.maximum(scale_pos[..., i], eps)))
            right = 2 * np.pi * scale_pos[..., i + 1]
            scale_both[..., i] = left * np.cos(right)
            scale_both[..., i + 1] = left * np.sin(right)
    return scale_both


def hetu_single_memory(fcdim, num_hash, dim=DIM):
    return (num_hash + 1) * fcdim + 4 * fcdim * (fcdim + 1) + (dim + 1) * fcdim + 10 * fcdim


def mish(x):
    return x * np.tanh(np.log1p(np.exp(x)))


def hetu_forward(x, linears, eps=1e-5):
    """Hetu's Sequence in training mode: (Linear -> BatchNorm(batch statistics) -> Mish) x 5, Linear."""
    for i, (weight, bias) in enumerate(linears):
        x = x @ weight + bias  # Hetu stores weights (in, out)
        if i < len(linears) - 1:
            x = (x - x.mean(0)) / np.sqrt(x.var(0) + eps)  # BatchNorm: scale 1, bias 0 at init
            x = mish(x)
    return x


@pytest.mark.parametrize("dist", ["uniform", "gaussian"])
def test_hash_encoding_equals_hetus_learn_hash_on_fixed_ids(dist):
    method = Dhe(num_hashes=64, distribution=dist)
    torch.manual_seed(0)
    module = solve_and_build(method, TABLES, DIM, Budget(compression_ratio=0.5, min_rows_to_compress=0))
    ids = np.array([0, 1, 2, 7, 100, 942, 500, 1681])
    for field in (0, 1):
        a, b, p = (t[field].numpy() for t in (module.a, module.b, module.p))
        assert a.min() >= 1 and a.max() < 10 ** 6 and b.min() >= 1 and b.max() < 10 ** 6
        assert p.min() >= 10 ** 6 and p.max() < 2 ** 31 and all(is_prime(int(q)) for q in p[:16])
        expected = hetu_learn_hash(ids, a, b, p, 10 ** 6, "uniform" if dist == "uniform" else "normal")
        ours = module.encodings(torch.full((len(ids),), field), torch.from_numpy(ids)).double().numpy()
        assert np.allclose(ours, expected, atol=1e-5)
    assert not np.array_equal(module.a[0].numpy(), module.a[1].numpy())  # each field draws its own hashes


def test_one_decoder_per_field_with_hetus_layers_and_init():
    method, budget = Dhe(), Budget(compression_ratio=0.5, min_rows_to_compress=0)
    hp = method.solve(TABLES, DIM, budget).hparams
    h = hp["width"]
    torch.manual_seed(0)
    module = solve_and_build(method, TABLES, DIM, budget)
    # use_multi = 1: a field gets a DHE when its table is larger than a DHE, else a plain table
    hetu_dhe = [t.name for t in TABLES if t.num_embeddings * DIM > hetu_single_memory(h, 1024)]
    assert [t.name for t in TABLES if t.name not in hp["kept"]] == hetu_dhe == ["user", "item", "zip"]
    expected = [("Linear", 1024, h), ("BatchNorm1d", h), ("Mish",)]
    expected += [("Linear", h, h), ("BatchNorm1d", h), ("Mish",)] * 4 + [("Linear", h, DIM)]
    bound = math.sqrt(1 / max(t.num_embeddings for t in TABLES))
    assert len(module.decoders) == 3
    for network in module.decoders:
        shapes = []
        for layer in network:
            if isinstance(layer, nn.Linear):
                shapes.append(("Linear", layer.in_features, layer.out_features))
                assert float(layer.weight.detach().abs().max()) <= bound
                assert float(layer.weight.detach().std()) == pytest.approx(bound / math.sqrt(3), rel=0.1)
                assert layer.bias is None or not layer.bias.any()
            elif isinstance(layer, nn.BatchNorm1d):
                shapes.append(("BatchNorm1d", layer.num_features))
            else:
                shapes.append((type(layer).__name__,))
        assert shapes == expected


def test_decoder_forward_equals_hetus_sequence_on_fixed_weights():
    torch.manual_seed(0)
    module = solve_and_build(Dhe(num_hashes=32), TABLES, DIM, Budget(compression_ratio=0.5, min_rows_to_compress=0))
    network = module.decoders[0]
    linears = [layer for layer in network if isinstance(layer, nn.Linear)]
    weights = [(l.weight.detach().double().numpy().T,
                l.bias.detach().double().numpy() if l.bias is not None else 0.0) for l in linears]
    x = np.random.default_rng(0).uniform(-1, 1, (64, 32))
    expected = hetu_forward(x, weights)
    ours = network.double()(torch.from_numpy(x)).detach().numpy()
    assert np.allclose(ours, expected, atol=1e-8)


def test_decoder_bytes_differ_from_hetus_count_by_the_folded_batchnorm():
    """Hetu's _get_single_memory counts the Linear biases and BatchNorm's scale and shift
    (and h instead of D for the output bias); recbench counts the deployable, folded decoder."""
    method = Dhe()
    for h in (1, 7, 64):
        assert method.decoder_bytes(h, DIM) // 4 == hetu_single_memory(h, 1024) - 11 * h + DIM
