"""recbench-bench runs a benchmark script end to end at toy size and writes a valid record."""
from __future__ import annotations

import json

from recbench.bench import harness
from recbench.cli import bench


def test_every_benchmark_is_listed_and_unknown_names_are_rejected(capsys):
    assert {"train_step", "loader", "preprocessing", "lookup", "evaluation", "end_to_end", "hot_paths"} <= set(bench.available())
    assert bench.main(["no_such_benchmark"]) == 2
    assert "allowed:" in capsys.readouterr().err


def test_quick_run_writes_a_valid_record_elsewhere(tmp_path):
    assert bench.main(["evaluation", "--quick", "--output-dir", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "evaluation.json").read_text())
    harness.validate_record(record)
    figure = record["figures"][0]
    assert figure["name"] == "exact_auc_vs_sklearn" and len(figure["candidate"]["samples"]) == 2
    assert record["settings"]["quick"] is True and record["settings"]["clock"] == "cpu"
    assert (tmp_path / "evaluation.md").is_file()


def test_quick_runs_never_write_the_recorded_results():
    import argparse

    quick = argparse.Namespace(quick=True, output_dir=None)
    assert harness.output_dir(quick) != harness.RESULTS_DIR and harness.output_dir(quick).name == "recbench-bench-quick"
    assert harness.output_dir(argparse.Namespace(quick=False, output_dir=None)) == harness.RESULTS_DIR
