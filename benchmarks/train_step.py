"""Training-step time of every registered method relative to ``full``, measured side by side.

One process builds every method of ``conf/method/*.yaml`` at the same budget on a Criteo-like
table set (26 fields, the Criteo Kaggle cardinality profile scaled by ``--scale``, Zipf(1.1) id
frequencies, dim 16) inside the same model (DLRM Criteo Kaggle MLPs by default), then times
optimizer steps on the same pre-built batches. Methods are interleaved round by round (each
round runs ``--steps`` steps of every method) so machine noise hits all of them alike; the
figure per method is the median step time over rounds and its ratio to ``full``'s median.
A method infeasible at ``--ratio`` is measured at the nearest feasible ratio of
{0.75, 0.5, 0.4, 0.3, 0.25, 0.2, 0.1, 0.05, 0.01} (closest first) and flagged.

    python benchmarks/train_step.py                     # ratio 0.1, batch 4096
    recbench-bench train_step --ratio 0.01 --model dcn

Results: ``benchmarks/results/train_step.json`` (+ a Markdown table on stdout).

References: DESIGN.md section 6 (ratios measured side by side, never a bare time).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recbench.cli.job import instantiate_without
from recbench.cli.train import CONFIG_DIR
from recbench.datasets.criteo import KAGGLE_CARDINALITIES
from recbench.methods.base import InfeasibleBudget
from recbench.models.dcn import DCNv2
from recbench.models.dlrm import DLRM
from recbench.training.optim import DenseOptimizer, build_optimizers
from recbench.types import Budget, EmbeddingOptimizer, TableSpec

RESULTS = Path(__file__).resolve().parent / "results"
FALLBACK_RATIOS = (0.75, 0.5, 0.4, 0.3, 0.25, 0.2, 0.1, 0.05, 0.01)


def criteo_like_tables(scale: float, seed: int = 0) -> List[TableSpec]:
    rng = np.random.default_rng(seed)
    tables = []
    for i, n in enumerate(KAGGLE_CARDINALITIES):
        rows = max(4, int(n * scale)) + 1
        counts = (1e6 / np.arange(1, rows + 1) ** 1.1).astype(np.int64)
        tables.append(TableSpec(f"C{i + 1}", rows, rng.permutation(counts)))
    return tables


def zipf_batches(tables: List[TableSpec], batch: int, count: int, seed: int = 0):
    """Pre-built (dense (B, 13), KJT, labels (B,)) batches with Zipf-distributed ids."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        values = []
        for t in tables:
            ranks = np.minimum(rng.zipf(1.1, batch) - 1, t.num_embeddings - 1)
            values.append(ranks)
        kjt = KeyedJaggedTensor(keys=[t.name for t in tables], values=torch.from_numpy(np.concatenate(values)),
                                lengths=torch.ones(batch * len(tables), dtype=torch.int32))
        out.append((torch.randn(batch, 13), kjt, torch.from_numpy((rng.random(batch) < 0.26).astype(np.float32))))
    return out


def methods() -> Dict[str, object]:
    found = {}
    for path in sorted((Path(CONFIG_DIR) / "method").glob("*.yaml")):
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            cfg = compose("config", overrides=[f"method={path.stem}"])
        found[path.stem] = instantiate_without(cfg.method, drop=())
    return found


def build(name, method, tables, ratio, model_name, dim):
    import math

    candidates = sorted(set(FALLBACK_RATIOS) | {ratio, 1.0}, key=lambda x: abs(math.log(x / ratio)))
    for r in candidates:
        try:
            method.solve(tables, dim, Budget(compression_ratio=r))
        except InfeasibleBudget:
            continue
        torch.manual_seed(0)
        optimizer = EmbeddingOptimizer()
        embedding = method.build(tables, dim, Budget(compression_ratio=r), optimizer)
        cls = DLRM if model_name == "dlrm" else DCNv2
        model = cls(embedding, 13, len(tables), dim, [512, 256, 64, dim], [512, 256, 1])
        optimizers = build_optimizers(model, embedding, DenseOptimizer(), optimizer)
        return model, optimizers, r
    raise RuntimeError(f"{name}: no feasible ratio")


def step(model, optimizers, batch, loss_fn):
    dense, kjt, labels = batch
    loss = loss_fn(model(dense, kjt), labels) + model.embedding.extra_loss()
    for opt in optimizers.values():
        opt.zero_grad(set_to_none=True)
    loss.backward()
    for opt in optimizers.values():
        opt.step()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ratio", type=float, default=0.1)
    parser.add_argument("--scale", type=float, default=0.01, help="x Criteo Kaggle cardinalities")
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=5, help="steps per method per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--model", choices=("dlrm", "dcn"), default="dlrm")
    parser.add_argument("--methods", nargs="*", default=None)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dim = 16
    tables = criteo_like_tables(args.scale)
    batches = zipf_batches(tables, args.batch_size, args.steps)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    built = {}
    for name, method in methods().items():
        if args.methods and name not in args.methods:
            continue
        model, optimizers, ratio = build(name, method, tables, args.ratio, args.model, dim)
        for b in batches[: args.warmup]:
            step(model, optimizers, b, loss_fn)
        built[name] = (model, optimizers, ratio)
    times: Dict[str, List[float]] = {name: [] for name in built}
    for _ in range(args.rounds):
        for name, (model, optimizers, _) in built.items():
            t0 = time.perf_counter()
            for b in batches:
                step(model, optimizers, b, loss_fn)
            times[name].append((time.perf_counter() - t0) / len(batches))
    reference = statistics.median(times["full"]) if "full" in times else float("nan")
    rows = []
    for name, samples in times.items():
        median = statistics.median(samples)
        rows.append({"method": name, "ratio_built": built[name][2], "requested_ratio": args.ratio,
                     "median_step_ms": median * 1000, "step_time_vs_full": median / reference,
                     "samples_per_s": args.batch_size / median, "rounds_ms": [s * 1000 for s in samples]})
    result = {"benchmark": "train_step", "command": "python benchmarks/train_step.py " + " ".join(argv or sys.argv[1:]),
              "model": args.model, "batch_size": args.batch_size, "scale": args.scale,
              "total_rows": sum(t.num_embeddings for t in tables), "threads": torch.get_num_threads(),
              "machine": platform.platform(), "rows": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "train_step.json").write_text(json.dumps(result, indent=2))
    print(f"| method | built at ratio | median step (ms) | step time vs full | samples/s |")
    print("|---|---|---|---|---|")
    for r in rows:
        flag = "" if r["ratio_built"] == args.ratio or r["method"] == "full" else " (nearest feasible)"
        print(f"| {r['method']} | {r['ratio_built']:g}{flag} | {r['median_step_ms']:.1f} | "
              f"{r['step_time_vs_full']:.2f}x | {r['samples_per_s']:,.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
