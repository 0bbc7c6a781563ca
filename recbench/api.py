"""recbench from Python (a notebook, a script): run one job and get its metrics and trained model.

    import recbench
    result = recbench.run("qr", dataset="movielens100k", compression_ratio=0.1, partitions=3)
    result.metrics["test/auc"], result.model          # the deployable model its test metrics measured
    recbench.methods.get("qr").solve(tables, 16, recbench.Budget(0.1))

No Hydra knowledge is needed: keyword arguments that are not parameters of ``run`` are the
method's settings (``recbench-methods NAME`` lists them); ``overrides`` takes any other Hydra
override (``"trainer.max_epochs=1"``). The job is the CLI's: same config hash, same MLflow run.

References: ``recbench.runs.job.run_job``; docs/architecture.md section 7.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

from recbench.quiet import quiet_known_warnings
from recbench.runs.config import ConfigError, compose_checked, moved_keys, override_problem
from recbench.runs.job import run_job
from recbench.runs.kept import load_kept
from recbench.runs.result import JobResult


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "null"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_value(v) for v in value) + "]"
    return str(value)


def run(method: str = "full", dataset: str = "movielens100k", compression_ratio: Optional[float] = None, *,
        seed: int = 0, model: Optional[str] = None, tracking: str = "mlflow", overrides: Sequence[str] = (),
        **settings: Any) -> JobResult:
    """Train and evaluate one job; return its ``JobResult`` (``status``, ``metrics``, ``run_id``,
    ``reason``, and ``model``: the deployable model the test metrics measured).

    Args:
        method, dataset, model: config options (``recbench-methods``; ``recbench/conf/dataset``,
            ``recbench/conf/model``; model defaults to the config's, DCNv2).
        compression_ratio: the budget (inference bytes / the uncompressed tables' bytes); default:
            the config's (1.0).
        seed: the run's seed.
        tracking: ``mlflow`` (the store of ``MLFLOW_TRACKING_URI``, default ``sqlite:///mlflow.db``
            in the working directory) or ``memory`` (nothing recorded: no skipping of finished runs).
        overrides: further Hydra overrides, e.g. ``["trainer.max_epochs=1", "runtime.num_threads=2"]``.
        **settings: the method's settings, e.g. ``partitions=3`` for ``qr``.

    Raises ConfigError (one line naming the key and what is allowed) for a bad setting.
    """
    items = [f"method={method}", f"dataset={dataset}", f"seed={seed}", f"tracking={tracking}"]
    if model is not None:
        items.append(f"model={model}")
    if compression_ratio is not None:
        items.append(f"budget.compression_ratio={compression_ratio}")
    items += [f"method.{key}={_value(value)}" for key, value in settings.items()]
    items, _ = moved_keys([*items, *overrides])
    problem = override_problem(items)
    if problem:
        raise ConfigError(problem)
    quiet_known_warnings()  # as the commands: known third-party notices that say nothing to a user
    return run_job(compose_checked(items), keep_model=True)  # composed once: checked and run


def load_run(run_id: str, tracking_uri: Optional[str] = None):
    """``(model, config)`` of a finished run: its deployable model in eval mode and its resolved
    config (``recbench.runs.kept.load_kept``; the model is a pickle: load only runs you trust)."""
    return load_kept(run_id, tracking_uri)
