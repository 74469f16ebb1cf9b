"""`hwcompress search`: find the Pareto-optimal compressed configs under a device's budgets.

Parses flags, builds the study record (search.api.make_spec) and calls search.api.search.
"""
from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
import warnings
from typing import Any

from search.errors import UserError

DEFAULT_TRIALS = 40
DEFAULT_FINETUNE_STEPS = 150


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "search",
        help="search per-layer pruning and bit widths under a device's budgets",
        description="Search per-layer pruning ratios and bit widths with Optuna; every candidate is "
        "priced on the hardware profile (over-budget ones are never trained), fine-tuned, and stored. "
        "Running the same command again resumes the study.",
    )
    p.add_argument("--model", default="lenet300",
                   help="zoo model (default lenet300), or your own: path/to/file.py:build or package.module:build, "
                        "where build() returns a models.Task, or (task, trained variables)")
    p.add_argument("--dataset", default=None, help="data set of a zoo model (default digits)")
    p.add_argument("--data-dir", default=None, help="where the data set lives, when not the default")
    p.add_argument("--profile", default="mobile-cpu", help="shipped profile name or TOML path (default mobile-cpu)")
    p.add_argument("--latency-ms", type=float, default=None, help="latency budget (profile default otherwise)")
    p.add_argument("--memory-kb", type=float, default=None, help="peak memory budget (profile default otherwise)")
    p.add_argument("--size-kb", type=float, default=None, help="model size budget (profile default otherwise)")
    p.add_argument("--trials", type=int, default=DEFAULT_TRIALS, help=f"total trials in the study (default {DEFAULT_TRIALS})")
    p.add_argument("--batch", type=int, default=None, help="trials asked and fine-tuned together (default: the larger of 4 and the engine's K)")
    p.add_argument("--k", type=int, default=None,
                   help="plans fine-tuned together in one vmapped step (default: the fastest measured on this "
                        "machine, remembered in <results-dir>/cache/engine_k.json)")
    p.add_argument("--loop", default=None, metavar="{python,fused}",
                   help="fine-tune steps driven from Python, or fused into one device call per chunk (default: "
                        "the faster measured on this machine, remembered with K)")
    p.add_argument("--objectives", default="quality,latency,memory", help="comma list of quality,latency,memory,size (default quality,latency,memory)")
    p.add_argument("--sampler", default="tpe", choices=("tpe", "nsga2", "random"), help="Optuna sampler (default tpe)")
    p.add_argument("--study", default=None, help="study name (default <model>-<dataset>-<profile>)")
    p.add_argument("--storage", default=None, help="Optuna storage URL (default sqlite under --results-dir)")
    p.add_argument("--seed", type=int, default=0, help="data split, sampler and fine-tuning seed (default 0)")
    p.add_argument("--finetune-steps", type=int, default=DEFAULT_FINETUNE_STEPS, help=f"fine-tuning steps per trial (default {DEFAULT_FINETUNE_STEPS})")
    p.add_argument("--finetune-batch-size", type=int, default=None,
                   help="training examples per fine-tuning step (default 128; an image-restoration model's "
                        "training batch, 16 for vdsr and demosaicnet)")
    p.add_argument("--pruner", default=None,
                   help="none | sha | hyperband: measure each trial's validation quality at --rungs and stop those "
                        "that fall behind (successive halving, Hyperband); stopped trials are stored as pruned and "
                        "count toward --trials (default: a resumed study's own; none for a new study)")
    p.add_argument("--rungs", default=None,
                   help="comma list of fine-tune steps where --pruner compares trials, each below --finetune-steps "
                        "(default: 1/9 and 1/3 of --finetune-steps)")
    p.add_argument("--pruning", default="one-shot",  # FinetuneConfig.pruning
                   help="one-shot | gradual: masks fixed from the pretrained weights before fine-tuning, or ramped "
                        "from dense to each plan's ratio while fine-tuning (Zhu & Gupta's cubic schedule, masks "
                        "recomputed from the current weights; the ratio is reached halfway) (default one-shot)")
    p.add_argument("--act-ranges", default="calibrated",  # FinetuneConfig.act_ranges
                   help="calibrated | learned: activation quantization ranges calibrated on training examples, or "
                        "calibrated and then trained with the weights (LSQ) (default calibrated)")
    p.add_argument("--distill", action="store_true", help="fine-tune with distillation from the dense baseline")
    p.add_argument("--factorize", action="store_true",
                   help="also search a rank ratio per layer (1, 0.75, 0.5, 0.25) and its form where the layer takes "
                        "more than one: svd (a Dense as two matmuls, a conv as r kxk filters then a 1x1 conv), "
                        "spatial (a kxk conv as kx1 then 1xk convs), kronecker (a Dense as a sum of r Kronecker "
                        "products, at 1/8 of the ratio) (off by default)")
    p.add_argument("--no-warm-start", action="store_true", help="skip layer sensitivity and warm-start trials")
    p.add_argument("--quiet", action="store_true",
                   help="no progress, no table and no report files (the summary line says how to write them "
                        "with `hwcompress report`), only the final summary line")
    p.add_argument("--json", action="store_true", help="print one JSON object at the end (study, front)")
    p.add_argument("--weights", default=None,
                   help="your own trained weights for --model (safetensors, as `hwcompress train` saves them) "
                   "instead of the cached baseline")
    p.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                   help="start no more trials this many seconds after the command starts, set-up included (the trials "
                        "in flight finish; run the command again to go on toward --trials)")
    p.add_argument("--workers", type=int, default=None,
                   help="run the trials in N local worker processes on the same storage (see `hwcompress worker`)")
    p.add_argument("--results-dir", default="results", help="where studies.db, caches and reports go")
    p.set_defaults(func=search_command)


def search_command(args: argparse.Namespace) -> int:
    """Run the search the flags describe, then print the front (table, JSON or one line)."""
    # imported here, not at the top: `hwcompress --help` stays fast (no JAX)
    import models
    from search.api import make_spec, search
    from search.engine.config import FinetuneConfig
    from search.report.files import report_dir, write_view
    from search.report.view import pareto_frame, read_study
    from search.study.create import finished_count
    from search.study.loop import NothingToDo, check_timeout, past
    from search.study.progress import over_budget_hint
    from search.study.spec import StudySpec, check_study_name
    from search.study.database import default_url
    from search.study.storage import load_study, open_storage

    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the progress line says what matters
    if args.study is not None:  # before the storage is opened: a refused name creates nothing
        check_study_name(args.study)
    if args.finetune_steps is not None and args.finetune_steps < 0:
        raise UserError(f"--finetune-steps {args.finetune_steps} must be >= 0")
    if args.workers is not None and args.workers < 1:
        raise UserError(f"--workers {args.workers} must be at least 1")
    if args.workers is not None and args.storage == "memory":
        raise UserError("--workers needs a storage the worker processes can share: drop --storage memory")
    deadline = check_timeout(args.timeout)
    # only the flags given replace the profile's default budgets
    budget = {k: v for k, v in (("latency_ms", args.latency_ms), ("memory_kb", args.memory_kb),
                                ("size_kb", args.size_kb)) if v is not None}
    spec = make_spec(
        model=args.model, dataset=args.dataset, data_dir=args.data_dir, seed=args.seed, profile=args.profile,
        budget=budget, weights=args.weights, objectives=[o for o in args.objectives.split(",") if o.strip()],
        sampler=args.sampler, n_trials=args.trials,
        finetune=FinetuneConfig(steps=args.finetune_steps, batch_size=models.finetune_batch_size(args.model, args.dataset)
                                if args.finetune_batch_size is None else args.finetune_batch_size,
                                distill=bool(args.distill), seed=args.seed, pruning=args.pruning,
                                act_ranges=args.act_ranges),
        pruner=args.pruner, rungs=_rungs(args.rungs), factorize=args.factorize,
    )
    storage = open_storage(args.storage, args.results_dir)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", NothingToDo)
        study = search(spec, storage, args.results_dir, study_name=args.study, k=args.k, loop=args.loop, batch=args.batch,
                       run=args.workers is None, warm_start=not args.no_warm_start,
                       progress=not (args.quiet or args.json), timeout=args.timeout)
    idle = _notes(caught, NothingToDo)
    if args.workers is not None and not idle and not past(deadline):  # workers would run to the stored budget instead
        _run_workers(args, study, None if deadline is None else max(deadline - time.monotonic(), 1e-3))
        study = load_study(study.study_name, storage)
    front = pareto_frame(study)
    view = out_dir = None
    trials = study.get_trials(deepcopy=False)
    done = finished_count(trials)
    timed_out = past(deadline) and done == 0
    # --quiet leaves the report (seconds of plotting) to `hwcompress report`, which a study in memory cannot reach;
    # a search the timeout ended before any trial has nothing to report yet
    if (not args.quiet or args.json or args.storage == "memory") and not timed_out:
        # the report's export commands name this storage and results directory when not the defaults
        view = read_study(study, storage=args.storage, results_dir=args.results_dir)
        out_dir = str(write_view(view, report_dir(args.results_dir, study.study_name)).out_dir)
    notes = [f"{note} (pass --trials above {done} to run more)" for note in idle]
    stored = StudySpec.of_study(study)
    if not idle and past(deadline) and done < stored.n_trials:
        notes.append(f"--timeout {args.timeout:g} s passed after {done} of {stored.n_trials} trials: run the same "
                     "command again to go on")
    notes += [over_budget_hint(trials, stored.budget, stored.profile_name)] if front.empty and not timed_out else []
    if args.json:
        url = args.storage or default_url(args.results_dir)
        print(json.dumps(json_summary(study, url, done, front, out_dir)))
    elif timed_out:
        print(f"study {study.study_name}: no trial finished before --timeout {args.timeout:g} s")
    elif args.quiet and out_dir is not None:
        print(f"study {study.study_name}: {done} trials, {len(front)} on the Pareto front, report {out_dir}")
    elif args.quiet:
        print(f"study {study.study_name}: {done} trials, {len(front)} on the Pareto front; "
              f"report not written (--quiet): {report_command(args, study.study_name)}")
    else:
        _print_front(view)
        print(f"report: {out_dir}")
    for note in filter(None, notes):  # stderr: --json keeps stdout one JSON object
        print(f"note: {note}", file=sys.stderr)
    return 0


def report_command(args: argparse.Namespace, study_name: str) -> str:
    """The `hwcompress report` command that writes this search's report."""
    cmd = ["hwcompress", "report", "--study", study_name]
    if args.storage is not None:
        cmd += ["--storage", args.storage]
    if args.results_dir != "results":
        cmd += ["--results-dir", args.results_dir]
    return shlex.join(cmd)


def _rungs(text: str | None) -> list[int] | None:
    """--rungs "16,50" as [16, 50]; UserError when an item is not a whole number."""
    if text is None:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--rungs {text!r}: give fine-tune steps as whole numbers, e.g. --rungs 16,50") from None


def _notes(caught: list, category: type[Warning]) -> list[str]:
    """The messages of the caught warnings of `category`; every other warning is shown as usual."""
    notes = []
    for w in caught:
        if issubclass(w.category, category):
            notes.append(str(w.message))
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    return notes


def _run_workers(args: argparse.Namespace, study: Any, timeout: float | None) -> None:
    """Run the set-up study's trials in args.workers local `hwcompress worker` processes, each
    claiming none after `timeout` seconds (None: until the study's budget is reached)."""
    from search.study.workers import run_workers

    if not (args.quiet or args.json):
        print(f"study {study.study_name}: {args.workers} workers on "
              f"{args.storage or f'sqlite:///{args.results_dir}/studies.db'}", file=sys.stderr, flush=True)
    rc = run_workers(args.workers, study.study_name, args.storage, args.results_dir, k=args.k, loop=args.loop,
                     timeout=timeout)
    if rc != 0:
        raise UserError(f"a worker of study {study.study_name} exited with code {rc}; completed trials are "
                        f"kept: run the same command again to finish the study")


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def json_summary(study: Any, storage_url: str, done: int, front: Any, report_dir: str | None) -> dict[str, Any]:
    """The --json object: study, storage, trials done, baseline, the front as rows, report folder."""
    rows = [{k: _clean(v) for k, v in r.items() if k != "plan"} for r in front.to_dict("records")]
    for r in rows:
        r["trial"] = int(r["trial"])
        r["feasible"] = bool(r["feasible"])
    return {
        "study": study.study_name,
        "storage": storage_url,
        "trials_done": done,
        "baseline": study.user_attrs.get("baseline"),
        "pareto": rows,
        "report": report_dir,
    }


def _print_front(view: Any) -> None:
    """The front as the report's terminal table (search.report.text.front_table)."""
    from rich.console import Console

    from search.report.text import front_table

    console = Console(file=sys.stdout)
    if not console.is_terminal:  # piped: do not squeeze the plan column into 80 columns
        console = Console(file=sys.stdout, width=160)
    console.print(front_table(view))
