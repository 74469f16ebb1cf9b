"""The search as a Python function: a Flax model, its data, a profile and a budget in, the
Pareto front out as a pandas DataFrame. `hwcompress search` and `compress()` both end in
`search_task`, which prices, warm-starts and runs the Optuna study.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import flax.linen as nn
import optuna
import pandas as pd

from models.task import Dataset, LossFn, MetricFn, Task
from search import plan as P
from search.errors import UserError
from search.progress import SearchProgress
from search.sensitivity import measure_sensitivity, warm_start_plans
from search.space import extreme_plans, plan_to_params, space_for_profile
from search.study import (
    BUDGET_KEYS,
    SearchContext,
    ask_batch,
    layers_attr,
    metric_names,
    open_study,
    run_trials,
)

DEFAULT_OBJECTIVES = ("quality", "latency", "memory")
FRONT_COLUMNS = ("trial", "quality", "latency_ms", "memory_kb", "size_kb", "compression_ratio", "feasible")


def open_storage(url: str | None, results_dir: str = "results") -> Any:
    """The study storage (search.storage.open_storage); "memory" keeps the study in memory."""
    if url == "memory":
        return optuna.storages.InMemoryStorage()
    from search.storage import open_storage as _open

    return _open(url, results_dir=results_dir)


def load_profile(profile: Any) -> tuple[Any, str, str | None]:
    """(profile object, name, TOML text when it is not a shipped profile) from a name, path or object."""
    import hw_profiles

    if isinstance(profile, str):
        obj = hw_profiles.load_profile(profile)
        toml_text = None
        if profile not in set(hw_profiles.list_profiles()):
            with open(profile, encoding="utf-8") as f:
                toml_text = f.read()
        return obj, obj.name, toml_text
    return profile, profile.name, None


def resolve_budget(profile: Any, budget: Any = None, **overrides: float | None) -> dict[str, float | None]:
    """Budget dict: the profile's defaults, replaced by `budget` (dict or Budget), then by overrides."""
    out = {k: None for k in BUDGET_KEYS}
    base = getattr(profile, "budget", None)
    for src in (base, budget):
        if src is None:
            continue
        for k in BUDGET_KEYS:
            v = src.get(k) if isinstance(src, dict) else getattr(src, k, None)
            if v is not None or (isinstance(src, dict) and k in src):
                out[k] = v
    for k, v in overrides.items():
        if v is not None:
            out[k] = v
    for k, v in out.items():
        if v is not None and not (float(v) > 0):
            raise UserError(f"budget {k}={v} must be a positive number (or leave it out for no bound)")
        out[k] = None if v is None else float(v)
    return out


def check_budget_reachable(ctx: SearchContext) -> dict[str, float]:
    """Raise UserError before any training when even the most compressed plan breaks a budget.

    Returns the smallest achievable latency, memory and size on the target profile.
    """
    from search.study import _price

    plans = extreme_plans(len(ctx.layers), ctx.space)
    target, _ = _price(ctx, plans)
    best = {k: float(np.min(np.asarray(getattr(target, k)))) for k in BUDGET_KEYS}
    broken = [k for k in BUDGET_KEYS if ctx.budget.get(k) is not None and best[k] > ctx.budget[k]]
    if broken:
        want = ", ".join(f"{k} <= {ctx.budget[k]:.4g}" for k in broken)
        can = ", ".join(f"{k} {best[k]:.4g}" for k in broken)
        flags = " ".join(f"--{k.replace('_', '-')} {best[k] * 1.05:.4g}" for k in broken)
        raise UserError(
            f"budget cannot be met on {ctx.profile_name}: {want} asked, but the most compressed plan "
            f"reaches only {can}; relax it (e.g. {flags})"
        )
    return best


def pareto_frame(study: optuna.Study) -> pd.DataFrame:
    """The feasible Pareto front as a DataFrame, best quality first, with the per-layer plan:
    the front `hwcompress report` shows (search.report.read_study), on the study's own profile."""
    from search.report import read_study

    trials = study.get_trials(deepcopy=False)
    if not any(t.state == optuna.trial.TrialState.COMPLETE for t in trials):
        return pd.DataFrame(columns=[*FRONT_COLUMNS, "plan"])
    front = read_study(study).front
    plans = {t.number: t.user_attrs.get("plan") for t in trials}
    df = front[list(FRONT_COLUMNS)].copy()
    df["feasible"] = df["feasible"].astype(bool)
    df["plan"] = [plans[n] for n in df["trial"]]
    return df.reset_index(drop=True)


def search_task(
    task: Task,
    *,
    profile: Any,
    budget: Any = None,
    base_params: Any = None,
    train: bool = True,
    weights: str | None = None,
    run: bool = True,
    engine: Any = None,
    baseline_info: dict[str, Any] | None = None,
    spec: dict[str, Any] | None = None,
    n_trials: int = 40,
    batch: int | None = None,
    objectives: Sequence[str] = DEFAULT_OBJECTIVES,
    sampler: str = "tpe",
    study_name: str | None = None,
    storage: Any = None,
    seed: int = 0,
    finetune: Any = None,
    warm_start: bool = True,
    progress: bool = False,
    results_dir: str = "results",
) -> optuna.Study:
    """Run (or resume) a search on a task and return the Optuna study.

    With train=True the zoo baseline is trained (or read from the cache) first; otherwise
    base_params are the user's trained weights (None for an NNX module: its own weights).
    `weights` is a safetensors file of the user's own trained weights for a zoo task (in
    place of the cached baseline). With run=False the study is only set up (baseline,
    sensitivity, warm-start trials), e.g. for workers to run it.
    The budget is checked against the most compressed plan before anything is trained.
    `engine` replaces the Engine built from the task (e.g. one with another config).
    """
    from search.engine import Engine, FinetuneConfig
    from search.k_file import k_file_in
    from search.layers import discover_layers

    if n_trials < 1:
        raise UserError(f"--trials {n_trials} must be at least 1")
    if batch is not None and batch < 1:
        raise UserError(f"--batch {batch} must be at least 1")
    names, directions = metric_names(objectives)
    prof, prof_name, prof_toml = load_profile(profile)
    space = space_for_profile(prof)
    sample = np.asarray(task.data.x_train[:1])
    probe_params = base_params
    if probe_params is None and isinstance(task.module, nn.Module):
        probe_params = task.init_params()
    layers = tuple(discover_layers(task.module, probe_params, sample))
    budget_d = resolve_budget(prof, budget)
    dense_bytes = int(sum(layer.params for layer in layers) * 4)
    ctx = SearchContext(None, layers, prof, prof_name, budget_d, tuple(names), space, dense_bytes)
    min_costs = check_budget_reachable(ctx)

    finetune = finetune if finetune is not None else FinetuneConfig()
    if not isinstance(storage, optuna.storages.BaseStorage):
        storage = open_storage(storage, results_dir)
    full_spec = {
        **(spec or {}),
        "seed": seed,
        "profile": prof_toml if prof_toml is not None else prof_name,
        "profile_name": prof_name,
        "budget": budget_d,
        # K is how this machine runs the trials, not what the study is: a study resumes, and
        # its workers run, with whatever K they are given or measure
        "finetune": {**dataclasses.asdict(finetune), "k": None},
        "objectives": names,
        "n_trials": n_trials,
        "sampler": sampler,
        "space": space.to_dict(),
    }
    if weights is not None:  # checked before the study exists: a bad file leaves no trace
        from models.train import user_baseline

        base_params, baseline_info = user_baseline(task, weights)
        full_spec["weights"] = {"path": str(Path(weights).resolve()), "sha256": baseline_info["sha256"]}
    name = study_name or f"{full_spec.get('model', task.name)}-{task.data.name}-{prof_name}"
    study, _ = open_study(name, storage, full_spec, directions, names, sampler, seed)
    if train and weights is None:  # after the spec check: a conflicting resume fails before any training
        from models.train import train_baseline

        base_params, baseline_info = train_baseline(task, cache_dir=f"{results_dir}/cache")
    ctx.engine = engine if engine is not None else Engine(task, base_params, finetune, k_file=k_file_in(results_dir))
    if "baseline" not in study.user_attrs:  # new, or interrupted before it was set up
        _initialize(study, ctx, task, baseline_info, min_costs, warm_start)
    if not run:
        return study
    k = ask_batch(getattr(ctx.engine, "k", None), batch)
    bar = SearchProgress(n_trials, enabled=progress, metric_name=task.metric_name)
    try:
        run_trials(study, ctx, n_trials, k, bar)
    finally:
        bar.close()
    return study


def _initialize(study: optuna.Study, ctx: SearchContext, task: Task, info: dict | None, min_costs: dict, warm: bool) -> None:
    """New study: store layers, baseline and sensitivity; enqueue the warm-start trials."""
    info = dict(info or {})
    if info.get("val_metric") is None:
        dense = P.stack_plans([P.dense_plan(len(ctx.layers))])
        res = ctx.engine.evaluate(dense, split="val")
        info["val_metric"] = float(np.asarray(getattr(res, "metric", res))[0])
    study.set_user_attr("layers", layers_attr(ctx.layers))
    study.set_user_attr("min_costs", min_costs)
    if warm and "sensitivity" not in study.user_attrs:
        sens = measure_sensitivity(ctx.engine, ctx.layers, float(info["val_metric"]))
        study.set_user_attr("sensitivity", sens)
        for plan in warm_start_plans(sens, ctx.layers, ctx.space):
            study.enqueue_trial(plan_to_params(plan, ctx.layers, ctx.space), user_attrs={"warm_start": True})
    # set last: its presence means the study is fully set up (an interrupt before it redoes the above)
    study.set_user_attr(
        "baseline",
        {
            "metric_name": task.metric_name,
            "val_metric": info.get("val_metric"),
            "test_metric": info.get("test_metric"),
            "cache_key": info.get("cache_key"),
            "dense_bytes": ctx.dense_bytes,
            "dense_size_kb": ctx.dense_bytes / 1024,
        },
    )


def compress(
    module: Any,
    params: Any,
    data: Dataset,
    loss: LossFn,
    metric: MetricFn,
    profile: Any,
    budget: Any = None,
    *,
    metric_name: str = "quality",
    n_trials: int = 40,
    batch: int | None = None,
    objectives: Sequence[str] = DEFAULT_OBJECTIVES,
    sampler: str = "tpe",
    finetune_steps: int | None = None,
    distill: bool = False,
    k: int | None = None,
    seed: int = 0,
    study_name: str | None = None,
    storage: Any = "memory",
    results_dir: str = "results",
    progress: bool = False,
) -> pd.DataFrame:
    """Search compressed versions of your own Flax model; returns the Pareto front.

    `module` is a Linen module with `params` its trained weights, or an NNX module (params
    None: its own weights are used); `loss(outputs, targets)` a scalar, `metric(outputs,
    targets)` a per-example quality (higher is better); `profile` a shipped name, a TOML path
    or a HardwareProfile; `budget` a dict such as {"latency_ms": 1.0} (profile defaults
    otherwise). The study lives in memory unless `storage` is a URL (then it resumes).
    `k`: plans fine-tuned together in one vmapped step (None: the fastest measured here).
    """
    from search.engine import FinetuneConfig

    task = Task(
        name=f"custom-{type(module).__name__.lower()}",
        module=module,
        data=data,
        loss=loss,
        metric=metric,
        metric_name=metric_name,
    )
    ft = FinetuneConfig(seed=seed, distill=distill, k=k)
    if finetune_steps is not None:
        ft = dataclasses.replace(ft, steps=int(finetune_steps))
    spec = {"model": task.name, "dataset": data.name, "data_dir": None, "hparams": {}}
    study = search_task(
        task,
        profile=profile,
        budget=budget,
        base_params=params,
        train=False,
        spec=spec,
        n_trials=n_trials,
        batch=batch,
        objectives=objectives,
        sampler=sampler,
        study_name=study_name,
        storage=storage,
        seed=seed,
        finetune=ft,
        progress=progress,
        results_dir=results_dir,
    )
    return pareto_frame(study)
