"""Adding a method is its module, its config and its card, and nothing else: a toy method written
in a scratch folder (module on ``sys.path``, config on Hydra's search path) runs a whole job, is
planned by a sweep and is tracked under its one name, with no list of names edited anywhere."""
from __future__ import annotations

import textwrap

from recbench.runs.config import compose
from recbench.runs.job import run_job
from recbench.runs.sweep_plan import build_plan
from recbench.tracking.base import InMemoryTracker
from toy_protocol import TOY, toy_cfg

MODULE = '''
"""``toymod``: ids modulo a row count solved from the budget (a test of the registry only).

References: none (a toy).
"""
from dataclasses import dataclass
from typing import Any

from recbench.methods.base import CompressionMethod, InfeasibleBudget
from recbench.methods.blocks.tables import FusedIdMapEmbedding, FusedTables, physical_tables, table_memory


class ModuloEmbedding(FusedIdMapEmbedding):
    def __init__(self, tables, dim, rows, optimizer):
        super().__init__(tables, dim)
        self.rows = dict(rows)
        self.fused = FusedTables(physical_tables(tables, dim, self.rows), optimizer)

    def rewrite(self, features):
        from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
        limits = [self.rows.get(k, t.num_embeddings) for k, t in zip(features.keys(), self.tables)]
        parts = [v % m for v, m in zip(features.values().split(features.length_per_key()), limits)]
        return KeyedJaggedTensor(features.keys(), __import__("torch").cat(parts), lengths=features.lengths())


@dataclass
class ToyModuloSettings:
    fraction: Any = "auto"  #: rows kept per field: auto (the budget's ratio) or a fraction


class ToyModulo(CompressionMethod):
    name = "toymod"
    settings_class = ToyModuloSettings

    def solve_hparams(self, tables, dim, budget):
        fraction = budget.compression_ratio if self.fraction == "auto" else float(self.fraction)
        rows = {t.name: max(1, int(t.num_embeddings * fraction)) for t in tables}
        if min(rows.values()) < 1:
            raise InfeasibleBudget(self.name, budget.compression_ratio, 0.0, 1.0)
        return {"rows": rows}

    def memory(self, tables, dim, hparams, optimizer=None):
        from recbench.types import EmbeddingOptimizer
        return table_memory(physical_tables(tables, dim, hparams["rows"]), tables, dim, optimizer or EmbeddingOptimizer())

    def build(self, tables, dim, plan, optimizer=None):
        from recbench.types import EmbeddingOptimizer
        return ModuloEmbedding(tables, dim, plan.hparams["rows"], optimizer or EmbeddingOptimizer())
'''

CONFIG = """\
defaults:
  - /schema/method/toymod@_here_
  - _self_
_target_: toymod_method.ToyModulo
name: toymod
"""


def test_a_new_method_is_its_module_config_and_card_only(tmp_path, monkeypatch):
    package = tmp_path / "code"
    package.mkdir()
    (package / "toymod_method.py").write_text(textwrap.dedent(MODULE))
    conf = tmp_path / "conf"
    (conf / "method").mkdir(parents=True)
    (conf / "method" / "toymod.yaml").write_text(CONFIG)
    (tmp_path / "toymod.md").write_text("# toymod\n\nThe card: paper, mechanism, budget rule, deviations.\n")
    monkeypatch.syspath_prepend(str(package))
    search = f"hydra.searchpath=[file://{conf}]"

    composed = compose(["method=toymod", search])
    assert composed.method.name == "toymod" and composed.method.fraction == "auto"  # the dataclass default
    assert compose(["method=toymod", "method.fraction=0.25", search]).method.fraction == 0.25

    cfg = toy_cfg(tmp_path, "method=toymod", "budget.compression_ratio=0.5", search)
    tracker = InMemoryTracker()
    result = run_job(cfg, tracker)
    assert result.status == "finished", result.reason
    run = tracker.current
    assert run.tags["method"] == "toymod" and run.tags["hparam.rows.f0"]
    assert run.latest("emb/closed_form_matches") == 1.0
    assert 0.4 < run.latest("emb/compression_ratio") <= 0.5

    # a sweep expands it like any registered method, by name, from the config folder alone
    (conf / "dataset").mkdir()
    (conf / "dataset" / "toy.yaml").write_text("\n".join(f"{k}: {v!r}" if not isinstance(v, dict) else
                                                         f"{k}: {dict(v)}" for k, v in TOY.items()) + "\nname: toy\n")
    plan = build_plan("smoke", ["method=toymod,hashing", "dataset=toy", search], "add-a-method")
    methods = {o.split("=", 1)[1] for job in plan.grids[0].jobs for o in job if o.startswith("method=")}
    assert methods == {"toymod", "hashing"}


def installed_toy_package(site):
    """A package as pip would install it: its module, its config folder (a package) and a
    ``dist-info`` declaring that folder in the entry-point group ``recbench.conf``."""
    (site / "toymod_method.py").write_text(textwrap.dedent(MODULE))
    conf = site / "toymod_conf"
    (conf / "method").mkdir(parents=True)
    (conf / "__init__.py").write_text("")
    (conf / "method" / "toymod.yaml").write_text(CONFIG)
    info = site / "toymod-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: toymod\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[recbench.conf]\ntoymod = toymod_conf\n")
    return conf


def test_an_installed_package_adds_its_methods_through_an_entry_point(tmp_path, monkeypatch):
    """No search-path override: the entry point alone puts the package's config folder on Hydra's
    search path (``hydra_plugins/recbench_entry_points``) and its settings in the ConfigStore, for a
    job and for a sweep's plan."""
    from recbench.conf import entry_point_dirs

    site = tmp_path / "site"
    site.mkdir()
    conf = installed_toy_package(site)
    monkeypatch.syspath_prepend(str(site))
    assert entry_point_dirs() == (str(conf.resolve()),)
    assert compose(["method=toymod", "method.fraction=0.25"]).method.fraction == 0.25
    result = run_job(toy_cfg(tmp_path, "method=toymod", "budget.compression_ratio=0.5"), InMemoryTracker())
    assert result.status == "finished", result.reason
    plan = build_plan("smoke", ["method=toymod,hashing"], "entry-point")
    assert {o.split("=", 1)[1] for job in plan.grids[0].jobs for o in job if o.startswith("method=")} == {"toymod", "hashing"}


def test_an_entry_point_that_names_no_package_is_a_clear_error(tmp_path, monkeypatch):
    import pytest

    from recbench.conf import EntryPointError, entry_point_dirs

    info = tmp_path / "broken-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[recbench.conf]\nbroken = no_such_conf_package\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(EntryPointError, match="entry point broken = 'no_such_conf_package' of package broken "
                                              r"\(group recbench.conf\): not an importable package"):
        entry_point_dirs()
