"""``recbench``: train and evaluate one (dataset, model, method, budget, seed) job, or a
multirun sweep of them (``recbench -m ...``), tracking each job as one MLflow run.

References: Hydra (``hydra.main``), docs/architecture.md section 7.
"""
from __future__ import annotations

import json
import logging
import os
import shlex
import sys
from pathlib import Path

import hydra
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from recbench.gates.settings import override_error
from recbench.runs.config import (CONFIG_DIR, composition_problem, moved_keys, override_problem,
                                  register_method_schemas, register_schema_placeholders, search_dirs)



#: exit status of ``recbench``: 0 every job finished, skipped or was infeasible; 1 a job failed while it
#: ran; 2 a bad argument, setting, name, tracking URI or input data (docs/cli.md, "Exit status")
EXIT_FAILED, EXIT_USAGE = 1, 2


def main() -> int:
    """The ``recbench`` command: one job, or a multirun (``-m``) whose failed jobs make the exit
    status non-zero (counted from the sweep's ``outcome.json`` files by ``FailedJobs``)."""
    FailedJobs.counted = None
    sys.argv[1:], notes = moved_keys(sys.argv[1:])
    for note in notes:
        print(f"recbench: note: {note}", file=sys.stderr)
    overrides = sys.argv[1:]
    moved = override_error(overrides) or override_problem(overrides) or tracking_problem(overrides)
    if not moved and all("=" in a and not a.startswith("-") for a in overrides):  # one job: compose it once first
        moved = composition_problem(overrides)
    if moved:
        print(f"recbench: error: {moved}", file=sys.stderr)
        return EXIT_USAGE
    if not {"-h", "--help", "--hydra-help"} & set(overrides):
        register_method_schemas(search_dirs(overrides))  # the methods' structured configs (their YAML uses them)
    else:
        register_schema_placeholders()  # the help page composes the default config without importing TorchRec
    _hydra_main()
    if FailedJobs.counted:
        failed, total = FailedJobs.counted
        print(f"recbench: {failed} of {total} job(s) of this multirun failed (their outcome.json and MLflow runs "
              "say why)", file=sys.stderr)
        return EXIT_FAILED
    return 0


class FailedJobs(Callback):
    """Counts the failed jobs of a multirun from the ``outcome.json`` files of its sweep folder."""

    counted = None

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        outcomes = list(Path(config.hydra.sweep.dir).glob("*/outcome.json"))
        failed = sum(1 for path in outcomes if _status(path) == "failed")
        FailedJobs.counted = (failed, len(outcomes)) if failed else None


def _status(path: Path) -> str:
    try:
        return str(json.loads(path.read_text()).get("status", "failed"))
    except (OSError, ValueError):
        return "failed"


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def _hydra_main(cfg: DictConfig) -> float:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from recbench.runs.job import run_job
    from recbench.runs.result import format_result
    from recbench.training import distributed

    hydra_cfg = HydraConfig.get()
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    overrides = list(hydra_cfg.overrides.task)
    tags = {"overrides": " ".join(overrides), "command": shlex.join(["recbench", *overrides])}
    outcome = Path(hydra_cfg.runtime.output_dir) / "outcome.json"
    try:
        with distributed.session(bool(cfg.runtime.get("distributed", False))) as parallel:
            result = run_job(cfg, extra_tags=tags)
        if not parallel.is_main:  # rank 0 reports the run
            return float(result.metrics.get("val/auc", float("nan")))
    except Exception as exc:
        _write_outcome(outcome, {"status": "failed", "reason": f"{type(exc).__name__}: {exc}"[:2000],
                                 "overrides": overrides})
        if multirun:  # recorded as FAILED; the sweep goes on, and its log says which job and why
            logging.getLogger("recbench").error("job failed: %s: %s", type(exc).__name__, exc)
            return float("nan")
        # one job: the error is said once, on stderr (a log line as well would repeat it on stdout)
        if _is_user_error(exc) and not os.environ.get("RECBENCH_DEBUG"):
            print(f"recbench: error: {exc} (RECBENCH_DEBUG=1 shows the traceback)", file=sys.stderr)
            sys.exit(_exit_status(exc))
        raise
    _write_outcome(outcome, {"status": result.status, "reason": result.reason, "run_id": result.run_id,
                             "overrides": overrides})
    print(format_result(cfg, result), flush=True)
    if result.status == "failed" and not multirun:
        sys.exit(EXIT_FAILED)
    return float(result.metrics.get("val/auc", float("nan")))


def tracking_problem(overrides) -> str | None:
    """The MLflow store a command would use, checked before anything heavy is imported
    (``check_tracking_uri``): a one-line reason when it cannot work, else None."""
    from recbench.tracking.mlflow_tracker import StoreError, check_tracking_uri, default_tracking_uri

    if any(o in ("tracking=memory", "-h", "--help", "--hydra-help") for o in overrides):
        return None
    given = [o.split("=", 1)[1] for o in overrides if o.lstrip("+").startswith("tracking.tracking_uri=")]
    uri = given[-1] if given else default_tracking_uri()
    if "," in uri or "$" in uri:  # a sweep over stores, or an interpolation: checked by each job
        return None
    try:
        check_tracking_uri(uri)
    except StoreError as exc:
        return str(exc)
    return None


def _is_user_error(exc: BaseException) -> bool:
    """Bad data, impossible settings, a full disk: a one-line message, not a traceback."""
    from recbench.runs.config import ConfigError
    from recbench.datasets.errors import DatasetError
    from recbench.datasets.storage import CacheCorruptError
    from recbench.tracking.mlflow_tracker import StoreError
    from recbench.training.checkpoint import CheckpointWriteError
    from recbench.training.distributed import DistributedSetupError

    return isinstance(exc, (ConfigError, DatasetError, DistributedSetupError, FileNotFoundError, StoreError,
                            CheckpointWriteError, CacheCorruptError))


def _exit_status(exc: BaseException) -> int:
    """2 when the input is wrong (a setting, a name, the data or store it points at: fix it and run
    again), 1 when the work itself failed (a checkpoint that could not be written: disk full)."""
    from recbench.training.checkpoint import CheckpointWriteError

    return EXIT_FAILED if isinstance(exc, CheckpointWriteError) else EXIT_USAGE


def _write_outcome(path: Path, outcome: dict) -> None:
    """The job's outcome next to its Hydra log, read by ``recbench-sweep`` to count a sweep."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(outcome, default=str))
    except OSError as exc:  # bookkeeping only: never fail a job over it
        logging.getLogger("recbench").warning("could not write %s: %s", path, exc)


if __name__ == "__main__":
    sys.exit(main())
