"""The export's final fine-tune (retrain) of a plan the search fine-tuned briefly: its recipe
(`retrain_config`), the quality it reaches (`finetuned`), and which of the two fine-tunes an
export keeps (`better`), shared by the export (search.export.exporter) and the choice made
after it (search.export.select)."""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from search.compression.plan import Plan, stack_plans
from search.engine.config import FinetuneConfig
from search.engine.finetune import Engine
from search.engine.schedule import check_schedule
from search.errors import UserError
from search.export.defaults import RETRAIN_FACTOR, RETRAIN_LR_FACTOR, RETRAIN_PRUNING


def metric(task, predict, params, x, y, batch: int = 512) -> tuple[float, np.ndarray]:
    outs = [np.asarray(predict(params, jnp.asarray(x[i:i + batch]))) for i in range(0, len(x), batch)]
    out = np.concatenate(outs)
    return float(np.mean(np.asarray(task.metric(jnp.asarray(out), jnp.asarray(y))))), out


def retrain_config(search: FinetuneConfig, steps: int | None = None,
                   learning_rate: float | None = None, pruning: str | None = None) -> FinetuneConfig:
    """The export's final fine-tune of a plan the search fine-tuned with `search`: `steps`
    (None: RETRAIN_FACTOR x search.steps) at peak learning rate `learning_rate` (None:
    RETRAIN_LR_FACTOR x the search's) decaying to 0 on a cosine (Loshchilov & Hutter 2017), with
    `pruning` ("one-shot" or "gradual"; None: RETRAIN_PRUNING where the steps leave room for its
    ramp, else the search's), one plan at a time; everything else as the search's. At the
    search's own step count, with no rate or pruning given, it is the search's fine-tune,
    schedule included (so an export can reproduce the trial the search measured).

    Why the higher rate and the ramp: a long retrain of a heavily pruned model gains from a
    learning rate near the one it was trained with (learning-rate rewinding, Renda et al., ICLR
    2020), and from masks recomputed from the weights as the ratio ramps up (gradual magnitude
    pruning, Zhu & Gupta 2017), where the search's short fine-tune does not (search.export.defaults
    has the measurements; resnet20/Fashion-MNIST with every channel group 50% pruned reached
    92.73% at 3e-3 over 6000 steps, where 1e-3 over 2000 gave 91.47%). Raises UserError for an
    unknown `pruning`.
    """
    n = RETRAIN_FACTOR * search.steps if steps is None else int(steps)
    if n == search.steps and learning_rate is None and pruning is None:
        return dataclasses.replace(search, k=1)
    lr = RETRAIN_LR_FACTOR * search.learning_rate if learning_rate is None else float(learning_rate)
    out = dataclasses.replace(search, steps=n, schedule="cosine", k=1, learning_rate=lr,
                              pruning=pruning or RETRAIN_PRUNING)
    try:
        check_schedule(out)
    except UserError:
        if pruning is not None:
            raise
        out = dataclasses.replace(out, pruning=search.pruning)  # too few steps for the ramp
    return out


def finetuned(task, base_params: Any, plan: Plan, finetune: FinetuneConfig, engine: Any = None) -> tuple[Any, dict]:
    """(the fine-tuned model, its quality) of `plan` [L] fine-tuned with `finetune` (one plan
    at a time). The quality is {"steps", "schedule", "val", "test"}, the metrics None when
    fine-tuning diverged. The search's engine evaluates one split per run, so test quality is
    measured here on the same fine-tuned weights, never by a second fine-tune."""
    engine = engine or Engine(task, base_params, dataclasses.replace(finetune, k=1))
    cm = engine.run(stack_plans([plan]), return_models=True, split="val", finetune=engine.config.steps > 0).models[0]
    out = {"steps": engine.config.steps, "schedule": engine.config.schedule, "val": None, "test": None}
    if cm.finite:
        predict = jax.jit(lambda p, x: engine.predict(dataclasses.replace(cm, params=p), x))
        out.update(val=float(cm.metric), test=metric(task, predict, cm.params, task.data.x_test, task.data.y_test)[0])
    return cm, out


def val_examples(task, engine: Any, cm: Any) -> np.ndarray:
    """[N] the validation split's per-example metric (task.metric: 1/0 correct for accuracy,
    dB for PSNR) of a fine-tuned model `cm` from `engine` (finetuned's), for paired comparisons
    with the baseline (search.export.select)."""
    predict = jax.jit(lambda p, x: engine.predict(dataclasses.replace(cm, params=p), x))
    out = metric(task, predict, cm.params, task.data.x_val, task.data.y_val)[1]
    return np.asarray(task.metric(jnp.asarray(out), jnp.asarray(task.data.y_val)), np.float64)


def finetuned_quality(task, base_params: Any, plan: Plan, finetune: FinetuneConfig, engine: Any = None) -> dict:
    """finetuned's quality alone."""
    return finetuned(task, base_params, plan, finetune, engine)[1]


def better(before: dict | None, after: dict) -> str:
    """Which of two fine-tunes of one plan the export keeps: "before" (the search's own) when
    its validation quality is strictly higher than the retrain's ("after") or the retrain
    diverged and it did not; "after" otherwise. Chosen on validation, never on test. A long
    retrain at a higher rate can lower a lightly pruned plan (lenet300/Fashion-MNIST: a plan at
    90.34% validation after the search's 1000 steps fell to 90.08% after the 10000-step retrain).
    An export asked to compress only (after["steps"] 0) keeps that."""
    if before is None or before["val"] is None or not after["steps"]:
        return "after"
    return "before" if after["val"] is None or before["val"] > after["val"] else "after"


def same_finetune(a: FinetuneConfig, b: FinetuneConfig) -> bool:
    """Whether two fine-tunes train the same weights (no steps at all, or equal but for K and
    the loop driver, which run the same steps)."""
    return (a.steps == 0 and b.steps == 0) or \
        dataclasses.replace(a, k=1, loop=None) == dataclasses.replace(b, k=1, loop=None)
