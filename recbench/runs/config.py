"""Where the configs are, and composing one job's config from overrides (no launcher).

``recbench/conf/`` (package data: an installed wheel has it) is the registry: ``method/*.yaml`` are
the methods, ``gate/*.yaml`` the gates, ``sweep/*.yaml`` the sweep presets. This module imports only Hydra, so a command's ``--help``
stays fast; ``complete_method`` imports the selected method's module when a config is composed.

References: Hydra's compose API (``initialize_config_dir``, ``compose``).
"""
from __future__ import annotations

import dataclasses
import functools
import os
import typing
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from omegaconf import DictConfig, OmegaConf

from recbench.conf import CONFIG_DIR, entry_point_dirs, targets


class ConfigError(ValueError):
    """An impossible configuration value (reported before any run is recorded)."""


def compose(overrides: Sequence[str] = (), return_hydra_config: bool = False) -> DictConfig:
    """The resolved-on-access job config of ``recbench/conf/config.yaml`` with ``overrides`` applied
    (e.g. ``["method=hashing", "budget.compression_ratio=0.1"]``)."""
    from hydra import compose as hydra_compose, initialize_config_dir

    register_method_schemas(search_dirs(overrides))
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return hydra_compose("config", overrides=list(overrides), return_hydra_config=return_hydra_config)


def search_dirs(overrides: Sequence[str]) -> Tuple[str, ...]:
    """The folders where methods of other packages keep their ``method/<name>.yaml``: those of
    installed packages' ``recbench.conf`` entry points (``conf.entry_point_dirs``; Hydra's search
    path gets them from ``hydra_plugins/recbench_entry_points``) and those a
    ``hydra.searchpath=[file://...]`` override adds."""
    out: List[str] = list(entry_point_dirs())
    for override in overrides:
        key, _, value = override.partition("=")
        if key.lstrip("+") == "hydra.searchpath":
            out += [part.strip().strip("'\"")[len("file://"):] for part in value.strip("[]").split(",")
                    if part.strip().strip("'\"").startswith("file://")]
    return tuple(out)


#: the config group of the methods' structured configs: ``recbench/conf/method/<name>.yaml`` lists
#: ``/schema/method/<name>@_here_`` first in its defaults
SCHEMA_GROUP = "schema/method"


def method_schema(method_class: type) -> type:
    """The structured config of a method: ``_target_``, ``name`` and the fields of its
    ``settings_class`` (their types and defaults: the one source of each hyperparameter)."""
    hints = typing.get_type_hints(method_class.settings_class)  # resolved (the modules use postponed annotations)
    settings = [(f.name, hints[f.name], dataclasses.field(default=f.default, default_factory=f.default_factory))
                for f in dataclasses.fields(method_class.settings_class)]
    target = f"{method_class.__module__}.{method_class.__qualname__}"
    return dataclasses.make_dataclass(f"{method_class.__name__}Config", [
        ("_target_", str, dataclasses.field(default=target)),
        ("name", str, dataclasses.field(default=method_class.name)), *settings])


def method_classes(extra_dirs: Sequence[str] = ()) -> Dict[str, type]:
    """{method name: its class}, from the ``_target_`` of each ``method/*.yaml`` of ``recbench/conf/`` and of
    ``extra_dirs`` (imports them)."""
    from hydra.utils import get_class

    return {name: get_class(target) for name, target in targets("method", extra_dirs).items()}


@functools.lru_cache(maxsize=None)
def register_resolvers() -> None:
    """``${recbench_pid:}``: this process's id, which keeps two launches in one second apart in
    ``hydra.sweep.dir`` (recbench/conf/config.yaml); registered when this module is imported, so any
    composition of recbench's configs can resolve it."""
    if not OmegaConf.has_resolver("recbench_pid"):
        OmegaConf.register_new_resolver("recbench_pid", lambda: str(os.getpid()))


register_resolvers()


@functools.lru_cache(maxsize=None)
def register_method_schemas(extra_dirs: Tuple[str, ...] = ()) -> None:
    """Store each method's structured config in Hydra's ConfigStore (group ``schema/method``): the
    methods of ``recbench/conf/method`` and of the search-path folders ``extra_dirs``.

    Called before any config is composed, and done once per process and ``extra_dirs`` (a sweep's
    planner composes every job: reading the method files and building the schemas each time cost
    ~0.14 s per job). It imports every method module: the ~7 CPU-seconds of importing TorchRec,
    which a job pays anyway; ``recbench --help`` stores empty placeholders instead
    (``register_schema_placeholders``, which forgets what was registered)."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    for name, method_class in method_classes(extra_dirs).items():
        if dataclasses.fields(method_class.settings_class):
            store.store(group=SCHEMA_GROUP, name=name, node=method_schema(method_class))


def register_schema_placeholders() -> None:
    """Empty ``schema/method`` nodes for every method config, without importing the methods: enough
    for ``recbench --help`` to compose the default config (its page shows groups, not settings)."""
    from hydra.core.config_store import ConfigStore

    register_method_schemas.cache_clear()  # the real schemas must be stored again before a job composes
    store = ConfigStore.instance()
    for name in groups().get("method", []):
        store.store(group=SCHEMA_GROUP, name=name, node={})


#: top-level keys of a job's config that are not config groups (recbench/conf/config.yaml)
ROOT_KEYS = ("seed", "sweep_id", "sweep_preset", "hydra")


def groups() -> Dict[str, List[str]]:
    """{config group: its options}, read from the folders of ``recbench/conf/`` (the registry) and of
    the installed packages' ``recbench.conf`` entry points."""
    found: Dict[str, set] = {}
    for root in (Path(CONFIG_DIR), *map(Path, entry_point_dirs())):
        for folder in sorted(root.iterdir()):
            if folder.is_dir():
                found.setdefault(folder.name, set()).update(p.stem for p in folder.glob("*.yaml"))
    return {name: sorted(options) for name, options in sorted(found.items()) if options}


#: keys that moved to another group: {old: new}. Commands recorded before the move (a run's
#: ``command`` tag, the leaderboards' commands) still repeat: ``moved_keys`` rewrites them.
MOVED_KEYS = {f"trainer.{key}": f"runtime.{key}" for key in ("num_threads", "resume", "distributed", "sharding_types")}


def moved_keys(overrides: Sequence[str]) -> Tuple[List[str], List[str]]:
    """(``overrides`` with every moved key written at its new place, a note per rewritten key)."""
    out, notes = [], []
    for override in overrides:
        key, sep, value = override.partition("=")
        bare = key.lstrip("+~")
        if sep and bare in MOVED_KEYS:
            override = f"{key[:len(key) - len(bare)]}{MOVED_KEYS[bare]}={value}"
            notes.append(f"{bare} is now {MOVED_KEYS[bare]}; read as {override}")
        out.append(override)
    return out, notes


def composition_problem(overrides: Sequence[str]) -> Optional[str]:
    """A one-line error when Hydra cannot compose a job from ``overrides`` (a key its group does
    not have, a value its type refuses: ``method.partitions=abc``), else None."""
    try:
        compose_checked(overrides)
        return None
    except ConfigError as exc:
        return str(exc)


def compose_checked(overrides: Sequence[str]) -> DictConfig:
    """``compose(overrides)``, or ConfigError with ``_composition_message``'s one line."""
    from hydra.errors import ConfigCompositionException

    try:
        return compose(overrides)
    except ConfigCompositionException as exc:
        raise ConfigError(_composition_message(exc, overrides)) from exc


def _composition_message(exc: Exception, overrides: Sequence[str]) -> str:
    """One line for Hydra's composition error: the key, and what is allowed."""
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

    cause = exc.__cause__
    key = getattr(cause, "full_key", None)
    if isinstance(cause, (ConfigAttributeError, ConfigKeyError)) and key:
        parent = key.rpartition(".")[0]
        rest = [o for o in overrides if o.lstrip("+~").partition("=")[0] != key]
        try:
            node = compose(rest)
            known = [str(k) for k in (OmegaConf.select(node, parent) if parent else node).keys()
                     if not str(k).startswith("_") and not (parent == "method" and k == "name")]
        except Exception:  # noqa: BLE001 (the list is a courtesy)
            known = []
        return f"{key}: no setting of this name in {parent or 'the config'}; allowed: {', '.join(known)}"
    if isinstance(cause, ValidationError) and key:
        detail = str(cause).splitlines()[0]
        method = next((o.partition("=")[2] for o in overrides if o.startswith("method=")), "full")
        where = (f"`recbench-methods {method}` lists each setting's type" if key.startswith("method.")
                 else "`recbench --cfg job` shows each key's value")
        return f"{key}: {detail}; allowed: a value of the key's type ({where})"
    first = str(exc).splitlines()[0].rstrip(".")
    detail = str(cause).splitlines()[0] if cause is not None and str(cause) else ""
    return f"{first}: {detail}" if detail else first


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
                    where = " or an installed package's config folder" if entry_point_dirs() else ""
                    return (f"{key}={option}: there is no recbench/conf/{key}/{option}.yaml{where}; allowed: "
                            f"{', '.join(known[key])}")
        elif head not in known and head not in ROOT_KEYS and not override.startswith(("+", "++")):
            return (f"{key}: no setting of this name (its first part {head!r} is neither a config group nor a "
                    f"top-level key); allowed first parts: {', '.join(sorted([*known, *ROOT_KEYS]))}")
    return None
