"""`hwcompress worker`: join an existing study and run its trials until its budget is reached.

Everything else (model, data set, profile, budgets, fine-tuning, objectives, trial budget)
comes from the study itself, so any machine that reaches the storage can help.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any

from search.study import storage


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "worker",
        help="join an existing study (e.g. on PostgreSQL) and run its trials",
        description="Join a study that `hwcompress search` started and run trials until the study "
        "holds its --trials. Start as many as you like, on any machines that reach the storage; "
        "a worker that dies has its trial retried by another once its heartbeat goes stale.",
    )
    p.add_argument("--study", required=True, help="name of the study to join")
    p.add_argument("--storage", default=None,
                   help="storage URL, e.g. postgresql://user:pass@host:5432/db (default sqlite under --results-dir)")
    p.add_argument("--results-dir", default="results", help="where the baseline cache lives (default results)")
    p.add_argument("--batch", type=int, default=None, help="trials claimed and fine-tuned together (default: the engine's K)")
    p.add_argument("--k", type=int, default=None,
                   help="plans fine-tuned together in one vmapped step (default: the fastest measured on this machine)")
    p.add_argument("--loop", default=None, metavar="{python,fused}",
                   help="fine-tune steps driven from Python or fused on the device (default: the faster measured here)")
    p.add_argument("--max-trials", type=int, default=None, help="stop after this many trials from this worker")
    p.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                   help="claim no more trials this many seconds after the worker starts (its trials in flight finish)")
    p.add_argument("--heartbeat", type=int, default=storage.HEARTBEAT_INTERVAL,
                   help=f"seconds between heartbeats of a running trial (default {storage.HEARTBEAT_INTERVAL})")
    p.add_argument("--grace", type=int, default=storage.GRACE_PERIOD,
                   help=f"seconds without a heartbeat before a trial counts as dead and is retried (default {storage.GRACE_PERIOD})")
    p.set_defaults(func=worker_command)


def worker_command(args: argparse.Namespace) -> int:
    """Run trials of the study the flags name."""
    from search.study.workers import run_worker

    ran = run_worker(
        args.study, args.storage, args.results_dir,
        heartbeat_interval=args.heartbeat, grace_period=args.grace,
        batch=args.batch, k=args.k, loop=args.loop, max_trials=args.max_trials, timeout=args.timeout,
    )
    print(f"worker done: ran {ran} trials of study {args.study}", file=sys.stderr)
    return 0
