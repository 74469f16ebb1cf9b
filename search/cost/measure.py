"""Measure an exported model in onnxruntime on this machine, beside the predicted latency.

Batch 1 (the latency the cost model predicts), random input of the exported shape, warm-up
runs, then `runs` timed runs; median and spread. onnxruntime is pinned to `threads` intra-op
threads (default 1) so numbers are repeatable on a shared machine.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

import hw_profiles
import models
from search.compression.layers import discover_layers, task_model
from search.compression.plan import FORMS, QUANT_MODES, make_plan, stack_plans
from search.cost.roofline import price
from search.errors import UserError

EXPORT_FORMAT = "hwcompress-export/1"


def read_config(export_dir: str | Path) -> dict:
    """config.json of an export; UserError when the directory is not an hwcompress export."""
    d = Path(export_dir)
    path = d / "config.json"
    if not d.is_dir():
        raise UserError(f"export directory {d} does not exist; create it with `hwcompress export --out {d} ...`")
    if not path.is_file():
        raise UserError(f"{d} has no config.json: it is not an hwcompress export (run `hwcompress export` first)")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is corrupt ({e}); re-export with `hwcompress export --force`") from None
    if not isinstance(config, dict) or config.get("format") != EXPORT_FORMAT:
        raise UserError(f"{path} is not an hwcompress export config (no format '{EXPORT_FORMAT}'); pass a directory written by `hwcompress export`")
    return config


def session(model_path: str | Path | bytes, threads: int = 1) -> Any:
    """An onnxruntime CPU session with full graph optimisation and `threads` intra-op threads, of
    a model file or of a serialized model (bytes)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    try:
        model = model_path if isinstance(model_path, bytes) else str(model_path)
        return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own Fail / InvalidProtobuf / NoSuchFile types
        name = "the model" if isinstance(model_path, bytes) else model_path
        raise UserError(f"{name} is corrupt or not an ONNX model ({str(e).splitlines()[0][:160]}); re-export it") from None


def time_session(sess: Any, x: np.ndarray, runs: int, warmup: int) -> np.ndarray:
    """Milliseconds of `runs` timed runs after `warmup` untimed ones."""
    feed = {sess.get_inputs()[0].name: x}
    for _ in range(warmup):
        sess.run(None, feed)
    out = np.empty(runs)
    for i in range(runs):
        t0 = time.perf_counter()
        sess.run(None, feed)
        out[i] = (time.perf_counter() - t0) * 1e3
    return out


def summarize(ms: np.ndarray) -> dict:
    """Median and spread (p10, p90, IQR, min) of run times in ms."""
    q10, q25, q50, q75, q90 = np.percentile(ms, [10, 25, 50, 75, 90])
    return {"median_ms": float(q50), "p10_ms": float(q10), "p90_ms": float(q90),
            "iqr_ms": float(q75 - q25), "min_ms": float(ms.min()), "runs": int(ms.size)}


def measure(export_dir: str | Path, runs: int = 200, warmup: int = 20, *, profile: str | None = None,
            threads: int = 1, seed: int = 0) -> dict:
    """Measured latency of model.onnx and the predicted one for `profile` (default: the profile
    named in config.json), at the batch that profile prices (a calibrated profile's
    KernelModel.batch; 1 otherwise); returns a dict for printing or JSON."""
    if runs < 1 or warmup < 0:
        raise UserError(f"--runs {runs} must be >= 1 and --warmup {warmup} >= 0")
    if threads < 1:
        raise UserError(f"--threads {threads} must be >= 1")
    config = read_config(export_dir)
    name = profile or config.get("profile")
    batch = profile_batch(name)
    stats = time_export(export_dir, config, runs, warmup, threads, batch, seed)
    predicted = (config.get("predicted") or {}).get(name or "", {}).get("latency_ms")
    if predicted is None and name:
        predicted = _predict(config, name)
    return {"dir": str(export_dir), "threads": threads, "batch": batch, **stats, "profile": name,
            "predicted_ms": predicted,
            "measured_over_predicted": None if not predicted else stats["median_ms"] / predicted}


def time_export(export_dir: str | Path, config: dict, runs: int, warmup: int, threads: int, batch: int,
                seed: int = 0) -> dict:
    """summarize() of `runs` timed runs of the export's model.onnx on random input of its shape
    [batch, *input_shape] (config: its read_config); UserError when model.onnx is missing."""
    model_path = Path(export_dir) / "model.onnx"
    if not model_path.is_file():
        raise UserError(f"{export_dir} has no model.onnx; re-export it with `hwcompress export --force`")
    sess = session(model_path, threads)
    x = np.random.default_rng(seed).random((batch, *config["model"]["input_shape"]), dtype=np.float32)
    return summarize(time_session(sess, x, runs, warmup))


def profile_batch(profile: str | None) -> int:
    """The batch a profile's latency is for: a calibrated profile's KernelModel.batch, else 1
    (also when the profile named in config.json is not found here: its price is stored)."""
    try:
        k = hw_profiles.load_profile(profile).kernels if profile else None
    except (ValueError, OSError):
        return 1
    return 1 if k is None else int(k.batch)


def export_layers_plan(config: dict) -> tuple[tuple, Any]:
    """(layers, plan [L]) of an export's config.json: the model's layers discovered again from its
    name, dataset and hparams, and the plan its per-layer entries record (what the cost model prices)."""
    m = config["model"]
    task = models.get_task(m["name"], m["dataset"], **dict(m.get("hparams") or {}))
    layers = discover_layers(*task_model(task, task.init_variables()), np.zeros((1, *m["input_shape"]), np.float32))
    ls = config["layers"]
    mode = [QUANT_MODES.get(l["quant_mode"], 0) for l in ls]
    # an export from before factorization records no rank: full rank
    plan = make_plan([l["ratio"] for l in ls], [l["granularity"] for l in ls], [l["weight_bits"] for l in ls],
                     [l["act_bits"] for l in ls], mode, [l.get("rank_ratio", 1.0) for l in ls],
                     [FORMS.get(l.get("form") or "svd", 0) for l in ls])
    return layers, plan


def _predict(config: dict, profile: str) -> float | None:
    """Price the exported plan on a profile not stored in config.json (needs search.cost)."""
    layers, plan = export_layers_plan(config)
    return float(np.asarray(price(hw_profiles.load_profile(profile), layers, stack_plans([plan])).latency_ms)[0])
