"""The learned gates train in their references' regime and compute their references' equations.

Behaviour: COMET and DSelect-k with their configs' defaults (routing on the sparse-field
embeddings, Adam lr 1.6e-4 for the gate) stay trainable on a toy routing problem whose over-arch
input is zero-mean or has a shared non-zero mean (as recbench's over-arch inputs do): fewer than
half of the smooth-step nodes saturated after 50 steps, several experts used, exactly <= k
non-zeros at inference. recbench's earlier regime (``gate.input=over_arch gate.lr=null``, the
dense lr 3e-3) saturates every node within those 50 steps on the non-zero-mean input.

Parity: independent NumPy ports, on fixed weights and inputs, of the smooth-step, COMET's tree
(node bias, leaf log-probabilities, one softmax over the k * E leaves) and entropy term,
DSelect-k's entropy term, plain Top-k, and the permutation local search's Sinkhorn iterations,
temperature/iteration schedule and entropy.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from recbench.runs.config import compose

from recbench.runs.settings import instantiate_without
from recbench.gates.functional import smooth_step
from recbench.gates.comet import COMETGate
from recbench.gates.dselect_k import DSelectKGate
from recbench.gates.local_search import PermutationLocalSearch, permutation_entropy, sinkhorn
from recbench.gates.topk import TopKPlainGate
from recbench.models.moe import MixtureOfExpertsArch

COMET = "mazumder-lab/COMET, commit cf272760f49b17fe0989d58a25a8409a71f130f7"
DENSE_LR = 3e-3  # the MovieLens protocol's dense learning rate
W, E = 16, 16


def gate_factory(name, *overrides):
    cfg = compose(["model=dlrm_moe", f"gate={name}", *overrides])
    return instantiate_without(cfg.gate, drop=(), _partial_=True)


# ----------------------------------------------------------------------------- behaviour

def routing_problem(seed: int, shifted: bool, rows: int = 256):
    """Zero-mean embeddings e (B, W), four clusters by the signs of e_0 and e_1, click labels from
    a cluster-specific linear rule; the over-arch input x is e itself or, ``shifted``, |e| + 1
    (post-ReLU-like, a mean shared by every sample)."""
    g = torch.Generator().manual_seed(seed)
    e = torch.randn(rows, W, generator=g)
    cluster = (e[:, 0] > 0).long() * 2 + (e[:, 1] > 0).long()
    x = e.abs() + 1.0 if shifted else e
    return x, e, cluster


def train_toy(name: str, shifted: bool, *overrides, steps: int = 50):
    """50 Adam steps of a 16-expert MoE (as the trainer groups it: gates with ``lr`` on their own
    learning rate, the rest on the dense one); returns (saturated fraction, experts receiving
    >= 1% of held-out samples, max non-zeros per sample) at inference."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small matmuls: one thread is fastest, and the machine is shared
    try:
        return _train_toy(name, shifted, *overrides, steps=steps)
    finally:
        torch.set_num_threads(threads)


def _train_toy(name: str, shifted: bool, *overrides, steps: int):
    torch.manual_seed(0)
    arch = MixtureOfExpertsArch(W, gate_factory(name, *overrides), E, [8], ["click"], embedding_features=W)
    grouped = arch.dense_param_groups()
    own = {id(p) for g in grouped for p in g.params}
    optimizer = torch.optim.Adam([{"params": [p for p in arch.parameters() if id(p) not in own], "lr": DENSE_LR}]
                                 + [{"params": g.params, "lr": g.learning_rate} for g in grouped])
    rules = torch.randn(4, W, generator=torch.Generator().manual_seed(7))
    arch.train()
    for step in range(steps):
        x, e, cluster = routing_problem(100 + step, shifted)
        labels = ((e * rules[cluster]).sum(-1) > 0).float()
        logits = arch(x, None, e)["click"]
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels) + arch.extra_loss()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    x, e, _ = routing_problem(999, shifted, rows=1024)
    stats = arch.diagnostics(x, None, e)
    load = torch.tensor([stats[f"moe/click/load/expert_{j:02d}"] for j in range(E)]) / x.shape[0]
    gate = arch.gates["click"]
    arch.eval()
    weights = gate(arch.routing(gate, x, e)).weights
    return stats["moe/click/saturated_fraction"] / x.shape[0], int((load >= 0.01).sum()), int((weights > 0).sum(-1).max())


@pytest.mark.parametrize("shifted", [False, True], ids=["zero_mean", "nonzero_mean"])
@pytest.mark.parametrize("name", ["comet", "dselect_k"])
def test_smooth_step_gates_stay_trainable_in_the_reference_regime(name, shifted):
    saturated, used, nonzeros = train_toy(name, shifted)
    assert saturated < 0.5
    assert used >= 4  # several experts, not a collapse onto 1-2
    assert nonzeros <= 2  # exactly k-sparse (k = 2) at inference
    if shifted:  # recbench's earlier regime: routing on the shifted over-arch input at the dense lr
        saturated, used, _ = train_toy(name, shifted, "gate.input=over_arch", "gate.lr=null")
        assert saturated > 0.9 and used <= 2


# ----------------------------------------------------------------------------- parity

def ref_smooth_step(z: np.ndarray, gamma: float) -> np.ndarray:
    """Port of ``SmoothStep.call`` (COMET ``model/gates/comet.py``; google-research
    ``dselect_k_moe/dselect_k_moe.py``)."""
    a3, a1, a0 = -2 / gamma**3, 3 / (2 * gamma), 0.5
    return np.where(z <= -gamma / 2, 0.0, np.where(z >= gamma / 2, 1.0, a3 * z**3 + a1 * z + a0))


def test_smooth_step_parity():
    """Reference: ``model/gates/comet.py`` SmoothStep (mazumder-lab/COMET, commit
    cf272760f49b17fe0989d58a25a8409a71f130f7); the same class in google-research
    ``dselect_k_moe/dselect_k_moe.py`` (commit ccc94ce348360ddcd41c749d4088d468ccfd1eaf)."""
    z = np.linspace(-6, 6, 241)
    for gamma in (1e-2, 1e-1, 1.0, 5.0, 10.0):  # the reference's search values
        ours = smooth_step(torch.tensor(z), gamma).numpy()
        np.testing.assert_allclose(ours, ref_smooth_step(z, gamma), rtol=1e-12, atol=1e-12)


def ref_comet(x, node_w, node_b, leaf_w, leaf_b, k, experts, gamma, entropy_reg):
    """Port of COMETGate.call's recursion (COMET ``model/gates/comet.py``): node n holds a Dense(k)
    (column i = tree i) with the smooth-step activation, leaf n a Dense(k) of logits; a leaf's
    score is a + log(prob + 1e-8) (float32 min where prob <= 0) and it adds entropy_reg *
    mean over the batch of sum over trees of -prob log(prob + 1e-6)."""
    loss = [0.0]

    def node(n, prob):
        if n >= experts - 1:  # leaf
            a = x @ leaf_w[n] + leaf_b[n]  # (B, k)
            log_prob = np.where(prob <= 0, np.finfo(np.float32).min, np.log(prob + 1e-8))
            loss[0] += entropy_reg * np.mean(np.sum(-prob * np.log(prob + 1e-6), axis=1))
            return (a + log_prob)[:, :, None]
        current = ref_smooth_step(x @ node_w[n] + node_b[n], gamma)  # (B, k)
        return np.concatenate([node(2 * n + 1, current * prob), node(2 * n + 2, (1 - current) * prob)], axis=-1)

    scores = node(0, np.ones((x.shape[0], k))).reshape(x.shape[0], -1)  # (B, k * E)
    g = np.exp(scores - scores.max(-1, keepdims=True))
    g = (g / g.sum(-1, keepdims=True)).reshape(x.shape[0], k, experts)
    weights = g.sum(1)
    return weights / weights.sum(-1, keepdims=True), loss[0]


def test_comet_tree_and_entropy_parity():
    """Reference: ``model/gates/comet.py`` COMETGate (mazumder-lab/COMET, commit
    cf272760f49b17fe0989d58a25a8409a71f130f7): nodes with a bias, leaf logits, log(p + 1e-8),
    one softmax over the k trees' leaves, the per-leaf entropy term."""
    torch.manual_seed(3)
    k, experts, width, gamma = 2, 8, 6, 1.0
    gate = COMETGate(experts, width, k=k, gamma=gamma, entropy_reg=0.5).double().train()
    with torch.no_grad():  # spread the nodes so that some are saturated and some are not
        gate.nodes.weight.normal_(0, 0.4)
        gate.nodes.bias.normal_(0, 0.3)
    assert gate.nodes.bias is not None
    x = torch.randn(40, width, dtype=torch.float64)
    out = gate(x)
    nw = gate.nodes.weight.detach().view(k, experts - 1, width).numpy()
    nb = gate.nodes.bias.detach().view(k, experts - 1).numpy()
    lw = gate.leaves.weight.detach().view(k, experts, width).numpy()
    lb = gate.leaves.bias.detach().view(k, experts).numpy()
    node_w = {n: nw[:, n].T for n in range(experts - 1)}
    node_b = {n: nb[:, n] for n in range(experts - 1)}
    leaf_w = {experts - 1 + j: lw[:, j].T for j in range(experts)}
    leaf_b = {experts - 1 + j: lb[:, j] for j in range(experts)}
    weights, loss = ref_comet(x.numpy(), node_w, node_b, leaf_w, leaf_b, k, experts, gamma, 0.5)
    np.testing.assert_allclose(out.weights.detach().numpy(), weights, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(float(out.loss.detach()), loss, rtol=1e-9)
    saturated = gate.saturated_fraction(x)
    assert 0 < float(saturated.mean()) < 1


def test_dselect_k_entropy_parity():
    """Reference: ``model/gates/dselect_k.py`` EntropyRegularizer and
    ``_compute_example_conditioned_expert_weights`` (mazumder-lab/COMET, commit
    cf272760f49b17fe0989d58a25a8409a71f130f7): entropy_reg * mean over the batch of
    sum over (selectors, experts) of -p log(p + 1e-6), bits most significant first (np.binary_repr)."""
    torch.manual_seed(4)
    k, experts, width, gamma = 2, 8, 5, 1.0
    gate = DSelectKGate(experts, width, k=k, gamma=gamma, entropy_reg=0.3).double().train()
    with torch.no_grad():
        gate.z_logits.weight.normal_(0, 0.5)
    x = torch.randn(30, width, dtype=torch.float64)
    out = gate(x)
    bits = math.ceil(math.log2(experts))
    # (E, m), as NumPy 1.21 (the reference's pin) casts the digits '0'/'1' of np.binary_repr
    codes = np.array([[int(c) for c in np.binary_repr(v, width=bits)] for v in range(experts)]).astype(bool)
    z = (x.numpy() @ gate.z_logits.weight.detach().numpy().T + gate.z_logits.bias.detach().numpy())
    s = ref_smooth_step(z.reshape(-1, k, 1, bits), gamma)
    selectors = np.prod(np.where(codes[None, None], s, 1 - s), axis=3)  # (B, k, E)
    alpha = x.numpy() @ gate.w_logits.weight.detach().numpy().T + gate.w_logits.bias.detach().numpy()
    alpha = np.exp(alpha) / np.exp(alpha).sum(-1, keepdims=True)
    np.testing.assert_allclose(out.weights.detach().numpy(), (alpha[:, :, None] * selectors).sum(1), rtol=1e-9)
    entropy = -np.mean(np.sum(selectors * np.log(selectors + 1e-6), axis=(1, 2)))
    np.testing.assert_allclose(float(out.loss.detach()), 0.3 * entropy, rtol=1e-9)


def test_plain_topk_parity():
    """Reference: ``model/gates/topk.py`` TopkGate with ``"jitter": false``
    (``config/model_config/movielens2M/topk.json``; mazumder-lab/COMET, commit
    cf272760f49b17fe0989d58a25a8409a71f130f7): logits x W^T + b, top k, softmax over them, no loss."""
    torch.manual_seed(5)
    gate = TopKPlainGate(E, W, k=2).double().train()
    assert gate.w_gate.bias is not None and gate.w_noise is None
    bound = math.sqrt(6 / (E + W))  # Glorot-uniform, Keras' add_weight default
    assert float(gate.w_gate.weight.abs().max()) <= bound and float(gate.w_gate.weight.std()) > bound / 4
    with torch.no_grad():
        gate.w_gate.bias.normal_()
    x = torch.randn(50, W, dtype=torch.float64)
    out = gate(x)
    logits = x.numpy() @ gate.w_gate.weight.detach().numpy().T + gate.w_gate.bias.detach().numpy()
    top = np.argsort(-logits, axis=1)[:, :2]
    masked = np.full_like(logits, -np.inf)
    np.put_along_axis(masked, top, np.take_along_axis(logits, top, 1), 1)
    expected = np.exp(masked - masked.max(1, keepdims=True))
    np.testing.assert_allclose(out.weights.detach().numpy(), expected / expected.sum(1, keepdims=True), rtol=1e-9)
    assert float(out.loss) == 0.0
    torch.testing.assert_close(gate(x).weights, out.weights)  # no noise in training


def ref_schedule(iteration: int, window: int):
    """Port of LearnPermutations._get_permutation_during_training's schedule
    (``model/permutations/learn_permutations.py``): log10 tau and the Sinkhorn iterations
    interpolated linearly over [0, window] (tfp interp_regular_1d_grid, constant extension)
    between log10(1e-3) -> log10(1e-7) and 20 -> 150, the iterations cast to int32."""
    t = min(max(iteration / window, 0.0), 1.0)
    log_tau = np.log10(1e-3) + (np.log10(1e-7) - np.log10(1e-3)) * t
    return 10.0 ** log_tau, int(np.float32(20 + (150 - 20) * t))


def ref_sinkhorn(log_alpha: np.ndarray, n_iters: int) -> np.ndarray:
    """Port of LearnPermutations._sinkhorn: row then column log-normalisation, n_iters times."""
    for _ in range(n_iters):
        log_alpha = log_alpha - np.log(np.exp(log_alpha).sum(2, keepdims=True))
        log_alpha = log_alpha - np.log(np.exp(log_alpha).sum(1, keepdims=True))
    return np.exp(log_alpha)


def ref_permutation_entropy(p: np.ndarray, eps: float = 1e-6) -> float:
    """Port of LearnPermutations._compute_permutation_entropy_regularization."""
    rows = p / p.sum(-1, keepdims=True)
    return float(np.mean(np.sum(-p * np.log(p + eps), axis=(1, 2))) + np.mean(np.sum(-rows * np.log(rows + eps), axis=(1, 2))))


def test_local_search_sinkhorn_schedule_and_entropy_parity():
    """Reference: ``model/permutations/learn_permutations.py`` LearnPermutations
    (mazumder-lab/COMET, commit cf272760f49b17fe0989d58a25a8409a71f130f7): tau_initial 1e-3,
    tau_final 1e-7, Sinkhorn iterations 20 -> 150 truncated, learn_k_permutations false (one
    shared permutation), the entropy of P plus that of its row-normalised form."""
    window = 37
    search = PermutationLocalSearch(6, 1, steps=window)
    for step in range(0, window + 3):
        tau, iterations = search.schedule(step)
        ref_tau, ref_iterations = ref_schedule(step, window)
        assert iterations == ref_iterations, step
        assert tau == pytest.approx(ref_tau, rel=1e-9)
    assert COMETGate(E, W, k=2, local_search={"enabled": True}).local_search.num_permutations == 1
    assert gate_factory("comet", "gate.local_search.enabled=true")(num_experts=E, input_dim=W).local_search.num_permutations == 1
    rng = np.random.default_rng(0)
    logits = rng.uniform(-0.05, 0.05, (2, 6, 6)) / 0.02
    for n_iters in (20, 57, 150):
        matrix = sinkhorn(torch.tensor(logits), n_iters)
        np.testing.assert_allclose(matrix.numpy(), ref_sinkhorn(logits, n_iters), rtol=1e-8, atol=1e-12)
    p = sinkhorn(torch.tensor(logits), 20)
    assert float(permutation_entropy(p)) == pytest.approx(ref_permutation_entropy(p.numpy()), rel=1e-9)
