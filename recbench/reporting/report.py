"""Build the report folders: ``<out>/<dataset>/`` with leaderboard.md, leaderboard.csv, index.html
(self-contained) and the PNG figures, from run records (MLflow or exported JSON).

References: docs/architecture.md sections 1 and 5; ``reporting.leaderboard`` (scoring), ``reporting.plots``,
``reporting.html``.
"""
from __future__ import annotations

import csv
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

from recbench.reporting import html as html_render
from recbench.reporting.leaderboard import Row, aggregate, csv_rows, markdown_tables, protocols
from recbench.reporting.plots import budget_figure, pareto_figure


@dataclass
class ReportFiles:
    dataset: str
    folder: Path
    rows: List[Row]
    markdown: str
    files: List[Path] = field(default_factory=list)

    @property
    def index(self) -> Path:
        return self.folder / "index.html"


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "report"


def build_dataset_report(records: Sequence[Dict[str, Any]], dataset: str, out: Path, ui_url: str,
                         generated: str, figures: bool = True,
                         families: Optional[Mapping[str, str]] = None) -> ReportFiles:
    """``families``: {method: family} for the figures' colours (the method cards' ``Family`` lines,
    read by the caller: reporting reads no card); None: a colour per method."""
    rows = aggregate(records)
    folder = Path(out) / slug(dataset)
    folder.mkdir(parents=True, exist_ok=True)
    result = ReportFiles(dataset, folder, rows, "")
    sections, md = [], [f"# Leaderboard: {dataset}\n", f"{generated}\n"]
    ordered = protocols(rows)
    for i, protocol in enumerate(ordered):
        suffix = "" if i == 0 else f"-{i + 1}"
        pngs: Dict[str, bytes] = {}
        if figures:
            pngs = {f"pareto{suffix}.png": pareto_figure(rows, protocol, families),
                    f"budgets{suffix}.png": budget_figure(rows, protocol, families)}
            for name, png in pngs.items():
                (folder / name).write_bytes(png)
                result.files.append(folder / name)
        sections.append({"protocol": protocol, "figures": pngs})
        md.append(f"## Protocol `{protocol}`\n")
        md.extend(f"![{name}]({name})" for name in pngs)
        md.append("\n" + markdown_tables(rows, protocol, ui_url) + "\n")
    result.markdown = "\n".join(md)
    (folder / "leaderboard.md").write_text(result.markdown)
    table = csv_rows(rows, ui_url)
    with open(folder / "leaderboard.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)
    result.index.write_text(html_render.render(f"Leaderboard: {dataset}", sections, rows, ui_url, generated,
                                             families))
    result.files[:0] = [folder / "leaderboard.md", folder / "leaderboard.csv", result.index]
    return result


def build_reports(records: Sequence[Dict[str, Any]], out: Path, ui_url: str, generated: str,
                  figures: bool = True, families: Optional[Mapping[str, str]] = None) -> List[ReportFiles]:
    """One report folder per dataset name (a section per protocol id inside)."""
    return [build_dataset_report([r for r in records if r.get("dataset", "") == dataset], dataset, out, ui_url,
                                 generated, figures, families)
            for dataset in sorted({r.get("dataset", "") for r in records})]
