"""A job's settings, checked before anything is prepared or recorded: typed (Budget, optimizers,
TrainerConfig), every value in its allowed range, and the model, gate and tasks compatible with
each other and with the prepared data.

References: docs/architecture.md ("Contracts"); recbench.checks.
"""
from __future__ import annotations

import inspect
import os
from typing import Any, NamedTuple

from hydra.errors import InstantiationException
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from recbench.checks import check_number
from recbench.runs.config import ConfigError
from recbench.datasets.errors import DatasetError
from recbench.gates.settings import LocalSearchSettings
from recbench.training import distributed
from recbench.training.optim import DenseOptimizer
from recbench.models.tasks import CLICK
from recbench.tracking.mlflow_tracker import StoreError, check_tracking_uri
from recbench.tracking.system_metrics import DEFAULT_INTERVAL_S, check_settings as check_system_metrics
from recbench.training.trainer import TrainerConfig
from recbench.types import Budget, EmbeddingOptimizer, full_embedding_bytes



def instantiate_without(cfg: DictConfig, drop=("protocol", "name"), **kwargs: Any) -> Any:
    """Instantiate a component config, leaving out keys that are not constructor arguments."""
    container = OmegaConf.to_container(cfg, resolve=True)
    for key in drop:
        container.pop(key, None)
    return instantiate(container, **kwargs)


def instantiate_tracker(cfg: DictConfig):
    """The job's tracker; a store that cannot be used is its own one-line ``StoreError`` (naming
    the store), not Hydra's wrapping of it."""
    try:
        return instantiate_without(cfg.tracking, drop=("skip_finished", "keep_model"))
    except InstantiationException as exc:
        if isinstance(exc.__cause__, StoreError):
            raise exc.__cause__ from None
        raise


def check_numeric_arguments(prefix: str, node: DictConfig) -> None:
    """A setting whose constructor default is a number must be a number: ``dataset.rows=abc`` is
    refused naming the key, the value and the type allowed (before the constructor's own message,
    which names neither)."""
    target = node.get("_target_")
    if not target:
        return
    try:
        parameters = inspect.signature(get_class(str(target))).parameters
    except (ImportError, ValueError, TypeError, AttributeError):
        return  # an unknown target is reported by instantiate itself
    for key, parameter in parameters.items():
        default, value = parameter.default, node.get(key)
        if isinstance(default, bool) or not isinstance(default, (int, float)) or not isinstance(value, str):
            continue
        try:
            float(value)
        except ValueError:
            kind = "an integer" if isinstance(default, int) else "a number"
            raise ConfigError(f"{prefix}.{key}={value!r} is not a number; allowed: {kind} "
                              f"(default {default!r})") from None


def instantiate_dataset(cfg: DictConfig):
    """The dataset protocol of ``cfg``; a bad setting is the protocol's own one-line error
    (``DatasetError``/``ConfigError``), not Hydra's wrapping of it."""
    check_numeric_arguments("dataset", cfg.dataset)
    try:
        return instantiate_without(cfg.dataset)
    except InstantiationException as exc:
        cause = exc.__cause__
        if isinstance(cause, DatasetError):
            raise cause from None
        if isinstance(cause, (ValueError, TypeError)):
            raise ConfigError(f"dataset {cfg.dataset.get('name')!r}: {cause}") from None
        raise


class JobSettings(NamedTuple):
    """A job's config read once: the typed settings every later step uses."""

    budget: Budget
    embedding_optimizer: EmbeddingOptimizer
    dense_optimizer: DenseOptimizer
    trainer: TrainerConfig
    method: Any  # the CompressionMethod, instantiated with its settings


def settings_of(cfg: DictConfig) -> JobSettings:
    """The validated ``JobSettings`` of a job's config (the method instantiated once).

    Called before anything is prepared or tracked, so an impossible value (a ratio outside (0, 1],
    an unknown optimizer kind, a zero batch size) is a clear error and no half-recorded run."""
    try:
        budget = Budget(**OmegaConf.to_container(cfg.budget, resolve=True))
        embedding_optimizer = EmbeddingOptimizer(**OmegaConf.to_container(cfg.optimizer.embedding, resolve=True))
        dense_optimizer = DenseOptimizer(**OmegaConf.to_container(cfg.optimizer.dense, resolve=True))
        trainer_kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
        check_number("seed", cfg.seed, integer=True, low=0)
        trainer_config = TrainerConfig(seed=cfg.seed, **trainer_kwargs)
        if cfg.runtime.get("num_threads") is not None:
            check_number("runtime.num_threads", cfg.runtime.num_threads, integer=True, low=1)
        check_number("model.embedding_dim", cfg.model.embedding_dim, integer=True, low=4)
        if cfg.model.embedding_dim % 4:
            raise ValueError(f"model.embedding_dim must be a multiple of 4 (FBGEMM tables), got {cfg.model.embedding_dim}")
        _check_gate(cfg)
        keep = cfg.tracking.get("keep_model", "deployable")
        if keep not in ("deployable", "none"):
            raise ValueError(f"tracking.keep_model={keep!r}; allowed: deployable, none")
        check_system_metrics(cfg.tracking.get("system_metrics", True),
                             cfg.tracking.get("system_metrics_interval_s", DEFAULT_INTERVAL_S))
    except TypeError as exc:  # an unknown key in a config group
        raise ConfigError(f"unknown setting: {exc}") from exc
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    try:  # hyperparameters only: cheap, and an unknown or ill-typed method setting fails here
        method = instantiate(cfg.method)
    except Exception as exc:
        cause = exc.__cause__ or exc
        raise ConfigError(f"method {cfg.method.get('name')!r}: {type(cause).__name__}: {cause}") from exc
    distributed.check_settings(bool(cfg.runtime.get("distributed", False)), cfg.runtime.get("sharding_types"))
    if cfg.tracking.get("tracking_uri"):
        check_tracking_uri(str(cfg.tracking.tracking_uri))  # before anything is prepared: StoreError, one line
    return JobSettings(budget, embedding_optimizer, dense_optimizer, trainer_config, method)


def _check_gate(cfg: DictConfig) -> None:
    """A gate only with a mixture-of-experts model, and its k within the model's experts."""
    model = cfg.model.get("name", "model")
    experts = cfg.model.get("num_experts")
    if cfg.get("gate") is None:
        return
    if experts is None:
        raise ValueError(f"gate={cfg.gate.get('name')} needs a mixture-of-experts model (model=dcn_moe or "
                         f"model=dlrm_moe); model={model} has no gate")
    check_number("model.num_experts", experts, integer=True, low=1)
    if cfg.gate.get("k") is not None:
        check_number("gate.k", cfg.gate.k, integer=True, low=1, high=experts)
    LocalSearchSettings.of(cfg.gate.get("local_search"))  # a mapping of known settings


def check_against_data(cfg: DictConfig, prepared) -> None:
    """Settings that can only be checked against the prepared dataset (before any run is recorded):
    validation and test hold both classes (else AUC is undefined), the model's tasks are targets
    the dataset has, and the full tables fit in this machine's memory."""
    spec = prepared.spec
    for split in ("val", "test"):
        labels = prepared.split(split).labels
        low, high = (float(labels.min()), float(labels.max())) if len(labels) else (0.0, 0.0)
        if low == high:
            raise ConfigError(f"dataset {spec.name} ({spec.protocol_id}): its {split} split has {len(labels)} row(s), "
                              f"all labelled {low:g}, so AUC is undefined; allowed: a dataset whose validation and "
                              "test splits hold both classes (e.g. more rows)")
    tasks = list(cfg.model.get("tasks") or [CLICK])
    unknown = [t for t in tasks if t != CLICK and t not in spec.extra_targets]
    if unknown:
        raise ConfigError(f"model.tasks names {unknown}, which {spec.name} does not have; allowed: "
                          f"{[CLICK, *spec.extra_targets]}")
    # a lower bound of what any method's job holds at once: the uncompressed tables (every method
    # starts from or is charged against them) and the pooled embeddings (B, F, D) of one eval batch
    dim = int(cfg.model.embedding_dim)
    pooled = int(cfg.trainer.eval_batch_size) * len(spec.tables) * dim * 4
    needed = full_embedding_bytes(spec.tables, dim) + pooled
    available = _physical_memory()
    if available and needed > available:
        raise ConfigError(f"model.embedding_dim={dim}: {spec.name}'s uncompressed tables plus one evaluation batch "
                          f"(trainer.eval_batch_size={cfg.trainer.eval_batch_size}) need at least "
                          f"{needed / 2**30:,.1f} GiB, more than this machine's {available / 2**30:,.1f} GiB of memory")


def _physical_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0
