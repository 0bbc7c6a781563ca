"""``recbench-bench``: run the performance harness in ``benchmarks/``.

Each ``benchmarks/<name>.py`` with a ``main(argv) -> int`` is a benchmark; it measures a
candidate against its reference side by side (``recbench.bench.harness``) and writes
``benchmarks/results/<name>.json`` and ``.md``. ``recbench-bench`` runs them all (or the ones
named), then regenerates the summary table of ``benchmarks/README.md`` from every result file:

    recbench-bench                       # every benchmark (make bench)
    recbench-bench preprocessing         # one
    recbench-bench --quick               # every benchmark at toy sizes, results in a temp folder
    recbench-bench lookup --scale 0.05   # options after the names go to the benchmarks

References: docs/architecture.md section 6 (ratios measured side by side).
"""
from __future__ import annotations

import importlib.util
import sys
import time
import traceback

from recbench.cli import OneLineParser, refuse
from recbench.bench import harness

BENCH_DIR = harness.BENCH_DIR


def available():
    return sorted(p.stem for p in BENCH_DIR.glob("*.py") if not p.stem.startswith("_"))


def parser(with_common: bool = True) -> OneLineParser:
    """The ``recbench-bench`` parser; ``with_common`` adds, for ``--help``, the options every benchmark
    accepts (``harness.add_common_arguments``), which ``main`` passes on to the benchmarks unparsed."""
    top = OneLineParser(prog="recbench-bench", description="recbench's performance harness: each benchmark measures "
                        "a candidate against its reference side by side and writes benchmarks/results/<name>.json "
                        "and .md; a full run (no --quick, no --output-dir) then updates the table of "
                        "benchmarks/README.md",
                        epilog="examples: recbench-bench --quick (every benchmark at toy sizes, results in a temp "
                               "folder); recbench-bench lookup --scale 0.05. Options a benchmark has of its own "
                               "(python benchmarks/<name>.py --help) go after the names. Exit status: 0 every "
                               "benchmark passed; 1 one failed; 2 an unknown benchmark or option")
    top.add_argument("names", nargs="*", metavar="name",
                     help=f"benchmarks to run (default: all of {', '.join(available())})")
    if with_common:
        harness.add_common_arguments(top.add_argument_group("options passed to every benchmark"))
    return top


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if {"-h", "--help"} & set(argv):
        parser().parse_args(["--help"])
    args, rest = parser(with_common=False).parse_known_args(argv)
    names = args.names or available()
    unknown = [n for n in names if n not in available()]
    if unknown:
        return refuse("recbench-bench", f"unknown benchmark(s) {', '.join(unknown)}; allowed: {', '.join(available())}")
    status = 0
    started = time.perf_counter()
    for name in names:
        spec = importlib.util.spec_from_file_location(f"recbench_benchmarks.{name}", BENCH_DIR / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        print(f"== benchmark: {name}", flush=True)
        begin = time.perf_counter()
        try:
            code = int(module.main(rest) or 0)
        except Exception:  # one broken benchmark must not hide the others' results
            traceback.print_exc()
            code = 1
        print(f"== benchmark {name}: exit {code}, {time.perf_counter() - begin:.0f} s", flush=True)
        status |= code
    if "--quick" not in rest and "--output-dir" not in rest and harness.update_readme():
        print(f"updated the results table of {harness.README}")
    print(f"== {len(names)} benchmark(s) in {time.perf_counter() - started:.0f} s; load: {harness.uptime()}")
    return status


if __name__ == "__main__":
    sys.exit(main())
