"""``method.quantize``: a table method's deployable tables stored row-wise quantized, budget solved for the pair."""
import numpy as np
import pytest
import torch

from recbench.datasets.batching import make_batch
from recbench.methods.base import InfeasibleBudget
from recbench.methods.blocks.quantized_tables import quantized_bytes, row_error_bound
from recbench.methods.blocks.tables import QuantizedCollection
from recbench.methods.freq_prune import FreqPrune
from recbench.methods.full import Full
from recbench.methods.hashing import Hashing
from recbench.methods.qr import QR
from recbench.methods.unified import Unified
from recbench.types import Budget, EmbeddingOptimizer, TableSpec, full_embedding_bytes

TABLES = [TableSpec("a", 5000), TableSpec("b", 1200), TableSpec("c", 40), TableSpec("d", 300, pooling="mean")]
DIM = 16


def _independent_int8_bytes(rows: int, dim: int) -> int:
    """Per row D int8 values + fp16 scale + fp16 bias; the table padded to 128 bytes (FBGEMM)."""
    raw = rows * (dim + 2 + 2)
    return (raw + 127) // 128 * 128


def test_full_composed_with_int8_reaches_a_budget_full_cannot():
    with pytest.raises(InfeasibleBudget):
        Full().solve(TABLES, DIM, Budget(compression_ratio=0.3))
    plan = Full(quantize="int8").solve(TABLES, DIM, Budget(compression_ratio=0.35))
    expected = sum(_independent_int8_bytes(t.num_embeddings, DIM) for t in TABLES)  # (D + 4) / 4D = 0.3125 + padding
    assert plan.memory.inference_bytes == expected
    assert plan.achieved_ratio == pytest.approx(expected / full_embedding_bytes(TABLES, DIM)) and plan.achieved_ratio <= 0.35
    assert plan.hparams == {"quantize": "int8"}
    with pytest.raises(InfeasibleBudget, match=r"quantize=int8 the smallest solution has ratio 0.31"):
        Full(quantize="int8").solve(TABLES, DIM, Budget(compression_ratio=0.3))


def test_hashing_composed_solves_the_pair_more_rows_for_the_same_bytes():
    budget = Budget(compression_ratio=0.1, min_rows_to_compress=100)
    alone = Hashing().solve(TABLES, DIM, budget)
    pair = Hashing(quantize="int4").solve(TABLES, DIM, budget)
    target = 0.1 * full_embedding_bytes(TABLES, DIM)
    assert pair.memory.inference_bytes <= target and alone.memory.inference_bytes <= target
    assert sum(pair.hparams["rows"].values()) > 4 * sum(alone.hparams["rows"].values())  # int4 rows: 12 B, fp32: 64 B
    rows = {t.name: pair.hparams["rows"].get(t.name, t.num_embeddings) for t in TABLES}
    # the largest pair that fits: one more row in the biggest hashed table would exceed the target
    assert pair.memory.inference_bytes > target - 2 * 128 - (DIM // 2 + 4) * len(TABLES)
    assert pair.memory.inference_bytes == sum((r * (DIM // 2 + 4) + 127) // 128 * 128 for r in rows.values())


@pytest.mark.parametrize("method,ratio", [(Hashing(layout="global", quantize="int8"), 0.05),
                                          (Unified(quantize="int8"), 0.05),
                                          (Hashing(quantize="fp16"), 0.2)])
def test_deployed_tables_hold_the_planned_bytes_and_stay_within_the_stated_error(toy_dataset, method, ratio):
    tables = toy_dataset.spec.tables
    opt = EmbeddingOptimizer()
    plan = method.solve(tables, DIM, Budget(compression_ratio=ratio, min_rows_to_compress=1))
    module = method.build(tables, DIM, plan, opt)
    deployed = module.to_inference()
    stored = [m for m in deployed.modules() if isinstance(m, QuantizedCollection)]
    assert len(stored) == 1
    assert stored[0].weight_bytes() == quantized_bytes(module.fused.physical, {"int8": 8, "fp16": 16}[method.quantize])
    assert module.memory_report().inference_bytes == plan.memory.inference_bytes
    batch = make_batch(toy_dataset.spec, toy_dataset.split("val"), np.arange(64)).sparse_features
    bits = {"int8": 8, "fp16": 16}[method.quantize]
    bound = max(row_error_bound(module.fused.weight(t.name).detach(), bits) for t in module.fused.physical)
    bag = max(int(batch[k].lengths().max()) for k in batch.keys()) * (2 if isinstance(method, Unified) else 1)
    with torch.no_grad():
        error = (module(batch).values() - deployed(batch).values()).abs().max().item()
    assert 0 < error <= bound * bag + 1e-6


def test_freq_prune_keeps_its_remap_in_fp32_bytes_and_quantizes_its_rows():
    rng = np.random.default_rng(0)
    tables = [TableSpec(t.name, t.num_embeddings, counts=rng.zipf(1.3, t.num_embeddings).astype(np.int64), pooling=t.pooling)
              for t in TABLES]
    budget = Budget(compression_ratio=0.15, min_rows_to_compress=1)
    alone = FreqPrune().solve(tables, 8, budget)
    pair = FreqPrune(quantize="int8").solve(tables, 8, budget)
    method = FreqPrune()
    kept = lambda plan: sum(t.rows for t in method.physical_tables(tables, 8, plan.hparams))  # noqa: E731
    assert kept(pair) > kept(alone) and pair.memory.breakdown["remap"] > 0  # more ids kept, still pruned
    assert pair.memory.inference_bytes == pair.memory.breakdown["remap"] + pair.memory.breakdown["weights (int8)"]
    module = FreqPrune(quantize="int8").build(tables, 8, pair, EmbeddingOptimizer())
    assert module.memory_report().inference_bytes == pair.memory.inference_bytes


def test_bad_quantize_values_and_methods_without_plain_tables_are_refused():
    with pytest.raises(ValueError, match=r"quantize='int3'; allowed: none, fp16, int8, int4, int2"):
        Hashing(quantize="int3")
    with pytest.raises(TypeError, match=r"method 'qr' has no setting 'quantize'"):
        QR(quantize="int8")
    with pytest.raises(ValueError, match=r"a 2-bit table needs a dim that is a multiple of 4|multiple of"):
        Unified(quantize="int2", probes=4).solve(TABLES, 8, Budget(compression_ratio=0.1, min_rows_to_compress=100))


def test_the_composition_is_a_config_option_and_alone_keeps_its_config_hash(tmp_path):
    from recbench.runs.config import compose
    from recbench.runs.identity import config_hash

    from omegaconf import OmegaConf

    hashed = lambda *items: config_hash(OmegaConf.to_container(compose(["method=hashing", *items]), resolve=True))  # noqa: E731
    assert hashed() == hashed("method.quantize=none") != hashed("method.quantize=int8")
    int8 = compose(["method=hashing", "method.quantize=int8"])
    assert int8.method.quantize == "int8"


def test_adapt_composed_keeps_its_bitmap_remap_and_quantizes_its_tables(toy_dataset):
    from recbench.methods.adapt import Adapt

    tables = toy_dataset.spec.tables
    budget = Budget(compression_ratio=0.5, min_rows_to_compress=1)
    plan = Adapt(quantize="int8").solve(tables, 8, budget)
    assert plan.memory.inference_bytes == plan.memory.breakdown["remap"] + plan.memory.breakdown["weights (int8)"]
    module = Adapt(quantize="int8").build(tables, 8, plan, EmbeddingOptimizer())
    assert module.memory_report().inference_bytes == plan.memory.inference_bytes
    deployed = module.to_inference()
    assert [m.weight_bytes() for m in deployed.modules() if isinstance(m, QuantizedCollection)] \
        == [plan.memory.breakdown["weights (int8)"]]
