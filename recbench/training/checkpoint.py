"""Atomic checkpoints that load with ``weights_only=True``.

A checkpoint holds only tensors, numbers, strings, lists and dicts: model and optimizer
states, progress counters, RNG state and stage results. It is written to a temporary file and
renamed, so a kill during the write leaves the previous checkpoint intact; before a resume, every
member's CRC-32 is verified, so damage from outside is detected rather than trained on.

References: docs/architecture.md section 8; torch.load(weights_only=True).
"""
from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch


def checkpointable(value: Any) -> Any:
    """``value`` with numpy arrays and scalars turned into tensors and Python numbers (the types
    ``weights_only=True`` loads), recursively through dicts, lists and tuples."""
    if isinstance(value, dict):
        return {k: checkpointable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(checkpointable(v) for v in value)
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    if isinstance(value, np.generic):
        return value.item()
    return value


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (full disk, file size limit, permissions)."""


def save_checkpoint(path: Path, payload: Dict[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:  # torch reports a full disk or EFBIG as "unexpected pos"
        tmp.unlink(missing_ok=True)
        raise CheckpointWriteError(f"could not write the checkpoint {path} ({type(exc).__name__}: "
                                   f"{str(exc).splitlines()[0][:200]}); check the free space of its disk and the "
                                   "file size limit (ulimit -f), or set trainer.checkpoint_every_steps=0") from exc


def unreadable(path: Path) -> Optional[str]:
    """Why the checkpoint at ``path`` cannot be loaded (truncated, overwritten, not a checkpoint),
    or None when it loads. A checkpoint is only ever replaced by a rename, so this means damage
    from outside (disk, copy, hand edit)."""
    try:
        source = Path(path)
        # torch.load does not check the archive's CRC-32s, so a flipped byte inside a tensor would
        # load and silently change the resumed run; zipfile's testzip reads every member and checks it
        with zipfile.ZipFile(source) as archive:
            damaged = archive.testzip()
        if damaged is not None:
            return f"checksum mismatch in {damaged} (the file changed after it was written)"
        payload = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - every load failure is the answer
        return f"{type(exc).__name__}: {exc}".splitlines()[0][:500]
    if not isinstance(payload, dict) or "progress" not in payload or "model" not in payload:
        return "not a recbench checkpoint (no 'model' / 'progress' entries)"
    return None


def set_aside(path: Path) -> Path:
    """Rename the checkpoint at ``path`` to ``<name>.unreadable`` (kept for inspection, never loaded)."""
    path = Path(path)
    aside = path.with_name(path.name + ".unreadable")
    os.replace(path, aside)
    return aside


def load_checkpoint(path: Path) -> Optional[Dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)
