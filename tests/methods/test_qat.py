"""``qat``: parity of the fake-quantised forward and the straight-through gradients with a port of
LERS's quantiser (chenxing1999/recsys-benchmark ``src/models/embeddings/qat_emb.py`` at 31dc3095),
its initial scale, the deployable FBGEMM rows, the budget solver and bad settings."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recbench.methods.qat import QAT, QATEmbedding, StochasticFakeQuant, pack_codes
from recbench.types import Budget, InfeasibleBudget, TableSpec, full_embedding_bytes

DIM = 16


def lers_qmax_qmin(n_bits):
    return (1 << (n_bits - 1)) - 1, -(1 << (n_bits - 1))


class LersStochasticRounding(torch.autograd.Function):
    """An independent transcription of LERS's ``StotasticRounding`` (the noise ``prob`` is an argument
    so both sides can share it; LERS draws it with ``torch.rand_like``)."""

    @staticmethod
    def forward(ctx, scale, w, n_bits, prob):
        q_w_float = w / scale
        q_max, q_min = lers_qmax_qmin(n_bits)
        q_w = torch.clamp(q_w_float, q_min, q_max)
        q_w_floor = torch.floor(q_w)
        prob_floor = q_w_floor + 1 - q_w
        is_ceil = prob > prob_floor
        q_w = q_w_floor + is_ceil
        ctx.save_for_backward(q_w, q_w_float)
        ctx.n_bits = n_bits
        return q_w * scale

    @staticmethod
    def backward(ctx, grad_output):
        res, q_w = ctx.saved_tensors
        q_max, q_min = lers_qmax_qmin(ctx.n_bits)
        scale_mask = torch.empty_like(grad_output)
        mask1, mask2 = q_w >= q_max, q_w <= q_min
        scale_mask[mask1] = q_max
        scale_mask[mask2] = q_min
        mask3 = torch.logical_and(~mask1, ~mask2)
        scale_mask[mask3] = -(q_w[mask3] - res[mask3])
        # LERS returns the elementwise product; autograd sums it to the scalar scale's shape
        return (grad_output * scale_mask).sum(), grad_output.clone(), None, None


def one_field(rows=300):
    return [TableSpec("item", rows, np.ones(rows, dtype=np.int64))]


def kjt(ids, name="item"):
    ids = torch.as_tensor(ids)
    return KeyedJaggedTensor(keys=[name], values=ids, lengths=torch.ones(len(ids), dtype=torch.int32))


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_fake_quant_forward_and_gradients_match_lers(bits):
    torch.manual_seed(bits)
    scale = torch.tensor(0.3 / (1 << (bits - 1)), requires_grad=True)
    w = (torch.randn(64, DIM) * 0.25).requires_grad_()  # some entries beyond the range: clipped
    prob, upstream = torch.rand(64, DIM), torch.randn(64, DIM)
    q_max, q_min = lers_qmax_qmin(bits)
    ours = StochasticFakeQuant.apply(scale, w, float(q_min), float(q_max), prob)
    (ours * upstream).sum().backward()
    ours_w, ours_s = w.grad.clone(), scale.grad.clone()
    w.grad = scale.grad = None
    ref = LersStochasticRounding.apply(scale, w, bits, prob)
    (ref * upstream).sum().backward()
    assert torch.equal(ours, ref)
    assert torch.equal(ours_w, w.grad) and torch.equal(ours_w, upstream)  # straight through, clipped entries too
    assert torch.allclose(ours_s, scale.grad, rtol=1e-5, atol=1e-6)
    assert ((w.detach() / scale.detach()).abs() > q_max).any()  # the clip branch of the scale gradient ran


@pytest.mark.parametrize("bits", [8, 2])
def test_module_training_forward_is_lers_quantiser_on_the_looked_up_rows(bits):
    m = QAT(bits=bits)
    plan = m.solve(one_field(), DIM, Budget(compression_ratio=1.0))
    torch.manual_seed(0)
    module = m.build(one_field(), DIM, plan).train()
    ids = torch.tensor([3, 7, 3, 250, 0, 7])
    upstream = torch.randn(len(ids), DIM)
    torch.manual_seed(11)
    out = module(kjt(ids)).values()
    (out * upstream).sum().backward()
    grad_w, grad_s = module.weight.grad.to_dense(), module.scale.grad.clone()
    assert module.weight.grad.is_sparse  # no dense gradient of the table

    weight = module.weight.detach().clone().requires_grad_()
    scale = module.scale.detach().clone().requires_grad_()
    torch.manual_seed(11)
    gathered = weight[ids]
    ref = LersStochasticRounding.apply(scale, gathered, bits, torch.rand_like(gathered))
    (ref * upstream).sum().backward()
    assert torch.equal(out, ref)
    assert torch.allclose(grad_w, weight.grad)
    assert torch.allclose(grad_s, scale.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_scale_starts_at_lers_min_max_over_the_xavier_table(bits):
    torch.manual_seed(1)
    module = QAT(bits=bits).build(one_field(), DIM, QAT(bits=bits).solve(one_field(), DIM, Budget(1.0)))
    w = module.weight.detach()
    q_max, q_min = lers_qmax_qmin(bits)
    assert float(module.scale.detach()) == pytest.approx(float((w.max() - w.min()) / (q_max - q_min)), rel=1e-6)
    bound = (6.0 / (300 + DIM)) ** 0.5  # xavier_uniform_ of the (R, D) table
    assert float(w.abs().max()) <= bound and float(w.abs().max()) > 0.9 * bound
    assert module.scale.requires_grad
    fixed = QAT(bits=bits, fixed_scale=True).build(one_field(), DIM, QAT(bits=bits).solve(one_field(), DIM, Budget(1.0)))
    assert not fixed.scale.requires_grad and [g.name for g in fixed.param_groups()] == ["embedding"]


def test_stochastic_rounding_is_unbiased_inside_the_range():
    scale = torch.tensor(0.1)
    w = torch.full((20000, 1), 0.137)
    out = StochasticFakeQuant.apply(scale, w, -128.0, 127.0, torch.rand_like(w))
    assert set(torch.unique(out / scale).round().tolist()) == {1.0, 2.0}
    assert float(out.mean()) == pytest.approx(0.137, abs=2e-3)


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_eval_form_is_the_deployable_fbgemm_table_exactly(bits):
    tables = one_field() + [TableSpec("tag", 40, np.ones(40, dtype=np.int64), pooling="mean", multi_hot=True),
                            TableSpec("tiny", 5, np.ones(5, dtype=np.int64))]
    budget = Budget(compression_ratio=1.0, min_rows_to_compress=10)  # "tiny" stays fp32
    m = QAT(bits=bits)
    plan = m.solve(tables, DIM, budget)
    assert plan.hparams["bits"] == {"item": bits, "tag": bits, "tiny": 32}
    torch.manual_seed(2)
    module = m.build(tables, DIM, plan)
    with torch.no_grad():
        module.scale.mul_(1.7)  # a trained-looking scale
    module.eval()
    features = KeyedJaggedTensor(keys=["item", "tag", "tiny"],
                                 values=torch.tensor([5, 299, 0, 1, 39, 4, 0]),
                                 lengths=torch.tensor([1, 1, 2, 1, 1, 1], dtype=torch.int32))
    deployable = module.to_inference()
    with torch.no_grad():
        a, b = module(features).values(), deployable(features).values()
    assert torch.allclose(a, b, atol=1e-7, rtol=0)
    s16 = module.scale.detach().half().float()
    q_max, q_min = lers_qmax_qmin(bits)
    expected = torch.round(module.weight[[5, 299]].detach() / s16).clamp(q_min, q_max) * s16
    assert torch.equal(a[:, :DIM], expected)
    # the codes are FBGEMM's own layout: its row-wise quantizer gives the same bytes on grid rows
    rows = expected.clone()
    rows[:, 0], rows[:, 1] = q_min * s16, q_max * s16
    fused = torch.ops.fbgemm.FloatToFusedNBitRowwiseQuantizedSBHalf(rows.contiguous(), bits)
    assert torch.equal(fused[:, :-4], pack_codes((rows / s16).round().long() + (1 << (bits - 1)), bits))
    assert m.memory(tables, DIM, plan.hparams).inference_bytes == deployable.weight_bytes()


def test_solver_takes_the_largest_bit_width_within_the_budget():
    tables = one_field(4000)
    full = full_embedding_bytes(tables, DIM)
    m = QAT()
    for ratio, bits in [(0.5, 8), (0.3, 4), (0.15, 2)]:
        plan = m.solve(tables, DIM, Budget(compression_ratio=ratio))
        assert plan.hparams["bits"] == {"item": bits}
        expected = -(-4000 * (DIM * bits // 8 + 4) // 128) * 128  # rows + fp16 scale/bias, 128-byte padding
        assert plan.memory.inference_bytes == expected and plan.memory.compression_ratio == expected / full
    with pytest.raises(InfeasibleBudget):
        m.solve(tables, DIM, Budget(compression_ratio=0.1))  # INT2 on D=16 is 0.125
    assert QAT(levels=[4]).solve(tables, DIM, Budget(compression_ratio=0.5)).hparams["bits"] == {"item": 4}
    with pytest.raises(InfeasibleBudget):
        QAT(bits=8).solve(tables, DIM, Budget(compression_ratio=0.3))


@pytest.mark.parametrize("setting, message", [
    ({"bits": 16}, "bits must be one of auto, 8, 4, 2"),
    ({"levels": [8, 3]}, "levels [8, 3] must be a non-empty subset of [8, 4, 2]"),
    ({"initializer": "kaiming"}, "initializer='kaiming'; allowed: xavier, normal, dlrm"),
    ({"fixed_scale": "yes"}, "fixed_scale must be true or false"),
    ({"storage": "int"}, "storage='int'; allowed: fbgemm, packed"),
])
def test_bad_settings_name_the_field(setting, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        QAT(**setting)
    with pytest.raises(ValueError, match="D=12 must be a multiple of 8"):
        QAT().solve(one_field(), 12, Budget(compression_ratio=0.5))


def test_training_steps_move_rows_and_scale():
    m = QAT(bits=4)
    tables = one_field()
    torch.manual_seed(3)
    module = m.build(tables, DIM, m.solve(tables, DIM, Budget(compression_ratio=1.0))).train()
    groups = {g.name: g for g in module.param_groups()}
    assert groups["embedding"].kind == "sparse" and groups["scale"].kind == "dense"
    sparse = torch.optim.Adagrad(groups["embedding"].params, lr=0.1)
    dense = torch.optim.Adam(groups["scale"].params, lr=1e-3)
    ids = torch.arange(0, 300, 3)
    target = torch.randn(len(ids), DIM) * 0.05
    before_w, before_s = module.weight.detach().clone(), float(module.scale.detach())
    losses = []
    for _ in range(10):
        sparse.zero_grad()
        dense.zero_grad()
        loss = ((module(kjt(ids)).values() - target) ** 2).mean()
        loss.backward()
        sparse.step()
        dense.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0]
    untouched = torch.ones(300, dtype=torch.bool)
    untouched[ids] = False
    assert torch.equal(module.weight.detach()[untouched], before_w[untouched])
    assert float(module.scale.detach()) != before_s


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_packed_storage_holds_the_codes_and_one_scale(bits):
    tables = one_field(1000) + [TableSpec("tiny", 5, np.ones(5, dtype=np.int64))]
    budget = Budget(compression_ratio=1.0, min_rows_to_compress=10)
    m = QAT(bits=bits, storage="packed")
    plan = m.solve(tables, DIM, budget)
    expected = -(-1000 * DIM * bits // 8) + 4 + 5 * DIM * 4  # packed codes + fp32 scale + fp32 kept rows
    assert plan.memory.inference_bytes == expected
    torch.manual_seed(5)
    module = m.build(tables, DIM, plan)
    assert module.memory_report() == m.memory(tables, DIM, plan.hparams)
    module.eval()
    features = KeyedJaggedTensor(keys=["item", "tiny"], values=torch.tensor([0, 999, 17, 4, 0, 2]),
                                 lengths=torch.ones(6, dtype=torch.int32))
    deployable = module.to_inference()
    with torch.no_grad():
        a, b = module(features).values(), deployable(features).values()
    assert torch.equal(a, b)
    s = module.scale.detach()  # fp32, not rounded to fp16
    q_max, q_min = lers_qmax_qmin(bits)
    assert torch.equal(a[:, :DIM], torch.round(module.weight[[0, 999, 17]].detach() / s).clamp(q_min, q_max) * s)
    assert float(deployable.scale) == float(s)
    ratios = {b: QAT(bits=b, storage="packed").solve(one_field(4000), DIM, Budget(1.0)).memory.compression_ratio
              for b in (8, 4, 2)}
    assert ratios[2] < 0.1 < ratios[4]  # packed INT2 reaches ratio 0.1 on D=16 (fbgemm's INT2 is 0.125)
