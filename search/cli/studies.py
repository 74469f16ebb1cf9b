"""`hwcompress studies`: list the studies in a storage with their trial counts (the work is
search.report.studies.list_studies)."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("studies", help="list the studies in a storage",
                              description="List every study in the storage: model, data set, profile, "
                              "objectives and how many trials are complete, infeasible (over the budget, never "
                              "trained), stopped (fell behind at a rung of --pruner), failed, running or waiting "
                              "(queued, not started).")
    p.add_argument("--storage", default=None, help="Optuna storage URL (default sqlite under --results-dir)")
    p.add_argument("--results-dir", default="results", help="where the default studies.db lives (default results)")
    p.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    p.set_defaults(func=studies_command)


def studies_command(args: argparse.Namespace) -> int:
    """Print the studies as a table or JSON; returns the exit code."""
    from search.report.studies import list_studies
    from search.study.storage import open_storage

    rows = list_studies(open_storage(args.storage, args.results_dir, create=False))
    if args.json:
        print(json.dumps(rows))
        return 0
    if not rows:
        print("no studies in this storage yet; start one with `hwcompress search --study NAME ...`")
        return 0
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    table = Table(title="studies")
    cols = ("name", "model", "dataset", "profile", "objectives", "trials", "complete", "infeasible", "stopped",
            "failed", "running", "waiting")
    for c in cols:
        table.add_column(c, justify="right" if c in cols[5:] else "left")
    for r in rows:
        # Text, not str: a stored name such as "[/x]" is shown as it is, not read as rich markup
        table.add_row(*[Text(",".join(r[c]) if c == "objectives" else str(r[c] if r[c] is not None else "-"))
                        for c in cols])
    Console(file=sys.stdout, width=None if sys.stdout.isatty() else 200).print(table)
    return 0
