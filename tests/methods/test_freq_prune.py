"""freq_prune: frequency-based row pruning (FuxiCTR's min_categr_count; TorchRec/FBGEMM's pruning remap).

Behaviour test against an independent numpy computation of the reference's defining rule
(reczoo/FuxiCTR fuxictr/preprocess/tokenizer.py ``build_vocab`` at 0245987fdc1d43c36164ea496a02324885a8557a:
a value keeps its own index iff its training count >= min_freq, every other value encodes to OOV):
per field, the ids kept are the top-k by training count, every other id reads the field's one OOV
row; the threshold is the smallest one whose bytes fit (brute force over every integer threshold);
memory of the built module equals the closed form; only the training split's counts matter.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recbench.methods.base import InfeasibleBudget
from recbench.methods.freq_prune import FreqPrune
from recbench.types import Budget, EmbeddingOptimizer, TableSpec, full_embedding_bytes

DIM = 8
OPT = EmbeddingOptimizer(kind="sgd", learning_rate=0.1)


@pytest.fixture(scope="module")
def tables():
    rng = np.random.default_rng(7)

    def counts(n, exponent):
        c = np.floor(3000 / np.arange(1, n + 1) ** exponent).astype(np.int64)  # many ties in the tail
        c = rng.permutation(c)
        c[0] = rng.integers(0, 50)  # the protocol's OOV id: its own count plays no part
        return c

    return [TableSpec("a", 300, counts(300, 1.2)), TableSpec("b", 60, counts(60, 0.9)),
            TableSpec("c", 4, counts(4, 0.5)),
            TableSpec("bag", 40, counts(40, 1.0), pooling="mean", multi_hot=True)]


# ----------------------------------------------------------------------------- the independent rule
def numpy_bytes(tables, dim, threshold):
    """Inference bytes at a threshold, from the rule alone: rows 1 + k_f, an int32 remap per id of a
    field that keeps some but not all of its ids."""
    total = 0
    for t in tables:
        k = int((np.asarray(t.counts)[1:] >= threshold).sum())
        total += (1 + k) * dim * 4 + (4 * t.num_embeddings if 0 < k < t.num_embeddings - 1 else 0)
    return total


def numpy_threshold(tables, dim, ratio):
    """The smallest integer threshold whose bytes fit (brute force), or None."""
    limit = int(ratio * full_embedding_bytes(tables, dim))
    top = max(int(np.asarray(t.counts)[1:].max()) for t in tables) + 1
    for threshold in range(1, top + 1):
        if numpy_bytes(tables, dim, threshold) <= limit:
            return threshold
    return None


def numpy_rows(table, kept_count):
    """Row of every id: the top-``kept_count`` ids by training count (id 0 excluded) get rows 1..k in
    id order, every other id the OOV row 0."""
    counts = np.asarray(table.counts)[1:]
    order = np.argsort(-counts, kind="stable")[:kept_count] + 1
    rows = np.zeros(table.num_embeddings, dtype=np.int64)
    rows[np.sort(order)] = np.arange(1, kept_count + 1)
    return rows


def one_id_per_bag(tables, name, ids):
    """A KJT where field ``name`` holds ``ids`` one per bag and every other field id 0."""
    n = len(ids)
    values = [torch.as_tensor(ids, dtype=torch.long) if t.name == name else torch.zeros(n, dtype=torch.long)
              for t in tables]
    return KeyedJaggedTensor(keys=[t.name for t in tables], values=torch.cat(values),
                             lengths=torch.ones(n * len(tables), dtype=torch.int32))


# ----------------------------------------------------------------------------- tests
@pytest.mark.parametrize("ratio", [0.9, 0.5, 0.2, 0.1, 0.05])
def test_solver_picks_the_smallest_threshold_that_fits(tables, ratio):
    plan = FreqPrune().solve(tables, DIM, Budget(compression_ratio=ratio))
    expected = numpy_threshold(tables, DIM, ratio)
    # the solver reports the count at which the kept set changes; every integer in between keeps the same ids
    assert numpy_bytes(tables, DIM, plan.hparams["threshold"]) == numpy_bytes(tables, DIM, expected)
    for t in tables:
        kept = int((np.asarray(t.counts)[1:] >= expected).sum())
        assert plan.hparams["kept_rows"][t.name] == 1 + kept
    assert plan.memory.inference_bytes == numpy_bytes(tables, DIM, expected)


@pytest.mark.parametrize("ratio", [0.5, 0.2, 0.1])  # fields full + partly kept / partly kept incl. the bag / all OOV-only
def test_top_k_ids_by_training_count_keep_rows_and_the_rest_read_the_oov_row(tables, ratio):
    m = FreqPrune()
    plan = m.solve(tables, DIM, Budget(compression_ratio=ratio), OPT)
    torch.manual_seed(0)
    module = m.build(tables, DIM, plan, OPT).eval()
    for t in tables:
        k = plan.hparams["kept_rows"][t.name] - 1
        expected = numpy_rows(t, k)
        # a threshold never splits a tie: the top-k set is the set of counts >= t
        counts = np.asarray(t.counts)[1:]
        if 0 < k < counts.size:
            assert np.sort(counts)[::-1][k - 1] > np.sort(counts)[::-1][k]
        ids = np.arange(t.num_embeddings)
        with torch.no_grad():
            out = module(one_id_per_bag(tables, t.name, ids)).to_dict()[t.name]
        weight = module.fused.weight(t.name).detach()
        assert weight.shape[0] == 1 + k
        np.testing.assert_array_equal(out.numpy(), weight[torch.from_numpy(expected)].numpy())
        # pruned ids and the OOV id share one vector; kept ids have one row each
        assert len({tuple(row) for row in out[torch.from_numpy(expected == 0)].tolist()}) == 1
        assert torch.unique(out[torch.from_numpy(expected > 0)], dim=0).shape[0] == k


def test_remap_is_fbgemm_array_and_deployable_form_matches(tables):
    m = FreqPrune()
    plan = m.solve(tables, DIM, Budget(compression_ratio=0.3), OPT)
    module = m.build(tables, DIM, plan, OPT)
    remapped = [t for t in tables if t.name in plan.hparams["remapped"]]
    assert remapped, "the budget should leave some field partly kept"
    assert module.remap.dtype == torch.int32
    assert module.remap.numel() == sum(t.num_embeddings for t in remapped)
    expected = np.concatenate([numpy_rows(t, plan.hparams["kept_rows"][t.name] - 1) for t in remapped])
    np.testing.assert_array_equal(module.remap.numpy(), expected)
    rng = np.random.default_rng(1)
    lengths = [rng.integers(0, 4, 32) if t.multi_hot else np.ones(32, dtype=np.int64) for t in tables]
    values = [rng.integers(0, t.num_embeddings, int(n.sum())) for t, n in zip(tables, lengths)]
    kjt = KeyedJaggedTensor(keys=[t.name for t in tables], values=torch.from_numpy(np.concatenate(values)),
                            lengths=torch.from_numpy(np.concatenate(lengths).astype(np.int32)))
    module.eval()
    deployable = module.to_inference()
    with torch.no_grad():
        a, b = module(kjt), deployable(kjt)
        # the same batch with its keys in another order gives the same per-field outputs
        order = [3, 0, 2, 1]
        permuted = module(kjt.permute(order))
    assert torch.equal(a.values(), b.values())
    for name in a.keys():
        assert torch.equal(a[name], permuted[name])
    assert torch.equal(deployable.remap, module.remap)  # the deployable form holds the same int32 remap


@pytest.mark.parametrize("ratio", [1.0, 0.4, 0.07])
@pytest.mark.parametrize("kind", ["sgd", "rowwise_adagrad"])
def test_memory_of_the_built_module_equals_the_closed_form(tables, ratio, kind):
    optimizer = EmbeddingOptimizer(kind=kind)
    m = FreqPrune()
    plan = m.solve(tables, DIM, Budget(compression_ratio=ratio), optimizer)
    report = m.build(tables, DIM, plan, optimizer).memory_report()
    assert report == plan.memory
    remap = 4 * sum(t.num_embeddings for t in tables if t.name in plan.hparams["remapped"])
    assert report.breakdown == {"weights": sum(plan.hparams["kept_rows"].values()) * DIM * 4, "remap": remap}
    if ratio == 1.0:  # every id kept: plain tables, no remap
        assert plan.hparams["threshold"] == 1 and remap == 0


def test_kept_set_comes_from_the_training_split_only(toy_dataset):
    """The plan follows the training split's counts; counting val and test ids too would change it."""
    spec = toy_dataset.spec
    single = [i for i, t in enumerate(spec.tables) if not t.multi_hot]
    train = np.asarray(toy_dataset.split("train").sparse)
    everything = np.concatenate([np.asarray(toy_dataset.split(s).sparse) for s in ("train", "val", "test")])
    tables = [spec.tables[i] for i in single]
    for i, t in zip(single, tables):
        np.testing.assert_array_equal(t.counts, np.bincount(train[:, i], minlength=t.num_embeddings))
    all_counts = [TableSpec(t.name, t.num_embeddings, np.bincount(everything[:, i], minlength=t.num_embeddings))
                  for i, t in zip(single, tables)]
    m = FreqPrune()
    differs = False
    for ratio in (0.7, 0.3):  # the toy fields partly kept (f0 at 0.7, f1 at 0.3)
        plan = m.solve(tables, DIM, Budget(compression_ratio=ratio))
        module = m.build(tables, DIM, plan, OPT)
        for t, t_all in zip(tables, all_counts):
            k = plan.hparams["kept_rows"][t.name] - 1
            rows = numpy_rows(t, k)
            with torch.no_grad():
                out = module(one_id_per_bag(tables, t.name, np.arange(t.num_embeddings))).to_dict()[t.name]
            weight = module.fused.weight(t.name).detach()
            np.testing.assert_array_equal(out.numpy(), weight[torch.from_numpy(rows)].numpy())
            differs |= not np.array_equal(rows > 0, numpy_rows(t_all, k) > 0)
    assert differs, "the toy splits should rank some ids differently (else this test shows nothing)"


def test_infeasible_below_one_oov_row_per_field(tables):
    smallest = len(tables) * DIM * 4 / full_embedding_bytes(tables, DIM)
    with pytest.raises(InfeasibleBudget) as info:
        FreqPrune().solve(tables, DIM, Budget(compression_ratio=smallest * 0.99))
    assert info.value.min_ratio == pytest.approx(smallest) and info.value.max_ratio == pytest.approx(1.0)
    plan = FreqPrune().solve(tables, DIM, Budget(compression_ratio=smallest))
    assert all(rows == 1 for rows in plan.hparams["kept_rows"].values()) and plan.hparams["remapped"] == []


def test_a_threshold_jump_lands_under_budget_and_is_flagged():
    """Ties are kept or pruned together (FuxiCTR's count >= min_freq), so a budget between two
    thresholds runs at the lower ratio, flagged under_budget."""
    t = TableSpec("x", 101, np.r_[0, np.full(100, 5)].astype(np.int64))  # 100 ids, one count
    plan = FreqPrune().solve([t], DIM, Budget(compression_ratio=0.5))
    assert plan.hparams["kept_rows"] == {"x": 1} and plan.under_budget
    assert plan.memory.inference_bytes == DIM * 4


def test_fixed_threshold_and_bad_settings(tables):
    plan = FreqPrune(threshold=10).solve(tables, DIM, Budget(compression_ratio=1.0))
    assert plan.hparams["threshold"] == 10
    for t in tables:
        assert plan.hparams["kept_rows"][t.name] == 1 + int((np.asarray(t.counts)[1:] >= 10).sum())
    with pytest.raises(InfeasibleBudget, match="threshold=1 needs ratio"):
        FreqPrune(threshold=1).solve(tables, DIM, Budget(compression_ratio=0.5))
    for bad in (0, -3, 2.5, "ten", True):
        with pytest.raises(ValueError, match="threshold="):
            FreqPrune(threshold=bad)
    with pytest.raises(ValueError, match="has no counts"):
        FreqPrune().solve([TableSpec("nocounts", 10)], DIM, Budget(compression_ratio=0.5))


def test_deployable_form_equals_fbgemm_pruned_inference_tbe():
    """Parity with TorchRec's inference kernel: FBGEMM's IntNBitTableBatchedEmbeddingBagsCodegen (the
    TBE of QuantEmbeddingBagCollection) with FP32 weights of ``num_embeddings_post_pruning`` rows and
    ``index_remapping`` = this method's int32 arrays (a field kept in full: None; a field that keeps no
    id: an all-zero array, which this module replaces by a mask) gives the deployable form's output."""
    from fbgemm_gpu.split_embedding_configs import SparseType
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation, PoolingMode
    from fbgemm_gpu.split_table_batched_embeddings_ops_inference import IntNBitTableBatchedEmbeddingBagsCodegen

    rng = np.random.default_rng(5)
    scales = {"s0": (500, 100.0), "s1": (120, 5000.0), "s2": (40, 0.0), "s3": (6, 1000.0)}
    tables = [TableSpec(name, n, rng.permutation(np.floor(scale / np.arange(1, n + 1)).astype(np.int64) + 10),
                        multi_hot=True) for name, (n, scale) in scales.items()]
    m = FreqPrune(threshold=30)  # s0 partly kept, s1 and s3 in full, s2 (every count 10) keeps no id
    plan = m.solve(tables, DIM, Budget(compression_ratio=1.0), OPT)
    layouts = {t.name: ("remapped" if t.name in plan.hparams["remapped"] else
                        "oov_only" if plan.hparams["kept_rows"][t.name] == 1 else "full") for t in tables}
    assert layouts == {"s0": "remapped", "s1": "full", "s2": "oov_only", "s3": "full"}, layouts
    torch.manual_seed(0)
    deployable = m.build(tables, DIM, plan, OPT).to_inference()
    remapping = [torch.from_numpy(numpy_rows(t, plan.hparams["kept_rows"][t.name] - 1).astype(np.int32))
                 if layouts[t.name] != "full" else None for t in tables]
    tbe = IntNBitTableBatchedEmbeddingBagsCodegen(
        embedding_specs=[(t.name, plan.hparams["kept_rows"][t.name], DIM, SparseType.FP32, EmbeddingLocation.HOST)
                         for t in tables],
        index_remapping=remapping, pooling_mode=PoolingMode.SUM, device="cpu", output_dtype=SparseType.FP32)
    tbe.initialize_weights()
    for t, (stored, _) in zip(tables, tbe.split_embedding_weights()):
        weight = deployable.fused.collection.embedding_bags[t.name].weight.detach()
        stored.view(torch.float32)[:, :DIM].copy_(weight)
    lengths = np.concatenate([rng.integers(0, 4, 64) for _ in tables])
    values = np.concatenate([rng.integers(0, t.num_embeddings, int(n.sum()))
                             for t, n in zip(tables, np.split(lengths, len(tables)))])
    kjt = KeyedJaggedTensor(keys=[t.name for t in tables], values=torch.from_numpy(values),
                            lengths=torch.from_numpy(lengths.astype(np.int32)))
    with torch.no_grad():
        ours = deployable(kjt).values()
        theirs = tbe(kjt.values().int(), kjt.offsets().int())
    assert torch.allclose(ours, theirs, atol=1e-6, rtol=0), float((ours - theirs).abs().max())


@pytest.mark.parametrize("ratio", [0.6, 0.3, 0.15])
def test_per_field_variant_keeps_the_same_fraction_of_each_field(tables, ratio):
    """allocation=per_field (recbench's variant): k_f = floor(r (n_f - 1)) most frequent ids per field
    (ties by id), r the largest that fits: one more id anywhere would exceed the budget."""
    m = FreqPrune(allocation="per_field")
    plan = m.solve(tables, DIM, Budget(compression_ratio=ratio), OPT)
    r = plan.hparams["fraction"]
    limit = int(ratio * full_embedding_bytes(tables, DIM))

    def bytes_at(fraction):
        total = 0
        for t in tables:
            k = int(np.floor(fraction * (t.num_embeddings - 1) + 1e-9))
            total += (1 + k) * DIM * 4 + (4 * t.num_embeddings if 0 < k < t.num_embeddings - 1 else 0)
        return total

    assert plan.memory.inference_bytes == bytes_at(r) <= limit
    next_step = min((np.floor(r * (t.num_embeddings - 1) + 1e-9) + 1) / (t.num_embeddings - 1) for t in tables)
    assert next_step >= 1.0 or bytes_at(next_step) > limit
    module = m.build(tables, DIM, plan, OPT).eval()
    assert module.memory_report() == plan.memory
    for t in tables:
        counts = np.asarray(t.counts)
        order = np.lexsort((np.arange(t.num_embeddings), -counts))
        k = int(np.floor(r * (t.num_embeddings - 1) + 1e-9))
        kept = np.sort(order[order != 0][:k])
        rows = np.zeros(t.num_embeddings, dtype=np.int64)
        rows[kept] = np.arange(1, k + 1)
        with torch.no_grad():
            out = module(one_id_per_bag(tables, t.name, np.arange(t.num_embeddings))).to_dict()[t.name]
        np.testing.assert_array_equal(out.numpy(), module.fused.weight(t.name).detach()[torch.from_numpy(rows)].numpy())
    with pytest.raises(ValueError, match="needs allocation=global_threshold"):
        FreqPrune(allocation="per_field", threshold=10)
    with pytest.raises(ValueError, match="allocation='nope'; allowed: global_threshold, per_field"):
        FreqPrune(allocation="nope")
