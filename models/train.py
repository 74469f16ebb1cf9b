"""Baseline training (AdamW + cosine decay under jit) and a checkpoint cache.

The step is jitted once and driven from Python: on XLA:CPU the backward pass of a conv runs
much slower inside lax.scan than as separate calls. Batches are gathered on the device from
index arrays, so the data crosses to the device once.

Model state: a task's variables are {"params": ...} plus its other collections (BatchNorm's
"batch_stats"); params are trained, the other collections are updated by the module itself
in training mode (task.train_kwargs) and read in evaluation mode (task.eval_kwargs).

Cache: results/cache/<key>/ holds params.safetensors (the whole variables dict flattened with
'/' keys: "params/fc1/kernel", "batch_stats/bn1/mean") and meta.json. The key hashes the task
name, hparams, the data fingerprint, the TrainConfig, the seed and the file format, so a
second run with the same inputs loads instead of training.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import flax.errors
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from models.errors import ModelError
from models.task import Task, TrainConfig, join_variables, split_variables

PARAMS_FILE = "params.safetensors"
META_FILE = "meta.json"
EVAL_ELEMENTS = 1 << 20  # input floats per evaluation batch


def cache_key(task: Task) -> str:
    """A hash of everything the trained baseline depends on."""
    desc = {
        "model": task.name,
        "module": type(task.module).__name__,
        "dataset": task.data.name,
        "data": task.data.fingerprint(),
        "hparams": task.hparams,
        "train": dataclasses.asdict(task.train),
        "seed": task.data.seed,
        "format": 2,  # 2: the file holds every variable collection ("params/...", "batch_stats/...")
    }
    blob = json.dumps(desc, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """AdamW with a short warm-up and cosine decay, gradients clipped at norm 1."""
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, cfg.learning_rate, warmup_steps=max(1, cfg.steps // 20), decay_steps=max(2, cfg.steps))
    return optax.chain(optax.clip_by_global_norm(1.0),
                       optax.adamw(schedule, weight_decay=cfg.weight_decay))


def augment(x: jax.Array, key: jax.Array, crop: int, flip: bool) -> jax.Array:
    """Random shifts of up to `crop` pixels (zero fill) and horizontal flips of a batch
    [B, H, W, C], as in He et al. 2016 section 4.2 (pad 4, random 32x32 crop, flip)."""
    b, h, w, _ = x.shape
    k_shift, k_flip = jax.random.split(key)
    if crop:
        padded = jnp.pad(x, ((0, 0), (crop, crop), (crop, crop), (0, 0)))
        offsets = jax.random.randint(k_shift, (b, 2), 0, 2 * crop + 1)
        x = jax.vmap(lambda img, o: jax.lax.dynamic_slice(
            img, (o[0], o[1], 0), (h, w, img.shape[-1])))(padded, offsets)
    if flip:
        mirror = jax.random.bernoulli(k_flip, 0.5, (b, 1, 1, 1))
        x = jnp.where(mirror, x[:, :, ::-1], x)
    return x


def _make_step(module: nn.Module, loss_fn, tx: optax.GradientTransformation,
               train_kwargs: Mapping[str, Any], collections: tuple[str, ...],
               crop: int = 0, flip: bool = False):
    """step(params, state, opt_state, x_all, y_all, idx, key) -> (params, state, opt_state,
    loss): one AdamW step on the examples `idx`. `state` holds the `collections` other than
    params (e.g. batch_stats), applied as mutable and returned updated; `key` draws the
    augmentation (unused without it)."""
    kwargs = dict(train_kwargs)

    @jax.jit
    def step(params, state, opt_state, x_all, y_all, idx, key):
        x, y = x_all[idx], y_all[idx]
        if crop or flip:
            x = augment(x, key, crop, flip)

        def objective(p):
            if collections:
                out, new_state = module.apply({"params": p, **state}, x, **kwargs,
                                              mutable=list(collections))
            else:
                out, new_state = module.apply({"params": p}, x, **kwargs), state
            return loss_fn(out, y), dict(new_state)

        (loss, state), grads = jax.value_and_grad(objective, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), state, opt_state, loss

    return step


def train_step(module: nn.Module, loss_fn, tx: optax.GradientTransformation):
    """A jitted step(params, opt_state, x_all, y_all, idx) -> (params, opt_state, loss) of plain
    training on the examples `idx` of a stateless module (the baseline's step without model
    state or augmentation, and the reference step bench_engine times)."""
    inner = _make_step(module, loss_fn, tx, {}, ())

    @jax.jit
    def step(params, opt_state, x_all, y_all, idx):
        params, _, opt_state, loss = inner(params, {}, opt_state, x_all, y_all, idx, None)
        return params, opt_state, loss

    return step


def batch_order(n: int, batch_size: int, steps: int, seed: int) -> np.ndarray:
    """[steps, batch] example indices: seeded epochs of a permutation, no example twice per epoch."""
    batch_size = min(batch_size, n)
    per_epoch = n // batch_size
    epochs = -(-steps // per_epoch)
    rng = np.random.default_rng(seed)
    rows = [rng.permutation(n)[: per_epoch * batch_size].reshape(per_epoch, batch_size)
            for _ in range(epochs)]
    return np.concatenate(rows)[:steps].astype(np.int32)


def fit(task: Task, variables: Any = None, log_every: int = 0) -> tuple[dict[str, Any], dict[str, Any]]:
    """Train from fresh (or given) variables for task.train.steps; returns (variables, stats).

    Params follow AdamW; the other collections (BatchNorm running averages) are updated by
    module.apply(..., **task.train_kwargs, mutable=...) at every step. `variables` may be a
    variables dict or a bare params tree (models.task.split_variables).
    """
    cfg = task.train
    params, state = split_variables(task.init_variables() if variables is None else variables)
    tx = make_optimizer(cfg)
    opt_state = tx.init(params)
    step = _make_step(task.module, task.loss, tx, task.train_kwargs, tuple(state),
                      cfg.crop, cfg.flip)
    x_all, y_all = jnp.asarray(task.data.x_train), jnp.asarray(task.data.y_train)
    order = batch_order(len(task.data.x_train), cfg.batch_size, cfg.steps, cfg.seed)
    key = jax.random.PRNGKey(cfg.seed) if cfg.crop or cfg.flip else None
    t0 = time.perf_counter()
    loss = jnp.nan
    for i in range(cfg.steps):
        params, state, opt_state, loss = step(params, state, opt_state, x_all, y_all, order[i],
                                              None if key is None else jax.random.fold_in(key, i))
        if log_every and (i + 1) % log_every == 0:
            print(f"  step {i + 1}/{cfg.steps} loss {float(loss):.4f}", flush=True)
    jax.block_until_ready((params, state))
    return join_variables(params, state), {"steps": cfg.steps, "final_loss": float(loss),
                                           "train_seconds": time.perf_counter() - t0}


@functools.lru_cache(maxsize=32)
def _eval_fn(module: nn.Module, metric, kwargs: tuple[tuple[str, Any], ...]):
    @jax.jit
    def run(variables, x, y):
        return metric(module.apply(variables, x, **dict(kwargs)), y)

    return run


def per_example_metric(task: Task, variables: Any, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """[N] task.metric of every example, in fixed-size batches (the last one padded), in
    evaluation mode (task.eval_kwargs). `variables`: a variables dict or a bare params tree."""
    params, state = split_variables(variables)
    variables = join_variables(params, state)
    n = len(x)
    batch = int(max(1, min(n, EVAL_ELEMENTS // max(1, int(np.prod(x.shape[1:]))))))
    run = _eval_fn(task.module, task.metric, tuple(sorted(task.eval_kwargs.items())))
    out = []
    for start in range(0, n, batch):
        xb, yb = x[start:start + batch], y[start:start + batch]
        pad = batch - len(xb)
        if pad:
            xb = np.concatenate([xb, np.repeat(xb[-1:], pad, 0)])
            yb = np.concatenate([yb, np.repeat(yb[-1:], pad, 0)])
        try:
            out.append(np.asarray(run(variables, xb, yb))[: batch - pad])
        except flax.errors.ScopeCollectionNotFound:
            raise ModelError(f"{task.name} has model state besides its params: pass the whole "
                             "variables dict {'params': ..., 'batch_stats': ...}") from None
    return np.concatenate(out)


def evaluate(task: Task, variables: Any, split: str = "test") -> float:
    """Mean of task.metric over a split: "train", "val" or "test" (variables dict or params)."""
    if split not in ("train", "val", "test"):
        raise ModelError(f"unknown split {split!r}: choose train, val or test")
    x, y = getattr(task.data, f"x_{split}"), getattr(task.data, f"y_{split}")
    return float(per_example_metric(task, variables, x, y).mean())


def save_params(tree: Any, path: str | os.PathLike) -> None:
    """Write a nested dict of arrays (params, or a whole variables dict) as safetensors with
    '/'-joined keys ("fc1/kernel", or "params/fc1/kernel", "batch_stats/bn1/mean")."""
    from safetensors.numpy import save_file

    flat = traverse_util.flatten_dict(tree, sep="/")
    save_file({k: np.ascontiguousarray(np.asarray(v)) for k, v in flat.items()}, str(path))


def load_params(path: str | os.PathLike, like: Any) -> Any:
    """Read safetensors written by save_params into the structure of `like`.

    Raises ValueError when the names or shapes differ from `like`.
    """
    from safetensors.numpy import load_file

    flat = load_file(str(path))
    want = traverse_util.flatten_dict(like, sep="/")
    if set(flat) != set(want):
        missing, extra = sorted(set(want) - set(flat)), sorted(set(flat) - set(want))
        which = (f"missing {missing[0]!r}" if missing else f"unexpected {extra[0]!r}")
        raise ValueError(f"{path}: parameter names differ from the model's ({which}, "
                         f"{len(missing)} missing, {len(extra)} unexpected)")
    for k, v in want.items():
        if tuple(flat[k].shape) != tuple(v.shape):
            raise ValueError(f"{path}: {k} has shape {flat[k].shape}, model has {v.shape}")
    return traverse_util.unflatten_dict({k: jnp.asarray(flat[k]) for k in want}, sep="/")


def _read_cache(task: Task, entry: Path) -> tuple[dict[str, Any], dict[str, Any]] | None:
    if not (entry / PARAMS_FILE).is_file() or not (entry / META_FILE).is_file():
        return None
    from safetensors import SafetensorError

    try:
        meta = json.loads((entry / META_FILE).read_text())
        meta = {k: meta[k] for k in ("val_metric", "test_metric", "train_seconds")}
        variables = load_params(entry / PARAMS_FILE, jax.eval_shape(task.init_variables))
    except (ValueError, OSError, KeyError, TypeError, SafetensorError):
        return None  # a stale or broken entry: train again and overwrite it
    return variables, meta


def _write_cache(entry: Path, variables: dict[str, Any], meta: dict[str, Any]) -> None:
    """Write into a temporary directory, then rename: readers never see half an entry."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=entry.name + ".", dir=entry.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache is shared like results/
    save_params(variables, tmp / PARAMS_FILE)
    (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True, default=str))
    if entry.exists():
        shutil.rmtree(entry, ignore_errors=True)
    try:
        os.replace(tmp, entry)
    except OSError:  # another process wrote the same entry first: theirs is as good
        shutil.rmtree(tmp, ignore_errors=True)


def train_baseline(task: Task, cache_dir: str | os.PathLike = "results/cache",
                   force: bool = False, log_every: int = 0) -> tuple[dict[str, Any], dict[str, Any]]:
    """The trained dense baseline of a task: loaded from the cache, or trained and cached.

    Returns (variables, info). variables is always a full Flax variables dict:
    {"params": ...} plus the module's other collections ("batch_stats" for BatchNorm).
    info: cache_key, cache_path, loaded, val_metric, test_metric, train_seconds, steps_run.
    """
    key = cache_key(task)
    entry = Path(cache_dir) / key
    if not force:
        hit = _read_cache(task, entry)
        if hit is not None:
            variables, meta = hit
            return variables, {**meta, "cache_key": key, "cache_path": str(entry), "loaded": True,
                               "steps_run": 0, "metric_name": task.metric_name}
    variables, stats = fit(task, log_every=log_every)
    info = {
        "cache_key": key, "cache_path": str(entry), "loaded": False,
        "val_metric": evaluate(task, variables, "val"),
        "test_metric": evaluate(task, variables, "test"),
        "train_seconds": stats["train_seconds"], "steps_run": stats["steps"],
        "metric_name": task.metric_name,
    }
    meta = {**info, "model": task.name, "dataset": task.data.name, "hparams": task.hparams,
            "train": dataclasses.asdict(task.train), "seed": task.data.seed,
            "data_fingerprint": task.data.fingerprint(), "final_loss": stats["final_loss"],
            "data_info": task.data.info, "format": 2}
    meta.pop("loaded"), meta.pop("steps_run")
    _write_cache(entry, variables, meta)
    return variables, info


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def user_baseline(task: Task, path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """The user's own trained weights for a zoo model in place of the cached baseline.

    The file is safetensors with '/'-joined names as `save_params` writes them: the full
    variables as the baseline cache holds them ("params/fc1/kernel", "batch_stats/..."), or,
    for a model without other collections, the bare params of older versions ("fc1/kernel").
    Checked name by name and shape by shape against the model; returns (variables, info),
    info shaped like train_baseline's. Raises a one-line ModelError.
    """
    from safetensors import SafetensorError, safe_open

    fix = f"give the weights of {task.name} on {task.data.name} as `hwcompress train` saves them"
    like = jax.eval_shape(task.init_variables)
    params_like, state_like = split_variables(like)
    try:
        digest = file_sha256(path)
        with safe_open(str(path), framework="numpy") as f:
            names = list(f.keys())
        if any(n.startswith("params/") for n in names) or state_like:
            variables = load_params(path, like)
        else:  # bare params, as older versions saved a stateless model
            variables = join_variables(load_params(path, params_like), {})
    except OSError as e:
        raise ModelError(f"--weights {path}: cannot read it ({e.strerror or e}): {fix}") from None
    except (SafetensorError, ValueError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if isinstance(e, SafetensorError):
            msg = f"{path}: not a safetensors file ({msg})"
        raise ModelError(f"--weights {msg}: {fix}") from None
    return variables, {
        "cache_key": f"weights-{digest[:16]}", "cache_path": str(path), "loaded": True,
        "val_metric": evaluate(task, variables, "val"),
        "test_metric": evaluate(task, variables, "test"),
        "train_seconds": 0.0, "steps_run": 0, "metric_name": task.metric_name, "sha256": digest,
    }
