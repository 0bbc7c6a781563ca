"""The compression-method contract.

A method is two objects (docs/architecture.md section 3):

* ``CompressionMethod`` — instantiated by Hydra from ``recbench/conf/method/<name>.yaml`` with
  hyperparameters only. ``solve`` turns ``auto`` hyperparameters into values that meet the
  budget and returns them as a ``Plan`` with their closed-form ``memory``; ``build`` returns the
  embedding module of that plan,
  ``stages``/``hooks``/``rebuild`` drive multi-stage schedules inside the one trainer loop.
* ``EmbeddingModule`` — an ``nn.Module`` with TorchRec's embedding-bag-collection interface:
  ``forward(KeyedJaggedTensor) -> KeyedTensor`` with one ``dim``-wide output per field, plus
  ``extra_loss``, ``param_groups``, ``fused_optimizer``, ``memory_report`` and ``to_inference``.

References: docs/architecture.md section 3 ("Compression method", "Budget and memory", "Stages and hooks").
"""
from __future__ import annotations

import abc
import copy
import dataclasses
import functools
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch
from torch import nn
from omegaconf import DictConfig, ListConfig, OmegaConf
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from recbench.methods.blocks.quantized_tables import QUANTIZE_OPTIONS, quantized_memory, solve_composed
from recbench.types import (Budget, EmbeddingOptimizer, InfeasibleBudget, MemoryReport, ParamGroup,  # noqa: F401
                            Plan, Stage, TableSpec, under_budget)  # (InfeasibleBudget, ParamGroup: re-exported)


class Hook:
    """Trainer callbacks a method can register; every method is a no-op by default.

    ``context`` is the trainer's ``TrainContext`` (model, embedding, stage, step, metrics).
    Return value of ``on_step_end``/``on_eval_end``: True requests the current stage to end.
    ``on_stage_end`` may return a mapping merged into the stage's result (the stage artifacts the
    next stage's ``rebuild`` needs: masks, thresholds, chosen dims); it is checkpointed and logged.
    """

    def on_stage_start(self, context: Any) -> None: ...

    def on_step_end(self, context: Any) -> Optional[bool]:
        return None

    def on_eval_end(self, context: Any, metrics: Mapping[str, float]) -> Optional[bool]:
        return None

    def on_stage_end(self, context: Any) -> Optional[Mapping[str, Any]]:
        return None


class IdOutOfRange(ValueError):
    """An id outside ``[0, num_embeddings)`` of its field reached an embedding module."""


def check_ids(features: KeyedJaggedTensor, tables: Sequence[TableSpec]) -> None:
    """Raise ``IdOutOfRange`` naming the field, the id and the allowed range when any id of a
    field in ``tables`` is negative or >= its ``num_embeddings`` (keys of other names are not checked).

    Cost: one min/max reduction per checked key over its slice of the (nnz,) values (~0.2 ms for
    26 x 4096 ids, against ~3.5 ms for a per-id comparison against repeated limits); only a batch
    that fails is scanned id by id, to name the first bad id. This check is what makes it safe to
    run FBGEMM's lookups without their own per-index bounds check (``tables.skip_bounds_check``).
    """
    rows = {t.name: t.num_embeddings for t in tables}
    keys = features.keys()
    if not any(k in rows for k in keys):
        return
    values = features.values()
    if values.numel() == 0:
        return
    lengths = features.length_per_key()
    checked = [(k, part) for k, part in zip(keys, values.split(lengths)) if k in rows and part.numel()]
    if not checked:
        return
    low = torch.stack([part.min() for _, part in checked])
    high = torch.stack([part.max() for _, part in checked])
    limits = torch.tensor([rows[k] for k, _ in checked], dtype=high.dtype, device=high.device)
    failing = ((low < 0) | (high >= limits)).nonzero()
    if failing.numel():
        key, part = checked[int(failing[0])]
        bad = (part < 0) | (part >= rows[key])
        raise IdOutOfRange(
            f"field {key!r}: id {int(part[int(bad.nonzero()[0])])} is outside [0, {rows[key]}) ({int(bad.sum())} "
            "such id(s) of this field in the batch); allowed: row indices of the protocol's vocabulary, where "
            "unseen values map to the OOV row 0. If the batch came from a prepared cache, run "
            "`recbench-data verify <dataset>`: it re-hashes every file (a change that keeps a file's size and "
            "mtime, such as bit rot, is not seen on load)")


def _check_ids_hook(tables: Sequence[TableSpec], module: nn.Module, args) -> None:
    if args and isinstance(args[0], KeyedJaggedTensor):
        check_ids(args[0], tables)


def guard_ids(module: nn.Module, tables: Sequence[TableSpec]) -> nn.Module:
    """Make every forward of ``module`` (KJT -> ...) reject ids outside its fields' ranges (once)."""
    if not getattr(module, "_id_guard", False):
        module.register_forward_pre_hook(functools.partial(_check_ids_hook, list(tables)))
        module._id_guard = True
    return module


class EmbeddingModule(nn.Module, abc.ABC):
    """Base of every embedding module.

    Args:
        tables: one TableSpec per field, in KeyedJaggedTensor key order.
        dim: the logical output dim D per field (the model's embedding_dim).

    ``forward(features: KeyedJaggedTensor) -> KeyedTensor`` with keys = field names and
    ``values()`` of shape (B, F * D).
    """

    def __init__(self, tables: Sequence[TableSpec], dim: int):
        super().__init__()
        self.tables = list(tables)
        self.dim = int(dim)
        self.feature_names = [t.name for t in self.tables]
        # every forward (training and deployable form) rejects ids outside [0, num_embeddings):
        # FBGEMM would otherwise replace them by row 0 with only a log line, hashing would hash them
        guard_ids(self, self.tables)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """A subclass's ``to_inference`` may return any module: its result gets the same id guard."""
        super().__init_subclass__(**kwargs)
        if "to_inference" in cls.__dict__:
            original = cls.__dict__["to_inference"]

            @functools.wraps(original)
            def to_inference(self) -> nn.Module:
                return guard_ids(original(self), self.tables)

            cls.to_inference = to_inference

    @abc.abstractmethod
    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor: ...

    def extra_loss(self) -> torch.Tensor:
        """Regularisation added to the task loss (scalar); zero by default."""
        return torch.zeros(())

    def fused_optimizer(self):
        """The optimizer fused into FBGEMM's backward (a KeyedOptimizer), or None."""
        return None

    def fused_parameters(self) -> List[nn.Parameter]:
        """Parameters updated inside the backward pass (excluded from every other optimizer)."""
        return []

    def param_groups(self) -> List[ParamGroup]:
        """Non-fused trainable parameters of this module, grouped; default: one dense group."""
        fused = {id(p) for p in self.fused_parameters()}
        params = [p for p in self.parameters() if p.requires_grad and id(p) not in fused]
        return [ParamGroup("embedding", params)] if params else []

    @abc.abstractmethod
    def memory_report(self) -> MemoryReport:
        """Bytes measured from the tensors actually held (must equal the method's closed form)."""

    def to_inference(self) -> nn.Module:
        """The deployable form; outputs match this module within the method's stated tolerance."""
        clone = copy.deepcopy(self)
        return clone.eval()

    def precompute(self, features: KeyedJaggedTensor) -> Any:
        """Lookup state of ``features`` that stays valid while no parameter or buffer changes and only
        the module's search state does (e.g. OptEmbed's candidate dims): search stages evaluate the
        validation split many times (``recbench.training.search_cache``) and compute this once per
        batch. ``forward_precomputed(precompute(f))`` must equal the eval-mode ``forward(f)``.
        Default: the features themselves (nothing is saved)."""
        return features

    def forward_precomputed(self, state: Any) -> KeyedTensor:
        """The eval-mode output (B, F * D) for ``precompute``'s state."""
        return self(state)

    def keyed_output(self, values: torch.Tensor) -> KeyedTensor:
        """Wrap (B, F * D) values as a KeyedTensor over this module's fields."""
        return KeyedTensor(keys=self.feature_names, length_per_key=[self.dim] * len(self.feature_names), values=values)


@dataclasses.dataclass
class NoSettings:
    """The settings of a method without hyperparameters."""


@dataclasses.dataclass
class QuantizeSettings:
    """The composition setting of methods whose deployable form is plain tables (``physical_tables``):
    their settings dataclass inherits it."""

    quantize: str = "none"  #: none | fp16 | int8 | int4 | int2: store every deployable table row-wise quantized (FBGEMM n-bit), the budget solved for the pair


class CompressionMethod(abc.ABC):
    """Base of every compression method (hyperparameters only; instantiated by Hydra).

    Subclasses set ``name`` (one identifier for file, config, card, MLflow tag and leaderboard
    row) and ``settings_class``, and implement ``solve_hparams``, ``memory`` and ``build``;
    ``solve`` is the one public entry to the budget solver (it returns the ``Plan``).

    Hyperparameters have one source: the fields of ``settings_class``, a dataclass whose fields
    carry each one's type, default and meaning. It is the method's Hydra structured config
    (``recbench.runs.config.register_method_schemas`` stores it in Hydra's ConfigStore;
    ``recbench/conf/method/<name>.yaml`` lists it first in its defaults, and only selects the method). Each field becomes an attribute of the method;
    ``check_settings`` rejects unsupported values and derives further attributes.
    """

    name: str = "method"
    #: the dataclass of the method's hyperparameters (their one source)
    settings_class: type = NoSettings
    #: True when ``build`` looks up plain TorchRec/FBGEMM tables (fused lookups, shardable).
    table_backed: bool = True
    #: Bumped when a fix changes the numbers a configuration produces. A revision above 1 enters
    #: the run's config hash (``recbench.runs.identity.config_hash``), so a re-launched sweep re-runs the
    #: runs an older revision finished instead of skipping them; revision 1 leaves hashes as they were.
    #: Each bump is listed in the method's card ("Revisions").
    revision: int = 1

    def __init__(self, name: Optional[str] = None, **hyperparameters: Any):
        if name is not None and name != self.name:
            raise ValueError(
                f"recbench/conf/method config names {name!r} but its _target_ is the {self.name!r} method; "
                "the config file name, `name` and the class must agree"
            )
        known = [f.name for f in dataclasses.fields(self.settings_class)]
        unknown = sorted(set(hyperparameters) - set(known))
        if unknown:
            raise TypeError(f"method {self.name!r} has no setting {', '.join(map(repr, unknown))}; allowed: "
                            f"{', '.join(known) or 'none (it has no hyperparameters)'}")
        plain = {k: OmegaConf.to_container(v, resolve=True) if isinstance(v, (DictConfig, ListConfig)) else v
                 for k, v in hyperparameters.items()}
        #: the method's hyperparameters as given (an instance of ``settings_class``)
        self.settings = self.settings_class(**plain)
        for key in known:
            setattr(self, key, getattr(self.settings, key))
        if getattr(self, "quantize", "none") not in QUANTIZE_OPTIONS:
            raise ValueError(f"method {self.name!r}: quantize={self.quantize!r}; allowed: {', '.join(QUANTIZE_OPTIONS)}")
        self.check_settings()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """A subclass's ``build`` hands a composed plan's precision to its module (``compose_quantized``)."""
        super().__init_subclass__(**kwargs)
        if "build" in cls.__dict__ and not getattr(cls.__dict__["build"], "__isabstractmethod__", False):
            original = cls.__dict__["build"]

            @functools.wraps(original)
            def build(self, tables, dim, plan, *args, **kwargs):
                module = original(self, tables, dim, plan, *args, **kwargs)
                quantize = plan.hparams.get("quantize", "none")
                if quantize != "none":
                    module.compose_quantized(quantize)
                return module

            cls.build = build

    def check_settings(self) -> None:
        """Raise ValueError for an unsupported hyperparameter value (naming the key and what is
        allowed); derive attributes from the settings. Default: nothing to check."""

    # ----- budget -----
    def solve(self, tables: Sequence[TableSpec], dim: int, budget: Budget,
              optimizer: EmbeddingOptimizer = EmbeddingOptimizer()) -> Plan:
        """The job's one call to the budget solver: the plan ``build`` builds and the job logs.

        Pure: ``solve_hparams`` (raises InfeasibleBudget) and the closed-form ``memory`` of its
        result, with the requested ratio and the ``under_budget`` verdict.
        """
        if getattr(self, "quantize", "none") != "none":  # composed with quantized tables (blocks/quantized_tables.py)
            hparams = solve_composed(self, tables, dim, budget, self.quantize, optimizer)
            memory = quantized_memory(self, tables, dim, hparams, self.quantize, optimizer)
        else:
            hparams = self.solve_hparams(tables, dim, budget)
            memory = self.memory(tables, dim, hparams, optimizer)
        return Plan(self.name, hparams, memory, budget.compression_ratio,
                    under_budget(memory.compression_ratio, budget))

    @abc.abstractmethod
    def solve_hparams(self, tables: Sequence[TableSpec], dim: int, budget: Budget) -> Dict[str, Any]:
        """Pure: concrete hyperparameters meeting the budget, or raise InfeasibleBudget."""

    @abc.abstractmethod
    def memory(self, tables: Sequence[TableSpec], dim: int, hparams: Mapping[str, Any],
               optimizer: EmbeddingOptimizer = EmbeddingOptimizer()) -> MemoryReport:
        """Pure closed-form memory of the method with these hyperparameters."""

    def physical_tables(self, tables: Sequence[TableSpec], dim: int, hparams: Mapping[str, Any]) -> List[Any]:
        """The ``PhysicalTable`` list (name, rows, dim, features) that ``hparams`` builds, for methods
        whose deployable form is plain tables plus id rewrites (they take ``QuantizeSettings``)."""
        raise NotImplementedError(f"method {self.name!r} does not compose with method.quantize")

    # ----- module -----
    @abc.abstractmethod
    def build(self, tables: Sequence[TableSpec], dim: int, plan: Plan,
              optimizer: EmbeddingOptimizer = EmbeddingOptimizer()) -> EmbeddingModule:
        """Build the embedding module of ``plan`` (this method's ``solve`` result) for these tables;
        never solves the budget again."""

    # ----- schedule -----
    def stages(self) -> List[Stage]:
        return [Stage("train")]

    def hooks(self) -> List[Hook]:
        return []

    def rebuild(self, module: EmbeddingModule, stage_result: Mapping[str, Any]) -> EmbeddingModule:
        """Between stages: return the module for the next stage (default: unchanged)."""
        return module
