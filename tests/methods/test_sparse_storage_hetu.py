"""``budget.sparse_index``: the ``hetu`` charging rule of pruned tables against the VLDB 2024
artifact's formula, the non-zeros it allows against ``compact``, and closed form == measured under both."""
from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from recbench.runs.config import compose

from recbench.runs.config import ConfigError
from recbench.runs.settings import settings_of
from recbench.methods.blocks import sparse_storage as ss
from recbench.methods.autosrh import AutoSrh
from recbench.methods.deeplight import DeepLight
from recbench.methods.dsl import DSL
from recbench.methods.pep import PEP
from recbench.types import Budget, EmbeddingOptimizer, TableSpec, full_embedding_bytes
from solve_build import solve_and_build


def hetu_rule(rows: int, dim: int, ratio: Fraction):
    """(format, kept entries) of a pruned (rows, dim) table at ``ratio``, as the artifact computes them.

    Independent of ``sparse_storage``: Hsword/Hetu tools/EmbeddingMemoryCompression
    ``methods/scheduler/switchinference.py`` (``SwitchInferenceTrainer.__init__``, the trainers of
    pep, deeplight, autosrh) at commit a1cb1bcaf236c9f1d452733b105997d50c16c9df: real_dim = r·D;
    CSR with density (real_dim - 1) / 2 / D when real_dim >= 3, else COO with density r / 3; the
    prune rate 1 - density of the rows·D entries (its pruners keep density·rows·D entries).
    """
    real_dim = ratio * dim
    if real_dim >= 3:
        form, density = "csr", (real_dim - 1) / 2 / dim
    else:
        form, density = "coo", ratio / 3
    return form, math.floor(density * rows * dim)


def hetu_words(form: str, rows: int, nnz: int) -> int:
    """Words the artifact's density solves for (fp32 data + int32 indices + one int32 pointer per row)."""
    return 2 * nnz + rows if form == "csr" else 3 * nnz


@pytest.mark.parametrize("rows,dim,ratio", [
    (1000, 16, Fraction(1, 2)), (1000, 16, Fraction(1, 10)), (1000, 16, Fraction(1, 100)),
    (2625, 64, Fraction(1, 10)), (775, 64, Fraction(1, 20)), (1000, 16, Fraction(3, 16)),  # r·D = 3: CSR
    (3159, 16, Fraction(1, 4)), (500, 8, Fraction(1, 1))])
def test_hetu_charge_reproduces_the_artifacts_format_and_entry_count(rows, dim, ratio):
    """Parity with Hetu ``methods/scheduler/switchinference.py`` (commit a1cb1bcaf236c9f1d452733b105997d50c16c9df)."""
    budget_bytes = rows * dim * 4 * ratio
    assert budget_bytes.denominator == 1  # the cases are exact in bytes
    form, nnz = hetu_rule(rows, dim, ratio)
    assert ss.max_nnz_within(rows, dim, int(budget_bytes), "hetu") == nnz
    charged = ss.layout(rows, dim, nnz, "hetu")
    assert charged.format == form and charged.sparse_index == "hetu"
    assert charged.bytes == 4 * hetu_words(form, rows, nnz) <= budget_bytes
    assert ss.stored_bytes(rows, dim, nnz + 1, "hetu") > budget_bytes


def test_hetu_breakdown_by_hand():
    # 1000 x 16, 700 kept entries: CSR 700 + 700 + 1000 words, COO 3 * 700 words
    assert ss.format_layout("csr", 1000, 16, 700, "hetu").breakdown == {
        "values": 2800, "column_indices": 2800, "row_pointers": 4000}
    assert ss.format_layout("coo", 1000, 16, 700, "hetu").breakdown == {
        "values": 2800, "row_indices": 2800, "column_indices": 2800}
    assert ss.layout(1000, 16, 700, "hetu").format == "coo"  # 8400 < 9600
    assert ss.layout(1000, 16, 1000, "hetu").format == "csr"  # 12000 == 12000: tie goes to CSR
    assert ss.layout(1000, 16, 16000, "hetu").bytes == 4 * 33000  # no dense format: full is charged as CSR


# compact / hetu non-zeros at the same ratio (the "1.7-2x"), on tables where the compact
# indices are narrow (< 65,536 rows) and on a Criteo-sized one (4-byte COO row indices)
FACTORS = {(16, 0.5): 1.872, (16, 0.1): 1.714, (16, 0.01): 1.715,
           (64, 0.5): 1.871, (64, 0.1): 1.748, (64, 0.01): 1.714}
FACTORS_LARGE = {(16, 0.5): 1.857, (16, 0.1): 1.333, (16, 0.01): 1.333,
                 (64, 0.5): 1.871, (64, 0.1): 1.600, (64, 0.01): 1.333}


@pytest.mark.parametrize("dim", [16, 64])
@pytest.mark.parametrize("ratio", [0.5, 0.1, 0.01])
@pytest.mark.parametrize("rows,expected", [(10_000, FACTORS), (1_000_000, FACTORS_LARGE)])
def test_compact_allows_more_nonzeros_than_hetu_at_the_same_ratio(dim, ratio, rows, expected):
    budget_bytes = int(ratio * rows * dim * 4)
    compact, hetu = ss.max_nnz_within(rows, dim, budget_bytes), ss.max_nnz_within(rows, dim, budget_bytes, "hetu")
    assert compact / hetu == pytest.approx(expected[dim, ratio], abs=1e-3)


def test_the_compact_form_is_never_larger_than_the_hetu_charge():
    """The deployable form (compact) stored under ``hetu`` fits the bytes charged for it."""
    for rows, dim in ((1, 1), (7, 3), (40, 24), (300, 16), (70_000, 64)):
        step = max(1, rows * dim // 500)
        for nnz in list(range(0, rows * dim + 1, step)) + [rows * dim]:
            assert ss.stored_bytes(rows, dim, nnz) <= ss.stored_bytes(rows, dim, nnz, "hetu")


def test_a_bad_rule_is_named():
    with pytest.raises(ValueError, match=r"budget.sparse_index='int32'.*allowed: compact, hetu"):
        Budget(compression_ratio=0.1, sparse_index="int32")
    with pytest.raises(ValueError, match=r"budget.sparse_index='csr'.*allowed: compact, hetu"):
        ss.max_nnz_within(10, 4, 100, "csr")
    with pytest.raises(ValueError, match=r"not charged under budget.sparse_index='hetu'; allowed: csr, coo"):
        ss.format_layout("bitmap", 10, 4, 3, "hetu")


def composed(*overrides):
    return compose(list(overrides))


def test_config_default_preset_and_a_bad_value():
    assert settings_of(composed())[0].sparse_index == "compact"
    assert settings_of(composed("experiment=vldb2024_criteo_kaggle"))[0].sparse_index == "hetu"
    with pytest.raises(ConfigError, match=r"budget.sparse_index='int8'.*allowed: compact, hetu"):
        settings_of(composed("budget.sparse_index=int8"))


def counts(rows):
    return np.random.default_rng(rows).integers(1, 100, rows)


TABLES = [TableSpec("a", 900, counts(900)), TableSpec("b", 300, counts(300)), TableSpec("c", 4, counts(4)),
          TableSpec("bag", 96, counts(96), pooling="sum", multi_hot=True)]
DIM = 16
ROWS, KEPT = 1296, 4 * DIM * 4  # compressed rows, bytes of the kept field "c"


@pytest.mark.parametrize("method", [DSL, PEP, DeepLight, AutoSrh], ids=lambda m: m.name)
@pytest.mark.parametrize("rule", ["compact", "hetu"])
@pytest.mark.parametrize("ratio", [0.5, 0.1, 0.01])
def test_closed_form_equals_measured_under_both_rules(method, rule, ratio):
    """memory() == memory_report() (inference bytes and their parts) and the achieved ratio is the
    budget's rule, with a kept field."""
    m = method()
    budget = Budget(compression_ratio=ratio, min_rows_to_compress=10, sparse_index=rule)
    hp = m.solve(TABLES, DIM, budget).hparams
    torch.manual_seed(0)
    module = solve_and_build(m, TABLES, DIM, budget, EmbeddingOptimizer())
    closed, measured = m.memory(TABLES, DIM, hp), module.memory_report()
    assert measured.inference_bytes == closed.inference_bytes
    assert measured.breakdown == closed.breakdown
    charged = ss.layout(ROWS, DIM, hp["nnz"], rule)
    assert closed.inference_bytes == charged.bytes + KEPT
    target = ratio * full_embedding_bytes(TABLES, DIM)
    assert closed.inference_bytes <= target < ss.stored_bytes(ROWS, DIM, hp["nnz"] + 1, rule) + KEPT
    assert hp["sparse_index"] == rule and hp["format"] == charged.format
    stored = sum(t.numel() * t.element_size() for t in module.to_inference().state_dict().values())
    if rule == "compact":
        assert stored == closed.inference_bytes and "stored_bytes" not in hp
    else:  # the deployable form stores compactly, within the charge
        assert stored == hp["stored_bytes"] <= closed.inference_bytes
        assert hp["stored_format"] == ss.layout(ROWS, DIM, hp["nnz"]).format


def test_hetu_keeps_fewer_entries_for_every_pruning_method():
    for method in (DSL, PEP, DeepLight, AutoSrh):
        compact = method().solve(TABLES, DIM, Budget(compression_ratio=0.1)).hparams["nnz"]
        hetu = method().solve(TABLES, DIM, Budget(compression_ratio=0.1, sparse_index="hetu")).hparams["nnz"]
        assert hetu < compact
