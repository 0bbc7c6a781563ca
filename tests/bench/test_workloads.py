"""The train-step benchmark's pieces: DLRM's sparse reference and the compute floor's FLOP count."""
import numpy as np
import torch

from recbench.bench.workloads import (BOTTOM_MLP, NUM_DENSE, TOP_MLP, EmbeddingBagReference, criteo_batches,
                                      criteo_like_tables, dense_forward_flops, dlrm, sgemm_workload)


def test_sparse_reference_gives_sparse_gradients_of_the_looked_up_rows_only():
    tables = criteo_like_tables(0.0005)
    (batch,) = criteo_batches(tables, 32, 1)
    model = dlrm(EmbeddingBagReference(tables, 16, sparse=True), len(tables), 16)
    torch.nn.BCEWithLogitsLoss()(model(batch[0], batch[1]), batch[2]).backward()
    grad = model.embedding.bags[0].weight.grad
    assert grad.is_sparse
    assert set(grad.coalesce().indices()[0].tolist()) == set(batch[1][tables[0].name].values().tolist())


def test_forward_flops_equal_the_mlps_and_the_interaction_counted_by_hand():
    tables = criteo_like_tables(0.0005)
    batch_size, dim, fields = 64, 16, len(tables)
    (batch,) = criteo_batches(tables, batch_size, 1)
    model = dlrm(EmbeddingBagReference(tables, dim), fields, dim)
    bottom = [NUM_DENSE, *BOTTOM_MLP, dim]
    vectors = fields + 1  # the bottom MLP's output and one pooled vector per field
    top_in = dim + vectors * (vectors - 1) // 2  # DLRM's dot interaction: the pairs above the diagonal
    top = [top_in, *TOP_MLP]
    linear = sum(2 * batch_size * a * b for a, b in zip(bottom[:-1], bottom[1:])) \
        + sum(2 * batch_size * a * b for a, b in zip(top[:-1], top[1:]))
    interaction = 2 * batch_size * vectors * vectors * dim  # one (F+1, D) x (D, F+1) bmm per sample
    assert dense_forward_flops(model, batch) == linear + interaction


def test_sgemm_workload_computes_its_products_at_a_plausible_cpu_rate():
    import time

    run, flops = sgemm_workload(size=256, products=3)
    assert flops == 3 * 2 * 256 ** 3
    start = time.perf_counter()
    run()
    rate = flops / (time.perf_counter() - start)
    assert 1e8 < rate < 1e13 and np.isfinite(rate)
