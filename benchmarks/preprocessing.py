"""Preprocessing throughput and peak memory of the streaming text pipeline, at two file sizes.

For each size (default 10**6 and 10**7 lines) the synthetic generator writes a Criteo-format
file, then the Criteo pipeline prepares it exactly as the ``synthetic`` protocol does (random
8:1:1 split, the true probability as the row extra ``true_prob``). Each step runs in a fresh
Python subprocess that reports its own peak resident set size (``ru_maxrss``), so the figures
are per step and never inherit another step's memory:

- ``generation``: the teacher's calibration plus writing the text file and its
  true-probability sidecar (``synthetic.generate``);
- ``checksum``: sha256 and line count of the raw file (what the protocol id needs; cached next
  to the file afterwards, so a later run skips it);
- ``preprocessing``: both streaming passes, the ``.npy`` outputs, the manifest checksums and
  the verified load (``CriteoProtocol.prepare``);
- ``bayes_metrics``: the exact Bayes-optimal test AUC and log loss the ``synthetic`` protocol
  adds to its manifest (O(test rows) memory by nature: an exact AUC sorts the whole split).

Wall time is shared-machine sensitive, so each step also reports its CPU time (user + system,
all threads) and the 1-minute load average at its end; ``rows_per_cpu_s`` is the figure to
compare across machines and runs.

The claim checked is DESIGN.md section 6: peak memory does not grow with the file size, i.e.
``peak_rss_ratio`` (largest size / smallest size) stays near 1 while the rows grow tenfold, and
the preprocessing step's RSS profile (``peak_rss_mb_by_tenth_of_time``, sampled every 0.2 s) is
flat from its first chunks to its last.
Results go to ``benchmarks/results/preprocessing.json``.

    python benchmarks/preprocessing.py                    # 1e6 and 1e7 lines
    python benchmarks/preprocessing.py --rows 100000 1000000 --chunk-rows 250000
    recbench-bench preprocessing

References: DESIGN.md section 6; recbench.datasets.preprocessing; recbench.datasets.synthetic.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Dict, List

REPO = Path(__file__).resolve().parents[1]
RESULT = REPO / "benchmarks" / "results" / "preprocessing.json"
STEPS = ("generation", "checksum", "preprocessing", "bayes_metrics")


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: kilobytes


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
        from recbench.datasets.preprocessing import describe_source

        text = generated_files(GeneratorConfig(rows=rows), work / "synthetic" / "raw").text
        facts = {"lines": describe_source(text).lines}
    elif step == "preprocessing":
        files = generated_files(GeneratorConfig(rows=rows), work / "synthetic" / "raw")
        protocol = CriteoProtocol(source=files.text, split="random", malformed="fail", chunk_rows=chunk_rows,
                                  name="synthetic", row_extras={"true_prob": str(files.true_prob)})
        with RssSampler() as sampler:
            prepared = protocol.prepare(work, force=True)
        facts = {"peak_rss_mb_by_tenth_of_time": sampler.peak_by_tenth(),"protocol_id": prepared.spec.protocol_id, "split_sizes": dict(prepared.spec.split_sizes),
                 "table_rows": sum(t.num_embeddings for t in prepared.spec.tables),
                 "processed_bytes": sum(p.stat().st_size for p in prepared.directory.rglob("*") if p.is_file()),
                 "positive_rate": prepared.spec.extras["positive_rate"]["all"]}
    else:
        from sklearn.metrics import log_loss, roc_auc_score

        test = next((work / "criteo" / "processed").iterdir()) / "test"
        labels = np.load(test / "labels.npy")
        true_prob = np.load(test / "targets" / "true_prob.npy").astype(np.float64)
        facts = {"test_rows": int(labels.size), "bayes_test_auc": float(roc_auc_score(labels, true_prob)),
                 "bayes_test_logloss": float(log_loss(labels, true_prob, labels=[0, 1]))}
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


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/preprocessing.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 10_000_000], help="file sizes (lines)")
    parser.add_argument("--chunk-rows", type=int, default=500_000, help="lines per streaming chunk")
    parser.add_argument("--work-dir", type=Path, default=None, help="scratch data root (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the generated and processed files")
    parser.add_argument("--output", type=Path, default=RESULT)
    parser.add_argument("--child", choices=STEPS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.rows[0], args.work_dir, args.chunk_rows)))
        return 0

    import numpy
    import polars

    load_at_start = os.getloadavg()[0]
    scratch = args.work_dir or Path(tempfile.mkdtemp(prefix="recbench-bench-preprocessing-"))
    runs = []
    try:
        for rows in args.rows:
            work = scratch / f"rows-{rows}"
            run = {"rows": rows}
            for step in STEPS:
                print(f"rows={rows:,}: {step} ...", flush=True)
                run[step] = run_step(step, rows, work, args.chunk_rows)
                print(f"  {run[step]['seconds']:.1f} s ({run[step]['cpu_seconds']:.1f} CPU s), "
                      f"{run[step]['rows_per_s']:,.0f} rows/s, peak RSS {run[step]['peak_rss_mb']:.0f} MB, "
                      f"load {run[step]['load_average_1min']:.1f}", flush=True)
            runs.append(run)
            if not args.keep:
                shutil.rmtree(work, ignore_errors=True)
    finally:
        if not args.keep and args.work_dir is None:
            shutil.rmtree(scratch, ignore_errors=True)
    small, large = min(runs, key=lambda r: r["rows"]), max(runs, key=lambda r: r["rows"])
    result = {
        "benchmark": "preprocessing",
        "command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name, "benchmarks/preprocessing.py", *(argv or sys.argv[1:])]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "python": platform.python_version(), "polars": polars.__version__,
                    "numpy": numpy.__version__},
        "chunk_rows": args.chunk_rows,
        "load_average_1min_at_start": load_at_start,
        "runs": runs,
        "peak_rss_ratio": {step: large[step]["peak_rss_mb"] / small[step]["peak_rss_mb"]
                           for step in STEPS},
        "rows_ratio": large["rows"] / small["rows"],
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({"peak_rss_ratio": result["peak_rss_ratio"], "rows_ratio": result["rows_ratio"]}))
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
