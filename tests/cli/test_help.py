"""Every command and subcommand has real ``--help`` text: a description, and help for every
argument and subcommand (docs/cli.md). In-process: each ``main(["--help"])`` is stopped at its
parser, which is then walked action by action."""
from __future__ import annotations

import argparse
import sys

import pytest

from recbench.cli import bench, data, eval as eval_cli, methods, report, sweep

MAINS = {"recbench-data": data.main, "recbench-bench": bench.main, "recbench-sweep": sweep.main,
         "recbench-eval": eval_cli.main, "recbench-methods": methods.main, "recbench-report": report.main}


class _Caught(Exception):
    def __init__(self, parser):
        super().__init__(parser.prog)
        self.parser = parser


def parser_of(main, monkeypatch) -> argparse.ArgumentParser:
    """The parser ``main`` builds, caught at its first parse (nothing runs)."""
    def catch(self, *args, **kwargs):
        raise _Caught(self)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", catch)
    with pytest.raises(_Caught) as caught:
        main(["--help"])
    monkeypatch.undo()
    return caught.value.parser


def undocumented(parser: argparse.ArgumentParser, path: str = "") -> list:
    """Every argument, subcommand or (sub)parser description without text, named by where it is."""
    where = path or parser.prog
    missing = [] if (parser.description or "").strip() else [f"{where}: no description"]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for pseudo in action._choices_actions:
                if not (pseudo.help or "").strip():
                    missing.append(f"{where} {pseudo.dest}: subcommand without help")
            for name, sub in action.choices.items():
                missing += undocumented(sub, f"{where} {name}")
        elif action.help is None or not str(action.help).strip():
            missing.append(f"{where}: {'/'.join(action.option_strings) or action.dest} without help")
    return missing


@pytest.mark.parametrize("prog", sorted(MAINS))
def test_every_option_and_subcommand_has_help(prog, monkeypatch):
    parser = parser_of(MAINS[prog], monkeypatch)
    assert parser.prog == prog
    assert undocumented(parser) == []


def test_recbench_data_lists_and_describes_each_subcommand(monkeypatch, capsys):
    parser = parser_of(data.main, monkeypatch)
    subcommands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert sorted(subcommands.choices) == ["fetch", "info", "list", "prepare", "verify"]
    with pytest.raises(SystemExit) as done:
        data.main(["--help"])
    out = capsys.readouterr().out
    assert done.value.code == 0 and all(f"    {name} " in out for name in subcommands.choices)
    for name in ("prepare", "verify"):
        with pytest.raises(SystemExit) as done:
            data.main([name, "--help"])
        out = capsys.readouterr().out
        assert done.value.code == 0 and out.startswith(f"usage: recbench-data {name}")
        assert "dataset.rows=100000" in out and "exit status: 0 done; 2 a bad argument" in out


def test_recbench_bench_help_shows_the_options_every_benchmark_takes(capsys):
    with pytest.raises(SystemExit) as done:
        bench.main(["--help"])
    out = capsys.readouterr().out
    assert done.value.code == 0
    assert "--quick" in out and "small sizes and few rounds" in out and "options passed to every benchmark" in out


def test_recbench_app_help_lists_groups_examples_commands_and_exit_status(monkeypatch, capsys):
    """``recbench --help`` is recbench's page (recbench/conf/config.yaml), not Hydra's generic one."""
    from recbench.cli import train

    monkeypatch.setattr(sys, "argv", ["recbench", "--help"])
    with pytest.raises(SystemExit) as done:  # Hydra exits after printing the help
        train.main()
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "powered by Hydra" not in out and out.startswith("recbench: train and evaluate one")
    assert "recbench method=qr budget.compression_ratio=0.1 seed=1" in out  # an example
    assert "method: adaembed, adapt, alpt" in out and "dataset: avazu, bars_avazu_x4, bars_criteo_x1, criteo_kaggle" in out  # the groups
    assert "hydra/launcher=joblib" in out
    assert all(f"recbench-{c}" in out for c in ("methods", "sweep", "report", "eval", "data", "bench"))
    assert "Exit status: 0 every job finished" in out and "; 2 a bad argument" in out
