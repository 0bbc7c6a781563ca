"""``recbench-methods``: the catalogue printed from the registry (configs, card headers, settings)."""
from pathlib import Path

from recbench.cli.methods import main as methods_main
from recbench.runs.config import CONFIG_DIR

METHODS = sorted(p.stem for p in (Path(CONFIG_DIR) / "method").glob("*.yaml"))


def test_the_catalogue_command(capsys):
    assert methods_main([]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in METHODS) and f"{len(METHODS)} methods" in out
    assert methods_main(["qr"]) == 0
    out = capsys.readouterr().out
    assert "partitions" in out and "int = 2" in out and "Reference:" in out
    assert methods_main(["--markdown"]) == 0
    assert "| [qr](qr.md) |" in capsys.readouterr().out
    assert methods_main(["nosuch"]) == 2
    err = capsys.readouterr().err
    assert "no method 'nosuch'; allowed: adaembed" in err and len(err.strip().splitlines()) == 1
