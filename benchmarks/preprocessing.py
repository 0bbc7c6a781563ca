"""Preprocessing: recbench's streaming polars pipeline vs a chunked-pandas reference on the same file.

For each size (default 10**6 lines) the synthetic generator writes a Criteo-format file (13
integer + 26 hex categorical fields, the true click probability as a sidecar), then, alternating
which goes first, round by round:

- ``polars``: recbench's Criteo pipeline prepares it exactly as the ``synthetic`` protocol does
  (``CriteoProtocol.prepare``: random 8:1:1 split, vocabularies from train, the streaming read,
  the pass over the spooled codes, the ``.npy`` outputs, their sha256 in the manifest and the
  verified load);
- ``pandas``: ``recbench.bench.pandas_preprocessing`` implements the same rules with
  ``pandas.read_csv`` chunks (same ``chunk_rows``); its arrays are checked identical to recbench's.

Each step runs in a fresh Python subprocess that reports its wall time, CPU time (user + system,
all threads), peak resident set size (``VmHWM``) and the 1-minute load average. Figures:
rows per CPU-second ratio (robust on a shared machine) and elapsed rows/s ratio (target >= 3),
peak RSS ratio (target <= 1: no higher). With several sizes, the peak-RSS growth with file size
is noted (docs/architecture.md section 6: peak memory does not grow with the file size). The data-line
count and sha256 of the raw file are computed once (``checksum`` step) and cached for both.

    python benchmarks/preprocessing.py                        # 10^6 lines, 3 rounds (~4 min on 2 cores)
    python benchmarks/preprocessing.py --rows 1000000 10000000 --rounds 1
    recbench-bench preprocessing

References: docs/architecture.md section 6; recbench.datasets.text.pipeline; recbench.datasets.synthetic.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Dict, List

from recbench.bench import harness

REPO = Path(__file__).resolve().parents[1]
STEPS = ("generation", "checksum", "polars", "pandas")


def _peak_rss_mb() -> float:
    """Peak resident set of this process image (``VmHWM``). Not ``ru_maxrss``: Linux carries that
    over from the parent across fork + exec, so a child of a large process reports the parent's peak."""
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024.0
    except (OSError, StopIteration):  # pragma: no cover - not Linux
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class RssSampler:
    """Samples the process's resident set (``/proc/self/status`` VmRSS) every ``period`` seconds."""

    def __init__(self, period: float = 0.2):
        self.period, self.samples, self._stop = period, [], threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            with open("/proc/self/status") as status:
                kb = next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
            self.samples.append((time.perf_counter(), kb / 1024.0))
            self._stop.wait(self.period)

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def peak_by_tenth(self) -> List[float]:
        """Peak RSS (MB) in each tenth of the sampled time: a flat profile means no growth with rows."""
        if len(self.samples) < 10:
            return []
        start, end = self.samples[0][0], self.samples[-1][0]
        peaks = [0.0] * 10
        for t, mb in self.samples:
            k = min(int(10 * (t - start) / max(end - start, 1e-9)), 9)
            peaks[k] = max(peaks[k], mb)
        return [round(p, 1) for p in peaks]


def child(step: str, rows: int, work: Path, chunk_rows: int) -> Dict[str, Any]:
    """One measured step, run inside its own subprocess."""
    import numpy as np

    from recbench.datasets.criteo import CriteoProtocol
    from recbench.datasets.synthetic import GeneratorConfig, generate, generated_files

    baseline = _peak_rss_mb()
    start, cpu_start = time.perf_counter(), _cpu_seconds()
    if step == "generation":
        files = generate(GeneratorConfig(rows=rows), work / "synthetic" / "raw")
        facts = {"raw_bytes": files.text.stat().st_size}
    elif step == "checksum":
        from recbench.datasets.text.sources import describe_source

        text = generated_files(GeneratorConfig(rows=rows), work / "synthetic" / "raw").text
        facts = {"lines": describe_source(text).lines}
    elif step == "polars":
        files = generated_files(GeneratorConfig(rows=rows), work / "synthetic" / "raw")
        protocol = CriteoProtocol(source=files.text, split="random", malformed="fail", chunk_rows=chunk_rows,
                                  name="synthetic", row_extras={"true_prob": str(files.true_prob)})
        with RssSampler() as sampler:
            prepared = protocol.prepare(work, force=True)
        facts = {"peak_rss_mb_by_tenth_of_time": sampler.peak_by_tenth(), "protocol_id": prepared.spec.protocol_id,
                 "split_sizes": dict(prepared.spec.split_sizes), "output_dir": str(prepared.directory),
                 "table_rows": sum(t.num_embeddings for t in prepared.spec.tables)}
    else:
        from recbench.bench.pandas_preprocessing import preprocess

        files = generated_files(GeneratorConfig(rows=rows), work / "synthetic" / "raw")
        with RssSampler() as sampler:
            sizes = preprocess(files.text, work / "pandas", chunk_rows=chunk_rows,
                               row_extras={"true_prob": files.true_prob})
        facts = {"peak_rss_mb_by_tenth_of_time": sampler.peak_by_tenth(), "split_sizes": sizes}
    seconds = time.perf_counter() - start
    cpu = _cpu_seconds() - cpu_start
    return {"seconds": seconds, "rows_per_s": rows / seconds, "cpu_seconds": cpu, "rows_per_cpu_s": rows / cpu,
            "peak_rss_mb": _peak_rss_mb(), "rss_after_imports_mb": baseline, "load_average_1min": os.getloadavg()[0],
            **facts}


def run_step(step: str, rows: int, work: Path, chunk_rows: int) -> Dict[str, Any]:
    command = [sys.executable, str(Path(__file__).resolve()), "--child", step, "--rows", str(rows),
               "--work-dir", str(work), "--chunk-rows", str(chunk_rows)]
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), TQDM_DISABLE="1")
    done = subprocess.run(command, check=True, capture_output=True, text=True, env=env)
    return json.loads(done.stdout.strip().splitlines()[-1])


def same_arrays(polars_dir: Path, pandas_dir: Path) -> List[str]:
    """Relative paths of the .npy outputs that differ (or are missing) between the two implementations."""
    import numpy as np

    differ = []
    for path in sorted(pandas_dir.rglob("*.npy")):
        rel = path.relative_to(pandas_dir)
        ours = polars_dir / rel
        if not ours.is_file() or not np.array_equal(np.load(ours, mmap_mode="r"), np.load(path, mmap_mode="r")):
            differ.append(str(rel))
    return differ


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/preprocessing.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000], help="file sizes (lines)")
    parser.add_argument("--chunk-rows", type=int, default=500_000, help="lines per streaming chunk (both sides)")
    parser.add_argument("--work-dir", type=Path, default=None, help="scratch data root (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the generated and processed files")
    parser.add_argument("--child", choices=STEPS, help=argparse.SUPPRESS)
    harness.add_common_arguments(parser, rounds=3, warmup=0)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.rows[0], args.work_dir, args.chunk_rows)))
        return 0
    if args.quick:
        args.rows, args.chunk_rows, args.rounds = [20_000], 5_000, 2
    result = harness.BenchResult.start("preprocessing", argv, args)
    scratch = args.work_dir or Path(tempfile.mkdtemp(prefix="recbench-bench-preprocessing-"))
    runs = []
    try:
        for rows in args.rows:
            work = scratch / f"rows-{rows}"
            run: Dict[str, Any] = {"rows": rows}
            for step in ("generation", "checksum"):
                run[step] = run_step(step, rows, work, args.chunk_rows)
                _show(rows, step, run[step])
            samples: Dict[str, List[Dict[str, Any]]] = {"polars": [], "pandas": []}
            for r in range(args.rounds):  # alternate which side runs first
                for step in (("polars", "pandas") if r % 2 == 0 else ("pandas", "polars")):
                    samples[step].append(run_step(step, rows, work, args.chunk_rows))
                    _show(rows, step, samples[step][-1])
            polars_dir = Path(samples["polars"][-1]["output_dir"])
            differ = same_arrays(polars_dir, work / "pandas")
            run.update(samples)
            run["arrays_equal"] = not differ
            runs.append(run)
            side = {k: {m: [s[m] for s in v] for m in ("rows_per_cpu_s", "rows_per_s", "peak_rss_mb")}
                    for k, v in samples.items()}
            equal = "identical arrays" if not differ else f"arrays DIFFER: {', '.join(differ)}"
            comparisons = (
                ("cpu", "rows_per_cpu_s", "rows/CPU-s", ">= 3",
                 f"rows per CPU-second (all threads) of recbench's polars pipeline (CriteoProtocol.prepare: the read, the code->row pass, "
                 f"output checksums, verified load) / the chunked-pandas reference (same rules, same {rows:,}-line "
                 f"synthetic file, chunks of {args.chunk_rows:,}; {equal})."),
                ("wall", "rows_per_s", "rows/s", ">= 3", "the same comparison in elapsed rows/s (polars may use both "
                 "cores; sensitive to other processes' load)."),
                ("peak_rss", "peak_rss_mb", "MB", "<= 1", "peak resident memory of the polars pipeline / the pandas "
                 "reference's (each in its own process; target: no higher)."))
            for suffix, metric, unit, target, description in comparisons:
                result.add(harness.Figure(f"polars_vs_pandas_{rows:.0e}_{suffix}", description,
                                          harness.Side("polars pipeline", side["polars"][metric], unit),
                                          harness.Side("chunked pandas", side["pandas"][metric], unit),
                                          ratio_of="candidate/reference", target=target))
            if not args.keep:
                shutil.rmtree(work, ignore_errors=True)
    finally:
        if not args.keep and args.work_dir is None:
            shutil.rmtree(scratch, ignore_errors=True)
    result.tables["steps (medians over rounds)"] = [
        {"rows": run["rows"], "step": step, "seconds": harness.median([s["seconds"] for s in samples]),
         "CPU seconds": harness.median([s["cpu_seconds"] for s in samples]),
         "rows/CPU-s": harness.median([s["rows_per_cpu_s"] for s in samples]),
         "peak RSS MB": harness.median([s["peak_rss_mb"] for s in samples]), "arrays equal": run["arrays_equal"]}
        for run in runs for step, samples in ((k, run[k] if k in ("polars", "pandas") else [run[k]])
                                              for k in ("generation", "checksum", "polars", "pandas"))]
    if len(runs) > 1:
        small, large = runs[0], runs[-1]
        growth = {k: harness.median([s["peak_rss_mb"] for s in large[k]]) / harness.median([s["peak_rss_mb"] for s in small[k]])
                  for k in ("polars", "pandas")}
        result.notes.append(f"peak RSS at {large['rows']:,} lines / at {small['rows']:,}: polars {growth['polars']:.2f}x, "
                            f"pandas {growth['pandas']:.2f}x (rows x{large['rows'] / small['rows']:g}).")
    result.tables["runs"] = [{"rows": run["rows"], "polars RSS by tenth of run (MB)":
                              " ".join(f"{x:.0f}" for x in run["polars"][-1].get("peak_rss_mb_by_tenth_of_time", []))}
                             for run in runs]
    result.finish(args)
    return 0 if all(run["arrays_equal"] for run in runs) else 1


def _show(rows: int, step: str, facts: Dict[str, Any]) -> None:
    print(f"rows={rows:,} {step}: {facts['seconds']:.1f} s ({facts['cpu_seconds']:.1f} CPU s), "
          f"{facts['rows_per_s']:,.0f} rows/s, peak RSS {facts['peak_rss_mb']:.0f} MB, "
          f"load {facts['load_average_1min']:.1f}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
