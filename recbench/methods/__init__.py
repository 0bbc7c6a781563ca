"""The compression methods: one module per ``recbench/conf/method/<name>.yaml``.

``base`` is the contract; ``families`` holds the bases shared by a family of methods (pruning,
low precision, product quantization); ``blocks`` holds the building blocks (tables, per-id
lookups, budget solver pieces, storage formats, hash functions).

References: ``recbench.methods.base``.
"""
from __future__ import annotations

import importlib
from typing import Any, List

from recbench.conf import targets


def names() -> List[str]:
    """The methods (``recbench/conf/method/*.yaml``)."""
    return sorted(targets("method"))


def get(name: str, **settings: Any):
    """The method ``name`` with its settings (its settings dataclass's defaults, overridden by
    ``settings``): a ``CompressionMethod`` whose ``solve(tables, dim, budget)`` returns the plan and
    ``build(tables, dim, plan)`` the embedding module, on your own tables.

    Example: ``plan = recbench.methods.get("qr").solve(tables, 16, Budget(0.1))``.
    Raises KeyError for an unknown name (naming the allowed ones), TypeError for an unknown
    setting and ValueError for an unsupported value."""
    known = targets("method")
    if name not in known:
        raise KeyError(f"no method {name!r}; allowed: {', '.join(sorted(known))}")
    module, _, cls = known[name].rpartition(".")
    return getattr(importlib.import_module(module), cls)(**settings)
