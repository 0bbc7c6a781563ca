"""Evaluation for search stages: one split evaluated many times while no parameter changes.

A search stage (``Stage(kind="search")``, e.g. OptEmbed's evolutionary search) scores candidates
on a split without gradients; between two evaluations only the embedding module's search state
changes (a plain attribute such as OptEmbed's ``candidate``), never a parameter or buffer. So what
no candidate can change is computed once, at the first evaluation:

* the batches (``BatchIterator`` over batches of ``batch_rows``, default at most ``BATCH_ROWS``:
  the gathers from the memory-mapped split and the KJT construction; distributed, this rank's part
  of each batch), their labels and targets;
* the model's candidate-independent part of each batch, ``model.memo(dense, sparse)``
  (``recbench.models.common.EmbeddingModel``: the dense arch output, and the embedding module's
  ``precompute`` state, e.g. OptEmbed's rows at the full dim, or the KJT for modules without one);

and every evaluation runs ``model.forward_memo`` over the stored memos. Its predictions are those of
``Trainer.evaluate`` up to float summation order: the same operations on the same inputs, in
batches of ``batch_rows`` rows (a model's layers then keep their activations in the CPU cache; a
row's output does not depend on the other rows of its batch), restricted to the columns the
embedding module leaves nonzero where the model supports it (``DCNv2.forward_memo``), gathered and
scored by the same code (``Trainer.predictions``).

Validity: the memos carry a fingerprint of the model (its identity and its embedding module's, and
the version counter of every parameter and buffer, which every in-place update bumps); an
evaluation that finds it changed rebuilds the memos first (logged). Parameters updated outside
autograd's version counters (FBGEMM's fused tables, which train inside their backward) are not
seen: a search stage must not train, as its contract says.

Memory: at most ``max_bytes`` (``trainer.search_cache_mb``). The memo of the first batch times the
number of batches estimates the total; when the estimate or the running total passes the cap the
memos are dropped and every evaluation runs ``Trainer.evaluate`` (the uncached path: identical
results, slower). Which path runs, and why, is logged and is ``SearchEvaluation.cached``.

Distributed: every rank stores the memos of its part of each batch and the evaluation gathers the
global predictions as ``Trainer.evaluate`` does, so the score is the global one. All ranks take
the same path (the flags are exchanged with ``parallel.concat_ranks``): an uncached evaluation
runs DMP's forward, which holds collectives, so a rank may not skip it while another runs it.
The cached path calls the inner model's ``memo``/``forward_memo`` directly (no DDP forward: in
eval mode, without gradients, that only re-broadcasts buffers that ``check_replicas`` keeps equal).

References: docs/architecture.md section 3 ("Stages and hooks": search stages score candidates on validation
without gradients) and section 6.
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from recbench.datasets.batching import BatchIterator

log = logging.getLogger(__name__)

MB = 2 ** 20
#: default rows per stored batch: the fastest of 1024..16384 for DCNv2 on synthetic (one thread;
#: 1.4x against 16384, whose (B, 512) activations outgrow the cache)
BATCH_ROWS = 2048


@dataclass
class _Rows:
    """What the metrics need of a batch besides the model's outputs."""

    labels: torch.Tensor
    targets: Dict[str, torch.Tensor] = field(default_factory=dict)


def stored_bytes(obj: Any) -> int:
    """Bytes of the tensor storages reachable from ``obj`` (tensors, containers, dataclasses and
    plain objects such as a KJT; modules are not entered), each storage counted once."""
    seen_storages, seen_objects = set(), set()
    total = 0

    def walk(x: Any) -> None:
        nonlocal total
        if isinstance(x, torch.Tensor):
            storage = x.untyped_storage()
            if storage.data_ptr() not in seen_storages:
                seen_storages.add(storage.data_ptr())
                total += storage.nbytes()
            return
        if x is None or isinstance(x, (str, bytes, int, float, bool, nn.Module)) or id(x) in seen_objects:
            return
        seen_objects.add(id(x))
        if isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, (list, tuple, set)):
            for v in x:
                walk(v)
        elif dataclasses.is_dataclass(x):
            for f in dataclasses.fields(x):
                walk(getattr(x, f.name))
        elif hasattr(x, "__dict__"):
            for v in vars(x).values():
                walk(v)

    walk(obj)
    return total


def model_fingerprint(model: nn.Module) -> Tuple[Any, ...]:
    """Identity of the model and its embedding module plus every parameter's and buffer's
    (identity, version counter): any in-place update or module swap changes it."""
    tensors = itertools.chain(model.parameters(), model.buffers())
    return (id(model), id(getattr(model, "embedding", None)),
            tuple((id(t), getattr(t, "_version", 0)) for t in tensors))


class SearchEvaluation:
    """Repeated evaluation of one split for a search stage (see the module docstring).

    Args:
        trainer: the ``Trainer`` (its model, dataset, process strategy and evaluation batch size).
        split: the split to score ("val").
        max_bytes: the cap on the stored batches and memos (0: always uncached).
        batch_rows: rows per stored batch (None: ``BATCH_ROWS`` or the evaluation batch size if smaller).

    ``evaluate()`` returns what ``trainer.evaluate(split)`` returns for the model as it is now.
    Use as a context manager (or call ``close``) so the memos are freed when the search ends.
    """

    def __init__(self, trainer, split: str = "val", max_bytes: int = 512 * MB, batch_rows: Optional[int] = None):
        self.trainer, self.split, self.max_bytes = trainer, split, int(max_bytes)
        self.batch_rows = int(batch_rows or min(BATCH_ROWS, trainer.config.eval_batch_size))
        self.memos: Optional[List[Tuple[Any, _Rows]]] = None
        self.iterator = None
        self.fingerprint: Optional[Tuple[Any, ...]] = None
        self.bytes, self.reason, self.evaluations, self.builds = 0, "not built yet", 0, 0
        #: whether the last build stored its memos (evaluations over them), else ``Trainer.evaluate`` runs
        self.cached = False
        self._unsupported = self._check_model()

    def _check_model(self) -> str:
        model = self.trainer.model
        if not (callable(getattr(model, "memo", None)) and callable(getattr(model, "forward_memo", None))):
            return f"the model ({type(model).__name__}) does not expose memo/forward_memo (models.common.EmbeddingModel)"
        if self.max_bytes <= 0:
            return "trainer.search_cache_mb is 0"
        return ""

    @torch.no_grad()
    def _build(self) -> None:
        trainer, model = self.trainer, self.trainer.model
        self.memos, self.bytes, self.builds, self.cached = None, 0, self.builds + 1, False
        start, reason = time.perf_counter(), self._unsupported
        memos: List[Tuple[Any, _Rows]] = []
        if not reason:
            was_training = model.training
            model.eval()
            iterator = trainer.parallel.iterate(BatchIterator(trainer.dataset.spec, trainer.split(self.split),
                                                              self.batch_rows))
            batches = len(iterator)
            for batch in iterator:
                entry = (model.memo(batch.dense_features, batch.sparse_features),
                         _Rows(batch.labels, dict(getattr(batch, "targets", None) or {})))
                size = stored_bytes(entry)
                estimate = max(self.bytes + size, size * batches)
                if not memos and estimate > self.max_bytes or self.bytes + size > self.max_bytes:
                    reason = (f"the memos need ~{estimate / MB:.0f} MB ({batches} batches of the {self.split!r} split), "
                              f"above trainer.search_cache_mb={self.max_bytes / MB:g}")
                    break
                memos.append(entry)
                self.bytes += size
            model.train(was_training)
            self.iterator = iterator
        # one path on every rank: an uncached evaluation runs collectives inside DMP's forward
        if bool(trainer.parallel.concat_ranks([torch.tensor([bool(reason)])])[0].any()):
            self.reason = reason or "another rank's memos exceed trainer.search_cache_mb"
            self.bytes, self.iterator = 0, None
            log.info("search evaluation of the %r split: uncached (%s); every candidate runs the whole forward",
                     self.split, self.reason)
            return
        self.memos, self.reason, self.cached = memos, "", True
        self.fingerprint = model_fingerprint(model)
        log.info("search evaluation of the %r split: cached (%d batches, %.1f MB of this process's memos, cap %g MB, "
                 "built in %.1fs): dense arch outputs, batches and embedding lookups computed once",
                 self.split, len(memos), self.bytes / MB, self.max_bytes / MB, time.perf_counter() - start)

    def evaluate(self) -> Dict[str, float]:
        """Metrics of ``split`` for the model as it is now (``Trainer.evaluate``'s, exactly)."""
        self.evaluations += 1
        model = self.trainer.model
        if self.builds == 0 or (self.memos is not None and model_fingerprint(model) != self.fingerprint):
            if self.builds:
                log.info("search evaluation of the %r split: the model changed since its memos were made; rebuilding",
                         self.split)
            self._build()
        if self.memos is None:
            return self.trainer.evaluate(self.split)
        forwards = ((model.forward_memo(memo), rows) for memo, rows in self.memos)
        return self.trainer.metrics_of(self.trainer.predictions(model, self.iterator, forwards, self.split))

    def close(self) -> None:
        """Free the memos (``cached`` keeps telling which path the evaluations took)."""
        self.memos, self.iterator, self.bytes = None, None, 0

    def __enter__(self) -> "SearchEvaluation":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
