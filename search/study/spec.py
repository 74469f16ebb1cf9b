"""The study record: everything a study stores about itself, as one frozen value.

`hwcompress search`, `compress()`, workers, export, report and `studies` all read a study's
record through `StudySpec.from_attrs(study.user_attrs["spec"])` and write it with
`to_attrs()`; nothing else reads the stored dict by key. Studies written before the record
had a schema number are schema 1 (the same keys), so they still open.
"""
from __future__ import annotations

import dataclasses
import os
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import optuna

import hw_profiles
from hw_profiles import Budget, HardwareProfile
from models.train import file_sha256
from search.cost.budget import as_budget, budget_dict
from search.engine.config import FinetuneConfig
from search.errors import UserError
from search.study.pruning import PrunerConfig, make_pruner
from search.study.space import Space

SCHEMA = 1  # the record's format; a newer number than this one is refused with how to upgrade
SPEC_ATTR = "spec"  # the study user attr that holds the record
# the trial user attr holding the test metric of a trained plan, measured right after its
# fine-tuning (the weights exist only then, search.study.loop); displayed, never ranked on
TEST_ATTR = "test_quality"
RESUME_MAY_CHANGE = ("n_trials",)  # fields a resumed run may change (the trial budget)
# the order differences are reported in (the rest follow, sorted)
FIELD_ORDER = ("model", "dataset", "data_dir", "hparams", "seed", "weights", "profile", "profile_name",
               "budget", "objectives", "sampler", "finetune", "pruner", "space")


@dataclass(frozen=True, kw_only=True)
class WeightsSource:
    """The user's own trained weights a study was started from (in place of the zoo baseline)."""

    # absolute path of the safetensors file; every worker and export reads the same path
    path: str
    # hex SHA-256 of the file, so a worker or export with another file refuses to run
    sha256: str

    @classmethod
    def of(cls, path: str | Path) -> WeightsSource:
        """The source of a weights file; UserError when it cannot be read."""
        try:
            digest = file_sha256(path)
        except OSError as e:
            raise UserError(f"--weights {path}: cannot read it ({e.strerror or e}); "
                            "give the safetensors file `hwcompress train` saves") from None
        return cls(path=str(Path(path).resolve()), sha256=digest)


@dataclass(frozen=True, kw_only=True)
class StudySpec:
    """What a study is: model and data, weights, device and budget, search space, fine-tuning,
    objectives, sampler and trial budget. Frozen; `dataclasses.replace` makes a changed copy."""

    # zoo model name (models.list_models), the user's builder "path/file.py:build" or
    # "package.module:build" (models.user), or "custom-<class>" for a model given to compress()
    model: str
    # data set name (models.list_datasets), or the Dataset's own name for compress()
    dataset: str
    # where the data set lives when not the default
    data_dir: str | None = None
    # model hyper-parameters, as models.get_task takes them
    hparams: Mapping[str, Any] = field(default_factory=dict)
    # data split, sampler and fine-tuning seed
    seed: int = 0
    # the user's own trained weights; None: the cached zoo baseline (or compress()'s params)
    weights: WeightsSource | None = None
    # a shipped profile's name, or the TOML text of the user's profile (parsed, never executed)
    profile: str
    # the profile's name: the key of its costs in every trial's "costs"
    profile_name: str
    # bounds on the target profile; None = unbounded
    budget: Budget = field(default_factory=Budget)
    # per-layer choices offered to the sampler
    space: Space
    # how each candidate is fine-tuned; k is always None here: K belongs to the machine
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    # rungs and successive halving (search.study.pruning); None: not chosen, so a resume keeps
    # the study's and a new study stores the default (search.api); a stored None (a record
    # older than rungs) runs every trial to the full budget, as it always did
    pruner: PrunerConfig | None = None
    # study metric names, e.g. ("quality", "latency_ms", "memory_kb")
    objectives: tuple[str, ...] = ("quality", "latency_ms", "memory_kb")
    # Optuna sampler name: tpe | nsga2 | random
    sampler: str = "tpe"
    # the study's total trial budget (complete + infeasible + failed with a reason)
    n_trials: int = 40
    # format of the stored record
    schema: int = SCHEMA

    def __post_init__(self) -> None:
        object.__setattr__(self, "hparams", jsonable(dict(self.hparams)))  # as storage gives it back
        if self.finetune.k is not None or self.finetune.loop is not None:
            # K vmapped plans and the loop driver are how a machine runs, not what the study is
            object.__setattr__(self, "finetune", dataclasses.replace(self.finetune, k=None, loop=None))
        if self.pruner is not None and self.pruner.kind != "none":  # every rung below the fine-tune's steps
            make_pruner(self.pruner.kind, self.pruner.rungs, self.finetune.steps)

    # ------------------------------------------------------------- storage form
    def to_attrs(self) -> dict[str, Any]:
        """The JSON-able dict stored as the study's "spec" user attr."""
        return jsonable({
            "schema": self.schema, "model": self.model, "dataset": self.dataset, "data_dir": self.data_dir,
            "hparams": dict(self.hparams), "seed": self.seed,
            "weights": None if self.weights is None else dataclasses.asdict(self.weights),
            "profile": self.profile, "profile_name": self.profile_name, "budget": budget_dict(self.budget),
            "space": self.space.to_dict(), "finetune": dataclasses.asdict(self.finetune),
            "pruner": None if self.pruner is None else self.pruner.to_dict(),
            "objectives": list(self.objectives), "sampler": self.sampler, "n_trials": self.n_trials,
        })

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any] | None, study_name: str = "?") -> StudySpec:
        """The record of a stored "spec" dict; UserError when it is missing, newer or broken."""
        if not isinstance(attrs, Mapping) or "model" not in attrs:
            raise UserError(f"study {study_name!r} has no search spec (it was not started by `hwcompress "
                            "search`): start it with `hwcompress search --study NAME` first")
        schema = int(attrs.get("schema", 1))
        if schema > SCHEMA:
            raise UserError(f"study {study_name!r} was written by a newer hwcompress (record schema {schema}, "
                            f"this version reads up to {SCHEMA}): upgrade hwcompress to open it")
        try:
            ft_fields = {f.name for f in dataclasses.fields(FinetuneConfig)}
            profile = str(attrs["profile"])
            weights = attrs.get("weights")
            return cls(
                model=str(attrs["model"]), dataset=str(attrs["dataset"]), data_dir=attrs.get("data_dir"),
                hparams=dict(attrs.get("hparams") or {}), seed=int(attrs.get("seed", 0)),
                weights=WeightsSource(path=str(weights["path"]), sha256=str(weights["sha256"])) if weights else None,
                profile=profile, profile_name=str(attrs.get("profile_name") or profile),
                budget=as_budget(attrs.get("budget")), space=Space.from_dict(attrs["space"]),
                finetune=FinetuneConfig(**{k: v for k, v in (attrs.get("finetune") or {}).items() if k in ft_fields}),
                pruner=None if attrs.get("pruner") is None else PrunerConfig.from_dict(attrs["pruner"]),
                objectives=tuple(attrs.get("objectives") or ("quality", "latency_ms", "memory_kb")),
                sampler=str(attrs.get("sampler", "tpe")), n_trials=int(attrs.get("n_trials", 0)), schema=schema,
            )
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"study {study_name!r} has a broken search spec ({type(e).__name__}: {e}); "
                            "start a new study with `hwcompress search --study NEW_NAME`") from None

    @classmethod
    def of_study(cls, study: optuna.Study) -> StudySpec:
        """The record of a stored study."""
        return cls.from_attrs(study.user_attrs.get(SPEC_ATTR), study.study_name)

    # ------------------------------------------------------------- what it refers to
    def hardware_profile(self) -> HardwareProfile:
        """The target profile: a shipped one by name, or the stored TOML text parsed."""
        if self.profile in hw_profiles.list_profiles():
            return hw_profiles.load_profile(self.profile)
        return hw_profiles.profile_from_text(self.profile, f"profile {self.profile_name!r} of the study")

    def first_difference(self, other: StudySpec) -> tuple[str, Any, Any] | None:
        """(dotted field, this value, other value) of the first field a resume may not change."""
        return _first_difference(self.to_attrs(), other.to_attrs(), "")


NAME_MAX_BYTES = 255  # the longest file name most file systems take (ext4, APFS, NTFS)
# characters a study name may not hold: path separators (either OS's) and line or control characters
_SEPARATORS = {"/", "\\", os.sep, *((os.altsep,) if os.altsep else ())}
_CONTROL = ("Cc", "Cs", "Zl", "Zp")  # Unicode categories: control, surrogate, line and paragraph separator


def check_study_name(name: Any, what: str = "--study") -> str:
    """`name` when it is safe as ONE folder name under the results directory, where its report
    goes (RESULTS_DIR/NAME/); UserError otherwise, naming `what` (the flag or field) and the fix.

    Refused: a non-string, the empty name, "." and "..", a path separator (so no absolute
    path either), control and line-break characters, and names over 255 UTF-8 bytes. The one
    check for every study name a user types or storage gives back.
    """
    why = _unsafe(name)
    if why:
        shown = repr(name) if len(repr(name)) <= 80 else repr(name)[:76] + "...'"
        raise UserError(f"{what} {shown} cannot be a study name: {why}; use one folder name of letters, "
                        "digits, '-', '_' or '.', e.g. lenet300-digits-mobile-cpu")
    return name


def safe_study_name(text: str) -> str:
    """`text` made a safe study name: separators and control characters become '-', and the
    result is cut to 255 bytes (for names made from other fields, e.g. a data set's name)."""
    out = re.sub(r"-{2,}", "-", "".join("-" if c in _SEPARATORS or unicodedata.category(c) in _CONTROL else c
                                         for c in str(text))).strip("-")
    out = out.encode("utf-8")[:NAME_MAX_BYTES].decode("utf-8", "ignore")
    return out if out.strip() and out not in (".", "..") else "study"


def _unsafe(name: Any) -> str | None:
    """Why `name` is not one safe folder name, or None."""
    if not isinstance(name, str):
        return f"it is of type {type(name).__name__}, not a string"
    if not name.strip():
        return "it is empty or blank"
    if name in (".", ".."):
        return "it names a directory itself (. or ..)"
    if any(s in name for s in _SEPARATORS):
        return "it holds a path separator (reports go to RESULTS_DIR/NAME/, so a name is not a path)"
    bad = next((c for c in name if unicodedata.category(c) in _CONTROL), None)
    if bad is not None:
        return f"it holds the control character {bad!r}"
    if len(name.encode("utf-8")) > NAME_MAX_BYTES:
        return f"it is longer than {NAME_MAX_BYTES} bytes"
    return None


def profile_reference(profile: str | Path | HardwareProfile) -> tuple[HardwareProfile, str]:
    """(profile, what a record stores for it): a shipped name stays a name; a TOML file is
    stored as its text, so workers and exports on other machines need no copy of the file."""
    obj = hw_profiles.load_profile(profile)
    if isinstance(profile, (str, Path)) and str(profile) in hw_profiles.list_profiles():
        return obj, str(profile)
    if isinstance(profile, (str, Path)):
        return obj, Path(profile).expanduser().read_text(encoding="utf-8")
    if profile.name in hw_profiles.list_profiles() and hw_profiles.load_profile(profile.name) == profile:
        return obj, profile.name
    return obj, hw_profiles.dump_profile(profile)


def _first_difference(a: Any, b: Any, path: str) -> tuple[str, Any, Any] | None:
    if isinstance(a, dict) and isinstance(b, dict):
        keys = [k for k in FIELD_ORDER if k in a or k in b] + sorted((set(a) | set(b)) - set(FIELD_ORDER))
        for key in keys:
            if path == "" and key in RESUME_MAY_CHANGE:
                continue
            d = _first_difference(a.get(key), b.get(key), f"{path}.{key}" if path else key)
            if d:
                return d
        return None
    return None if a == b else (path, a, b)


def jsonable(v: Any) -> Any:
    """Tuples to lists and numpy scalars to Python: what the storage gives back."""
    if isinstance(v, Mapping):
        return {str(k): jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    if isinstance(v, np.generic):
        return v.item()
    return v
