"""Multi-stage methods under ``runtime.distributed=true``: between stages ``ProcessGroupParallel.rebuild``
releases DMP/DDP and the sparse-gradient hooks, applies the method's ``rebuild`` and wraps again.

Two gloo processes (``multistage_ranks.py``, one subprocess per rank) train AutoSrh (custom lookup,
the rebuild keeps the module), OptEmbed (custom lookup, per-sample random dims, a search stage
scoring validation AUC, the rebuild returns a new module), PEP (a regulariser summed over the
batch's lookups), DSL (one stage; its hook regrows from the batch's gradients) and a two-stage
table-backed method (tables built on the meta device, each rank filling its shards; they survive
the rebuild with their fused optimizer state; also killed and resumed) and are compared with one
process: the same tolerance
as ``test_distributed.py`` (|delta| <= 1e-4 on AUC and log loss, <= 1e-5 on logged losses). Every
rank must end with identical stage results; a hook whose result differs between ranks must raise
``RankDivergence`` on every rank; each sparse parameter's gradient is all-reduced once per step.
"""
from __future__ import annotations

import weakref

import pytest
import torch

import multistage_ranks
from recbench.training import distributed
from recbench.training.sharding import fingerprint, sparse_parameters

SCENARIOS = ("autosrh", "optembed", "pep", "dsl", "two_stage_full", "resumed_optembed", "resumed_two_stage_full",
             "diverging")


@pytest.fixture(scope="module")
def two_ranks(toy_dataset, tmp_path_factory):
    """Per-rank reports of every scenario from one 2-process gloo job (~25-40 s on 2 shared cores)."""
    return multistage_ranks.run_ranks(multistage_ranks.data_root(toy_dataset), tmp_path_factory.mktemp("ranks"), SCENARIOS)


@pytest.mark.parametrize("scenario", ["autosrh", "optembed", "pep", "dsl", "two_stage_full"])
def test_two_ranks_match_one_process_through_every_stage(two_ranks, toy_dataset, scenario):
    _, single = multistage_ranks.train(scenario, toy_dataset)
    multistage_ranks.assert_matches_one_process([r[scenario] for r in two_ranks], single, scenario,
                                                min_stages=1 if scenario == "dsl" else 2)


def test_a_run_stopped_in_its_last_stage_resumes_through_the_rebuild_chain(two_ranks):
    """OptEmbed stopped at step 5 of ``retrain``: every rank replays supernet -> search -> retrain
    module (rebuild through the strategy), loads its own checkpoint and ends where the
    uninterrupted 2-rank run ends."""
    for report in two_ranks:
        resumed, uninterrupted = report["resumed_optembed"], report["optembed"]
        assert resumed["error"] is None, resumed.get("traceback")
        assert resumed["resumed_from"]["stage_index"] == 2 and resumed["resumed_from"]["stage_step"] == 4
        for key in ("val/auc", "test/auc", "test/logloss"):
            assert resumed["metrics"][key] == pytest.approx(uninterrupted["metrics"][key], abs=1e-6), key
        assert [h["step"] for h in resumed["history"]] == [h["step"] for h in uninterrupted["history"]]
        assert fingerprint(resumed["stage_results"][1]["keep"]) == fingerprint(uninterrupted["stage_results"][1]["keep"])


def test_killed_run_of_meta_built_sharded_tables_resumes_to_one_process_result(two_ranks, toy_dataset):
    """Two-stage ``full`` (tables built on the meta device, each rank filling its shards) stopped at
    step 5 of its last stage: every rank resumes its shards and fused optimizer state from its own
    checkpoint (step 4) and the run ends where one uninterrupted process ends."""
    reports = [r["resumed_two_stage_full"] for r in two_ranks]
    for report in reports:
        assert report["error"] is None, report.get("traceback")
        assert report["resumed_from"]["stage_index"] == 1 and report["resumed_from"]["stage_step"] == 4
    _, single = multistage_ranks.train("two_stage_full", toy_dataset)
    multistage_ranks.assert_matches_one_process(reports, single, "resumed_two_stage_full", min_stages=2)


def test_sparse_gradients_are_averaged_once_per_step_after_a_rebuild(two_ranks, toy_dataset):
    """AutoSrh's rebuild returns the same module: its sparse table must not get a second hook."""
    method = multistage_ranks.method_of("autosrh")
    params = len(sparse_parameters(multistage_ranks.model_of(method, toy_dataset)))
    steps = sum(r["steps"] for r in two_ranks[0]["autosrh"]["stage_results"])
    train_stages = [s for s in method.stages() if s.kind == "train"]  # warmup, search, retrain
    assert params >= 1 and steps == len(train_stages) * multistage_ranks.CONFIG.max_steps
    assert [r["autosrh"]["sparse_all_reduces"] for r in two_ranks] == [steps * params] * 2


def test_a_stage_result_that_differs_between_ranks_is_an_error(two_ranks):
    for rank, report in enumerate(two_ranks):
        error = report["diverging"]["error"]
        assert error is not None and error.startswith("RankDivergence"), (rank, error)
        assert "stage 0 (warmup)" in error and "result/rank" in error


def test_rebuild_releases_ddp_and_hooks_and_keeps_sharded_tables(toy_dataset, one_rank_group):
    from torch.nn.parallel import DistributedDataParallel
    from torchrec.distributed.fused_embeddingbag import ShardedFusedEmbeddingBagCollection

    parallel = one_rank_group
    method = multistage_ranks.method_of("autosrh")
    wrapped = parallel.wrap(multistage_ranks.model_of(method, toy_dataset), method)
    weight = wrapped.embedding.weight
    old_ddp = weakref.ref(wrapped.dmp._dmp_wrapped_module)
    assert isinstance(old_ddp(), DistributedDataParallel)
    assert len(weight._post_accumulate_grad_hooks) == 1
    rewrapped = parallel.rebuild(wrapped, lambda embedding: method.rebuild(embedding, {}))
    del wrapped
    assert old_ddp() is None  # the old reducer (and its autograd hooks) is gone
    assert rewrapped.embedding.weight is weight and len(weight._post_accumulate_grad_hooks) == 1
    for _ in method.stages()[2:]:  # the first rebuild above left the first stage; on to retrain
        rewrapped = parallel.rebuild(rewrapped, lambda embedding: method.rebuild(embedding, {}))
        assert rewrapped.embedding.weight is weight and len(weight._post_accumulate_grad_hooks) == 1
    assert bool(rewrapped.embedding.retraining)

    tables = multistage_ranks.TwoStageFull()
    wrapped = parallel.wrap(multistage_ranks.model_of(tables, toy_dataset), tables)
    sharded = wrapped.embedding.fused.collection
    assert isinstance(sharded, ShardedFusedEmbeddingBagCollection)
    rewrapped = parallel.rebuild(wrapped, lambda embedding: embedding)
    assert rewrapped.embedding.fused.collection is sharded  # not gathered, not re-sharded
    plain = parallel.unshard(rewrapped)
    assert not isinstance(plain.embedding.fused.collection, ShardedFusedEmbeddingBagCollection)


def test_replaced_embedding_inside_a_stage_is_refused_with_the_way_out(toy_dataset, one_rank_group):
    method = multistage_ranks.method_of("autosrh")
    wrapped = one_rank_group.wrap(multistage_ranks.model_of(method, toy_dataset), method)
    with pytest.raises(distributed.DistributedSetupError, match="only between stages.*rebuild"):
        wrapped.embedding = wrapped.embedding
