"""A finished run's kept model: loading it back and evaluating it again (``recbench-eval``).

A run keeps its deployable model as the artifact ``model.pt`` (``tracking.keep_model=deployable``,
the default): the model the run's test metrics measured, with the embedding's deployable form.

References: docs/architecture.md section 5 ("Tracking"); ``mlflow.pytorch.load_model`` (the same
pickle format: load only runs you trust).
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from recbench.datasets.batching import BatchIterator
from recbench.runs.job import MODEL_ARTIFACT
from recbench.runs.settings import instantiate_dataset
from recbench.tracking.mlflow_tracker import default_tracking_uri
from recbench.models.tasks import collect_predictions
from recbench.training.trainer import Trainer


def _client(tracking_uri: Optional[str]):
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one model file: no bar
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri or default_tracking_uri())


def load_kept(run_id: str, tracking_uri: Optional[str] = None) -> Tuple[torch.nn.Module, DictConfig]:
    """``(model, config)``: the deployable model a run kept, in eval mode, and its resolved config.
    Raises FileNotFoundError naming the run when it kept no model."""
    client = _client(tracking_uri)
    names = {a.path for a in client.list_artifacts(run_id)}
    if MODEL_ARTIFACT not in names:
        raise FileNotFoundError(f"run {run_id} kept no model (artifacts: {', '.join(sorted(names)) or 'none'}); "
                                "a run keeps one with tracking.keep_model=deployable (the default)")
    with tempfile.TemporaryDirectory() as tmp:
        model = torch.load(client.download_artifacts(run_id, MODEL_ARTIFACT, tmp), weights_only=False)
        config = OmegaConf.load(Path(client.download_artifacts(run_id, "config.yaml", tmp)))
    return model.eval(), config


@torch.no_grad()
def evaluate_model(model: torch.nn.Module, cfg: DictConfig, split: str = "test",
                   data_root: Optional[Path] = None) -> Dict[str, float]:
    """Exact metrics (AUC, log loss, task MSEs) of ``model`` on ``split`` of the run's dataset
    protocol (prepared, or reused from the cache under ``data_root``, default the config's), by the
    Trainer's own rules (``collect_predictions``, ``Trainer.metrics_of``)."""
    prepared = instantiate_dataset(cfg).prepare(Path(data_root or cfg.paths.data_root))
    model.eval()
    batches = BatchIterator(prepared.spec, prepared.split(split), int(cfg.trainer.eval_batch_size))
    labels, outputs, targets = collect_predictions((model(b.dense_features, b.sparse_features), b) for b in batches)
    return Trainer.metrics_of((np.concatenate(labels), {k: np.concatenate(v) for k, v in outputs.items()},
                               {k: np.concatenate(v) for k, v in targets.items()}))


def recorded_metrics(run_id: str, tracking_uri: Optional[str] = None) -> Dict[str, float]:
    return dict(_client(tracking_uri).get_run(run_id).data.metrics)
