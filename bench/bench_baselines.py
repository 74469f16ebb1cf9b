"""Baseline quality: train (or load) each model/data pair of issue 2's quality list and
check it against its target; prints a table and saves bench/out/baselines.json.

    PYTHONPATH=. .venv/bin/python -m bench.bench_baselines [--force] [--pairs lenet300/digits ...]

Targets: lenet300 on digits >= 97% test accuracy; lenet300 on Fashion-MNIST >= 88%; lenet5 on
Fashion-MNIST >= 90%; vdsr beats bicubic upscaling by >= 0.5 dB PSNR on the held-out test images;
demosaicnet beats bilinear demosaicking by >= 2 dB PSNR on the held-out test images (issue 18);
resnet20 on Fashion-MNIST >= 93%, mobilenetv2 on Fashion-MNIST >= 92% (these two train for hours
on a 2-core CPU: run them alone with --pairs, --log-every 100 shows the loss as they go).
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import jax

import models
from models.train import train_baseline

# (model, dataset, target): accuracy fraction, or dB over the data set's reference (REFERENCES)
PAIRS = (("lenet300", "digits", 0.97), ("lenet300", "fashion-mnist", 0.88),
         ("lenet5", "fashion-mnist", 0.90), ("vdsr", "sr-images", 0.5),
         ("demosaicnet", "demosaic-images", 2.0),
         ("resnet20", "fashion-mnist", 0.93), ("mobilenetv2", "fashion-mnist", 0.92))
OUT = Path(__file__).parent / "out" / "baselines.json"
# PSNR data sets: the classical method the model must beat, read from Dataset.info["<name>_psnr_db"]
REFERENCES = {"sr-images": "bicubic", "demosaic-images": "bilinear"}


def run_pair(model: str, dataset: str, target: float, cache_dir: str, force: bool,
             log_every: int = 0) -> dict:
    """Train or load one baseline; the row of the table."""
    t0 = time.perf_counter()
    task = models.get_task(model, dataset)
    _, info = train_baseline(task, cache_dir=cache_dir, force=force, log_every=log_every)
    row = {"model": model, "dataset": dataset, "metric": task.metric_name,
           "val": info["val_metric"], "test": info["test_metric"], "target": target,
           "loaded": info["loaded"], "train_seconds": round(info["train_seconds"], 1),
           "wall_seconds": round(time.perf_counter() - t0, 1),
           "steps": task.train.steps, "batch_size": task.train.batch_size,
           "augment": {"crop": task.train.crop, "flip": task.train.flip},
           "hparams": task.hparams, "cache_key": info["cache_key"]}
    if task.metric_name == "psnr_db":
        ref = REFERENCES[dataset]
        psnr = task.data.info[f"{ref}_psnr_db"]
        row.update({"reference": ref, f"{ref}_val": psnr["val"], f"{ref}_test": psnr["test"]},
                   gain_db=info["test_metric"] - psnr["test"],
                   test_images=task.data.info["test_images"])
        row["passed"] = row["gain_db"] >= target
    else:
        row["passed"] = info["test_metric"] >= target
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--force", action="store_true", help="retrain even when cached")
    ap.add_argument("--cache-dir", default="results/cache")
    ap.add_argument("--pairs", nargs="*", default=None, help="model/dataset pairs to run")
    ap.add_argument("--log-every", type=int, default=0, help="print the loss every N steps")
    ap.add_argument("--out", type=Path, default=OUT, help=f"where the JSON goes (default {OUT})")
    args = ap.parse_args(argv)
    rows = []
    for model, dataset, target in PAIRS:
        if args.pairs and f"{model}/{dataset}" not in args.pairs:
            continue
        row = run_pair(model, dataset, target, args.cache_dir, args.force, args.log_every)
        rows.append(row)
        if row["metric"] == "accuracy":
            fig = f"test {100 * row['test']:.2f}% (val {100 * row['val']:.2f}%), target >= {100 * target:.0f}%"
        else:
            ref = row["reference"]
            fig = (f"test {row['test']:.2f} dB vs {ref} {row[ref + '_test']:.2f} dB: "
                   f"+{row['gain_db']:.2f} dB, target >= +{target} dB")
        how = "loaded" if row["loaded"] else f"trained {row['steps']} steps"
        print(f"{model:9s} {dataset:13s} {fig}; {how}, {row['train_seconds']} s training, "
              f"{row['wall_seconds']} s wall; {'PASS' if row['passed'] else 'FAIL'}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows, "machine": platform.processor() or platform.machine(),
                               "backend": jax.default_backend(), "jax": jax.__version__},
                              indent=2))
    print(f"saved {args.out}")
    return 0 if all(r["passed"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
