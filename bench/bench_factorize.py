"""Low-rank factorization in the search (issue 18, item 5), printed and saved to
bench/out/bench_factorize.json.

1. Pairs: for each of `--models` (lenet300 and lenet5 on Fashion-MNIST, vdsr on sr-images; a
   `model/dataset` entry picks another data set), two studies through the real CLI
   (`hwcompress search`, one process each), the same trial budget, fine-tune steps, seed,
   sampler, objectives and profile, one with `--factorize` (a rank ratio per layer in the
   space) and one without. Per model: the hypervolume of each study's trials (one normalised
   box for the pair: over all its trials, and over the trials each completed within the faster
   study's wall time, bench.bench_search.hypervolume_at_equal_time), the best compression ratio
   within 0.5 points of the baseline on the TEST split (0.5 dB for vdsr's PSNR; each trial
   records its test quality beside the validation quality the search ranks on; the validation
   pick is kept too), trials completed, wall time, and how many front plans factorize a layer.
2. DemosaicNet: `hwcompress search --model demosaicnet --dataset demosaic-images --profile
   mobile-npu --factorize` (small budget); its best plan within 0.5 dB of the baseline's test
   PSNR (the lowest latency on the profile, or the smallest with `--demosaic-pick size`; the
   most accurate trial when none is within, marked so) exported with `hwcompress export`, the
   dense fp32 model exported beside it (no fine-tune), both timed in onnxruntime (one thread,
   batch 1, interleaved rounds, bench.bench_costtruth.measure_interleaved; the estimate is the
   fastest run) and the exported ONNX model's PSNR measured on the held-out test images.

Every search and export runs as its own `hwcompress` process. Before each pair the baseline is
trained or loaded (`hwcompress train`) and a one-trial warm-up study takes the machine's one-off
set-up (K measurement, layer sensitivity, XLA compiles of the plain programs) out of both
studies' times; the factorizing study still pays for compiling its projection, a real cost of
factorization. Studies resume: the same command again searches nothing more and keeps the
recorded times. vdsr and demosaicnet fine-tune on 16 patches a step, as their baselines trained.

    python -m bench.bench_factorize        # the defaults below: about 22 min on the 2-core CPU
    python -m bench.bench_factorize --models lenet300,lenet5,vdsr --trials 20 --steps 100 \
        --demosaic-trials 12 --demosaic-steps 40
    python -m bench.bench_factorize --parts demosaic    # the DemosaicNet part alone (about 4 min)

The time estimate comes from smoke runs on the shared 2-core machine (6 trials of 30 steps): per
trial about 0.4 + 0.0014 x steps s (lenet300), 2.5 + 0.064 x steps (lenet5), 3 + 0.1 x steps
(vdsr), 1 + 0.12 x steps (demosaicnet); about 10 s of process start per study, 10-25 s more for a
factorizing study's first compile, a warm-up of 15-35 s per model, and 30-50 s per DemosaicNet
export (measured in the full run: 1332 s in all). Add
the baselines' training when results/cache lacks them (lenet300 36 s, lenet5 194 s, vdsr 159 s,
demosaicnet 287 s).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import optuna
from optuna.trial import TrialState

from bench.bench_search import _complete, _losses, best_ratio_within, hypervolume_at_equal_time

optuna.logging.set_verbosity(optuna.logging.WARNING)
ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"
DATASETS = {"lenet300": "fashion-mnist", "lenet5": "fashion-mnist", "vdsr": "sr-images", "demosaicnet": "demosaic-images"}
IMAGE_DATASETS = ("sr-images", "demosaic-images")  # fine-tuned at --image-batch-size, as their baselines trained
TOLERANCE = 0.5  # points of accuracy, dB of PSNR


def _hwcompress(*argv: str) -> tuple[float, str]:
    """Run `hwcompress ARGV` as its own process (python -m search.cli); returns (seconds, its
    stdout). Raises with the command and the end of its output when it fails."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    cmd = [sys.executable, "-m", "search.cli", *argv]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    sec = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"`hwcompress {shlex.join(argv)}` exited {p.returncode}:\n{(p.stdout + p.stderr)[-3000:]}")
    return sec, p.stdout


def _storage(results_dir: Path) -> str:
    return f"sqlite:///{results_dir.resolve()}/studies.db"


def run_search(model: str, dataset: str, study: str, args: argparse.Namespace, results_dir: Path, *,
               factorize: bool, profile: str, trials: int, steps: int, objectives: str, old: dict,
               k: int | None = None, loop: str | None = None) -> dict:
    """One study through `hwcompress search` (resumed when it exists); its wall time (the
    recorded one when nothing was left to search) and the study. `k`, `loop`: --k, --loop (None:
    measured on this machine once, remembered in the results cache)."""
    batch = args.image_batch_size if dataset in IMAGE_DATASETS else args.batch_size
    storage = _storage(results_dir)
    before = _complete(study, storage)
    argv = ["search", "--model", model, "--dataset", dataset, "--profile", profile, "--trials", str(trials),
            "--finetune-steps", str(steps), "--seed", str(args.seed), "--sampler", args.sampler,
            "--objectives", objectives, "--study", study, "--results-dir", str(results_dir), "--quiet"]
    argv += ["--finetune-batch-size", str(batch)]
    argv += ["--factorize"] if factorize else []
    argv += ["--k", str(k)] if k else []
    argv += ["--loop", loop] if loop else []
    sec, _ = _hwcompress(*argv)
    resumed = before >= trials
    if resumed and "wall_s" in old:
        sec = old["wall_s"]  # nothing was searched now: keep the time the search took
    return {"study": study, "command": "hwcompress " + shlex.join(argv), "wall_s": sec, "resumed": resumed,
            "trials_before": before}


def baseline(model: str, dataset: str, args: argparse.Namespace, results_dir: Path) -> dict:
    """Train (or load) the pair's baseline first (`hwcompress train`, into the results cache the
    searches read), so neither study's wall time holds it; its seconds and quality."""
    sec, text = _hwcompress("train", "--model", model, "--dataset", dataset, "--seed", str(args.seed),
                            "--cache-dir", str(results_dir / "cache"), "--json")
    info = json.loads(text.strip().splitlines()[-1])
    return {"seconds": sec, **{k: info.get(k) for k in ("val_metric", "test_metric", "cache_key", "train_seconds")}}


def _span(study: optuna.Study) -> float:
    """Seconds from the first trial's start to the last trial's end (the search loop's time)."""
    ts = [t for t in study.get_trials(deepcopy=False) if t.datetime_complete is not None and t.datetime_start]
    return (max(t.datetime_complete for t in ts) - min(t.datetime_start for t in ts)).total_seconds() if ts else 0.0


def factorizes(plan: dict | None) -> bool:
    """Whether a stored plan factorizes some layer (a rank ratio below 1)."""
    return any(float(r) < 1 for r in (plan or {}).get("rank") or ())


def _forms(plans: list[dict]) -> dict[str, int]:
    """How many factorized layers the plans hold per form (svd, spatial, kronecker)."""
    out: dict[str, int] = {}
    for plan in plans:
        for r, f in zip(plan.get("rank") or (), plan.get("form") or ()):
            if float(r) < 1:
                out[str(f)] = out.get(str(f), 0) + 1
    return out


def describe(study: optuna.Study) -> dict:
    """Trials, front and picks of one finished study."""
    from search.report.view import pareto_frame

    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    front = pareto_frame(study)
    plans = list(front["plan"]) if len(front) else []
    pick = best_ratio_within(study, TOLERANCE, split="test")
    pick_val = best_ratio_within(study, TOLERANCE, split="val")
    return {
        "trials_finished": sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL) for t in trials),
        "trials_completed": len(complete),
        "trials_over_budget": sum(t.state == TrialState.PRUNED and t.user_attrs.get("feasible") is False for t in trials),
        "trials_factorized": sum(factorizes(t.user_attrs.get("plan")) for t in complete),
        "search_s": _span(study),
        "front": len(front), "front_factorized": sum(factorizes(p) for p in plans),
        "front_forms": _forms(plans),
        "front_trials": [int(x) for x in front["trial"]] if len(front) else [],
        "best_within_test": pick, "best_within_val": {k: pick_val.get(k) for k in ("ratio", "quality", "test_quality", "trial")},
        "baseline": study.user_attrs.get("baseline"),
    }


def same_box_hypervolumes(studies: list[optuna.Study]) -> list[float]:
    """Hypervolume of every completed trial of each study, in one normalised box for all
    (search.report.pareto: the worst loss + 10% of the range as reference, the best as ideal)."""
    from search.report import pareto

    losses = [_losses(st) for st in studies]
    both = np.concatenate(losses)
    ref, ideal = pareto.reference_point(both), pareto.ideal_point(both)
    return [pareto.hypervolume(a, ref, ideal) for a in losses]


def _tag(args: argparse.Namespace, objectives: str) -> str:
    """Sampler and objectives in a study's name (a study resumes only with its own), e.g. tpe-quality+size."""
    return f"{args.sampler}-{objectives.replace(',', '+')}"


def pair(spec: str, args: argparse.Namespace, results_dir: Path, old: dict) -> dict:
    """The --factorize study and the plain one of one model; their figures side by side."""
    model, _, dataset = spec.partition("/")
    dataset = dataset or DATASETS[model]
    rows, studies = {}, []
    base = baseline(model, dataset, args, results_dir)
    if not args.no_warmup:  # the one-off set-up (K, layer sensitivity, XLA programs) out of both studies' times
        warm = f"fz-{model}-{dataset}-{args.profile}-{_tag(args, args.objectives)}-warmup-s{args.steps}-seed{args.seed}"
        base["warmup_s"] = run_search(model, dataset, warm, args, results_dir, factorize=False, profile=args.profile,
                                      trials=1, steps=args.steps, objectives=args.objectives, old={},
                                      k=args.k, loop=args.loop)["wall_s"]
    for variant, fact in (("plain", False), ("factorize", True)):
        name = (f"fz-{model}-{dataset}-{args.profile}-{_tag(args, args.objectives)}-{variant}-n{args.trials}"
                f"-s{args.steps}-seed{args.seed}")
        prev = (old.get("variants") or {}).get(variant) or {}
        run = run_search(model, dataset, name, args, results_dir, factorize=fact, profile=args.profile,
                         trials=args.trials, steps=args.steps, objectives=args.objectives, old=prev, k=args.k,
                         loop=args.loop)
        st = optuna.load_study(study_name=name, storage=_storage(results_dir))
        rows[variant] = {**run, **describe(st)}
        studies.append(st)
        print(f"{model}/{dataset} {variant}: {rows[variant]['trials_completed']} trials completed in "
              f"{rows[variant]['wall_s']:.0f} s", flush=True)
    hv_all = same_box_hypervolumes(studies)
    hv_eq, limit = hypervolume_at_equal_time(studies)
    for (variant, row), a, e in zip(rows.items(), hv_all, hv_eq):
        row.update(hv=a, hv_equal_time=e)
    return {"model": model, "dataset": dataset, "profile": args.profile, "trials": args.trials, "steps": args.steps,
            "seed": args.seed, "sampler": args.sampler, "objectives": args.objectives, "hv_equal_time_s": limit,
            "metric": studies[0].user_attrs["baseline"].get("metric_name"), "baseline_run": base, "variants": rows}


def _fmt_ratio(p: dict) -> str:
    if not p or p.get("ratio") is None:
        return "none"
    return f"{p['ratio']:.1f}x (#{p['trial']})"


def print_pairs(results: dict) -> None:
    print("\nwall s: the `hwcompress search` process; search s: first trial's start to last trial's end; HV: all "
          "trials, HV eq.t: those done within the faster study's search s, one box per pair; front: plans on it "
          "(fact.: factorizing a layer); best within 0.5: largest ratio on the test split (val: on validation)")
    print(f"{'model':22s} {'variant':10s} {'trials':>6s} {'wall s':>7s} {'search s':>8s} {'HV':>7s} {'HV eq.t':>7s} "
          f"{'best within 0.5 (test)':>22s} {'test q':>8s} {'(val pick)':>12s} {'front':>5s} {'fact.':>5s}")
    for r in results.values():
        unit = "dB" if r["metric"] == "psnr_db" else "pt"
        key = f"{r['model']}/{r['dataset']}"
        for variant, v in r["variants"].items():
            p = v["best_within_test"]
            q = "" if p.get("test_quality") is None else f"{p['test_quality']:.4f}"
            print(f"{key:22s} {variant:10s} {v['trials_completed']:6d} {v['wall_s']:7.0f} {v['search_s']:8.0f} "
                  f"{v['hv']:7.4f} {v['hv_equal_time']:7.4f} {_fmt_ratio(p):>22s} {q:>8s} "
                  f"{_fmt_ratio(v['best_within_val']):>12s} {v['front']:5d} {v['front_factorized']:5d}")
        b = r["variants"]["plain"]["baseline"]
        print(f"{'':22s} {r['profile']}, {r['trials']} trials x {r['steps']} steps, seed {r['seed']}: baseline test "
              f"{b['test_metric']:.4f}, val {b['val_metric']:.4f} (within 0.5 {unit}); HV eq.t over the first "
              f"{r['hv_equal_time_s']:.0f} s")


# ---------------------------------------------------------------------------- DemosaicNet

def _pick(study: optuna.Study, profile: str, by: str, factorized_only: bool = False) -> dict | None:
    """The trial to export: the lowest `by` (latency_ms | size_kb on `profile`) among complete
    trials within 0.5 dB of the baseline's test PSNR; the most accurate (test) when none is.
    `factorized_only`: among trials that factorize a layer (None when there is none)."""
    base = study.user_attrs["baseline"]["test_metric"]
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if t.user_attrs.get("test_quality") is not None
            and (not factorized_only or factorizes(t.user_attrs.get("plan")))]
    if not done:
        if factorized_only:
            return None
        raise RuntimeError(f"study {study.study_name} has no complete trial to export")
    ok = [t for t in done if t.user_attrs["test_quality"] >= base - TOLERANCE]
    key = "latency_ms" if by == "latency" else "size_kb"
    t = min(ok, key=lambda t: t.user_attrs["costs"][profile][key]) if ok else \
        max(done, key=lambda t: t.user_attrs["test_quality"])
    return {"trial": t.number, "within_0.5db": bool(ok), "by": by if ok else "most accurate (none within 0.5 dB)",
            "within_count": len(ok), "val_psnr": t.user_attrs["quality"], "test_psnr": t.user_attrs["test_quality"],
            "plan": t.user_attrs["plan"], "factorized": factorizes(t.user_attrs["plan"]),
            "predicted": t.user_attrs["costs"][profile], "compression_ratio": t.user_attrs["compression_ratio"]}


def _onnx_psnr(path: Path, task) -> float:
    """PSNR (dB, the task's metric) of an ONNX model on the task's held-out test images."""
    import jax.numpy as jnp

    from search.cost.measure import session

    sess = session(path, threads=2)
    x, y = task.data.x_test, task.data.y_test
    out = np.concatenate([sess.run(None, {sess.get_inputs()[0].name: np.asarray(x[i:i + 1], np.float32)})[0]
                          for i in range(len(x))])
    return float(np.mean(np.asarray(task.metric(jnp.asarray(out), jnp.asarray(y)))))


def _exported(out: Path, profile: str) -> dict:
    """What an export's config.json says about it, with its latency predicted on `profile` at
    the exported input shape (whole test images; the search and the export's config price the
    training patches a trial fine-tunes on)."""
    from search.cost.measure import _predict

    config = json.loads((out / "config.json").read_text())
    return {"dir": str(out), "input_shape": config["model"]["input_shape"],
            "test_psnr_flax": config["quality"]["test"], "test_psnr_onnx_export": config["quality"]["test_onnx"],
            "onnx_max_abs_diff": config["quality"]["onnx_max_abs_diff"], "retrain": config.get("retrain"),
            "size": config["size"], "predicted_patch": (config.get("predicted") or {}).get(profile),
            "predicted_image_ms": _predict(config, profile),
            "layers": [{k: l.get(k) for k in ("name", "out_channels", "onnx_out_channels", "weight_bits", "act_bits",
                                               "onnx_form", "onnx_factor_form", "rank_ratio", "rank", "form")}
                       for l in config["layers"]]}


def demosaic(args: argparse.Namespace, results_dir: Path, old: dict) -> dict:
    """The DemosaicNet search on a mobile profile, its pick (and its best factorized trial, unless
    that is the pick or --demosaic-no-factorized-export) exported with `hwcompress export` and
    measured against the fp32 model."""
    from bench.bench_costtruth import measure_interleaved
    from search.compression import plan as P
    from search.engine.config import FinetuneConfig
    from search.export.exporter import export_plan
    from search.study.context import load_context
    from search.study.spec import StudySpec

    prof, n, steps = args.demosaic_profile, args.demosaic_trials, args.demosaic_steps
    name = f"fz-demosaicnet-{prof}-{_tag(args, args.demosaic_objectives)}-factorize-n{n}-s{steps}-seed{args.seed}"
    base_run = baseline("demosaicnet", "demosaic-images", args, results_dir)
    run = run_search("demosaicnet", "demosaic-images", name, args, results_dir, factorize=True, profile=prof,
                     trials=n, steps=steps, objectives=args.demosaic_objectives, old=old,
                     k=None if args.demosaic_k == 0 else args.demosaic_k,
                     loop=None if args.demosaic_loop == "auto" else args.demosaic_loop)
    st = optuna.load_study(study_name=name, storage=_storage(results_dir))
    res: dict = {**run, **describe(st), "profile": prof, "trials": n, "steps": steps, "baseline_run": base_run}
    print(f"demosaicnet {prof}: {res['trials_completed']} trials completed in {res['wall_s']:.0f} s", flush=True)
    picks = {"pick": _pick(st, prof, args.demosaic_pick)}
    if not picks["pick"]["factorized"] and not args.demosaic_no_factorized_export:
        picks["factorized_pick"] = _pick(st, prof, args.demosaic_pick, factorized_only=True)
    picks = {k: v for k, v in picks.items() if v is not None}
    exports = results_dir / "exports" / name
    export_steps = steps if args.demosaic_export_steps is None else args.demosaic_export_steps
    ctx = load_context(StudySpec.of_study(st), str(results_dir), study=st)
    base = st.user_attrs["baseline"]
    dirs = {}
    for key, pk in picks.items():
        out = dirs[key] = exports / f"trial-{pk['trial']}"
        sec, text = _hwcompress("export", "--study", name, "--trial", str(pk["trial"]), "--out", str(out),
                                "--finetune-steps", str(export_steps), "--results-dir", str(results_dir), "--force")
        print(text, end="", flush=True)
        res[key] = {**pk, "export": {"seconds": sec, "finetune_steps": export_steps, "printed": text.splitlines(),
                                     **_exported(out, prof)}}
    dense_out = dirs["fp32"] = exports / "fp32"
    t0 = time.perf_counter()
    export_plan(ctx.task, ctx.params, P.dense_plan(len(ctx.layers)), dense_out, profile=ctx.profile,
                finetune=FinetuneConfig(steps=0, k=1), force=True)
    res["fp32"] = {"export": {"seconds": time.perf_counter() - t0, **_exported(dense_out, prof)}}
    timing = measure_interleaved([d / "model.onnx" for d in dirs.values()], args.rounds, args.runs)
    for (key, d), t in zip(dirs.items(), timing):
        psnr = _onnx_psnr(d / "model.onnx", ctx.task)
        res[key]["export"].update(test_psnr_onnx=psnr, latency_ms=t["fastest_ms"], latency_median_ms=t["robust_ms"])
        res[key].update(psnr_loss_db=base["test_metric"] - psnr,
                        within_half_db_after_export=bool(psnr >= base["test_metric"] - TOLERANCE),
                        speedup_over_fp32_onnx=timing[-1]["fastest_ms"] / t["fastest_ms"])
    res["baseline"] = base
    return res


def print_demosaic(r: dict) -> None:
    f = r["fp32"]["export"]
    print(f"\ndemosaicnet on {r['profile']}: {r['trials_completed']} of {r['trials']} trials completed "
          f"({r['trials_over_budget']} over budget) in {r['wall_s']:.0f} s; front {r['front']} "
          f"({r['front_factorized']} factorize a layer); {r['pick']['within_count']} trials within 0.5 dB on test; "
          f"baseline test {r['baseline']['test_metric']:.2f} dB")
    print("  onnxruntime, 1 thread, batch 1, one whole test image (fastest run); predicted on the profile at that shape")
    print(f"  fp32{'':22s} ONNX test PSNR {f['test_psnr_onnx']:.2f} dB, {f['latency_ms']:7.2f} ms measured, "
          f"{f['predicted_image_ms']:.3f} ms predicted")
    for key in ("pick", "factorized_pick"):
        if key not in r:
            continue
        p, e = r[key], r[key]["export"]
        fact = [f"{l['name']} r{l['rank']} {l['form']}" for l in e["layers"] if l.get("rank")]
        print(f"  {key + ' trial ' + str(p['trial']):26s} ONNX test PSNR {e['test_psnr_onnx']:.2f} dB, {e['latency_ms']:7.2f} ms "
              f"measured, {e['predicted_image_ms']:.3f} ms predicted; {p['speedup_over_fp32_onnx']:.2f}x fp32's speed, "
              f"{p['compression_ratio']:.1f}x smaller; {p['by']} (search test PSNR {p['test_psnr']:.2f} dB); "
              f"export {e['finetune_steps']} steps in {e['seconds']:.0f} s; factorized: {', '.join(fact) or 'none'}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", default="pairs,demosaic", help="comma list of pairs, demosaic (default both)")
    p.add_argument("--models", default="lenet300,lenet5,vdsr",
                   help="pairs part: comma list of models, or model/dataset (default lenet300,lenet5,vdsr on "
                        "fashion-mnist, fashion-mnist, sr-images)")
    p.add_argument("--trials", type=int, default=20, help="pairs part: trials per study (default 20)")
    p.add_argument("--steps", type=int, default=100, help="pairs part: fine-tune steps per trial (default 100)")
    p.add_argument("--seed", type=int, default=0, help="data split, sampler and fine-tuning seed (default 0)")
    p.add_argument("--profile", default="mobile-cpu", help="pairs part: profile (default mobile-cpu)")
    p.add_argument("--sampler", default="tpe", help="Optuna sampler (default tpe)")
    p.add_argument("--objectives", default="quality,size", help="pairs part: objectives (default quality,size)")
    p.add_argument("--k", type=int, default=None, help="pairs part: plans fine-tuned together (default: measured)")
    p.add_argument("--loop", default=None, help="pairs part: python | fused (default: measured)")
    p.add_argument("--batch-size", type=int, default=128,
                   help="fine-tune batch of the classification models (default 128, the search's)")
    p.add_argument("--image-batch-size", type=int, default=16,
                   help="fine-tune batch of vdsr and demosaicnet, in patches (default 16, what their baselines "
                        "trained with; the search's default 128 made a demosaicnet step 1.1 s here)")
    p.add_argument("--no-warmup", action="store_true",
                   help="pairs part: no one-trial study before each pair (it takes the machine's one-off set-up, "
                        "K measurement, layer sensitivity and compiles, out of the first study's wall time)")
    p.add_argument("--demosaic-trials", type=int, default=12, help="demosaic part: trials (default 12)")
    p.add_argument("--demosaic-steps", type=int, default=40, help="demosaic part: fine-tune steps per trial (default 40)")
    p.add_argument("--demosaic-export-steps", type=int, default=None,
                   help="demosaic part: the export's fine-tune steps (default: --demosaic-steps)")
    p.add_argument("--demosaic-k", type=int, default=1,
                   help="demosaic part: --k (default 1; 0: measure, which takes minutes for this model here)")
    p.add_argument("--demosaic-loop", default="python", help="demosaic part: --loop python | fused | auto (default python)")
    p.add_argument("--demosaic-profile", default="mobile-npu", help="demosaic part: profile (default mobile-npu)")
    p.add_argument("--demosaic-objectives", default="quality,latency,size",
                   help="demosaic part: objectives (default quality,latency,size)")
    p.add_argument("--demosaic-pick", default="latency", choices=("latency", "size"),
                   help="demosaic part: export the lowest latency or the smallest plan within 0.5 dB (default latency)")
    p.add_argument("--demosaic-no-factorized-export", action="store_true",
                   help="demosaic part: when the pick factorizes no layer, do not also export the best trial that does")
    p.add_argument("--rounds", type=int, default=5, help="demosaic part: interleaved timing rounds (default 5)")
    p.add_argument("--runs", type=int, default=10, help="demosaic part: timed runs per model and round (default 10)")
    p.add_argument("--results-dir", default="results/bench_factorize",
                   help="studies.db and exports (default results/bench_factorize; its cache/ is results/cache "
                        "when it has none, so the trained baselines are shared)")
    p.add_argument("--out", default=str(OUT / "bench_factorize.json"), help="JSON output")
    args = p.parse_args(argv)
    parts = set(args.parts.split(","))
    if parts - {"pairs", "demosaic"}:
        p.error(f"--parts: use pairs and/or demosaic, not {','.join(sorted(parts - {'pairs', 'demosaic'}))}")
    results_dir = Path(args.results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    shared = ROOT / "results" / "cache"
    if not (results_dir / "cache").exists() and results_dir.resolve() != (ROOT / "results").resolve():
        shared.mkdir(parents=True, exist_ok=True)
        (results_dir / "cache").symlink_to(shared.resolve(), target_is_directory=True)
    path = Path(args.out)
    out: dict = json.loads(path.read_text()) if path.is_file() else {}  # parts run separately add up
    out.setdefault("pairs", {})
    t0 = time.perf_counter()
    if "pairs" in parts:
        for spec in args.models.split(","):
            model, _, dataset = spec.partition("/")
            key = f"{model}/{dataset or DATASETS[model]}/{args.profile}/n{args.trials}-s{args.steps}-seed{args.seed}"
            t1 = time.perf_counter()
            out["pairs"][key] = pair(spec, args, results_dir, out["pairs"].get(key) or {})
            out["pairs"][key]["part_s"] = time.perf_counter() - t1
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(out, indent=1, default=str))
    if "demosaic" in parts:
        t1 = time.perf_counter()
        out["demosaic"] = demosaic(args, results_dir, out.get("demosaic") or {})
        out["demosaic"]["part_s"] = time.perf_counter() - t1
    out["command"] = "python -m bench.bench_factorize " + shlex.join(sys.argv[1:] if argv is None else argv)
    out["seconds"] = time.perf_counter() - t0
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1, default=str))
    ran = {k: v for k, v in out["pairs"].items() if "pairs" in parts and k.endswith(
        f"/{args.profile}/n{args.trials}-s{args.steps}-seed{args.seed}")}
    if ran:
        print_pairs(ran)
    if "demosaic" in parts:
        print_demosaic(out["demosaic"])
    print(f"saved {path} ({out['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
