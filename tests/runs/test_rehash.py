"""``python -m recbench.runs.rehash``: re-tags recorded runs whose hashes the current code
computes differently from their ``config.yaml`` artifact, keeps the old values, is idempotent."""
import yaml

from recbench.runs.identity import config_hash, group_hash
from recbench.tracking.mlflow_tracker import MLflowTracker
from recbench.runs.rehash import main, rehash_runs


def record(tmp_path, uri, name, resolved, tags):
    tracker = MLflowTracker(uri, str(tmp_path / "art"))
    tracker.start_run("toy-protocol", name, tags, {})
    if resolved is not None:
        path = tmp_path / name / "config.yaml"
        path.parent.mkdir(parents=True)
        path.write_text(yaml.safe_dump(resolved))
        tracker.log_artifact(path)
    tracker.end_run()
    return tracker


def test_stale_hashes_are_rewritten_once_and_the_old_values_kept(tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    resolved = {"method": {"name": "hashing"}, "seed": 1, "dataset": {"name": "toy", "raw_dir": "/x/raw"}}
    current = {"config_hash": config_hash(resolved), "group_hash": group_hash(resolved)}
    record(tmp_path, uri, "stale", resolved, {"config_hash": "0123456789abcdef", "group_hash": current["group_hash"]})
    record(tmp_path, uri, "current", resolved, dict(current))
    record(tmp_path, uri, "no-artifact", None, {"config_hash": "fedcba9876543210"})

    assert main(["--tracking-uri", uri, "--dry-run"]) == 0
    assert "would re-tag: 3 runs: 1 re-tagged, 1 already current, 1 without" in capsys.readouterr().out
    client = MlflowClient(uri)
    runs = {r.info.run_name: r for r in client.search_runs([e.experiment_id for e in client.search_experiments()])}
    assert runs["stale"].data.tags["config_hash"] == "0123456789abcdef"  # a dry run changes nothing

    summary = rehash_runs(uri)
    assert (summary.runs, len(summary.rewritten), summary.unchanged, len(summary.without_config)) == (3, 1, 1, 1)
    stale = client.get_run(runs["stale"].info.run_id).data.tags
    assert stale["config_hash"] == current["config_hash"] and stale["config_hash_before"] == "0123456789abcdef"
    assert stale["group_hash"] == current["group_hash"] and "group_hash_before" not in stale
    assert client.get_run(runs["no-artifact"].info.run_id).data.tags["config_hash"] == "fedcba9876543210"
    again = rehash_runs(uri)
    assert (len(again.rewritten), again.unchanged) == (0, 2)


def test_a_run_keeps_the_revision_it_was_made_with(tmp_path):
    """``pep`` is past revision 1: its revision-1 runs (tag ``method_revision`` 1, or no tag: runs
    from before the tag) must keep a hash that a re-launched sweep does not take for a current run."""
    from mlflow.tracking import MlflowClient

    from recbench.methods.pep import PEP

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    resolved = {"method": {"_target_": "recbench.methods.pep.PEP", "name": "pep"}, "seed": 0,
                "dataset": {"name": "toy"}}
    revision_1 = {"config_hash": config_hash(resolved, revision=1), "group_hash": group_hash(resolved, revision=1)}
    assert PEP.revision > 1 and revision_1["config_hash"] != config_hash(resolved)
    record(tmp_path, uri, "tagged", resolved, {**revision_1, "method_revision": "1"})
    record(tmp_path, uri, "untagged", resolved, dict(revision_1))
    record(tmp_path, uri, "current", resolved, {"config_hash": config_hash(resolved),
                                                "group_hash": group_hash(resolved), "method_revision": str(PEP.revision)})
    summary = rehash_runs(uri)
    assert (len(summary.rewritten), summary.unchanged) == (0, 3)
    client = MlflowClient(uri)
    hashes = {r.info.run_name: r.data.tags["config_hash"]
              for r in client.search_runs([e.experiment_id for e in client.search_experiments()])}
    assert hashes["tagged"] == hashes["untagged"] == revision_1["config_hash"] != hashes["current"]
