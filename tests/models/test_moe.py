"""MoE over-arch: conditional computation equals the dense mixture on the selected experts, the
multi-task losses and metrics flow through the one trainer loop, and a gate composes with a
compressed embedding in one job (``method=qr gate=comet``)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from recbench.runs.config import compose
from omegaconf import OmegaConf
from torch.utils.flop_counter import FlopCounterMode
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recbench.runs.job import run_job
from recbench.runs.settings import instantiate_without
from recbench.runs.config import CONFIG_DIR
from recbench.datasets.batching import BatchIterator
from recbench.models.moe import DCNMoE, DLRMMoE, ExpertBank, MixtureOfExpertsArch
from recbench.methods.full import Full
from recbench.tracking.base import InMemoryTracker
from recbench.models.tasks import regression_target, training_loss
from recbench.types import Budget, TableSpec
from solve_build import solve_and_build

GATES = sorted(p.stem for p in (Path(CONFIG_DIR) / "gate").glob("*.yaml"))
FIELDS = ["user", "item"]


def gate_factory(name, *overrides):
    cfg = compose(["model=dlrm_moe", f"gate={name}", *overrides])
    return instantiate_without(cfg.gate, drop=(), _partial_=True)


def kjt(batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    return KeyedJaggedTensor(keys=FIELDS, values=torch.randint(0, 50, (2 * batch,), generator=g),
                             lengths=torch.ones(2 * batch, dtype=torch.int32))


@pytest.mark.parametrize("name", GATES)
def test_conditional_computation_equals_the_dense_mixture_on_the_selected_experts(name):
    torch.manual_seed(0)
    batch, width = 128, 20
    arch = MixtureOfExpertsArch(width, gate_factory(name), num_experts=8, expert_layers=[16, 12],
                                tasks=["click", "rating"], feature_names=FIELDS, embedding_features=2 * 6).eval()
    x, features, embeddings = torch.randn(batch, width), kjt(batch), torch.randn(batch, 2 * 6)
    weights = torch.stack([g(arch.routing(g, x, embeddings), features).weights for g in arch.gates.values()])  # (T, B, E)
    with FlopCounterMode(display=False) as sparse_counter:
        sparse = arch.mix(x, weights, conditional=True)
    dense_outputs = arch.experts.dense(x)  # every expert on every row: (E, B, H)
    expected = torch.einsum("tbe,ebh->tbh", weights, dense_outputs)
    torch.testing.assert_close(sparse, expected, atol=1e-5, rtol=1e-5)
    pairs = int((weights > 0).any(0).sum())
    per_row = 2 * (20 * 16 + 16 * 12)  # expert FLOPs of one row (multiply-add = 2)
    mixing = 2 * 2 * batch * 8 * 12 if pairs == batch * 8 else 0  # a dense gate mixes with one batched einsum
    assert sparse_counter.get_total_flops() == pairs * per_row + mixing
    if name != "softmax":
        assert pairs <= batch * 2 * 2  # two tasks, k = 2 each
    outputs = arch(x, features, embeddings)
    assert set(outputs) == {"click", "rating"} and outputs["click"].shape == (batch,)


def test_sparse_training_path_has_the_dense_gradients():
    torch.manual_seed(0)
    arch = MixtureOfExpertsArch(10, gate_factory("topk", "gate.input=over_arch"), num_experts=6, expert_layers=[8],
                                tasks=["click"]).train()
    assert arch.sparse_training
    x = torch.randn(32, 10)
    weights = torch.softmax(torch.randn(1, 32, 6), -1) * (torch.rand(1, 32, 6) > 0.5)
    grads = []
    for conditional in (True, False):
        arch.zero_grad()
        arch.mix(x, weights, conditional).square().sum().backward()
        grads.append([p.grad.clone() for p in arch.experts.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    comet = MixtureOfExpertsArch(10, gate_factory("comet", "gate.input=over_arch"), 6, [8], ["click"])
    assert not comet.sparse_training  # soft routing in training: all experts computed
    searched = MixtureOfExpertsArch(10, gate_factory("topk", "gate.input=over_arch", "gate.local_search.enabled=true",
                                                     "gate.local_search.steps=2"),
                                    6, [8], ["click"]).train()
    flags = []
    for _ in range(3):
        flags.append(searched.sparse_training)
        searched(x)
    assert flags == [False, False, True]  # dense while the permutation is soft, sparse once it is frozen


def test_expert_bank_matches_independent_linear_towers():
    bank = ExpertBank(3, 5, [4, 2])
    x = torch.randn(7, 5)
    for e in range(3):
        h = x
        for w, b in zip(bank.weights, bank.biases):
            h = torch.relu(h @ w[e] + b[e])
        torch.testing.assert_close(bank.expert(e, x), h)
        torch.testing.assert_close(bank.dense(x)[e], h)


def full_embedding(dim=8):
    tables = [TableSpec("user", 50, None), TableSpec("item", 50, None)]
    return solve_and_build(Full(), tables, dim, Budget(compression_ratio=1.0))


@pytest.mark.parametrize("cls", [DLRMMoE, DCNMoE])
def test_moe_models_replace_the_over_arch_and_report_routing(cls):
    torch.manual_seed(0)
    model = cls(full_embedding(), num_dense=3, num_sparse=2, embedding_dim=8, bottom_mlp=[16, 8], top_mlp=[32, 16, 1],
                gate=gate_factory("comet"), num_experts=4, tasks=["click", "rating"],
                task_loss_weights={"rating": 0.5})
    assert not hasattr(model, "over") and model.task_weights == {"click": 1.0, "rating": 0.5}
    dense, sparse = torch.randn(24, 3), kjt(24)
    outputs = model(dense, sparse)
    assert outputs["click"].shape == (24,) and outputs["rating"].shape == (24,)
    assert model.extra_loss() > 0  # the trees' entropy regularisation, training mode
    stats = model.diagnostics(dense, sparse)
    assert stats["moe/experts_computed_per_sample"] / 24 <= 4
    assert stats["moe/click/nonzeros_per_sample"] / 24 <= 2 and stats["moe/rating/nonzeros_per_sample"] / 24 <= 2
    assert 0 <= stats["moe/click/exactly_sparse_fraction"] <= 24 and stats["moe/flops_per_sample"] > 0
    load = [stats[f"moe/click/load/expert_{e:02d}"] for e in range(4)]
    assert sum(load) == stats["moe/click/nonzeros_per_sample"]
    assert 0 <= stats["moe/click/saturated_fraction"] <= 24  # smooth-step nodes at exactly 0 or 1 (a sum over the batch)
    with pytest.raises(ValueError, match="model.tasks must name 'click'"):
        cls(full_embedding(), 3, 2, 8, [16, 8], [32, 16, 1], gate=gate_factory("softmax"), tasks=["rating"])
    with pytest.raises(ValueError, match="not in model.tasks"):
        cls(full_embedding(), 3, 2, 8, [16, 8], [32, 16, 1], gate=gate_factory("softmax"), task_loss_weights={"ctr": 1})


@pytest.mark.parametrize("cls", [DLRMMoE, DCNMoE])
def test_gates_route_on_the_embeddings_and_train_with_their_own_learning_rate(cls):
    """The COMET reference routes on its bottom's output, the concatenated sparse-field embeddings,
    and trains the gates with Adam at a learning rate from [5e-5, 5e-4]; ``gate.input=over_arch``
    keeps the interaction output as routing input, ``gate.lr=null`` the dense learning rate."""
    from recbench.models.common import ModelParamGroups
    from recbench.training.optim import DenseOptimizer, build_optimizers
    from recbench.types import EmbeddingOptimizer

    torch.manual_seed(0)
    args = dict(num_dense=3, num_sparse=2, embedding_dim=8, bottom_mlp=[16, 8], top_mlp=[32, 16, 1], num_experts=4)
    model = cls(full_embedding(), gate=gate_factory("comet"), **args)
    gate = model.moe.gates["click"]
    assert gate.routing_input == "embeddings" and gate.input_dim == 2 * 8 and gate.learning_rate == 1.6e-4
    dense, sparse = torch.randn(24, 3), kjt(24)
    seen = {}
    gate.register_forward_pre_hook(lambda module, inputs: seen.setdefault("x", inputs[0]))
    model(dense, sparse)
    torch.testing.assert_close(seen["x"], model.embedding(sparse).values())
    optimizers = build_optimizers(model, ModelParamGroups(model), DenseOptimizer(3e-3), EmbeddingOptimizer())
    groups = {g["name"]: g for g in optimizers["dense"].param_groups}
    assert groups["dense"]["lr"] == 3e-3 and groups["gate_lr_0.00016"]["lr"] == 1.6e-4
    assert {id(p) for p in groups["gate_lr_0.00016"]["params"]} == {id(p) for p in gate.parameters()}
    old = cls(full_embedding(), gate=gate_factory("comet", "gate.input=over_arch", "gate.lr=null"), **args)
    assert old.moe.gates["click"].input_dim == old.moe.experts.weights[0].shape[1]
    assert old.dense_param_groups() == []
    named = cls(full_embedding(), gate=gate_factory("dselect_k", "gate.input=[item]"), **args).moe.gates["click"]
    embeddings = model.embedding(sparse).values()
    assert named.input_dim == 8 and torch.equal(named.select(embeddings), embeddings[:, 8:])
    with pytest.raises(ValueError, match="input must be one of"):
        cls(full_embedding(), gate=gate_factory("comet", "gate.input=dense"), **args)
    with pytest.raises(ValueError, match="must list distinct sparse fields"):
        cls(full_embedding(), gate=gate_factory("comet", "gate.input=[movie]"), **args)
    with pytest.raises(ValueError, match="lr must be a positive number"):
        cls(full_embedding(), gate=gate_factory("comet", "gate.lr=0"), **args)


def test_multi_task_loss_is_the_weighted_sum_plus_the_gate_regularisation():
    torch.manual_seed(0)
    model = DLRMMoE(full_embedding(), 3, 2, 8, [16, 8], [16, 1], gate=gate_factory("dselect_k"), num_experts=4,
                    tasks=["click", "rating"], task_loss_weights={"click": 2.0, "rating": 0.25}).train()

    class Batch:
        labels = (torch.rand(24) > 0.5).float()
        targets = {"rating": torch.randint(1, 6, (24,)).float()}

    outputs = model(torch.randn(24, 3), kjt(24))
    loss = training_loss(model, outputs, Batch)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(outputs["click"], Batch.labels)
    mse = torch.nn.functional.mse_loss(outputs["rating"], Batch.targets["rating"])
    torch.testing.assert_close(loss, 2.0 * bce + 0.25 * mse + model.extra_loss())
    assert model.extra_loss() > 0
    Batch.targets = {}
    with pytest.raises(ValueError, match="model task 'rating' has no target in this dataset"):
        regression_target(Batch, "rating")
    # a plain model's tensor output is the click task alone
    torch.testing.assert_close(training_loss(torch.nn.Identity(), outputs["click"], Batch), bce)


RATED = {"_target_": "rated_toy.RatedToyProtocol", "rows": 2000,
         "protocol": {"batch_size": 64, "embedding_dim": 8, "bottom_mlp": [8], "top_mlp": [16, 1],
                      "dense_learning_rate": 0.003, "embedding_learning_rate": 0.1, "max_epochs": 2,
                      "evals_per_epoch": 2, "patience": 3}}


def job_cfg(tmp_path, *overrides):
    cfg = OmegaConf.to_container(compose(["tracking=memory", *overrides]))
    cfg["dataset"] = dict(RATED)
    cfg["paths"] = {"data_root": str(tmp_path / "data"), "run_root": str(tmp_path / "runs")}
    cfg["trainer"].update({"progress": False, "latency_repeats": 2})
    cfg["runtime"]["num_threads"] = 1
    return OmegaConf.create(cfg)


def test_multi_task_job_with_a_compressed_embedding_and_local_search(tmp_path):
    """``method=qr gate=comet gate.local_search.enabled=true``, click + rating, through run_job."""
    cfg = job_cfg(tmp_path, "model=dcn_moe", "model.num_experts=4", "model.tasks=[click,rating]", "method=qr",
                  "budget.compression_ratio=0.5", "gate=comet", "gate.local_search.enabled=true",
                  "gate.local_search.steps=20")
    tracker = InMemoryTracker()
    result = run_job(cfg, tracker)
    run = tracker.current
    assert result.status == "finished", result.reason
    for key in ("val/rating_mse", "test/rating_mse", "test/auc", "infer/flops_per_sample", "train/samples_per_s",
                "moe/experts_computed_per_sample", "moe/click/nonzeros_per_sample", "moe/rating/nonzeros_per_sample",
                "moe/click/exactly_sparse_fraction", "moe/flops_per_sample"):
        assert key in run.metrics, key
    assert run.latest("test/rating_mse") < 2.0  # far below the ~10 of predicting 0 for ratings 1..5
    assert run.latest("moe/click/nonzeros_per_sample") <= 2 and run.latest("moe/experts_computed_per_sample") <= 4
    assert run.tags["gate"] == "comet" and run.tags["gate_local_search"] == "true" and run.tags["method"] == "qr"
    assert "dcn_moe[comet+ls]" in run.name
    # the gate is part of the protocol tag: another gate is another leaderboard protocol
    other = job_cfg(tmp_path, "model=dcn_moe", "model.num_experts=4", "model.tasks=[click,rating]", "method=qr",
                    "budget.compression_ratio=0.5", "gate=topk")
    from recbench.runs.identity import protocol_tag

    resolved = [OmegaConf.to_container(c, resolve=True) for c in (cfg, other)]
    assert protocol_tag("p", resolved[0]) != protocol_tag("p", resolved[1])


def test_trainer_evaluates_every_task_over_the_whole_split(tmp_path):
    from rated_toy import RatedToyProtocol

    from recbench.training.optim import DenseOptimizer
    from recbench.training.trainer import Trainer, TrainerConfig
    from recbench.types import EmbeddingOptimizer

    prepared = RatedToyProtocol().prepare(tmp_path)
    torch.manual_seed(0)
    model = DLRMMoE(solve_and_build(Full(), list(prepared.spec.tables), 8, Budget(1.0)), 1, 2, 8, [8], [16, 1],
                    gate=gate_factory("topk"), num_experts=4, tasks=["click", "rating"])
    trainer = Trainer(TrainerConfig(max_steps=40, batch_size=64, progress=False, latency_repeats=1), model, Full(),
                      prepared, DenseOptimizer(0.01), EmbeddingOptimizer())
    metrics = trainer.evaluate("test")
    labels, outputs, targets = trainer.predict_tasks("test")
    ratings = np.concatenate([b.targets["rating"].numpy() for b in BatchIterator(prepared.spec, prepared.split("test"), 64)])
    np.testing.assert_array_equal(targets["rating"], ratings)
    assert metrics["rating_mse"] == pytest.approx(float(np.mean((outputs["rating"] - ratings) ** 2)), rel=1e-6)
    result = trainer.fit()
    assert result.metrics["test/rating_mse"] < metrics["rating_mse"]  # rating regression trains
    assert all("val/rating_mse" in record for record in result.history)
