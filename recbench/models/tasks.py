"""The tasks a model predicts: the click logit and, optionally, regression targets.

A model's forward returns either click logits (B,) or a dict of task outputs {task: (B,)}
holding the click logits under ``"click"`` and, for every other task, a prediction of the
dataset's extra target of the same name (``RecBatch.targets[task]``, e.g. MovieLens' raw
``rating``). The one trainer loop trains and evaluates both forms:

- loss = w_click * BCE(click logits, labels) + sum_task w_task * MSE(prediction, target)
  + ``model.extra_loss()`` when the model has one (e.g. the regularisation of MoE gates),
  with the weights ``model.task_weights`` ({task: weight}; 1.0 when absent);
- evaluation: exact AUC / log loss of the click logits (``binary_metrics``) plus
  ``<task>_mse`` for each regression task; early stopping stays on the click AUC.

References: Ma et al., "Modeling Task Relationships in Multi-task Learning with Multi-gate
Mixture-of-Experts", KDD 2018 (one loss per task, summed with weights).
"""
from __future__ import annotations

from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple, Union

import numpy as np
import torch
from torch import nn

CLICK = "click"
REGRESSION_METRIC = "mse"

Output = Union[torch.Tensor, Mapping[str, torch.Tensor]]


def task_outputs(output: Output) -> Dict[str, torch.Tensor]:
    """A model's output as {task: (B,)}; a bare tensor is the click logits."""
    if isinstance(output, Mapping):
        if CLICK not in output:
            raise ValueError(f"a model returning a dict of task outputs must include {CLICK!r}; got {sorted(output)}")
        return dict(output)
    return {CLICK: output}


def regression_target(batch, task: str) -> torch.Tensor:
    """The extra target (B,) a regression task predicts, with a clear error when the dataset lacks it."""
    targets = getattr(batch, "targets", None) or {}
    if task not in targets:
        raise ValueError(f"model task {task!r} has no target in this dataset; its extra targets are "
                         f"{sorted(targets) or 'none'} (tasks other than {CLICK!r} are regressions on them)")
    return targets[task]


def training_loss(model: nn.Module, output: Output, batch, row_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The weighted sum of the task losses plus the model's own regularisation (scalar).

    Task losses are means over the batch, or ``sum_i row_scale_i * loss_i`` when ``row_scale``
    (B,) is given (a rank's part of a global batch: see ``recbench.training.distributed``)."""
    outputs = task_outputs(output)
    weights = getattr(model, "task_weights", None) or {}

    def reduce(per_row: torch.Tensor) -> torch.Tensor:
        return per_row.mean() if row_scale is None else (per_row * row_scale).sum()

    bce = nn.functional.binary_cross_entropy_with_logits(outputs[CLICK], batch.labels, reduction="none")
    loss = float(weights.get(CLICK, 1.0)) * reduce(bce)
    for task, prediction in outputs.items():
        if task != CLICK:
            target = regression_target(batch, task)
            loss = loss + float(weights.get(task, 1.0)) * reduce(nn.functional.mse_loss(prediction, target, reduction="none"))
    extra_loss = getattr(model, "extra_loss", None)
    if extra_loss is not None:
        loss = loss + extra_loss()
    return loss


def regression_metrics(outputs: Mapping[str, np.ndarray], targets: Mapping[str, np.ndarray]) -> Dict[str, float]:
    """``<task>_mse`` over a whole split for every regression task."""
    metrics = {}
    for task, target in targets.items():
        error = np.asarray(outputs[task], dtype=np.float64) - np.asarray(target, dtype=np.float64)
        metrics[f"{task}_{REGRESSION_METRIC}"] = float(np.mean(error * error)) if error.size else float("nan")
    return metrics


def split_task_metrics(metrics: Mapping[str, float], split: str) -> Dict[str, float]:
    """The regression metrics of ``evaluate`` keyed ``<split>/<task>_mse`` for logging."""
    suffix = f"_{REGRESSION_METRIC}"
    return {f"{split}/{key}": value for key, value in metrics.items() if key.endswith(suffix)}


def collect_predictions(forwards: Iterable[Tuple[Any, Any]]):
    """Per-batch arrays of (the model's output, its batch) pairs: click labels [(B,)], every task's
    outputs {task: [(B,)]} and the regression targets {task: [(B,)]} of the tasks the model predicts."""
    labels: List[np.ndarray] = []
    outputs: Dict[str, List[np.ndarray]] = {}
    targets: Dict[str, List[np.ndarray]] = {}
    for output, batch in forwards:
        for task, values in task_outputs(output).items():
            outputs.setdefault(task, []).append(values.float().numpy())
            if task != CLICK:
                targets.setdefault(task, []).append(regression_target(batch, task).numpy())
        labels.append(batch.labels.numpy())
    return labels, outputs, targets
