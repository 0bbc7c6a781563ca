"""A tiny planted-signal protocol written through the real storage code (unit tests only).

Kept out of ``conftest.py`` so that Hydra configs can name it as ``toy_protocol.ToyProtocol``
(several ``conftest`` modules exist under tests/, so ``conftest.X`` is ambiguous).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict

import numpy as np
from recbench.runs.config import compose
from omegaconf import OmegaConf

from recbench.datasets.base import DatasetProtocol
from recbench.datasets.storage import CacheWriter, spec_to_manifest, write_split
from recbench.types import DatasetSpec, TableSpec


class ToyProtocol(DatasetProtocol):
    """Random ids with a planted logistic signal; one multi-hot field. Unit tests only."""

    name = "toy"

    def __init__(self, rows: int = 3000, cardinalities=(50, 30, 7), multi_hot_rows: int = 12, seed: int = 0,
                 num_dense: int = 3):
        self.rows, self.cardinalities, self.multi_hot_rows = rows, tuple(cardinalities), multi_hot_rows
        self.seed, self.num_dense = seed, num_dense

    def settings(self) -> Dict[str, Any]:
        return {"rows": self.rows, "cardinalities": list(self.cardinalities), "multi": self.multi_hot_rows,
                "seed": self.seed, "num_dense": self.num_dense}

    def build(self, writer: CacheWriter) -> Dict[str, Any]:
        rng = np.random.default_rng(self.seed)
        n = self.rows
        sparse = np.stack([rng.integers(1, c, n) for c in self.cardinalities], axis=1).astype(np.int32)
        weights = [rng.normal(0, 1.0, c) for c in self.cardinalities]
        lengths = rng.integers(0, 4, n)
        offsets = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        values = rng.integers(1, self.multi_hot_rows, offsets[-1]).astype(np.int32)
        multi_w = rng.normal(0, 0.5, self.multi_hot_rows)
        bag = np.add.reduceat(np.r_[multi_w[values], 0.0], offsets[:-1]) * (lengths > 0)
        dense = rng.normal(0, 1, (n, self.num_dense)).astype(np.float32)
        logit = sum(w[sparse[:, i]] for i, w in enumerate(weights)) + bag + (dense.sum(1) * 0.3 if self.num_dense else 0)
        labels = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.float32)
        cut = [int(n * 0.8), int(n * 0.9)]
        names = [f"f{i}" for i in range(len(self.cardinalities))]
        tables = []
        for i, c in enumerate(self.cardinalities):
            counts = np.bincount(sparse[: cut[0], i], minlength=c).astype(np.int64)
            writer.save(f"counts/{names[i]}.npy", counts)
            tables.append(TableSpec(names[i], c, counts))
        train_values = values[: offsets[cut[0]]]
        writer.save("counts/bag.npy", np.bincount(train_values, minlength=self.multi_hot_rows).astype(np.int64))
        tables.append(TableSpec("bag", self.multi_hot_rows, None, "mean", True))
        for split, (a, b) in zip(("train", "val", "test"), ((0, cut[0]), (cut[0], cut[1]), (cut[1], n))):
            sub_offsets = offsets[a : b + 1] - offsets[a]
            write_split(writer, split, dense[a:b], sparse[a:b], labels[a:b],
                        multi={"bag": (values[offsets[a] : offsets[b]], sub_offsets)})
        spec = DatasetSpec(self.name, self.protocol_id(), self.num_dense, tables,
                           {"train": cut[0], "val": cut[1] - cut[0], "test": n - cut[1]})
        return spec_to_manifest(spec)


#: the tiny protocol as a dataset config, and a composed job config over it (tests of whole jobs)
CONF = str(Path(__file__).resolve().parents[1] / "recbench" / "conf")
TOY = {
    "_target_": "toy_protocol.ToyProtocol",
    "rows": 2000,
    "protocol": {"batch_size": 64, "embedding_dim": 8, "bottom_mlp": [16, 8], "top_mlp": [16, 1],
                 "dense_learning_rate": 0.001, "embedding_learning_rate": 0.1, "max_epochs": 2,
                 "evals_per_epoch": 2, "patience": 3},
}


def toy_cfg(tmp_path, *overrides, tracking="memory"):
    cfg = compose([f"tracking={tracking}", *overrides])
    cfg = OmegaConf.to_container(cfg)
    cfg["dataset"] = dict(TOY)
    cfg["paths"] = {"data_root": str(tmp_path / "data"), "run_root": str(tmp_path / "runs")}
    cfg["trainer"].update({"progress": False, "latency_repeats": 2})
    cfg["runtime"]["num_threads"] = cfg["runtime"].get("num_threads") or 2
    if tracking == "mlflow":
        cfg["tracking"].update({"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db", "artifact_root": str(tmp_path / "art")})
    return OmegaConf.create(cfg)


#: the toy protocol as a sweep's dataset config (``conf/dataset/toy.yaml`` of the sweep tests:
#: tests/cli/test_sweep.py, tests/tracking/test_postgres_server.py)
SWEEP_DATASET = """_target_: toy_protocol.ToyProtocol
rows: 1500
protocol: {batch_size: 128, embedding_dim: 8, bottom_mlp: [8], top_mlp: [8, 1], dense_learning_rate: 0.003,
           embedding_learning_rate: 0.1, max_epochs: 1, evals_per_epoch: 1, patience: 1}
"""


def sweep_preset(seeds: str, reference: bool = True) -> str:
    """A sweep preset over the toy dataset (DLRM): ``hashing`` at ratio 0.5 for ``seeds`` (``"0,1,2"``),
    plus the ``full`` reference point at ratio 1 unless ``reference`` is False (then one grid only)."""
    point = "sweep_preset:\n  reference: {method: full, budget.compression_ratio: 1.0}\n" if reference else ""
    return ("# @package _global_\ndefaults:\n  - override /dataset: toy\n  - override /model: dlrm\n"
            "trainer: {progress: false, latency_repeats: 1}\n" + point +
            f"hydra:\n  sweeper:\n    params:\n      method: hashing\n      budget.compression_ratio: 0.5\n"
            f"      seed: {seeds}\n")
