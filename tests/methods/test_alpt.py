"""alpt against its reference, Hsword/Hetu ``tools/EmbeddingMemoryCompression`` (commit
a1cb1bcaf236c9f1d452733b105997d50c16c9df): the step-size gradient scale 1 / sqrt(B D Q_P) of
``methods/scheduler/alpt.py``, the step sizes' own optimizer (the run's optimizer class, Adam, at
``scale_lr`` 2e-5 from ``run_compressed.py``) and ``init_scale`` 0.01 (``methods/layers/alpt.py``)."""
import math

import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recbench.methods.alpt import ALPT
from recbench.training.optim import DenseOptimizer, build_optimizers
from recbench.types import Budget, EmbeddingOptimizer, TableSpec
from solve_build import solve_and_build

DIM = 4
TABLES = [TableSpec("a", 50), TableSpec("b", 20)]
SGD = EmbeddingOptimizer(kind="sgd", learning_rate=0.05)


def batch(a_ids, b_ids):
    return KeyedJaggedTensor(keys=["a", "b"], values=torch.tensor(a_ids + b_ids),
                             lengths=torch.ones(len(a_ids) + len(b_ids), dtype=torch.int32))


def hetu_step_gradient(rows_before, step, grad, lr, q_n, q_p, batch_size, dim):
    """Independent port of Hetu's ALPT step-size gradient (``methods/scheduler/alpt.py``
    ``get_eval_nodes`` + ``ALPTRoundingOp.gradient`` + ``lsq_rounding_gradient_kernel``, commit
    a1cb1bcaf236c9f1d452733b105997d50c16c9df), for a loss linear in the embeddings (so the second
    forward's gradient equals the first's): per unique row, updated rows w' = w - lr G (SGD),
    v = w' / Delta, d round(v)/dDelta = round(v) - v inside (-Q_N, Q_P), the bound outside, summed
    over D against G, times ``scale_factor = 1 / sqrt(batch_size * embedding_dim * (2^(digit-1) - 1))``."""
    updated = rows_before - lr * grad
    v = updated / step
    lsq = torch.where(v >= q_p, torch.full_like(v, float(q_p)),
                      torch.where(v <= -q_n, torch.full_like(v, float(-q_n)), torch.floor(v + 0.5) - v))
    return (grad * lsq).sum(1) / math.sqrt(batch_size * dim * q_p)


def test_step_gradient_is_hetus_scaled_lsq_estimate():
    """Fails on the earlier scale 1 / sqrt(D Q_P) (no batch factor): off by sqrt(B) = 2."""
    torch.manual_seed(0)
    method = ALPT(bits=8)
    module = solve_and_build(method, TABLES, DIM, Budget(compression_ratio=0.5), SGD).train()
    a_ids, b_ids = [3, 7, 3, 11], [0, 5, 5, 19]  # B = 4 samples; repeated ids sum their gradients
    rows = torch.tensor(sorted(set(a_ids)) + [50 + i for i in sorted(set(b_ids))])
    fields = module.fields_of(rows)
    before = module.step_of(module.step.detach(), rows, fields) * module.read(rows, fields).float()
    weights = torch.linspace(-2.0, 2.0, 2 * DIM)  # a loss linear in the (B, F * D) output
    out = module(batch(a_ids, b_ids)).values()
    (out * weights).sum().backward()
    # G of each unique row: the loss weights of its field, times its number of occurrences
    counts = torch.tensor([a_ids.count(i) for i in sorted(set(a_ids))] + [b_ids.count(i) for i in sorted(set(b_ids))])
    field_weights = torch.stack([weights[:DIM] if f == 0 else weights[DIM:] for f in fields.tolist()])
    grad = field_weights * counts.unsqueeze(1).float()
    step = module.step_of(module.step.detach(), rows, fields)
    expected = hetu_step_gradient(before, step, grad, SGD.learning_rate, 128, 127, batch_size=4, dim=DIM)
    got = module.step.grad.to_dense()[rows, 0]
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-9)
    untouched = torch.ones(70, dtype=torch.bool)
    untouched[rows] = False
    assert module.step.grad.to_dense()[untouched].abs().sum() == 0
    # the earlier rule, kept as gradient_scale=rows: sqrt(B) = 2 times larger
    torch.manual_seed(0)
    rows_module = solve_and_build(ALPT(bits=8, gradient_scale="rows"), TABLES, DIM, Budget(compression_ratio=0.5), SGD).train()
    (rows_module(batch(a_ids, b_ids)).values() * weights).sum().backward()
    assert torch.allclose(rows_module.step.grad.to_dense()[rows, 0], 2.0 * expected, rtol=1e-5, atol=1e-9)


def test_step_sizes_start_at_init_scale_and_train_with_sparse_adam_at_scale_lr():
    """Hetu: ``scale = constant(init_scale=0.01)`` per row; ``scale_opt = type(self.opt)(learning_rate=
    scale_lr=2e-5)`` with the sparse update op (Adam in the paper and the benchmark's runs)."""
    module = solve_and_build(ALPT(), TABLES, DIM, Budget(compression_ratio=0.5), SGD)
    assert module.step.shape == (70, 1) and torch.all(module.step == 0.01)
    (group,) = [g for g in module.param_groups() if g.name == "step_sizes"]
    assert group.kind == "sparse" and group.optimizer == "sparse_adam" and group.learning_rate == 2e-5
    optimizers = build_optimizers(torch.nn.ModuleDict({"embedding": module}), module, DenseOptimizer(1e-3), SGD)
    (adam,) = [o for o in optimizers.values() if any(p is module.step for g in o.param_groups for p in g["params"])]
    assert isinstance(adam, torch.optim.SparseAdam) and adam.param_groups[0]["lr"] == 2e-5
    # one step moves every touched row's step size by lr (Adam's first step is lr * sign(g))
    module.train()
    (module(batch([1, 2], [3, 4])).values() * torch.linspace(-1.0, 1.0, 2 * DIM)).sum().backward()
    before = module.step.detach().clone()
    adam.step()
    moved = (module.step.detach() - before).abs().flatten()
    touched = moved > 0
    assert set(touched.nonzero().flatten().tolist()) <= {1, 2, 53, 54}
    assert torch.allclose(moved[touched], torch.full_like(moved[touched], 2e-5), rtol=1e-3)
    # the earlier rules stay available by name
    earlier = ALPT(step_init="lsq", gradient_scale="rows", scale_optimizer="adagrad")
    module = solve_and_build(earlier, TABLES, DIM, Budget(compression_ratio=0.5), SGD)
    (group,) = [g for g in module.param_groups() if g.name == "step_sizes"]
    assert group.optimizer is None and not torch.all(module.step == 0.01)


def test_training_bytes_count_adams_two_states_per_step():
    tables = [TableSpec("a", 500), TableSpec("b", 120)]
    for kw, states in (({}, 2), ({"scale_optimizer": "adagrad"}, 1)):
        method = ALPT(**kw)
        hp = method.solve(tables, DIM, Budget(compression_ratio=0.5)).hparams
        closed = method.memory(tables, DIM, hp, SGD)
        measured = solve_and_build(method, tables, DIM, Budget(compression_ratio=0.5), SGD).memory_report()
        assert measured.training_bytes == closed.training_bytes
        other = ALPT(**({"scale_optimizer": "adagrad"} if states == 2 else {}))
        difference = closed.training_bytes - other.memory(tables, DIM, other.solve(tables, DIM, Budget(0.5)).hparams, SGD).training_bytes
        assert difference == (620 * 4 if states == 2 else -620 * 4)


def test_bad_alpt_settings_name_key_and_allowed_values():
    with pytest.raises(ValueError, match="gradient_scale.*batch, rows"):
        ALPT(gradient_scale="sample")
    with pytest.raises(ValueError, match="scale_optimizer.*adam, adagrad"):
        ALPT(scale_optimizer="sgd")
    with pytest.raises(ValueError, match="step_init"):
        ALPT(step_init=-1.0)
    with pytest.raises(ValueError, match="granularity='row'"):
        ALPT(granularity="field", scale_optimizer="adagrad")
