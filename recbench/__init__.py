"""recbench: embedding compression for recommender systems, benchmarked under one protocol and one
memory budget (TorchRec + FBGEMM, Hydra, MLflow).

Python API (``recbench.api``): ``recbench.run(...)`` runs one job and returns its metrics and
deployable model; ``recbench.load_run(run_id)`` gives a finished run's model back;
``recbench.methods.get(name, **settings)`` gives a method to solve and build on your
own tables; ``recbench.Budget`` is the budget. The commands: ``recbench``, ``recbench-sweep``,
``recbench-report``, ``recbench-methods``, ``recbench-data``, ``recbench-bench``.

References: README.md; docs/architecture.md.
"""
from __future__ import annotations

from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("recbench")
except _metadata.PackageNotFoundError:  # a source tree that was not installed
    __version__ = "0+unknown"

__all__ = ["__version__", "run", "load_run", "methods", "Budget"]


def __getattr__(name: str):
    """Lazy: ``import recbench`` stays cheap (torch and TorchRec load on first use)."""
    if name in ("run", "load_run"):
        from recbench import api

        return getattr(api, name)
    if name == "Budget":
        from recbench.types import Budget

        return Budget
    if name == "methods":
        import importlib

        return importlib.import_module("recbench.methods")
    raise AttributeError(f"module 'recbench' has no attribute {name!r}")
