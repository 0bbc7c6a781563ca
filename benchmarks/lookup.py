"""Embedding lookup rate against the machine's limits: STREAM-like bandwidth, random row gather, FBGEMM.

Limits, measured here on this machine (one thread):

- sequential bandwidth, STREAM-like (McCalpin): ``copy`` (b = a; 2 arrays of traffic) and
  ``triad`` (a = b + s * c; 3 arrays) over float32 arrays of ``--stream-mb`` MB each;
- the random row-gather rate: ``torch.index_select`` of rows from a table of the same rows and
  byte size as the embedding tables (several hundred MB: out of every cache), with exactly the
  ids the lookups use (the 26 fields' ids offset into one table). Row sizes: 64 B (fp32, D=16),
  20 B (INT8: 16 B + fp16 scale and bias) and 12 B (INT4: 8 B + 4 B).

Candidates, recbench's FBGEMM lookup path in inference (``no_grad``) on the same batches:
``full`` (``FullEmbedding``: FusedEmbeddingBagCollection, fp32) and ``ptq`` at INT8 and INT4
(``QuantizedTables``: FBGEMM's n-bit TBE, per-row dequantisation, sum pooling), each behind the
id-range guard every recbench embedding module has (``base.check_ids``), which is what lets the
kernels skip FBGEMM's own per-index bounds check (``tables.skip_bounds_check``). The rate is bytes of
rows touched per second (ids x row bytes); each figure is that rate as a fraction of the gather
rate for the same row size and the same ids (target >= 0.8), for Criteo-like Zipf(1.1) ids and for
uniform ids. Rounds interleave gather and lookup.

    python benchmarks/lookup.py                      # tables: Criteo Kaggle cardinalities x 0.2 (~430 MB fp32)
    python benchmarks/lookup.py --scale 0.05 --batches 4

References: J. McCalpin, STREAM benchmark; FBGEMM SplitTableBatchedEmbeddingBagsCodegen and
IntNBitTableBatchedEmbeddingBagsCodegen; recbench.methods.full, recbench.methods.ptq.
"""
from __future__ import annotations

import argparse
import sys
from typing import Dict, List

import torch

from recbench.bench import harness
from recbench.bench.workloads import criteo_batches, criteo_like_tables
from recbench.methods.base import guard_ids
from recbench.methods.full import FullEmbedding
from recbench.methods.ptq import QuantizedTables, row_bytes
from recbench.types import EmbeddingOptimizer

DIM = 16
FORMATS = {"full": 32, "ptq_int8": 8, "ptq_int4": 4}


def stream(megabytes: float, rounds: int, warmup: int, clock=None) -> Dict[str, List[float]]:
    """GB/s samples of STREAM copy and triad (float32 arrays of ``megabytes`` MB each)."""
    n = int(megabytes * 2**20 / 4)
    a, b, c = torch.rand(n), torch.rand(n), torch.rand(n)
    seconds = harness.interleaved({"copy": lambda: b.copy_(a), "triad": lambda: torch.add(b, c, alpha=3.0, out=a)},
                                  rounds, warmup, repeat=3, clock=clock)
    bytes_moved = {"copy": 2 * n * 4, "triad": 3 * n * 4}
    return {k: [bytes_moved[k] / s / 1e9 for s in v] for k, v in seconds.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/lookup.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=float, default=0.2, help="x Criteo Kaggle cardinalities")
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--batches", type=int, default=8, help="distinct batches per round")
    parser.add_argument("--stream-mb", type=float, default=256.0)
    harness.add_common_arguments(parser, rounds=5, warmup=1)
    args = parser.parse_args(argv)
    if args.quick:
        args.scale, args.batches, args.stream_mb, args.rounds = 0.005, 2, 16.0, 2
    clock = harness.setup(args)
    result = harness.BenchResult.start("lookup", argv, args)
    tables = criteo_like_tables(args.scale)
    rows = sum(t.num_embeddings for t in tables)
    offsets = torch.tensor([0] + [t.num_embeddings for t in tables]).cumsum(0)[:-1]

    bandwidth = stream(args.stream_mb, args.rounds, args.warmup, clock=clock)
    result.tables["sequential bandwidth (STREAM-like, one thread)"] = [
        {"kernel": k, "array MB": args.stream_mb, "median GB/s": harness.median(v), "min GB/s": min(v), "max GB/s": max(v)}
        for k, v in bandwidth.items()]

    torch.manual_seed(0)
    full = FullEmbedding(tables, DIM, EmbeddingOptimizer()).eval()
    weights = {t.name: full.fused.weight(t.name).detach() for t in tables}
    modules = {"full": full}
    for name, bits in FORMATS.items():
        if bits < 32:
            modules[name] = guard_ids(QuantizedTables(tables, DIM, {t.name: bits for t in tables}, weights).eval(), tables)
    gather_tables = {bits: torch.randint(0, 255, (rows, row_bytes(DIM, bits)), dtype=torch.uint8) if bits < 32
                     else torch.rand(rows, DIM) for bits in FORMATS.values()}
    summary, parts = [], []
    for distribution in ("zipf", "uniform"):
        batches = criteo_batches(tables, args.batch_size, args.batches, seed=1, distribution=distribution)
        global_ids = [(kjt.values().view(len(tables), -1) + offsets.unsqueeze(1)).reshape(-1) for _, kjt, _ in batches]
        ids_per_round = sum(g.numel() for g in global_ids)
        for name, bits in FORMATS.items():
            module, table = modules[name], gather_tables[bits]

            @torch.no_grad()
            def lookup(module=module):
                for _, kjt, _ in batches:
                    module(kjt)

            @torch.no_grad()
            def gather(table=table):
                for ids in global_ids:
                    torch.index_select(table, 0, ids)

            workloads = {"lookup": lookup, "gather": gather}
            if bits < 32:  # where a dequantising lookup's time goes: the kernel call alone, and zeroing its output
                arguments = [(kjt.values(), kjt.offsets()) for _, kjt, _ in batches]
                workloads["kernel"] = torch.no_grad()(lambda tbe=module.tbe: [tbe(v, o) for v, o in arguments])
                workloads["zero output"] = lambda: [torch.zeros(args.batch_size, len(tables) * DIM) for _ in batches]
            seconds = harness.interleaved(workloads, args.rounds, args.warmup, clock=clock)
            if bits < 32:
                per_batch = {k: harness.median(v) / len(batches) * 1e3 for k, v in seconds.items()}
                parts.append({"format": name, "ids": distribution, "lookup ms/batch": per_batch["lookup"],
                              "FBGEMM kernel call ms/batch": per_batch["kernel"],
                              "zeroing the fp32 output ms/batch": per_batch["zero output"],
                              "gather of the rows ms/batch": per_batch["gather"],
                              "kernel / lookup": per_batch["kernel"] / per_batch["lookup"],
                              "output bytes / row bytes": DIM * 4 / row_bytes(DIM, bits)})
            touched = ids_per_round * row_bytes(DIM, bits)
            rate = {k: [touched / s / 1e9 for s in v] for k, v in seconds.items()}
            label = f"{name} ({row_bytes(DIM, bits)} B rows)"
            figure = result.add(harness.Figure(
                f"{name}_{distribution}", f"{label}, {distribution} ids: FBGEMM forward lookup rate (GB of rows touched "
                f"per second) as a fraction of index_select's random-gather rate on a {table.numel() * table.element_size() / 1e6:,.0f} MB "
                "table with the same ids and row size.",
                harness.Side(f"recbench {name}", rate["lookup"], "GB/s"),
                harness.Side("index_select gather", rate["gather"], "GB/s"), ratio_of="candidate/reference",
                target=">= 0.8"))
            summary.append({"format": name, "row bytes": row_bytes(DIM, bits), "ids": distribution,
                            "lookup GB/s": figure.candidate.median, "gather GB/s": figure.reference.median,
                            "lookup Mrows/s": figure.candidate.median * 1e3 / row_bytes(DIM, bits),
                            "fraction of gather": figure.ratio,
                            "fraction of STREAM copy": figure.candidate.median / harness.median(bandwidth["copy"])})
    result.tables["lookup vs limits"] = summary
    result.tables["dequantising lookups: where the time goes (per batch, CPU time, same rounds)"] = parts
    result.notes.append(
        "A dequantising lookup reads a row of 20 B (INT8) or 12 B (INT4) but writes 64 B of fp32 output per id, and "
        "FBGEMM's CPU n-bit kernel zeroes its whole output before accumulating into it; the gather it is compared "
        "with writes only the row bytes. The table above separates the kernel call from recbench's wrapper (KJT "
        "handling, id guard, KeyedTensor) and shows the zeroing's share.")
    result.settings.update({"rows": rows, "fp32_table_mb": rows * DIM * 4 / 1e6, "dim": DIM, "fields": len(tables),
                            "torch_threads": torch.get_num_threads()})
    result.finish(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
