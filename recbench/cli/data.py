"""``recbench-data``: fetch and prepare dataset protocols outside of training.

    recbench-data list
    recbench-data fetch movielens100k
    recbench-data prepare synthetic dataset.rows=1000000 [--force]
    recbench-data info movielens100k

Dataset names are the files of ``recbench/conf/dataset/`` (the registry); overrides are Hydra overrides.

References: docs/architecture.md sections 2 and 7.
"""
from __future__ import annotations

import importlib
import json
import logging
import sys
from pathlib import Path
from typing import List

from recbench.cli import OneLineParser
from recbench.runs.config import CONFIG_DIR


def dataset_names() -> List[str]:
    return sorted(p.stem for p in (Path(CONFIG_DIR) / "dataset").glob("*.yaml"))


def compose_dataset(name: str, overrides: List[str]):
    from recbench.runs.config import compose

    names = dataset_names()
    if name not in names:
        raise SystemExit(f"recbench-data: unknown dataset {name!r}; allowed: {', '.join(names)} (recbench/conf/dataset/*.yaml)")
    return compose([f"dataset={name}", *overrides])


def main(argv: List[str] | None = None) -> int:
    # recbench's own progress at INFO; third-party loggers (FBGEMM announces every library it loads
    # at INFO on the root logger) only from WARNING up, as in the Hydra jobs (recbench/conf/config.yaml)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("recbench").setLevel(logging.INFO)
    parser = OneLineParser(prog="recbench-data", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list dataset protocols")
    for command in ("fetch", "prepare", "info", "verify"):
        p = sub.add_parser(command)
        p.add_argument("dataset")
        p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. dataset.rows=100000")
        if command == "prepare":
            p.add_argument("--force", action="store_true", help="rebuild even if a valid cache exists")
    args = parser.parse_args(argv)
    if args.command == "list":
        print("\n".join(dataset_names()))
        return 0

    from recbench.runs.settings import instantiate_without
    from recbench.datasets.errors import DatasetError

    cfg = compose_dataset(args.dataset, args.overrides)
    data_root = Path(cfg.paths.data_root)
    try:
        if args.command == "fetch":
            module = importlib.import_module(cfg.dataset._target_.rsplit(".", 1)[0])
            fetch = getattr(module, "fetch", None)
            if fetch is None:
                print(f"{args.dataset}: nothing to fetch automatically; see datasets/{args.dataset}/README.md "
                      "for how to obtain the raw files")
                return 0
            print(f"{args.dataset}: raw files in {fetch(data_root)}")
            return 0
        protocol = instantiate_without(cfg.dataset)
        if args.command == "verify":  # re-hash every cached file against its manifest
            from recbench.datasets.storage import CacheCorruptError, verify

            directory = protocol.cache_dir(data_root)
            if not directory.exists():
                print(f"recbench-data: {args.dataset} ({protocol.protocol_id()}) is not prepared under {data_root}: "
                      f"nothing to verify; run `recbench-data prepare {args.dataset}` first", file=sys.stderr)
                return 2
            try:
                manifest = verify(directory, full=True)
            except CacheCorruptError as exc:
                print(f"recbench-data: {exc} (the next run rebuilds it)", file=sys.stderr)
                return 2
            print(f"{directory}: {len(manifest.get('files', {}))} files match their checksums")
            return 0
        if args.command == "prepare":
            prepared = protocol.prepare(data_root, force=args.force)
        else:
            prepared = protocol.prepare(data_root)
        spec = prepared.spec
        print(json.dumps({
            "protocol_id": spec.protocol_id, "directory": str(prepared.directory), "num_dense": spec.num_dense,
            "split_sizes": dict(spec.split_sizes),
            "tables": {t.name: t.num_embeddings for t in spec.tables},
            "extras": dict(spec.extras),
        }, indent=2, default=str))
        return 0
    except DatasetError as exc:
        print(f"recbench-data: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
