"""The jitted programs of search.engine.finetune.Engine for one K (see that module's docstring):
`prepare`, `step`, its fused loop `train_n` (`fused`), `evaluate`, `refresh` and `remask`, built
from the model, its layers, the task and the fine-tune config. Plans are arrays passed in, so
one build serves a whole study; the Engine keeps builds in a cache shared by every Engine of the
same model, config and K.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import optax

from models.train import augment
from search.compression import codebook
from search.compression import compress
from search.compression import lowrank
from search.compression import masks as masks_lib
from search.compression.layers import Layer
from search.compression.plan import CHANNEL, CODEBOOK, Plan
from search.engine.config import FinetuneConfig
from search.engine.steps import distill_loss, masked, node, once_per_trial_options, over_plans, set_node, zero_removed

# learned activation ranges train log-scale offsets at this many times the weights' learning
# rate: with Adam's unit-size steps, 5e-4 a step moved a range of 10 by at most 0.1 in 200 steps
LEARNED_RANGE_RATE = 10.0


@dataclass(frozen=True)
class Programs:
    """One K's jitted programs (arguments as Engine passes them)."""

    prepare: Callable  # (plans, base, calib, bn_x, share, bases) -> (trainable, opt_state, frozen, finite)
    step: Callable  # (state, t, frozen, plans, base, xs, ys, table, aug_key) -> (state, t + 1); donates state
    evaluate: Callable  # (trainable, frozen, plans, x, y) -> (metric, (eff, lo, hi), finite)
    refresh: Callable  # (trainable, frozen, plans, calib, bn_x) -> frozen
    remask: Callable  # (trainable, frozen, plans, share) -> (trainable, frozen)
    fused: Callable  # train_n: (state, t, n, frozen, plans, base, xs, ys, table, aug_key) -> (state, t)


def build(model: Any, layers: Sequence[Layer], task: Any, cfg: FinetuneConfig, opt: optax.GradientTransformation,
          k: int, factorizing: bool) -> Programs:
    """The programs for K plans at a time; `factorizing`: whether they project factorized layers
    onto their bases (without it no plan may factorize, and the programs hold no projection)."""

    def prepare_one(plan, base, calib, bn_x, share, bases, any_lr):
        # `share` of the plan's ratio pruned now: 1, or 0 where gradual pruning starts dense
        # (codebook layers are always pruned at once: their kernels become centroids here)
        use = (plan.quant_mode == CODEBOOK) & (plan.weight_bits <= 8)  # [L]
        masks = masks_lib.compute_masks(base, layers, _scaled(plan, use, share))
        # one k-means loop for every layer, skipped (K = 1) when no layer uses a codebook
        ws = [node(base, l)["kernel"] for l in layers]
        ms = [masks[l.name] for l in layers]
        c_all, a_all = jax.lax.cond(
            jnp.any(use), lambda: codebook.kmeans_codebooks(ws, ms, plan.weight_bits),
            lambda: (jnp.zeros((len(layers), codebook.SLOTS), ws[0].dtype),
                     [jnp.zeros(w.shape, jnp.int32) for w in ws]))
        assign = {l.name: jnp.where(use[l.index], a_all[l.index], 0) for l in layers}
        masked = [w * m for w, m in zip(ws, ms)]
        L = len(layers)
        wscale = dict(zip((l.name for l in layers), compress.weight_scales(masked, plan.weight_bits)))
        # a codebook layer's kernel holds its centroids from here on (compress.effective_kernels)
        ks = compress.codebook_kernels(masked, ms, c_all, [assign[l.name] for l in layers], use)
        params = base
        for l, k in zip(layers, ks):
            params = set_node(params, l, {**node(params, l), "kernel": k})
        params = zero_removed(params, masks, layers, plan.granularity == CHANNEL)
        q0 = compress.QuantState(assign, wscale, jnp.zeros(L), jnp.zeros(L))
        # each factorizable layer's basis cut to the plan's rank, fixed for the trial
        qm = {lowrank.basis_key(l.name, f): lowrank.masked_basis(bases[lowrank.basis_key(l.name, f)], plan.rank[l.index])
              for l in layers if factorizing for f in lowrank.forms_of(l)}
        eff = compress.effective_params(params, masks, q0, layers, plan, None, qm, any_lr)
        bn = model.bn_statistics(eff, bn_x) if cfg.adaptive_bn else {}  # adaptive BN (EagleEye)
        lo, hi = compress.calibrate_ranges(model, layers, eff, calib, bn)
        trainable = {"params": params}
        if learned:  # log-scale offsets of the calibrated ranges, trained with the weights
            trainable["act"] = {"lo": jnp.zeros(L), "hi": jnp.zeros(L)}
        frozen = {"masks": masks, "q": compress.QuantState(assign, wscale, lo, hi), "bn": bn, "lowrank": qm}
        return trainable, opt.init(trainable), frozen, jnp.array(True)

    learned = cfg.act_ranges == "learned"

    def forward(trainable, frozen, plan, x, any_cb, any_lr):
        eff = compress.effective_params(trainable["params"], frozen["masks"], frozen["q"], layers, plan, any_cb,
                                        frozen["lowrank"], any_lr)
        lo, hi = act_ranges(trainable, frozen["q"])
        return compress.quantized_apply(model, layers, eff, lo, hi, plan.act_bits, x, frozen["bn"], learned)

    def loss_one(trainable, frozen, plan, x, y, teacher, any_cb, any_lr):
        out = forward(trainable, frozen, plan, x, any_cb, any_lr)
        loss = task.loss(out, y)
        if cfg.distill:
            loss = (1 - cfg.alpha) * loss + cfg.alpha * distill_loss(out, teacher, cfg.temperature, task)
        return loss

    def step_one(trainable, opt_state, frozen, finite, plan, x, y, teacher, any_cb, any_lr):
        loss, grads = jax.value_and_grad(loss_one)(trainable, frozen, plan, x, y, teacher, any_cb, any_lr)
        updates, opt_state = opt.update(grads, opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        # pruned weights back to exactly 0 (the kernels' gradients are not masked, and
        # Adam's moments may move them): one read of each mask per step, fused with the update
        trainable = {**trainable, "params": masked(trainable["params"], frozen["masks"], layers,
                                                   plan.granularity == CHANNEL)}
        return trainable, opt_state, finite & jnp.isfinite(loss)

    # K = 1: trainable, optimizer state, frozen and the finite flag carry no plan axis
    step_k = over_plans(step_one, k, (0, 0, 0, 0, 0, None, None, None, None, None), single_in=(0, 1, 2, 3),
                         single_out=True)

    crop, flip = (task.train.crop, task.train.flip) if cfg.augment else (0, False)

    def step(state, t, frozen, plans, base, xs, ys, table, aug_key):
        idx = table[t]
        x, y = xs[idx], ys[idx]
        if crop or flip:  # the task's own training augmentation, drawn anew every step
            x = augment(x, jax.random.fold_in(aug_key, t), crop, flip)
        teacher = model.apply(base, x) if cfg.distill else None
        trainable, opt_state, finite = state
        # whether any plan of the group trains a codebook: one unbatched flag, so that a
        # group without one skips the cluster gradients (compress.effective_kernels)
        any_cb = jnp.any(compress.weight_branch(plans.weight_bits, plans.quant_mode) == compress.W_CODEBOOK)
        return step_k(trainable, opt_state, frozen, finite, plans, x, y, teacher, any_cb, compress.lowrank_flags(plans)), t + 1

    def train_n(state, t, n, frozen, plans, base, xs, ys, table, aug_key):
        # the fused loop: n steps in one device call (n is traced: one compile for every
        # chunk length); it stops early once every plan of the group has diverged
        def cond(c):
            return (c[0] < n) & jnp.any(c[1][0][2])

        def body(c):
            return c[0] + 1, step(c[1][0], c[1][1], frozen, plans, base, xs, ys, table, aug_key)

        return jax.lax.while_loop(cond, body, (jnp.int32(0), (state, t)))[1]

    def evaluate_one(trainable, frozen, plan, x, y, any_lr):
        # also the effective params and whether every trained value is finite, so that
        # return_models and the NaN check need no compiles of their own
        eff = compress.effective_params(trainable["params"], frozen["masks"], frozen["q"], layers, plan, None,
                                        frozen["lowrank"], any_lr)
        lo, hi = act_ranges(trainable, frozen["q"])
        out = compress.quantized_apply(model, layers, eff, lo, hi, plan.act_bits, x, frozen["bn"])
        ok = jnp.all(jnp.isfinite(jnp.concatenate([a.ravel() for a in jax.tree.leaves(trainable)])))
        return task.metric(out, y), (eff, lo, hi), ok

    def refresh_one(trainable, frozen, plan, calib, bn_x, any_lr):
        # what prepare fixed from the freshly compressed weights, estimated again on the
        # weights now: BatchNorm statistics (adaptive BN) and activation ranges
        eff = compress.effective_params(trainable["params"], frozen["masks"], frozen["q"], layers, plan, None,
                                        frozen["lowrank"], any_lr)
        bn = model.bn_statistics(eff, bn_x) if cfg.adaptive_bn else frozen["bn"]
        q = frozen["q"]
        # learned ranges are offsets of the calibrated ones: recalibrating would move them
        lo, hi = (q.act_lo, q.act_hi) if learned else compress.calibrate_ranges(model, layers, eff, calib, bn)
        return {**frozen, "bn": bn, "q": compress.QuantState(q.assign, q.w_scale, lo, hi)}

    def remask_one(trainable, frozen, plan, share):
        # gradual pruning (search.engine.schedule): masks and weight scales from the weights
        # now, at `share` of the plan's ratio; codebook layers keep theirs
        use = (plan.quant_mode == CODEBOOK) & (plan.weight_bits <= 8)
        new = masks_lib.compute_masks(trainable["params"], layers, _scaled(plan, use, share))
        ms = {l.name: jnp.where(use[l.index], frozen["masks"][l.name], new[l.name]) for l in layers}
        params = masked(trainable["params"], ms, layers, plan.granularity == CHANNEL)
        ws = compress.weight_scales([node(params, l)["kernel"] for l in layers], plan.weight_bits)
        q = frozen["q"]
        q = compress.QuantState(q.assign, dict(zip((l.name for l in layers), ws)), q.act_lo, q.act_hi)
        return {**trainable, "params": params}, {**frozen, "masks": ms, "q": q}

    once = once_per_trial_options()
    remask = jax.jit(over_plans(remask_one, k, (0, 0, 0, None), single_in=(0, 1), single_out=True),
                     compiler_options=once)
    # prepare, refresh and evaluate take the group's unbatched per-form "any plan factorizes" flags
    # (compress.effective_params), computed from the plans as the step computes its own
    refresh_k = over_plans(refresh_one, k, (0, 0, 0, None, None, None), single_in=(0, 1), single_out=True)
    prepare_k = over_plans(prepare_one, k, (0, None, None, None, None, None, None), single_out=True)
    evaluate_k = over_plans(evaluate_one, k, (0, 0, 0, None, None, None), single_in=(0, 1))
    return Programs(
        prepare=jax.jit(lambda plans, base, calib, bn_x, share, bases: prepare_k(
            plans, base, calib, bn_x, share, bases, compress.lowrank_flags(plans)), compiler_options=once),
        step=jax.jit(step, donate_argnums=(0,)),
        evaluate=jax.jit(lambda tr, fr, plans, x, y: evaluate_k(tr, fr, plans, x, y, compress.lowrank_flags(plans)),
                         compiler_options=once),
        refresh=jax.jit(lambda tr, fr, plans, calib, bn_x: refresh_k(tr, fr, plans, calib, bn_x,
                                                                      compress.lowrank_flags(plans)),
                        compiler_options=once),
        remask=remask,
        fused=jax.jit(train_n, donate_argnums=(0,)),
    )


def act_ranges(trainable: dict, q: compress.QuantState) -> tuple[jax.Array, jax.Array]:
    """([L] lo, [L] hi) each layer's input is quantized on: the calibrated range, times
    exp(LEARNED_RANGE_RATE * offset) where FinetuneConfig.act_ranges == "learned"."""
    if "act" not in trainable:
        return q.act_lo, q.act_hi
    a = trainable["act"]
    return (q.act_lo * jnp.exp(LEARNED_RANGE_RATE * a["lo"]), q.act_hi * jnp.exp(LEARNED_RANGE_RATE * a["hi"]))


def _scaled(plan: Plan, use: jax.Array, share: jax.Array) -> Plan:
    """The plan with `share` of its ratio, except the layers where `use` is set."""
    return dataclasses.replace(plan, ratio=jnp.where(use, plan.ratio, plan.ratio * share))
