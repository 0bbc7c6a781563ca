"""recbench-report end to end: from exported JSON and from an MLflow store (numbers equal MLflow's)."""
from __future__ import annotations

import csv
import json
import re

import pytest
from report_fixtures import fixture_records

from recbench.cli.report import main as report_main
from recbench.reporting.runs import load_mlflow_runs, save_records
from recbench.tracking.base import FAILED, FINISHED
from recbench.tracking.mlflow_tracker import MLflowTracker


def test_report_from_json_writes_every_output(tmp_path):
    save_records(fixture_records(), tmp_path / "runs.json")
    assert report_main(["--records", str(tmp_path / "runs.json"), "--out", str(tmp_path / "reports")]) == 0
    folder = tmp_path / "reports" / "toy"
    for name in ("leaderboard.md", "leaderboard.csv", "index.html", "pareto.png", "budgets.png"):
        assert (folder / name).stat().st_size > 0, name
    assert (folder / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (folder / "index.html").read_text()
    # self-contained: figures embedded, no external script/style/image resource
    assert page.count('src="data:image/png;base64,') == 2
    assert '<figure class="budgets">' in page and "One panel per method" in page  # captions say what is drawn
    assert not re.search(r'<(script|img|link)[^>]+(src|href)="https?://', page)
    assert ">0.7800 ± 0.0050</td>" in page and ">≈ (p 1)</td>" in page
    assert "recbench -m sweep=fixture method=qr budget.compression_ratio=0.1 seed=0,1,2" in page
    rows = list(csv.DictReader(open(folder / "leaderboard.csv")))
    assert {r["method"] for r in rows} == {"full", "hashing", "qr", "robe", "dhe"}
    # provenance: the runs' code, software and sweeps, in the Markdown and as an HTML list
    markdown = (folder / "leaderboard.md").read_text()
    assert "- code (git commit of the runs):" in markdown and "- software:" in markdown and "- sweeps:" in markdown
    assert re.search(r"- seeds per finished row: \d+ in \d+ rows?", markdown)
    assert '<ul class="note"><li>code (git commit of the runs):' in page


def test_report_numbers_equal_what_mlflow_holds(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = MLflowTracker(uri, str(tmp_path / "art"))
    source = [r for r in fixture_records() if r["run_status"] in ("FINISHED", "FAILED")]
    for r in source:
        tags = {k: r[k] for k in ("method", "model", "dataset", "protocol", "dataset_protocol_id", "compression_ratio",
                                  "seed", "sweep_id", "status", "status_reason", "config_hash", "group_hash", "overrides")}
        tracker.start_run(r["experiment"], r["run_name"], tags, {"seed": r["seed"]})
        tracker.log_metrics(r["metrics"])
        tracker.end_run(FINISHED if r["run_status"] == "FINISHED" else FAILED)
    records = load_mlflow_runs(uri)
    assert len(records) == len(source)
    assert report_main(["--tracking-uri", uri, "--out", str(tmp_path / "reports"), "--export",
                        str(tmp_path / "export.json")]) == 0
    assert len(json.loads((tmp_path / "export.json").read_text())) == len(source)
    client = MlflowClient(uri)
    rows = list(csv.DictReader(open(tmp_path / "reports" / "toy" / "leaderboard.csv")))
    checked = 0
    for row in rows:
        if row["status"] != "finished":
            continue
        values = [client.get_run(run_id).data.metrics["test/auc"] for run_id in row["run_ids"].split()]
        assert float(row["test/auc_mean"]) == pytest.approx(sum(values) / len(values), abs=1e-12)
        assert int(row["seeds"]) == len(values)
        for url, run_id in zip(row["run_urls"].split(), row["run_ids"].split()):
            experiment_id = client.get_run(run_id).info.experiment_id
            assert url == f"http://127.0.0.1:5000/#/experiments/{experiment_id}/runs/{run_id}"
        checked += 1
    assert checked == 5  # full, hashing x2, qr, robe


def test_dashboard_search_expression_selects_one_budget_on_one_dataset(tmp_path):
    """The README's MLflow search: every method at ratio 0.01 on a dataset, in one expression."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = MLflowTracker(uri, str(tmp_path / "art"))
    for dataset in ("synthetic", "movielens100k"):
        for method, ratio in (("hashing", 0.01), ("qr", 0.01), ("qr", 0.1)):
            tracker.start_run(f"{dataset}-p", f"{method}@{ratio:g}/dcn/{dataset}/s0",
                              {"method": method, "dataset": dataset, "compression_ratio": f"{ratio:g}"}, {})
            tracker.end_run()
    client = MlflowClient(uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    found = client.search_runs(experiments, "tags.dataset = 'synthetic' and tags.compression_ratio = '0.01'")
    assert sorted(r.data.tags["method"] for r in found) == ["hashing", "qr"]
    by_name = client.search_runs(experiments, "attributes.run_name LIKE '%@0.01/%/synthetic/%'")
    assert len(by_name) == 2


def test_no_runs_is_a_clear_error(tmp_path, capsys):
    save_records([], tmp_path / "none.json")
    assert report_main(["--records", str(tmp_path / "none.json"), "--out", str(tmp_path / "r")]) == 2
    assert "recbench-report: error: no recbench runs" in capsys.readouterr().err


def test_a_store_that_cannot_be_read_is_one_line_in_seconds_and_is_never_created(tmp_path, capsys):
    """A mistyped folder or a missing SQLite file (reading must not create an empty store), or a server
    that does not answer (was: minutes of urllib3 retries): exit 2, one line."""
    import time

    for uri, message in [(f"sqlite:///{tmp_path}/none.db", "there is no MLflow store at"),
                         (f"sqlite:///{tmp_path}/nodir/x.db", "/nodir"),
                         ("http://127.0.0.1:9", "does not answer")]:
        start = time.perf_counter()
        assert report_main(["--tracking-uri", uri, "--out", str(tmp_path / "r")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("recbench-report: error: ") and message in err, err
        assert time.perf_counter() - start < 20
    assert not (tmp_path / "none.db").exists() and not (tmp_path / "nodir").exists() and not (tmp_path / "r").exists()


@pytest.mark.parametrize("content, message", [
    (None, "No such file or directory"),
    ('{"runs": [', "Expecting value"),
])
def test_an_unreadable_records_file_is_a_clear_error(tmp_path, capsys, content, message):
    if content is not None:
        (tmp_path / "runs.json").write_text(content)
    assert report_main(["--records", str(tmp_path / "runs.json"), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"recbench-report: error: --records {tmp_path / 'runs.json'}: ") and message in err
    assert not (tmp_path / "r").exists()


def test_an_export_into_a_missing_folder_is_refused_before_any_report_is_written(tmp_path, capsys):
    save_records(fixture_records(), tmp_path / "runs.json")
    assert report_main(["--records", str(tmp_path / "runs.json"), "--out", str(tmp_path / "r"),
                        "--export", str(tmp_path / "no" / "runs.json")]) == 2
    assert f"folder {tmp_path / 'no'} does not exist" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_a_selection_that_leaves_no_run_names_itself_and_what_there_is(tmp_path, capsys):
    records = fixture_records()
    save_records(records, tmp_path / "runs.json")
    base = ["--records", str(tmp_path / "runs.json"), "--out", str(tmp_path / "r"), "--no-figures"]
    assert report_main([*base, "--protocol", "deadbeef"]) == 2
    assert (f"--protocol left none of the {len(records)} runs in {tmp_path / 'runs.json'}; "
            f"protocol values there: toy-abc/1234 ({len(records)})") in capsys.readouterr().err
    assert report_main([*base, "--sweep-id", "nosuch"]) == 2
    err = capsys.readouterr().err
    assert f"--sweep-id left none of the {len(records)} runs" in err and f"sweep_id values there: fixture ({len(records)})" in err
    assert report_main([*base, "--dataset", "nosuch"]) == 2
    assert f"no recbench runs found for dataset nosuch in {tmp_path / 'runs.json'}; datasets there: toy ({len(records)})" \
        in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_sweeps_can_be_selected_or_left_out(tmp_path):
    records = fixture_records()
    for i, record in enumerate(records):
        record["sweep_id"] = "main" if i % 2 else "rerun"
    save_records(records, tmp_path / "runs.json")
    exported = {}
    for flag in ("--sweep-id", "--exclude-sweep-id"):
        out = tmp_path / flag
        assert report_main(["--records", str(tmp_path / "runs.json"), "--out", str(out), "--no-figures",
                            flag, "rerun", "--export", str(tmp_path / f"kept{flag}.json")]) == 0
        exported[flag] = {r["sweep_id"] for r in json.loads((tmp_path / f"kept{flag}.json").read_text())}
    assert exported == {"--sweep-id": {"rerun"}, "--exclude-sweep-id": {"main"}}


def test_protocols_can_be_selected(tmp_path):
    records = fixture_records()
    for i, record in enumerate(records):
        record["protocol"] = f"synthetic-3a21043c37/{'03f852f4' if i % 2 else 'aaaa0000'}"
    save_records(records, tmp_path / "runs.json")
    kept = {}
    for wanted in ("03f852f4", "synthetic-3a21043c37/aaaa0000"):
        assert report_main(["--records", str(tmp_path / "runs.json"), "--out", str(tmp_path / wanted.replace("/", "_")),
                            "--no-figures", "--protocol", wanted, "--export", str(tmp_path / "kept.json")]) == 0
        kept[wanted] = {r["protocol"] for r in json.loads((tmp_path / "kept.json").read_text())}
    assert kept == {"03f852f4": {"synthetic-3a21043c37/03f852f4"},
                    "synthetic-3a21043c37/aaaa0000": {"synthetic-3a21043c37/aaaa0000"}}


def test_coverage_counts_the_seeds_of_each_row():
    from recbench.reporting.provenance import coverage

    def run(method, ratio, seed, status="finished"):
        return {"protocol": "p/1", "method": method, "compression_ratio": ratio, "seed": seed, "status": status}

    records = [run("qr", "0.1", s) for s in "012"] + [run("qr", "0.1", "0")]  # a duplicate seed counts once
    records += [run("hashing", "0.1", s) for s in "012"] + [run("hashing", "0.5", "0"), run("hashing", "0.5", "1", "failed")]
    assert coverage(records) == ("seeds per finished row: 3 in 2 rows, 1 in 1 row (rows with fewer than 3 seeds "
                                 "are less certain: see the `seeds` column)")
    assert coverage([run("qr", "0.1", s) for s in "01"]) == "seeds per finished row: 2 in 1 row"
    assert coverage([run("qr", "0.1", "0", "failed")]) == "seeds per finished row: no finished run"


def test_provenance_counts_runs_per_commit_in_words():
    from recbench.reporting.provenance import provenance

    records = [{"git_commit": "abc1234", "sweep_id": "s"}] * 2 + [{"git_commit": "def5678", "sweep_id": "s"}]
    header = provenance(records)
    assert "- code (git commit of the runs): `abc1234` (2 runs); `def5678` (1 run)" in header
    assert "- software: `not recorded (runs before tagging)` (3 runs)" in header
