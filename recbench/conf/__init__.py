"""recbench's Hydra configs, shipped inside the package (an installed wheel runs as a clone does).

``CONFIG_DIR`` is this folder; the sub-folders are the config groups and the registry
(``method/*.yaml`` are the methods, ``gate/*.yaml`` the gates, ``sweep/*.yaml`` the presets).
This module reads files only (no torch, no Hydra), so every layer may use it.

References: docs/architecture.md section 7.
"""
from __future__ import annotations

import functools
import sys
from importlib import metadata, util
from pathlib import Path
from typing import Dict, Sequence, Tuple

import yaml

#: the folder of the Hydra configs
CONFIG_DIR = str(Path(__file__).resolve().parent)
#: the entry-point group through which an installed package adds its config folder (methods,
#: datasets, presets): ``[project.entry-points."recbench.conf"] mypkg = "mypkg.conf"``, where
#: ``mypkg.conf`` is a package whose folder holds ``method/<name>.yaml`` and so on
ENTRY_POINT_GROUP = "recbench.conf"


class EntryPointError(ValueError):
    """An installed package's ``recbench.conf`` entry point that names no config folder."""


def entry_point_dirs() -> Tuple[str, ...]:
    """The config folders of installed packages (entry-point group ``recbench.conf``), by entry-point
    name. Each value is a package, found without importing it (a config folder is data).

    Read once per ``sys.path`` (a metadata scan costs ~14 ms, and every composed config asks twice:
    a sweep plan composes hundreds); a package installed into a folder already on the path while the
    process runs is seen by the next process."""
    return _entry_point_dirs(tuple(sys.path))


@functools.lru_cache(maxsize=8)
def _entry_point_dirs(path: Tuple[str, ...]) -> Tuple[str, ...]:
    out = []
    for entry in sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        spec = util.find_spec(entry.value) if entry.value and ":" not in entry.value else None
        folders = list(spec.submodule_search_locations or []) if spec else []
        if not folders:
            dist = getattr(entry.dist, "name", "?")
            raise EntryPointError(f"entry point {entry.name} = {entry.value!r} of package {dist} (group "
                                  f"{ENTRY_POINT_GROUP}): not an importable package; it must name a package "
                                  "whose folder holds method/<name>.yaml and the other config groups")
        out.append(str(Path(folders[0]).resolve()))
    return tuple(out)


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
