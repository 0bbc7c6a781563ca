"""One identifier per method everywhere: config, module, card and catalogue row agree."""
from pathlib import Path

import pytest

from recbench.runs.config import CONFIG_DIR

ROOT = Path(CONFIG_DIR).parent
METHODS = sorted(p.stem for p in (Path(CONFIG_DIR) / "method").glob("*.yaml"))


@pytest.mark.parametrize("name", METHODS)
def test_every_registered_method_has_its_module_card_and_catalogue_row(name):
    assert (ROOT / "recbench" / "methods" / f"{name}.py").is_file(), f"recbench/methods/{name}.py"
    card = ROOT / "methods" / f"{name}.md"
    assert card.is_file() and len(card.read_text()) > 500, f"{card}: the method card (paper, mechanism, budget rule, deviations)"
    assert f"[{name}]({name}.md)" in (ROOT / "methods" / "README.md").read_text(), f"methods/README.md row for {name}"
