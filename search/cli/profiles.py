"""`hwcompress profiles list|show|calibrate|fit`: the hardware profiles the cost model prices on."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from search.errors import UserError


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("profiles", help="list, show or calibrate hardware profiles",
                              description="Hardware profiles: what a device accelerates and how fast.")
    sub = p.add_subparsers(dest="profiles_command", metavar="ACTION", required=True)
    ls = sub.add_parser("list", help="the shipped profiles")
    ls.add_argument("--json", action="store_true", help="one JSON list for scripts")
    ls.set_defaults(func=list_command)
    show = sub.add_parser("show", help="one profile, with the sources of its numbers")
    show.add_argument("name", help="shipped profile name or TOML path")
    show.add_argument("--json", action="store_true", help="the parsed profile as JSON")
    show.set_defaults(func=show_command)
    cal = sub.add_parser("calibrate", help="measure this machine in onnxruntime and write a profile",
                         description="Time one-layer ONNX models in the export's own forms (float, QLinear and "
                         "integer Dense / Conv / depthwise kernels, activation rounding, elementwise ops) over "
                         "sampled shapes in onnxruntime, learn one latency predictor per kernel kind from them, "
                         "and write a profile TOML that --profile accepts (the roofline numbers, from matmul, conv "
                         "and bandwidth micro-benchmarks, are kept for memory and lower bounds). --study adds the "
                         "shapes that study's layers take under channel pruning.")
    cal.add_argument("--out", required=True, help="TOML file to write")
    cal.add_argument("--name", default=None, help="profile name (default: the --out file's name without .toml)")
    cal.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads, as `measure --threads` (default 1)")
    cal.add_argument("--seconds", type=float, default=0.3, help="timing per micro-benchmark (default 0.3)")
    cal.add_argument("--kernel-shapes", type=int, default=40,
                     help="sampled shapes per layer kind (dense, conv, depthwise), each timed in every kernel form it "
                          "runs as: float (blocked or plain), QLinear with <= 7- and 8-bit weights, integer (default 40)")
    cal.add_argument("--batch", type=int, default=1,
                     help="examples per inference the kernels are timed at and the profile's latency is for: 1, or a "
                          "server batch such as 32 (default 1)")
    cal.add_argument("--study", default=None, help="also time the kernel shapes this study's layers take with all or half their channels")
    cal.add_argument("--storage", default=None, help="Optuna storage URL of --study (default sqlite under --results-dir)")
    cal.add_argument("--results-dir", default="results", help="results root of --study (default results)")
    cal.add_argument("--roofline-only", action="store_true", help="only the micro-benchmarks: latency from the roofline")
    cal.add_argument("--force", action="store_true", help="overwrite --out when it exists")
    cal.set_defaults(func=calibrate_command)
    fit = sub.add_parser("fit", help="refit a profile to exported models measured on this machine",
                         description="Time each export's model.onnx in onnxruntime (as `hwcompress measure`, at the "
                         "batch the profile prices), then refit --profile to those latencies "
                         "(search.cost.calibrate.fit_profile: one scale per kernel kind and for the per-inference "
                         "term, each pulled toward the calibration) and write the fitted profile TOML. --profile "
                         "must be a calibrated one (`profiles calibrate`): a roofline profile is refused.")
    fit.add_argument("exports", nargs="+", metavar="EXPORT_DIR", help="directories written by `hwcompress export` (2 or more)")
    fit.add_argument("--profile", required=True, help="the calibrated profile to refit: the TOML `profiles calibrate` "
                     "wrote on this machine")
    fit.add_argument("--out", required=True, help="TOML file to write")
    fit.add_argument("--name", default=None, help="profile name (default: the --out file's name without .toml)")
    fit.add_argument("--runs", type=int, default=200, help="timed runs per export (default 200)")
    fit.add_argument("--warmup", type=int, default=20, help="untimed runs first (default 20)")
    fit.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads, as `measure --threads` (default 1)")
    fit.add_argument("--json", action="store_true", help="the per-export table as JSON")
    fit.add_argument("--force", action="store_true", help="overwrite --out when it exists")
    fit.set_defaults(func=fit_command)


def profile_dict(profile: Any) -> dict[str, Any]:
    """A HardwareProfile as plain JSON-able values."""
    import dataclasses

    d = {f.name: getattr(profile, f.name) for f in dataclasses.fields(profile) if f.name != "kernels"}
    d["budget"] = dataclasses.asdict(profile.budget)
    d["peak_gops"] = {str(k): v for k, v in profile.peak_gops.items()}
    d["efficiency"] = dict(profile.efficiency)
    d["nm_patterns"] = [list(x) for x in profile.nm_patterns]
    if profile.kernels is not None:
        k = profile.kernels
        d["kernels"] = {"inference_us": k.inference_us, "runtime": k.runtime, "samples": k.samples,
                        "channel_block": k.channel_block, "channel_align": k.channel_align, "q8u_block": k.q8u_block,
                        "batch": k.batch,
                        "coef": {name: list(v) for name, v in k.coef.items()}}
    else:
        d["kernels"] = None
    d["latency_model"] = "roofline" if profile.kernels is None else "kernels"
    return d


def list_command(args: argparse.Namespace) -> int:
    import hw_profiles

    profiles = [hw_profiles.load_profile(n) for n in hw_profiles.list_profiles()]
    if args.json:
        print(json.dumps([profile_dict(p) for p in profiles], indent=1))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title="hardware profiles (hwcompress profiles show NAME for sources)")
    for col in ("name", "kind", "peak GOPS (bits)", "GB/s", "weight bits", "budget", "description"):
        table.add_column(col)
    for p in profiles:
        b = p.budget
        budget = ", ".join(f"{v:g} {u}" for v, u in ((b.latency_ms, "ms"), (b.memory_kb, "KB"), (b.size_kb, "KB size")) if v)
        table.add_row(p.name, p.kind, " ".join(f"{g:g}@{w}" for w, g in p.peak_gops.items()), f"{p.bandwidth_gbs:g}",
                      ",".join(map(str, p.weight_bits)), budget or "-", p.description)
    Console(width=200).print(table)
    return 0


def show_command(args: argparse.Namespace) -> int:
    import hw_profiles

    profile = hw_profiles.load_profile(args.name)
    if args.json:
        print(json.dumps(profile_dict(profile), indent=1))
    else:  # the file itself: every number with its source comment
        print(Path(profile.source).read_text(encoding="utf-8") if profile.source else hw_profiles.dump_profile(profile))
    return 0


def _study_shapes(args: argparse.Namespace) -> list:
    """The kernel shapes the layers of --study take at 100/75/50/25% of their channels."""
    from search.export.kernel_probes import layer_shapes
    from search.study.context import load_context
    from search.study.spec import SPEC_ATTR, StudySpec
    from search.study.storage import load_study, open_storage

    study = load_study(args.study, open_storage(args.storage, args.results_dir, create=False))
    spec = StudySpec.from_attrs(study.user_attrs.get(SPEC_ATTR), study.study_name)
    return layer_shapes(load_context(spec, args.results_dir).layers)


def calibrate_command(args: argparse.Namespace) -> int:
    import numpy as np

    import hw_profiles
    from search.cost.calibrate import calibrated_profile, measure_machine, profile_toml

    out, name = _out_and_name(args)
    if args.seconds <= 0:
        raise UserError(f"--seconds {args.seconds} must be > 0")
    if not 1 <= args.batch <= 4096:
        raise UserError(f"--batch {args.batch} must be in 1..4096 (examples per inference, e.g. 1 or 32)")
    if args.batch > 1 and args.roofline_only:
        raise UserError("--batch prices the kernel predictors; the roofline is for batch 1: drop --roofline-only or --batch")
    if args.kernel_shapes < 3:
        raise UserError(f"--kernel-shapes {args.kernel_shapes} must be >= 3 (a predictor per kernel kind needs several shapes)")
    shapes = _study_shapes(args) if args.study else []  # a bad --study fails before any timing
    kernels, note = None, ""
    if not args.roofline_only:
        from search.export.kernel_probes import sampled_shapes
        from search.export.kernel_timing import NOISY_HELD_OUT_ERROR, calibrate_kernels

        shapes = sampled_shapes(args.kernel_shapes) + shapes

        tty = sys.stderr.isatty()

        def progress(done: int, total: int) -> None:
            if done == total or (tty and done % 25 == 0):
                # probe models x rounds, each layer shape in several forms and as a chain of two and four
                print(f"\rtiming probe models: {done}/{total}", end="\n" if done == total else "", file=sys.stderr, flush=True)

        try:
            kernels, report = calibrate_kernels(shapes, threads=args.threads, min_s=min(args.seconds, 0.3) / 6,
                                                progress=progress, batch=args.batch)
        except ValueError as e:  # too few usable timings of a kernel kind (a very noisy machine)
            raise UserError(f"{e}: rerun with a larger --kernel-shapes or --seconds on a quieter machine") from None
        held_out = report.get("held_out_median_error", np.nan)
        if held_out > NOISY_HELD_OUT_ERROR:  # the profile is still written: the user decides
            print(f"warning: the kernel predictors miss held-out probes by {held_out * 100:.1f}% (median; above "
                  f"{NOISY_HELD_OUT_ERROR * 100:.0f}%, the timing was noisy: other work on this machine, or a shared "
                  "host's slow phase): run `hwcompress profiles calibrate` again when the machine is quiet",
                  file=sys.stderr)
        note = (f"{report['kernels_timed']} kernels timed at batch {args.batch} in {report['seconds']:.0f} s"
                + (f" (with the shapes of study {args.study})" if args.study else "")
                + ("; held-out check: median error " + (f"{report['held_out_median_error'] * 100:.1f}%"
                   if np.isfinite(report.get("held_out_median_error", np.nan)) else "n/a (too few shapes per kind)")))
    m = measure_machine(threads=args.threads, min_s=args.seconds)
    profile = calibrated_profile(m, name=name, kernels=kernels)
    text = profile_toml(profile, m, note=note)
    hw_profiles.profile_from_text(text, str(out))  # what we write must load like the others
    out.write_text(text, encoding="utf-8")
    print(f"fp32 {m['fp32_gops']:.1f} GOPS, int8 {m['int8_gops']:.1f} GOPS, DRAM {m['dram_gbs']:.1f} GB/s, "
          f"cached {m['cache_gbs']:.1f} GB/s, {m['op_overhead_us']:.2f} us per op")
    if kernels is not None:
        print(f"latency model: kernels ({note}); {kernels.inference_us:.1f} us per inference")
    print(f"wrote {out}: use it as --profile {out}")
    return 0


def _out_and_name(args: argparse.Namespace) -> tuple[Path, str]:
    """(--out, the profile's name) after the checks every profile writer shares; UserError otherwise."""
    out = Path(args.out)
    if out.is_dir():
        raise UserError(f"--out {out} is a directory: pass a file path such as {out / 'this-machine.toml'}")
    if out.exists() and not args.force:
        raise UserError(f"{out} exists: pass --force to overwrite it, or another --out")
    if not out.parent.is_dir():
        raise UserError(f"directory {out.parent} of --out does not exist: create it or pick another --out")
    if args.threads < 1:
        raise UserError(f"--threads {args.threads} must be >= 1")
    name = out.stem if args.name is None else args.name
    if not name.strip():
        raise UserError("--name must not be empty: pass a profile name such as this-machine")
    return out, name


def fit_command(args: argparse.Namespace) -> int:
    """`profiles fit`: measure the exports, refit --profile to them, write --out."""
    import numpy as np

    import hw_profiles
    from search.compression.plan import stack_plans
    from search.cost.calibrate import fit_profile, profile_toml
    from search.cost.measure import export_layers_plan, profile_batch, read_config, time_export
    from search.cost.roofline import price

    out, name = _out_and_name(args)
    seen: dict[Path, str] = {}
    for d in args.exports:
        if (key := Path(d).resolve()) in seen:
            raise UserError(f"profiles fit got export {d} twice (as {seen[key]} too): pass each export directory once")
        seen[key] = d
    if len(args.exports) < 2:
        raise UserError(f"profiles fit got {len(args.exports)} export: one model cannot tell the kernel kinds "
                        "apart; pass 2 or more export directories (more, and varied, fit better)")
    if args.runs < 1 or args.warmup < 0:
        raise UserError(f"--runs {args.runs} must be >= 1 and --warmup {args.warmup} >= 0")
    base = hw_profiles.load_profile(args.profile)
    if base.kernels is None:
        # fit_profile's roofline path has no prior: on a few exports it explained every latency by one
        # term (xeon fitted to two lenet300 exports: 2e17 GOPS fp32 and a conv efficiency of 3e-19)
        raise UserError(f"profile {base.name} prices latency by the roofline; `profiles fit` refits the kernel "
                        "predictors of a calibrated profile: run `hwcompress profiles calibrate --out F.toml` on this "
                        "machine first and pass --profile F.toml")
    configs = [read_config(d) for d in args.exports]  # every bad directory before any timing
    rebuilt = [export_layers_plan(c) for c in configs]
    batch = profile_batch(args.profile)  # the batch the profile's latencies are for, as `measure` times
    samples, rows = [], []
    for d, config, (layers, plan) in zip(args.exports, configs, rebuilt):
        ms = time_export(d, config, args.runs, args.warmup, args.threads, batch)["median_ms"]
        samples.append((layers, plan, ms))
        print(f"measured {d}: {ms:.4f} ms", file=sys.stderr, flush=True)
    fitted = fit_profile(base, samples, name=name)
    for d, (layers, plan, ms) in zip(args.exports, samples):
        before, after = (float(np.asarray(price(p, layers, stack_plans([plan])).latency_ms)[0]) for p in (base, fitted))
        rows.append({"export": str(d), "measured_ms": ms, "predicted_ms_before": before, "predicted_ms_after": after})
    text = profile_toml(fitted, note=f"{base.name} fitted to {len(samples)} exports measured in onnxruntime "
                        f"({args.threads} thread(s))", command="hwcompress profiles fit")
    hw_profiles.profile_from_text(text, str(out))  # what we write must load like the others
    out.write_text(text, encoding="utf-8")
    if args.json:
        print(json.dumps({"profile": str(out), "name": name, "base": base.name, "exports": rows}, indent=1))
        return 0
    print(f"{'export':40s} {'measured ms':>12s} {'before':>10s} {'after':>10s}")
    for r in rows:
        print(f"{r['export'][-40:]:40s} {r['measured_ms']:12.4f} {r['predicted_ms_before']:10.4f} "
              f"{r['predicted_ms_after']:10.4f}")
    err = lambda key: np.median([abs(r[key] / r["measured_ms"] - 1) for r in rows]) * 100
    print(f"median error on these exports: {err('predicted_ms_before'):.1f}% before, {err('predicted_ms_after'):.1f}% "
          f"after (the fit's own data: check it on exports it did not see)")
    print(f"wrote {out}: use it as --profile {out}")
    return 0
