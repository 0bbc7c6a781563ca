"""The README stays true to the code: its method list is the registry's, and every relative link of
the README and of docs/ points at a file that exists."""
from __future__ import annotations

import re
from pathlib import Path

from recbench.runs.catalogue import entries

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"


def test_the_readme_lists_every_registered_method_once():
    text = README.read_text()
    listed = re.findall(r"^- \[`(\w+)`\]\(methods/\1\.md\) — \S", text, re.M)
    registered = sorted(e.name for e in entries(None))
    assert sorted(listed) == registered  # regenerate the list from `recbench-methods` when a method joins
    assert f"**: {len(registered) - 1} compression methods" in text  # `full` is the uncompressed reference


def test_the_first_screen_shows_a_result_table_and_the_pareto_figure():
    first = "\n".join(README.read_text().splitlines()[:40])
    assert "| budget | method | test AUC | inference bytes | latency (ms) |" in first
    assert "](reports/reference/synthetic/pareto.png)" in first
    assert "rank" not in first.split("| budget |")[1].split("\n")[0]  # no rank column: the rule may change


def test_every_relative_link_resolves():
    pages = [README, *sorted((REPO / "docs").glob("*.md"))]
    broken = []
    for page in pages:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            path = (page.parent / target.split("#", 1)[0]).resolve()
            if not path.exists():
                broken.append(f"{page.relative_to(REPO)}: {target}")
    assert broken == []
