"""Stage results as run artifacts: a JSON document per stage, its tensors in a compressed ``.npz``.

A stage result (``recbench.training.trainer``) is a dict of scalars, strings, lists and tensors
(masks, thresholds, chosen dims). ``jsonable`` turns it into JSON, replacing each tensor or array
by a summary (shape, dtype, the ``.npz`` key holding it and, for small ones, its values), so that
``stages.json`` stays readable for a 10^6-row mask; ``write_stage_result`` writes
``stage<k>_<name>.json`` and, when the result holds arrays, ``stage<k>_<name>.npz``.

References: docs/architecture.md section 5 (artifacts of a run).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Mapping

import numpy as np
import torch

#: arrays with at most this many entries are also written inline in the JSON document
INLINE_ENTRIES = 64


def _array(value: Any) -> np.ndarray:
    return value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)


def jsonable(value: Any, arrays: Dict[str, np.ndarray] | None = None, key: str = "") -> Any:
    """A JSON-serialisable copy of ``value``; tensors/arrays go to ``arrays[key]`` (when given)."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v, arrays, f"{key}.{k}" if key else str(k)) for k, v in value.items()}
    if isinstance(value, (torch.Tensor, np.ndarray)):
        array = _array(value)
        summary: Dict[str, Any] = {"shape": list(array.shape), "dtype": str(array.dtype)}
        if arrays is not None:
            arrays[key] = array
            summary["npz_key"] = key
        if array.size <= INLINE_ENTRIES:
            summary["values"] = array.tolist()
        return summary
    if isinstance(value, (list, tuple)):
        return [jsonable(v, arrays, f"{key}.{i}") for i, v in enumerate(value)]
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def write_stage_result(directory: Path, index: int, name: str, result: Mapping[str, Any]) -> List[Path]:
    """Write one stage's result to ``directory``; returns the written paths (JSON first)."""
    import json

    directory = Path(directory)
    arrays: Dict[str, np.ndarray] = {}
    document = {"stage_index": index, "stage": name, "result": jsonable(result, arrays)}
    stem = f"stage{index}_{name}"
    paths = [directory / f"{stem}.json"]
    paths[0].write_text(json.dumps(document, indent=2, sort_keys=True))
    if arrays:
        paths.append(directory / f"{stem}.npz")
        np.savez_compressed(paths[1], **arrays)
    return paths
