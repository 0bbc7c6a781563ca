"""``recbench-bench``: run the performance harness in ``benchmarks/``.

Each ``benchmarks/<name>.py`` with a ``main(argv) -> int`` is a benchmark; it writes
``benchmarks/results/<name>.json``. ``recbench-bench`` runs them all (or the ones named):

    recbench-bench                 # every benchmark
    recbench-bench preprocessing   # one

References: DESIGN.md section 6 (ratios measured side by side).
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parents[2] / "benchmarks"


def available():
    return sorted(p.stem for p in BENCH_DIR.glob("*.py") if not p.stem.startswith("_"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="recbench-bench", description="recbench performance harness")
    parser.add_argument("names", nargs="*", help=f"benchmarks to run (default: all of {', '.join(available())})")
    args, rest = parser.parse_known_args(argv)
    names = args.names or available()
    unknown = [n for n in names if n not in available()]
    if unknown:
        print(f"recbench-bench: unknown benchmark(s) {', '.join(unknown)}; allowed: {', '.join(available())}",
              file=sys.stderr)
        return 2
    status = 0
    for name in names:
        spec = importlib.util.spec_from_file_location(f"recbench_benchmarks.{name}", BENCH_DIR / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        print(f"== benchmark: {name}", flush=True)
        status |= int(module.main(rest) or 0)
    return status


if __name__ == "__main__":
    sys.exit(main())
