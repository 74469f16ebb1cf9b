"""`hwcompress train`: train (or load from the cache) the dense baseline of a task."""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

from search.errors import UserError


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "train", help="train or load the cached dense baseline of a model on a data set",
        description="Train the dense baseline (AdamW, cosine decay) or load it from the cache "
                    "under --cache-dir, then print its validation and test quality.")
    p.add_argument("--model", default="lenet300", help="model name (default lenet300)")
    p.add_argument("--dataset", default="digits", help="data set name (default digits)")
    p.add_argument("--data-dir", default=None,
                   help="directory of the Fashion-MNIST IDX files "
                        "(default /usr/share/datasets/fashion-mnist)")
    p.add_argument("--seed", type=int, default=0, help="data split, init and batch-order seed")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default: per task)")
    p.add_argument("--hparam", action="append", default=[], metavar="KEY=VALUE",
                   help="model option, e.g. depth=20 (repeatable; values parsed as JSON)")
    p.add_argument("--cache-dir", default="results/cache", help="checkpoint cache (default results/cache)")
    p.add_argument("--force", action="store_true", help="train again even when cached")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=train_command)


def parse_hparams(items: list[str]) -> dict[str, Any]:
    """['depth=20', 'width=64'] -> {'depth': 20, 'width': 64}; non-JSON values stay strings."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--hparam {item!r} is not KEY=VALUE: write e.g. --hparam depth=20")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def train(model: str, dataset: str, *, data_dir: str | None = None, seed: int = 0,
          steps: int | None = None, hparams: dict[str, Any] | None = None,
          cache_dir: str = "results/cache", force: bool = False,
          log_every: int = 0) -> dict[str, Any]:
    """Train or load a baseline; returns train_baseline's info plus the task description."""
    import models
    from models.train import train_baseline

    task = models.get_task(model, dataset, data_dir=data_dir, seed=seed, **(hparams or {}))
    if steps is not None:
        if steps < 1:
            raise UserError(f"--steps {steps} must be at least 1")
        task = dataclasses.replace(task, train=dataclasses.replace(task.train, steps=steps))
    _, info = train_baseline(task, cache_dir=cache_dir, force=force, log_every=log_every)
    return {"model": model, "dataset": dataset, "hparams": task.hparams,
            "train": dataclasses.asdict(task.train), **info,
            **({"bicubic_psnr_db": task.data.info["bicubic_psnr_db"]}
               if "bicubic_psnr_db" in task.data.info else {})}


def train_command(args: argparse.Namespace) -> int:
    """Parse nothing more; call train() and print what it returns."""
    out = train(args.model, args.dataset, data_dir=args.data_dir, seed=args.seed,
                steps=args.steps, hparams=parse_hparams(args.hparam), cache_dir=args.cache_dir,
                force=args.force, log_every=0 if args.json else 500)
    if args.json:
        print(json.dumps(out, default=str))
        return 0
    unit = "%" if out["metric_name"] == "accuracy" else " dB"
    scale = 100.0 if unit == "%" else 1.0
    how = "loaded from cache" if out["loaded"] else f"trained {out['steps_run']} steps"
    print(f"{out['model']} on {out['dataset']}: {how} ({out['train_seconds']:.1f} s of training)")
    print(f"  val {out['metric_name']}  {out['val_metric'] * scale:.2f}{unit}")
    print(f"  test {out['metric_name']} {out['test_metric'] * scale:.2f}{unit}")
    if "bicubic_psnr_db" in out:
        b = out["bicubic_psnr_db"]
        print(f"  bicubic psnr_db: val {b['val']:.2f} dB, test {b['test']:.2f} dB")
    print(f"  cache: {out['cache_path']}")
    from models.train import PARAMS_FILE  # loaded by train() already

    print(f"  weights: {Path(out['cache_path'], PARAMS_FILE)} (for search --weights)")
    return 0
