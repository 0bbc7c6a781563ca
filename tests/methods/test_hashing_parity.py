"""``hashing`` with ``layout: global``: parity with the VLDB 2024 artifact's ``hash`` embedding,
its closed-form memory and contract, and the VLDB 2024 preset that selects it.

Reference: Hsword/Hetu tools/EmbeddingMemoryCompression at a1cb1bcaf236c9f1d452733b105997d50c16c9df —
models/load_data.py (``process_sparse_feats``: per-field LabelEncoder ids offset by the sizes of the
fields before them), methods/scheduler/hash.py (``use_multi = 0``: one table of ceil(N * r) rows),
methods/layers/hash.py (``mod_hash_op``: row = id mod rows), run_compressed.py (``use_multi`` 0).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from recbench.runs.config import compose
from omegaconf import OmegaConf
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recbench.runs.settings import instantiate_without
from recbench.methods.blocks import hashing_fns as H
from recbench.methods.base import InfeasibleBudget
from recbench.methods.hashing import GLOBAL_TABLE, GlobalHashingEmbedding, Hashing
from recbench.types import Budget, EmbeddingOptimizer, TableSpec
from solve_build import solve_and_build

DIM = 8
TABLES = [TableSpec("a", 1000), TableSpec("b", 400), TableSpec("c", 37), TableSpec("d", 3)]
SGD = EmbeddingOptimizer(kind="sgd", learning_rate=0.5)


def one_hot_kjt(tables, ids):
    return KeyedJaggedTensor(keys=[t.name for t in tables], values=torch.cat(ids),
                             lengths=torch.ones(sum(len(x) for x in ids), dtype=torch.int32))


def hetu_hash_embedding(ids_per_field, sizes, rows, weight):
    """Independent port of the artifact's ``hash`` (use_multi 0): global id = LabelEncoder id + the
    sizes of the fields before it (load_data.py), row = global id % rows (layers/hash.py), then a
    plain lookup. (F lists of (B,) ids) -> (B, F * D)."""
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    out = [weight[(np.asarray(ids) + off) % rows] for ids, off in zip(ids_per_field, offsets)]
    return np.concatenate(out, axis=1)


def global_module(ratio, hash_function="modulo", tables=TABLES, min_rows=0, optimizer=SGD):
    budget = Budget(compression_ratio=ratio, min_rows_to_compress=min_rows)
    method = Hashing(layout="global", hash_function=hash_function)
    return method, method.solve(tables, DIM, budget).hparams, solve_and_build(method, tables, DIM, budget, optimizer)


def test_global_modulo_equals_hetu_hash_embedding_on_fixed_weights():
    _, hp, module = global_module(0.07)
    total = sum(t.num_embeddings for t in TABLES)
    rows = hp["global_rows"]
    # the artifact's M = ceil(0.07 * 1440) = 101 is one row over the target; recbench keeps within it
    assert rows == math.floor(0.07 * total) == math.ceil(0.07 * total) - 1 == 100
    weight = np.random.default_rng(0).standard_normal((rows, DIM)).astype(np.float32)
    with torch.no_grad():
        module.fused.weight(GLOBAL_TABLE).copy_(torch.from_numpy(weight))
    rng = np.random.default_rng(1)
    ids = [rng.integers(0, t.num_embeddings, 64) for t in TABLES]
    expected = hetu_hash_embedding(ids, [t.num_embeddings for t in TABLES], rows, weight)
    got = module(one_hot_kjt(TABLES, [torch.from_numpy(x) for x in ids])).values().detach().numpy()
    np.testing.assert_array_equal(got, expected)
    # the deployable form looks up the same rows
    np.testing.assert_array_equal(module.to_inference()(one_hot_kjt(TABLES, [torch.from_numpy(x) for x in ids]))
                                  .values().detach().numpy(), expected)


def test_global_ids_collide_across_fields_as_in_the_artifact():
    """Two ids of different fields whose global ids are congruent mod M share a row."""
    _, hp, module = global_module(0.1)
    rows = hp["global_rows"]
    # field b's id 0 has global id 1000; field a's id (1000 mod M) lands on the same row
    a_id = 1000 % rows
    kjt = KeyedJaggedTensor(keys=["a", "b", "c", "d"], values=torch.tensor([a_id, 0, 0, 0]),
                            lengths=torch.ones(4, dtype=torch.int32))
    looked_up = module.rows_of(kjt)
    assert int(looked_up[0]) == int(looked_up[1]) == 1000 % rows
    assert int(looked_up[2]) == 1400 % rows and int(looked_up[3]) == 1437 % rows


def test_global_universal_hashes_the_global_ids_with_one_function():
    _, hp, module = global_module(0.1, hash_function="universal")
    rng = np.random.default_rng(2)
    ids = [torch.from_numpy(rng.integers(0, t.num_embeddings, 50)) for t in TABLES]
    a, b = H.draw(0, (1,))
    offsets = [0, 1000, 1400, 1437]
    expected = torch.cat([H.universal(x + off, a, b, hp["global_rows"]) for x, off in zip(ids, offsets)])
    assert torch.equal(module.rows_of(one_hot_kjt(TABLES, ids)), expected)


def test_global_at_full_size_looks_up_the_global_ids_unchanged():
    _, hp, module = global_module(1.0, hash_function="universal")
    assert hp["global_rows"] == 1440 and not module.hashed
    ids = [torch.arange(1000) % t.num_embeddings for t in TABLES]
    offsets = [0, 1000, 1400, 1437]
    assert torch.equal(module.rows_of(one_hot_kjt(TABLES, ids)), torch.cat([x + o for x, o in zip(ids, offsets)]))


@pytest.mark.parametrize("kind", ["sgd", "rowwise_adagrad", "adagrad"])
@pytest.mark.parametrize("ratio,min_rows", [(0.1, 0), (0.5, 0), (0.2, 100)])
def test_global_memory_closed_form_equals_measured(kind, ratio, min_rows):
    optimizer = EmbeddingOptimizer(kind=kind)
    method, hp, module = global_module(ratio, min_rows=min_rows, optimizer=optimizer)
    kept = [t for t in TABLES if t.num_embeddings < min_rows]
    assert hp["kept"] == [t.name for t in kept]
    stored_rows = hp["global_rows"] + sum(t.num_embeddings for t in kept)
    closed = method.memory(TABLES, DIM, hp, optimizer)
    assert closed.inference_bytes == stored_rows * DIM * 4
    assert closed.training_bytes == closed.inference_bytes + stored_rows * optimizer.state_bytes_per_row(DIM)
    measured = module.memory_report()
    assert (measured.inference_bytes, measured.training_bytes, measured.parameters) == \
        (closed.inference_bytes, closed.training_bytes, closed.parameters)
    # M is the largest row count within the target
    full = sum(t.num_embeddings for t in TABLES) * DIM * 4
    assert closed.inference_bytes <= ratio * full < closed.inference_bytes + DIM * 4


def test_global_with_kept_fields_and_mean_bags_matches_its_deployable_form_and_trains():
    tables = [TableSpec("small", 20), TableSpec("big", 3000), TableSpec("bag", 500, pooling="mean", multi_hot=True)]
    _, hp, module = global_module(0.1, tables=tables, min_rows=50)
    assert hp["kept"] == ["small"]
    rng = np.random.default_rng(3)
    lengths = np.concatenate([np.ones(16), np.ones(16), rng.integers(0, 4, 16)]).astype(np.int32)
    values = np.concatenate([rng.integers(0, 20, 16), rng.integers(0, 3000, 16),
                             rng.integers(0, 500, int(lengths[32:].sum()))])
    kjt = KeyedJaggedTensor(keys=["small", "big", "bag"], values=torch.from_numpy(values),
                            lengths=torch.from_numpy(lengths))
    out = module(kjt)
    assert out.keys() == ["small", "big", "bag"] and out.values().shape == (16, 3 * DIM)
    # the mean bag is the mean of its ids' rows of the shared table
    shared = module.fused.weight(GLOBAL_TABLE).detach()
    bag_ids = torch.from_numpy(values[32:])
    rows = (bag_ids + 3000) % hp["global_rows"]
    first = int(lengths[32])
    if first:
        torch.testing.assert_close(out.values()[0, 2 * DIM:], shared[rows[:first]].mean(0))
    torch.testing.assert_close(module.to_inference()(kjt).values(), out.values())
    before = shared.clone()
    (out.values() ** 2).sum().backward()
    assert not torch.equal(before, module.fused.weight(GLOBAL_TABLE).detach())  # the fused optimizer stepped


def test_global_infeasible_only_when_one_shared_row_exceeds_the_budget():
    with pytest.raises(InfeasibleBudget, match="one shared row"):
        Hashing(layout="global").solve([TableSpec("a", 100)], DIM, Budget(compression_ratio=0.001))
    assert Hashing(layout="global").solve([TableSpec("a", 100)], DIM, Budget(compression_ratio=0.01)).hparams["global_rows"] == 1


def test_unknown_layout_is_rejected():
    with pytest.raises(ValueError, match="method 'hashing': layout='shared'; allowed: per_field, global"):
        Hashing(layout="shared")


def compose_config(*overrides):
    return compose(list(overrides))


def test_default_config_keeps_the_per_field_layout():
    cfg = compose_config("method=hashing")
    assert (cfg.method.layout, cfg.method.hash_function, cfg.method.allocation) == ("per_field", "universal", "cap")


@pytest.mark.parametrize("entry", ["experiment=vldb2024_criteo_kaggle", "sweep=vldb2024_criteo_kaggle"])
def test_vldb2024_preset_runs_the_artifacts_hash(entry):
    cfg = compose_config(entry, "method=hashing")
    assert (cfg.method.layout, cfg.method.hash_function) == ("global", "modulo")
    assert cfg.dataset.protocol.embedding_dim == 16 and cfg.dataset.protocol.dense_learning_rate == 0.001
    assert cfg.dataset.split == "dlrm_chunks" and cfg.model.name == "dlrm"
    assert list(cfg.dataset.protocol.bottom_mlp) == [512, 256, 64, 16] and list(cfg.dataset.protocol.top_mlp) == [512, 256, 1]
    method = instantiate_without(cfg.method, drop=())
    assert isinstance(method, Hashing) and method.layout == "global" and method.hash_function == "modulo"
    # a command-line value still wins over the preset
    assert compose_config(entry, "method=hashing", "method.layout=per_field").method.layout == "per_field"


def test_vldb2024_preset_settings_leave_other_methods_alone():
    cfg = compose_config("experiment=vldb2024_criteo_kaggle", "method=qr")
    assert "layout" not in cfg.method
    settings = OmegaConf.to_container(cfg.method_settings)
    assert settings["hashing"] == {"layout": "global", "hash_function": "modulo"}
    assert OmegaConf.to_container(cfg.method) == OmegaConf.to_container(compose_config("method=qr").method)
