"""Exported run records imported into a new MLflow store: the sweep's skip check and the report see
them as the original runs; a second import adds nothing; bad records are refused before any write."""
from __future__ import annotations

import json

import pytest
from report_fixtures import fixture_records

from recbench.reporting.import_records import RecordError, import_records, main as import_main
from recbench.cli.report import main as report_main
from recbench.reporting.leaderboard import aggregate
from recbench.reporting.runs import load_mlflow_runs, load_records, relink, save_records
from recbench.tracking.base import FAILED, FINISHED
from recbench.tracking.mlflow_tracker import MLflowTracker

COMPARED = ("method", "dataset", "protocol", "compression_ratio", "seed", "sweep_id", "status", "status_reason",
            "config_hash", "group_hash", "overrides", "experiment", "run_name", "start_time", "end_time", "metrics")


def original_store(tmp_path):
    """A store holding the fixture's FINISHED/FAILED runs plus one still RUNNING."""
    uri = f"sqlite:///{tmp_path}/original.db"
    tracker = MLflowTracker(uri, str(tmp_path / "art"))
    for r in fixture_records():
        tags = {k: r[k] for k in ("method", "model", "dataset", "protocol", "dataset_protocol_id", "compression_ratio",
                                  "seed", "sweep_id", "status", "status_reason", "config_hash", "group_hash", "overrides")}
        tracker.start_run(r["experiment"], r["run_name"], tags, {"seed": r["seed"], "paths.data_root": str(tmp_path),
                                                                 "tracking.tracking_uri": f"sqlite:///{tmp_path}/x.db"})
        tracker.log_metrics(r["metrics"])
        if r["run_status"] != "RUNNING":
            tracker.end_run(FINISHED if r["run_status"] == "FINISHED" else FAILED)
    return uri


def comparable(records):
    return sorted((tuple((k, json.dumps(r.get(k), sort_keys=True)) for k in COMPARED if k not in ("start_time", "end_time"))
                   for r in records))


def test_imported_runs_are_what_was_exported_and_skip_their_jobs(tmp_path):
    exported = load_mlflow_runs(original_store(tmp_path))
    save_records(exported, tmp_path / "runs.json")
    uri = f"sqlite:///{tmp_path}/new.db"
    assert import_main([str(tmp_path / "runs.json"), "--tracking-uri", uri, "--artifact-root",
                        str(tmp_path / "art2")]) == 0
    imported = load_mlflow_runs(uri)
    assert len(imported) == len(exported) == len(fixture_records())
    running = [r for r in exported if r["run_status"] == "RUNNING"]
    assert len(running) == 1
    assert comparable([r for r in imported if r["status"] != "killed"]) == comparable(
        [r for r in exported if r["run_status"] != "RUNNING"])
    killed = [r for r in imported if r["status"] == "killed"]
    assert len(killed) == 1 and killed[0]["status_reason"].startswith("still RUNNING when exported (runs.json)")
    by_source = {}
    tracker = MLflowTracker(uri, str(tmp_path / "art2"))
    for run in imported:
        info = tracker.client.get_run(run["run_id"])
        by_source[info.data.tags["imported_from_run_id"]] = info
        assert info.data.tags["imported_from"] == "runs.json"
    for r in exported:  # status, times and params carried over; the orphan comes back KILLED (its job re-runs)
        info = by_source[r["run_id"]].info
        assert info.status == ("KILLED" if r["run_status"] == "RUNNING" else r["run_status"])
        assert info.start_time == r["start_time"]
        # params carried over, except where the original machine kept its files
        assert by_source[r["run_id"]].data.params == r["params"] == {"seed": str(r["seed"])}
    finished = [r for r in exported if r["run_status"] == "FINISHED"]
    failed = [r for r in exported if r["run_status"] != "FINISHED"]
    for r in finished:  # what recbench-sweep and the job ask before running a job
        found = tracker.find_finished(r["experiment"], r["config_hash"])
        assert found and by_source[r["run_id"]].info.run_id in {
            by_source[o["run_id"]].info.run_id for o in finished if o["config_hash"] == r["config_hash"]}
    for r in failed:
        if not any(o["config_hash"] == r["config_hash"] for o in finished):
            assert tracker.find_finished(r["experiment"], r["config_hash"]) is None
    # idempotent: a second import (also into the original store itself) writes nothing
    assert str(import_records(exported, tracker, "runs.json")) == f"{len(exported)} records: 0 imported, " \
                                                                     f"{len(exported)} already in the store (skipped)"
    assert len(load_mlflow_runs(uri)) == len(exported)
    same = MLflowTracker(f"sqlite:///{tmp_path}/original.db", str(tmp_path / "art"))
    assert len(import_records(exported, same, "runs.json").imported) == 0
    # exported again from the new store: a third store gets each run once, under its first run id
    save_records(imported, tmp_path / "again.json")
    third = MLflowTracker(f"sqlite:///{tmp_path}/third.db", str(tmp_path / "art3"))
    assert len(import_records(load_records(tmp_path / "again.json"), third, "again.json").imported) == len(exported)
    assert len(import_records(exported, third, "runs.json").imported) == 0
    assert {r["imported_from_run_id"] for r in load_mlflow_runs(third.tracking_uri)} == {r["run_id"] for r in exported}
    # the report says which runs were imported
    assert report_main(["--tracking-uri", uri, "--out", str(tmp_path / "reports"), "--no-figures"]) == 0
    header = (tmp_path / "reports" / "toy" / "leaderboard.md").read_text()
    assert f"- runs imported from exported records (tags, params and final metrics; their artifacts stay in " \
           f"the store they were exported from): {len(exported)} from `runs.json`" in header


def test_a_report_from_exported_records_links_to_their_imported_copies(tmp_path, capsys):
    """Built from ``--records`` with a store holding imported copies, the report's links open those
    copies (their new run ids and experiment ids); without that store it says where its links lead."""
    exported = load_mlflow_runs(original_store(tmp_path))
    save_records(exported, tmp_path / "runs.json")
    reports = ["--records", str(tmp_path / "runs.json"), "--no-figures", "--ui-url", "http://ui:8080"]
    assert report_main([*reports, "--tracking-uri", f"sqlite:///{tmp_path}/absent.db", "--out", str(tmp_path / "a")]) == 0
    before = (tmp_path / "a" / "toy" / "leaderboard.md").read_text()
    assert exported[0]["run_id"] in before and "run links use the run ids of the store the records were exported from" in before
    assert not (tmp_path / "absent.db").exists()  # looked for, never created
    uri = f"sqlite:///{tmp_path}/new.db"
    assert import_main([str(tmp_path / "runs.json"), "--tracking-uri", uri, "--artifact-root", str(tmp_path / "art2")]) == 0
    copies = {r["imported_from_run_id"]: r for r in load_mlflow_runs(uri)}
    assert report_main([*reports, "--tracking-uri", uri, "--out", str(tmp_path / "b")]) == 0
    after = (tmp_path / "b" / "toy" / "leaderboard.md").read_text()
    assert f"run links: {len(exported)} of {len(exported)} runs link to their copies" in after
    for record in exported:
        assert copies[record["run_id"]]["run_id"] != record["run_id"] and record["run_id"] not in after
    shown = [(e, i) for row in aggregate(relink(exported, list(copies.values()))) for e, i in zip(row.experiment_ids, row.run_ids)]
    assert len(shown) >= len(exported) - 1  # every run but the older duplicate of a seed
    for experiment_id, run_id in shown:
        assert run_id in {c["run_id"] for c in copies.values()}
        assert f"http://ui:8080/#/experiments/{experiment_id}/runs/{run_id}" in after
    assert "Run links open the MLflow UI at http://ui:8080\n" in capsys.readouterr().out


def test_the_ui_address_comes_from_an_http_store_or_the_port(monkeypatch):
    from recbench.cli.report import ui_url_of

    assert ui_url_of("http://mlflow.example:7000/") == "http://mlflow.example:7000"
    monkeypatch.setenv("PORT", "5123")
    assert ui_url_of("sqlite:///mlflow.db") == "http://127.0.0.1:5123"


@pytest.mark.parametrize("damage, message", [
    (lambda r: r.pop("run_status"), "record 3: no field 'run_status'"),
    (lambda r: r.update(run_status="DONE"), "run_status 'DONE'; allowed: FINISHED, FAILED, KILLED, RUNNING"),
    (lambda r: r.update(metrics=[0.7]), "'metrics' is not an object"),
    (lambda r: r.update(params="seed=0"), "'params' is not an object"),
])
def test_a_bad_record_is_named_and_nothing_is_written(tmp_path, damage, message):
    records = fixture_records()
    damage(records[3])
    tracker = MLflowTracker(f"sqlite:///{tmp_path}/new.db", str(tmp_path / "art"))
    with pytest.raises(RecordError, match=message.replace("(", r"\(").replace(")", r"\)")) as caught:
        import_records(records, tracker, "runs.json")
    assert str(caught.value).startswith("runs.json: record 3")
    assert tracker.client.search_experiments(filter_string="name != 'Default'") == []


def test_the_command_reports_unreadable_files(tmp_path, capsys):
    (tmp_path / "broken.json").write_text("[{")
    (tmp_path / "object.json").write_text("{}")
    uri = f"sqlite:///{tmp_path}/new.db"
    assert import_main([str(tmp_path / "broken.json"), "--tracking-uri", uri]) == 2
    assert "broken.json" in capsys.readouterr().err
    assert import_main([str(tmp_path / "object.json"), "--tracking-uri", uri]) == 2
    assert "not a list of records" in capsys.readouterr().err
    records = fixture_records()
    save_records(records, tmp_path / "runs.json")
    assert import_main([str(tmp_path / "runs.json"), "--tracking-uri", uri, "--dry-run"]) == 0
    assert f"{len(records)} records: {len(records)} imported, 0 already" in capsys.readouterr().out
    assert load_mlflow_runs(uri) == []
