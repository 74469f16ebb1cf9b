"""Which predictor form for the kernel-level latency model (issue 19): the linear, non-negative
predictors of search.cost.kernels against scikit-learn's gradient boosting and random forest,
on one calibration's own kernel samples (`profiles calibrate`: one-layer probes over sampled
shapes, search.export.kernel_probes), 5-fold cross-validated over the samples.

The trees see log M, log N, log K and log MNK of each sample and predict log microseconds, one
model per kernel kind (nn-Meter's recipe, Zhang et al. 2021, which trains on thousands of
samples per kind); the linear predictors are fitted exactly as calibration fits them
(kernels.fit). Reported per kind and overall: the median absolute relative error on the
held-out folds and the share within +-10%. JSON to bench/out/bench_kernel_forms.json.

    PYTHONPATH=. .venv/bin/python -m bench.bench_kernel_forms [--kernel-shapes 40] [--seed 0]
"""
from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parent / "out"
FORMS = ("linear", "gradient boosting", "random forest")


def cross_validate(samples: list, base: float, block: int, align: int, folds: int = 5, seed: int = 0) -> dict:
    """{kind: {form: [abs relative errors]}} of each form on held-out samples."""
    from sklearn.ensemble import HistGradientBoostingRegressor, RandomForestRegressor
    from sklearn.model_selection import KFold

    from search.cost import kernels as K

    def logs(f):
        f = np.asarray(f, np.float64)
        return np.log(np.maximum(f[:, [1, 2, 3, 7]], 1e-9))  # M, N, K, MNK

    errs: dict = {}
    for train, test in KFold(folds, shuffle=True, random_state=seed).split(samples):
        tr, te = [samples[i] for i in train], [samples[i] for i in test]
        lin = K.fit(tr, base, "cv", channel_block=block, channel_align=align)
        for (name, _, _), e in zip(te, np.abs(K.relative_errors(lin, te))):
            errs.setdefault(name, {f: [] for f in FORMS})["linear"].append(float(e))
        for name in sorted({n for n, _, _ in te}):
            a = [(f, y) for n, f, y in tr if n == name]
            b = [(f, y) for n, f, y in te if n == name]
            if len(a) < 5:
                continue
            xa, ya = logs([f for f, _ in a]), np.log([y for _, y in a])
            xb, yb = logs([f for f, _ in b]), np.array([y for _, y in b])
            for form, model in (("gradient boosting", HistGradientBoostingRegressor(max_depth=3, min_samples_leaf=3)),
                                ("random forest", RandomForestRegressor(200, random_state=seed))):
                pred = np.exp(model.fit(xa, ya).predict(xb))
                errs[name][form] += np.abs(pred / yb - 1).tolist()
    return errs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kernel-shapes", type=int, default=40, help="sampled shapes per layer kind (as profiles calibrate)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=OUT / "bench_kernel_forms.json")
    args = ap.parse_args(argv)
    from search.export.kernel_probes import sampled_shapes
    from search.export.kernel_timing import calibrate_kernels

    model, report = calibrate_kernels(sampled_shapes(args.kernel_shapes, seed=args.seed))
    samples = [(n, f, us) for n, f, us in report["samples"]]
    errs = cross_validate(samples, report["inference_us"], model.channel_block, model.channel_align, seed=args.seed)
    summary = {}
    print(f"{len(samples)} kernel samples, 5-fold; median abs. error / share within +-10% on held-out folds")
    for name in sorted(errs):
        summary[name] = {f: {"median": float(np.median(e)), "within_10pct": float(np.mean(np.array(e) <= 0.1)), "n": len(e)}
                         for f, e in errs[name].items() if e}
        print(f"{name:16s} " + "  ".join(f"{f}: {100 * v['median']:5.1f}% {100 * v['within_10pct']:3.0f}%"
                                         for f, v in summary[name].items()))
    every = {f: [x for name in errs for x in errs[name][f]] for f in FORMS}
    summary["all"] = {f: {"median": float(np.median(e)), "within_10pct": float(np.mean(np.array(e) <= 0.1)), "n": len(e)}
                      for f, e in every.items() if e}
    print(f"{'all':16s} " + "  ".join(f"{f}: {100 * v['median']:5.1f}% {100 * v['within_10pct']:3.0f}%"
                                       for f, v in summary["all"].items()))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": platform.processor() or platform.machine(), "args": {**vars(args), "out": str(args.out)},
                                    "samples": len(samples), "summary": summary}, indent=1))
    print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
