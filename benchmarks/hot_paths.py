"""Before/after ratios of the hot-path fixes found by profiling a training job.

Profile (cProfile over ``run_job`` of ``full`` on movielens100k, DCNv2, batch 256, one thread;
shares of the training loop): backward 30%, Adam's step 19% (``_single_tensor_adam``: PyTorch's
CPU default loops over the parameters in Python), embedding forward 16% of which ~45% was
TorchRec's ``FusedEmbeddingBagCollection.forward`` splitting the KJT per feature and concatenating
it again, the cross network 15%, batch building 6%, ``model.train()`` on every step 5% (it re-sets
the flag of every submodule through ``nn.Module.__setattr__``). Fixes, each measured here against
the code it replaced (kept below as the reference), side by side on the same inputs:

- ``adam_step``: ``torch.optim.Adam(foreach=True)`` vs the default single-tensor loop, on the
  dense parameters of the movielens DCNv2 with the same gradients (bitwise-identical updates);
- ``embedding_forward``: ``FusedTables.forward`` (one direct TBE call on the KJT's values and
  offsets) vs ``forward_via_collection`` (TorchRec's forward), Criteo-like B=4096, F=26, no_grad;
- ``train_mode``: the trainer's guard (``train()`` only when some module is in eval mode) vs an
  unconditional ``model.train()``;
- ``training_step``: the whole step, ``Trainer._step`` of today vs the step as it was (all three
  old paths), on the same movielens batches, two models from the same seed.

    python benchmarks/hot_paths.py

References: recbench.training.trainer, recbench.training.optim, recbench.methods.blocks.tables.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
from recbench.runs.config import compose
from omegaconf import OmegaConf

from recbench.bench import harness
from recbench.bench.workloads import criteo_batches, criteo_like_tables
from recbench.runs.settings import instantiate_without, settings_of
from recbench.datasets.batching import BatchIterator
from recbench.methods.full import FullEmbedding
from recbench.models.tasks import training_loss
from recbench.training.trainer import Trainer
from recbench.types import EmbeddingOptimizer


def movielens_trainer(data_root: Path, overrides=()):
    """A Trainer (with optimizers) over a fresh full/DCNv2 model of the movielens100k protocol."""
    cfg = compose(["method=full", "dataset=movielens100k", "tracking=memory", *overrides])
    prepared = instantiate_without(cfg.dataset).prepare(Path(data_root))
    budget, embedding_optimizer, dense_optimizer, trainer_config, _ = settings_of(cfg)
    method = instantiate_without(cfg.method, drop=())
    torch.manual_seed(0)
    tables, dim = list(prepared.spec.tables), int(cfg.model.embedding_dim)
    embedding = method.build(tables, dim, method.solve(tables, dim, budget, embedding_optimizer), embedding_optimizer)
    model = instantiate_without(cfg.model, embedding=embedding, num_dense=prepared.spec.num_dense,
                                num_sparse=len(prepared.spec.tables))
    trainer = Trainer(trainer_config, model, method, prepared, dense_optimizer, embedding_optimizer)
    trainer._make_optimizers()
    return trainer, OmegaConf.to_container(cfg.dataset.protocol, resolve=True)


def single_tensor_adam(optimizer: torch.optim.Adam) -> torch.optim.Adam:
    """The same parameter groups under PyTorch's CPU default implementation (the code before the fix)."""
    groups = [{k: v for k, v in g.items() if k != "foreach"} for g in optimizer.param_groups]
    return torch.optim.Adam(groups, foreach=False)


def step_before(trainer: Trainer, batch) -> float:
    """``Trainer._step`` as it was: unconditional train(), TorchRec's lookup path, single-tensor Adam."""
    model = trainer.model
    model.train()
    output = model(batch.dense_features, batch.sparse_features)
    loss = training_loss(model, output, batch) + model.embedding.extra_loss()
    for opt in trainer.optimizers.values():
        opt.zero_grad(set_to_none=True)
    loss.backward()
    for opt in trainer.optimizers.values():
        opt.step()
    value = float(loss)
    if not math.isfinite(value):
        raise RuntimeError(f"loss is {value}")
    return value


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/hot_paths.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", type=Path, default=harness.REPO / "datasets")
    parser.add_argument("--steps", type=int, default=40, help="training steps (and component calls) per round")
    parser.add_argument("--scale", type=float, default=0.1, help="Criteo-like tables of the lookup comparison")
    harness.add_common_arguments(parser, rounds=5, warmup=1)
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.rounds, args.scale = 5, 2, 0.001
    clock = harness.setup(args)
    result = harness.BenchResult.start("hot_paths", argv, args)
    figures = []

    # whole training step, movielens100k (the protocol's batch size)
    after, protocol = movielens_trainer(args.data_root)
    before, _ = movielens_trainer(args.data_root)
    before.model.embedding.fused.forward = before.model.embedding.fused.forward_via_collection
    before.optimizers["dense"] = single_tensor_adam(before.optimizers["dense"])
    iterator = BatchIterator(after.dataset.spec, after.split("train"), protocol["batch_size"], shuffle=True, seed=0)
    batches = [b for _, b in zip(range(args.steps), iterator.epoch(0))]
    seconds = harness.interleaved({"after": lambda: [after._step(b) for b in batches],
                                   "before": lambda: [step_before(before, b) for b in batches]},
                                  args.rounds, args.warmup, clock=clock)
    figures.append(("training_step", f"one training step of full/DCNv2 on movielens100k (batch {protocol['batch_size']}): "
                    "the step as it was / Trainer._step now.", seconds, "s per step", len(batches)))

    # Adam: the same gradients, both implementations
    params = [p for g in after.optimizers["dense"].param_groups for p in g["params"]]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    adam_after = torch.optim.Adam([torch.nn.Parameter(p.detach().clone()) for p in params], foreach=True)
    adam_before = torch.optim.Adam([torch.nn.Parameter(p.detach().clone()) for p in params], foreach=False)
    for opt in (adam_after, adam_before):
        for p, source in zip(opt.param_groups[0]["params"], params):
            p.grad = source.grad.clone()
    seconds = harness.interleaved({"after": lambda: [adam_after.step() for _ in range(args.steps)],
                                   "before": lambda: [adam_before.step() for _ in range(args.steps)]},
                                  args.rounds, args.warmup, clock=clock)
    figures.append(("adam_step", f"Adam step over the {len(params)} dense parameters of the movielens DCNv2 "
                    f"({sum(p.numel() for p in params):,} values): single-tensor / foreach.", seconds, "s per step",
                    args.steps))

    # model.train() guard
    model = after.model
    seconds = harness.interleaved({"after": lambda: [model.train() if not all(m.training for m in model.modules())
                                                     else None for _ in range(args.steps)],
                                   "before": lambda: [model.train() for _ in range(args.steps)]},
                                  args.rounds, args.warmup, clock=clock)
    figures.append(("train_mode", f"setting training mode before a step ({sum(1 for _ in model.modules())} modules): "
                    "unconditional model.train() / the guard.", seconds, "s per step", args.steps))

    # embedding forward, Criteo-like
    tables = criteo_like_tables(args.scale)
    torch.manual_seed(0)
    fused = FullEmbedding(tables, 16, EmbeddingOptimizer()).fused
    lookups = criteo_batches(tables, 4096 if not args.quick else 256, 4, seed=1)
    with torch.no_grad():
        seconds = harness.interleaved({"after": lambda: [fused(k) for _, k, _ in lookups],
                                       "before": lambda: [fused.forward_via_collection(k) for _, k, _ in lookups]},
                                      args.rounds, args.warmup, clock=clock)
    figures.append(("embedding_forward", "FusedTables lookup of a Criteo-like batch (B=4096, F=26, Criteo Kaggle "
                    f"cardinalities x {args.scale:g}): TorchRec's FusedEmbeddingBagCollection.forward / the direct TBE "
                    "call.", seconds, "s per batch", len(lookups)))

    for name, description, seconds, unit, calls in figures:
        result.add(harness.Figure(name, description,
                                  harness.Side("after (now)", [s / calls for s in seconds["after"]], unit),
                                  harness.Side("before (replaced code)", [s / calls for s in seconds["before"]], unit),
                                  ratio_of="reference/candidate", target=">= 1"))
    result.finish(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
