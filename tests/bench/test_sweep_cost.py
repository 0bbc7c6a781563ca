"""benchmarks/sweep_cost.py on fixture records: CPU-second ratios to `full`, exact, and the fallbacks."""
from __future__ import annotations

import importlib.util
import json

from recbench.bench import harness


def load():
    spec = importlib.util.spec_from_file_location("sweep_cost", harness.BENCH_DIR / "sweep_cost.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def record(method, ratio, seed, wall, cpu=None, sweep="leaderboard_toy-abc", protocol="toy-1", status="finished"):
    metrics = {"train/seconds": wall * 0.8, f"stage/{'search' if method == 'pep' else 'train'}/seconds": wall * 0.5}
    if cpu is not None:
        metrics["run/cpu_seconds"] = cpu
    return {"method": method, "compression_ratio": str(ratio), "seed": str(seed), "sweep_id": sweep,
            "dataset": "synthetic", "dataset_protocol_id": protocol, "status": status, "start_time": 1_000,
            "end_time": 1_000 + int(wall * 1000), "metrics": metrics}


def test_cpu_ratios_are_exact_and_wall_is_the_labelled_fallback(tmp_path):
    records = [record("full", 1.0, s, wall=w, cpu=c) for s, (w, c) in enumerate([(10, 8), (50, 10), (12, 12)])]
    records += [record("pep", 0.1, s, wall=w, cpu=c) for s, (w, c) in enumerate([(40, 30), (90, 40), (45, 50)])]
    records += [record("dsl", 0.1, 0, wall=20), record("dsl", 0.1, 1, wall=30, status="failed")]
    records += [record("hashing", 0.1, 0, wall=5, cpu=5, sweep="other")]
    path = tmp_path / "runs.json"
    path.write_text(json.dumps([{**r, "sweep_id": "leaderboard_synthetic-abc"} if r["sweep_id"] != "other" else r
                                for r in records]))
    out = tmp_path / "out"
    assert load().main(["--dataset", "synthetic", "--records", str(path), "--output-dir", str(out)]) == 0
    result = json.loads((out / "sweep_cost.json").read_text())
    figures = {f["name"]: f for f in result["figures"]}
    assert set(figures) == {"synthetic_pep", "synthetic_dsl"}  # hashing is another sweep; failed runs ignored
    assert figures["synthetic_pep"]["ratio"] == 40 / 10  # CPU medians: 40 s vs full's 10 s
    assert "CPU seconds" in figures["synthetic_pep"]["description"]
    assert figures["synthetic_dsl"]["ratio"] == 20 / 12  # no CPU metric: wall medians, labelled so
    assert "wall time (load-dependent)" in figures["synthetic_dsl"]["description"]
    table = next(v for k, v in result["tables"].items() if k.startswith("synthetic"))
    pep = next(r for r in table if r["method"] == "pep")
    assert pep["x full (CPU)"] == 4.0 and pep["runs"] == 3 and pep["median stage s"] == "search 22"


def test_a_store_without_leaderboard_runs_writes_nothing(tmp_path):
    path = tmp_path / "runs.json"
    path.write_text("[]")
    assert load().main(["--records", str(path), "--output-dir", str(tmp_path / "out")]) == 0
    assert not (tmp_path / "out").exists()


def test_full_with_cpu_seconds_from_another_sweep_beats_the_sweeps_own_untimed_full(tmp_path):
    """The sweep's own `full` predates `run/cpu_seconds` (wall 150 s at load); its methods logged CPU
    seconds: the reference is `full` of the same protocol from another sweep that has them."""
    records = [record("full", 1.0, 0, wall=150, sweep="leaderboard_synthetic-abc")]
    records += [record("pep", 0.1, s, wall=20, cpu=c, sweep="leaderboard_synthetic-abc") for s, c in enumerate([14, 15, 16])]
    records += [record("full", 1.0, 0, wall=11, cpu=10, sweep="cost"), record("full", 1.0, 1, wall=12, cpu=12, sweep="cost")]
    records += [record("full", 1.0, 0, wall=11, cpu=1, sweep="cost", protocol="other-protocol")]
    path = tmp_path / "runs.json"
    path.write_text(json.dumps(records))
    out = tmp_path / "out"
    assert load().main(["--dataset", "synthetic", "--records", str(path), "--output-dir", str(out)]) == 0
    result = json.loads((out / "sweep_cost.json").read_text())
    figures = {f["name"]: f for f in result["figures"]}
    assert figures["synthetic_pep"]["ratio"] == 15 / 11  # CPU medians: pep 15 s, full (10, 12) 11 s
    assert "CPU seconds" in figures["synthetic_pep"]["description"]
    assert any("with CPU seconds (the sweep's own full runs have none)" in k for k in result["tables"])
