"""Data path: batches/s of recbench's loader against the rate at which a training step consumes them.

A Criteo-like train split of ``--rows`` rows (13 float32 dense features, 26 int32 sparse ids
drawn Zipf(1.1) within the Criteo Kaggle cardinalities x ``--scale``, float32 labels; 160 bytes
per row) is written as the memory-mapped ``.npy`` cache recbench's protocols produce, and read back
through ``recbench.datasets.batching.BatchIterator`` exactly as the trainer does (shuffled
epoch order, each batch one fancy-index gather per array, the KJT built vectorised). The consumer is
one training step of ``full`` (DLRM, Criteo Kaggle MLPs, dim 16, FBGEMM fused tables) on the
batches the loader produced. Rounds interleave ``--batches`` loader batches and ``--batches``
training steps; the figure is the loader's batches/s divided by the training steps/s
(target >= 5: the loader is never the bottleneck, even on one core shared with training).

The cache is read from the page cache (it was just written and fits in memory, as a prepared
protocol that is read every epoch does); a cold read from disk is a different, storage-bound figure.

    python benchmarks/loader.py                     # 2*10^6 rows (320 MB), batch 4096
    python benchmarks/loader.py --rows 500000 --batches 5

References: recbench.datasets.batching; docs/architecture.md section 6 ("Batches are built vectorised from
memory-mapped arrays; no per-sample Python in the hot path").
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from recbench.bench import harness
from recbench.bench.workloads import NUM_DENSE, criteo_like_tables, dlrm, field_ids, train_step
from recbench.datasets.batching import BatchIterator
from recbench.datasets.storage import PreparedDataset
from recbench.methods.full import FullEmbedding
from recbench.training.optim import DenseOptimizer, build_optimizers
from recbench.types import DatasetSpec, EmbeddingOptimizer

DIM = 16


def write_split(directory: Path, tables, rows: int, seed: int = 0, block: int = 1 << 18) -> None:
    """``train/{dense,sparse,labels}.npy`` of ``rows`` Criteo-like rows, written block by block."""
    rng = np.random.default_rng(seed)
    (directory / "train").mkdir(parents=True, exist_ok=True)
    dense = np.lib.format.open_memmap(directory / "train" / "dense.npy", "w+", np.float32, (rows, NUM_DENSE))
    sparse = np.lib.format.open_memmap(directory / "train" / "sparse.npy", "w+", np.int32, (rows, len(tables)))
    labels = np.lib.format.open_memmap(directory / "train" / "labels.npy", "w+", np.float32, (rows,))
    for start in range(0, rows, block):
        n = min(block, rows - start)
        dense[start:start + n] = np.log1p(rng.exponential(3.0, (n, NUM_DENSE))).astype(np.float32)
        for f, t in enumerate(tables):
            sparse[start:start + n, f] = field_ids(rng, t.num_embeddings, n)
        labels[start:start + n] = (rng.random(n) < 0.26).astype(np.float32)
    for array in (dense, sparse, labels):
        array.flush()
    del dense, sparse, labels


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/loader.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--scale", type=float, default=0.1, help="x Criteo Kaggle cardinalities")
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--batches", type=int, default=10, help="loader batches and training steps per round")
    harness.add_common_arguments(parser, rounds=5, warmup=1)
    args = parser.parse_args(argv)
    if args.quick:
        args.rows, args.scale, args.batch_size, args.batches, args.rounds = 20_000, 0.001, 512, 3, 2
    clock = harness.setup(args)
    result = harness.BenchResult.start("loader", argv, args)
    tables = criteo_like_tables(args.scale)
    scratch = Path(tempfile.mkdtemp(prefix="recbench-bench-loader-"))
    try:
        write_split(scratch, tables, args.rows)
        spec = DatasetSpec("criteo_like", "criteo_like-bench", NUM_DENSE, tuple(tables),
                           {"train": args.rows, "val": 0, "test": 0})
        split = PreparedDataset(spec, scratch, {}).split("train")
        iterator = BatchIterator(spec, split, args.batch_size, shuffle=True, seed=0, drop_last=True)
        epoch = {"number": 0, "batches": iter(())}

        def next_batch():
            batch = next(epoch["batches"], None)
            if batch is None:  # a new shuffled epoch (its permutation is part of the loader's cost)
                epoch["number"] += 1
                epoch["batches"] = iterator.epoch(epoch["number"])
                batch = next(epoch["batches"])
            return batch

        torch.manual_seed(0)
        embedding = FullEmbedding(tables, DIM, EmbeddingOptimizer())
        model = dlrm(embedding, len(tables), DIM)
        optimizers = build_optimizers(model, embedding, DenseOptimizer(), EmbeddingOptimizer())
        loss_fn = torch.nn.BCEWithLogitsLoss()
        consumed = [next_batch() for _ in range(args.batches)]

        def load():
            consumed[:] = [next_batch() for _ in range(args.batches)]

        def steps():
            for b in consumed:
                train_step(model, optimizers, (b.dense_features, b.sparse_features, b.labels), loss_fn)

        seconds = harness.interleaved({"loader": load, "training steps": steps}, args.rounds, args.warmup, clock=clock)
        rates = {k: [args.batches / s for s in v] for k, v in seconds.items()}
        result.add(harness.Figure(
            "loader_vs_training_step", f"batches/s of BatchIterator (shuffled, batch {args.batch_size}, {args.rows:,}-row "
            "memory-mapped split) divided by training steps/s of full (DLRM) on those batches.",
            harness.Side("BatchIterator", rates["loader"], "batches/s"),
            harness.Side("full training step", rates["training steps"], "steps/s"),
            ratio_of="candidate/reference", target=">= 5"))
        result.tables["rates"] = [{"side": k, "median per second": harness.median(v),
                                   "median ms per batch": 1000 / harness.median(v),
                                   "rows/s": harness.median(v) * args.batch_size} for k, v in rates.items()]
        result.settings.update({"bytes_per_row": 4 * NUM_DENSE + 4 * len(tables) + 4,
                                "split_mb": args.rows * (4 * NUM_DENSE + 4 * len(tables) + 4) / 1e6,
                                "total_table_rows": sum(t.num_embeddings for t in tables)})
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    result.finish(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
