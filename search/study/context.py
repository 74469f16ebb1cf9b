"""What a study's record rebuilds: the task, the target profile, the dense baseline, the
compressible layers and the fine-tuning engine. `hwcompress search`, `compress()`, workers
and export all come through `load_context`, so they run on the same baseline.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import jax
import flax.linen as nn
import numpy as np
import optuna

import models
from hw_profiles import Budget, HardwareProfile
from models.task import Task
from models.train import evaluate, train_baseline, user_baseline
from models.user import is_reference, load_reference, variables_digest
from search.compression.layers import Layer, discover_layers, task_model
from search.engine.config import FinetuneConfig
from search.engine.finetune import Engine
from search.engine.k_file import k_file_in
from search.errors import UserError
from search.study.space import Space
from search.study.spec import StudySpec


class StudyContext:
    """A study's record made concrete on this machine: task, target profile, dense baseline
    and compressible layers. The baseline is loaded (or trained) on first use, so a search
    checks the budget and the resume before it spends time on training."""

    def __init__(self, spec: StudySpec, results_dir: str | os.PathLike = "results", *, task: Task | None = None,
                 params: Any = None, baseline: Mapping[str, Any] | None = None) -> None:
        self.spec = spec  # the record it was built from
        self.results_dir = Path(results_dir)  # baseline cache and measured K live under it
        self.task = task if task is not None else task_of(spec)  # model, data, loss and metric
        self.profile = spec.hardware_profile()  # the target device
        # compress(): the caller's trained variables or params (None: an NNX module's own weights) and info
        self._given = None if task is None else (params, dict(baseline or {}))

    @functools.cached_property
    def _baseline(self) -> tuple[Any, dict[str, Any]]:
        return self._given if self._given is not None else baseline_of(self.spec, self.task, self.results_dir)

    @property
    def params(self) -> Any:
        """The dense baseline's trained weights: a Flax variables dict (params and any other
        collections, e.g. batch_stats), bare params from compress(), or None (an NNX module's own)."""
        return self._baseline[0]

    @property
    def baseline(self) -> dict[str, Any]:
        """val_metric, test_metric, cache_key of the baseline (models.train)."""
        return self._baseline[1]

    @functools.cached_property
    def layers(self) -> tuple[Layer, ...]:
        """The compressible layers, plan axis order (shapes only: no training needed)."""
        probe = self._given[0] if self._given is not None else None
        if probe is None and isinstance(self.task.module, nn.Module):
            # zeros of the variables' shapes: discovery reads shapes only, and running the
            # initializers compiled a program per start (0.9 s for lenet300, 3.7 s for resnet20)
            probe = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), jax.eval_shape(self.task.init_variables))
        model, params = task_model(self.task, probe)
        return tuple(discover_layers(model, params, np.asarray(self.task.data.x_train[:1])))

    @property
    def dense_bytes(self) -> int:
        """float32 bytes of every compressible layer's params (kernel + bias)."""
        return int(sum(layer.params for layer in self.layers) * 4)

    def engine(self, finetune: FinetuneConfig | None = None, *, k: int | None = None,
               loop: str | None = None) -> Engine:
        """The fine-tuning engine on this baseline: the record's fine-tuning unless `finetune`
        is given; `k` plans per vmapped step and `loop` ("python" or "fused") the step driver
        (None: measured here once, kept in the results directory's cache)."""
        ft = finetune if finetune is not None else self.spec.finetune
        if k is not None:
            ft = dataclasses.replace(ft, k=int(k))
        if loop is not None:
            ft = dataclasses.replace(ft, loop=loop)
        return Engine(self.task, self.params, ft, k_file=k_file_in(self.results_dir),
                      factorize=self.spec.space.factorize)


@dataclass(frozen=True)
class SearchContext:
    """What the ask -> price -> fine-tune -> tell loop needs (built once per process)."""

    study: StudyContext  # record, task, profile, baseline, layers
    engine: Engine  # fine-tunes and evaluates K plans per call

    @property
    def spec(self) -> StudySpec:
        return self.study.spec

    @property
    def layers(self) -> tuple[Layer, ...]:
        return self.study.layers

    @property
    def profile(self) -> HardwareProfile:
        return self.study.profile

    @property
    def budget(self) -> Budget:
        return self.spec.budget

    @property
    def space(self) -> Space:
        return self.spec.space

    @property
    def objectives(self) -> tuple[str, ...]:
        return self.spec.objectives

    @property
    def dense_bytes(self) -> int:
        return self.study.dense_bytes


def task_of(spec: StudySpec) -> Task:
    """The task a record names: the user's builder (models.user) or a zoo task (a compress()
    record names a model only its caller has)."""
    if is_reference(spec.model):
        return load_reference(spec.model)[0]
    if spec.model.startswith("custom-"):
        raise UserError(f"study of model {spec.model!r} was started by compress() on a model that is not in "
                        "the zoo: run its trials and exports from Python with the same model")
    return models.get_task(spec.model, spec.dataset, data_dir=spec.data_dir, seed=spec.seed, **dict(spec.hparams))


def baseline_of(spec: StudySpec, task: Task, results_dir: str | os.PathLike) -> tuple[Any, dict[str, Any]]:
    """(variables, info) of the record's dense baseline: the variables the user's builder returned,
    the user's weights file (checked against the recorded SHA-256), or the zoo baseline (or the
    builder's task's), trained once and cached under results_dir/cache."""
    if is_reference(spec.model):
        _, variables = load_reference(spec.model)
        if variables is not None:  # the builder's own trained weights
            return variables, {
                "cache_key": f"user-{variables_digest(variables)}", "cache_path": spec.model, "loaded": True,
                "val_metric": evaluate(task, variables, "val"), "test_metric": evaluate(task, variables, "test"),
                "train_seconds": 0.0, "steps_run": 0, "metric_name": task.metric_name}
    if spec.weights is None:
        return train_baseline(task, cache_dir=Path(results_dir, "cache"))
    params, info = user_baseline(task, spec.weights.path)
    if info["sha256"] != spec.weights.sha256:
        raise UserError(f"{spec.weights.path} differs from the weights the study was started with (SHA-256 "
                        "mismatch): copy the search's weights file to this path")
    return params, info


def load_context(spec: StudySpec, results_dir: str | os.PathLike = "results", *,
                 study: optuna.Study | None = None, task: Task | None = None, params: Any = None,
                 baseline: Mapping[str, Any] | None = None) -> StudyContext:
    """Rebuild task, profile, baseline and layers from a record: the one way search, workers
    and export get them.

    `task` and `params` (with `baseline` info) come from compress(), whose model is the
    caller's; otherwise the zoo task and its baseline are rebuilt (the user's weights file when
    the record names one). With `study`, what this machine rebuilt is checked against what the
    study stored (baseline and layers), so a worker or export never runs another model.
    """
    ctx = StudyContext(spec, results_dir, task=task, params=params, baseline=baseline)
    if study is not None:
        check_matches(ctx, study)
    return ctx


def check_matches(ctx: StudyContext, study: optuna.Study) -> None:
    """UserError when the baseline or layers rebuilt here differ from the study's stored ones."""
    want = (study.user_attrs.get("baseline") or {}).get("cache_key")
    have = ctx.baseline.get("cache_key")
    if want and have and want != have:
        raise UserError(f"the baseline rebuilt here ({have}) differs from study {study.study_name!r}'s ({want}): "
                        "use the same data set files, weights and hwcompress version as the search")
    stored = [d.get("name") for d in study.user_attrs.get("layers") or []]
    names = [layer.name for layer in ctx.layers]
    if stored and stored != names:
        raise UserError(f"study {study.study_name!r} has layers {stored} but the model rebuilt here has {names}: "
                        "use the same hwcompress version as the search")
