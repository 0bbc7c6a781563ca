"""``recbench``: train and evaluate one (dataset, model, method, budget, seed) job, or a
multirun sweep of them (``recbench -m ...``), tracking each job as one MLflow run.

References: Hydra (``hydra.main``), DESIGN.md section 7.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "conf")


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def main(cfg: DictConfig) -> float:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from recbench.cli.job import format_result, run_job

    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    try:
        result = run_job(cfg)
    except Exception as exc:
        logging.getLogger("recbench").error("job failed: %s: %s", type(exc).__name__, exc)
        if multirun:  # recorded as FAILED; the sweep goes on
            return float("nan")
        raise
    print(format_result(cfg, result), flush=True)
    return float(result.metrics.get("val/auc", float("nan")))


if __name__ == "__main__":
    sys.exit(main())
