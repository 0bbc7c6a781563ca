"""COMET+'s permutation-based local search, for any gate.

A learned permutation of the expert order is applied to each component (tree, selector, hash
function) of a gate: the weight a component gives expert e moves to expert pi(e). The permutation
is learned jointly with the gate as a relaxed (doubly stochastic) matrix from Gumbel-Sinkhorn,

    P = Sinkhorn((log_alpha + noise * Gumbel) / tau, n_iter),

with the temperature tau annealed log-linearly from ``tau_initial`` to ``tau_final`` and the
Sinkhorn iterations from 20 to 150 (truncated to an integer) over ``steps`` training steps, plus
the entropy regulariser of P and of its row-normalised form. One permutation is shared by the
components (the reference's ``learn_k_permutations: false``) unless one per component is asked.
After ``steps`` (and always at inference) the last relaxed matrix is rounded to the nearest hard
permutation (Hungarian algorithm on -P) and frozen, so the learned order costs nothing at
inference and keeps every gate's <= k non-zeros. A doubly stochastic P preserves each
component's mass (its columns sum to 1), so the weights stay on the simplex throughout.

Settings: ``recbench.gates.settings.LocalSearchSettings`` (the config mapping ``gate.local_search``):
``enabled``, ``steps``, ``per_component``, ``entropy_reg``, ``noise``, ``tau_initial``, ``tau_final``.

Shapes: components (B, C, E) -> permuted (B, C, E); log_alpha (P, E, E) with P = C (one per
component) or 1 (shared).

References: Ibrahim et al., "COMET: Learning Cardinality Constrained Mixture of Experts with
Trees and Local Search", KDD 2023 (section 4, permutation local search); mazumder-lab/COMET
``model/permutations/learn_permutations.py`` (commit cf272760f49b17fe0989d58a25a8409a71f130f7);
Mena et al., "Learning Latent Permutations with Gumbel-Sinkhorn Networks", ICLR 2018.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from recbench.gates.functional import entropy
from recbench.gates.settings import LocalSearchSettings

SINKHORN_ITERATIONS = (20, 150)


def sinkhorn(log_alpha: torch.Tensor, iterations: int) -> torch.Tensor:
    """Alternate row and column normalisation in log space: (P, E, E) -> doubly stochastic (P, E, E)."""
    for _ in range(int(iterations)):
        log_alpha = log_alpha - torch.logsumexp(log_alpha, dim=2, keepdim=True)
        log_alpha = log_alpha - torch.logsumexp(log_alpha, dim=1, keepdim=True)
    return log_alpha.exp()


def permutation_entropy(matrix: torch.Tensor) -> torch.Tensor:
    """The reference's regulariser of relaxed permutations (P, E, E) -> scalar: the mean over P of
    the summed entropy of the entries plus that of the row-normalised matrix (the two differ
    because Sinkhorn ends on a column normalisation)."""
    rows = matrix / matrix.sum(dim=-1, keepdim=True)
    return entropy(matrix).sum(dim=-1).mean() + entropy(rows).sum(dim=-1).mean()


def nearest_permutation(matrix: torch.Tensor) -> torch.Tensor:
    """(P, E, E) -> the hard permutation matrices maximising <P_hard, matrix> (Hungarian algorithm)."""
    hard = torch.zeros_like(matrix)
    for i, m in enumerate(matrix.detach().cpu().double().numpy()):
        rows, cols = linear_sum_assignment(-m)
        hard[i, torch.as_tensor(rows), torch.as_tensor(cols)] = 1.0
    return hard


class PermutationLocalSearch(nn.Module):
    """Learned permutation(s) of the expert axis (see the module docstring).

    Args:
        num_experts: E.
        num_permutations: P, 1 (shared) or the gate's number of components.
        steps: training steps of the learning window (>= 1).
        entropy_reg: weight of the entropy of the relaxed permutation (mean over P).
        noise: Gumbel noise scale on the logits (0: none).
        tau_initial, tau_final: Sinkhorn temperatures at the start and end of the window.
    """

    def __init__(self, num_experts: int, num_permutations: int, steps: int = LocalSearchSettings.steps,
                 entropy_reg: float = LocalSearchSettings.entropy_reg, noise: float = LocalSearchSettings.noise,
                 tau_initial: float = LocalSearchSettings.tau_initial,
                 tau_final: float = LocalSearchSettings.tau_final):
        super().__init__()
        if num_permutations < 1:
            raise ValueError(f"num_permutations must be >= 1, got {num_permutations}")
        if steps < 1:
            raise ValueError(f"gate.local_search.steps must be >= 1, got {steps}")
        if not (tau_initial > 0 and tau_final > 0):
            raise ValueError(f"gate.local_search.tau_initial/tau_final must be > 0, got {tau_initial}, {tau_final}")
        self.num_experts, self.num_permutations = int(num_experts), int(num_permutations)
        self.steps, self.entropy_reg, self.noise = int(steps), float(entropy_reg), float(noise)
        self.tau_initial, self.tau_final = float(tau_initial), float(tau_final)
        shape = (self.num_permutations, self.num_experts, self.num_experts)
        self.log_alpha = nn.Parameter(torch.empty(shape).uniform_(-0.05, 0.05))
        # the last relaxed permutation (identity before training): its rounding is the inference permutation
        self.register_buffer("relaxed", torch.eye(self.num_experts).expand(shape).clone())
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))

    @classmethod
    def of(cls, settings: LocalSearchSettings, num_experts: int,
           num_components: int) -> Optional["PermutationLocalSearch"]:
        """The learned permutation(s) of a gate with ``num_components`` components (None when disabled)."""
        if not settings.enabled:
            return None
        return cls(num_experts, settings.num_permutations(num_components), steps=settings.steps,
                   entropy_reg=settings.entropy_reg, noise=settings.noise,
                   tau_initial=settings.tau_initial, tau_final=settings.tau_final)

    @property
    def learning(self) -> bool:
        return self.training and int(self.step) < self.steps

    def schedule(self, step: int):
        """(temperature, Sinkhorn iterations) at training step ``step`` of the window."""
        fraction = min(max(step / self.steps, 0.0), 1.0)
        log_tau = math.log10(self.tau_initial) + (math.log10(self.tau_final) - math.log10(self.tau_initial)) * fraction
        low, high = SINKHORN_ITERATIONS
        return 10.0 ** log_tau, int(low + (high - low) * fraction)  # the reference casts to int32: truncation

    def permutation(self) -> torch.Tensor:
        """The hard permutation(s) (P, E, E) used after the window and at inference (cached until
        ``relaxed`` changes)."""
        key = (self.relaxed.data_ptr(), self.relaxed._version)
        if getattr(self, "_hard_key", None) != key:
            self._hard, self._hard_key = nearest_permutation(self.relaxed), key
        return self._hard

    def forward(self, components: torch.Tensor):
        """components (B, C, E) -> (permuted (B, C, E), regularisation scalar)."""
        loss = torch.zeros((), device=components.device)
        if self.learning:
            self.step += 1
            tau, iterations = self.schedule(int(self.step))
            logits = self.log_alpha
            if self.noise > 0:
                gumbel = -torch.log(-torch.log(torch.rand_like(logits) + 1e-20) + 1e-20)
                logits = logits + self.noise * gumbel
            matrix = sinkhorn(logits / tau, iterations)
            self.relaxed.copy_(matrix.detach())
            loss = self.entropy_reg * permutation_entropy(matrix)
        else:  # a hard permutation is a gather: expert f takes the weight of its source e (P[e, f] = 1)
            source = self.permutation().argmax(dim=1).to(components.device)  # (P, E)
            index = source.unsqueeze(0).expand(components.shape[0], components.shape[1], -1)
            return torch.gather(components, 2, index), loss
        if matrix.shape[0] == 1:
            return torch.matmul(components, matrix[0]), loss
        return torch.einsum("bce,cef->bcf", components, matrix), loss

    def extra_repr(self) -> str:
        return (f"num_permutations={self.num_permutations}, num_experts={self.num_experts}, steps={self.steps}, "
                f"tau={self.tau_initial:g}->{self.tau_final:g}")

