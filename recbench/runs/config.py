"""Where the configs are, and composing one job's config from overrides (no launcher).

``conf/`` is the registry: ``conf/method/*.yaml`` are the methods, ``conf/gate/*.yaml`` the gates,
``conf/sweep/*.yaml`` the sweep presets. This module imports only Hydra, so a command's ``--help``
stays fast.

References: Hydra's compose API (``initialize_config_dir``, ``compose``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence

from omegaconf import DictConfig

#: the folder of the Hydra configs
CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "conf")


def compose(overrides: Sequence[str] = (), return_hydra_config: bool = False) -> DictConfig:
    """The resolved-on-access job config of ``conf/config.yaml`` with ``overrides`` applied
    (e.g. ``["method=hashing", "budget.compression_ratio=0.1"]``)."""
    from hydra import compose as hydra_compose, initialize_config_dir

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return hydra_compose("config", overrides=list(overrides), return_hydra_config=return_hydra_config)


#: top-level keys of a job's config that are not config groups (conf/config.yaml)
ROOT_KEYS = ("seed", "sweep_id", "sweep_preset", "hydra")


def groups() -> Dict[str, List[str]]:
    """{config group: its options}, read from the folders of ``conf/`` (the registry)."""
    root = Path(CONFIG_DIR)
    return {d.name: sorted(p.stem for p in d.glob("*.yaml")) for d in sorted(root.iterdir())
            if d.is_dir() and any(d.glob("*.yaml"))}


def override_problem(overrides: Sequence[str]) -> Optional[str]:
    """A one-line error for the first command-line override that names a config option that does not
    exist (``method=nosuch``) or a top-level key no config has (``nosuchkey=1``), else None. Sweep
    syntax (``a,b``, ``glob(...)``, ``range(...)``) is checked option by option where it is a list;
    overrides with a search path added (``hydra.searchpath``) are left to Hydra."""
    if any(o.startswith("hydra.searchpath") for o in overrides):
        return None
    known = groups()
    for override in overrides:
        if override.startswith("-") or "=" not in override:
            continue
        key, _, value = override.partition("=")
        key = key.lstrip("+~")
        head = key.split(".", 1)[0].split("/", 1)[0]
        if key in known and "(" not in value:  # a group choice: every listed option must exist
            for option in (v.strip() for v in value.split(",")):
                if option and option != "null" and option not in known[key]:
                    return (f"{key}={option}: there is no conf/{key}/{option}.yaml; allowed: "
                            f"{', '.join(known[key])}")
        elif head not in known and head not in ROOT_KEYS and not override.startswith(("+", "++")):
            return (f"{key}: no setting of this name (its first part {head!r} is neither a config group nor a "
                    f"top-level key); allowed first parts: {', '.join(sorted([*known, *ROOT_KEYS]))}")
    return None
