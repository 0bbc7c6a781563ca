"""Known third-party warnings and log records that say nothing to a recbench user, filtered at
recbench's entry points by message AND the module that emits them (never a blanket ignore).

Each entry states why it is safe to drop:

* torch ``Sparse invariant checks are implicitly disabled`` (UserWarning raised inside
  ``torch.sparse_coo_tensor`` when an optimizer builds the sparse update of an embedding table):
  torch's own reminder that it does not validate sparse tensors unless asked; recbench's sparse
  gradients come from ``nn.EmbeddingBag(sparse=True)``/autograd, which are valid by construction.
* torch.fx ``is_fx_tracing will return true for both fx.symbolic_trace and torch.export`` (a
  WARNING log record of ``torch.fx._symbolic_trace``, emitted the first time TorchRec's
  ``KeyedJaggedTensor``/regroup code calls ``torchrec.fx.tracer.is_fx_tracing``): a deprecation
  notice to TorchRec's developers; recbench neither traces nor exports.
* mlflow ``Creating initial MLflow database tables...`` and ``Updating database tables`` (INFO
  records of ``mlflow.store.db.utils``, printed by MLflow's own handler when a SQLite store is
  created): bookkeeping of a new store file, which recbench creates on purpose.
* mlflow ``SQLAlchemy database error. The following exception is caught`` (an ERROR record of
  ``mlflow.store.db.utils`` carrying the whole SQLAlchemy traceback, ~90 lines): MLflow logs it and
  then raises the same error as an ``MlflowException``, which recbench turns into one line naming
  the cause (``recbench.tracking.mlflow_tracker.StoreError``) or retries when it is transient.

Call ``quiet_known_warnings()`` first thing in every entry point (CLI mains and the Hydra task
function, which also runs inside joblib/Ray/submitit workers); it is idempotent.

References: Python ``warnings.filterwarnings`` (message and module are regular expressions matched
at the start) and ``logging.Filter``.
"""
from __future__ import annotations

import logging
import re
import warnings
from typing import Tuple

#: (category, message regex, emitting-module regex) of warnings.warn calls to drop
KNOWN_WARNINGS: Tuple[Tuple[type, str, str], ...] = (
    (UserWarning, r"Sparse invariant checks are implicitly disabled", r"torch\.optim\.(adagrad|sgd|sparse_adam)$"),
)
#: (logger name, message prefix) of log records to drop
KNOWN_LOG_RECORDS: Tuple[Tuple[str, str], ...] = (
    ("torch.fx._symbolic_trace", "is_fx_tracing will return true for both fx.symbolic_trace and torch.export"),
    ("mlflow.store.db.utils", "Creating initial MLflow database tables"),
    ("mlflow.store.db.utils", "Updating database tables"),
    ("mlflow.store.db.utils", "SQLAlchemy database error. The following exception is caught"),
)


class _DropKnown(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def quiet_known_warnings() -> None:
    """Install the filters above in this process (idempotent)."""
    for category, message, module in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    for name, prefix in KNOWN_LOG_RECORDS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropKnown) and f.prefix == prefix for f in logger.filters):
            logger.addFilter(_DropKnown(prefix))


def is_known(message: str) -> bool:
    """Whether a printed line is one of the filtered notices (used by the tests)."""
    return any(re.search(m, message) for _, m, _ in KNOWN_WARNINGS) or any(p in message for _, p in KNOWN_LOG_RECORDS)
