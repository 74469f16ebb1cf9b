"""Which K (plans per vmapped step) and loop driver fine-tune fastest per plan on this machine.

The policy, kept apart from the engine that does the timing: both loops at K = 1 (or the
given K), then the faster loop at one large K (`large_k`), and the geometric middle only when
neither wins by 20%, so at most three step variants compile (five K were compiled before).
The choice is remembered per process and, with a k_file (search.engine.k_file), per machine.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import jax
import numpy as np

from search.compression.layers import Layer
from search.engine.config import LOOPS
from search.engine.k_file import read_k_file, write_k_file

MAX_K = 64  # the largest K tried on an accelerator (per plan, K=128 was no faster than K=1 on an H200)

# key (machine, task, shapes, config) -> (K, loop, seconds per plan-step per K behind the choice)
_CHOSEN: dict[tuple, tuple[int, str, dict[int, float]]] = {}


@dataclass
class Choice:
    """The chosen K and loop, with the timings behind them ({} when remembered, not measured)."""

    k: int
    loop: str
    k_timings: dict[int, float] = field(default_factory=dict)  # seconds per plan-step per K, chosen loop
    loop_timings: dict[str, float] = field(default_factory=dict)  # seconds per plan-step per loop, first K
    # seconds per plan-step per K behind the choice, measured now or remembered ({} when unknown)
    known: dict[int, float] = field(default_factory=dict)


def forget_measured_k() -> None:
    """Forget the choices this process measured (as a new process would); the k_file keeps its own."""
    _CHOSEN.clear()


def large_k(layers: Sequence[Layer], batch_size: int) -> int:
    """The large K to measure: 4 on a CPU (plans share its few cores); elsewhere the largest
    power of two up to MAX_K whose plans fill at most a quarter of the device's memory, at
    about 10 floats per weight (params, gradients, Adam moments, masks, effective weights)
    and 4 per activation (forward, backward, teacher) of a batch."""
    if jax.default_backend() == "cpu":
        return 4
    weights = sum(l.params for l in layers)
    acts = sum(int(np.prod(l.out_shape)) for l in layers) * batch_size
    per_plan = 4 * (10 * weights + 4 * acts)
    try:
        limit = (jax.devices()[0].memory_stats() or {}).get("bytes_limit", 0)
    except Exception:  # a backend without memory statistics
        limit = 0
    if not limit:
        return 16
    return int(max(1, min(MAX_K, 2 ** int(np.floor(np.log2(max(1.0, limit / 4 / per_plan)))))))


def choose(key: tuple, seconds_per_plan_step: Callable[[int, str], float], k_file: Path | None,
           k: int | None, loop: str | None, big: Callable[[], int]) -> Choice:
    """(K, loop) for `key`: remembered in this process or the k_file, else measured with
    `seconds_per_plan_step(K, loop)`. A given `k` or `loop` is kept and only the other is
    measured; `big()` is the large K to try (`large_k`)."""
    if key in _CHOSEN:
        k_, loop_, known = _CHOSEN[key]
        return Choice(k_, loop_, known=dict(known))
    disk = read_k_file(k_file)
    got = disk.get(repr(key), {})
    if got.get("loop") in LOOPS and int(got.get("k", 0)) >= 1:
        try:
            known = {int(n): float(v) for n, v in (got.get("seconds_per_plan_step") or {}).items()}
        except (TypeError, ValueError):  # a hand-edited file: the choice stands, the timings are unknown
            known = {}
        _CHOSEN[key] = int(got["k"]), str(got["loop"]), known
        return Choice(int(got["k"]), str(got["loop"]), known=dict(known))
    first = k if k is not None else 1
    loop_timings = {lp: seconds_per_plan_step(first, lp) for lp in ((loop,) if loop is not None else LOOPS)}
    best_loop = min(loop_timings, key=loop_timings.get)
    k_timings = {first: loop_timings[best_loop]}
    if k is None:
        n = big()
        if n > 1:
            k_timings[n] = seconds_per_plan_step(n, best_loop)
            mid = 2 ** int(round(np.log2(n) / 2))
            if 0.8 < k_timings[n] / k_timings[1] < 1.25 and 1 < mid < n:
                k_timings[mid] = seconds_per_plan_step(mid, best_loop)
    best_k = min(k_timings, key=k_timings.get)
    _CHOSEN[key] = best_k, best_loop, dict(k_timings)
    disk[repr(key)] = {"k": best_k, "loop": best_loop,
                       "seconds_per_plan_step": {str(n): v for n, v in k_timings.items()},
                       "loop_seconds_per_plan_step": loop_timings}
    write_k_file(k_file, disk)
    return Choice(best_k, best_loop, k_timings, loop_timings, dict(k_timings))
