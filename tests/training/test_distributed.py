"""Distributed training: each rank's part of a batch, the loss scaling that makes N ranks equal one
process, sharding-type checks, DMP wrap/unshard in-process (a 1-rank gloo group), and the
acceptance run: 2 gloo processes under torchrun match a single-process run.

Stated tolerance (2 processes vs 1, same seed and data): |delta| <= 1e-4 on val/test AUC and test
log loss, <= 1e-5 on every logged training loss (measured: ~1e-7, float summation order only).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from recbench.datasets.batching import BatchIterator
from recbench.methods.full import Full
from recbench.models.dlrm import DLRM
from recbench.training import distributed
from recbench.training.distributed import (DistributedSetupError, RankIterator, check_sharding_types,
                                           ProcessGroupParallel)
from recbench.models.tasks import training_loss
from recbench.types import Budget, EmbeddingOptimizer
from solve_build import solve_and_build

REPO = Path(__file__).resolve().parents[2]
EMB = EmbeddingOptimizer(learning_rate=0.1)


def _model(dataset, seed=0):
    torch.manual_seed(seed)
    emb = solve_and_build(Full(), dataset.spec.tables, 8, Budget(), EMB)
    return DLRM(emb, dataset.spec.num_dense, len(dataset.spec.tables), 8, [16, 8], [16, 1])


@pytest.mark.parametrize("world, batch_size", [(2, 64), (3, 64), (3, 2)])
def test_rank_parts_partition_every_global_batch(toy_dataset, world, batch_size):
    base = BatchIterator(toy_dataset.spec, toy_dataset.split("train"), batch_size, shuffle=True, seed=5)
    ranks = [RankIterator(base, r, world) for r in range(world)]
    assert all(len(r) == len(base) for r in ranks)
    per_rank = [list(r.epoch(1)) for r in ranks]
    for b, whole in enumerate(base.epoch(1)):
        parts = [per_rank[r][b] for r in range(world)]
        keep = [ranks[r].keep_masks[b] for r in range(world)]
        labels = np.concatenate([p.labels.numpy()[k] for p, k in zip(parts, keep)])
        dense = np.concatenate([p.dense_features.numpy()[k] for p, k in zip(parts, keep)])
        np.testing.assert_array_equal(labels, whole.labels.numpy())
        np.testing.assert_array_equal(dense, whole.dense_features.numpy())
        assert all(p.global_size == len(whole.labels) for p in parts)
        assert sum(int(p.weights.sum()) for p in parts) == len(whole.labels)
        assert all(len(p.labels) >= 1 for p in parts)  # a rank with no row gets one zero-weight row


def test_mean_of_rank_losses_is_the_global_mean_loss(toy_dataset):
    """DDP averages gradients over ranks; the row scale makes that average the global-mean gradient."""
    model = _model(toy_dataset)
    base = BatchIterator(toy_dataset.spec, toy_dataset.split("train"), 100)
    whole = next(iter(base))
    expected = training_loss(model, model(whole.dense_features, whole.sparse_features), whole)
    world = 3
    strategy = ProcessGroupParallel.__new__(ProcessGroupParallel)
    strategy.world_size = world
    losses = []
    for rank in range(world):
        part = next(iter(RankIterator(base, rank, world)))
        output = model(part.dense_features, part.sparse_features)
        losses.append(training_loss(model, output, part, strategy.row_scale(part)))
    assert float(sum(losses).detach() / world) == pytest.approx(float(expected.detach()), rel=1e-6)


def test_sharding_types_are_checked_with_the_reason():
    assert check_sharding_types(None) == ("table_wise", "column_wise", "table_column_wise")
    assert check_sharding_types(["column_wise"]) == ("column_wise",)
    with pytest.raises(DistributedSetupError, match="row_wise.*CUDA only.*allowed: table_wise"):
        check_sharding_types(["row_wise"])
    with pytest.raises(DistributedSetupError, match="data_parallel.*dense"):
        check_sharding_types(["data_parallel"])
    with pytest.raises(DistributedSetupError, match="nosuch"):
        check_sharding_types(["nosuch"])


def test_distributed_without_a_launcher_is_a_clear_error(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(DistributedSetupError, match="torchrun --nproc-per-node"):
        with distributed.session(True):
            pass
    assert distributed.current().world_size == 1


def test_wrap_trains_through_dmp_and_unshard_restores_plain_tables(toy_dataset, one_rank_group):
    from torchrec.distributed.fused_embeddingbag import ShardedFusedEmbeddingBagCollection
    from torchrec.modules.fused_embedding_modules import FusedEmbeddingBagCollection

    from recbench.training.optim import DenseOptimizer
    from recbench.training.trainer import Trainer, TrainerConfig

    parallel = one_rank_group
    reference_model = _model(toy_dataset)
    model = _model(toy_dataset)
    wrapped = parallel.wrap(model, Full())
    assert isinstance(model.embedding.fused.collection, ShardedFusedEmbeddingBagCollection)
    batch = next(iter(BatchIterator(toy_dataset.spec, toy_dataset.split("val"), 50)))
    with torch.no_grad():  # the shards start from the unsharded initialisation
        torch.testing.assert_close(wrapped(batch.dense_features, batch.sparse_features),
                                   reference_model(batch.dense_features, batch.sparse_features))
    config = TrainerConfig(max_steps=6, batch_size=64, progress=False, latency_repeats=1, evals_per_epoch=1)
    sharded = Trainer(config, wrapped, Full(), toy_dataset, DenseOptimizer(), EMB, parallel=parallel).fit()
    single = Trainer(config, reference_model, Full(), toy_dataset, DenseOptimizer(), EMB).fit()
    for key in ("val/auc", "test/auc", "test/logloss"):
        assert sharded.metrics[key] == pytest.approx(single.metrics[key], abs=1e-5), key
    assert isinstance(model.embedding.fused.collection, FusedEmbeddingBagCollection)  # unsharded in place
    assert sharded.metrics["emb/bytes_training"] == single.metrics["emb/bytes_training"]
    for part in ("weights", "optimizer_state", "buffers", "runtime"):  # measured on the gathered module
        assert sharded.metrics[f"emb/bytes_training_{part}"] == single.metrics[f"emb/bytes_training_{part}"], part


TOY_DATASET = """_target_: toy_protocol.ToyProtocol
rows: 3000
protocol: {batch_size: 128, embedding_dim: 8, bottom_mlp: [8], top_mlp: [8, 1], dense_learning_rate: 0.003,
           embedding_learning_rate: 0.1, max_epochs: 2, evals_per_epoch: 2, patience: 3}
"""


@pytest.mark.slow  # ~40-60 s on 2 shared cores: a torchrun job of 2 processes + a single-process run
@pytest.mark.parametrize("method, extra", [("full", []), ("qr", ["budget.compression_ratio=0.5",
                                                                 "runtime.sharding_types=[column_wise]"]),
                                           ("mixed_dim", ["budget.compression_ratio=0.5"])])
def test_two_gloo_processes_match_one_process(tmp_path, method, extra):
    from mlflow.tracking import MlflowClient

    (tmp_path / "conf" / "dataset").mkdir(parents=True)
    (tmp_path / "conf" / "dataset" / "toy.yaml").write_text(TOY_DATASET)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]),
               MLFLOW_TRACKING_URI=uri, RECBENCH_ARTIFACT_ROOT=str(tmp_path / "art"),
               RECBENCH_DATA_ROOT=str(tmp_path / "data"), RECBENCH_RUN_ROOT=str(tmp_path / "runs"), OMP_NUM_THREADS="1")
    args = [f"hydra.searchpath=[file://{tmp_path / 'conf'}]", "dataset=toy", "model=dlrm", f"method={method}",
            "trainer.progress=false", "runtime.num_threads=1", "trainer.latency_repeats=1", *extra]
    single = subprocess.run([sys.executable, "-m", "recbench.cli.train", *args], env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    torchrun = str(Path(sys.executable).parent / "torchrun")
    double = subprocess.run([torchrun, "--nproc-per-node", "2", "-m", "recbench.cli.train", *args,
                             "runtime.distributed=true"], env=env, cwd=tmp_path, capture_output=True, text=True,
                            timeout=600)
    out = double.stdout + double.stderr
    assert double.returncode == 0, out[-3000:]
    assert "sharding plan over 2 ranks" in out and "terminate called" not in out
    client = MlflowClient(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], "")
    by_world = {r.data.tags["world_size"]: r for r in runs}
    assert sorted(by_world) == ["1", "2"] and len(runs) == 2  # rank 1 recorded nothing
    one, two = by_world["1"], by_world["2"]
    assert one.info.status == two.info.status == "FINISHED"
    for key in ("val/auc", "test/auc", "test/logloss"):
        assert two.data.metrics[key] == pytest.approx(one.data.metrics[key], abs=1e-4), key
    history = [[(m.step, m.value) for m in client.get_metric_history(r.info.run_id, "train/loss")] for r in (one, two)]
    assert [s for s, _ in history[0]] == [s for s, _ in history[1]] and len(history[0]) >= 4
    np.testing.assert_allclose([v for _, v in history[1]], [v for _, v in history[0]], atol=1e-5)


def test_first_runs_on_rank_zero_and_reraises_its_failure(one_rank_group):
    assert one_rank_group.first(lambda: 7) == 7

    def broken():
        raise ValueError("no data lines")

    with pytest.raises(ValueError, match="no data lines"):
        one_rank_group.first(broken)
    assert one_rank_group.broadcast("after") == "after"  # the group is still usable


def _descendants(pid: int):
    """Every process below ``pid`` (torchrun starts its workers in their own sessions)."""
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


@pytest.mark.slow  # ~3-4 min on 2 shared cores: three torchrun jobs of 2 processes
def test_killed_distributed_run_resumes_from_its_rank_checkpoints(tmp_path):
    """SIGKILL of the whole torchrun job mid-epoch; the same command again resumes every rank from
    its own checkpoint (local shards, fused optimizer state, RNG, progress) into the same MLflow run
    and ends where an uninterrupted 2-process run ends."""
    import signal
    import time

    from mlflow.tracking import MlflowClient

    (tmp_path / "conf" / "dataset").mkdir(parents=True)
    (tmp_path / "conf" / "dataset" / "toy.yaml").write_text(TOY_DATASET.replace("rows: 3000", "rows: 20000"))
    torchrun = str(Path(sys.executable).parent / "torchrun")
    command = [torchrun, "--nproc-per-node", "2", "-m", "recbench.cli.train",
               f"hydra.searchpath=[file://{tmp_path / 'conf'}]", "dataset=toy", "model=dlrm", "method=full",
               "trainer.progress=false", "runtime.num_threads=1", "trainer.latency_repeats=1",
               "trainer.checkpoint_every_steps=20", "runtime.distributed=true"]

    def env(store):
        return dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]),
                    MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / store}.db", RECBENCH_ARTIFACT_ROOT=str(tmp_path / "art"),
                    RECBENCH_DATA_ROOT=str(tmp_path / "data"), RECBENCH_RUN_ROOT=str(tmp_path / f"{store}-runs"),
                    OMP_NUM_THREADS="1")

    def runs(store):
        client = MlflowClient(f"sqlite:///{tmp_path / store}.db")
        return client.search_runs([e.experiment_id for e in client.search_experiments()], "")

    reference = subprocess.run(command, env=env("reference"), cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert reference.returncode == 0, reference.stderr[-3000:]
    victim = subprocess.Popen(command, env=env("killed"), cwd=tmp_path, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    step = None
    deadline = time.time() + 600
    while step is None and time.time() < deadline and victim.poll() is None:
        time.sleep(0.1)
        files = sorted((tmp_path / "killed-runs").glob("*/checkpoint.rank*-of-2.pt"))
        if len(files) == 2:
            try:
                progress = [torch.load(f, weights_only=True)["progress"] for f in files]
            except Exception:
                continue
            if progress[0]["global_step"] == progress[1]["global_step"] and progress[0]["batch"] > 0:
                for pid in [victim.pid, *_descendants(victim.pid)]:  # torchrun and both ranks
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                step = progress[0]["global_step"]
    victim.wait()
    assert step is not None, "no common mid-epoch checkpoint of both ranks was seen"
    resumed = subprocess.run(command, env=env("killed"), cwd=tmp_path, capture_output=True, text=True, timeout=900)
    out = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, out[-3000:]
    assert f"step {step}" in out or "resumed from" in out
    (run,), (ref,) = runs("killed"), runs("reference")
    assert run.info.status == "FINISHED" and run.data.tags["resumed"] == "true"
    for key in ("val/auc", "test/auc", "test/logloss"):
        print(f"{key}: resumed {run.data.metrics[key]:.7f}, uninterrupted {ref.data.metrics[key]:.7f}")
        assert run.data.metrics[key] == pytest.approx(ref.data.metrics[key], abs=1e-5), key
    assert not list((tmp_path / "killed-runs").glob("*/checkpoint*.pt"))  # removed once finished
