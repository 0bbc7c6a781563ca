"""Each rank materialises only its own table shards: the seeded per-block initialisation
(``tables.seeded_uniform``) gives every part of a table the values one process draws, tables built
inside ``tables_on_meta`` hold no memory, and on 2 gloo ranks (``shard_ranks.py``) each rank holds its
plan's share of the tables (weights, fused optimizer state, peak RSS), and the tables gathered on
rank 0 after training equal one process's, bit for bit.

Measured (4 x 250k x 16 fp32 tables, 64 MB + 4 MB of row-wise Adagrad state; 2 ranks, table-wise
or column-wise): each rank holds 32 MB of table shards and 2 MB of optimizer state. Peak RSS growth
over build + wrap, measured apart in fresh processes with 4 x 500k x 16 tables (128 MB + 8 MB):
one process +141 MB; 2 ranks +78 MB each (+246 MB on rank 0 once it has gathered the whole tables,
+79 MB on rank 1); ranks that build the whole model and copy it into their shards: +341 MB each
(+473 MB each after gathering the tables on every rank). Training, evaluation and resume through meta-built tables are compared with one
process in ``test_distributed_stages.py`` and ``test_distributed_batch_methods.py``.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import multistage_ranks
import shard_ranks
from recbench.methods.blocks import tables
from recbench.methods.blocks.tables import FusedTables, PhysicalTable, seeded_uniform, tables_on_meta
from recbench.training.sharding import fingerprint
from recbench.types import EmbeddingOptimizer

SHARDING_TYPES = ("table_wise", "column_wise")


def test_every_split_of_a_table_draws_the_values_of_the_whole(monkeypatch):
    monkeypatch.setattr(tables, "INIT_BLOCK_ROWS", 7)  # several blocks, shards across block edges
    rows, dim, bound = 30, 8, 0.25
    whole = torch.empty(rows, dim)
    seeded_uniform(whole, 5, "t", rows, dim, bound)
    assert float(whole.abs().max()) <= bound and len(whole.unique()) == rows * dim
    for row_cuts in ([0, 11, 30], [0, 7, 14, 30], [0, 1, 29, 30]):
        for col_cuts in ([0, 8], [0, 4, 8], [0, 4, 6, 8]):
            for r0, r1 in zip(row_cuts, row_cuts[1:]):
                for c0, c1 in zip(col_cuts, col_cuts[1:]):
                    part = torch.empty(r1 - r0, c1 - c0)
                    seeded_uniform(part, 5, "t", rows, dim, bound, r0, c0)
                    torch.testing.assert_close(part, whole[r0:r1, c0:c1], rtol=0, atol=0)
    for seed, name in ((6, "t"), (5, "u")):  # another table or seed: other values
        other = torch.empty(rows, dim)
        seeded_uniform(other, seed, name, rows, dim, bound)
        assert not torch.equal(other, whole)


def test_tables_built_on_meta_hold_nothing_and_materialise_as_one_process():
    physical = [PhysicalTable("a", 100, 8, ["a"]), PhysicalTable("b", 3, 4, ["b"])]
    torch.manual_seed(3)
    whole = FusedTables(physical, EmbeddingOptimizer())
    after_whole = torch.get_rng_state()
    torch.manual_seed(3)
    with tables_on_meta():
        deferred = FusedTables(physical, EmbeddingOptimizer())
        kept = FusedTables(physical, EmbeddingOptimizer(), seed_init=False)  # its owner writes it: built whole
    assert deferred.on_meta and not kept.on_meta
    assert all(p.device.type == "meta" for p in deferred.collection.parameters())
    assert deferred.weight_bytes() == whole.weight_bytes() == (100 * 8 + 3 * 4) * 4
    torch.manual_seed(3)
    FusedTables(physical, EmbeddingOptimizer())
    assert torch.equal(torch.get_rng_state(), after_whole)  # the build draws the same (one seed) either way
    assert deferred.init_seed == whole.init_seed
    for t in physical:  # read before sharding (a method's own init): whole tables, one process's values
        assert torch.equal(deferred.weight(t.name), whole.weight(t.name))
    assert not deferred.on_meta


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Per-rank reports of one 2-process gloo job over both sharding types (~35-45 s on 2 shared
    cores: the tests using it are marked slow; the default suite trains meta-built tables on 2 ranks
    in ``test_distributed_stages.py``)."""
    reports = multistage_ranks.run_ranks(None, tmp_path_factory.mktemp("shards"), SHARDING_TYPES,
                                         script=Path(shard_ranks.__file__))
    for rank, report in enumerate(reports):
        for sharding_type in SHARDING_TYPES:
            r = report[sharding_type]
            print(f"rank {rank} {sharding_type}: tables {r['held'] / 2 ** 20:.1f} of {r['total'] / 2 ** 20:.1f} MB, "
                  f"fused optimizer state {r['optimizer_state'] / 2 ** 20:.2f} MB"
                  + (f", peak RSS +{r['rss_growth'] / 2 ** 20:.1f} MB" if r["rss_growth"] is not None else ""))
    return reports


@pytest.mark.slow
@pytest.mark.parametrize("sharding_type", SHARDING_TYPES)
def test_each_rank_holds_its_plan_share_of_the_tables(two_ranks, sharding_type):
    reports = [r[sharding_type] for r in two_ranks]
    total = reports[0]["total"]
    one_process_state = sum(t.num_embeddings * 4 for t in shard_ranks.TABLES)  # row-wise Adagrad: 1 float a row
    assert sum(r["held"] for r in reports) == total
    for r in reports:
        assert r["held"] == r["planned"] and r["held"] <= 0.5 * total  # 2 equal tables per rank, or half the columns
        assert 0 < r["optimizer_state"] <= one_process_state


@pytest.mark.slow
def test_peak_memory_of_a_rank_is_its_share_not_the_whole_model(two_ranks):
    """Build + wrap grows a rank's peak RSS by its shards (+ a block of the init and TorchRec's
    buffers): well below the whole tables, which one process holds (and which every rank held,
    twice, when ranks built the whole model and copied it into their shards)."""
    total = two_ranks[0]["table_wise"]["total"]
    for report in two_ranks:
        r = report["table_wise"]
        assert r["rss_growth"] < 0.8 * total, r["rss_growth"]  # (no lower bound: freed pages below the peak are reused)


@pytest.mark.slow
@pytest.mark.parametrize("sharding_type", SHARDING_TYPES)
def test_tables_gathered_on_rank_zero_are_one_process_tables(two_ranks, sharding_type):
    single = shard_ranks.table_fingerprints(shard_ranks.build())
    assert two_ranks[0][sharding_type]["tables"] == single
    assert two_ranks[1][sharding_type]["tables"] is None  # only rank 0 holds the whole tables
    assert fingerprint(single) != fingerprint(shard_ranks.table_fingerprints(shard_ranks.build(seed=1)))
