"""One identifier per method everywhere (config, module, card, catalogue entry), and one source per
hyperparameter (the settings dataclass): the catalogue is read from them, never kept by hand."""
import dataclasses
from pathlib import Path

import pytest
import yaml

from recbench.runs.catalogue import CARD_FIELDS, entries
from recbench.runs.config import CONFIG_DIR, compose, method_classes

ROOT = Path(CONFIG_DIR).parents[1]
METHODS = sorted(p.stem for p in (Path(CONFIG_DIR) / "method").glob("*.yaml"))


@pytest.fixture(scope="module")
def catalogue():
    return {e.name: e for e in entries()}


@pytest.mark.parametrize("name", METHODS)
def test_every_registered_method_has_its_module_card_and_catalogue_entry(name, catalogue):
    assert (ROOT / "recbench" / "methods" / f"{name}.py").is_file(), f"recbench/methods/{name}.py"
    card = ROOT / "methods" / f"{name}.md"
    assert card.is_file() and len(card.read_text()) > 500, f"{card}: the method card (paper, mechanism, budget rule, deviations)"
    entry = catalogue[name]
    missing = [key for key in CARD_FIELDS if not entry.field(key)]
    assert not missing, f"{card}: header lines {missing} (`- **Key**: value` before the first section)"
    assert method_classes()[name].name == name


@pytest.mark.parametrize("name", METHODS)
def test_each_setting_has_one_source_its_dataclass_field(name, catalogue):
    """The YAML selects the method: besides `defaults`, `_target_` and `name` it holds only preset
    hooks (`${oc.select:method_settings...}`), whose fallback is the dataclass default; every
    setting has a type, a default and a meaning, and the composed node is exactly the settings."""
    raw = yaml.safe_load((Path(CONFIG_DIR) / "method" / f"{name}.yaml").read_text())
    method_class = method_classes()[name]
    defaults = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                for f in dataclasses.fields(method_class.settings_class)}
    for key, value in raw.items():
        if key in ("defaults", "_target_", "name"):
            continue
        assert isinstance(value, str) and value.startswith(f"${{oc.select:method_settings.{name}.{key},"), \
            f"recbench/conf/method/{name}.yaml sets {key}: a default belongs in {method_class.settings_class.__name__}"
        fallback = yaml.safe_load(value[len(f"${{oc.select:method_settings.{name}.{key},"):-1])
        assert fallback == defaults[key], f"{name}.{key}: preset fallback {fallback!r} != dataclass default {defaults[key]!r}"
    if defaults:
        assert raw["defaults"][0] == f"/schema/method/{name}@_here_"
    for setting in catalogue[name].settings:
        assert setting.meaning, f"{name}.{setting.name}: a `#:` comment saying what it means and allows"
    node = compose([f"method={name}"]).method
    assert {k: v for k, v in node.items() if k not in ("_target_", "name")}.keys() == defaults.keys()


def test_a_setting_is_typed_when_composed_and_unknown_ones_are_refused():
    from hydra.errors import ConfigCompositionException
    from hydra.utils import instantiate

    assert compose(["method=qr", "method.partitions=3"]).method.partitions == 3
    with pytest.raises(ConfigCompositionException):
        compose(["method=qr", "method.partitions=abc"])
    with pytest.raises(Exception, match="has no setting 'nosuch'; allowed: operation, partitions"):
        instantiate(compose(["method=qr", "+method.nosuch=1"]).method)


def test_the_report_colours_come_from_the_cards_technique_lines(catalogue):
    """``techniques()`` reads the configs and cards only; it agrees with the catalogue's entries."""
    from recbench.runs.catalogue import techniques

    assert techniques() == {e.name: e.short("Technique") for e in catalogue.values()}
    assert techniques()["qr"] == "weight sharing" and techniques()["full"] == "baseline"
