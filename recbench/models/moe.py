"""Mixture-of-experts over-arch for DLRM and DCNv2 (single- or multi-task), with an injected gate.

The over-arch of the base model is replaced by E experts, each an MLP tower over the
interaction output x (B, W) (``top_mlp`` without its final 1-unit layer, ReLU after every
layer), one gate per task (built by the injected gate factory, ``recbench.gates``) and one linear
head per task:

    y_t(x) = head_t( sum_e g_t(r)_e * expert_e(x) ),  t in tasks,

where the gates' routing input r is by default the concatenated sparse-field embeddings
(B, F * D), as the COMET reference routes on its bottom's output (``gate.input=over_arch``: r = x).
Gates with their own learning rate (``gate.lr``) form their own Adam group (``dense_param_groups``).

Tasks: ``click`` (the click logit, always present) and regressions on the dataset's extra
targets (``rating`` on MovieLens), with loss weights ``task_loss_weights`` (1.0 by default); the model
returns {task: (B,)} and its gates' regularisation through ``extra_loss()``
(``recbench.models.tasks``). With one softmax gate and one expert this is the base model.

Conditional computation: at inference (and in training when every gate is exactly sparse with
no gradient through zero weights: Top-k, hash) expert e runs only on the rows some task's gate
routes to it, and its outputs are scattered back weighted; otherwise all experts run as one
batched matmul per layer. ``diagnostics`` measures the experts computed per sample, each gate's
non-zeros and how often its training-form routing was already exactly k-sparse, and the
over-arch's FLOPs per sample.

References: Ma et al., "Modeling Task Relationships in Multi-task Learning with Multi-gate
Mixture-of-Experts", KDD 2018 (one gate per task over shared experts); Ibrahim et al., "COMET",
KDD 2023 and Hazimeh et al., "DSelect-k", NeurIPS 2021 (MovieLens: click + rating MoE).
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Mapping, NamedTuple, Optional, Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from recbench.models.dcn import DCNv2
from recbench.models.dlrm import DLRM
from recbench.types import ParamGroup

CLICK = "click"


class ExpertBank(nn.Module):
    """E MLP towers of identical shape, parameters stacked per layer: weight (E, in, out), bias (E, out).

    ``dense(x (B, W)) -> (E, B, H)``; ``expert(e, x (n, W)) -> (n, H)``. Initialised like
    ``nn.Linear`` (uniform in +-1/sqrt(in)) per expert."""

    def __init__(self, num_experts: int, in_features: int, layers: Sequence[int]):
        super().__init__()
        if not layers:
            raise ValueError("model.expert_layers must list at least one layer size")
        sizes = [int(in_features)] + [int(s) for s in layers]
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
            bound = 1.0 / math.sqrt(fan_in)
            self.weights.append(nn.Parameter(torch.empty(num_experts, fan_in, fan_out).uniform_(-bound, bound)))
            self.biases.append(nn.Parameter(torch.empty(num_experts, fan_out).uniform_(-bound, bound)))
        self.num_experts, self.out_features = int(num_experts), sizes[-1]

    def dense(self, x: torch.Tensor) -> torch.Tensor:
        h = x.unsqueeze(0)
        for weight, bias in zip(self.weights, self.biases):
            h = torch.relu(torch.baddbmm(bias.unsqueeze(1), h.expand(weight.shape[0], -1, -1), weight))
        return h

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        h = x
        for weight, bias in zip(self.weights, self.biases):
            h = torch.relu(torch.addmm(bias[e], h, weight[e]))
        return h


class MixtureOfExpertsArch(nn.Module):
    """Experts + one gate per task + one linear head per task: x (B, W) -> {task: (B,)}.

    Args:
        in_features: W.
        gate: factory ``gate(num_experts=, input_dim=, feature_names=)`` -> a ``recbench.gates`` Gate.
        num_experts: E.
        expert_layers: the towers' layer sizes.
        tasks: the task names; must contain "click".
        task_loss_weights: {task: loss weight} (missing tasks: 1.0).
        feature_names: the sparse fields (hash routing, gates routing on named fields).
        embedding_features: F * D, the width of the concatenated sparse-field embeddings the gates
            may route on (``input=embeddings``); None when the arch is used without them (then
            only ``input=over_arch`` gates can be built).
    """

    def __init__(self, in_features: int, gate: Callable[..., nn.Module], num_experts: int,
                 expert_layers: Sequence[int], tasks: Sequence[str] = (CLICK,),
                 task_loss_weights: Optional[Mapping[str, float]] = None, feature_names: Sequence[str] = (),
                 embedding_features: Optional[int] = None):
        super().__init__()
        tasks = [str(t) for t in tasks]
        if CLICK not in tasks or len(set(tasks)) != len(tasks):
            raise ValueError(f"model.tasks must name {CLICK!r} (the click logit) and each task once, got {tasks}")
        weights = dict(task_loss_weights or {})
        unknown = sorted(set(weights) - set(tasks))
        if unknown:
            raise ValueError(f"model.task_loss_weights names {unknown}, which are not in model.tasks={tasks}")
        self.task_weights = {task: float(weights.get(task, 1.0)) for task in tasks}
        self.experts = ExpertBank(num_experts, in_features, expert_layers)
        widths = {"over_arch": in_features, "embeddings": embedding_features}
        self.gates = nn.ModuleDict({task: gate(num_experts=num_experts, input_dim=widths,
                                               feature_names=list(feature_names)) for task in tasks})
        self.heads = nn.ModuleDict({task: nn.Linear(self.experts.out_features, 1) for task in tasks})
        self._extra_loss = torch.zeros(())

    @property
    def sparse_training(self) -> bool:
        return all(g.sparse_training for g in self.gates.values())

    def mix(self, x: torch.Tensor, weights: torch.Tensor, conditional: bool) -> torch.Tensor:
        """x (B, W), weights (T, B, E) -> the weighted expert outputs (T, B, H).

        ``conditional``: compute expert e only on the rows where some task's weight is non-zero (when
        every pair is selected, as with a dense gate, that is the batched dense computation)."""
        selected = (weights > 0).any(dim=0) if conditional else None  # (B, E)
        if selected is None or bool(selected.all()):
            return torch.einsum("tbe,ebh->tbh", weights, self.experts.dense(x))
        rows, experts = selected.nonzero(as_tuple=True)  # the (sample, expert) pairs to compute
        order = torch.argsort(experts, stable=True)
        rows, experts = rows[order], experts[order]
        counts = torch.bincount(experts, minlength=self.experts.num_experts).tolist()
        inputs = x.index_select(0, rows).split(counts)
        outputs = torch.cat([self.experts.expert(e, inputs[e]) for e in range(len(counts)) if counts[e]]
                            or [x.new_zeros(0, self.experts.out_features)])  # (pairs, H)
        scaled = weights[:, rows, experts].unsqueeze(-1) * outputs.unsqueeze(0)  # (T, pairs, H)
        return x.new_zeros(weights.shape[0], x.shape[0], self.experts.out_features).index_add(1, rows, scaled)

    def dense_param_groups(self) -> List[ParamGroup]:
        """The gates' parameters grouped by their own learning rate (gates with ``lr`` set); the
        other parameters train with the dense learning rate."""
        by_lr: Dict[float, List[nn.Parameter]] = {}
        for gate in self.gates.values():
            if gate.learning_rate is not None:
                by_lr.setdefault(gate.learning_rate, []).extend(gate.parameters())
        return [ParamGroup(f"gate_lr_{lr:g}", params, learning_rate=lr) for lr, params in by_lr.items() if params]

    @staticmethod
    def routing(gate: nn.Module, x: torch.Tensor, embeddings: Optional[torch.Tensor]) -> torch.Tensor:
        """The routing input ``gate`` reads: the over-arch input x (B, W) or the embeddings (B, F * D)."""
        if gate.routing_input == "over_arch":
            return x
        if embeddings is None:
            raise ValueError(f"gate {gate.name!r} routes on the sparse-field embeddings, which were not passed")
        return embeddings

    def forward(self, x: torch.Tensor, features=None, embeddings: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """x (B, W) the over-arch input, features the batch's KJT, embeddings (B, F * D) -> {task: (B,)}."""
        conditional = not self.training or self.sparse_training  # decided before the gates advance their steps
        outputs = [gate(self.routing(gate, x, embeddings), features) for gate in self.gates.values()]
        self._extra_loss = sum((o.loss for o in outputs), torch.zeros((), device=x.device))
        weights = torch.stack([o.weights for o in outputs])  # (T, B, E)
        mixed = self.mix(x, weights, conditional=conditional)
        return {task: head(mixed[i]).squeeze(-1) for i, (task, head) in enumerate(self.heads.items())}

    def extra_loss(self) -> torch.Tensor:
        return self._extra_loss

    @torch.no_grad()
    def diagnostics(self, x: torch.Tensor, features=None, embeddings: Optional[torch.Tensor] = None) -> Dict[str, float]:
        """Sums over the batch (divide by B for per-sample means) of the routing at inference:
        experts computed, each gate's non-zeros, whether its training-form (soft) routing was
        already <= k-sparse, the fraction of its smooth-step nodes saturated at exactly 0 or 1
        (DSelect-k, COMET) and how many samples it routes to each expert (its load; a collapsed
        gate sends every sample to the same experts), plus the over-arch's FLOPs (gates, computed
        experts, heads)."""
        was_training = self.training
        self.eval()
        try:
            with FlopCounterMode(display=False) as counter:
                self(x, features, embeddings)
            routed = {task: self.routing(gate, x, embeddings) for task, gate in self.gates.items()}
            hard = {task: gate(routed[task], features, hard=True).weights for task, gate in self.gates.items()}
            soft = {task: gate(routed[task], features, hard=False).weights for task, gate in self.gates.items()}
            saturation = {task: gate.saturated_fraction(routed[task]) for task, gate in self.gates.items()}
        finally:
            self.train(was_training)
        stats = {"moe/flops_per_sample": float(counter.get_total_flops()),
                 "moe/experts_computed_per_sample": float(torch.stack([w > 0 for w in hard.values()]).any(0).sum())}
        for task, gate in self.gates.items():
            stats[f"moe/{task}/nonzeros_per_sample"] = float((hard[task] > 0).sum())
            stats[f"moe/{task}/exactly_sparse_fraction"] = float(((soft[task] > 0).sum(-1) <= gate.k).sum())
            if saturation[task] is not None:
                stats[f"moe/{task}/saturated_fraction"] = float(saturation[task].sum())
            for e, routed in enumerate((hard[task] > 0).sum(0).tolist()):  # load: share of samples per expert
                stats[f"moe/{task}/load/expert_{e:02d}"] = float(routed)
        return stats


def expert_tower(top_mlp: Sequence[int], expert_layers: Optional[Sequence[int]]) -> List[int]:
    """The experts' layer sizes: ``expert_layers``, or the protocol's top MLP without its final 1."""
    if expert_layers is not None:
        return [int(s) for s in expert_layers]
    layers = [int(s) for s in top_mlp][:-1]
    if not layers:
        raise ValueError(f"model.top_mlp={list(top_mlp)} has no hidden layer to build experts from; set model.expert_layers")
    return layers


def over_arch_width(over: nn.Module) -> int:
    """The input width of a base model's over-arch (its first Linear)."""
    return next(m for m in over.modules() if isinstance(m, nn.Linear)).in_features


class MoEInput(NamedTuple):
    """What the MoE head reads: x (B, W) the interaction output the experts consume, embeddings
    (B, F * D) the concatenated sparse-field embeddings (the gates' default routing input)."""

    x: torch.Tensor
    embeddings: torch.Tensor


class MoEModelMixin:
    """Replaces a base model's ``over`` by a ``MixtureOfExpertsArch``; forward -> {task: (B,)}."""

    def _attach_moe(self, gate, num_experts, tasks, task_loss_weights, top_mlp, expert_layers) -> None:
        width = over_arch_width(self.over)
        del self.over
        self.moe = MixtureOfExpertsArch(width, gate, num_experts, expert_tower(top_mlp, expert_layers), tasks,
                                        task_loss_weights, getattr(self.embedding, "feature_names", ()),
                                        embedding_features=self.num_sparse * self.embedding_dim)

    def interact(self, dense_out: torch.Tensor, embedded) -> MoEInput:
        """The base model's over-arch input plus the sparse-field embeddings (B, F * D) the gates may route on."""
        return MoEInput(super().interact(dense_out, embedded), embedded.values())

    def dense_param_groups(self) -> List[ParamGroup]:
        return self.moe.dense_param_groups()

    @property
    def task_weights(self) -> Dict[str, float]:
        return self.moe.task_weights

    #: hash gates route on the ids (``EmbeddingModel.memo`` keeps the KJT for them)
    head_reads_sparse = True

    def head(self, representation: MoEInput, sparse) -> Dict[str, torch.Tensor]:
        return self.moe(representation.x, sparse, representation.embeddings)

    def extra_loss(self) -> torch.Tensor:
        return self.moe.extra_loss()

    @torch.no_grad()
    def diagnostics(self, dense: torch.Tensor, sparse) -> Dict[str, float]:
        was_training = self.training
        self.eval()
        try:
            representation = self.representation(dense, sparse)
            return self.moe.diagnostics(representation.x, sparse, representation.embeddings)
        finally:
            self.train(was_training)


class DLRMMoE(MoEModelMixin, DLRM):
    """DLRM whose over-arch is a mixture of experts.

    Args: as ``DLRM`` plus ``gate`` (gate factory, from ``recbench/conf/gate``), ``num_experts``, ``tasks``
    (default ["click"]), ``task_loss_weights`` ({task: weight}, default 1.0 each), ``expert_layers``
    (default: top_mlp[:-1])."""

    name = "dlrm_moe"

    def __init__(self, embedding: nn.Module, num_dense: int, num_sparse: int, embedding_dim: int,
                 bottom_mlp: Sequence[int], top_mlp: Sequence[int], gate: Callable[..., nn.Module],
                 num_experts: int = 16, tasks: Sequence[str] = (CLICK,),
                 task_loss_weights: Optional[Mapping[str, float]] = None, expert_layers: Optional[Sequence[int]] = None):
        super().__init__(embedding, num_dense, num_sparse, embedding_dim, bottom_mlp, top_mlp)
        self._attach_moe(gate, num_experts, tasks, task_loss_weights, top_mlp, expert_layers)


class DCNMoE(MoEModelMixin, DCNv2):
    """DCNv2 whose deep over-arch is a mixture of experts (args as ``DLRMMoE`` plus DCNv2's cross settings)."""

    name = "dcn_moe"

    def __init__(self, embedding: nn.Module, num_dense: int, num_sparse: int, embedding_dim: int,
                 bottom_mlp: Sequence[int], top_mlp: Sequence[int], gate: Callable[..., nn.Module],
                 num_experts: int = 16, tasks: Sequence[str] = (CLICK,),
                 task_loss_weights: Optional[Mapping[str, float]] = None, expert_layers: Optional[Sequence[int]] = None,
                 cross_layers: int = 3, cross_rank: int = 64):
        super().__init__(embedding, num_dense, num_sparse, embedding_dim, bottom_mlp, top_mlp,
                         cross_layers=cross_layers, cross_rank=cross_rank)
        self._attach_moe(gate, num_experts, tasks, task_loss_weights, top_mlp, expert_layers)
