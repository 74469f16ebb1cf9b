"""Pareto reports from the study storage alone: no model, no data, no retraining.

`read_study` turns a study (and optionally another device profile) into one pandas frame,
a row per trial: quality, test quality, costs, feasibility, Pareto rank, hypervolume so far,
per-layer plan. "quality" is the validation metric the search ranked on; "test_quality" is
the test metric of the same fine-tuned weights (trial attr TEST_ATTR, NaN when the trial has
none), shown beside it and never used to rank. `pareto_frame` is its front; `write_report` writes report.html, report.md,
pareto.csv and PNG plots. Re-pricing for another profile uses the per-profile costs every
trial stores (or prices the stored plans again when that profile was not stored).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import optuna
import pandas as pd
from optuna.trial import TrialState

from hw_profiles import Budget, HardwareProfile, load_profile
from search.compression.plan import Plan, dense_plan, stack_plans
from search.cost import roofline as cost
from search.cost.budget import BUDGET_KEYS, broken_bounds, budget_dict
from search.errors import UserError
from search.report import pareto
from search.study.create import channel_groups, layers_from_attr
from search.study.pruning import STOPPED_ATTR, is_stopped
from search.study.space import plan_from_dict
from search.study.spec import SPEC_ATTR, TEST_ATTR, StudySpec

# relative size under which a difference of two metrics is float rounding (float32 eps is 1.2e-7)
ZERO_TOLERANCE = 1e-6
PLAN_KEYS = ("ratio", "granularity", "weight_bits", "act_bits", "quant_mode")
GRAN_LETTER = {"unstructured": "u", "channel": "c", "nm": "n", 0: "u", 1: "c", 2: "n"}
FORM_LETTER = {"spatial": "s", "kronecker": "k"}  # after a rank ratio; SVD has none
FRONT_COLUMNS = ("trial", "quality", "test_quality", "latency_ms", "memory_kb", "size_kb", "compression_ratio", "summary")
# what a cost column is called on a plot's axis and in a sentence, and its unit
COST_NAMES = {"latency_ms": ("latency", "ms"), "memory_kb": ("memory", "KB"), "size_kb": ("size", "KB")}


@dataclass(frozen=True)
class StudyView:
    """What a report shows: the study's metadata and one row per trial for one profile."""

    name: str  # study name
    profile: str  # the profile the costs and feasibility refer to
    repriced: bool  # True when `profile` is not the one the study searched for
    objectives: tuple[str, ...]  # metric names, e.g. ("quality", "latency_ms", "memory_kb")
    directions: tuple[str, ...]  # "maximize" | "minimize" per objective
    budget: dict[str, float | None]  # the bounds feasibility is checked against (None: unbounded)
    layer_names: tuple[str, ...]  # plan axis order
    trials: pd.DataFrame  # one row per priced trial, see trials_frame
    spec: StudySpec | None = None  # the study's record (None: a study not made by hwcompress)
    baseline: dict[str, Any] = field(default_factory=dict)  # study attr "baseline"
    sensitivity: dict[str, Any] | None = None  # study attr "sensitivity"
    reference: tuple[float, ...] = ()  # hypervolume reference point (losses)
    channel_groups: tuple[str, ...] = ()  # coupled channel groups and channels kept whole, one line each
    # the dense (uncompressed) model as a reference: "quality" (validation metric), "test_quality" and its costs
    # on `profile`; a key is absent when unknown (no stored baseline, layers or loadable profile)
    dense: dict[str, float] = field(default_factory=dict)
    storage: str | None = None  # the storage URL the study was read from as the user gave it (None: default)
    results_dir: str = "results"  # the results root the study was read from (its baseline cache)

    @property
    def model(self) -> str:
        """What was compressed, e.g. "lenet300 on digits" ("?" without a record)."""
        return "?" if self.spec is None else f"{self.spec.model} on {self.spec.dataset}"

    @property
    def front(self) -> pd.DataFrame:
        """The feasible Pareto front, best quality first."""
        return front_of(self)


# ---------------------------------------------------------------- reading a study

def layer_summary(plan: dict[str, Sequence], names: Sequence[str]) -> str:
    """A short per-layer line, e.g. "fc1 p.90u w4 a8 | fc2 w5k a8 | fc3 fp32".

    p<ratio><u|c|n>: pruned share and granularity; r<ratio>[s|k]: factorized at that rank ratio
    (SVD; s: spatial SVD, k: Kronecker; search.compression.lowrank); w<bits> (k: codebook);
    a<bits>; fp32: untouched.
    """
    parts = []
    ranks = plan.get("rank") or [1.0] * len(names)  # plans stored before factorization: full rank
    forms = plan.get("form") or ["svd"] * len(names)
    for i, name in enumerate(names):
        r = float(plan["ratio"][i])
        wb, ab = int(plan["weight_bits"][i]), int(plan["act_bits"][i])
        bits = [] if r <= 0 else [f"p{r:.2f}".replace("p0.", "p.") + GRAN_LETTER.get(plan["granularity"][i], "?")]
        if float(ranks[i]) < 1:
            bits.append(f"r{float(ranks[i]):.2f}".replace("r0.", "r.") + FORM_LETTER.get(forms[i], ""))
        if wb < 32:
            bits.append(f"w{wb}" + ("k" if plan["quant_mode"][i] in ("codebook", 1) else ""))
        if ab < 32:
            bits.append(f"a{ab}")
        parts.append(f"{name} " + (" ".join(bits) or "fp32"))
    return " | ".join(parts)


def _home_profile(spec: StudySpec | None, trials: Sequence[optuna.trial.FrozenTrial], objectives: Sequence[str]) -> str:
    """The name of the profile the study searched for (its key in the trials' "costs")."""
    keys = {k for t in trials for k in (t.user_attrs.get("costs") or {})}
    for cand in ((spec.profile_name, spec.profile) if spec is not None else ()):
        if isinstance(cand, str) and cand in keys:
            return cand
    for t in trials:  # a complete trial was told its home costs as objective values
        if t.state == TrialState.COMPLETE and t.values and t.user_attrs.get("costs"):
            told = {n: v for n, v in zip(objectives, t.values) if n in BUDGET_KEYS}
            for k, c in t.user_attrs["costs"].items():
                if told and all(math.isclose(c.get(n, math.nan), v, rel_tol=1e-9) for n, v in told.items()):
                    return k
    name = spec.profile_name if spec is not None else "unknown"
    return name if isinstance(name, str) and "\n" not in name else "custom"


def _profile(name: str) -> HardwareProfile:
    """The profile to re-price for, by shipped name or TOML path."""
    return load_profile(name)


def _price_missing(profile: Any, layers: list[dict], plans: list[dict]) -> list[dict[str, float]]:
    """Price stored plans on a profile the study did not store costs for (search.cost)."""
    if not layers:
        raise UserError(f"profile {getattr(profile, 'name', profile)!r} has no stored costs and the study has no \"layers\" to price its plans; re-price with a stored profile")
    return _price(profile, layers, stack_plans([plan_from_dict(p) for p in plans]))


def _price(profile: HardwareProfile, layers: list[dict], plans: Plan) -> list[dict[str, float]]:
    c = cost.price(profile, layers_from_attr(layers), plans)
    return [{k: float(np.asarray(getattr(c, k))[i]) for k in BUDGET_KEYS} for i in range(plans.ratio.shape[0])]


def _dense(baseline: dict[str, Any], profile: HardwareProfile | None, layers: list[dict]) -> dict[str, float]:
    """The dense model's validation and test quality and its costs on `profile`, as far as they are known."""
    out = {k: float(baseline[b]) for k, b in (("quality", "val_metric"), ("test_quality", "test_metric"))
           if isinstance(baseline.get(b), (int, float))}
    if profile is not None and layers:
        out.update(_price(profile, layers, stack_plans([dense_plan(len(layers))]))[0])
    return out


def _home_hardware(spec: StudySpec | None) -> HardwareProfile | None:
    """The study's own profile, to price the dense model on; None when it cannot be rebuilt here."""
    try:
        return None if spec is None else spec.hardware_profile()
    except (UserError, ValueError, OSError):  # ProfileError is a ValueError
        return None


def _record(study: optuna.Study) -> StudySpec | None:
    """The study's record; None for a study hwcompress did not start (plain Optuna)."""
    attrs = study.user_attrs.get(SPEC_ATTR)
    return None if attrs is None else StudySpec.from_attrs(attrs, study.study_name)


def read_study(study: optuna.Study, profile: str | None = None, *, storage: str | None = None,
               results_dir: str = "results") -> StudyView:
    """Every priced trial of `study` as a frame, costed and judged on `profile` (default: the
    study's own). `storage` and `results_dir` say where the study was read from, as the user
    named them (for the export commands a report prints). UserError when the study has no trials."""
    spec = _record(study)
    layers = list(study.user_attrs.get("layers") or [])
    trials = [t for t in study.get_trials(deepcopy=False) if t.user_attrs.get("plan") is not None]
    if not trials:
        raise UserError(f"study {study.study_name!r} has no finished trials yet; run `hwcompress search --study {study.study_name}` first")
    objectives = tuple(study.metric_names or ["quality", "latency_ms", "memory_kb"][: len(study.directions)])
    directions = tuple(d.name.lower() for d in study.directions)
    n_layers = len(trials[0].user_attrs["plan"]["ratio"])
    names = tuple(d["name"] for d in layers) if len(layers) == n_layers else tuple(f"L{i}" for i in range(n_layers))
    home = _home_profile(spec, trials, objectives)
    repriced = profile is not None and profile != home
    if repriced:
        prof = _profile(profile)
        pname, hardware = prof.name, prof
        budget = prof.budget
        costs = [(t.user_attrs.get("costs") or {}).get(pname) for t in trials]
        # only trained trials can be on a front: price those the study has no costs for
        missing = [i for i, c in enumerate(costs) if c is None and trials[i].state == TrialState.COMPLETE]
        if missing:
            priced = _price_missing(prof, layers, [trials[i].user_attrs["plan"] for i in missing])
            for i, c in zip(missing, priced):
                costs[i] = c
    else:
        pname, hardware = home, _home_hardware(spec)
        budget = spec.budget if spec is not None else Budget()
        costs = [_home_costs(t, home, objectives) for t in trials]
    frame = trials_frame(trials, costs, names, budget, repriced, _dense_bytes(layers, trials))
    loss = pareto.to_loss(frame[list(objectives)].to_numpy(float), directions)
    cons = pareto.budget_constraints({k: frame[k].to_numpy(float) for k in BUDGET_KEYS}, budget_dict(budget))
    frame["rank"] = pareto.nondominated_rank(loss, frame["feasible"].to_numpy(bool), cons)
    frame["pareto"] = frame["feasible"] & (frame["rank"] == 0)
    feas = frame["feasible"].to_numpy(bool)
    ref, ideal = pareto.reference_point(loss, feas), pareto.ideal_point(loss, feas)
    frame["hypervolume"] = pareto.hypervolume_history(loss, feas, ref, ideal) if feas.any() else 0.0
    baseline = dict(study.user_attrs.get("baseline") or {})
    dense = _dense(baseline, hardware, layers if len(layers) == n_layers else [])
    return StudyView(study.study_name, pname, repriced, objectives, directions, budget_dict(budget), names, frame,
                     spec, baseline, study.user_attrs.get("sensitivity"), tuple(float(x) for x in ref),
                     tuple(channel_groups(layers_from_attr(layers))), dense, storage, results_dir)


def _home_costs(t: optuna.trial.FrozenTrial, home: str, objectives: Sequence[str]) -> dict[str, float]:
    """Costs on the study's own profile: the stored costs, overridden by the told values."""
    c = dict((t.user_attrs.get("costs") or {}).get(home) or {})
    if t.state == TrialState.COMPLETE and t.values:
        c.update({n: v for n, v in zip(objectives, t.values) if n in BUDGET_KEYS})
    return c


def _dense_bytes(layers: list[dict], trials: Sequence[optuna.trial.FrozenTrial]) -> float:
    """fp32 bytes of the compressible layers (from "layers", else implied by a stored ratio)."""
    if layers:
        return 4.0 * sum(int(d.get("params", 0)) for d in layers)
    for t in trials:
        r, s = t.user_attrs.get("compression_ratio"), t.user_attrs.get("size_bytes")
        if r and s:
            return float(r) * float(s)
    return math.nan


def trials_frame(trials: Sequence[optuna.trial.FrozenTrial], costs: Sequence[dict | None], names: Sequence[str],
                 budget: Budget, repriced: bool, dense_bytes: float) -> pd.DataFrame:
    """One row per trial: trial, state, quality, test_quality, costs, compression_ratio, trained,
    stopped, feasible, reason, summary, and per-layer plan columns "<layer>.<field>". `trained`:
    fine-tuned to the end (COMPLETE); `stopped`: fine-tuned until a rung of --pruner, where it
    fell behind (PRUNED with "stopped_at"; its quality is the last rung's)."""
    rows = []
    for t, c in zip(trials, costs):
        a = t.user_attrs
        c = c or {}
        q = a.get("quality")
        if q is None and t.state == TrialState.COMPLETE and t.values:
            q = t.values[0]
        quality = math.nan if q is None else float(q)
        trained = t.state == TrialState.COMPLETE and math.isfinite(quality)
        stopped = is_stopped(t)
        cost = {k: float(c.get(k, math.nan)) for k in BUDGET_KEYS}
        over = broken_bounds(cost, budget)
        if repriced:
            feasible = trained and not over
            size_b = cost["size_kb"] * 1024
            ratio = dense_bytes / size_b if size_b > 0 else math.nan
        else:
            feasible = trained and bool(a.get("feasible", not over))
            ratio = float(a.get("compression_ratio") or math.nan)
        reason = a.get("fail_reason") or (("over budget: " + ", ".join(over)) if over else None) \
            or a.get("infeasible_reason") \
            or (f"stopped by the pruner at step {a[STOPPED_ATTR]}" if stopped else None) \
            or (None if trained else "not trained")
        test = a.get(TEST_ATTR)
        row = {"trial": t.number, "state": t.state.name, "quality": quality,
               "test_quality": float(test) if isinstance(test, (int, float)) and trained else math.nan, **cost,
               "compression_ratio": ratio, "trained": trained, "stopped": stopped, "feasible": feasible,
               "reason": reason or "", "summary": layer_summary(a["plan"], names)}
        ranks = a["plan"].get("rank") or [1.0] * len(names)  # plans stored before factorization: full rank
        forms = a["plan"].get("form") or ["svd"] * len(names)
        for i, n in enumerate(names):
            for k in PLAN_KEYS:
                row[f"{n}.{k}"] = a["plan"][k][i]
            row[f"{n}.rank"] = float(ranks[i])
            row[f"{n}.form"] = forms[i] if float(ranks[i]) < 1 else ""
        rows.append(row)
    return pd.DataFrame(rows).sort_values("trial", kind="stable").reset_index(drop=True)


def front_of(view: StudyView) -> pd.DataFrame:
    """The feasible Pareto front of a view, best quality first (ties: lower latency)."""
    asc = [view.directions[view.objectives.index("quality")] != "maximize"] if "quality" in view.objectives else [False]
    f = view.trials[view.trials["pareto"]]
    return f.sort_values(["quality", "latency_ms", "trial"], ascending=asc + [True, True]).reset_index(drop=True)


FRAME_COLUMNS = ("trial", "quality", "latency_ms", "memory_kb", "size_kb", "compression_ratio", "feasible", "test_quality")


def pareto_frame(study: optuna.Study, profile: str | None = None) -> pd.DataFrame:
    """The feasible Pareto front of `study` on `profile` (default: the study's own), best
    quality first: FRAME_COLUMNS and "plan" (per-layer lists); test_quality is NaN where unknown. The front `hwcompress search`
    prints, `search --json` and compress() return, and `hwcompress report` shows."""
    trials = study.get_trials(deepcopy=False)
    if not any(t.state == TrialState.COMPLETE for t in trials):
        return pd.DataFrame(columns=[*FRAME_COLUMNS, "plan"])
    front = read_study(study, profile).front
    plans = {t.number: t.user_attrs.get("plan") for t in trials}
    df = front[list(FRAME_COLUMNS)].copy()
    df["feasible"] = df["feasible"].astype(bool)
    df["plan"] = [plans[n] for n in df["trial"]]
    return df.reset_index(drop=True)


# ---------------------------------------------------------------- data for plots and tables

def heat_data(view: StudyView) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(weight bits, prune ratio) per layer (rows) for each front trial (columns, best quality first)."""
    f = view.front
    cols = [f"#{t}" for t in f["trial"]]
    bits = pd.DataFrame([[int(v) for v in f[f"{n}.weight_bits"]] for n in view.layer_names], index=list(view.layer_names), columns=cols)
    ratio = pd.DataFrame([[float(v) for v in f[f"{n}.ratio"]] for n in view.layer_names], index=list(view.layer_names), columns=cols)
    return bits, ratio


def rank_data(view: StudyView) -> tuple[pd.DataFrame, pd.DataFrame] | None:
    """(rank ratio, its label) per layer (rows) for each front trial (columns, as heat_data's),
    the label marking the form as the layers column does ("0.25s" spatial, "0.06k" Kronecker,
    "" unfactorized); None when no front plan factorizes a layer."""
    f = view.front
    names = list(view.layer_names)
    if f.empty or not names or f"{names[0]}.rank" not in f:
        return None
    cols = [f"#{t}" for t in f["trial"]]
    rank = pd.DataFrame([[float(v) for v in f[f"{n}.rank"]] for n in names], index=names, columns=cols)
    if not (rank.to_numpy() < 1).any():
        return None
    mark = {"spatial": "s", "kronecker": "k"}
    label = pd.DataFrame([[f"{r:.2f}{mark.get(str(fm), '')}" if r < 1 else "" for r, fm in zip(rank.loc[n], f[f"{n}.form"])]
                          for n in names], index=names, columns=cols)
    return rank, label


def sensitivity_frame(sens: dict[str, Any] | None) -> pd.DataFrame:
    """Study attr "sensitivity" -> rows (layer, probe, loss): the quality lost by each layer
    alone pruned to prune_ratio and alone at `bits`-bit weights (search.sensitivity)."""
    if not sens or "layers" not in sens:
        return pd.DataFrame(columns=["layer", "probe", "loss"])
    rows = []
    # a loss is a difference of two float32 metrics: rounding noise below this is no loss at all
    noise = ZERO_TOLERANCE * max(1.0, abs(float(sens.get("baseline") or 0.0)))
    for key, label in (("prune_loss", f"pruned {float(sens.get('prune_ratio', 0.5)):.0%}"),
                       ("bits_loss", f"{sens.get('bits', 4)}-bit weights")):
        for name, v in zip(sens["layers"], sens.get(key) or []):
            loss = math.nan if v is None else float(v)
            rows.append({"layer": name, "probe": label, "loss": 0.0 if abs(loss) < noise else loss})
    return pd.DataFrame(rows, columns=["layer", "probe", "loss"])


def cost_objectives(view: StudyView) -> list[str]:
    """The cost columns to plot quality against: the cost objectives, else size_kb."""
    return [o for o in view.objectives if o in BUDGET_KEYS] or ["size_kb"]


def counts(view: StudyView) -> dict[str, int]:
    """How many trials were priced, trained (to the end), stopped at a rung, feasible and on the front."""
    t = view.trials
    return {"trials": len(t), "trained": int(t["trained"].sum()), "stopped": int(t["stopped"].sum()),
            "feasible": int(t["feasible"].sum()), "front": int(t["pareto"].sum())}


def counts_line(c: dict[str, int]) -> str:
    """`counts` in words: "40 trials priced, 12 trained, 28 stopped at a rung, ..."; the stopped
    ones only where --pruner stopped some (a stopped trial is never on the front)."""
    stopped = f"{c['stopped']} stopped at a rung (--pruner), " if c["stopped"] else ""
    return (f"{c['trials']} trials priced, {c['trained']} trained, {stopped}{c['feasible']} feasible, "
            f"{c['front']} on the Pareto front")


# ---------------------------------------------------------------- the Pareto scatter's axes

@dataclass(frozen=True)
class ScatterAxis:
    """One cost axis of the Pareto scatter: limits that fit the points, and its budget."""

    cost: str  # the cost column, e.g. "latency_ms"
    label: str  # the axis title, e.g. "latency (ms)"
    lo: float  # the axis limits, in the cost's units (not log10 units, even when `log`)
    hi: float
    log: bool  # a log scale: the plotted values span more than LOG_SPAN times
    budget: float | None  # the bound on this cost (None: unbounded)
    budget_on_axis: bool  # True: the budget is drawn as a line; False: it would squeeze the points
    note: str  # "" or the sentence that says where an undrawn budget is


LOG_SPAN = 50.0  # largest / smallest plotted value above which an axis is log-scaled
BUDGET_REACH = 1.0  # a budget is drawn when it lies within this share of the points' span of them (they keep half the axis)
PAD = 0.06  # share of the span left free on either side of the points


def scatter_axes(view: StudyView) -> list[ScatterAxis]:
    """The x axes of the Pareto scatter, one per cost objective: they fit the trained trials
    and the dense baseline; a budget far outside them is not drawn but noted, so that no
    budget line squeezes every point against one edge."""
    t = view.trials[view.trials["trained"]]
    return [_axis(c, np.append(t[c].to_numpy(float), view.dense.get(c, math.nan)), view.budget.get(c))
            for c in cost_objectives(view)]


def _axis(cost_key: str, values: np.ndarray, budget: float | None) -> ScatterAxis:
    name, unit = COST_NAMES.get(cost_key, (cost_key, ""))
    v = values[np.isfinite(values)]
    if not len(v):  # nothing trained: the axis is the budget's
        v = np.array([0.0, budget if budget is not None and budget > 0 else 1.0])
    lo, hi = float(v.min()), float(v.max())
    log = lo > 0 and hi / lo > LOG_SPAN
    to, back = (math.log10, lambda x: 10.0 ** x) if log else (float, float)
    a, b = to(lo), to(hi)
    span = (b - a) or (0.2 if log else abs(b) * 0.2 or 1.0)
    on_axis, note = False, ""
    if budget is not None and math.isfinite(budget) and (budget > 0 or not log):
        x = to(budget)
        on_axis = a - BUDGET_REACH * span <= x <= b + BUDGET_REACH * span
        if on_axis:
            a, b = min(a, x), max(b, x)
            span = b - a
        elif x > b:
            note = (f"{name} budget {budget:g} {unit} is beyond the axis "
                    f"({budget / hi:.3g}x the largest {name} plotted)" if hi > 0 else
                    f"{name} budget {budget:g} {unit} is beyond the axis")
        else:
            note = f"{name} budget {budget:g} {unit} is below the axis (every point plotted is above it)"
    pad = PAD * span
    a, b = a - pad, b + pad
    if not log and lo > 0 and a < 0:
        a = 0.0  # costs are positive: the axis starts at 0 rather than below it
    return ScatterAxis(cost_key, f"{name} ({unit})" if unit else name, back(a), back(b), log, budget, on_axis, note)
