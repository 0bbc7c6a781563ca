"""What a report says about its runs: which code, software and sweeps produced them, how many seeds
each row averages, and where the run links lead (``provenance``, ``coverage``, ``linked_to_store``).
Pure functions over run records, except ``linked_to_store``, which reads the store it is given.

References: docs/architecture.md section 5 (tracking schema, reports).
"""
from __future__ import annotations

from collections import Counter, defaultdict
from typing import Optional

from recbench.reporting.runs import load_mlflow_runs, relink
from recbench.tracking.schema import parse_ratio


def provenance(records) -> str:
    """Which code, software and sweeps produced the runs (the run tags), for the report header."""
    def listed(key: str, unknown: str = "not recorded") -> str:
        values = Counter(r.get(key) or unknown for r in records)
        return "; ".join(f"`{v}` ({n} run{'s' if n != 1 else ''})" for v, n in values.most_common())

    imported = Counter(r.get("imported_from") for r in records if r.get("imported_from"))
    carried = (["- runs imported from exported records (tags, params and final metrics; their "
                "artifacts stay in the store they were exported from): "
                + "; ".join(f"{n} from `{name}`" for name, n in imported.most_common())] if imported else [])
    return "\n".join([f"- code (git commit of the runs): {listed('git_commit')}",
                      f"- software: {listed('software', 'not recorded (runs before tagging)')}",
                      f"- sweeps: {listed('sweep_id')}",
                      f"- {coverage(records)}", *carried,
                      "- each row links to its MLflow runs; each run's `command` tag reproduces it"])


def coverage(records) -> str:
    """How many seeds the report's (protocol, method, budget) rows average, so that a report of an
    unfinished sweep says so itself: ``seeds per row: 3 in 40 rows, 1 in 12 rows``."""
    seeds = defaultdict(set)
    for r in records:
        if r.get("status") == "finished":
            seeds[(r.get("protocol"), r.get("method"), repr(parse_ratio(r.get("compression_ratio"))))].add(r.get("seed"))
    counts = Counter(len(s) for s in seeds.values())
    if not counts:
        return "seeds per finished row: no finished run"
    listed = ", ".join(f"{n} in {rows} row{'s' if rows > 1 else ''}" for n, rows in sorted(counts.items(), reverse=True))
    fewest, most = min(counts), max(counts)
    note = "" if fewest == most else f" (rows with fewer than {most} seeds are less certain: see the `seeds` column)"
    return f"seeds per finished row: {listed}{note}"


def linked_to_store(records, store: Optional[str]):
    """Exported ``records`` with their links pointing at their copies in ``store`` (``reporting.runs.relink``;
    None: no readable store here), and the report line saying where the links lead."""
    if store is None:
        return records, ("- run links use the run ids of the store the records were exported from; to open them "
                         "here, import the records (`python -m recbench.reporting.import_records RECORDS`) "
                         "and build this report again")
    linked = relink(records, load_mlflow_runs(store))
    moved = sum(1 for old, new in zip(records, linked) if old is not new)
    return linked, (f"- run links: {moved} of {len(records)} runs link to their copies in this machine's store"
                    + ("" if moved == len(records) else "; the others use the ids of the store they were exported from"))
