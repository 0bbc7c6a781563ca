"""A tiny click + rating protocol (the MovieLens shape: label = rating >= 4, raw rating kept as an
extra target) written through the real storage code, for the multi-task MoE tests."""
from __future__ import annotations

from typing import Any, Dict

import numpy as np

from recbench.datasets.base import DatasetProtocol
from recbench.datasets.storage import CacheWriter, spec_to_manifest, write_split
from recbench.types import DatasetSpec, TableSpec


class RatedToyProtocol(DatasetProtocol):
    """Users x items with planted rating effects; fields ``user``, ``item``; one dense feature."""

    name = "rated_toy"

    def __init__(self, rows: int = 2000, users: int = 40, items: int = 30, seed: int = 0):
        self.rows, self.users, self.items, self.seed = rows, users, items, seed

    def settings(self) -> Dict[str, Any]:
        return {"rows": self.rows, "users": self.users, "items": self.items, "seed": self.seed}

    def build(self, writer: CacheWriter) -> Dict[str, Any]:
        rng = np.random.default_rng(self.seed)
        n = self.rows
        sparse = np.stack([rng.integers(1, self.users, n), rng.integers(1, self.items, n)], axis=1).astype(np.int32)
        dense = rng.normal(0, 1, (n, 1)).astype(np.float32)
        score = 3.4 + rng.normal(0, 0.8, self.users)[sparse[:, 0]] + rng.normal(0, 0.8, self.items)[sparse[:, 1]]
        rating = np.clip(np.rint(score + 0.3 * dense[:, 0] + rng.normal(0, 0.5, n)), 1, 5).astype(np.float32)
        labels = (rating >= 4).astype(np.float32)
        cut = [int(n * 0.8), int(n * 0.9)]
        tables = []
        for i, (name, size) in enumerate((("user", self.users), ("item", self.items))):
            counts = np.bincount(sparse[: cut[0], i], minlength=size).astype(np.int64)
            writer.save(f"counts/{name}.npy", counts)
            tables.append(TableSpec(name, size, counts))
        for split, (a, b) in zip(("train", "val", "test"), ((0, cut[0]), (cut[0], cut[1]), (cut[1], n))):
            write_split(writer, split, dense[a:b], sparse[a:b], labels[a:b], targets={"rating": rating[a:b]})
        spec = DatasetSpec(self.name, self.protocol_id(), 1, tables,
                           {"train": cut[0], "val": cut[1] - cut[0], "test": n - cut[1]}, extra_targets=("rating",))
        return spec_to_manifest(spec)
