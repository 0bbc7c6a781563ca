"""Multi-stage methods under ``trainer.distributed=true``: between stages ``ProcessGroupParallel.rebuild``
releases DMP/DDP and the sparse-gradient hooks, applies the method's ``rebuild`` and wraps again.

Two gloo processes (``multistage_ranks.py``, one subprocess per rank) train AutoSrh (custom lookup,
the rebuild keeps the module), OptEmbed (custom lookup, per-sample random dims, a search stage
scoring validation AUC, the rebuild returns a new module), PEP (a regulariser summed over the
batch's lookups), DSL (one stage; its hook regrows from the batch's gradients) and a two-stage
table-backed method (sharded tables survive the rebuild with their fused optimizer state) and
are compared with one process: the same tolerance
as ``test_distributed.py`` (|delta| <= 1e-4 on AUC and log loss, <= 1e-5 on logged losses). Every
rank must end with identical stage results; a hook whose result differs between ranks must raise
``RankDivergence`` on every rank; each sparse parameter's gradient is all-reduced once per step.
"""
from __future__ import annotations

import os
import subprocess
import sys
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch

import multistage_ranks
from multistage_ranks import free_port
from recbench.training import distributed
from recbench.training.distributed import _fingerprint, _sparse_parameters

REPO = Path(__file__).resolve().parents[2]
SCENARIOS = ("autosrh", "optembed", "pep", "dsl", "two_stage_full", "resumed_optembed", "diverging")


@pytest.fixture(scope="module")
def two_ranks(toy_dataset, tmp_path_factory):
    """Per-rank reports of every scenario from one 2-process gloo job (~25-40 s on 2 shared cores)."""
    out = tmp_path_factory.mktemp("ranks")
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE="2",
               OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(REPO / "tests"), str(REPO), os.environ.get("PYTHONPATH", "")]))
    script = str(Path(multistage_ranks.__file__))
    procs = [subprocess.Popen([sys.executable, script, str(_data_root(toy_dataset)), str(out / f"rank{r}.pt"),
                               *SCENARIOS], env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(2)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-4000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def _data_root(dataset) -> Path:
    return Path(dataset.directory).parents[2]  # <root>/toy/processed/<protocol id>


@pytest.mark.parametrize("scenario", ["autosrh", "optembed", "pep", "dsl", "two_stage_full"])
def test_two_ranks_match_one_process_through_every_stage(two_ranks, toy_dataset, scenario):
    reports = [r[scenario] for r in two_ranks]
    for report in reports:
        assert report["error"] is None, report.get("traceback")
    _, single = multistage_ranks.train(scenario, toy_dataset)
    assert len(reports[0]["stage_results"]) == len(single.stage_results) >= (1 if scenario == "dsl" else 2)
    for key in ("val/auc", "test/auc", "test/logloss", "val/auc_training_form"):
        print(f"{scenario} {key}: 2 ranks {reports[0]['metrics'][key]:.7f}, 1 process {single.metrics[key]:.7f}")
        assert reports[0]["metrics"][key] == pytest.approx(single.metrics[key], abs=1e-4), key
        assert reports[1]["metrics"][key] == reports[0]["metrics"][key], key
    assert [h["step"] for h in reports[0]["history"]] == [h["step"] for h in single.history]
    np.testing.assert_allclose([h["train/loss"] for h in reports[0]["history"]],
                               [h["train/loss"] for h in single.history], atol=1e-5)
    for index, (one, two) in enumerate(zip(single.stage_results, reports[0]["stage_results"])):
        assert set(one) == set(two), index
        for key, value in one.items():
            if key == "seconds":
                continue
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                torch.testing.assert_close(two[key], value, atol=1e-4, rtol=0, msg=f"stage {index} {key}")
            elif isinstance(value, float):
                assert two[key] == pytest.approx(value, abs=1e-4), (index, key)
            else:
                assert _fingerprint(two[key]) == _fingerprint(value), (index, key)
    for a, b in zip(*(r["stage_results"] for r in reports)):  # every rank: bit-identical stage results
        assert _fingerprint({k: v for k, v in a.items() if k != "seconds"}) == \
            _fingerprint({k: v for k, v in b.items() if k != "seconds"})


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
        assert _fingerprint(resumed["stage_results"][1]["keep"]) == _fingerprint(uninterrupted["stage_results"][1]["keep"])


def test_sparse_gradients_are_averaged_once_per_step_after_a_rebuild(two_ranks, toy_dataset):
    """AutoSrh's rebuild returns the same module: its sparse table must not get a second hook."""
    method = multistage_ranks.method_of("autosrh")
    params = len(_sparse_parameters(multistage_ranks.model_of(method, toy_dataset)))
    steps = sum(r["steps"] for r in two_ranks[0]["autosrh"]["stage_results"])
    assert params >= 1 and steps == 2 * multistage_ranks.CONFIG.max_steps
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
