"""When masks are computed during fine-tuning: one-shot, or gradually on Zhu & Gupta's cubic
schedule ("To prune, or not to prune", 2017, eq. 1, with initial sparsity 0).

One-shot: the masks come from the pretrained weights at the plan's ratio, before the first
step, and stay. Gradual: fine-tuning starts dense; at n update steps t_1 < ... < t_n = e
spread evenly over [0, e] the masks are recomputed from the current weights at the ratio

    ratio_t = plan.ratio * (1 - (1 - t / e)^3)

so most weights go early, while the network can still recover, and the last ones go slowly.
e = round(gradual_end * steps) leaves steps - e steps of fine-tuning with the final masks,
which are the plan's exact counts (`masks.compute_masks` at ratio_t = plan.ratio). The
fraction is an array passed into the compiled mask update, so neither plans nor schedules
recompile; the update steps are chosen here, in the Python loop that drives the steps.
"""
from __future__ import annotations

import itertools
from typing import Any

from search.errors import UserError

PRUNING = ("one-shot", "gradual")  # FinetuneConfig.pruning
DEFAULT_UPDATES = 8  # mask updates on the way to the plan's ratio when gradual_updates is None


def ramp_end(steps: int, gradual_end: float) -> int:
    """The step e at which a gradual schedule reaches the plan's ratio."""
    return int(round(gradual_end * steps))


def cubic_fraction(t: int, end: int) -> float:
    """The share of the plan's ratio pruned at step t: 1 - (1 - t/end)^3, 1 from step `end` on."""
    p = min(max(t / end, 0.0), 1.0)
    return 1.0 - (1.0 - p) ** 3


def mask_updates(config: Any) -> dict[int, float]:
    """{step: share of the plan's ratio} at which a gradual fine-tune recomputes its masks,
    before that step runs; {} for one-shot pruning or no fine-tuning. The last entry is at
    the ramp's end e with share 1.0."""
    if config.pruning != "gradual" or config.steps == 0:
        return {}
    e = ramp_end(config.steps, config.gradual_end)
    n = updates_count(config)
    out: dict[int, float] = {}
    for j in range(1, n + 1):
        t = int(round(j * e / n))
        out[t] = cubic_fraction(t, e)
    return out


def updates_count(config: Any) -> int:
    """How many mask updates a gradual fine-tune makes (gradual_updates, or DEFAULT_UPDATES
    capped at the ramp's length)."""
    if config.gradual_updates is not None:
        return int(config.gradual_updates)
    return max(1, min(DEFAULT_UPDATES, ramp_end(config.steps, config.gradual_end)))


def check_schedule(config: Any) -> None:
    """Raise UserError when a pruning schedule is unknown or cannot reach the plan's ratio."""
    if config.pruning not in PRUNING:
        raise UserError(f"pruning {config.pruning!r} is unknown: use one of {', '.join(PRUNING)} (--pruning)")
    if not 0.0 < config.gradual_end < 1.0:
        raise UserError(f"gradual_end {config.gradual_end!r} is out of range: the ramp must end within "
                        "fine-tuning, at a share in (0, 1) of its steps")
    if config.gradual_updates is not None and config.gradual_updates < 1:
        raise UserError(f"gradual_updates {config.gradual_updates!r} is out of range: use >= 1 "
                        "(or None for the default)")
    if config.pruning != "gradual" or config.steps == 0:
        return
    e = ramp_end(config.steps, config.gradual_end)
    n = updates_count(config)
    if e < 1 or e >= config.steps or n > e:
        need = next(s for s in itertools.count(2) if n <= ramp_end(s, config.gradual_end) < s)
        fewer = f", or fewer gradual_updates (1..{e})" if e >= 1 else ""
        raise UserError(
            f"--pruning gradual cannot reach the plans' ratios in {config.steps} fine-tune step(s): its "
            f"{n} mask update(s) must fit in the first {config.gradual_end:g} of the steps, before the "
            f"last one: give --finetune-steps >= {need}{fewer}, or --pruning one-shot")
