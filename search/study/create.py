"""Create or resume a study from its record: objectives, sampler, the resume check, and the
count of trials that use up the study's trial budget."""
from __future__ import annotations

import warnings
from dataclasses import asdict
from typing import Any, Mapping, Sequence

import optuna
from optuna.trial import FrozenTrial, TrialState

from search.compression.groups import group_members
from search.compression.layers import Layer
from search.errors import UserError
from search.study.spec import SPEC_ATTR, StudySpec, jsonable

# objective name on the command line -> (metric name in the study, direction)
OBJECTIVES = {
    "quality": ("quality", "maximize"),
    "latency": ("latency_ms", "minimize"),
    "memory": ("memory_kb", "minimize"),
    "size": ("size_kb", "minimize"),
}
DIRECTIONS = {name: direction for name, direction in OBJECTIVES.values()}  # metric name -> direction
SAMPLERS = ("tpe", "nsga2", "random")


def metric_names(objectives: Sequence[str]) -> tuple[str, ...]:
    """Study metric names for command-line objective names (or metric names); UserError on typos."""
    names: list[str] = []
    by_metric = {name: name for name, _ in OBJECTIVES.values()}
    for o in objectives:
        key = o.strip().lower()
        name = OBJECTIVES[key][0] if key in OBJECTIVES else by_metric.get(key)
        if name is None:
            raise UserError(
                f"unknown objective {o!r}; choose from {', '.join(OBJECTIVES)} (e.g. --objectives quality,latency,memory)"
            )
        if name in names:
            raise UserError(f"objective {o!r} is given twice in --objectives; list each once")
        names.append(name)
    if "quality" not in names:
        raise UserError("--objectives must include quality, e.g. --objectives quality,latency")
    return tuple(names)


def check_sampler(name: str) -> str:
    """The sampler name, or UserError listing the known ones."""
    if name not in SAMPLERS:
        raise UserError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    return name


def make_sampler(name: str, seed: int, n_existing: int = 0) -> optuna.samplers.BaseSampler:
    """A seeded sampler; the seed moves with the trials already done so a resume never repeats."""
    s = None if seed is None else int(seed) + 7919 * int(n_existing)
    if check_sampler(name) == "tpe":
        with warnings.catch_warnings():  # multivariate and constant_liar are "experimental"
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.TPESampler(seed=s, multivariate=True, constant_liar=True, n_startup_trials=10)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=s, population_size=20)
    return optuna.samplers.RandomSampler(seed=s)


def check_resume(stored: StudySpec, new: StudySpec, study_name: str) -> None:
    """Raise UserError naming the first field where a resumed run disagrees with the study."""
    d = stored.first_difference(new)
    if d:
        key, old, want = d
        flag = RESUME_FLAGS.get(key, RESUME_FLAGS["space"] if key.startswith("space.") else None)
        raise UserError(
            f"study {study_name!r} was created with {key}={old!r} but this run asks for {key}={want!r}"
            + (f" ({flag})" if flag else "") + "; use the same value to resume, or a new --study name"
        )


# the command-line flag behind a study record's field, named in a resume mismatch
RESUME_FLAGS = {"space.ranks": "--factorize", "space.forms": "--factorize",
                "space": "the search space: the profile's choices and --factorize"}


def open_study(name: str, storage: optuna.storages.BaseStorage, spec: StudySpec) -> tuple[optuna.Study, bool]:
    """Create the study of a record, or load it and check its record; returns (study, resumed).

    A resume may change only the trial budget (n_trials), which it stores.
    """
    directions = [DIRECTIONS[n] for n in spec.objectives]
    try:
        existing = optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        existing = None
    if existing is not None:
        stored = existing.user_attrs.get(SPEC_ATTR)
        if stored is not None:
            check_resume(StudySpec.from_attrs(stored, name), spec, name)
        want = [optuna.study.StudyDirection[d.upper()] for d in directions]
        if list(existing.directions) != want:
            raise UserError(f"study {name!r} has other objectives than {list(spec.objectives)}; use a new --study name")
        n = len(existing.get_trials(deepcopy=False))
        study = optuna.load_study(study_name=name, storage=storage, sampler=make_sampler(spec.sampler, spec.seed, n))
        study.set_user_attr(SPEC_ATTR, {**(stored or spec.to_attrs()), "n_trials": spec.n_trials})
        return study, True
    study = optuna.create_study(
        study_name=name, storage=storage, directions=directions, sampler=make_sampler(spec.sampler, spec.seed, 0)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(list(spec.objectives))
    study.set_user_attr(SPEC_ATTR, spec.to_attrs())
    return study, False


def finished_count(trials: Sequence[FrozenTrial]) -> int:
    """Trials that count toward --trials: complete, infeasible (PRUNED) or failed with a reason.

    Trials failed by an interrupt or by a dead worker (retried by the heartbeat callback)
    are not counted: their work is done again.
    """
    n = 0
    for t in trials:
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED):
            n += 1
        elif t.state == TrialState.FAIL and t.user_attrs.get("fail_reason") and not t.user_attrs.get("interrupted"):
            n += 1
    return n


def layers_attr(layers: Sequence[Layer]) -> list[dict[str, Any]]:
    """Layers as JSON-able dicts for the study attr "layers"."""
    return [jsonable(asdict(layer)) for layer in layers]


def layers_from_attr(attr: Sequence[Mapping[str, Any]]) -> tuple[Layer, ...]:
    """The inverse of layers_attr (a study stored before the channel groups existed gives
    layers that stand alone and read their inputs in full)."""
    tuples = ("path", "kernel_shape", "in_shape", "out_shape")
    return tuple(Layer(**{**d, **{k: tuple(d[k]) for k in tuples},
                          "reads": tuple(tuple(r) for r in d.get("reads") or ()),
                          "norms": tuple(tuple(n) for n in d.get("norms") or ())}) for d in attr)


def channel_groups(layers: Sequence[Layer]) -> list[str]:
    """One line per channel group of several layers and per layer whose channels are kept
    whole, e.g. "stem + b1/conv2: one pruning decision" or "fc: channels kept (the model's output)"."""
    out = []
    for members in group_members(layers).values():
        names = " + ".join(layers[i].name for i in members)
        fixed = layers[members[0]].fixed  # the same for every member of a group
        if fixed is not None:
            out.append(f"{names}: channels kept ({fixed})")
        elif len(members) > 1:
            out.append(f"{names}: one pruning decision (coupled channels)")
    return out
