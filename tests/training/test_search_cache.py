"""The search stages' evaluation cache (``recbench.training.search_cache``): the scores equal
``Trainer.evaluate``'s for every candidate and every model OptEmbed runs with, above the memory cap
the uncached path runs (same scores), a changed parameter rebuilds the memos, and a model or
embedding module without the split still evaluates correctly."""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from torch import nn

from recbench.methods.full import Full
from recbench.methods.optembed import OptEmbed
from recbench.models.dcn import DCNv2
from recbench.models.dlrm import DLRM
from recbench.models.moe import DCNMoE, DLRMMoE
from recbench.training.optim import DenseOptimizer
from recbench.training.search_cache import SearchEvaluation, stored_bytes
from recbench.training.trainer import Trainer, TrainerConfig
from recbench.types import Budget, EmbeddingOptimizer
from solve_build import solve_and_build

DIM = 8


def hash_gate(num_experts, input_dim, feature_names):
    from recbench.gates.hash import HashGate

    return HashGate(num_experts=num_experts, k=1, input_dim=input_dim, feature_names=feature_names)


def _model(kind, embedding, spec):
    args = (embedding, spec.num_dense, len(spec.tables), DIM, [16, DIM], [16, 1])
    if kind == "dlrm":
        return DLRM(*args)
    if kind == "dcn":
        return DCNv2(*args)
    moe = DLRMMoE if kind == "dlrm_moe" else DCNMoE
    return moe(*args, gate=hash_gate, num_experts=3)  # the hash gate routes on the ids (memo keeps the KJT)


def _trainer(dataset, kind="dlrm", method=None, ratio=0.3, **config):
    method = method or OptEmbed()
    torch.manual_seed(0)
    model = _model(kind, solve_and_build(method, dataset.spec.tables, DIM, Budget(ratio, min_rows_to_compress=10)), dataset.spec)
    for p in model.parameters():  # a trained-looking state: thresholds and rows spread out
        with torch.no_grad():
            p.add_(torch.randn_like(p) * 0.05)
    settings = dict(max_epochs=1, batch_size=64, eval_batch_size=128, progress=False, **config)
    return Trainer(TrainerConfig(**settings), model, method, dataset, DenseOptimizer(), EmbeddingOptimizer())


def _candidates(module, count=5, seed=0):
    rng = np.random.default_rng(seed)
    return [tuple(int(d) for d in rng.integers(1, module.dim_cap + 1, len(module.compressed_sizes)))
            for _ in range(count)]


@pytest.mark.parametrize("kind", ["dlrm", "dcn", "dlrm_moe", "dcn_moe"])
def test_cached_scores_equal_uncached_for_every_candidate(toy_dataset, kind):
    trainer = _trainer(toy_dataset, kind)
    module = trainer.model.embedding
    assert module.kept_names and any(t.multi_hot for t in toy_dataset.spec.tables)  # kept fields, mean-pooled bags
    aucs = set()
    with trainer.search_evaluation("val") as evaluation:
        for candidate in _candidates(module) + [None]:
            module.candidate = candidate
            cached, uncached = evaluation.evaluate(), trainer.evaluate("val")
            assert evaluation.cached
            assert cached["auc"] == pytest.approx(uncached["auc"], abs=1e-9)
            assert cached["logloss"] == pytest.approx(uncached["logloss"], abs=1e-9)
            aucs.add(round(cached["auc"], 9))
        assert evaluation.builds == 1  # the candidates changed nothing the memos hold
    assert len(aucs) > 2  # the candidates really score differently
    assert evaluation.memos is None  # freed when the search ends


def test_memo_forward_is_the_forward_bitwise(toy_dataset):
    """DLRM's memo forward is its forward; DCNv2's restricts to the active columns, equal to float
    summation order (tests/methods/test_optembed_search_eval.py)."""
    from recbench.datasets.batching import BatchIterator

    trainer = _trainer(toy_dataset, "dlrm")
    model, module = trainer.model.eval(), trainer.model.embedding
    module.candidate = _candidates(module, 1)[0]
    batch = next(iter(BatchIterator(toy_dataset.spec, trainer.split("val"), 300)))
    with torch.no_grad():
        direct = model(batch.dense_features, batch.sparse_features)
        via_memo = model.forward_memo(model.memo(batch.dense_features, batch.sparse_features))
    assert torch.equal(direct, via_memo)


def test_above_the_cap_the_uncached_path_gives_the_same_scores(toy_dataset):
    trainer = _trainer(toy_dataset)
    module = trainer.model.embedding
    candidates = _candidates(module, 3)
    expected = []
    for candidate in candidates:
        module.candidate = candidate
        expected.append(trainer.evaluate("val")["auc"])
    tiny = SearchEvaluation(trainer, "val", max_bytes=10_000)
    got = []
    for candidate in candidates:
        module.candidate = candidate
        got.append(tiny.evaluate()["auc"])
    assert not tiny.cached and "search_cache_mb" in tiny.reason and got == expected
    off = _trainer(toy_dataset, search_cache_mb=0).search_evaluation("val")
    off.evaluate()
    assert not off.cached and "is 0" in off.reason


def test_a_changed_parameter_rebuilds_the_memos(toy_dataset):
    trainer = _trainer(toy_dataset, "dcn")
    evaluation = trainer.search_evaluation("val")
    evaluation.evaluate()
    with torch.no_grad():
        next(trainer.model.dense_input.parameters()).mul_(1.5)  # the memos' dense outputs are stale
    assert evaluation.evaluate()["auc"] == pytest.approx(trainer.evaluate("val")["auc"], abs=1e-9)
    assert evaluation.builds == 2 and evaluation.cached


def test_modules_without_the_split_evaluate_correctly(toy_dataset):
    class Plain(nn.Module):  # a model without memo/forward_memo
        def __init__(self, inner):
            super().__init__()
            self.inner, self.embedding = inner, inner.embedding

        def forward(self, dense, sparse):
            return self.inner(dense, sparse)

    trainer = _trainer(toy_dataset, "dlrm", method=Full(), ratio=1.0)  # FBGEMM tables: the memo keeps the KJT
    evaluation = trainer.search_evaluation("val")
    assert evaluation.evaluate()["auc"] == pytest.approx(trainer.evaluate("val")["auc"], abs=1e-9) and evaluation.cached
    trainer.model = Plain(trainer.model)
    plain = trainer.search_evaluation("val")
    assert plain.evaluate()["auc"] == pytest.approx(trainer.evaluate("val")["auc"], abs=1e-9)
    assert not plain.cached and "memo" in plain.reason


def test_stored_bytes_counts_each_storage_once():
    values = torch.zeros(100, 4)
    assert stored_bytes({"a": values, "b": [values.view(-1), values[:10]], "c": (torch.zeros(3, dtype=torch.int64),)}) \
        == 100 * 4 * 4 + 3 * 8


def test_search_stage_scores_and_time_cached_vs_uncached(toy_dataset):
    """The whole search stage on the toy protocol with and without the cache: the same search result."""
    results, seconds = {}, {}
    for cap in (512, 0):
        method = OptEmbed(mutation_num=4, crossover_num=4, search_iterations=3, top_k=4)
        trainer = _trainer(toy_dataset, "dcn", method=method, search_cache_mb=cap)
        from recbench.training.trainer import TrainContext

        context = TrainContext(trainer, method.stages()[1], 1)
        start = time.process_time()
        results[cap] = method.run_search(context)
        seconds[cap] = time.process_time() - start
    cached, uncached = results[512], results[0]
    assert cached["evaluation_cached"] and not uncached["evaluation_cached"]
    assert torch.equal(cached["dims"], uncached["dims"]) and torch.equal(cached["keep"], uncached["keep"])
    assert cached["best_val_auc"] == pytest.approx(uncached["best_val_auc"], abs=1e-9)
    assert cached["candidates_scored"] == uncached["candidates_scored"] >= 8
    print(f"toy search stage ({cached['candidates_scored']} candidates, CPU s): cached {seconds[512]:.3f}, "
          f"uncached {seconds[0]:.3f}, {seconds[0] / seconds[512]:.2f}x")
