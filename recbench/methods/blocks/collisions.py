"""Collision rates of id-rewriting table methods (hashing, unified, freq_prune, dedup, ...): how
many ids share their embedding with another id.

An id's embedding is the set of physical rows it looks up: its *signature*, a (k,) vector of
(table, row) keys (k = 1 for hashing; k probes for unified). Two ids collide when their signatures
are equal; across fields too, when fields share a table (hashing's ``global`` layout).

* ``emb/collision_rate``: the fraction of the vocabulary's ids (every field, every id) whose
  signature another id shares;
* ``emb/collision_rate_lookups``: the fraction of training lookups (ids weighted by their training
  counts) whose id shares its signature with another id seen in training.

The signatures come from the module's own ``rewrite`` (``FusedIdMapEmbedding``), run in eval mode
without gradients on one bag per id, so they are the rows the trained module looks up.

References: Weinberger et al., "Feature Hashing for Large Scale Multitask Learning" (ICML 2009),
collision analysis; Coleman et al., "Unified Embedding" (NeurIPS 2023), multi-probe collisions.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import numpy as np
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

TABLE_SHIFT = 40  # signature key = table index << 40 | row


def id_rows(module, field: str) -> Optional[torch.Tensor]:
    """(n_f, k) int64 signature keys of every id of ``field``, or None when ``module`` does not
    rewrite ids into its physical tables one value per id."""
    if not hasattr(module, "rewrite") or not hasattr(module, "fused") or not hasattr(module.fused, "physical"):
        return None
    table_of = {f: i for i, t in enumerate(module.fused.physical) for f in t.features}
    n = next(t.num_embeddings for t in module.tables if t.name == field)
    names = module.feature_names
    lengths = torch.cat([torch.ones(n, dtype=torch.int64) if k == field else torch.zeros(n, dtype=torch.int64)
                         for k in names])
    features = KeyedJaggedTensor(keys=names, values=torch.arange(n, dtype=torch.int64), lengths=lengths, stride=n)
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            rewritten = module.rewrite(features)
    except NotImplementedError:  # a table method that looks up without a rewrite of its own (adaembed)
        return None
    finally:
        module.train(was_training)
    if not isinstance(rewritten, KeyedJaggedTensor):
        return None
    keys = module.rewritten_keys(field)
    jagged = rewritten.to_dict()
    columns: List[torch.Tensor] = []
    for key in keys:
        if key not in jagged or key not in table_of or jagged[key].values().numel() != n:
            return None
        columns.append((table_of[key] << TABLE_SHIFT) + jagged[key].values().long())
    return torch.stack(columns, dim=1)


def _shared(signatures: torch.Tensor) -> torch.Tensor:
    """(N,) bool: the signature (row of an (N, k) tensor) occurs more than once."""
    if signatures.shape[0] == 0:
        return torch.zeros(0, dtype=torch.bool)
    if signatures.shape[1] == 1:  # one key per id: the flat unique
        _, inverse, counts = torch.unique(signatures[:, 0], return_inverse=True, return_counts=True)
        return counts[inverse] > 1
    # several keys: a lexicographic order by stable sorts, last column first (torch.unique(dim=0)
    # took over 10 min on 33M x 2 keys; this takes seconds), then equal neighbours form the groups
    order = torch.arange(signatures.shape[0])
    for column in reversed(range(signatures.shape[1])):
        order = order[torch.sort(signatures[order, column], stable=True).indices]
    ranked = signatures[order]
    starts = torch.ones(len(ranked), dtype=torch.bool)
    starts[1:] = (ranked[1:] != ranked[:-1]).any(dim=1)
    group = torch.cumsum(starts.long(), 0) - 1
    shared = torch.zeros(len(ranked), dtype=torch.bool)
    shared[order] = torch.bincount(group)[group] > 1
    return shared


def collision_rates(module) -> Dict[str, float]:
    """``emb/collision_rate`` and ``emb/collision_rate_lookups`` of ``module`` (empty when it has no
    one-value-per-id rewrite)."""
    signatures, counts = [], []
    for table in module.tables:
        rows = id_rows(module, table.name)
        if rows is None:
            return {}
        signatures.append(rows)
        counts.append(np.zeros(table.num_embeddings, dtype=np.int64) if table.counts is None
                      else np.asarray(table.counts, dtype=np.int64))
    width = max(rows.shape[1] for rows in signatures)  # fewer probes (a kept field): padded with -1, no row key
    every = torch.cat([torch.nn.functional.pad(rows, (0, width - rows.shape[1]), value=-1) for rows in signatures])
    metrics = {"emb/collision_rate": float(_shared(every).float().mean())}
    weight = torch.from_numpy(np.concatenate(counts))
    seen = weight > 0
    if bool(seen.any()):
        shared_seen = _shared(every[seen])
        metrics["emb/collision_rate_lookups"] = float((weight[seen] * shared_seen).sum() / weight[seen].sum())
    return metrics
