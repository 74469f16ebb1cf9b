"""The pure pieces of the fine-tuning step that need no Engine: the plan-axis vmap, the batch
order, masking, the distillation loss, and XLA options for the once-per-trial functions."""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from models.task import Task
from search.compression.layers import Layer, get_path, set_path


def over_plans(f, k: int, in_axes: tuple, single_in: tuple = (), single_out: bool = False):
    """vmap f over the plan axis of the arguments with in_axes 0.

    For k == 1 nothing is vmapped (no batching rules at all): plan-axis arguments are
    squeezed, and those numbered in single_in (and the outputs, with single_out) are kept as
    one plan's values with no plan axis. The fine-tuning state lives that way between steps:
    a state squeezed and re-expanded inside the step kept XLA from updating the donated
    buffers in place, and it copied the Adam moments and the kernels every step.
    """
    if k > 1:
        return jax.vmap(f, in_axes=in_axes)

    def g(*args):
        args = [jax.tree.map(lambda a: a[0], x) if ax == 0 and i not in single_in else x
                for i, (x, ax) in enumerate(zip(args, in_axes))]
        out = f(*args)
        return out if single_out else jax.tree.map(lambda a: a[None], out)

    return g


def once_per_trial_options() -> dict | None:
    """XLA options for prepare and evaluate, which run once per trial (evaluate once per
    chunk of the split). On CPU, XLA's older loop emitters compile them in about two thirds
    of the time of its MLIR fusion emitters, and LLVM -O1 takes off another part (lenet5:
    prepare 1.5 s instead of 1.9 s, evaluate 0.4 s instead of 0.8 s); neither made them
    measurably slower (evaluating 5000 Fashion-MNIST images: lenet5 0.97 s against 1.02 s,
    lenet300 0.24 s either way). Not for the step, which runs hundreds of times per trial:
    its update and activation fusions ran slower with the old emitters (lenet300/Fashion-MNIST
    batch 256: 1.24x a plain step instead of 1.14x) and lenet5's at -O1 (1.35x)."""
    if jax.default_backend() == "cpu":
        return {"xla_cpu_use_fusion_emitters": False, "xla_backend_optimization_level": 1}
    return None


def batch_table(n: int, batch: int, steps: int, seed: int) -> np.ndarray:
    """[steps, batch] training indices: shuffled epochs, concatenated."""
    need = max(steps, 1) * batch
    rng = np.random.default_rng(seed)
    idx = np.concatenate([rng.permutation(n) for _ in range(-(-need // n))])
    return idx[:need].reshape(max(steps, 1), batch).astype(np.int32)


def masked(params, masks: dict, layers: Sequence[Layer], channel=None):
    """params with every layer's kernel multiplied by its mask; with `channel` ([L] bool: the
    plan prunes the layer by channel), removed channels' biases and BatchNorms zeroed too
    (zero_removed)."""
    for l in layers:
        n = node(params, l)
        params = set_node(params, l, {**n, "kernel": n["kernel"] * masks[l.name]})
    return params if channel is None else zero_removed(params, masks, layers, channel)


def zero_removed(params, masks: dict, layers: Sequence[Layer], channel):
    """params in which every output channel a channel-pruned layer removed (`channel` [L] bool;
    a removed channel: its kernel column all masked) is exactly 0: the layer's bias and the
    scale and shift of the BatchNorms normalising its output (Layer.norms) zeroed with the
    column, as DepGraph removes a channel from every member (Fang et al., CVPR 2023). Otherwise
    the channel would carry a constant that the next conv, zero-padded at the borders, sees as a
    bias *map*: the export must add it as a full-size elementwise op after the conv (about a
    fifth of a channel-pruned resnet20's latency in onnxruntime) and cannot run the conv as a
    re-quantized integer kernel. An activation with f(0) != 0 after it still leaves a constant."""
    for l in layers:
        if not (l.has_bias or l.norms):
            continue
        m = masks[l.name]
        keep = jnp.where(channel[l.index], jnp.any(m != 0, axis=tuple(range(m.ndim - 1))), True)
        if l.has_bias:
            n = node(params, l)
            params = set_node(params, l, {**n, "bias": n["bias"] * keep.astype(n["bias"].dtype)})
        for p in l.norms:
            bn = get_path(params, p)
            params = set_path(params, p, {**bn, **{k: bn[k] * keep.astype(bn[k].dtype) for k in ("scale", "bias")
                                                     if bn.get(k) is not None}})
    return params


def node(tree, layer: Layer):
    """The params node (a dict with "kernel", maybe "bias") of one layer."""
    return get_path(tree, layer.path)


def set_node(tree, layer: Layer, value):
    """tree with one layer's params node replaced by value."""
    return set_path(tree, layer.path, value)


def distill_loss(out: jax.Array, teacher: jax.Array, temperature: float, task: Task) -> jax.Array:
    """Hinton: T^2 * KL(softmax(teacher/T) || softmax(out/T)); MSE to the teacher for regression."""
    if task.data.kind == "regression":
        return jnp.mean(jnp.square(out - teacher))
    t = temperature
    p = jax.nn.softmax(teacher / t, axis=-1)
    logq = jax.nn.log_softmax(out / t, axis=-1)
    logp = jax.nn.log_softmax(teacher / t, axis=-1)
    return (t * t) * jnp.mean(jnp.sum(p * (logp - logq), axis=-1))
