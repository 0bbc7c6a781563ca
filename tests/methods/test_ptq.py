"""Post-training quantization: FBGEMM n-bit TBE bytes, values and error bound."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from test_contract import random_kjt  # tests/methods is on sys.path

from recbench.methods.base import InfeasibleBudget
from recbench.methods.ptq import PTQ, row_bytes, table_bytes
from recbench.types import Budget, EmbeddingOptimizer, TableSpec, full_embedding_bytes
from solve_build import solve_and_build

DIM = 16


def specs():
    return [TableSpec("big", 3000), TableSpec("mid", 777), TableSpec("tiny", 3),
            TableSpec("bag", 400, pooling="mean", multi_hot=True), TableSpec("bagsum", 500, multi_hot=True)]


def test_row_sizes_follow_fbgemm_rule():
    from fbgemm_gpu.split_embedding_configs import SparseType
    from fbgemm_gpu.split_table_batched_embeddings_ops_inference import unpadded_row_size_in_bytes

    for bits, ty in ((32, SparseType.FP32), (16, SparseType.FP16), (8, SparseType.INT8), (4, SparseType.INT4),
                     (2, SparseType.INT2)):
        for dim in (8, 16, 64):
            assert row_bytes(dim, bits) == unpadded_row_size_in_bytes(dim, ty)
    assert table_bytes(3, 16, 8) == 128 and table_bytes(7, 16, 16) == 256


@pytest.mark.parametrize("bits", [16, 8, 4, 2])
def test_quantized_bytes_values_and_error_bound(bits):
    tables = specs()
    method = PTQ(bits=bits)
    budget = Budget(compression_ratio=0.9, min_rows_to_compress=10)
    torch.manual_seed(0)
    module = solve_and_build(method, tables, DIM, budget, EmbeddingOptimizer(kind="sgd"))
    hp = method.solve(tables, DIM, budget).hparams
    assert hp["bits"]["tiny"] == 32 and hp["bits"]["big"] == bits
    deployable = module.to_inference()
    closed = method.memory(tables, DIM, hp)
    assert deployable.weight_bytes() == closed.inference_bytes == module.memory_report().inference_bytes
    assert closed.inference_bytes == sum(table_bytes(t.num_embeddings, DIM, hp["bits"][t.name]) for t in tables)
    features = random_kjt(tables, 64, np.random.default_rng(0), max_bag=6)
    with torch.no_grad():
        a, b = module(features).to_dict(), deployable(features).to_dict()
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    bound = module.inference_error_bound(features)
    assert 0 < diff <= bound
    assert float((a["tiny"] - b["tiny"]).abs().max()) == 0.0  # kept fp32
    # the quantized kernel returns exactly the dequantized rows pooled
    w = module.fused.weight("big").detach()
    if bits == 16:
        reference = w.half().float()
    else:
        fused = torch.ops.fbgemm.FloatToFusedNBitRowwiseQuantizedSBHalf(w, bits)
        reference = torch.ops.fbgemm.FusedNBitRowwiseQuantizedSBHalfToFloat(fused, bits)
    assert torch.equal(b["big"], reference[features["big"].values()])


def test_auto_mixes_precisions_to_land_the_budget():
    tables = specs()
    full = full_embedding_bytes(tables, DIM)
    for ratio in (1.0, 0.5, 0.3, 0.2, 0.13):
        hp = PTQ().solve(tables, DIM, Budget(compression_ratio=ratio)).hparams
        achieved = PTQ().memory(tables, DIM, hp).inference_bytes / full
        assert 0.9 * ratio <= achieved <= ratio, (ratio, hp)
        assert len(set(hp["bits"].values())) <= 2  # one uniform level, some fields one level up
    with pytest.raises(InfeasibleBudget, match=r"reachable range is \[0.12"):
        PTQ().solve(tables, DIM, Budget(compression_ratio=0.05))  # INT2: (16/4 + 4) / 64 bytes per row


def test_fixed_bits_above_budget_is_infeasible():
    with pytest.raises(InfeasibleBudget):
        PTQ(bits=16).solve(specs(), DIM, Budget(compression_ratio=0.4))


def test_training_form_is_full_and_reports_quantized_inference_bytes():
    tables = specs()
    hp = PTQ().solve(tables, DIM, Budget(compression_ratio=0.3)).hparams
    module = solve_and_build(PTQ(), tables, DIM, Budget(compression_ratio=0.3), EmbeddingOptimizer())
    report = module.memory_report()
    assert report == PTQ().memory(tables, DIM, hp, EmbeddingOptimizer())
    rows = sum(t.num_embeddings for t in tables)
    assert report.training_bytes == rows * DIM * 4 + rows * 4 and report.compression_ratio <= 0.3
