"""Scores of the cost-truth bench (bench.bench_costtruth): predicted against measured latency.

Kendall tau, median absolute percentage error and the share within +-10%, for each calibrated
profile as calibrated and fitted on one half of the exports (search.cost.calibrate.fit_profile),
tested on the other; the median and range over repeats; the measurement's own noise floor; and
the tables the bench prints.
"""
from __future__ import annotations

import numpy as np

LENETS = ("lenet300", "lenet5")


def kendall_tau(a, b) -> float:
    from scipy.stats import kendalltau

    return float(kendalltau(a, b).statistic)


def scores(pred: np.ndarray, meas: np.ndarray) -> dict:
    ape = np.abs(pred - meas) / meas
    return {"n": int(len(meas)), "kendall_tau": kendall_tau(pred, meas), "mdape": float(np.median(ape)),
            "within_10pct": float(np.mean(ape <= 0.10))}


def analyze(records: list[dict], measured: list[float], profiles: dict, layers: dict[str, list]) -> dict:
    """Scores of each profile ({label: profile}) as calibrated, and fitted (search.cost.calibrate.
    fit_profile) on one half and tested on the other: a random half (alternate by measured
    rank), LeNets -> CNNs and CNNs -> LeNets. `records` are the exports (model, plan, factorized),
    `measured` their latencies in ms, `layers` each model's discovered layers."""
    from search.cost.calibrate import fit_profile
    from search.cost.roofline import price
    from search.compression.plan import stack_plans
    from search.study.space import plan_from_dict

    meas = np.asarray(measured, np.float64)
    plans = [plan_from_dict(r["plan"]) for r in records]

    def predict(prof, idx):
        return np.array([float(np.asarray(price(prof, layers[records[i]["model"]], stack_plans([plans[i]])).latency_ms)[0])
                         for i in idx])

    def fitted(base, idx, how="scales"):
        return fit_profile(base, [(layers[records[i]["model"]], plans[i], meas[i]) for i in idx], kernel_fit=how)

    every = list(range(len(records)))
    order = sorted(every, key=lambda i: meas[i])
    lenet = [i for i in every if records[i]["model"] in LENETS]
    cnn = [i for i in every if records[i]["model"] not in LENETS]
    splits = {"random half": (sorted(order[0::2]), sorted(order[1::2]))}
    if lenet and cnn:
        splits.update({"LeNets -> CNNs": (lenet, cnn), "CNNs -> LeNets": (cnn, lenet)})
    out: dict = {}
    for label, base in profiles.items():
        pred = predict(base, every)
        res = {"calibrated": {**scores(pred, meas), "predicted_ms": pred.tolist()}}
        if cnn:
            res["calibrated CNNs"] = scores(pred[cnn], meas[cnn])
        fz = [i for i in every if records[i].get("factorized")]
        if len(fz) > 1:
            res["calibrated factorized"] = scores(pred[fz], meas[fz])
        for name, (fit_idx, test_idx) in splits.items():
            res[f"fitted: {name}"] = scores(predict(fitted(base, fit_idx), test_idx), meas[test_idx])
            if base.kernels is not None:  # every coefficient refitted, not one scale per kind
                res[f"fitted coefficients: {name}"] = scores(
                    predict(fitted(base, fit_idx, "coefficients"), test_idx), meas[test_idx])
        out[label] = res
    return out


def noise_floor(timings: list[list[dict]]) -> dict | None:
    """How far the measurement itself moves between repeats: for every pair of repeats, the
    median absolute relative difference of an export's fastest run and the share of exports
    within +-10% of each other (the best any predictor can score against one repeat's timing)."""
    if len(timings) < 2:
        return None
    t = np.array([[m["fastest_ms"] for m in rep] for rep in timings])
    pairs = [(i, j) for i in range(len(t)) for j in range(len(t)) if i != j]
    d = [np.abs(t[i] - t[j]) / t[j] for i, j in pairs]
    return {"pairs": len(pairs), "mdape": [float(np.median(x)) for x in d],
            "within_10pct": [float(np.mean(x <= 0.10)) for x in d]}


def summarize_repeats(analyses: list[dict]) -> dict:
    """Median and range over repeats of every score."""
    out: dict = {}
    for label in analyses[0]:
        out[label] = {}
        for split, scores in analyses[0][label].items():
            out[label][split] = {k: {"median": float(np.median([a[label][split][k] for a in analyses])),
                                     "min": float(np.min([a[label][split][k] for a in analyses])),
                                     "max": float(np.max([a[label][split][k] for a in analyses]))}
                                 for k in ("kendall_tau", "mdape", "within_10pct")} | {"n": scores["n"]}
    return out


def print_exports(records: list[dict], repeat: dict) -> None:
    """Predicted against measured latency per export (one repeat's), factorized exports marked *."""
    labels = list(repeat["analysis"])
    print("\nper export, last repeat: measured (fastest run) and predicted by each calibrated profile, us; "
          "* factorized (low-rank)")
    print(f"{'model':12s} {'variant':14s} {'measured':>9s} " + " ".join(f"{lab:>15s}" for lab in labels))
    for i, (rec, m) in enumerate(zip(records, repeat["timing"])):
        pred = [repeat["analysis"][lab]["calibrated"]["predicted_ms"][i] for lab in labels]
        mark = "*" if rec.get("factorized") else " "
        print(f"{rec['model']:12s} {rec['variant'] + mark:14s} {m['fastest_ms'] * 1e3:9.1f} "
              + " ".join(f"{p * 1e3:15.1f}" for p in pred))


def print_summary(data: dict) -> None:
    """Median (range) over repeats of each profile's scores, and the measurement's noise floor."""
    for label, res in data["summary"].items():
        for split, sc in res.items():
            f = lambda k, pct=False: (f"{sc[k]['median'] * (100 if pct else 1):.{0 if pct else 2}f} "
                                      f"({sc[k]['min'] * (100 if pct else 1):.{0 if pct else 2}f}-{sc[k]['max'] * (100 if pct else 1):.{0 if pct else 2}f})")
            print(f"{label:8s} {split:34s} n={sc['n']:2d}  tau {f('kendall_tau')}  MdAPE% {f('mdape', True)}  "
                  f"within10% {f('within_10pct', True)}")
    noise = data.get("noise")
    if noise:
        print(f"measurement noise between repeats: median difference {np.median(noise['mdape']) * 100:.1f}%, "
              f"within +-10% of each other {np.median(noise['within_10pct']) * 100:.0f}% "
              f"({min(noise['within_10pct']) * 100:.0f}-{max(noise['within_10pct']) * 100:.0f})")
