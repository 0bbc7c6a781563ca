"""DeepFM and Wide & Deep (recbench/models/deepfm.py, wdl.py) against an independent computation of
the VLDB 2024 artifact's heads (Hsword/Hetu ``tools/EmbeddingMemoryCompression/models/deepfm.py``
and ``wdl.py``, commit a1cb1bcaf236c9f1d452733b105997d50c16c9df), and every registered method with
both models: one training step on the contract's tables, and whole jobs on the toy protocol.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "methods"))  # the method contract's setup
from test_contract import METHODS, built, random_kjt  # noqa: E402
from test_contract import tables as contract_tables  # noqa: E402,F401  (its module-scoped fixture)

from recbench.models.common import ModelParamGroups  # noqa: E402
from recbench.models.deepfm import DeepFM, fm_second_order  # noqa: E402
from recbench.models.tasks import training_loss  # noqa: E402
from recbench.models.wdl import WideAndDeep  # noqa: E402
from recbench.runs.job import run_job  # noqa: E402
from recbench.tracking.base import InMemoryTracker  # noqa: E402
from recbench.training.optim import DenseOptimizer, build_optimizers  # noqa: E402
from recbench.types import EmbeddingOptimizer  # noqa: E402
from toy_protocol import toy_cfg  # noqa: E402
from torchrec.modules.deepfm import FactorizationMachine  # noqa: E402

DIM = 16  # the contract's embedding_dim
NUM_DENSE = 3
MODELS = {"deepfm": DeepFM, "wdl": WideAndDeep}


@pytest.fixture
def tables(contract_tables):
    return contract_tables


@pytest.fixture(scope="module")
def full_embedding(contract_tables):
    """``full`` on the contract's tables; the tests that use it never train it."""
    return built("full", contract_tables)[2]


def make(model: str, embedding, num_fields: int, num_dense: int = NUM_DENSE, **kwargs):
    return MODELS[model](embedding=embedding, num_dense=num_dense, num_sparse=num_fields, embedding_dim=DIM, **kwargs)


def np_linear(layer: torch.nn.Linear, x: np.ndarray) -> np.ndarray:
    out = x @ layer.weight.detach().double().numpy().T
    return out + layer.bias.detach().double().numpy() if layer.bias is not None else out


def np_mlp(linears, x: np.ndarray) -> np.ndarray:
    """ReLU after every layer but the last (the artifact's ``create_mlp(..., sigmoid_layer=last)``)."""
    for i, layer in enumerate(linears):
        x = np_linear(layer, x)
        if i < len(linears) - 1:
            x = np.maximum(x, 0.0)
    return x


def linears(module):
    return [m for m in module.modules() if isinstance(m, torch.nn.Linear)]


def naive_fm(v: np.ndarray) -> np.ndarray:
    """sum_{i<j} <v_i, v_j> per sample, O(F^2) loops (Rendle 2010, eq. 1's pairwise term)."""
    batch, fields, _ = v.shape
    return np.array([sum(float(v[b, i] @ v[b, j]) for i in range(fields) for j in range(i + 1, fields))
                     for b in range(batch)])


def test_fm_second_order_is_the_pairwise_dot_product_sum():
    latent = torch.randn(6, 7, 5, dtype=torch.float64)
    ours = fm_second_order(latent, FactorizationMachine()).squeeze(1).numpy()
    assert np.allclose(ours, naive_fm(latent.numpy()), atol=1e-10)


def test_deepfm_terms_equal_the_artifacts_head(tables, full_embedding):
    embedding = full_embedding
    model = make("deepfm", embedding, len(tables)).eval()
    kjt, dense = random_kjt(tables, 24, np.random.default_rng(5)), torch.randn(24, NUM_DENSE)
    with torch.no_grad():
        terms = model.interact(model.dense_input(dense), embedding(kjt)).double().numpy()
        logits = model(dense, kjt).double().numpy()
        e = embedding(kjt).values().view(24, len(tables), DIM).double().numpy()
    x = dense.double().numpy()
    dense_first = x @ model.dense_input.linear.weight.detach().double().numpy().T  # Linear(13, 1, bias=False)
    sparse_first = e[:, :, 0].sum(1)  # ht.slice_op(sparse, [0, 0, 0], [-1, -1, 1]) summed over fields
    latent = e[:, :, 1:]
    deep = np_mlp(linears(model.deep), latent.reshape(24, -1))  # (embed_dim - 1) * sparse_slot -> 256 -> 256 -> 1
    assert terms.shape == (24, 4)
    assert np.allclose(terms[:, 0], dense_first[:, 0], atol=1e-5)
    assert np.allclose(terms[:, 1], sparse_first, atol=1e-5)
    assert np.allclose(terms[:, 2], naive_fm(latent), atol=1e-4)
    assert np.allclose(terms[:, 3], deep[:, 0], atol=1e-5)
    assert np.allclose(logits, dense_first[:, 0] + sparse_first + naive_fm(latent) + deep[:, 0], atol=1e-4)
    assert [layer.out_features for layer in linears(model.deep)] == [256, 256, 1]


def test_wdl_wide_is_linear_and_deep_is_the_mlp(tables, full_embedding):
    embedding = full_embedding
    model = make("wdl", embedding, len(tables)).eval()
    kjt, dense = random_kjt(tables, 24, np.random.default_rng(6)), torch.randn(24, NUM_DENSE)
    with torch.no_grad():
        logits = model(dense, kjt).double().numpy()
        e = embedding(kjt).values().double().numpy()
    x = np.concatenate([e, dense.double().numpy()], axis=1)  # concat_op(sparse, dense): raw dense features
    wide = x @ model.wide.weight.detach().double().numpy().T  # no bias
    deep = np_mlp(linears(model.deep), x)
    assert model.wide.bias is None and x.shape[1] == len(tables) * DIM + NUM_DENSE
    assert np.allclose(logits, wide[:, 0] + deep[:, 0], atol=1e-5)
    assert [layer.out_features for layer in linears(model.deep)] == [256, 256, 1]


@pytest.mark.parametrize("model_name", sorted(MODELS))
def test_init_is_xavier_normal_and_leaves_the_embedding_alone(model_name, tables):
    _, _, embedding = built("dhe", tables)  # a method whose embedding holds nn.Linear layers
    before = {k: v.clone() for k, v in embedding.state_dict().items()}
    torch.manual_seed(0)
    model = make(model_name, embedding, len(tables))
    assert all(torch.equal(before[k], v) for k, v in embedding.state_dict().items())
    first = linears(model.deep)[0]
    fan_out, fan_in = first.weight.shape
    assert float(first.weight.detach().std()) == pytest.approx((2.0 / (fan_in + fan_out)) ** 0.5, rel=0.05)
    assert all(float(layer.bias.detach().abs().sum()) == 0 for layer in linears(model.deep))


@pytest.mark.parametrize("model_name", sorted(MODELS))
@pytest.mark.parametrize("num_dense", [NUM_DENSE, 0])
def test_forward_backward_shapes_and_memo(model_name, num_dense, tables):
    _, _, embedding = built("hashing", tables)
    model = make(model_name, embedding, len(tables), num_dense=num_dense)
    kjt, dense = random_kjt(tables, 32, np.random.default_rng(7)), torch.randn(32, num_dense)
    logits = model(dense, kjt)
    assert logits.shape == (32,) and torch.isfinite(logits).all()
    logits.sum().backward()
    own = [(n, p) for n, p in model.named_parameters() if not n.startswith("embedding.")]
    assert own and all(p.grad is not None and float(p.grad.abs().sum()) > 0 for _, p in own), \
        [n for n, p in own if p.grad is None or float(p.grad.abs().sum()) == 0]
    model.eval()
    with torch.no_grad():  # the search stages' split forward is the forward, bitwise
        assert torch.equal(model.forward_memo(model.memo(dense, kjt)), model(dense, kjt))


@pytest.mark.parametrize("model_name", sorted(MODELS))
def test_bad_settings_are_refused_at_build_time(model_name, tables, full_embedding):
    embedding = full_embedding
    with pytest.raises(ValueError, match="model.deep_mlp must .* end with 1"):
        make(model_name, embedding, len(tables), deep_mlp=[256, 8])
    with pytest.raises(ValueError, match=f"model={model_name} needs every field's embedding 8 wide"):
        MODELS[model_name](embedding=embedding, num_dense=1, num_sparse=len(tables), embedding_dim=8)
    with pytest.raises(ValueError, match=f"num_sparse=3 fields; the embedding module .* has {len(tables)} tables"):
        MODELS[model_name](embedding=embedding, num_dense=1, num_sparse=3, embedding_dim=DIM)


def test_deepfm_needs_a_latent_vector():
    with pytest.raises(ValueError, match="embedding_dim must be >= 2 for deepfm"):
        DeepFM(embedding=torch.nn.Identity(), num_dense=1, num_sparse=2, embedding_dim=1)


class Batch:
    def __init__(self, labels):
        self.labels, self.targets = labels, {}


#: the default suite's subset, one method per family: hashed tables, a custom lookup (MLP decoder),
#: pruning, per-field dims projected to D; every other method is in the slow test below
FAST_METHODS = ["hashing", "dhe", "pep", "mixed_dim"]


@pytest.mark.parametrize("model_name", sorted(MODELS))
@pytest.mark.parametrize("name", FAST_METHODS)
def test_a_method_trains_one_step_with_the_model(name, model_name, tables):
    train_one_step(name, model_name, tables)


@pytest.mark.slow
@pytest.mark.parametrize("model_name", sorted(MODELS))
@pytest.mark.parametrize("name", sorted(set(METHODS) - set(FAST_METHODS)))
def test_every_method_trains_one_step_with_the_model(name, model_name, tables):
    train_one_step(name, model_name, tables)


def train_one_step(name, model_name, tables):
    """Build (solve -> build), one optimizer step as the trainer takes it, the deployable form's forward."""
    _, _, embedding = built(name, tables)
    model = make(model_name, embedding, len(tables)).train()
    optimizers = build_optimizers(model, ModelParamGroups(model), DenseOptimizer(), EmbeddingOptimizer(kind="sgd", learning_rate=0.5))
    rng = np.random.default_rng(8)
    kjt, dense = random_kjt(tables, 64, rng), torch.randn(64, NUM_DENSE)
    batch = Batch(torch.from_numpy(rng.integers(0, 2, 64).astype(np.float32)))
    deep_before = [p.detach().clone() for p in model.deep.parameters()]
    loss = training_loss(model, model(dense, kjt), batch) + model.embedding.extra_loss()
    for opt in optimizers.values():
        opt.zero_grad(set_to_none=True)
    loss.backward()
    for opt in optimizers.values():
        opt.step()
    assert torch.isfinite(loss)
    assert any(not torch.equal(a, b.detach()) for a, b in zip(deep_before, model.deep.parameters()))
    model.eval()
    model.embedding = model.embedding.to_inference()  # as the trainer's final evaluation does
    with torch.no_grad():
        out = model(dense, kjt)
    assert out.shape == (64,) and torch.isfinite(out).all(), f"{name} with {model_name}"


#: whole jobs (every stage, evaluation, deployable form) on the toy protocol, one method per family
FAST_JOBS = [("pep", "deepfm")]  # two stages with a rebuild; the slow test runs every other pair


def run_toy_job(tmp_path, name: str, model_name: str):
    """A job at ratio 0.5, or at 1.0 when the method cannot reach 0.5 on the toy's tiny tables."""
    for ratio in ((1.0,) if name == "full" else (0.5, 1.0)):
        cfg = toy_cfg(tmp_path / str(ratio), f"method={name}", f"model={model_name}",
                      f"budget.compression_ratio={ratio}", "runtime.num_threads=1",
                      "trainer.max_steps=60")  # ~2 epochs of the toy; caps schedules counted in steps
        tracker = InMemoryTracker()
        result = run_job(cfg, tracker)
        if result.status != "infeasible":
            break
    return result, tracker.current


def check_job(result, run, name: str, model_name: str):
    assert run.tags["model"] == model_name
    assert result.status == "finished", f"{name} with {model_name}: {result.status}"
    assert 0.0 <= run.latest("test/auc") <= 1.0


@pytest.mark.parametrize("name, model_name", FAST_JOBS)
def test_a_job_runs_with_the_model(tmp_path, name, model_name):
    check_job(*run_toy_job(tmp_path, name, model_name), name, model_name)


@pytest.mark.slow
@pytest.mark.parametrize("name, model_name", [(n, m) for n in METHODS for m in sorted(MODELS) if (n, m) not in FAST_JOBS])
def test_every_method_runs_a_job_with_the_model(tmp_path, name, model_name):
    check_job(*run_toy_job(tmp_path, name, model_name), name, model_name)
