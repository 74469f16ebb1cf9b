"""Fine-tune and evaluate K compression plans at once, with one compile per (task, K, loop).

Five jitted functions (built in search.engine.programs) serve a whole study: `prepare` (masks, codebooks, activation ranges,
adaptive BN statistics, optimizer state for K plans), `step` (one fine-tune step of K plans;
with the "fused" loop, `train_n`: up to a chunk of those steps in one `lax.while_loop` on the
device, so the device does not wait for the host between steps), `refresh` (halfway through
fine-tuning, ranges and BN statistics estimated again), `remask` (gradual pruning's mask
updates, search.engine.schedule) and `evaluate` (the metric
of K plans on one chunk of a split, with their effective params and a finiteness flag, so
nothing else compiles; rungs, search.engine.rungs, reuse it part-way through fine-tuning).
Plans are arrays passed in, so new plans never recompile. K and the loop driver are measured
per backend, model and batch (`Engine._choose`): on an H200, a fused loop of one plan ran 2-3x
faster than Python-driven steps; on this CPU, conv backward passes inside a loop ran 2-20x
slower while an MLP's were faster. With
K = 1 the functions are not vmapped at all, so a `lax.cond` (codebook k-means, the codebook
gradient) really skips what a plan does not use, and the fine-tuning state carries no plan
axis between steps.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from models.task import Task
from search.compression import compress
from search.compression import lowrank
from search.errors import UserError
from search.engine import choice, programs
from search.engine.choice import forget_measured_k  # noqa: F401  (re-exported: tests and benches use it)
from search.engine.config import FinetuneConfig
from search.engine.schedule import mask_updates
from search.engine.rungs import GroupRun, RungCallback, run_in_rungs
from search.engine.steps import batch_table, node
from search.compression.layers import Layer, discover_layers, task_model
from search.compression.plan import Plan, dense_plan, stack_plans, unstack_plans, validate_plan


@dataclass(frozen=True)
class CompressedModel:
    """One compressed candidate, everything the exporter needs to pack it."""

    params: Any  # effective params (numpy): kernels masked and fake-quantized, as computed
    masks: dict[str, np.ndarray]  # {layer name: 0/1 mask like the kernel}
    act_ranges: dict[str, tuple[float, float]]  # {layer name: calibrated (lo, hi) of its input}
    weight_scales: dict[str, np.ndarray]  # {layer name: [C] grid scale per output channel (fixed per trial)}
    bn_stats: dict[str, tuple[np.ndarray, np.ndarray]]  # {BatchNorm path: (mean, var)} adapted to the plan ({}: the model's own)
    plan: Plan  # the plan, arrays of shape [L]
    metric: float  # validation metric after fine-tuning
    finite: bool  # False when fine-tuning produced NaN/inf
    # {layer name: (form, A [m, r], B [r, n])} of every factorized layer (plan.rank < 1): the form
    # (plan.FORMS) and the factors its kernel in `params` is the product of, rearranged
    # (search.compression.lowrank.factors, .from_matrix)
    factors: dict[str, tuple[int, np.ndarray, np.ndarray]] = dataclasses.field(default_factory=dict)


@dataclass
class EngineResult:
    """Per-plan outcome of `Engine.run` / `Engine.evaluate`, arrays of shape [P]."""

    metric: np.ndarray  # task metric on the split (NaN when not finite)
    finite: np.ndarray  # bool: False when fine-tuning hit NaN/inf
    reason: list[str | None]  # why a plan failed, None when it did not
    models: list[CompressedModel] | None = None  # when return_models=True
    seconds: float = 0.0  # wall time of the call
    steps: np.ndarray | None = None  # with rungs: [P] fine-tune steps behind each metric (a rung for a stopped plan)
    stopped: np.ndarray | None = None  # with rungs: [P] bool, stopped at a rung by on_rung
    test_metric: np.ndarray | None = None  # with also_test: [P] metric on the test split (NaN: none)
    # with rungs: [P] plans per vmapped step of the group that finished each plan (the rungs may
    # move a plan from a group of K to one of its own: search.engine.rungs.regroup)
    k: np.ndarray | None = None


# a fused chunk runs about this long, so progress, NaN checks and Ctrl-C come back between chunks
CHUNK_SECONDS = 0.5
TIMED_RUN_SECONDS = 0.1  # each timed run of the K and loop choice lasts about this long


# jitted functions shared by every Engine of the same model, loss, metric, config and K, so a
# study that builds a new Engine per batch of trials still compiles once
_FN_CACHE: dict[tuple, programs.Programs] = {}
_FN_CACHE_SIZE = 16

class Engine:
    """Compress and fine-tune plans for one task; see the module docstring."""

    def __init__(self, task: Task, base_params: Any = None, config: FinetuneConfig = FinetuneConfig(),
                 k_file: str | os.PathLike | None = None, factorize: bool = False):
        """`k_file`: a JSON file that remembers the measured K per machine and task (e.g.
        results/cache/engine_k.json); None measures once per process. `factorize`: plans will
        factorize layers (plan.rank < 1; a study whose space offers ranks), so the functions
        are compiled with the low-rank projection from the start. Without it they are compiled
        without it (the projection roughly doubled LeNet-5's compile time), and the first
        factorized plan compiles them once more, with it."""
        config.check()
        task.check(config.batch_size if config.steps else None, base_params)  # every split, up front
        self.task, self.config = task, config
        self._k_file = Path(k_file) if k_file is not None else None
        self.model, base_params = task_model(task, base_params)
        if base_params is None:
            raise UserError("Engine needs the trained weights; pass base_params (see models.train.train_baseline)")
        # jax arrays as they are, host arrays by device_put: jnp.asarray compiled a small XLA
        # program per leaf (a tenth of a second per study, all told, with the data below)
        self.base_params = jax.tree.map(
            lambda a: a if isinstance(a, jax.Array) else jax.device_put(np.asarray(a)), base_params)
        data = task.data
        self.layers: tuple[Layer, ...] = discover_layers(
            self.model, self.base_params, jax.ShapeDtypeStruct((1, *data.input_shape), jnp.float32))
        self._x = jax.device_put(np.asarray(data.x_train, np.float32))
        self._y = jax.device_put(np.asarray(data.y_train))
        self._calib = jax.device_put(np.asarray(data.x_train[: min(config.calib_examples, len(data.x_train))], np.float32))
        self._bn_x = jax.device_put(np.asarray(data.x_train[: min(config.bn_examples, len(data.x_train))], np.float32))
        self._table = jax.device_put(batch_table(len(data.x_train), config.batch_size, config.steps, config.seed))
        self._aug_key = jax.random.PRNGKey(config.seed)  # an array: a new seed does not recompile
        self._eval_batch = min(config.eval_batch, len(data.x_val))
        self._opt = optax.adam(optax.cosine_decay_schedule(config.learning_rate, max(config.steps, 1))
                               if config.schedule == "cosine" else config.learning_rate)
        self._fns: dict[int, tuple] = {}  # jitted (prepare, step, evaluate) per K
        self._refresh: dict[int, Any] = {}  # jitted refresh of BN statistics and ranges, per K
        self._remask: dict[int, Any] = {}  # jitted mask update of gradual pruning, per K
        self._fused: dict[int, Any] = {}  # jitted fused loop of up to n steps, per K
        self._chunk: dict[int, int] = {}  # per K: steps per fused call, adapted so that a call takes about CHUNK_SECONDS
        # the SVD bases of factorizable layers (search.compression.lowrank): none until a plan
        # factorizes (or `factorize`), then the pretrained kernels' singular vectors, once per engine
        self._bases: dict = {}
        self._have_bases = False  # also: whether the functions are compiled with the projection
        if factorize:
            self._load_bases()
        self._updates = mask_updates(config)  # {step: share of the ratio}: gradual pruning's mask updates
        self.k_timings: dict[int, float] = {}  # seconds per plan-step measured when choosing K (chosen loop)
        self.loop_timings: dict[str, float] = {}  # seconds per plan-step of each loop, at the first K measured
        # seconds per plan-step per K behind the choice, measured or remembered in the k_file ({}: unknown)
        self.known_timings: dict[int, float] = {}
        self.k, self.loop = self._choose()

    # ---- the three jitted functions, built once per K ----------------------------------
    def _cache_key(self, k: int) -> tuple:
        m = self.model
        ident = m._graphdef if m.kind == "nnx" else m.source
        c = self.config
        # the other collections (BatchNorm statistics) are constants of the compiled functions
        state = hashlib.sha256(b"".join(np.asarray(a).tobytes() for a in jax.tree.leaves(m.state))).hexdigest()
        return (m.kind, ident, repr(sorted(m.kwargs.items())), state, self.layers, self.task.loss, self.task.metric,
                self.task.data.kind, c.learning_rate,
                # the schedule shapes the step program only; an engine that never steps shares its programs
                c.schedule if c.steps else None, c.steps if c.schedule == "cosine" else 0, c.distill, c.temperature, c.alpha, c.adaptive_bn, c.act_ranges,
                (self.task.train.crop, self.task.train.flip) if c.augment else None, k, self._have_bases)

    def _functions(self, k: int) -> tuple:
        if k in self._fns:
            return self._fns[k]
        key = self._cache_key(k)
        if key not in _FN_CACHE:
            if len(_FN_CACHE) >= _FN_CACHE_SIZE:
                _FN_CACHE.pop(next(iter(_FN_CACHE)))
            _FN_CACHE[key] = programs.build(self.model, self.layers, self.task, self.config, self._opt, k,
                                            self._have_bases)
        p = _FN_CACHE[key]
        self._fns[k] = (p.prepare, p.step, p.evaluate)
        self._refresh[k], self._remask[k], self._fused[k] = p.refresh, p.remask, p.fused
        return self._fns[k]

    # ---- public API ----------------------------------------------------------------------
    def run(self, plans: Plan | Sequence[Plan], return_models: bool = False, split: str = "val",
            finetune: bool = True, rungs: Sequence[int] = (), on_rung: RungCallback | None = None,
            also_test: bool = False) -> EngineResult:
        """Compress, fine-tune (config.steps) and evaluate every plan, K at a time.

        `rungs`: ascending fine-tune steps below config.steps at which every plan is also
        evaluated on the validation split, and `on_rung(step, metric [P], live [P])` says which
        go on (search.engine.rungs); the result's `steps` and `stopped` say where each ended.
        `also_test`: the finished plans' test metric too (`test_metric`; shown, never ranked on).
        """
        plans = self._check_plans(plans)
        t0 = time.perf_counter()
        if rungs and finetune and self.config.steps > 0:
            if return_models:
                raise ValueError("rungs and return_models do not go together: rungs are for the search loop")
            metric, ok, steps, stopped, test, ks = run_in_rungs(self, plans, rungs, on_rung, split, also_test)
            return EngineResult(metric, ok, _reasons(ok), None, time.perf_counter() - t0, steps=steps, stopped=stopped,
                                test_metric=test, k=ks)
        metrics, finite, models, tests = [], [], [], []
        p = plans.batch_shape[0]
        for start in range(0, p, self.k):
            g = self._start(self._slice(plans, start), finetune)
            if finetune:
                self._train(g, self.config.steps)
            m, f, trained = self._evaluate(g, split)
            n = min(self.k, p - start)
            tests.append(np.where(f, self._evaluate(g, "test")[0], np.nan)[:n] if also_test else np.full(n, np.nan))
            metrics.append(m[:n])
            finite.append(f[:n])
            if return_models:
                models += self._models(g.plans, trained, g.frozen, m, f, n, g.state[0])
        metric = np.concatenate(metrics)
        ok = np.concatenate(finite)
        metric = np.where(ok, metric, np.nan)
        return EngineResult(metric, ok, _reasons(ok), models if return_models else None, time.perf_counter() - t0,
                            test_metric=np.concatenate(tests) if also_test else None)

    def evaluate(self, plans: Plan | Sequence[Plan], split: str = "val", return_models: bool = False
                 ) -> EngineResult:
        """Compress without fine-tuning and evaluate on a split ("val" or "test")."""
        return self.run(plans, return_models=return_models, split=split, finetune=False)

    def predict(self, cm: CompressedModel, x: Any) -> jax.Array:
        """Outputs of a compressed model (effective params + activation quantization) on x."""
        lo = jnp.array([cm.act_ranges[l.name][0] for l in self.layers])
        hi = jnp.array([cm.act_ranges[l.name][1] for l in self.layers])
        return compress.quantized_apply(self.model, self.layers, jax.tree.map(jnp.asarray, cm.params),
                                        lo, hi, jnp.asarray(cm.plan.act_bits), jnp.asarray(x, jnp.float32),
                                        jax.tree.map(jnp.asarray, cm.bn_stats))

    # ---- internals -------------------------------------------------------------------------
    def _check_plans(self, plans) -> Plan:
        if not isinstance(plans, Plan):
            plans = stack_plans(list(plans))
        if plans.batch_shape == ():
            plans = stack_plans([plans])
        if plans.num_layers != len(self.layers):
            raise UserError(f"plan has {plans.num_layers} layers but the model has {len(self.layers)} "
                            f"({', '.join(l.name for l in self.layers)}); build plans from engine.layers")
        try:
            lowrank.check_plan(plans, self.layers)  # first: its errors name the layer
            validate_plan(plans, self.layers)
        except ValueError as e:
            raise UserError(str(e)) from None
        if not self._have_bases and np.any(np.asarray(plans.rank) < 1):
            self._load_bases()
        return plans

    def _load_bases(self) -> None:
        """The first factorized plan (or `factorize`): the SVD of every factorizable pretrained
        kernel, once per engine; the functions are built again with the projection."""
        self._bases = jax.device_put(lowrank.bases(self.layers, self.base_params))
        self._have_bases = True
        for fns in (self._fns, self._refresh, self._remask, self._fused):
            fns.clear()

    def _split(self, split: str):
        d = self.task.data
        if split not in ("val", "test"):
            raise UserError(f"split={split!r} is unknown: use 'val' or 'test'")
        return (d.x_val, d.y_val) if split == "val" else (d.x_test, d.y_test)

    def _slice(self, plans: Plan, start: int) -> Plan:
        """Plans start..start+K-1 on the device, the last plan repeated to fill K."""
        idx = np.minimum(np.arange(start, start + self.k), plans.batch_shape[0] - 1)
        return jax.device_put(jax.tree.map(lambda a: np.asarray(a)[idx], plans))

    def _start(self, group: Plan, finetune: bool = True) -> GroupRun:
        """Compress a group of K plans: masks, codebooks, ranges, BN statistics, optimizer state
        (dense masks where gradual pruning will fine-tune them to the plan's ratio)."""
        prepare = self._functions(self.k)[0]
        share = jax.device_put(np.float32(0.0 if finetune and self._updates else 1.0))
        trainable, opt_state, frozen, finite = prepare(group, self.base_params, self._calib, self._bn_x, share, self._bases)
        return GroupRun(group, (trainable, opt_state, finite), jax.device_put(np.int32(0)), frozen)

    def _train(self, g: GroupRun, to: int) -> None:
        """Fine-tune a group from the step it is at to step `to` (<= config.steps)."""
        k = g.k
        step = self._functions(k)[1]
        # halfway, activation ranges (and adaptive BN statistics) are estimated again on the
        # weights fine-tuning has reached: ranges calibrated on the freshly pruned weights
        # clipped the fine-tuned activations (resnet20/digits, every group 50% pruned at
        # 8-bit activations: 0.36 accuracy after 150 steps without, 0.94 with; an estimate
        # after the last step instead cost 3 points: the weights were trained on the old ones)
        # (with gradual pruning: once the last mask update has been made, if that is later)
        mid = self.config.steps // 2 if self.config.steps >= 2 else -1
        mid = max([mid, *self._updates])
        events = sorted({mid, *self._updates})
        i = g.step
        while i < to:
            if i in self._updates:
                trainable, frozen = self._remask[k](g.state[0], g.frozen, g.plans,
                                                         jax.device_put(np.float32(self._updates[i])))
                g.state, g.frozen = (trainable, *g.state[1:]), frozen
            if i == mid:
                g.frozen = self._refresh[k](g.state[0], g.frozen, g.plans, self._calib, self._bn_x)
            end = min([e for e in events if e > i] + [to])  # the steps up to the next event
            if self.loop == "fused":
                self._run_fused(g, end - i)
            else:
                for _ in range(i, end):
                    g.state, g.t = step(g.state, g.t, g.frozen, g.plans, self.base_params, self._x, self._y,
                                        self._table, self._aug_key)
            i = end
        g.step = max(g.step, to)

    def _run_fused(self, g: GroupRun, n: int) -> None:
        """n steps of a group in fused chunks of about CHUNK_SECONDS each: between chunks the
        host gets control back (Ctrl-C), and the chunk length follows the time a chunk took."""
        fused = self._fused[g.k]
        while n > 0:
            chunk = self._chunk.get(g.k, 4)
            c = min(chunk, n)
            t0 = time.perf_counter()
            g.state, g.t = fused(g.state, g.t, np.int32(c), g.frozen, g.plans, self.base_params, self._x,
                                 self._y, self._table, self._aug_key)
            jax.block_until_ready(g.t)
            took = time.perf_counter() - t0
            n -= c
            if c == chunk:  # a full chunk: aim the next one at CHUNK_SECONDS, at most twice as long
                self._chunk[g.k] = int(np.clip(c * CHUNK_SECONDS / max(took, 1e-6), 1, 2 * c))

    def _evaluate(self, g: GroupRun, split: str) -> tuple[np.ndarray, np.ndarray, Any]:
        """(metric [K], finite [K], (effective params, act lo, act hi)) of a group's plans on a split, as they are now."""
        evaluate = self._functions(g.k)[2]
        trainable, _, finite = g.state
        x, y = self._split(split)
        b = self._eval_batch
        total = np.zeros(g.k)
        eff = leaves_ok = None
        for s in range(0, len(x), b):
            xb, yb = x[s:s + b], y[s:s + b]
            n = len(xb)
            if n < b:  # pad to the compiled shape, drop the padding after
                xb = np.concatenate([xb, np.repeat(xb[-1:], b - n, 0)])
                yb = np.concatenate([yb, np.repeat(yb[-1:], b - n, 0)])
            per, eff, leaves_ok = evaluate(trainable, g.frozen, g.plans, jax.device_put(np.asarray(xb, np.float32)),
                                           jax.device_put(np.asarray(yb)))
            total += np.asarray(per, np.float64)[:, :n].sum(axis=1)
        metric = total / len(x)
        ok = np.asarray(finite) & np.asarray(leaves_ok)
        ok &= np.isfinite(metric)
        return metric, ok, eff

    def _models(self, group: Plan, effective, frozen, metric, finite, n: int, trainable) -> list[CompressedModel]:
        effective, frozen, trainable = jax.tree.map(np.asarray, (effective, frozen, trainable["params"]))
        if self.k == 1:  # the state of one plan has no plan axis (see _over_plans)
            frozen, trainable = jax.tree.map(lambda a: a[None], (frozen, trainable))
        out = []
        for i, plan in enumerate(unstack_plans(jax.tree.map(np.asarray, group))[:n]):
            eff, fr, tr = jax.tree.map(lambda a: a[i], (effective, frozen, trainable))
            eff, lo, hi = eff
            key = lambda l: lowrank.basis_key(l.name, int(plan.form[l.index]))
            factors = {l.name: (int(plan.form[l.index]),) + lowrank.factors(
                           node(tr, l)["kernel"], fr["lowrank"][key(l)], int(plan.weight_bits[l.index]), l,
                           int(plan.form[l.index]), float(plan.rank[l.index]), fr["masks"][l.name])
                       for l in self.layers if key(l) in fr["lowrank"] and plan.rank[l.index] < 1}
            out.append(CompressedModel(
                params=eff, masks=fr["masks"],
                act_ranges={l.name: (float(lo[l.index]), float(hi[l.index])) for l in self.layers},
                weight_scales={l.name: fr["q"].w_scale[l.name] for l in self.layers},
                bn_stats={k: tuple(v) for k, v in fr["bn"].items()},
                plan=plan, metric=float(metric[i]), finite=bool(finite[i]), factors=factors))
        return out

    def _choose(self) -> tuple[int, str]:
        """(K, loop): what the config fixes, the rest measured here (search.engine.choice) with
        `_time_steps`, per machine, device kind, task, input shape, batch and kernel shapes."""
        cfg = self.config
        if cfg.k is not None and (cfg.loop is not None or cfg.steps == 0):
            return cfg.k, cfg.loop or "python"  # compress and evaluate only: no loop runs
        key = (jax.default_backend(), jax.devices()[0].device_kind, self.task.name, self.task.data.input_shape,
               cfg.batch_size, cfg.distill, tuple(l.kernel_shape for l in self.layers), cfg.k, cfg.loop)
        c = choice.choose(key, self._time_steps, self._k_file, cfg.k, cfg.loop,
                          lambda: choice.large_k(self.layers, cfg.batch_size))
        self.k_timings, self.loop_timings, self.known_timings = c.k_timings, c.loop_timings, c.known
        return c.k, c.loop

    def _time_steps(self, k: int, loop: str) -> float:
        """Seconds per plan-step of K dense plans with one loop driver: the best of up to 5
        runs (other processes may share the machine) after a warm-up run of 5 steps. A run
        is as many steps as take about TIMED_RUN_SECONDS (at least 5): a run of 5 steps of a
        small model lasted a few milliseconds and the choice between loops followed the noise.
        No new run starts after 3 s, so a slow model is timed once."""
        _, step, _ = self._functions(k)
        prepare, fused = self._fns[k][0], self._fused[k]
        group = jax.device_put(stack_plans([dense_plan(len(self.layers))] * k))
        tr, os_, fr, fin = prepare(group, self.base_params, self._calib, self._bn_x, jnp.float32(1.0), self._bases)
        state, t = (tr, os_, fin), jnp.int32(0)
        args = (fr, group, self.base_params, self._x, self._y, self._table, self._aug_key)

        def steps(state, t, n):  # t may run past the table: indices are clamped, fine for timing
            if loop == "fused":
                return fused(state, t, np.int32(n), *args)
            for _ in range(n):
                state, t = step(state, t, *args)
            return state, t

        state, t = steps(state, t, 5)  # compiles
        jax.block_until_ready(state)
        t0 = time.perf_counter()
        state, t = steps(state, t, 5)
        jax.block_until_ready(state)
        n = int(np.clip(5 * TIMED_RUN_SECONDS / max(time.perf_counter() - t0, 1e-6), 5, 500))
        best, start = np.inf, time.perf_counter()
        for _ in range(5):
            t0 = time.perf_counter()
            state, t = steps(state, t, n)
            jax.block_until_ready(state)
            best = min(best, (time.perf_counter() - t0) / (n * k))
            if time.perf_counter() - start > 3.0:
                break
        if loop == "fused":  # the first chunks of a fused run last about CHUNK_SECONDS
            self._chunk[k] = int(np.clip(CHUNK_SECONDS / max(best * k, 1e-6), 1, 1000))
        return float(best)


def _reasons(finite: np.ndarray) -> list[str | None]:
    """Why each plan failed (None when it did not)."""
    return [None if f else "fine-tuning diverged: loss or weights became NaN/inf" for f in finite]
