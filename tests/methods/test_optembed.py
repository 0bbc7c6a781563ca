"""OptEmbed against the paper's mechanism: the threshold's straight-through gradient, per-sample
sub-dimension sampling, the evolutionary search, the remap table, and a toy run through all stages."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recbench.methods.blocks import row_subset
from recbench.methods.base import Hook
from recbench.methods.blocks.evolutionary import evolutionary_search
from recbench.methods.optembed import LongTailStep, OptEmbed, OptEmbedRetrain, OptEmbedSupernet
from recbench.models.dlrm import DLRM
from recbench.training.optim import DenseOptimizer
from recbench.training.trainer import Trainer, TrainerConfig
from recbench.types import Budget, EmbeddingOptimizer, TableSpec, full_embedding_bytes
from solve_build import solve_and_build

DIM = 8


def tables():
    rng = np.random.default_rng(0)
    return [TableSpec("a", 200, rng.integers(0, 50, 200)), TableSpec("b", 60, rng.integers(0, 50, 60)),
            TableSpec("c", 5, rng.integers(0, 50, 5))]


def one_hot(tabs, batch, rng):
    ids = [rng.integers(0, t.num_embeddings, batch) for t in tabs]
    return KeyedJaggedTensor(keys=[t.name for t in tabs], values=torch.from_numpy(np.concatenate(ids)),
                             lengths=torch.ones(batch * len(tabs), dtype=torch.int32))


def test_long_tail_straight_through_gradient():
    u = torch.tensor([-2.0, -0.7, -0.1, 0.0, 0.1, 0.5, 1.0, 3.0], requires_grad=True)
    out = LongTailStep.apply(u)
    assert out.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]  # hard mask forward
    out.sum().backward()
    expected = [0.0, 0.4, 2 - 0.4, 2.0, 2 - 0.4, 0.4, 0.4, 0.0]
    assert torch.allclose(u.grad, torch.tensor(expected))


def test_threshold_gets_task_and_regulariser_gradients():
    tabs = tables()
    module = solve_and_build(OptEmbed(threshold_regularization=0.0), tabs, DIM, Budget(0.5))
    module.train()
    with torch.no_grad():
        module.thresholds.copy_(module.row_scores()[[0, 200, 260]] + module.thresholds - 0.05)  # near the margin
    (module(one_hot(tabs, 64, np.random.default_rng(0))).values() ** 2).sum().backward()
    assert (module.thresholds.grad != 0).any()  # through the straight-through estimator only
    regularised = solve_and_build(OptEmbed(threshold_regularization=1e-2), tabs, DIM, Budget(0.5))
    regularised.extra_loss().backward()
    assert torch.allclose(regularised.thresholds.grad, torch.full((3,), -1e-2))  # d/dt alpha exp(-t) at t=0


def test_every_sub_dimension_is_sampled_per_sample_and_field():
    tabs = tables()
    module = solve_and_build(OptEmbed(), tabs, DIM, Budget(0.5))
    with torch.no_grad():
        module.weight.fill_(1.0)
        module.thresholds.fill_(-1.0)  # every row kept
    module.train()
    out = module(one_hot(tabs, 2000, np.random.default_rng(1))).values().view(2000, 3, DIM)
    used = (out != 0).sum(-1)
    prefix = torch.arange(DIM) < used.unsqueeze(-1)
    assert torch.equal(out != 0, prefix)  # a prefix of the dims per (sample, field)
    assert set(used.flatten().tolist()) == set(range(1, DIM + 1))  # every sub-dimension is trained
    assert (used[:, 0] != used[:, 1]).any()  # drawn per field, not once per sample
    module.eval()  # evaluation: the cap (or the searched dims) on the rows the budget affords, others zero
    used = (module(one_hot(tabs, 50, np.random.default_rng(2))).values().view(50, 3, DIM) != 0).sum(-1)
    assert set(used.flatten().tolist()) <= {0, module.dim_cap} and (used == module.dim_cap).any()


def test_evolutionary_search_improves_keeps_best_and_respects_cap():
    target = np.array([3, 1, 5, 2, 4])

    def score(candidate):
        return -float(((np.array(candidate) - target) ** 2).sum())

    result = evolutionary_search(score, 5, 5, mutation_num=6, crossover_num=6, mutation_prob=0.3, iterations=15,
                                 top_k=5, seed=0)
    assert all(1 <= d <= 5 for c in result.scores for d in c)
    assert result.best_score == max(result.scores.values()) == score(result.best)
    assert all(b >= a for a, b in zip(result.trajectory, result.trajectory[1:]))  # the best is never lost
    assert result.trajectory[-1] > result.trajectory[0]  # the search improves on the random start
    capped = evolutionary_search(score, 5, 2, mutation_num=3, crossover_num=3, iterations=3, top_k=2)
    assert all(1 <= d <= 2 for c in capped.scores for d in c)
    with pytest.raises(ValueError, match="mutation_prob"):
        evolutionary_search(score, 5, 5, mutation_prob=0.0)


@pytest.mark.parametrize("kept_rows, expected", [(300, "identity"), (250, "remap"), (3, "kept_ids")])
def test_remap_table_removes_rows_and_looks_up_exactly(kept_rows, expected):
    sizes = [180, 120]  # R = 300: a remap needs 1 byte per row, kept ids 2 bytes per kept row
    row_field = row_subset.stacked_row_fields(sizes)
    weight = torch.randn(300, DIM)
    keep = torch.zeros(300, dtype=torch.bool)
    keep[torch.randperm(300)[:kept_rows]] = True
    dims = torch.tensor([3, 8])
    table = row_subset.RowSubsetTable(weight, keep, row_field, dims)
    assert table.format == expected
    assert table.values.numel() == int((dims[row_field] * keep).sum())  # pruned rows physically removed
    assert table.stored_bytes() == row_subset.subset_bytes(300, kept_rows, table.values.numel(), 2)
    rows = torch.arange(300)
    want = weight * keep.unsqueeze(1) * (torch.arange(DIM) < dims[row_field].unsqueeze(1))
    assert torch.equal(table.lookup(rows, row_field), want)
    compact = row_subset.RowSubsetTable(weight[keep], keep, row_field, dims, compact=True)
    assert torch.equal(compact.lookup(rows, row_field), want)


def test_fit_rows_keeps_the_best_rows_within_the_budget():
    scores = torch.tensor([0.5, -1.0, 2.0, 0.1, -0.2, 3.0])
    row_dims = torch.tensor([4, 4, 4, 2, 2, 2])
    for budget in (60, 100, 200):
        keep = row_subset.fit_rows(scores, row_dims, budget, fields=2)
        k = int(keep.sum())
        assert torch.equal(keep, scores >= scores.sort(descending=True).values[k - 1]) if k else not keep.any()
        used = row_subset.subset_bytes(6, k, int(row_dims[keep].sum()), 2)
        assert used <= budget
        if k < 6:  # the next-best row would not have fitted
            nxt = int(torch.argsort(-scores)[k])
            assert row_subset.subset_bytes(6, k + 1, int(row_dims[keep].sum() + row_dims[nxt]), 2) > budget


def test_toy_run_goes_through_all_stages_and_removes_rows(toy_dataset):
    # ~40 steps per stage: the table's Adam at 3e-2 instead of the trainer's dense 1e-3, to learn something in them
    method = OptEmbed(mutation_num=3, crossover_num=3, search_iterations=2, top_k=3, supernet_max_epochs=1,
                      retrain_max_epochs=1, table_learning_rate=3e-2)
    spec, budget = toy_dataset.spec, Budget(compression_ratio=0.3)
    torch.manual_seed(0)
    embedding = solve_and_build(method, spec.tables, DIM, budget)
    model = DLRM(embedding, spec.num_dense, len(spec.tables), DIM, [16, DIM], [16, 1])
    config = TrainerConfig(max_epochs=1, batch_size=64, progress=False, latency_repeats=1)
    result = Trainer(config, model, method, toy_dataset, DenseOptimizer(), EmbeddingOptimizer()).fit()
    supernet, search, retrain = result.stage_results
    assert supernet["rows"] == sum(t.num_embeddings for t in spec.tables) and "thresholds" in supernet
    assert search["candidates_scored"] >= 6 and (search["dims"] <= search["dim_cap"]).all()
    final = model.embedding
    assert isinstance(final, OptEmbedRetrain) and final.weight.shape[0] == search["final_rows"] == int(search["keep"].sum())
    assert search["final_rows"] < supernet["rows"]  # rows physically removed
    full = full_embedding_bytes(spec.tables, DIM)
    assert (1 - budget.tolerance) * 0.3 * full <= result.metrics["emb/bytes_inference"] <= 0.3 * full
    assert result.metrics["test/auc"] > 0.55 and retrain["steps"] > 0


def test_bad_settings_are_rejected():
    with pytest.raises(ValueError, match="dim_cap"):
        OptEmbed(dim_cap=0)
    with pytest.raises(ValueError, match="dim_cap=32 exceeds"):
        OptEmbed(dim_cap=32).solve(tables(), DIM, Budget(0.5))
    with pytest.raises(ValueError, match="top_k"):
        OptEmbed(top_k=0)
    assert isinstance(solve_and_build(OptEmbed(), tables(), DIM, Budget(0.1)), OptEmbedSupernet)


class _Kill(OptEmbed):
    """OptEmbed whose retrain stage is killed at step ``at`` (None: never)."""

    def __init__(self, at=None, **kwargs):
        super().__init__(**kwargs)
        self.at, self.searches = at, 0

    def run_search(self, context):
        self.searches += 1
        return super().run_search(context)

    def hooks(self):
        kill = self.at

        class Kill(Hook):
            def on_step_end(self, ctx):
                if ctx.stage.name == "retrain" and ctx.stage_step == kill:
                    raise KeyboardInterrupt("simulated kill")

        return super().hooks() + [Kill()]


def _fit(dataset, method, path=None):
    spec = dataset.spec
    torch.manual_seed(0)
    model = DLRM(solve_and_build(method, spec.tables, DIM, Budget(0.3)), spec.num_dense, len(spec.tables), DIM, [16, DIM], [16, 1])
    config = TrainerConfig(max_epochs=1, batch_size=64, progress=False, latency_repeats=1)
    return Trainer(config, model, method, dataset, DenseOptimizer(), EmbeddingOptimizer(), checkpoint_path=path).fit()


def test_killed_in_retrain_resumes_after_the_search(toy_dataset, tmp_path):
    small = dict(mutation_num=2, crossover_num=2, search_iterations=2, top_k=2, supernet_max_epochs=1)
    reference = _fit(toy_dataset, _Kill(**small))
    path = tmp_path / "checkpoint.pt"
    with pytest.raises(KeyboardInterrupt):
        _fit(toy_dataset, _Kill(at=5, **small), path)
    resumed_method = _Kill(**small)
    resumed = _fit(toy_dataset, resumed_method, path)
    assert resumed_method.searches == 0  # supernet and search were not run again
    assert torch.equal(resumed.stage_results[1]["keep"], reference.stage_results[1]["keep"])
    assert resumed.metrics["test/auc"] == pytest.approx(reference.metrics["test/auc"], abs=1e-6)
