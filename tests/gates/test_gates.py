"""Gates: simplex weights with <= k non-zeros at inference for every recbench/conf/gate/*.yaml (with and
without local search), smooth-step and its gradients, DSelect-k/COMET equations, Top-k and hash."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from recbench.runs.config import compose
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recbench.runs.settings import instantiate_without
from recbench.runs.config import CONFIG_DIR
from recbench.gates.functional import binary_codes, heap_paths, route_products, smooth_step
from recbench.gates.comet import COMETGate
from recbench.gates.dselect_k import DSelectKGate
from recbench.gates.hash import HashGate, first_ids
from recbench.gates.softmax import SoftmaxGate
from recbench.gates.topk import TopKGate

GATES = sorted(p.stem for p in (Path(CONFIG_DIR) / "gate").glob("*.yaml"))
FIELDS = ["user", "item"]
B, W, E = 96, 24, 16


def gate_factory(name, *overrides):
    cfg = compose(["model=dlrm_moe", f"gate={name}", *overrides])
    assert cfg.gate.name == name, f"recbench/conf/gate/{name}.yaml must have name: {name}"
    return instantiate_without(cfg.gate, drop=(), _partial_=True)


def features(batch=B, seed=0):
    g = torch.Generator().manual_seed(seed)
    return KeyedJaggedTensor(keys=FIELDS, values=torch.randint(0, 1000, (2 * batch,), generator=g),
                             lengths=torch.ones(2 * batch, dtype=torch.int32))


def assert_simplex(weights, atol=1e-5):
    assert (weights >= 0).all()
    torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[0]), atol=atol, rtol=0)


@pytest.mark.parametrize("local_search", [False, True], ids=["plain", "local_search"])
@pytest.mark.parametrize("name", GATES)
def test_every_gate_is_a_simplex_with_at_most_k_nonzeros_at_inference(name, local_search):
    torch.manual_seed(0)
    gate = gate_factory(name, f"gate.local_search.enabled={local_search}", "gate.local_search.steps=15")(
        num_experts=E, input_dim=W, feature_names=FIELDS)
    x, kjt = torch.randn(B, W), features()
    target = torch.softmax(3 * torch.randn(B, E), dim=-1)
    params = [p for p in gate.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=1e-2) if params else None
    gate.train()
    for _ in range(25):  # through and past the local-search window
        out = gate(x, kjt)
        assert_simplex(out.weights)
        loss = ((out.weights - target) ** 2).sum() + out.loss
        if optimizer is not None and loss.requires_grad:
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    gate.eval()
    out = gate(x, kjt)
    assert_simplex(out.weights)
    nonzeros = (out.weights > 0).sum(-1)
    assert nonzeros.max() <= gate.k and nonzeros.min() >= 1
    assert float(out.loss) == 0.0
    if name != "softmax":
        assert gate.k == 2  # the configs' k


def test_smooth_step_values_and_gradient():
    gamma = 2.0
    z = torch.tensor([-5.0, -1.0, -0.5, 0.0, 0.5, 1.0, 5.0], dtype=torch.float64, requires_grad=True)
    s = smooth_step(z, gamma)
    assert s[0] == 0 and s[1] == 0 and s[-1] == 1 and s[-2] == 1 and s[3] == 0.5
    expected_mid = -2 / gamma**3 * 0.5**3 + 3 / (2 * gamma) * 0.5 + 0.5
    assert torch.isclose(s[4], torch.tensor(expected_mid, dtype=torch.float64))
    s.sum().backward()
    # derivative 3/(2 gamma) - 6 z^2 / gamma^3 inside, exactly 0 where saturated (and at the joins)
    expected = torch.tensor([0, 0, 3 / 4 - 6 * 0.25 / 8, 3 / 4, 3 / 4 - 6 * 0.25 / 8, 0, 0], dtype=torch.float64)
    torch.testing.assert_close(z.grad, expected)
    inner = torch.linspace(-0.9, 0.9, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: smooth_step(t, gamma), (inner,))


@pytest.mark.parametrize("cls", [DSelectKGate, COMETGate])
def test_gradients_flow_through_smooth_step_to_the_routing_parameters(cls):
    torch.manual_seed(0)
    gate = cls(E, W, k=2, gamma=1.0, entropy_reg=0.0).train()
    x = torch.randn(B, W)
    out = gate(x)
    (out.weights * torch.randn(B, E)).sum().backward()
    routing = gate.z_logits.weight if cls is DSelectKGate else gate.nodes.weight
    assert routing.grad is not None and routing.grad.abs().sum() > 0
    # saturated routing: every smooth-step is exactly 0 or 1, so its gradient vanishes
    gate.zero_grad()
    with torch.no_grad():
        routing.mul_(1e7)  # |z| >> gamma / 2 for every sample
    out = gate(x)
    (out.weights * torch.randn(B, E)).sum().backward()
    assert routing.grad.abs().sum() == 0


def test_binary_codes_and_tree_paths():
    codes = binary_codes(8)
    assert codes.shape == (8, 3) and codes[5].tolist() == [1, -1, 1]  # 5 = 101
    paths = heap_paths(4)  # root 0, nodes 1 (left) and 2 (right), leaves 3..6
    assert paths.tolist() == [[1, 1, 0], [1, -1, 0], [-1, 0, 1], [-1, 0, -1]]
    uneven = heap_paths(5)  # a 5-leaf heap: leaves at depths 2 and 3, probabilities still sum to 1
    p = torch.rand(7, 1, 4)
    torch.testing.assert_close(route_products(p, uneven).sum(-1), torch.ones(7, 1))


def test_dselect_k_selectors_are_one_hot_on_the_binary_code_once_saturated():
    gate = DSelectKGate(8, 4, k=2, gamma=1.0)
    with torch.no_grad():
        gate.z_logits.weight.zero_()
        # selector 0 -> bits 1,0,1 (expert 5), selector 1 -> bits 0,1,1 (expert 3)
        gate.z_logits.bias.copy_(torch.tensor([5.0, -5.0, 5.0, -5.0, 5.0, 5.0]))
    x = torch.randn(10, 4)
    selectors = gate.selectors(x)
    assert selectors[:, 0].argmax(-1).eq(5).all() and selectors[:, 1].argmax(-1).eq(3).all()
    assert set(selectors.unique().tolist()) == {0.0, 1.0}
    gate.train()
    soft = gate(x)
    gate.eval()
    hard = gate(x)
    torch.testing.assert_close(soft.weights, hard.weights)  # binary selectors: training form == inference form
    assert ((hard.weights > 0).sum(-1) == 2).all()


def test_comet_binary_trees_route_to_one_leaf_each_and_entropy_vanishes():
    torch.manual_seed(0)
    gate = COMETGate(E, W, k=2, gamma=1.0, entropy_reg=1.0).train()
    x = torch.randn(B, W)
    with torch.no_grad():
        gate.nodes.weight.mul_(1e7)
    reach = gate.leaf_probabilities(x)
    assert set(reach.unique().tolist()) <= {0.0, 1.0} and (reach.sum(-1) == 1).all()
    out = gate(x)
    assert float(out.loss.detach()) == pytest.approx(0.0, abs=1e-4)
    assert ((out.weights > 0).sum(-1) <= 2).all()
    gate.eval()
    torch.testing.assert_close(gate(x).weights, out.weights)
    soft = COMETGate(E, W, k=2, gamma=1.0, entropy_reg=1.0).train()
    assert float(soft(x).loss.detach()) > 1.0  # near-uniform routing at initialisation: high entropy


def test_topk_is_exactly_k_sparse_in_training_and_balancing_loss_sees_imbalance():
    torch.manual_seed(0)
    gate = TopKGate(E, W, k=2).train()
    x = torch.randn(B, W)
    out = gate(x)
    assert ((out.weights > 0).sum(-1) == 2).all() and gate.sparse_training
    balanced = float(gate(x).loss.detach())  # zero-initialised gate: the noise spreads samples over the experts
    with torch.no_grad():
        gate.w_gate.weight[0] = 10.0  # experts 0 and 1 win every (positive) sample
        gate.w_gate.weight[1] = 9.0
    imbalanced = gate(x.abs())
    assert (imbalanced.weights[:, 2:] == 0).all()
    assert float(imbalanced.loss.detach()) > 10 * balanced > 0


def test_hash_routes_by_the_field_id_only():
    gate = HashGate(E, W, k=2, field="item", feature_names=FIELDS).eval()
    kjt = features(seed=1)
    weights = gate(torch.randn(B, W), kjt).weights
    again = gate(torch.randn(B, W), kjt).weights
    torch.testing.assert_close(weights, again)  # x does not matter
    ids = first_ids(kjt, "item")
    same = (ids.unsqueeze(0) == ids.unsqueeze(1))
    rows, cols = same.nonzero(as_tuple=True)
    torch.testing.assert_close(weights[rows], weights[cols])
    assert set(weights.unique().tolist()) <= {0.0, 0.5, 1.0}
    with pytest.raises(ValueError, match="gate.field='age' is not a sparse field"):
        HashGate(E, W, k=2, field="age", feature_names=FIELDS)
    bags = KeyedJaggedTensor(keys=["user"], values=torch.tensor([7, 8, 9]), lengths=torch.tensor([2, 0, 1]))
    assert first_ids(bags, "user").tolist() == [7, 0, 9]


def test_bad_settings_get_clear_errors():
    with pytest.raises(ValueError, match="k must be in"):
        COMETGate(E, W, k=17)
    with pytest.raises(ValueError, match="softmax' is dense"):
        SoftmaxGate(E, W, k=2)
    with pytest.raises(ValueError, match="recbench/conf/gate config names 'topk'"):
        COMETGate(E, W, k=2, name="topk")
    with pytest.raises(ValueError, match="gamma must be > 0"):
        DSelectKGate(E, W, k=2, gamma=0.0)
