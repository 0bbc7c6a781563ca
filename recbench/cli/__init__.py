"""recbench's command-line entry points (thin shells over the library)."""
# Every command (and every sweep worker, which imports its task function from here) starts quiet:
# known third-party notices are dropped by message and module (recbench.quiet says which and why).
import argparse

from recbench.quiet import quiet_known_warnings as _quiet

_quiet()


from recbench.runs.config import register_resolvers as _register_resolvers

_register_resolvers()  # (also done by recbench.runs.config on import: Hydra's app path composes without it)


def refuse(prog: str, message: str) -> int:
    """Bad input (an argument, a name, a value, a store): one line on stderr, ``<prog>: error: ...``;
    returns exit status 2 (docs/cli.md)."""
    import sys

    print(f"{prog}: error: {message}", file=sys.stderr)
    return 2


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line (``<prog>: error: ...``, exit 2) with a
    pointer to ``--help``, not the whole usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def store_problem(uri: str) -> str | None:
    """Why the store ``uri`` cannot be read, in one line (a mistyped folder, a server that does not
    answer, a SQLite file that does not exist: reading must not create an empty store), else None."""
    from recbench.tracking.mlflow_tracker import StoreError, check_tracking_uri, sqlite_path

    try:
        check_tracking_uri(uri)
    except StoreError as exc:
        return str(exc)
    path = sqlite_path(uri)
    if path is not None and not path.is_file():
        return f"there is no MLflow store at {path} (from {uri}): give an existing store with --tracking-uri"
    return None
