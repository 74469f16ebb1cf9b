"""Layer sensitivity and the warm-start trials built from it.

The seed's method (Han et al.): compress one layer at a time and see what the metric
loses. Each layer alone is pruned to 50% (unstructured) and, separately, quantized to 4
bits; the quality lost is measured without fine-tuning. Layers that lose little can be
pruned harder, so the first trials prune in proportion to insensitivity.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from search.compression import lowrank
from search.compression import plan as P
from search.compression.layers import Layer
from search.study.space import Space, nearest_bits, rank_offered, snap_ratio

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


SENSITIVITY_DIR = "sensitivity"  # in a results directory's cache/: one JSON file per baseline and probe


def sensitivity_key(baseline_key: str, layers: Sequence[Layer], baseline: float, engine: Any) -> str:
    """What measure_sensitivity's answer depends on, hashed: the baseline's weights (its cache
    key: model, hparams, seed, data and training; or the user's weights digest), the layers,
    the baseline's validation quality, the probes, the engine's compression settings (all of
    FinetuneConfig but the step driver and K, which change no value) and the JAX backend."""
    config = dataclasses.asdict(engine.config) if dataclasses.is_dataclass(engine.config) else {}
    config = {k: v for k, v in config.items() if k not in ("k", "loop")}
    import jax

    ident = {"format": 1, "baseline": baseline_key, "val_metric": float(baseline),
             "layers": [[layer.name, list(layer.kernel_shape), layer.group] for layer in layers],
             "probe": [PROBE_RATIO, PROBE_BITS], "finetune": config, "backend": jax.default_backend()}
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cached_sensitivity(engine: Any, layers: Sequence[Layer], baseline: float, cache_dir: str | os.PathLike | None,
                       baseline_key: str | None) -> dict[str, Any]:
    """measure_sensitivity, kept in `cache_dir`/sensitivity/<key>.json (key: sensitivity_key):
    a new study of the same baseline, layers and settings reads it back instead of evaluating
    2L probe plans again (0.7-1 s of a warm lenet300 search on a 2-core CPU). No cache_dir or
    baseline_key: measured every time. An unreadable or mismatched file is measured again and
    rewritten; a read-only cache only means measuring again next time."""
    if cache_dir is None or not baseline_key:
        return measure_sensitivity(engine, layers, baseline)
    path = Path(cache_dir, SENSITIVITY_DIR, sensitivity_key(baseline_key, layers, baseline, engine) + ".json")
    try:
        sens = json.loads(path.read_text())
        if sens.get("layers") == [layer.name for layer in layers] and len(sens.get("prune_loss", ())) == len(layers):
            return sens
    except (OSError, ValueError, AttributeError):
        pass
    sens = measure_sensitivity(engine, layers, baseline)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        # inf (a probe that diverged) is written as JSON's Infinity, which json reads back
        tmp.write_text(json.dumps(sens))
        os.replace(tmp, path)
    except OSError:
        pass
    return sens


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
    """The first trials: uniform int8 (and, where the space factorizes, uniform int8 with every
    factorizable layer at the largest offered rank that saves weights, `factorized_warm_start`),
    then int8 pruning weighted by insensitivity at a few target sparsities, and a Deep
    Compression-like plan (90% pruning, 5-bit codebook)."""
    n = len(layers)
    w8 = nearest_bits(8, space.weight_bits)
    a8 = nearest_bits(8, space.act_bits)
    gran = P.UNSTRUCTURED if "unstructured" in space.granularities else P.CHANNEL
    plans = [P.make_plan(np.zeros(n), gran, w8, a8, P.UNIFORM)]
    if space.factorize:
        plans.append(factorized_warm_start(layers, space, gran, w8, a8))
    if sens is None:
        return plans
    for target in WARM_TARGETS:
        plans.append(P.make_plan(insensitivity_ratios(sens, layers, target, space), gran, w8, a8, P.UNIFORM))
    if "codebook" in space.quant_modes:
        w5 = nearest_bits(5, space.weight_bits)
        plans.append(P.make_plan(insensitivity_ratios(sens, layers, 0.9, space), gran, w5, a8, P.CODEBOOK))
    return plans


def factorized_warm_start(layers: Sequence[Layer], space: Space, gran: int, weight_bits: int, act_bits: int) -> P.Plan:
    """A plan with nothing pruned, uniform weights and activations at the given widths, and every
    layer that can factorize (`rank_offered`) at the largest of the space's rank ratios below 1
    that holds fewer weights than the layer (lowrank.pays) in the SVD form: so that a short
    `--factorize` study tries factorization among its first trials. Layers where no rank pays keep
    rank 1."""
    n = len(layers)
    zeros, grans = np.zeros(n), np.full(n, gran)
    ranks = np.ones(n, np.float32)
    for layer in layers:
        if rank_offered(layer, space, 0.0, gran, weight_bits, P.UNIFORM):
            ranks[layer.index] = next((r for r in sorted(space.ranks, reverse=True)
                                       if r < 1 and lowrank.pays(layer, layers, P.SVD, r, zeros, grans)), 1.0)
    return P.make_plan(zeros, gran, weight_bits, act_bits, P.UNIFORM, ranks, P.SVD)
