"""Layer sensitivity and the warm-start trials built from it.

The seed's method (Han et al.): compress one layer at a time and see what the metric
loses. Each layer alone is pruned to 50% (unstructured) and, separately, quantized to 4
bits; the quality lost is measured without fine-tuning. Layers that lose little can be
pruned harder, so the first trials prune in proportion to insensitivity.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from search.compression import plan as P
from search.compression.layers import Layer
from search.study.space import Space, nearest_bits, snap_ratio

PROBE_RATIO = 0.5  # each layer alone pruned to 50%
PROBE_BITS = 4  # each layer alone at 4-bit weights
WARM_TARGETS = (0.5, 0.8, 0.9)  # parameter-weighted mean prune ratios of the warm-start plans


def probe_plans(num_layers: int, leaders: Sequence[int] | None = None) -> P.Plan:
    """2L plans [2L, L]: layer i alone pruned to 50% (rows 0..L-1), alone at 4 bits (rows L..2L-1).

    With `leaders` (each layer's channel group leader, Layer.group), row i prunes layer i's
    group, since a group is pruned by one decision (the leader's ratio)."""
    eye = np.eye(num_layers, dtype=np.float32)
    prune = eye if leaders is None else eye[:, list(leaders)].T.copy()
    ratio = np.concatenate([prune * PROBE_RATIO, np.zeros_like(eye)])
    bits = np.concatenate([np.full_like(eye, P.FLOAT), np.where(eye > 0, PROBE_BITS, P.FLOAT)]).astype(np.int32)
    return P.make_plan(ratio, P.UNSTRUCTURED, bits, P.FLOAT, P.UNIFORM)


def _metric(result: Any) -> np.ndarray:
    """Engine.evaluate may return an EngineResult or a metric array."""
    return np.asarray(getattr(result, "metric", result), np.float64)


def measure_sensitivity(engine: Any, layers: Sequence[Layer], baseline: float) -> dict[str, Any]:
    """Quality lost by each layer alone at 50% pruning and at 4-bit weights (validation split).

    Returns the JSON-able dict stored in the study attr "sensitivity".
    """
    plans = probe_plans(len(layers), [layer.group for layer in layers])
    metric = _metric(engine.evaluate(plans, split="val"))
    n = len(layers)
    loss_prune = np.where(np.isfinite(metric[:n]), baseline - metric[:n], np.inf)
    loss_bits = np.where(np.isfinite(metric[n:]), baseline - metric[n:], np.inf)
    return {
        "layers": [layer.name for layer in layers],
        "baseline": float(baseline),
        "prune_ratio": PROBE_RATIO,
        "prune_loss": [float(v) for v in loss_prune],
        "bits": PROBE_BITS,
        "bits_loss": [float(v) for v in loss_bits],
    }


def insensitivity_ratios(sens: dict[str, Any], layers: Sequence[Layer], target: float, space: Space) -> np.ndarray:
    """Per-layer prune ratios whose parameter-weighted mean is about `target`, higher where
    pruning the layer alone cost less quality (weights 1 / sqrt(relative loss + 1%))."""
    loss = np.clip(np.asarray(sens["prune_loss"], np.float64), 0.0, None)
    loss = np.where(np.isfinite(loss), loss, 1e3)
    scale = max(float(np.abs(sens.get("baseline", 1.0))), 1e-6)
    weight = 1.0 / np.sqrt(loss / scale + 1e-2)
    params = np.asarray([layer.params for layer in layers], np.float64)
    ratio = np.zeros(len(layers))
    # scale the weights so the parameter-weighted mean ratio hits the target (bisection on c)
    lo, hi = 0.0, 1e6
    for _ in range(60):
        c = 0.5 * (lo + hi)
        ratio = np.clip(c * weight / weight.max(), 0.0, space.max_ratio)
        if (ratio * params).sum() / params.sum() < target:
            lo = c
        else:
            hi = c
    return np.asarray([snap_ratio(r, space) for r in ratio], np.float32)


def warm_start_plans(sens: dict[str, Any] | None, layers: Sequence[Layer], space: Space) -> list[P.Plan]:
    """The first trials: uniform int8, then int8 pruning weighted by insensitivity at a few
    target sparsities, and a Deep Compression-like plan (90% pruning, 5-bit codebook)."""
    n = len(layers)
    w8 = nearest_bits(8, space.weight_bits)
    a8 = nearest_bits(8, space.act_bits)
    gran = P.UNSTRUCTURED if "unstructured" in space.granularities else P.CHANNEL
    plans = [P.make_plan(np.zeros(n), gran, w8, a8, P.UNIFORM)]
    if sens is None:
        return plans
    for target in WARM_TARGETS:
        plans.append(P.make_plan(insensitivity_ratios(sens, layers, target, space), gran, w8, a8, P.UNIFORM))
    if "codebook" in space.quant_modes:
        w5 = nearest_bits(5, space.weight_bits)
        plans.append(P.make_plan(insensitivity_ratios(sens, layers, 0.9, space), gran, w5, a8, P.CODEBOOK))
    return plans
