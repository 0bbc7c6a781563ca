"""Recompute the ``config_hash`` and ``group_hash`` tags of recorded runs after the hash definition
changed (``recbench.runs.identity.NON_NUMERIC_KEYS`` gained a key that never changes the numbers).

A re-launched sweep recognises a finished job by its ``config_hash`` tag and the report groups a
row's seeds by ``group_hash``: when the hash stops covering a key (e.g. ``dataset.raw_dir``, an
output location that differs between a relative and an absolute data root), stored tags computed
the old way no longer match — finished jobs would be re-run and one configuration would appear as
two leaderboard rows. This tool reads each run's resolved configuration (its ``config.yaml``
artifact, exactly what the job hashed), recomputes both hashes with the current code and rewrites
the tags that differ, keeping the old values in ``config_hash_before`` / ``group_hash_before``.
Runs without the artifact are listed and left alone. It is idempotent; ``--dry-run`` only counts.

    python -m recbench.runs.rehash [--tracking-uri sqlite:///mlflow.db] [--dry-run]

References: docs/architecture.md section 5 (tags, sweep bookkeeping); ``recbench.runs.identity.config_hash``.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import List

import yaml

from recbench.tracking.mlflow_tracker import default_tracking_uri

CONFIG_ARTIFACT = "config.yaml"


@dataclass
class RehashSummary:
    runs: int = 0
    unchanged: int = 0
    rewritten: List[str] = field(default_factory=list)
    without_config: List[str] = field(default_factory=list)

    def __str__(self) -> str:
        return (f"{self.runs} runs: {len(self.rewritten)} re-tagged, {self.unchanged} already current, "
                f"{len(self.without_config)} without a {CONFIG_ARTIFACT} artifact (left alone)")


def rehash_runs(tracking_uri: str, dry_run: bool = False) -> RehashSummary:
    """Rewrite every recbench run's ``config_hash``/``group_hash`` tags that the current code computes
    differently from its ``config.yaml`` artifact; returns what it did."""
    from mlflow.tracking import MlflowClient

    from recbench.runs.identity import config_hash, group_hash
    from recbench.tracking.mlflow_tracker import with_retries

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per run otherwise
    client = MlflowClient(tracking_uri)
    summary = RehashSummary()
    experiments = [e.experiment_id for e in with_retries(client.search_experiments)]
    token = None
    with tempfile.TemporaryDirectory() as scratch:
        while True:
            page = with_retries(client.search_runs, experiments, "tags.config_hash != ''", max_results=500,
                                page_token=token)
            for run in page:
                summary.runs += 1
                try:
                    local = client.download_artifacts(run.info.run_id, CONFIG_ARTIFACT, scratch)
                except Exception:  # noqa: BLE001 - any missing/unreadable artifact: leave the run alone
                    summary.without_config.append(run.info.run_id)
                    continue
                resolved = yaml.safe_load(Path(local).read_text())
                tags = run.data.tags
                # the revision the run was made with (runs from before the tag existed: revision 1),
                # never the current code's: an older revision's run must not look like a new one's
                revision = int(tags.get("method_revision") or 1)
                new = {"config_hash": config_hash(resolved, revision=revision),
                       "group_hash": group_hash(resolved, revision=revision)}
                changed = {k: v for k, v in new.items() if tags.get(k) != v}
                if not changed:
                    summary.unchanged += 1
                    continue
                summary.rewritten.append(run.info.run_id)
                if not dry_run:
                    for key, value in changed.items():
                        if tags.get(key) is not None:
                            with_retries(client.set_tag, run.info.run_id, f"{key}_before", tags[key])
                        with_retries(client.set_tag, run.info.run_id, key, value)
            token = page.token
            if not token:
                return summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m recbench.runs.rehash", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tracking-uri", default=default_tracking_uri())
    parser.add_argument("--dry-run", action="store_true", help="count what would change, change nothing")
    args = parser.parse_args(argv)
    from recbench.tracking.mlflow_tracker import resolve_tracking_uri
    summary = rehash_runs(resolve_tracking_uri(args.tracking_uri, Path.cwd()), dry_run=args.dry_run)
    print(("would re-tag: " if args.dry_run else "") + str(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
