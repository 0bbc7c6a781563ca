"""lpt / alpt: integer storage, unbiased stochastic rounding, row-sparse fused updates, the LSQ
step-size gradient (hand-derived), the alternating commit, and the byte accounting."""
import math

import numpy as np
import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recbench.methods.blocks import bit_packing
from recbench.methods.alpt import ALPT
from recbench.methods.base import InfeasibleBudget
from recbench.methods.families.low_precision import LowPrecisionEmbedding, counter_uniform, quantize, stochastic_round
from recbench.methods.lpt import LPT
from recbench.training.optim import DenseOptimizer, build_optimizers
from recbench.types import Budget, EmbeddingOptimizer, TableSpec
from solve_build import solve_and_build

DIM = 16
TABLES = [TableSpec("a", 1000), TableSpec("b", 60, pooling="mean", multi_hot=True)]
SGD = EmbeddingOptimizer(kind="sgd", learning_rate=0.1)


def kjt(a_ids, b_ids=None):
    b_ids = torch.zeros(len(a_ids), dtype=torch.long) if b_ids is None else b_ids
    return KeyedJaggedTensor(keys=["a", "b"], values=torch.cat([a_ids, b_ids]),
                             lengths=torch.ones(len(a_ids) + len(b_ids), dtype=torch.int32))


def lpt_module(bits=8, fixed_range=1.27, optimizer=SGD, tables=TABLES, dim=DIM):
    torch.manual_seed(0)
    return LowPrecisionEmbedding(tables, dim, {t.name: bits for t in tables}, [], learnable=False, granularity="field",
                                 fixed_range=fixed_range, scale_learning_rate=1.0, optimizer=optimizer)


def test_rows_are_stored_only_as_packed_integers():
    for bits in (16, 8, 4, 2):
        m = lpt_module(bits)
        state = m.state_dict()
        codes = state[f"codes_{bits}"]
        assert codes.dtype == torch.uint8 and codes.numel() == 1060 * DIM * bits // 8  # INT4: 2 per byte
        floats = {k: v for k, v in state.items() if v.is_floating_point()}
        assert set(floats) == {"step"} and floats["step"].numel() == 2  # one step per field, no fp32 rows
        q = m.read(torch.arange(1060), m.fields_of(torch.arange(1060)))
        assert q.min() >= -2 ** (bits - 1) and q.max() <= 2 ** (bits - 1) - 1
        out = m.eval()(kjt(torch.arange(5))).to_dict()["a"]
        assert torch.equal(out, m.step[0] * q[:5].float())  # the lookup de-quantizes


def test_counter_noise_is_uniform_and_keyed_by_row_not_by_batch():
    """The rounding noise of entry (r, c) at write t depends on (seed, t, r, c) only: the same
    whether row r is written alone, with other rows, in another order or split across ranks; and
    it is uniform on [0, 1) and uncorrelated across writes, columns and neighbouring rows."""
    seed, t = torch.tensor(7), torch.tensor(3)
    rows = torch.arange(200_000)
    u = counter_uniform(seed, t, rows, 8)
    assert u.shape == (200_000, 8) and u.dtype == torch.float32
    assert 0.0 <= float(u.min()) and float(u.max()) < 1.0
    assert torch.equal(u * 2 ** 24, torch.floor(u * 2 ** 24))  # multiples of 2^-24, exact in fp32
    flat = u.flatten()
    sem = (1 / 12 / flat.numel()) ** 0.5
    assert abs(float(flat.mean()) - 0.5) < 5 * sem
    deciles = torch.histc(flat, bins=10, min=0.0, max=1.0) / flat.numel()
    assert torch.all((deciles - 0.1).abs() < 0.003)
    other_write = counter_uniform(seed, t + 1, rows, 8).flatten()
    other_seed = counter_uniform(torch.tensor(8), t, rows, 8).flatten()
    for a, b in ((flat, other_write), (flat, other_seed), (u[:, 0], u[:, 1]), (u[:-1, 0], u[1:, 0])):
        assert abs(float(torch.corrcoef(torch.stack([a, b]))[0, 1])) < 0.01
    subset = torch.tensor([199_999, 5, 123_456, 5])  # any subset, any order, repeated
    assert torch.equal(counter_uniform(seed, t, subset, 8), u[subset])
    halves = [counter_uniform(seed, t, part, 8) for part in rows[:1000].chunk(2)]  # "two ranks"
    assert torch.equal(torch.cat(halves), u[:1000])


def test_stochastic_rounding_with_counter_noise_is_unbiased():
    x = torch.tensor([0.1, 0.5, 2.3, -1.7, -0.02, 7.0]).expand(100_000, -1)
    u = counter_uniform(torch.tensor(1), torch.tensor(0), torch.arange(100_000), 6)
    draws = stochastic_round(x, u)
    frac = x[0] - torch.floor(x[0])
    sem = torch.sqrt(frac * (1 - frac) / draws.shape[0])
    assert torch.all((draws.mean(0) - x[0]).abs() <= 5 * sem + 1e-6)


def test_stochastic_rounding_is_unbiased():
    torch.manual_seed(1234)
    x = torch.tensor([0.1, 0.5, 2.3, -1.7, -0.02, 7.0])
    draws = stochastic_round(x.expand(200_000, -1))
    assert set(torch.unique(draws - torch.floor(x)).tolist()) <= {0.0, 1.0}
    frac = x - torch.floor(x)
    sem = torch.sqrt(frac * (1 - frac) / draws.shape[0])  # std of the mean of a Bernoulli(frac)
    assert torch.all((draws.mean(0) - x).abs() <= 5 * sem + 1e-6)
    nearest = torch.round(x)
    assert (nearest - x).abs().max() > 0.29  # round-to-nearest would be biased by up to 0.5


def test_small_updates_survive_in_expectation():
    """Updates of a tenth of a step: nearest rounding would drop every one of them; stochastic
    rounding moves the rows by lr * g on average."""
    step = 1 / 64
    m = lpt_module(bits=8, fixed_range=127 * step, tables=[TableSpec("a", 2000)], dim=DIM).train()
    before = m.read(torch.arange(2000), torch.zeros(2000, dtype=torch.long)).float() * step
    torch.manual_seed(7)
    lr_g, steps = 0.1 * step, 20
    for _ in range(steps):
        out = m(KeyedJaggedTensor(keys=["a"], values=torch.arange(2000), lengths=torch.ones(2000, dtype=torch.int32)))
        (out.values() * (lr_g / SGD.learning_rate)).sum().backward()  # gradient lr_g / lr on every element
    after = m.read(torch.arange(2000), torch.zeros(2000, dtype=torch.long)).float() * step
    change = (after - before).mean()
    per_element_sd = step * math.sqrt(steps * 0.25)
    assert abs(float(change) + steps * lr_g) < 5 * per_element_sd / math.sqrt(2000 * DIM)


def test_backward_updates_only_the_touched_rows_with_the_optimizer_rule():
    opt = EmbeddingOptimizer(kind="rowwise_adagrad", learning_rate=0.05)
    m = lpt_module(bits=16, fixed_range=1.0, optimizer=opt).train()
    before = m.read(torch.arange(1060), m.fields_of(torch.arange(1060))).clone()
    ids = torch.tensor([3, 3, 10])
    out = m(kjt(ids)).values()
    weights = torch.randn_like(out)
    (out * weights).sum().backward()
    after = m.read(torch.arange(1060), m.fields_of(torch.arange(1060)))
    changed = (after != before).any(1).nonzero().flatten().tolist()
    assert set(changed) <= {3, 10, 1000} and {3, 10} <= set(changed)  # row 0 of field b is row 1000
    grad3 = weights[0, :DIM] + weights[1, :DIM]  # row 3 appears twice: gradients summed
    state = m.optimizer_state
    assert torch.allclose(state[3, 0], (grad3 ** 2).mean(), rtol=1e-5)
    assert int((state[:, 0] != 0).sum()) == 3
    step = float(m.step[0])
    expected = before[3].float() * step - 0.05 * grad3 / (state[3, 0].sqrt() + opt.eps)
    assert torch.all((after[3].float() * step - expected).abs() <= step + 1e-6)  # within one rounding step


def alpt_module(granularity):
    torch.manual_seed(0)
    tables = [TableSpec("a", 3)]
    m = LowPrecisionEmbedding(tables, 4, {"a": 8}, [], learnable=True, granularity=granularity, fixed_range=1.0,
                              scale_learning_rate=0.01, optimizer=EmbeddingOptimizer(kind="sgd", learning_rate=0.01))
    with torch.no_grad():
        m.step.fill_(0.125)
        q = torch.tensor([[8, -4, 127, -128], [1, 2, 3, 4], [0, 0, 0, 0]], dtype=torch.float32)
        m._write(torch.arange(3), torch.zeros(3, dtype=torch.long), q * 0.125, torch.full((3, 1), 0.125))
    return m


@pytest.mark.parametrize("granularity", ["field", "row"])
def test_alpt_step_gradient_is_the_lsq_estimate_at_the_updated_rows(granularity):
    """Hand-derived: w = 0.125 q = [1, -0.5, 15.875, -16]; G = c = [3, 2, -1, 1]; w' = w - 0.01 G =
    [0.97, -0.52, 15.885, -16.01]; v = w' / 0.125 = [7.76, -4.16, 127.08, -128.08];
    dQ/dDelta = [round(v) - v, round(v) - v, Q_P, -Q_N] = [0.24, 0.16, 127, -128];
    dL/dDelta = sum G * dQ/dDelta = 0.72 + 0.32 - 127 - 128 = -253.96, times 1 / sqrt(N Q_P), N = 4."""
    m = alpt_module(granularity).train()
    assert torch.equal(m.read(torch.arange(1), torch.zeros(1, dtype=torch.long))[0], torch.tensor([8, -4, 127, -128]))
    out = m(KeyedJaggedTensor(keys=["a"], values=torch.tensor([0]), lengths=torch.ones(1, dtype=torch.int32)))
    (out.values() * torch.tensor([3.0, 2.0, -1.0, 1.0])).sum().backward()
    expected = -253.96 / math.sqrt(4 * 127)
    grad = m.step.grad
    if granularity == "row":
        assert grad.is_sparse  # row-sparse: no dense gradient of the per-row step table
        grad = grad.to_dense()
        assert grad[1:].abs().sum() == 0
    assert abs(float(grad.reshape(-1)[0]) - expected) < 1e-4


def test_alpt_rows_are_rounded_with_the_updated_step_size():
    m = alpt_module("field").train()
    embedding = m
    optimizers = build_optimizers(torch.nn.ModuleDict({"embedding": m}), embedding, DenseOptimizer(1e-3), SGD)
    out = m(KeyedJaggedTensor(keys=["a"], values=torch.tensor([1]), lengths=torch.ones(1, dtype=torch.int32)))
    (out.values() * torch.tensor([3.0, 2.0, -1.0, 1.0])).sum().backward()
    updated = m._pending[2].clone()
    before = m.read(torch.arange(3), torch.zeros(3, dtype=torch.long)).clone()
    assert torch.equal(before[1], torch.tensor([1, 2, 3, 4]))  # not written until the step sizes moved
    for opt in optimizers.values():
        opt.step()
    new_step = float(m.step.detach()[0])
    assert new_step != 0.125 and optimizers["dense"].param_groups[-1]["lr"] == 0.01  # its own learning rate
    for hook in ALPT().hooks():
        hook.on_step_end(type("Context", (), {"embedding": m})())
    q = m.read(torch.arange(3), torch.zeros(3, dtype=torch.long))
    v = updated[0] / new_step
    assert torch.all((q[1].float() >= torch.floor(v)) & (q[1].float() <= torch.ceil(v)))
    assert torch.equal(q[0], before[0]) and torch.equal(q[2], before[2])


def test_lpt_budget_mixes_int16_and_int8_and_stops_at_int8():
    tables = [TableSpec("a", 5000), TableSpec("b", 1200), TableSpec("c", 30)]
    hp = LPT().solve(tables, DIM, Budget(compression_ratio=0.5)).hparams
    assert set(hp["bits"].values()) == {16, 8}
    ratio = LPT().memory(tables, DIM, hp).compression_ratio
    assert 0.45 <= ratio <= 0.5
    with pytest.raises(InfeasibleBudget) as info:
        LPT().solve(tables, DIM, Budget(compression_ratio=0.1))
    assert abs(info.value.min_ratio - 0.25) < 1e-3 and abs(info.value.max_ratio - 0.5) < 1e-3


def test_alpt_bytes_count_int4_two_per_byte_and_the_step_sizes():
    tables = [TableSpec("a", 5000), TableSpec("b", 1200)]
    per_row = ALPT(bits=4, granularity="row")
    hp = per_row.solve(tables, DIM, Budget(compression_ratio=0.19)).hparams
    assert per_row.memory(tables, DIM, hp).inference_bytes == 6200 * (DIM // 2 + 4)
    per_field = ALPT(bits=4, granularity="field")
    hp = per_field.solve(tables, DIM, Budget(compression_ratio=0.13)).hparams
    assert per_field.memory(tables, DIM, hp).inference_bytes == 6200 * DIM // 2 + 2 * 4
    module = solve_and_build(per_field, tables, DIM, Budget(compression_ratio=0.13), SGD)
    assert module.memory_report().inference_bytes == 6200 * DIM // 2 + 2 * 4


def test_bad_settings_name_the_allowed_values():
    with pytest.raises(ValueError, match="granularity"):
        ALPT(granularity="column")
    with pytest.raises(ValueError, match="bits"):
        LPT(bits=3)
    with pytest.raises(ValueError, match="levels"):
        LPT(levels=[12])
