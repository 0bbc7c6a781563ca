"""The gates' typed settings that are read without building a gate: ``LocalSearchSettings``, the
config mapping ``gate.local_search`` (COMET+'s permutation local search,
``recbench.gates.local_search``), and the check that names its keys for a command-line override
that sets a flat ``gate.local_search_<setting>`` key or ``gate.local_search`` to a bool.

References: Ibrahim et al., "COMET: Learning Cardinality Constrained Mixture of Experts with
Trees and Local Search", KDD 2023 (section 4); mazumder-lab/COMET
``model/permutations/learn_permutations.py`` (commit cf272760f49b17fe0989d58a25a8409a71f130f7).
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, List, Mapping, Optional, Sequence, Union

#: the config key of the local search settings
LOCAL_SEARCH_KEY = "gate.local_search"


@dataclass(frozen=True)
class LocalSearchSettings:
    """A gate's permutation local search (the config mapping ``gate.local_search``).

    Args:
        enabled: learn a permutation of the expert order (COMET+).
        steps: training steps over which the permutation is learned; afterwards it is frozen at
            the nearest hard permutation.
        per_component: one permutation per component (tree/selector/hash); else one shared.
        entropy_reg: weight of the permutation's entropy regulariser.
        noise: scale of the Gumbel noise added to the permutation logits.
        tau_initial, tau_final: Sinkhorn temperature, annealed log-linearly.
    """

    enabled: bool = False
    steps: int = 1000
    per_component: bool = False
    entropy_reg: float = 1e-4
    noise: float = 0.0
    tau_initial: float = 1e-3
    tau_final: float = 1e-7

    @classmethod
    def names(cls) -> List[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def of(cls, value: Union["LocalSearchSettings", Mapping[str, Any], None]) -> "LocalSearchSettings":
        """The settings from ``gate.local_search`` (a mapping of the fields above; None: the defaults)."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if not isinstance(value, Mapping):
            raise ValueError(f"{LOCAL_SEARCH_KEY} is a mapping of settings, got {value!r}; "
                             f"turn the search on with {LOCAL_SEARCH_KEY}.enabled=true")
        unknown = sorted(set(value) - set(cls.names()))
        if unknown:
            raise ValueError(f"{LOCAL_SEARCH_KEY} has no setting {unknown}; its settings: {cls.names()}")
        return cls(**value)

    def num_permutations(self, num_components: int) -> int:
        """P: the gate's number of components C with ``per_component``, else 1 (shared)."""
        return int(num_components) if self.per_component else 1


def override_error(overrides: Sequence[str]) -> Optional[str]:
    """A one-line error for the first command-line override that sets the local search by a flat
    ``gate.local_search_<setting>`` key or sets ``gate.local_search`` to a bool (the settings are
    the mapping ``gate.local_search``), else None."""
    prefix = LOCAL_SEARCH_KEY + "_"
    for override in overrides:
        key, _, value = override.partition("=")
        key = key.lstrip("+~")
        if key.startswith(prefix):
            setting = key[len(prefix):]
            new = (f"{LOCAL_SEARCH_KEY}.{setting}" if setting in LocalSearchSettings.names()
                   else f"one of {LOCAL_SEARCH_KEY}.{{{','.join(LocalSearchSettings.names())}}}")
            return f"{key} is not a setting: the local search settings are the mapping {LOCAL_SEARCH_KEY}; use {new}"
        if key == LOCAL_SEARCH_KEY and value and all(v.strip().lower() in ("true", "false") for v in value.split(",")):
            return f"{LOCAL_SEARCH_KEY} is a mapping of settings; use {LOCAL_SEARCH_KEY}.enabled={value}"
    return None
