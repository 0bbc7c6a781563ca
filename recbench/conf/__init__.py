"""recbench's Hydra configs, shipped inside the package (an installed wheel runs as a clone does).

``CONFIG_DIR`` is this folder; the sub-folders are the config groups and the registry
(``method/*.yaml`` are the methods, ``gate/*.yaml`` the gates, ``sweep/*.yaml`` the presets).
This module reads files only (no torch, no Hydra), so every layer may use it.

References: docs/architecture.md section 7.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Sequence

import yaml

#: the folder of the Hydra configs
CONFIG_DIR = str(Path(__file__).resolve().parent)


def targets(group: str, extra_dirs: Sequence[str] = ()) -> Dict[str, str]:
    """{option: its ``_target_``} of a config group (``method``, ``gate``, ...), read from this
    folder and from ``extra_dirs`` (search-path folders of other packages)."""
    out: Dict[str, str] = {}
    for folder in (CONFIG_DIR, *extra_dirs):
        for path in sorted((Path(folder) / group).glob("*.yaml")):
            target = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("_target_")
            if target:
                out[path.stem] = str(target)
    return out
