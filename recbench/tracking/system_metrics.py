"""A run's system metrics: MLflow's own monitor (``system/cpu_utilization_percentage``,
``system/system_memory_usage_megabytes``, disk and network use, GPU use when ``pynvml`` is
installed) sampling this machine every ``interval`` seconds from a background thread while the
run is open. It needs ``psutil`` (``pip install 'recbench[system-metrics]'``); without it a job
says so once and records none.

The settings are ``tracking.system_metrics`` (true | false, default true) and
``tracking.system_metrics_interval_s`` (seconds between samples, default 10: a sample costs about a
millisecond of CPU and each a small write to the store). They are outside the config hash (the
whole ``tracking`` group is, ``recbench.runs.identity.NON_NUMERIC_KEYS``). A run shorter than one
interval gets no sample: the monitor logs the mean of the samples taken in each interval.

References: docs/architecture.md section 5 ("Tracking schema"); MLflow
``mlflow.system_metrics.system_metrics_monitor.SystemMetricsMonitor``.
"""
from __future__ import annotations

import importlib.util
import logging
import math
from typing import Any, Optional

log = logging.getLogger(__name__)

#: default seconds between two samples
DEFAULT_INTERVAL_S = 10.0
#: MLflow's monitor logs at INFO when it starts and stops and when no GPU is found, for every run:
#: its WARNING and ERROR records (a sample that could not be written) still show
MONITOR_LOGGER = "mlflow.system_metrics.system_metrics_monitor"
_said_unavailable = False


def check_settings(enabled: Any, interval: Any) -> None:
    """``ValueError`` naming the key and the allowed values unless ``enabled`` is a boolean and
    ``interval`` a positive number of seconds."""
    if not isinstance(enabled, bool):
        raise ValueError(f"tracking.system_metrics={enabled!r}; allowed: true, false")
    if isinstance(interval, bool) or not isinstance(interval, (int, float)) or not math.isfinite(interval) \
            or interval <= 0:
        raise ValueError(f"tracking.system_metrics_interval_s={interval!r}; allowed: a number of seconds > 0")


def available() -> bool:
    """Whether MLflow's monitor can run here (it samples through ``psutil``)."""
    return importlib.util.find_spec("psutil") is not None


def start(run_id: str, tracking_uri: str, interval: float, resumed: bool = False) -> Optional[Any]:
    """MLflow's monitor of the open run ``run_id``, started; None when ``psutil`` is missing (said
    once per process). ``resumed``: its samples continue after the steps the run already has. Stop
    it with ``stop`` before the run ends (its last samples are written then)."""
    global _said_unavailable
    if not available():
        if not _said_unavailable:
            log.info("no system metrics: psutil is not installed (pip install 'recbench[system-metrics]'), "
                     "or set tracking.system_metrics=false")
            _said_unavailable = True
        return None
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    logging.getLogger(MONITOR_LOGGER).setLevel(logging.WARNING)
    monitor = SystemMetricsMonitor(run_id, sampling_interval=interval, resume_logging=resumed,
                                   tracking_uri=tracking_uri)
    monitor.start()
    return monitor


def stop(monitor: Optional[Any]) -> None:
    """Stop ``monitor`` (from ``start``) and write its last samples; None: nothing to do."""
    if monitor is not None:
        monitor.finish()
