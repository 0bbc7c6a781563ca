"""One rank of the shard-memory checks (``test_distributed_shards.py``).

Run as ``RANK=r WORLD_SIZE=W MASTER_ADDR=.. MASTER_PORT=.. python shard_ranks.py OUT SHARDING_TYPE...``:
for each sharding type, builds ``full`` over ``TABLES`` as the job does (inside ``building``),
wraps it with that type only and reports (``OUT``, ``torch.save``, one dict per type): the bytes of
the table shards and of the fused optimizer state this rank holds, the bytes its plan places on
it, the bytes of all tables, and, after ``unshard``, a fingerprint of every whole table (rank 0).
The growth of the peak RSS over the first type's build + wrap is reported too (the peak of a
process only grows, so later types are not measured).
"""
from __future__ import annotations

import resource
import sys

import torch

from recbench.methods.full import Full
from recbench.models.dlrm import DLRM
from recbench.types import Budget, EmbeddingOptimizer, TableSpec

DIM = 16
#: 4 x 250k rows x 16 fp32 = 64 MB of weights (+ 4 MB of row-wise Adagrad state)
TABLES = [TableSpec(f"t{i}", 250_000) for i in range(4)]
EMB = EmbeddingOptimizer()


def build(seed: int = 0) -> DLRM:
    """The model a job builds for ``full`` over ``TABLES`` (seeded as ``seed_everything`` does)."""
    torch.manual_seed(seed)
    method = Full()
    embedding = method.build(TABLES, DIM, method.solve(TABLES, DIM, Budget(), EMB), EMB)
    return DLRM(embedding, 2, len(TABLES), DIM, [DIM], [8, 1])


def table_fingerprints(model) -> dict:
    from recbench.training.sharding import fingerprint

    fused = model.embedding.fused
    return {t.name: fingerprint(fused.weight(t.name)) for t in fused.physical}


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main(out: str, *sharding_types: str) -> None:
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    from recbench.training import distributed
    from recbench.training.sharding import local_shard_bytes

    torch.set_num_threads(1)
    reports = {}
    with distributed.session(True) as parallel:
        for sharding_type in sharding_types:
            before = peak_rss_bytes()
            with parallel.building():
                model = build()
            wrapped = parallel.wrap(model, Full(), [sharding_type])
            collection = model.embedding.fused.collection
            state = collection.state_dict()
            reports[sharding_type] = {
                "rss_growth": peak_rss_bytes() - before if not reports else None,
                "total": sum(t.num_embeddings * DIM * 4 for t in TABLES),
                "held": local_shard_bytes(state),
                "optimizer_state": local_shard_bytes(collection.fused_optimizer.state_dict()),
                "planned": sum(4 * m.shard_sizes[0] * m.shard_sizes[1] for value in state.values()
                               if isinstance(value, ShardedTensor) for m in value.metadata().shards_metadata
                               if m.placement.rank() == parallel.rank)}
            del state, collection
            whole = parallel.unshard(wrapped)
            reports[sharding_type]["tables"] = table_fingerprints(whole) if parallel.is_main else None
            del model, wrapped, whole
    torch.save(reports, out)


if __name__ == "__main__":
    main(*sys.argv[1:])
