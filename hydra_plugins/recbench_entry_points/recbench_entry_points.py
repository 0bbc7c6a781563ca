"""Hydra search-path plugin: the config folders of installed packages that declare an entry point
in the group ``recbench.conf`` (``recbench.conf.entry_point_dirs``) join the search path of every
recbench command (``recbench``, ``recbench-sweep``, ``recbench.run``), after recbench's own.

Hydra finds this plugin itself (it scans the ``hydra_plugins`` namespace package); it reads package
metadata only and imports nothing of the packages it names.

References: Hydra's "Config Search Path" plugin documentation (``SearchPathPlugin``);
docs/extending.md (outside the repository).
"""
from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin

from recbench.conf import entry_point_dirs


class RecbenchEntryPoints(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        for folder in entry_point_dirs():
            search_path.append(provider="recbench-entry-point", path=f"file://{folder}")
