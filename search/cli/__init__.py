"""The `hwcompress` command: a thin dispatcher. Each sub-command lives in its own module of
this package (search/cli/search.py, ...) with `register(subparsers)`, which adds an argparse parser whose
`func(args) -> int` parses nothing more and calls one importable function."""
from __future__ import annotations

import argparse
import importlib
import sys

from search.errors import UserError

# sub-command modules, in the order `hwcompress --help` lists them
COMMAND_MODULES = (
    "search.cli.search",
    "search.cli.worker",
    "search.cli.studies",
    "search.cli.report",
    "search.cli.export",
    "search.cli.measure",
    "search.cli.profiles",
    "search.cli.train",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hwcompress",
        description="Hardware-aware pruning and quantization search for JAX/Flax models.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:  # that command is not built yet
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted: completed work is kept in storage", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader went away (`hwcompress export ... | head`): what was computed is kept, nothing
        # more to print; Python's own recipe, so that the flush at exit does not fail again
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except Exception as e:
        if not isinstance(e, user_errors()):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2


def run() -> None:
    """The console script and `python -m search.cli`: main(), then exit without the
    interpreter's teardown. After a search, destroying XLA's compiled programs, thread pools
    and every module's objects took 0.6-1 s of a 10 s warm search; exit handlers still run,
    output is flushed and every open storage is closed first (SQLite folds its write-ahead log
    back into the database file), so nothing stored or printed is lost. Tests call main()."""
    import atexit
    import os

    rc = main()
    storage = sys.modules.get("search.study.storage")
    if storage is not None:
        storage.close_storages()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)


def user_errors() -> tuple[type[Exception], ...]:
    """The exception types whose message a user sees as one line (exit 2): search's UserError
    and the ValueError subclasses of models/ and hw_profiles/, which import nothing from search/.
    Imported here, on the first error, not at the top: models loads JAX, and `--help` must not."""
    from hw_profiles import ProfileError
    from models.errors import ModelError

    return (UserError, ModelError, ProfileError)


if __name__ == "__main__":
    sys.exit(main())
