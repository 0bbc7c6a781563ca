"""AutoDim against small numpy ports of Hsword/Hetu ``tools/EmbeddingMemoryCompression`` @
a1cb1bcaf236c9f1d452733b105997d50c16c9df: ``methods/layers/autodim.py`` (``AutoDimEmbedding.make_embed``:
the Gumbel-softmax mixture of BN'd projected candidates; ``AutoDimRetrainEmbedding``), and
``methods/scheduler/autodim.py`` (``get_dim_candidates``, ``make_retrain``: argmax of alpha; the
retrain's slices of the searched table); the temperature schedule; the budget step-down; a toy run."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recbench.methods.autodim import (TEMPERATURE_DECAY_PER_SAMPLE, ArchitectureStep, AutoDim,
                                      choose_dims, deployable_bytes, dim_candidates,
                                      field_bytes)
from recbench.models.dlrm import DLRM
from recbench.training.optim import DenseOptimizer
from recbench.training.trainer import Trainer, TrainerConfig
from recbench.types import Budget, EmbeddingOptimizer, TableSpec, full_embedding_bytes
from solve_build import solve_and_build

DIM = 8


def hetu_candidates(embedding_dim):
    """``AutoDimOverallTrainer.get_dim_candidates``."""
    c = [2]
    while c[-1] < embedding_dim:
        c.append(2 * c[-1])
    c[-1] = embedding_dim
    return c


def hetu_make_embed(lookups, weights, biases, alpha, gumbel, multiplier, eps=1e-5):
    """numpy ``AutoDimEmbedding.make_embed``: lookups {d: (bs, nslot, d)}, weights {d: (nslot, d, D)},
    biases {d: (nslot, 1, D)}, alpha (nslot, C); BN on batch statistics (scale 1, shift 0)."""
    middle = []
    for d, lookup in lookups.items():
        x = np.transpose(lookup, (1, 0, 2))                 # (nslot, bs, d)
        x = np.matmul(x, weights[d]) + biases[d]             # (nslot, bs, D)
        x = np.transpose(x, (1, 0, 2))                       # (bs, nslot, D)
        bs, nslot, dim = x.shape
        x = x.reshape(-1, dim)
        x = (x - x.mean(0)) / np.sqrt(x.var(0) + eps)        # batch_normalization_op, training
        middle.append(x.reshape(bs, nslot, dim, 1))
    log_alpha = alpha - np.log(np.exp(alpha).sum(1, keepdims=True))
    w = (log_alpha + gumbel) * multiplier
    p = np.exp(w - w.max(1, keepdims=True))
    p = p / p.sum(1, keepdims=True)
    stacked = np.concatenate(middle, axis=3)                 # (bs, nslot, D, C)
    return np.matmul(stacked, p.reshape(1, nslot, -1, 1)).reshape(bs, nslot, dim)


def hetu_temperature_multiplier(step, batch_size):
    """``AutoDimEmbedding.temperature_updater`` (the constant ``mul_byconst_op`` applies after ``step`` updates)."""
    decay = 0.00005 / 2000 * batch_size
    return 1.0 if step == 0 else 1 / max(0.01, 1 - decay * step)


def tables():
    return [TableSpec("a", 30, np.arange(30)), TableSpec("b", 12, np.arange(12)), TableSpec("c", 50, np.arange(50))]


def one_hot_kjt(ids):
    """ids (B, F) -> a single-id-per-bag KJT over fields a, b, c."""
    ids = np.asarray(ids)
    return KeyedJaggedTensor(keys=["a", "b", "c"], values=torch.from_numpy(ids.T.reshape(-1).copy()),
                             lengths=torch.ones(ids.size, dtype=torch.int32))


def search_module(ratio=1.0, seed=0):
    torch.manual_seed(seed)
    method = AutoDim()
    return method, solve_and_build(method, tables(), DIM, Budget(ratio, min_rows_to_compress=1))


@pytest.mark.parametrize("dim", [4, 8, 10, 16, 32, 64])
def test_candidates_equal_hetu(dim):
    assert dim_candidates(dim) == hetu_candidates(dim)


def test_search_mixture_equals_hetu_make_embed():
    """Train-mode output = Hetu's mixture on the same tables, projections, biases, alpha and Gumbel draw,
    at a temperature after 7 steps of a 64-row batch schedule."""
    _, module = search_module()
    with torch.no_grad():
        for b in module.biases:
            b.normal_()
        module.alpha.normal_()
    gumbel = -torch.empty_like(module.alpha).exponential_().log()
    module.gumbel_noise = lambda: gumbel
    module.temperature_decay, module.temperature_step = TEMPERATURE_DECAY_PER_SAMPLE * 64, torch.tensor(7)
    rng = np.random.default_rng(0)
    ids = np.stack([rng.integers(0, t.num_embeddings, 32) for t in tables()], axis=1)  # (B, F)
    module.train()
    with torch.no_grad():
        out = module(one_hot_kjt(ids)).values().view(32, 3, DIM).numpy()
    starts = np.array([0, 30, 42])
    lookups = {d: module.tables_c[i].detach().numpy()[ids + starts] for i, d in enumerate(module.candidates)}
    weights = {d: module.projections[i].detach().numpy() for i, d in enumerate(module.candidates)}
    biases = {d: module.biases[i].detach().numpy()[:, None, :] for i, d in enumerate(module.candidates)}
    expected = hetu_make_embed(lookups, weights, biases, module.alpha.detach().numpy(), gumbel.numpy(),
                               hetu_temperature_multiplier(7, 64))
    np.testing.assert_allclose(out, expected, atol=2e-5)


def test_temperature_schedule_equals_hetu_and_is_set_from_the_batch_size():
    _, module = search_module()
    context = SimpleNamespace(embedding=module, trainer=SimpleNamespace(config=SimpleNamespace(batch_size=4096)))
    ArchitectureStep().on_stage_start(context)
    for step in (0, 1, 1000, 10 ** 5, 10 ** 7):
        module.temperature_step = torch.tensor(step)
        assert 1 / module.temperature() == pytest.approx(hetu_temperature_multiplier(step, 4096))


def test_choice_is_hetu_argmax_and_retrain_inherits_the_searched_slices():
    """Loose budget: widths = candidates[argmax alpha] (``make_retrain``); the retrain module of field i
    is the rows [offset_i, offset_i + n_i) of that candidate's table, weight[i] and bias[i] (Hetu's
    ``AutoDimRetrainer.try_load_ckpt``), applied as ``linear_op`` (no BatchNorm)."""
    _, module = search_module(seed=1)
    with torch.no_grad():
        module.alpha.normal_()
        for b in module.biases:
            b.normal_()
    alpha = module.alpha.detach().numpy()
    hetu = [module.candidates[int(i)] for i in np.argmax(alpha, axis=1)]
    retrain = module.deployable(fold_batch_norm=False)
    assert [retrain.dims[n] for n in "abc"] == hetu
    rng = np.random.default_rng(1)
    ids = np.stack([rng.integers(0, t.num_embeddings, 16) for t in tables()], axis=1)
    with torch.no_grad():
        out = retrain(one_hot_kjt(ids)).values().view(16, 3, DIM).numpy()
    offset = 0
    for f, t in enumerate(tables()):
        c = module.candidates.index(hetu[f])
        table = module.tables_c[c].detach().numpy()[offset:offset + t.num_embeddings]
        w, b = module.projections[c].detach().numpy()[f], module.biases[c].detach().numpy()[f]
        np.testing.assert_allclose(out[:, f], table[ids[:, f]] @ w + b, atol=1e-6)
        offset += t.num_embeddings
    assert retrain.memory_report().inference_bytes == deployable_bytes(tables(), [], hetu, DIM)


def test_budget_steps_fields_down_cheapest_first_until_they_fit():
    candidates, rows = [2, 4, 8], [1000, 10, 10]
    alpha = np.log(np.array([[0.1, 0.2, 0.7], [0.1, 0.2, 0.7], [0.3, 0.3, 0.4]]))
    loose = choose_dims(alpha, candidates, rows, 8, 10 ** 9)
    assert loose == [2, 2, 2]
    big = field_bytes(1000, 8, 8)
    # one byte short of the argmax: field 0's step 8 -> 4 loses log(0.7/0.2) over 16000 bytes saved, field 2's
    # loses log(0.4/0.3) over 288 bytes: field 0 is the cheaper per byte and steps down alone
    limit = big + 2 * field_bytes(10, 8, 8) - 1
    assert choose_dims(alpha, candidates, rows, 8, limit) == [1, 2, 2]
    tight = sum(field_bytes(n, 2, 8) for n in rows)
    assert choose_dims(alpha, candidates, rows, 8, tight) == [0, 0, 0]
    for limit in range(tight, sum(field_bytes(n, 8, 8) for n in rows), 997):
        chosen = choose_dims(alpha, candidates, rows, 8, limit)
        assert sum(field_bytes(n, candidates[i], 8) for n, i in zip(rows, chosen)) <= limit
        assert all(c <= a for c, a in zip(chosen, loose))


def test_solver_refuses_what_width_two_exceeds_and_caps_the_plan():
    method = AutoDim()
    specs = tables()
    full = full_embedding_bytes(specs, DIM)
    low = deployable_bytes(specs, [], [2, 2, 2], DIM)
    with pytest.raises(Exception, match="reachable range"):
        method.solve(specs, DIM, Budget(0.9 * low / full, min_rows_to_compress=1))
    plan = method.solve(specs, DIM, Budget(0.5, min_rows_to_compress=1))
    assert plan.hparams["cap_bytes"] == int(0.5 * full) and plan.hparams["candidates"] == [2, 4, 8]
    assert AutoDim(candidates=[1, 2, 4, 8]).solve(specs, DIM, Budget(0.5, min_rows_to_compress=1)).hparams["candidates"][0] == 1


def test_bad_settings_are_rejected():
    with pytest.raises(ValueError, match="retrain_init='warm'; allowed: inherit, scratch"):
        AutoDim(retrain_init="warm")
    with pytest.raises(ValueError, match="candidates"):
        AutoDim(candidates=[4, 2])
    with pytest.raises(ValueError, match="temperature_decay"):
        AutoDim(temperature_decay=-1)


class _WatchedStep(ArchitectureStep):
    """Records alpha around each architecture step with a fixed Gumbel draw, and the val batch."""

    def __init__(self):
        super().__init__()
        self.records, self.train_moved_alpha = [], False
        self.last_alpha = None

    def validation_batch(self, context):
        self.batch = super().validation_batch(context)
        return self.batch

    def on_step_end(self, context):
        module = context.embedding
        if context.stage.name != "search":
            return super().on_step_end(context)
        if self.last_alpha is not None and not torch.equal(self.last_alpha, module.alpha.detach()):
            self.train_moved_alpha = True
        gumbel = -torch.empty_like(module.alpha).exponential_().log()
        module.gumbel_noise = lambda: gumbel
        before = module.alpha.detach().clone()
        tables_before = [p.detach().clone() for p in module.tables_c]
        out = super().on_step_end(context)
        after = module.alpha.detach().clone()
        if len(self.records) < 3:  # recompute the validation gradient at the old alpha (BN running stats)
            probe = module.alpha.detach().clone()
            with torch.no_grad():
                module.alpha.copy_(before)
            module.alpha.requires_grad_(True)
            module.alpha_step = True
            model = context.model
            logits = model(self.batch.dense_features, self.batch.sparse_features)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, self.batch.labels)
            (grad,) = torch.autograd.grad(loss, [module.alpha])
            module.alpha_step = False
            module.alpha.requires_grad_(False)
            with torch.no_grad():
                module.alpha.copy_(probe)
            self.records.append((before, after, grad, all(torch.equal(a, b) for a, b in zip(tables_before, module.tables_c))))
        del module.gumbel_noise
        self.last_alpha = module.alpha.detach().clone()
        return out


class _Watched(AutoDim):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.step = _WatchedStep()

    def hooks(self):
        hooks = super().hooks()
        return [h if not isinstance(h, ArchitectureStep) else self.step for h in hooks]


def test_toy_run_searches_alpha_by_sgd_on_validation_batches_then_retrains_within_budget(toy_dataset):
    spec = toy_dataset.spec
    torch.set_num_threads(1)
    torch.manual_seed(0)
    method = _Watched(search_max_epochs=1, retrain_max_epochs=1)
    budget = Budget(0.4)
    model = DLRM(solve_and_build(method, spec.tables, DIM, budget), spec.num_dense, len(spec.tables), DIM, [16, DIM], [16, 1])
    config = TrainerConfig(max_epochs=1, batch_size=64, progress=False, latency_repeats=1)
    result = Trainer(config, model, method, toy_dataset, DenseOptimizer(), EmbeddingOptimizer()).fit()
    watch = method.step
    assert len(watch.records) == 3 and not watch.train_moved_alpha
    for before, after, grad, tables_fixed in watch.records:
        assert tables_fixed  # the architecture step moves alpha only
        torch.testing.assert_close(after, before - 1e-3 * grad, atol=1e-7, rtol=0)
    search = result.stage_results[0]
    assert search["restored_best"] == 1.0 and set(search["dims"]) <= {t.name for t in spec.tables}
    assert search["alpha_max_change"] > 0 and 0 <= search["argmax_changed_fields"] <= len(search["dims"])
    full = full_embedding_bytes(spec.tables, DIM)
    assert result.metrics["emb/bytes_inference"] <= 0.4 * full and result.metrics["test/auc"] > 0.55
