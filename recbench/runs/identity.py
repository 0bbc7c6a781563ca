"""Run identity: the config hash, the group hash (seeds of one leaderboard row), the protocol tag,
the method revision and the run's labels.

A run is identified by the hash of the resolved settings that change its numbers; the keys that do
not (``NON_NUMERIC_KEYS``) and options at their historical default (``OPTIONAL_KEYS``) are left
out, so a re-launch on another machine, thread count or launcher recognises its finished runs.

References: docs/architecture.md ("Tracking schema and protocols").
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any, Dict, Optional

from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf

from recbench.types import settings_hash

#: resolved-config keys that do not change what a run measures (excluded from its config hash).
#: ``runtime.num_threads`` changes the order of float reductions: the first steps differ at float
#: tolerance and training can grow that into a difference of the size of seed noise (synthetic
#: ``tt_rec`` 0.1, seed 1: test AUC 0.7606 with 1 thread, 0.7564 with 2). Runs with other counts are
#: equally valid samples of the same job (so a 1-job and a 2-job sweep share finished runs), and each
#: run records its count (tag ``num_threads``, and in its ``command``) so that it repeats bit for bit.
#: ``dataset.raw_dir`` is where a generated dataset is written (derived from ``paths.data_root``: a
#: relative and an absolute data root gave one configuration two hashes). Adding a key here changes
#: recorded runs' hashes: re-tag them with ``python -m recbench.runs.rehash``.
NON_NUMERIC_KEYS = ("tracking", "paths", "sweep_id", "sweep_preset", "trainer.progress", "runtime.num_threads",
                    "runtime.resume", "trainer.checkpoint_every_steps", "trainer.log_every_steps",
                    "trainer.search_cache_mb", "dataset.raw_dir", "hydra",
                    # where runs recorded before the `runtime` group kept them (re-hashing their configs)
                    "trainer.num_threads", "trainer.resume")
#: keys added after runs were recorded, whose default leaves the numbers unchanged: they enter the
#: config hash only when set to something else, so adding an option never orphans finished runs
#: (a re-launched sweep still recognises them, and the report keeps them in one row)
#: ``dataset.row_order``: runs recorded before the key existed numbered rows by frequency, so a
#: ``row_order=frequency`` run hashes as they do (and its protocol id is theirs)
OPTIONAL_KEYS = {"runtime.distributed": (None, False), "runtime.sharding_types": (None,),
                 # where runs recorded before the `runtime` group kept them (re-hashing their configs)
                 "trainer.distributed": (None, False), "trainer.sharding_types": (None,),
                 "dataset.row_order": ("frequency",),
                 # hashing's per-field layout is the layout its runs had before the key existed
                 # (a method whose numbers change with a new key's default bumps its revision)
                 "method.layout": ("per_field",),
                 # pruned tables were always charged at their compact storage before the key existed
                 "budget.sparse_index": ("compact",),
                 # a table method alone is its runs before the composition key existed
                 "method.quantize": ("none",)}


def _drop(mapping: Dict[str, Any], dotted: str) -> None:
    """Remove ``dotted``; a group its removal leaves empty goes too (``runtime`` at its defaults
    hashes as the configs recorded before the group existed)."""
    head, _, rest = dotted.partition(".")
    if head in mapping:
        if rest:
            if isinstance(mapping[head], dict):
                _drop(mapping[head], rest)
                if not mapping[head]:
                    del mapping[head]
        else:
            del mapping[head]


def _lookup(mapping: Dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(mapping, dict) or part not in mapping:
            return None
        mapping = mapping[part]
    return mapping


def method_revision(resolved: Dict[str, Any]) -> int:
    """The ``revision`` of the config's method class (1 when it has none or the config has no method)."""
    target = _lookup(resolved, "method._target_")
    if not target:
        return 1
    return int(getattr(get_class(str(target)), "revision", 1))


def config_hash(resolved: Dict[str, Any], ignore: tuple = (), revision: Optional[int] = None) -> str:
    """Hash of the settings that change a run's numbers, including the method's code revision
    when it is above 1 (``CompressionMethod.revision``): runs of an older revision are not "finished".
    ``revision`` overrides the current code's (re-hashing a recorded run: the revision it ran with)."""
    trimmed = json.loads(json.dumps(resolved, default=str))
    for key in NON_NUMERIC_KEYS + tuple(ignore):
        _drop(trimmed, key)
    for key, defaults in OPTIONAL_KEYS.items():
        if _lookup(trimmed, key) in defaults:
            _drop(trimmed, key)
    if revision is None:
        revision = method_revision(resolved)
    if revision > 1:
        trimmed["method_revision"] = revision
    return settings_hash(trimmed, length=16)


def group_hash(resolved: Dict[str, Any], revision: Optional[int] = None) -> str:
    """The config hash without the seed: runs sharing it are seeds of one leaderboard row."""
    return config_hash(resolved, ignore=("seed",), revision=revision)


def git_sha() -> str:
    """The full commit of the source tree (MLflow's ``mlflow.source.git.commit``), or "" outside git."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=7"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def protocol_tag(dataset_protocol_id: str, resolved: Dict[str, Any]) -> str:
    """Dataset protocol id + hash of the frozen training protocol (model, trainer, optimizer, and
    the MoE gate when the model has one)."""
    training = {k: resolved.get(k) for k in ("model", "trainer", "optimizer")}
    if "gate" in resolved:
        training["gate"] = resolved["gate"]
    trimmed = json.loads(json.dumps(training, default=str))
    # the keys that never change a run's numbers (one list: NON_NUMERIC_KEYS), and how a run is
    # parallelised (a 2-rank run of the protocol is the same protocol)
    for key in (*NON_NUMERIC_KEYS, *OPTIONAL_KEYS):
        _drop(trimmed, key)
    return f"{dataset_protocol_id}/{settings_hash(trimmed, 8)}"


def gate_tags(cfg: DictConfig) -> Dict[str, str]:
    """Tags of a mixture-of-experts run's gate (none for models without one)."""
    if cfg.get("gate") is None:
        return {}
    return {"gate": str(cfg.gate.name), "gate_k": str(cfg.gate.get("k")),
            "gate_local_search": str(bool(OmegaConf.select(cfg, "gate.local_search.enabled", default=False))).lower()}


def model_label(cfg: DictConfig) -> str:
    """The model's name in run names: ``dcn``, or ``dcn_moe[comet+ls]`` with its gate."""
    name = cfg.model.get("name", "model")
    if cfg.get("gate") is None:
        return name
    searched = OmegaConf.select(cfg, "gate.local_search.enabled", default=False)
    return f"{name}[{cfg.gate.name}{'+ls' if searched else ''}]"
