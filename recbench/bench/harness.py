"""Side-by-side timing, medians, ratios against a reference, and the JSON + Markdown records.

Every performance figure of recbench is a ratio between a candidate (recbench's code) and a
reference (a straightforward implementation, a library routine or a machine limit) measured in
the same process, or back to back, on the same inputs (docs/architecture.md section 6). This module holds
the pieces every script in ``benchmarks/`` shares:

- ``interleaved``: warm-up calls, then ``rounds`` rounds in which every workload runs once
  (``repeat`` calls, averaged), the order rotating each round so machine noise and position
  effects hit candidate and reference alike. One sample per workload per round.
- ``Figure``: one claim: medians of both sides, their ratio (``reference/candidate`` for a
  speed-up of times, ``candidate/reference`` for a relative time or a fraction of a limit),
  the per-round ratios (the spread), the target and whether it is met.
- ``BenchResult``: one benchmark run: command, settings, figures, free-form measurement tables,
  the machine and its load (``uptime`` at start and end: the machine may be shared); written as
  ``results/<name>.json`` and ``results/<name>.md``. ``update_readme`` regenerates the summary
  table of ``benchmarks/README.md`` (between ``<!-- results:begin -->`` and ``<!-- results:end -->``)
  from every result file.

References: docs/architecture.md section 6 (performance claims are ratios measured side by side).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

REPO = Path(__file__).resolve().parents[2]
BENCH_DIR = REPO / "benchmarks"
RESULTS_DIR = BENCH_DIR / "results"
README = BENCH_DIR / "README.md"
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
SCHEMA_VERSION = 1
RATIO_KINDS = ("reference/candidate", "candidate/reference")
TARGET_OPS = (">=", "<=")


def median(samples: Sequence[float]) -> float:
    """Median of a non-empty sequence (NaN for an empty one)."""
    return float(statistics.median(samples)) if len(samples) else float("nan")


def interleaved(workloads: Mapping[str, Callable[[], Any]], rounds: int, warmup: int = 1, repeat: int = 1,
                clock: Callable[[], float] = time.perf_counter) -> Dict[str, List[float]]:
    """Seconds per call of each workload, one sample per round.

    Each workload is called ``warmup`` times first (not timed); then, in each of ``rounds``
    rounds, every workload runs ``repeat`` times back to back and its sample is the mean time of
    those calls. Round ``r`` starts with workload ``r mod n`` so no workload always runs first.
    """
    if rounds < 1 or repeat < 1 or warmup < 0:
        raise ValueError(f"rounds and repeat must be >= 1 and warmup >= 0, got {rounds}, {repeat}, {warmup}")
    names = list(workloads)
    for name in names:
        for _ in range(warmup):
            workloads[name]()
    samples: Dict[str, List[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            start = clock()
            for _ in range(repeat):
                workloads[name]()
            samples[name].append((clock() - start) / repeat)
    return samples


@dataclass
class Side:
    """One side of a comparison: a label, its samples (one per round) and their unit."""

    label: str
    samples: List[float]
    unit: str

    @property
    def median(self) -> float:
        return median(self.samples)


@dataclass
class Figure:
    """One measured claim: candidate vs reference, the ratio of their medians and its target.

    ``ratio_of`` is ``"reference/candidate"`` (e.g. a speed-up when both sides are times) or
    ``"candidate/reference"`` (a relative time, or a rate as a fraction of a limit). ``target``
    is ``">= 1.8"``, ``"<= 1.15"`` or None (reported, no claim).
    """

    name: str
    description: str
    candidate: Side
    reference: Side
    ratio_of: str = "reference/candidate"
    target: Optional[str] = None
    note: str = ""

    def __post_init__(self) -> None:
        if self.ratio_of not in RATIO_KINDS:
            raise ValueError(f"figure {self.name!r}: ratio_of must be one of {', '.join(RATIO_KINDS)}, got {self.ratio_of!r}")
        parse_target(self.target)

    @property
    def ratio(self) -> float:
        return _ratio(self.candidate.median, self.reference.median, self.ratio_of)

    @property
    def round_ratios(self) -> List[float]:
        """Per-round ratios (rounds are paired when both sides have one sample per round)."""
        if len(self.candidate.samples) != len(self.reference.samples):
            return []
        return [_ratio(c, r, self.ratio_of) for c, r in zip(self.candidate.samples, self.reference.samples)]

    @property
    def met(self) -> Optional[bool]:
        return target_met(self.ratio, self.target)

    def to_dict(self) -> Dict[str, Any]:
        rounds = self.round_ratios
        return {
            "name": self.name, "description": self.description,
            "candidate": {**asdict(self.candidate), "median": self.candidate.median},
            "reference": {**asdict(self.reference), "median": self.reference.median},
            "ratio_of": self.ratio_of, "ratio": self.ratio,
            "round_ratios": rounds, "round_ratio_range": [min(rounds), max(rounds)] if rounds else None,
            "target": self.target, "met": self.met, "note": self.note,
        }


def _ratio(candidate: float, reference: float, ratio_of: str) -> float:
    num, den = (reference, candidate) if ratio_of == "reference/candidate" else (candidate, reference)
    return float(num / den) if den else float("nan")


def parse_target(target: Optional[str]):
    """``">= 1.8"`` -> (">=", 1.8); None -> None. Anything else is a ValueError."""
    if target is None:
        return None
    text = str(target).strip()
    for op in TARGET_OPS:
        if text.startswith(op):
            try:
                return op, float(text[len(op):])
            except ValueError:
                break
    raise ValueError(f"target {target!r}: expected '>= <number>' or '<= <number>'")


def target_met(ratio: float, target: Optional[str]) -> Optional[bool]:
    parsed = parse_target(target)
    if parsed is None:
        return None
    if ratio != ratio:  # NaN never meets a target
        return False
    op, value = parsed
    return ratio >= value if op == ">=" else ratio <= value


# ------------------------------------------------------------------------------------------------
# machine and load
# ------------------------------------------------------------------------------------------------


def uptime() -> str:
    """``uptime``'s line (load averages), or the load averages alone where it is missing."""
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "load average: " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def machine_info() -> Dict[str, Any]:
    info: Dict[str, Any] = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                            "cpus": os.cpu_count(), "python": platform.python_version()}
    try:
        info["usable_cpus"] = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS
        pass
    for module in ("torch", "numpy", "polars", "pandas", "fbgemm_gpu", "torchrec", "sklearn", "mlflow"):
        mod = sys.modules.get(module)
        if mod is not None:
            info[module] = getattr(mod, "__version__", "?")
    try:
        info["git_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                            timeout=5, cwd=REPO).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return info


# ------------------------------------------------------------------------------------------------
# one benchmark run
# ------------------------------------------------------------------------------------------------


@dataclass
class BenchResult:
    """A benchmark run: its figures plus free-form measurement tables (``tables``: title -> rows)."""

    name: str
    command: str
    settings: Dict[str, Any] = field(default_factory=dict)
    figures: List[Figure] = field(default_factory=list)
    tables: Dict[str, List[Dict[str, Any]]] = field(default_factory=dict)
    notes: List[str] = field(default_factory=list)
    started: str = field(default_factory=lambda: time.strftime("%Y-%m-%d %H:%M:%S %Z"))
    uptime_start: str = field(default_factory=uptime)
    _clock: float = field(default_factory=time.perf_counter, repr=False)

    @classmethod
    def start(cls, name: str, argv: Optional[Sequence[str]], args: argparse.Namespace) -> "BenchResult":
        """A result whose settings start as the parsed options (after ``--quick`` adjusted them)."""
        settings = {k: (portable_path(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        return cls(name, command_line(name, argv), settings=settings)

    def add(self, figure: Figure) -> Figure:
        self.figures.append(figure)
        return figure

    def to_dict(self) -> Dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION, "benchmark": self.name, "command": self.command,
            "started": self.started, "seconds": round(time.perf_counter() - self._clock, 1),
            "machine": machine_info(), "uptime_start": self.uptime_start, "uptime_end": uptime(),
            "settings": self.settings, "figures": [f.to_dict() for f in self.figures],
            "tables": self.tables, "notes": self.notes,
        }

    def finish(self, args: argparse.Namespace) -> Path:
        """Write to ``output_dir(args)`` and print the Markdown summary; returns the JSON path."""
        path = self.write(output_dir(args))
        print((path.parent / f"{self.name}.md").read_text())
        print(f"wrote {path}", flush=True)
        return path

    def write(self, directory: Path = RESULTS_DIR) -> Path:
        """``<directory>/<name>.json`` and ``.md``; returns the JSON path."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        record = self.to_dict()
        path = directory / f"{self.name}.json"
        path.write_text(json.dumps(record, indent=2, default=_json_default) + "\n")
        (directory / f"{self.name}.md").write_text(render_markdown(record))
        return path


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy / torch scalars
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


REQUIRED_KEYS = ("schema_version", "benchmark", "command", "started", "machine", "uptime_start", "uptime_end",
                 "settings", "figures", "tables", "notes")
FIGURE_KEYS = ("name", "description", "candidate", "reference", "ratio_of", "ratio", "round_ratios", "target",
               "met", "note")


def validate_record(record: Mapping[str, Any]) -> None:
    """Raises ValueError naming the first missing or inconsistent key of a result record."""
    for key in REQUIRED_KEYS:
        if key not in record:
            raise ValueError(f"result record lacks {key!r}")
    for figure in record["figures"]:
        for key in FIGURE_KEYS:
            if key not in figure:
                raise ValueError(f"figure {figure.get('name', '?')!r} lacks {key!r}")
        for side in ("candidate", "reference"):
            for key in ("label", "samples", "unit", "median"):
                if key not in figure[side]:
                    raise ValueError(f"figure {figure['name']!r}: {side} lacks {key!r}")
        if figure["ratio_of"] not in RATIO_KINDS:
            raise ValueError(f"figure {figure['name']!r}: ratio_of {figure['ratio_of']!r}")
        if figure["met"] != target_met(figure["ratio"], figure["target"]):
            raise ValueError(f"figure {figure['name']!r}: 'met' disagrees with its ratio and target")


# ------------------------------------------------------------------------------------------------
# Markdown
# ------------------------------------------------------------------------------------------------


def fmt_value(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return "" if value is None else str(value).lower()
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if value != value:
            return "nan"
        magnitude = abs(value)
        if magnitude >= 1000:
            return f"{value:,.0f}"
        if magnitude >= 10:
            return f"{value:.1f}"
        if magnitude >= 0.01 or magnitude == 0:
            return f"{value:.3g}"
        return f"{value:.2e}"
    return str(value)


def verdict(figure: Mapping[str, Any]) -> str:
    if figure["target"] is None:
        return "(no target)"
    return "met" if figure["met"] else "NOT met"


def figure_row(figure: Mapping[str, Any]) -> str:
    c, r = figure["candidate"], figure["reference"]
    spread = figure.get("round_ratio_range")
    spread_text = f"{spread[0]:.2f}-{spread[1]:.2f}" if spread else ""
    return (f"| {figure['name']} | {c['label']}: {fmt_value(c['median'])} {c['unit']} | "
            f"{r['label']}: {fmt_value(r['median'])} {r['unit']} | **{figure['ratio']:.2f}x** "
            f"({figure['ratio_of']}) | {spread_text} | {figure['target'] or ''} | {verdict(figure)} |")


FIGURE_HEADER = ("| figure | candidate (median) | reference (median) | ratio | per-round range | target | verdict |\n"
                 "|---|---|---|---|---|---|---|")


def table_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    if not rows:
        return ""
    columns: List[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(fmt_value(row.get(k)) for k in columns) + " |")
    return "\n".join(lines)


def render_markdown(record: Mapping[str, Any]) -> str:
    lines = [f"# Benchmark `{record['benchmark']}`", "", f"Command: `{record['command']}`  ",
             f"Started {record['started']}, {record.get('seconds', '?')} s; machine: {record['machine'].get('platform')}, "
             f"{record['machine'].get('usable_cpus', record['machine'].get('cpus'))} usable CPUs.  ",
             f"Load at start: `{record['uptime_start']}`  ", f"Load at end: `{record['uptime_end']}`", ""]
    if record["figures"]:
        lines += [FIGURE_HEADER, *(figure_row(f) for f in record["figures"]), ""]
        for f in record["figures"]:
            lines.append(f"- **{f['name']}**: {f['description']}" + (f" {f['note']}" if f["note"] else ""))
        lines.append("")
    for title, rows in record["tables"].items():
        lines += [f"## {title}", "", table_markdown(rows), ""]
    if record["notes"]:
        lines += ["## Notes", "", *(f"- {n}" for n in record["notes"]), ""]
    lines.append(f"Settings: `{json.dumps(record['settings'], default=str)}`")
    return "\n".join(lines) + "\n"


def summary_table(results_dir: Path = RESULTS_DIR) -> str:
    """One row per figure of every ``results/*.json`` with figures, benchmark by benchmark."""
    lines = ["| benchmark | " + FIGURE_HEADER.split("\n")[0][2:], "|---" + FIGURE_HEADER.split("\n")[1]]
    loads = []
    for path in sorted(Path(results_dir).glob("*.json")):
        record = json.loads(path.read_text())
        if not record.get("figures"):
            continue
        loads.append(f"- `{record['benchmark']}` ({record['started']}, {record.get('seconds', '?')} s): "
                     f"`{record['command']}`; load at start `{_load_part(record['uptime_start'])}`, "
                     f"at end `{_load_part(record['uptime_end'])}`")
        for figure in record["figures"]:
            lines.append(f"| `{record['benchmark']}` " + figure_row(figure))
    return "\n".join(lines + ["", "Commands and machine load (`uptime`) of each run:", ""] + loads)


def _load_part(text: str) -> str:
    return text[text.index("load average"):] if "load average" in text else text


def update_readme(readme: Path = README, results_dir: Path = RESULTS_DIR) -> bool:
    """Regenerate the text between the markers of ``readme``; returns False when it has no markers."""
    readme = Path(readme)
    text = readme.read_text()
    if BEGIN not in text or END not in text:
        return False
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{BEGIN}\n{summary_table(results_dir)}\n{END}{tail}")
    return True


# ------------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------------


def add_common_arguments(parser: argparse.ArgumentParser, rounds: int = 5, warmup: int = 1) -> None:
    """Options every benchmark accepts (``recbench-bench`` passes the same options to all)."""
    parser.add_argument("--rounds", type=int, default=rounds, help="timed rounds (medians over rounds)")
    parser.add_argument("--warmup", type=int, default=warmup, help="untimed calls of each workload first")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1: stable ratios)")
    parser.add_argument("--quick", action="store_true", help="small sizes and few rounds (checks the plumbing)")
    parser.add_argument("--clock", choices=tuple(CLOCKS), default="cpu",
                        help="cpu: this process's CPU time (default; robust on a shared machine, valid for "
                             "one-thread workloads); wall: elapsed time")
    parser.add_argument("--output-dir", type=Path, default=None,
                        help="where <name>.json/.md go (default benchmarks/results; with --quick a temp folder)")


def output_dir(args: argparse.Namespace) -> Path:
    """``--output-dir``, else ``benchmarks/results`` (a --quick run never overwrites the recorded results)."""
    if args.output_dir is not None:
        return Path(args.output_dir)
    return Path(tempfile.gettempdir()) / "recbench-bench-quick" if args.quick else RESULTS_DIR


def portable_path(path: Path) -> str:
    """A path as recorded in results: relative to the repository when inside it (no machine paths)."""
    try:
        return str(Path(path).resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def command_line(script: str, argv: Optional[Sequence[str]]) -> str:
    args = list(sys.argv[1:] if argv is None else argv)
    return shlex.join(["python", f"benchmarks/{script}.py", *args])


#: clocks of ``--clock``: CPU time of this process (all its threads) or elapsed time
CLOCKS: Dict[str, Callable[[], float]] = {"cpu": time.process_time, "wall": time.perf_counter}


def setup(args: argparse.Namespace) -> Callable[[], float]:
    """Apply ``--threads`` (torch intra-op and OpenMP threads); returns the ``--clock`` function.

    Under other processes' load, elapsed time measures the scheduler more than the code (measured
    here: 33 ms wall vs 3.6 ms CPU for one lookup batch at load 8 on 2 cores), so the default is
    the process's CPU time, which equals elapsed time on an idle machine for one-thread work."""
    if args.threads:
        import torch

        torch.set_num_threads(int(args.threads))
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    return CLOCKS[args.clock]
