"""``recbench-data``: list, fetch, prepare, inspect and verify dataset protocols outside of training.

    recbench-data list
    recbench-data fetch movielens100k
    recbench-data prepare synthetic dataset.rows=1000000 [--force]
    recbench-data info movielens100k
    recbench-data verify synthetic

Dataset names are the files of ``recbench/conf/dataset/`` (the registry); overrides are Hydra overrides.

References: docs/architecture.md sections 2 and 7.
"""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from pathlib import Path
from typing import List

from recbench.cli import OneLineParser, refuse
from recbench.runs.config import CONFIG_DIR


def dataset_names() -> List[str]:
    return sorted(p.stem for p in (Path(CONFIG_DIR) / "dataset").glob("*.yaml"))


def compose_dataset(name: str, overrides: List[str]):
    """The composed config of dataset ``name`` with ``overrides``; ConfigError (one line) for an
    unknown dataset, an unknown key or a value its type refuses."""
    from recbench.runs.config import ConfigError, compose_checked, override_problem

    names = dataset_names()
    if name not in names:
        raise ConfigError(f"unknown dataset {name!r}; allowed: {', '.join(names)} (recbench/conf/dataset/*.yaml)")
    problem = override_problem(overrides)
    if problem:
        raise ConfigError(problem)
    return compose_checked([f"dataset={name}", *overrides])


#: subcommand -> (one-line help, description)
COMMANDS = {
    "list": ("list the dataset protocols (the files of recbench/conf/dataset/)",
             "Print the name of every dataset protocol, one a line."),
    "fetch": ("download the raw files of a dataset that can be fetched (MovieLens-100K)",
              "Download and checksum the raw files into <data_root>/<dataset>/raw. Datasets that cannot be "
              "downloaded automatically (Criteo, Avazu) say where to get them (datasets/<dataset>/README.md)."),
    "prepare": ("build (or reuse) the protocol's cached arrays and print their facts",
                "Parse, split and encode the raw data into the protocol's cache (<data_root>/<dataset>/processed/"
                "<protocol id>), reusing a valid cache, then print the protocol id, split sizes and table sizes "
                "as JSON. A job does this itself on first use."),
    "info": ("print a prepared protocol's facts (preparing it first when needed)",
             "Print the protocol id, cache folder, split sizes and table sizes as JSON; the cache is built "
             "first when it does not exist yet."),
    "verify": ("re-hash every file of a prepared cache against its manifest",
               "Re-hash every cached file against the checksums of its manifest (a run re-hashes only files "
               "whose size or mtime changed). Exit 0 when all match, 2 when the cache is missing or corrupt."),
}
EXIT_CODES = ("exit status: 0 done; 2 a bad argument, dataset name, override or value, missing or malformed "
              "input data, or a corrupt cache (one line on stderr); 1 an unexpected failure (traceback)")


def parser() -> OneLineParser:
    """The ``recbench-data`` argument parser (its subcommands and their arguments)."""
    top = OneLineParser(prog="recbench-data", description=__doc__.split("\n\n")[0].replace("``", ""),
                        epilog=EXIT_CODES)
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND", title="commands")
    for command, (short, description) in COMMANDS.items():
        p = sub.add_parser(command, help=short, description=description, epilog=EXIT_CODES)
        if command == "list":
            continue
        p.add_argument("dataset", help=f"a dataset protocol: {', '.join(dataset_names())}")
        p.add_argument("overrides", nargs="*", metavar="override",
                       help="Hydra overrides of the dataset config, e.g. dataset.rows=100000 "
                            "dataset.source=/path/to/train.txt paths.data_root=/data")
        if command == "prepare":
            p.add_argument("--force", action="store_true", help="rebuild even if a valid cache exists")
    return top


def main(argv: List[str] | None = None) -> int:
    # recbench's own progress at INFO; third-party loggers (FBGEMM announces every library it loads
    # at INFO on the root logger) only from WARNING up, as in the Hydra jobs (recbench/conf/config.yaml)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("recbench").setLevel(logging.INFO)
    args = parser().parse_args(argv)
    if args.command == "list":
        print("\n".join(dataset_names()))
        return 0
    from recbench.datasets.errors import DatasetError
    from recbench.datasets.storage import CacheCorruptError
    from recbench.runs.config import ConfigError

    try:
        return _run(args)
    except (ConfigError, DatasetError, CacheCorruptError) as exc:  # bad input: its one line, once
        return refuse("recbench-data", str(exc))


def _run(args: argparse.Namespace) -> int:
    from recbench.runs.settings import instantiate_dataset

    cfg = compose_dataset(args.dataset, args.overrides)
    data_root = Path(cfg.paths.data_root)
    if args.command == "fetch":
        module = importlib.import_module(cfg.dataset._target_.rsplit(".", 1)[0])
        fetch = getattr(module, "fetch", None)
        if fetch is None:
            print(f"{args.dataset}: nothing to fetch automatically; see datasets/{args.dataset}/README.md "
                  "for how to obtain the raw files")
            return 0
        print(f"{args.dataset}: raw files in {fetch(data_root)}")
        return 0
    protocol = instantiate_dataset(cfg)
    if args.command == "verify":  # re-hash every cached file against its manifest
        from recbench.datasets.storage import CacheCorruptError, verify

        directory = protocol.cache_dir(data_root)
        if not directory.exists():
            print(f"recbench-data: error: {args.dataset} ({protocol.protocol_id()}) is not prepared under "
                  f"{data_root}: nothing to verify; run `recbench-data prepare {args.dataset}` first", file=sys.stderr)
            return 2
        try:
            manifest = verify(directory, full=True)
        except CacheCorruptError as exc:
            raise CacheCorruptError(f"{exc} (the next run rebuilds it)") from None
        print(f"{directory}: {len(manifest.get('files', {}))} files match their checksums")
        return 0
    prepared = protocol.prepare(data_root, force=args.command == "prepare" and args.force)
    spec = prepared.spec
    print(json.dumps({
        "protocol_id": spec.protocol_id, "directory": str(prepared.directory), "num_dense": spec.num_dense,
        "split_sizes": dict(spec.split_sizes),
        "tables": {t.name: t.num_embeddings for t in spec.tables},
        "extras": dict(spec.extras),
    }, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
