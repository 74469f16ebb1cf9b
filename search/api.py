"""The search as Python functions, in the manner of the Flax examples' `train_and_evaluate(
config, workdir)`: `search(spec, storage, results_dir)` runs (or resumes) the study a record
describes, and `compress()` builds the record for a user's own Flax model and returns the
Pareto front as a pandas DataFrame. `hwcompress search` builds its record with `make_spec`.
"""
from __future__ import annotations

import dataclasses
import functools
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import optuna
import pandas as pd

import models
from models.user import is_reference, load_reference, normalise
from hw_profiles import Budget, HardwareProfile
from models.task import Dataset, LossFn, MetricFn, Task
from search.compression import plan as P
from search.cost import budget as B
from search.cost.roofline import price
from search.engine.config import FinetuneConfig, check_k_and_loop
from search.engine.finetune import Engine
from search.errors import UserError
from search.report.view import pareto_frame
from search.study.context import SearchContext, load_context
from search.study.create import check_sampler, finished_count, layers_attr, metric_names, open_study
from search.study.loop import Claimant, NothingToDo, ask_batch, check_timeout, run_trials
from search.study.progress import SearchProgress, nothing_to_do
from search.study.pruning import default_pruner, make_pruner
from search.study.sensitivity import cached_sensitivity, warm_start_plans
from search.study.space import extreme_plans, plan_to_params, space_for_profile
from search.study.spec import (SPEC_ATTR, StudySpec, WeightsSource, check_study_name, profile_reference,
                               safe_study_name)
from search.study.storage import open_storage, study_lock
from search.study.xla_cache import use_compilation_cache

DEFAULT_OBJECTIVES = ("quality", "latency", "memory")


def make_spec(*, model: str, dataset: str | None, profile: str | Path | HardwareProfile,
              budget: Budget | Mapping[str, float | None] | None = None, data_dir: str | None = None,
              hparams: Mapping[str, Any] | None = None, seed: int = 0, weights: str | Path | None = None,
              objectives: Sequence[str] = DEFAULT_OBJECTIVES, sampler: str = "tpe",
              finetune: FinetuneConfig | None = None, n_trials: int = 40, pruner: str | None = None,
              rungs: Sequence[int] | None = None, factorize: bool = False) -> StudySpec:
    """The record of a search on a zoo model (models.list_models), or on the user's own model
    (`model` "path/file.py:build" or "package.module:build", models.user: its task brings its
    data set, so `dataset` is None or that data set's name), from what a user gives.

    `profile` is a shipped name, a TOML path or a HardwareProfile; `budget` replaces the
    profile's default bounds it names; `weights` is the user's own trained weights file
    (safetensors) in place of the cached baseline; `objectives` are command-line names
    (quality, latency, memory, size); `pruner` none | sha | hyperband at `rungs` (fine-tune
    steps; search.study.pruning), both None to keep a resumed study's or take the default;
    `factorize`: the space also offers each layer a rank ratio and a form (SVD, spatial SVD,
    Kronecker: search.compression.lowrank, search.study.space).
    Raises UserError (or a models/hw_profiles error) naming the first bad value.
    """
    if is_reference(model):
        if weights is not None or hparams:
            raise UserError(f"--model {model}: --weights and model options are for zoo models; return "
                            "(task, variables) from your builder to search your own trained weights")
        ref = normalise(model)
        task, _ = load_reference(ref)
        if dataset is not None and dataset != task.data.name:
            raise UserError(f"--dataset {dataset}: the model {model} brings its own data set "
                            f"{task.data.name!r}; leave --dataset out")
        return _spec(model=ref, dataset=task.data.name, data_dir=None, hparams={}, seed=seed, profile=profile,
                     budget=budget, weights=None, objectives=objectives, sampler=sampler, finetune=finetune,
                     n_trials=n_trials, pruner=pruner, rungs=rungs, factorize=factorize)
    if model.endswith(".py") or "/" in model:
        raise UserError(f"--model {model}: name the function that builds the task too, e.g. {model}:build")
    dataset = dataset or "digits"
    full_hparams = models.task_hparams(model, dataset, **dict(hparams or {}))
    return _spec(model=model, dataset=dataset, data_dir=data_dir, hparams=full_hparams, seed=seed, profile=profile,
                 budget=budget, weights=None if weights is None else WeightsSource.of(weights),
                 objectives=objectives, sampler=sampler, finetune=finetune, n_trials=n_trials, pruner=pruner,
                 rungs=rungs, factorize=factorize)


def _spec(*, profile: Any, budget: Any, objectives: Sequence[str], finetune: FinetuneConfig | None,
          sampler: str, n_trials: int, pruner: str | None = None, rungs: Sequence[int] | None = None,
          factorize: bool = False, **fields: Any) -> StudySpec:
    if n_trials < 1:
        raise UserError(f"--trials {n_trials} must be at least 1")
    prof, reference = profile_reference(profile)
    finetune = finetune if finetune is not None else FinetuneConfig()
    finetune.check()
    return StudySpec(profile=reference, profile_name=prof.name, budget=B.resolve_budget(prof, budget),
                     space=space_for_profile(prof, factorize), finetune=finetune, objectives=metric_names(objectives),
                     sampler=check_sampler(sampler), n_trials=int(n_trials),
                     pruner=make_pruner(pruner, rungs, finetune.steps), **fields)


def default_study_name(spec: StudySpec) -> str:
    """<model>-<dataset>-<profile>, the study name when none is given (for the user's own
    model, <file or module>-<function>: no path in a study name)."""
    model = spec.model
    if is_reference(model):
        target, _, func = model.rpartition(":")
        model = f"{Path(target).stem if target.endswith('.py') else target.rpartition('.')[2]}-{func}"
    return f"{model}-{spec.dataset}-{spec.profile_name}"


def search(
    spec: StudySpec,
    storage: str | optuna.storages.BaseStorage | None = None,
    results_dir: str | Path = "results",
    *,
    study_name: str | None = None,
    task: Task | None = None,
    params: Any = None,
    baseline: Mapping[str, Any] | None = None,
    engine: Engine | None = None,
    k: int | None = None,
    loop: str | None = None,
    batch: int | None = None,
    run: bool = True,
    warm_start: bool = True,
    progress: bool = False,
    timeout: float | None = None,
) -> optuna.Study:
    """Run (or resume) the study a record describes and return the Optuna study.

    `storage`: a URL (None: SQLite under results_dir, "memory": this process only) or an
    opened storage. The zoo task and its baseline are rebuilt from the record (trained once
    and cached under results_dir/cache, or the record's weights file); compress() passes its
    own `task`, `params` and `baseline` info instead. Before anything is trained the budget is
    checked against the smallest cost any plan reaches, and a resume against the stored record.
    `engine` replaces the Engine built from the record (e.g. one with another config); `k`
    plans per vmapped step and `loop` the step driver, "python" or "fused" (None: measured
    here); `batch` trials asked together; run=False
    only sets the study up (baseline, sensitivity, warm-start trials), e.g. for workers.
    `timeout`: seconds from this call (set-up included) after which no more trials are started
    (Optuna's optimize(timeout=...)); the trials in flight finish, and running the search again
    goes on toward spec.n_trials.

    Any number of searches and workers may run on one study at once: the first sets it up
    while the others wait, and every trial is claimed under the study lock
    (search.study.loop.claim_trials), so together they stop at spec.n_trials and each returns
    once no trial is left to run. A spec.n_trials at or below the trials already done runs
    nothing, keeps the study's stored trial budget and warns NothingToDo.
    """
    deadline = check_timeout(timeout)
    if batch is not None and batch < 1:
        raise UserError(f"--batch {batch} must be at least 1")
    check_k_and_loop(k, loop)
    # an unsafe name fails before any work, and the data before a study is stored
    name = check_study_name(study_name) if study_name is not None else safe_study_name(default_study_name(spec))
    ctx = load_context(spec, results_dir, task=task, params=params, baseline=baseline)
    ctx.task.check(spec.finetune.batch_size if spec.finetune.steps else None, params)
    extremes = extreme_plans(len(ctx.layers), spec.space)
    min_costs = B.check_reachable(ctx.profile, ctx.layers, spec.budget, extremes)
    # once the input is checked (bad input writes nothing), before the engine compiles: a warm
    # start loads its XLA programs from results_dir/cache/xla
    use_compilation_cache(results_dir)
    if not isinstance(storage, optuna.storages.BaseStorage):
        storage = open_storage(storage, results_dir)
    if spec.weights is not None:  # a bad or changed weights file fails before the study exists
        _ = ctx.baseline
    sctx = None
    # a second search started at once waits here until the first has created and set up the study
    with study_lock(storage, name):
        study, done, stored, spec = _open(name, storage, spec)
        ctx.spec = spec  # the record as opened: a resume keeps the study's pruner and rungs
        claimant = Claimant(spec, joined=len(study.get_trials(deepcopy=False)))  # what the sampler was seeded with
        if "baseline" not in study.user_attrs:  # new, or interrupted before it was set up
            # the baseline is trained (or read) only now: a conflicting resume has failed before
            sctx = SearchContext(ctx, engine if engine is not None else ctx.engine(k=k, loop=loop))
            seeds = functools.partial(B.seed_plans, ctx.profile, ctx.layers, spec.budget, extremes,
                                      ratio_step=spec.space.ratio_step)
            _initialize(study, sctx, min_costs, seeds, warm_start)
    if done >= spec.n_trials:
        warnings.warn(NothingToDo(nothing_to_do(name, done, spec.n_trials, stored)), stacklevel=2)
    if not run:
        return study
    sctx = sctx or SearchContext(ctx, engine if engine is not None else ctx.engine(k=k, loop=loop))
    bar = SearchProgress(spec.n_trials, enabled=progress, metric_name=ctx.task.metric_name)
    try:
        run_trials(study, storage, sctx, claimant, spec.n_trials, ask_batch(sctx.engine.k, batch), progress=bar,
                   deadline=deadline)
    finally:
        bar.close()
    return study


def _open(name: str, storage: optuna.storages.BaseStorage, spec: StudySpec
          ) -> tuple[optuna.Study, int, int, StudySpec]:
    """open_study (create, or resume and check the record) under the study lock; returns
    (study, trials done, the stored trial budget, `spec` with its pruner chosen). A resume may
    raise the trial budget or lower it to no fewer than the trials done; asking for no more
    than are done keeps the stored one. A record with no pruner chosen takes the study's on a
    resume (its rungs stay), the default (search.study.pruning.default_pruner) for a new study."""
    try:
        existing = optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        existing = None
    stored = None if existing is None or existing.user_attrs.get(SPEC_ATTR) is None else StudySpec.of_study(existing)
    if spec.pruner is None:
        spec = dataclasses.replace(spec, pruner=stored.pruner if stored else default_pruner(spec.finetune.steps))
    if existing is None:
        return open_study(name, storage, spec)[0], 0, spec.n_trials, spec
    done = finished_count(existing.get_trials(deepcopy=False))
    budget = stored.n_trials if stored is not None and spec.n_trials <= done else spec.n_trials
    return open_study(name, storage, dataclasses.replace(spec, n_trials=budget))[0], done, budget, spec


def _priced_warm_starts(ctx: SearchContext, plans: list[P.Plan]) -> list[P.Plan]:
    """The warm-start plans without a factorized one (search.study.sensitivity.
    factorized_warm_start, the second) that the profile prices no cheaper than its unfactorized
    twin (the first, uniform int8) on any of the study's cost objectives: it would only lose
    quality (a DemosaicNet on mobile-npu: two kernels per conv cost more latency and memory)."""
    if not ctx.space.factorize or len(plans) < 2 or not np.any(np.asarray(plans[1].rank) < 1):
        return plans
    keys = [k for k in ctx.objectives if k != "quality"]
    costs = price(ctx.profile, ctx.layers, P.stack_plans(plans[:2]))
    cheaper = any(float(np.asarray(getattr(costs, k))[1]) < float(np.asarray(getattr(costs, k))[0]) for k in keys)
    return plans if cheaper else plans[:1] + plans[2:]


def _initialize(study: optuna.Study, ctx: SearchContext, min_costs: dict[str, float],
                seeds: Callable[[P.Plan | None], list[P.Plan]], warm: bool) -> None:
    """New study: store layers, baseline and sensitivity; enqueue the budget's seed plans
    (`seeds(warm-start plans)`, search.cost.budget.seed_plans), then the warm-start trials."""
    info = dict(ctx.study.baseline)
    if info.get("val_metric") is None:
        dense = P.stack_plans([P.dense_plan(len(ctx.layers))])
        info["val_metric"] = float(np.asarray(ctx.engine.evaluate(dense, split="val").metric)[0])
    study.set_user_attr("layers", layers_attr(ctx.layers))
    study.set_user_attr("min_costs", min_costs)
    sens, warm_plans = None, []
    if warm and "sensitivity" not in study.user_attrs:
        sens = cached_sensitivity(ctx.engine, ctx.layers, float(info["val_metric"]),
                                  Path(ctx.study.results_dir, "cache"), info.get("cache_key"))
        warm_plans = _priced_warm_starts(ctx, warm_start_plans(sens, ctx.layers, ctx.space))
    if not study.get_trials(deepcopy=False):  # a set-up interrupted after enqueueing does not enqueue twice
        for plan in seeds(P.stack_plans(warm_plans) if warm_plans else None):
            study.enqueue_trial(plan_to_params(plan, ctx.layers, ctx.space), user_attrs={"budget_seed": True})
    if sens is not None:
        study.set_user_attr("sensitivity", sens)
        for plan in warm_plans:
            study.enqueue_trial(plan_to_params(plan, ctx.layers, ctx.space), user_attrs={"warm_start": True})
    # set last: its presence means the study is fully set up (an interrupt before it redoes the above)
    study.set_user_attr(
        "baseline",
        {
            "metric_name": ctx.study.task.metric_name,
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
    profile: str | Path | HardwareProfile,
    budget: Budget | Mapping[str, float | None] | None = None,
    *,
    metric_name: str = "quality",
    n_trials: int = 40,
    batch: int | None = None,
    objectives: Sequence[str] = DEFAULT_OBJECTIVES,
    sampler: str = "tpe",
    pruner: str | None = None,
    finetune_steps: int | None = None,
    finetune_batch_size: int | None = None,
    distill: bool = False,
    pruning: str = "one-shot",
    act_ranges: str = "calibrated",
    k: int | None = None,
    loop: str | None = None,
    seed: int = 0,
    study_name: str | None = None,
    storage: str | optuna.storages.BaseStorage = "memory",
    results_dir: str = "results",
    progress: bool = False,
    apply_kwargs: Mapping[str, Any] | None = None,
    factorize: bool = False,
) -> pd.DataFrame:
    """Search compressed versions of your own Flax model; returns the Pareto front.

    `module` is a Linen module with `params` its trained variables (`module.init`'s dict:
    params and any other collections such as batch_stats, or the bare params), or an NNX
    module (params None: its own weights, run in eval mode). Only params are compressed and
    fine-tuned; other collections are used as they are. `apply_kwargs` are the call
    arguments of an evaluation (e.g. {"train": False} for BatchNorm on running statistics,
    {"deterministic": True} for Dropout off). `loss(outputs, targets)` a scalar, `metric(outputs,
    targets)` a per-example quality (higher is better); `profile` a shipped name, a TOML path
    or a HardwareProfile; `budget` a dict such as {"latency_ms": 1.0} (profile defaults
    otherwise). The study lives in memory unless `storage` is a URL (then it resumes).
    `k`: plans fine-tuned together in one vmapped step, `loop`: "python" or "fused" steps
    (None: the fastest measured here).
    `pruner`: none | sha | hyperband (search.study.pruning; None: the default).
    `finetune_steps`, `finetune_batch_size`: each candidate's fine-tuning (None: FinetuneConfig's
    defaults, 200 steps of 128 examples; the batch may not exceed the training split).
    `pruning`: "one-shot" or "gradual" (search.engine.schedule: Zhu & Gupta's cubic ramp).
    `act_ranges`: "calibrated" or "learned" (LSQ: quant.fake_quant_act_learned).
    `factorize`: also a rank ratio per layer (low-rank SVD, search.compression.lowrank).
    Columns of the front: trial, quality, latency_ms, memory_kb, size_kb, compression_ratio,
    feasible, plan (per-layer lists), test_quality (the test split's, shown, never ranked on).
    """
    task = Task(name=f"custom-{type(module).__name__.lower()}", module=module, data=data, loss=loss,
                metric=metric, metric_name=metric_name, eval_kwargs=dict(apply_kwargs or {}))
    ft = FinetuneConfig(seed=seed, distill=distill, pruning=pruning, act_ranges=act_ranges)
    if finetune_steps is not None:
        ft = dataclasses.replace(ft, steps=int(finetune_steps))
    if finetune_batch_size is not None:
        ft = dataclasses.replace(ft, batch_size=int(finetune_batch_size))
    spec = _spec(model=task.name, dataset=data.name, seed=seed, profile=profile, budget=budget,
                 objectives=objectives, sampler=sampler, finetune=ft, n_trials=n_trials, pruner=pruner,
                 factorize=factorize)
    study = search(spec, storage, results_dir, study_name=study_name, task=task, params=params, k=k,
                   loop=loop, batch=batch, progress=progress)
    return pareto_frame(study)


