"""Training-step time of recbench's ``full`` against a plain PyTorch reference, and of each method against ``full``.

One process builds, on the same Criteo-like table set (26 fields, the Criteo Kaggle cardinality
profile x ``--scale``, Zipf(1.1) ids, dim 16) inside the same DLRM (Criteo Kaggle MLPs,
bottom 512-256-64-16, top 512-256-1, Adam on the MLPs):

- the references, one ``nn.EmbeddingBag`` per field: DLRM's own setup (``sparse=True`` bags and
  ``torch.optim.SGD``), the same with sparse ``torch.optim.Adagrad`` (recbench's embedding learning
  rate and eps), and dense-gradient bags with ``torch.optim.Adagrad`` (the naive baseline);
- recbench's ``full`` (FBGEMM fused tables, row-wise Adagrad inside backward) and every other
  method asked for (``--methods``; default the table-backed ones with a target), built at
  ``--ratio`` (a method infeasible there is built at the nearest feasible ratio and flagged).

All models step on the same pre-built batches of ``--batch-size``; rounds interleave the models
(each round runs ``--steps`` steps of each), the figure per model is its median step time over
rounds. Figures: each reference's step time / ``full``'s (vs DLRM's sparse SGD: a speed-up >= 1;
vs dense gradients: >= 1.8), ``full``'s fraction of the compute floor (the floor: 3 x the model's
forward FLOPs, counted by torch's FlopCounterMode, / this machine's measured sgemm rate; target
>= 0.75 at 1 thread), and each method's step time / ``full``'s (hashing, unified, mixed_dim <= 1.15;
qr <= 1.3).

    python benchmarks/train_step.py                      # scale 0.1 (3.4M rows), batch 4096
    python benchmarks/train_step.py --methods all        # every recbench/conf/method/*.yaml (dhe takes ~25x full)
    recbench-bench train_step --scale 0.01 --model dcn

References: docs/architecture.md section 6; recbench.bench.harness.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Dict, List

import torch
from recbench.runs.config import compose

from recbench.bench import harness
from recbench.bench.workloads import (EmbeddingBagReference, criteo_batches, criteo_like_tables, dense_forward_flops,
                                      dlrm, sgemm_workload, train_step)
from recbench.runs.settings import instantiate_without
from recbench.runs.config import CONFIG_DIR
from recbench.methods.base import InfeasibleBudget
from recbench.training.optim import DenseOptimizer, build_optimizers
from recbench.types import Budget, EmbeddingOptimizer

FALLBACK_RATIOS = (0.75, 0.5, 0.4, 0.3, 0.25, 0.2, 0.1, 0.05, 0.01)
TARGETS = {"hashing": "<= 1.15", "unified": "<= 1.15", "mixed_dim": "<= 1.15", "qr": "<= 1.3"}
DEFAULT_METHODS = ("full", "hashing", "unified", "mixed_dim", "qr", "ptq")
#: the references: (name, sparse bags, embedding optimizer, what it is)
REFERENCES = (("embeddingbag_sparse_sgd", True, "sgd", "nn.EmbeddingBag(sparse=True) + SGD (DLRM's own setup)"),
              ("embeddingbag_sparse_adagrad", True, "adagrad", "nn.EmbeddingBag(sparse=True) + sparse Adagrad"),
              ("embeddingbag_dense", False, "adagrad", "nn.EmbeddingBag dense gradients + Adagrad"))
REFERENCE_NAMES = tuple(r[0] for r in REFERENCES)
#: the targets of full against each reference (speed-up: reference step / full step)
REFERENCE_TARGETS = {"embeddingbag_sparse_sgd": ">= 1", "embeddingbag_sparse_adagrad": ">= 1",
                     "embeddingbag_dense": ">= 1.8"}
DIM = 16
SGEMM, SGEMM_PRODUCTS = "sgemm 1024", 8


def registered_methods() -> List[str]:
    return sorted(p.stem for p in (Path(CONFIG_DIR) / "method").glob("*.yaml"))


def method_object(name: str):
    cfg = compose([f"method={name}"])
    return instantiate_without(cfg.method, drop=())


def build_method(name, tables, ratio, model_name):
    """(model, optimizers, ratio built at) of a method at ``ratio`` or the nearest feasible one."""
    method = method_object(name)
    candidates = sorted(set(FALLBACK_RATIOS) | {ratio, 1.0}, key=lambda x: abs(math.log(x / ratio)))
    for r in candidates:
        try:
            plan = method.solve(tables, DIM, Budget(compression_ratio=r))
        except InfeasibleBudget:
            continue
        torch.manual_seed(0)
        optimizer = EmbeddingOptimizer()
        embedding = method.build(tables, DIM, plan, optimizer)
        model = dlrm(embedding, len(tables), DIM, model_name)
        return model, build_optimizers(model, embedding, DenseOptimizer(), optimizer), r
    raise RuntimeError(f"{name}: no feasible ratio among {candidates}")


def build_reference(tables, model_name, sparse: bool, optimizer: str):
    """A DLRM over ``nn.EmbeddingBag`` tables (``sparse`` gradients or dense), the tables updated by
    ``optimizer`` (``sgd`` or ``adagrad``) at recbench's embedding learning rate; the MLPs by Adam."""
    torch.manual_seed(0)
    embedding = EmbeddingBagReference(tables, DIM, sparse=sparse)
    model = dlrm(embedding, len(tables), DIM, model_name)
    spec = EmbeddingOptimizer()
    table_params = {id(p) for p in embedding.parameters()}
    dense = [p for p in model.parameters() if id(p) not in table_params]
    tables_optimizer = (torch.optim.SGD(embedding.parameters(), lr=spec.learning_rate) if optimizer == "sgd"
                        else torch.optim.Adagrad(embedding.parameters(), lr=spec.learning_rate, eps=spec.eps))
    return model, {"dense": torch.optim.Adam(dense, lr=DenseOptimizer().learning_rate), "embedding": tables_optimizer}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/train_step.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ratio", type=float, default=0.1)
    parser.add_argument("--scale", type=float, default=0.1, help="x Criteo Kaggle cardinalities")
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=3, help="steps per model per round")
    parser.add_argument("--model", choices=("dlrm", "dcn"), default="dlrm")
    parser.add_argument("--methods", nargs="*", default=None, help=f"default: {' '.join(DEFAULT_METHODS)}; 'all'")
    harness.add_common_arguments(parser, rounds=5, warmup=2)
    args = parser.parse_args(argv)
    if args.quick:
        args.scale, args.batch_size, args.steps, args.rounds, args.warmup = 0.001, 256, 1, 2, 1
        args.methods = args.methods or ["full", "hashing"]
    clock = harness.setup(args)
    names = registered_methods() if args.methods == ["all"] else list(args.methods or DEFAULT_METHODS)
    unknown = sorted(set(names) - set(registered_methods()))
    if unknown:
        parser.error(f"unknown method(s) {', '.join(unknown)}; allowed: {', '.join(registered_methods())} or all")
    if "full" not in names:
        names.insert(0, "full")

    result = harness.BenchResult.start("train_step", argv, args)
    tables = criteo_like_tables(args.scale)
    batches = criteo_batches(tables, args.batch_size, args.steps)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    models: Dict[str, tuple] = {name: build_reference(tables, args.model, sparse, optimizer)
                                for name, sparse, optimizer, _ in REFERENCES}
    built_ratio: Dict[str, float] = {name: 1.0 for name in REFERENCE_NAMES}
    for name in names:
        model, optimizers, ratio = build_method(name, tables, args.ratio, args.model)
        models[name], built_ratio[name] = (model, optimizers), ratio

    def workload(model, optimizers):
        def run():
            for batch in batches:
                train_step(model, optimizers, batch, loss_fn)
        return run

    # the sgemm rate is measured in the same rounds as the steps (same load, same clock): one round of
    # it is SGEMM_PRODUCTS products of two 1024 x 1024 matrices
    workloads = {n: workload(*m) for n, m in models.items()}
    workloads[SGEMM], sgemm_flops = sgemm_workload(1024, SGEMM_PRODUCTS)
    seconds = harness.interleaved(workloads, args.rounds, args.warmup, clock=clock)
    sgemm_rates = [sgemm_flops / s for s in seconds.pop(SGEMM)]
    per_step = {n: [s / len(batches) for s in samples] for n, samples in seconds.items()}
    result.settings.update({
        "total_rows": sum(t.num_embeddings for t in tables), "dim": DIM,
        "torch_threads": torch.get_num_threads()})
    full = harness.Side("full (FBGEMM fused, row-wise Adagrad)", per_step["full"], "s/step")
    for name, _, _, what in REFERENCES:
        result.add(harness.Figure(
            f"full_vs_{name}", f"step time of {what} divided by recbench full's (same DLRM, same batches): "
            "the speed-up of fused tables.", full, harness.Side(what, per_step[name], "s/step"),
            ratio_of="reference/candidate", target=REFERENCE_TARGETS[name]))
    # the compute floor: forward + backward ~ 3 x the forward's FLOPs (two matmuls per forward one)
    flops = 3 * dense_forward_flops(models["full"][0], batches[0])
    floors = [flops / rate for rate in sgemm_rates]  # one per round, measured next to that round's steps
    result.settings.update({"flops_per_step": flops, "sgemm_flop_per_s": harness.median(sgemm_rates),
                            "sgemm_flop_per_s_per_round": sgemm_rates, "floor_s_per_step": harness.median(floors)})
    result.add(harness.Figure(
        "full_fraction_of_compute_floor", "the compute floor (3 x the model's forward FLOPs / this machine's "
        "sgemm rate, 1024 x 1024 products measured in the same rounds) divided by full's step time: 1 = the "
        "step costs only its matmuls, at the rate of large square ones.",
        full, harness.Side("compute floor", floors, "s/step"), ratio_of="reference/candidate", target=">= 0.75"))
    rows = []
    for name in models:
        flag = "" if name == "full" or name in REFERENCE_NAMES or built_ratio[name] == args.ratio else " (nearest feasible)"
        rows.append({"model": name, "built at ratio": f"{built_ratio[name]:g}{flag}",
                     "median step (ms)": harness.median(per_step[name]) * 1000,
                     "vs full": harness.median(per_step[name]) / harness.median(per_step["full"]),
                     "samples/s": args.batch_size / harness.median(per_step[name])})
        if name == "full" or name in REFERENCE_NAMES:
            continue
        result.add(harness.Figure(
            f"{name}_vs_full", f"{name} (built at ratio {built_ratio[name]:g}{flag}) step time relative to full's.",
            harness.Side(name, per_step[name], "s/step"), full, ratio_of="candidate/reference",
            target=TARGETS.get(name)))
    result.tables["step time per model"] = rows
    result.finish(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
