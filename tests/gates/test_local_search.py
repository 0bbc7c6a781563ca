"""COMET+'s permutation local search: it learns (changes) the permutation, keeps the weights on
the simplex at every step, freezes a hard permutation after its window and survives a checkpoint."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import yaml
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recbench.gates.comet import COMETGate
from recbench.gates.hash import HashGate
from recbench.gates.local_search import PermutationLocalSearch, nearest_permutation, sinkhorn
from recbench.gates.settings import LocalSearchSettings, override_error
from recbench.runs.config import CONFIG_DIR


def is_permutation(matrix) -> bool:
    m = np.asarray(matrix)
    return bool(np.isin(m, (0.0, 1.0)).all() and (m.sum(-1) == 1).all() and (m.sum(-2) == 1).all())


def order(module):
    return module.permutation()[0].argmax(-1).tolist()


def test_local_search_learns_the_expert_order_a_hash_gate_cannot():
    """Hash routing has no parameters: only the permutation can move bucket j to the expert its
    samples need. The target needs the order sigma; local search must find it."""
    torch.manual_seed(0)
    experts, batch = 4, 256
    gate = HashGate(experts, 8, k=1, feature_names=["user"],
                    local_search=LocalSearchSettings(enabled=True, steps=300, tau_initial=0.1, tau_final=1e-5))
    kjt = KeyedJaggedTensor(keys=["user"], values=torch.arange(batch) % 50, lengths=torch.ones(batch, dtype=torch.int32))
    x = torch.zeros(batch, 8)
    expert_outputs = torch.tensor([0.0, 1.0, 2.0, 3.0])
    bucket = HashGate(experts, 8, k=1, feature_names=["user"]).eval()(x, kjt).weights.argmax(-1)
    sigma = [2, 3, 1, 0]
    target = expert_outputs[torch.tensor(sigma)[bucket]]
    optimizer = torch.optim.Adam(gate.parameters(), lr=1e-2)
    gate.train()
    first = None
    for _ in range(300):
        out = gate(x, kjt)
        torch.testing.assert_close(out.weights.sum(-1), torch.ones(batch))
        if first is None:
            first = order(gate.local_search)
        loss = ((out.weights @ expert_outputs - target) ** 2).mean() + out.loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert first != sigma
    assert order(gate.local_search) == sigma
    gate.eval()
    torch.testing.assert_close(gate(x, kjt).weights @ expert_outputs, target)


def test_soft_permutations_keep_the_simplex_and_the_window_ends_in_a_frozen_hard_permutation():
    torch.manual_seed(1)
    assert COMETGate(8, 12, k=2, local_search={"enabled": True}).local_search.num_permutations == 1  # shared by default
    settings = LocalSearchSettings(enabled=True, steps=10, noise=0.1, tau_initial=0.5, tau_final=0.05,
                                   per_component=True)
    gate = COMETGate(8, 12, k=2, local_search=settings)
    search = gate.local_search
    assert search.num_permutations == 2  # one per tree
    optimizer = torch.optim.Adam(gate.parameters(), lr=1e-2)
    x = torch.randn(64, 12)
    gate.train()
    for step in range(1, 16):
        out = gate(x)
        assert (out.weights >= 0).all()
        torch.testing.assert_close(out.weights.sum(-1), torch.ones(64))
        relaxed = search.relaxed
        torch.testing.assert_close(relaxed.sum(-1), torch.ones(2, 8), atol=1e-4, rtol=0)  # doubly stochastic
        torch.testing.assert_close(relaxed.sum(-2), torch.ones(2, 8), atol=1e-4, rtol=0)
        optimizer.zero_grad()
        (out.weights[:, 0].sum() + out.loss).backward()
        if step <= 10:
            assert search.log_alpha.grad is not None and search.log_alpha.grad.abs().sum() > 0
            assert out.loss > 0  # entropy of the soft permutation is regularised
        else:
            assert search.log_alpha.grad is None or search.log_alpha.grad.abs().sum() == 0
        optimizer.step()
    frozen = search.permutation()
    assert is_permutation(frozen.numpy()) and int(search.step) == 10
    torch.testing.assert_close(frozen, nearest_permutation(search.relaxed))
    gate.eval()
    weights = gate(x).weights
    assert ((weights > 0).sum(-1) <= 2).all()
    # the learned order survives a checkpoint round trip
    fresh = COMETGate(8, 12, k=2, local_search={"enabled": True, "steps": 10, "per_component": True})
    fresh.load_state_dict(gate.state_dict())
    fresh.eval()
    torch.testing.assert_close(fresh(x).weights, weights)
    torch.testing.assert_close(fresh.local_search.permutation(), frozen)


def test_sinkhorn_and_hungarian_rounding():
    torch.manual_seed(2)
    logits = torch.randn(3, 5, 5)
    matrix = sinkhorn(logits, 200)
    torch.testing.assert_close(matrix.sum(-1), torch.ones(3, 5), atol=1e-4, rtol=0)
    torch.testing.assert_close(matrix.sum(-2), torch.ones(3, 5), atol=1e-4, rtol=0)
    hard = nearest_permutation(matrix)
    assert is_permutation(hard.numpy())
    target = torch.eye(5)[[3, 0, 4, 1, 2]]
    assert torch.equal(nearest_permutation(target.unsqueeze(0) + 0.01 * torch.rand(1, 5, 5))[0], target)
    assert torch.equal(nearest_permutation(sinkhorn(target.unsqueeze(0) / 1e-3, 20))[0], target)


def test_shared_permutation_and_schedule():
    search = PermutationLocalSearch(4, 1, steps=100, tau_initial=1e-3, tau_final=1e-7)
    assert search.schedule(0) == (1e-3, 20)
    tau, iterations = search.schedule(100)
    assert abs(tau - 1e-7) < 1e-12 and iterations == 150
    assert abs(search.schedule(50)[0] - 1e-5) < 1e-9
    comps = torch.softmax(torch.randn(6, 3, 4), dim=-1) / 3
    search.eval()
    permuted, loss = search(comps)
    assert permuted.shape == comps.shape and float(loss) == 0.0
    torch.testing.assert_close(permuted.sum((1, 2)), torch.ones(6))
    hard = search.permutation()[0]  # inference applies it as a gather: the same as the matrix product
    torch.testing.assert_close(permuted, comps @ hard)
    per_component = PermutationLocalSearch(4, 3, steps=1).eval()
    with torch.no_grad():
        per_component.relaxed.copy_(torch.stack([torch.eye(4)[list(p)] for p in ([1, 0, 3, 2], [3, 2, 1, 0], [0, 1, 2, 3])]))
    torch.testing.assert_close(per_component(comps)[0], torch.einsum("bce,cef->bcf", comps, per_component.relaxed))


def test_the_settings_are_the_mapping_gate_local_search_with_the_dataclass_defaults():
    """recbench/conf/gate_options/local_search.yaml (nested as gate.local_search by every recbench/conf/gate/*.yaml)
    lists exactly the fields of LocalSearchSettings, with its defaults."""
    shared = yaml.safe_load((Path(CONFIG_DIR) / "gate_options" / "local_search.yaml").read_text())
    assert shared == dataclasses.asdict(LocalSearchSettings())
    for gate in (Path(CONFIG_DIR) / "gate").glob("*.yaml"):
        assert "/gate_options/local_search@local_search" in yaml.safe_load(gate.read_text())["defaults"], gate.name
    assert LocalSearchSettings.of(None) == LocalSearchSettings()
    assert LocalSearchSettings.of({"enabled": True, "steps": 3}) == LocalSearchSettings(enabled=True, steps=3)
    assert COMETGate(8, 12, k=2, local_search={"enabled": False}).local_search is None
    with pytest.raises(ValueError, match=r"gate\.local_search\.enabled=true"):
        COMETGate(8, 12, k=2, local_search=True)
    with pytest.raises(ValueError, match=r"no setting \['step'\]"):
        LocalSearchSettings.of({"step": 3})


@pytest.mark.parametrize("override, new", [
    ("gate.local_search_steps=3", "use gate.local_search.steps"),
    ("+gate.local_search_tau_initial=0.1", "use gate.local_search.tau_initial"),
    ("gate.local_search_foo=1", "use one of gate.local_search.{enabled,steps,"),
    ("gate.local_search=true", "use gate.local_search.enabled=true"),
    ("gate.local_search=false,true", "use gate.local_search.enabled=false,true"),
])
def test_a_flat_or_boolean_local_search_override_names_the_nested_key(override, new):
    message = override_error(["gate=comet", override])
    assert new in message and "\n" not in message
    assert override_error(["gate=comet", "gate.local_search.enabled=true", "gate.local_search.steps=3"]) is None
