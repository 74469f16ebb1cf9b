"""The `hwcompress` command: a thin dispatcher. Each sub-command lives in its own
`search/cmd_*.py` module with `register(subparsers)`, which adds an argparse parser whose
`func(args) -> int` parses nothing more and calls one importable function."""
from __future__ import annotations

import argparse
import importlib
import sys

from search.errors import UserError

# sub-command modules, in the order `hwcompress --help` lists them
COMMAND_MODULES = (
    "search.cmd_search",
    "search.cmd_worker",
    "search.cmd_studies",
    "search.cmd_report",
    "search.cmd_export",
    "search.cmd_measure",
    "search.cmd_profiles",
    "search.cmd_train",
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
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: completed work is kept in storage", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
