"""`hwcompress report`: the Pareto front of a stored study, in the terminal and as files.

Parses flags and calls `report_command`; the work is in search.report (view, text, files).
"""
from __future__ import annotations

import argparse
import sys
from typing import Any


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "report",
        help="Pareto report of a study (table, HTML, Markdown, CSV, PNG); --profile re-prices it",
        description="Read a study from storage and write its Pareto report under RESULTS_DIR/STUDY/ "
        "(report.html works offline). --profile P re-prices every stored trial for device P and "
        "recomputes feasibility and the front against P's budget, with no retraining; that report "
        "goes to RESULTS_DIR/STUDY/on-P/.",
    )
    p.add_argument("--study", required=True, help="study name (see `hwcompress studies`)")
    p.add_argument("--profile", default=None, help="re-price for this profile (shipped name or TOML path)")
    p.add_argument("--storage", default=None, help="Optuna storage URL (default sqlite under --results-dir)")
    p.add_argument("--results-dir", default="results", help="results root: studies.db and STUDY/ reports (default results)")
    p.set_defaults(func=report_command)


def report_command(args: argparse.Namespace) -> int:
    """Print the front as a table and write the report files; returns the exit code."""
    from rich.console import Console

    from search.report.files import report_dir, write_view
    from search.report.text import front_table
    from search.report.view import read_study
    from search.study.storage import load_study, open_storage

    report_dir(args.results_dir, args.study)  # a name that is not one folder fails before storage is opened
    study = load_study(args.study, open_storage(args.storage, args.results_dir, create=False))
    view = read_study(study, args.profile, storage=args.storage, results_dir=args.results_dir)
    paths = write_view(view, report_dir(args.results_dir, args.study, view.profile if view.repriced else None))
    console = Console(file=sys.stdout, width=None if sys.stdout.isatty() else 200)  # no folding in pipes
    console.print(front_table(view))
    console.print(f"report: {paths.html}  (also {paths.markdown.name}, {paths.csv.name}, "
                  + ", ".join(p.name for p in paths.pngs) + ")")
    return 0
