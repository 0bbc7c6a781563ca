"""Multi-stage runs: stage artifacts are logged, and a run killed in a later stage resumes from the
last finished stage (finished stages never run again) and ends with the uninterrupted run's metrics,
also when ``rebuild`` changes the module's structure (rows physically removed)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from recbench.methods.base import Hook
from recbench.methods.blocks.per_id import PerIdEmbedding
from recbench.models.dlrm import DLRM
from recbench.tracking.stage_artifacts import write_stage_result
from recbench.training.checkpoint import load_checkpoint
from recbench.training.optim import DenseOptimizer
from recbench.training.trainer import Trainer, TrainerConfig
from recbench.types import EmbeddingOptimizer, Stage

DIM = 8
EMB = EmbeddingOptimizer(learning_rate=0.1)


class RemappedTable(PerIdEmbedding):
    """One table over all fields; ``keep`` (per field, bool (n_f,)) removes rows physically: a remap
    buffer sends kept ids to compact rows and removed ids to -1 (a zero vector)."""

    def __init__(self, tables, dim, keep=None):
        super().__init__(tables, dim, kept=[])
        keep = keep or [torch.ones(t.num_embeddings, dtype=torch.bool) for t in tables]
        flat = torch.cat(list(keep))
        remap = torch.full((flat.numel(),), -1, dtype=torch.int64)
        remap[flat] = torch.arange(int(flat.sum()))
        sizes = torch.tensor([t.num_embeddings for t in tables])
        self.register_buffer("remap", remap)
        self.register_buffer("offset", torch.cumsum(sizes, 0) - sizes)
        self.weight = nn.Parameter(torch.randn(int(flat.sum()), dim) * 0.1)

    def encode(self, fields, ids):
        rows = self.remap[self.offset[fields] + ids]
        return F.embedding(rows.clamp(min=0), self.weight, sparse=True) * (rows >= 0).unsqueeze(1)

    def sparse_parameters(self):
        return [self.weight]


class Events(Hook):
    def __init__(self, crash_stage=None, crash_step=None):
        self.events, self.crash_stage, self.crash_step = [], crash_stage, crash_step

    def on_stage_start(self, ctx):
        self.events.append(("start", ctx.stage.name))

    def on_step_end(self, ctx):
        if ctx.stage.name == self.crash_stage and ctx.stage_step == self.crash_step:
            raise KeyboardInterrupt("simulated kill")

    def on_stage_end(self, ctx):
        if ctx.stage.name == "warm":  # a stage artifact of a train stage
            return {"row_norms": ctx.embedding.weight.detach().norm(dim=1).clone()}
        return None


class PruneThenRetrain:
    """warm (train) -> prune (search: keep rows above the median norm) -> final (train on the pruned rows)."""

    name = "prune_then_retrain"

    def __init__(self, hook):
        self.hook, self.searches, self.rebuilds = hook, 0, []

    def stages(self):
        return [Stage("warm", max_steps=20), Stage("prune", kind="search", run=self._prune),
                Stage("final", max_steps=25, reset_optimizer=True)]

    def hooks(self):
        return [self.hook]

    def _prune(self, ctx):
        self.searches += 1
        if self.hook.crash_stage == "prune":
            raise KeyboardInterrupt("simulated kill inside the search stage")
        norms, module = ctx.trainer.stage_results[0]["row_norms"], ctx.embedding
        keep, start = [], 0
        for t in module.tables:
            part = norms[start:start + t.num_embeddings]
            keep.append(part >= part.median())
            start += t.num_embeddings
        return {"keep": keep, "kept_rows": int(sum(int(k.sum()) for k in keep)), "val_auc": ctx.evaluate("val")["auc"]}

    def rebuild(self, module, result):
        self.rebuilds.append(sorted(result))
        if "keep" not in result:
            return module
        new = RemappedTable(module.tables, module.dim, result["keep"])
        with torch.no_grad():  # the retained rows inherit their trained values
            new.weight.copy_(module.weight[torch.cat(list(result["keep"]))])
        return new


def _run(dataset, hook, path=None, every=0, logged=None, stages=None):
    torch.manual_seed(0)
    method = PruneThenRetrain(hook)
    model = DLRM(RemappedTable(dataset.spec.tables, DIM), dataset.spec.num_dense, len(dataset.spec.tables), DIM,
                 [16, DIM], [16, 1])
    config = TrainerConfig(max_epochs=5, batch_size=64, progress=False, latency_repeats=1, evals_per_epoch=2,
                           checkpoint_every_steps=every)
    trainer = Trainer(config, model, method, dataset, DenseOptimizer(), EMB, checkpoint_path=path,
                      log_metrics=(lambda m, step: logged.update(m)) if logged is not None else None,
                      log_stage=(lambda i, name, r: stages.append((i, name, r))) if stages is not None else None)
    return method, trainer.fit()


@pytest.fixture(scope="module")
def reference(toy_dataset):
    logged, stages = {}, []
    method, result = _run(toy_dataset, Events(), logged=logged, stages=stages)
    return method, result, logged, stages


def test_stage_metrics_and_artifacts_are_logged(toy_dataset, reference, tmp_path):
    _, result, logged, stages = reference
    assert [(i, name) for i, name, _ in stages] == [(0, "warm"), (1, "prune"), (2, "final")]
    assert logged["stage/warm/steps"] == 20 and logged["stage/final/steps"] == 25
    assert logged["stage/prune/kept_rows"] == result.stage_results[1]["kept_rows"] > 0
    assert all(logged[f"stage/{s}/seconds"] > 0 for s in ("warm", "prune", "final"))
    rows = sum(t.num_embeddings for t in toy_dataset.spec.tables)
    assert stages[0][2]["row_norms"].shape == (rows,) and result.stage_results[0]["row_norms"].shape == (rows,)
    paths = write_stage_result(tmp_path, 1, "prune", stages[1][2])
    document = json.loads(paths[0].read_text())
    assert document["result"]["kept_rows"] == stages[1][2]["kept_rows"]
    assert document["result"]["keep"][0]["dtype"] == "bool"
    arrays = np.load(paths[1])
    assert np.array_equal(arrays["keep.0"], stages[1][2]["keep"][0].numpy())


@pytest.mark.parametrize("every", [0, 7])  # stage-end checkpoints only / also mid-stage ones
def test_killed_in_a_later_stage_resumes_from_the_last_finished_stage(toy_dataset, tmp_path, reference, every):
    _, ref, _, _ = reference
    path = tmp_path / "checkpoint.pt"
    with pytest.raises(KeyboardInterrupt):
        _run(toy_dataset, Events(crash_stage="final", crash_step=17), path, every)
    saved = load_checkpoint(path)
    assert saved["progress"]["stage_index"] == 2 and len(saved["stage_results"]) == 2
    assert saved["model"]["embedding.weight"].shape[0] == ref.stage_results[1]["kept_rows"]  # the rebuilt module

    hook = Events()
    method, resumed = _run(toy_dataset, hook, path, every)
    assert ("start", "warm") not in hook.events and ("start", "prune") not in hook.events  # finished: skipped
    assert hook.events[0] == ("start", "final") and method.searches == 0
    for key in ("val/auc", "test/auc", "test/logloss"):
        assert resumed.metrics[key] == pytest.approx(ref.metrics[key], abs=1e-6), key
    for got, want in zip(resumed.stage_results, ref.stage_results):
        assert sorted(got) == sorted(want)
        assert got["steps" if "steps" in got else "kept_rows"] == want["steps" if "steps" in want else "kept_rows"]
    assert all(torch.equal(a, b) for a, b in zip(resumed.stage_results[1]["keep"], ref.stage_results[1]["keep"]))
    assert [h["step"] for h in resumed.history] == [h["step"] for h in ref.history]


def test_killed_inside_a_search_stage_reruns_only_that_stage(toy_dataset, tmp_path, reference):
    _, ref, _, _ = reference
    path = tmp_path / "checkpoint.pt"
    with pytest.raises(KeyboardInterrupt):
        _run(toy_dataset, Events(crash_stage="prune"), path)
    hook = Events()
    method, resumed = _run(toy_dataset, hook, path)
    assert [e[1] for e in hook.events if e[0] == "start"] == ["prune", "final"] and method.searches == 1
    assert resumed.metrics["test/auc"] == pytest.approx(ref.metrics["test/auc"], abs=1e-6)
