"""Engine benchmark: trials per minute against the straightforward loop, fraction of the
matmul peak, the cost of compression per step, compile times, and K per plan.

    PYTHONPATH=. .venv/bin/python bench/bench_engine.py [--trials 8] [--quick]

Prints a summary and saves bench/out/bench_engine.json. Other processes sharing the CPU
make every number noisy: run it on an idle machine for figures you quote.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import models
from models.train import train_step, fit
from search.compression import masks as masks_lib
from search.compression import quant
from search.engine.compiles import count_compiles
from search.engine import finetune as engine_mod
from search.engine.config import FinetuneConfig
from search.engine.finetune import Engine
from search.compression.plan import CHANNEL, NM, UNIFORM, UNSTRUCTURED, make_plan

OUT = Path(__file__).parent / "out"


def _random_params(task, seed=0):
    shapes = jax.eval_shape(task.init_params)
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape) * 0.05, jnp.float32), shapes)


def _plans(n: int, num_layers: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [make_plan(rng.uniform(0.2, 0.9, num_layers), rng.choice([UNSTRUCTURED, CHANNEL, NM], num_layers),
                      rng.choice([2, 4, 8], num_layers), rng.choice([8, 32], num_layers), UNIFORM)
            for _ in range(n)]


def naive_trial(task, params, layers, plan, steps, batch, lr, seed=0) -> float:
    """What a straightforward Optuna + Flax user writes: the plan baked in as Python constants,
    a fresh jitted step per trial (so XLA compiles every trial), the same steps and data."""
    ratio, gran = np.asarray(plan.ratio), np.asarray(plan.granularity)
    wbits, abits = [int(b) for b in plan.weight_bits], [int(b) for b in plan.act_bits]
    masks = {l.name: np.asarray(masks_lib.layer_mask(params[l.name]["kernel"], float(ratio[l.index]),
                                                     int(gran[l.index]))) for l in layers}
    lo_hi = {}

    def compressed(p):
        return {k: ({**v, "kernel": quant.fake_quant_weight(v["kernel"] * masks[k], wbits[i])}
                    if k in masks else v) for i, (k, v) in enumerate(p.items())}

    import flax.linen as nn

    def apply(p, x, calib=False):
        def inter(next_fun, args, kwargs, ctx):
            if ctx.method_name == "__call__" and isinstance(ctx.module, (nn.Dense, nn.Conv)):
                name = "/".join(ctx.module.path)
                i = [l.name for l in layers].index(name)
                x = args[0]
                if calib:
                    lo_hi[name] = (jnp.min(x), jnp.max(x))
                elif abits[i] < 32:
                    x = quant.fake_quant_act(x, lo_hi[name][0], lo_hi[name][1], abits[i])
                return next_fun(x, *args[1:], **kwargs)
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(inter):
            return task.module.apply({"params": p}, x)

    p0 = jax.tree.map(jnp.asarray, params)
    p0 = {k: ({**v, "kernel": v["kernel"] * masks[k]} if k in masks else v) for k, v in p0.items()}
    ranges = jax.jit(lambda p, x: (apply(compressed(p), x, calib=True), dict(lo_hi))[1])(p0, task.data.x_train[:512])
    lo_hi.update(ranges)
    tx = optax.adam(lr)

    @jax.jit
    def step(p, o, x, y):
        loss, g = jax.value_and_grad(lambda q: task.loss(apply(compressed(q), x), y))(p)
        u, o = tx.update(g, o, p)
        return optax.apply_updates(p, u), o

    xs, ys = task.data.x_train, task.data.y_train
    rng = np.random.default_rng(seed)
    o = tx.init(p0)
    p = p0
    for _ in range(steps):
        idx = rng.integers(0, len(xs), batch)
        p, o = step(p, o, xs[idx], ys[idx])
    out = jax.jit(lambda q, x: apply(compressed(q), x))(p, task.data.x_val)
    return float(task.metric(out, task.data.y_val).mean())


def bench_trials(n_trials: int) -> dict:
    task = models.get_task("lenet300", "digits")
    params = fit(task)[0]["params"]  # the naive trial indexes the bare params
    cfg = FinetuneConfig(steps=200, batch_size=128, k=1)
    plans = _plans(n_trials, 3)
    t0 = time.perf_counter()
    eng = Engine(task, params, cfg)
    eng.run(plans[:1])  # the one compile of the study
    engine_setup = time.perf_counter() - t0
    t_engine, t_naive, metrics = 0.0, 0.0, []
    for plan in plans:  # alternate, so both see the same machine load
        t0 = time.perf_counter()
        m_e = float(eng.run([plan]).metric[0])
        t_engine += time.perf_counter() - t0
        t0 = time.perf_counter()
        m_n = naive_trial(task, params, eng.layers, plan, cfg.steps, cfg.batch_size, cfg.learning_rate)
        t_naive += time.perf_counter() - t0
        metrics.append((m_e, m_n))
    per_e, per_n = t_engine / n_trials, t_naive / n_trials
    return {
        "task": "lenet300/digits", "steps": cfg.steps, "batch": cfg.batch_size, "trials": n_trials,
        "engine_setup_s": engine_setup, "engine_s_per_trial": per_e, "naive_s_per_trial": per_n,
        "engine_trials_per_min": 60 / per_e, "naive_trials_per_min": 60 / per_n,
        "speedup_steady": per_n / per_e,
        "speedup_incl_setup": t_naive / (t_engine + engine_setup),
        "metrics_engine_vs_naive": metrics,
    }


def matmul_peak(n: int = 1024, reps: int = 20) -> float:
    a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), jnp.float32)
    f = jax.jit(lambda x, y: x @ y)
    f(a, a).block_until_ready()
    best = np.inf
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(reps):
            r = f(a, a)
        r.block_until_ready()
        best = min(best, (time.perf_counter() - t0) / reps)
    return 2 * n**3 / best


def _time_steps(run_step, n=50, rounds=3) -> float:
    run_step()
    best = np.inf
    for _ in range(rounds):
        t0 = time.perf_counter()
        out = None
        for _ in range(n):
            out = run_step()
        jax.block_until_ready(out)
        best = min(best, (time.perf_counter() - t0) / n)
    return best


def step_costs(model: str, dataset: str, batch: int, plan_args: dict) -> dict:
    """Seconds per compressed fine-tune step (engine, K=1) and per plain dense training step."""
    task = models.get_task(model, dataset)
    params = _random_params(task)
    eng = Engine(task, params, FinetuneConfig(steps=1, batch_size=batch, k=1, loop="python"))
    with count_compiles() as cc:
        prepare, step, _ = eng._functions(1)
        plan = make_plan(**plan_args) if plan_args else None
        group = jax.tree.map(lambda a: jnp.asarray(a)[None], plan)
        tr, os_, fr, fin = prepare(group, eng.base_params, eng._calib, eng._bn_x, jnp.float32(1.0), eng._bases)
        state = [(tr, os_, fin), jnp.int32(0)]
        fixed = (fr, group, eng.base_params, eng._x, eng._y, eng._table, eng._aug_key)

        def run_c():  # as Engine.run drives it: the step counter stays on the device (a fresh
            # host scalar per call made each dispatch wait for the step before it)
            state[0], state[1] = step(state[0], state[1], *fixed)
            return state[0]

        run_c()
    tx = optax.adam(1e-3)
    plain = train_step(task.module, task.loss, tx)
    pstate = [jax.tree.map(jnp.asarray, params), None]
    pstate[1] = tx.init(pstate[0])
    xs, ys = eng._x, eng._y
    idx = jnp.arange(batch, dtype=jnp.int32)

    def run_p():
        pstate[0], pstate[1], loss = plain(pstate[0], pstate[1], xs, ys, idx)
        return loss

    # alternate rounds of the two, best of each: other processes on the CPU then slow both
    # alike (timing one after the other measured a load change as compression overhead)
    t_comp, t_plain = np.inf, np.inf
    for _ in range(3):
        t_comp = min(t_comp, _time_steps(run_c, n=30, rounds=1))
        t_plain = min(t_plain, _time_steps(run_p, n=30, rounds=1))
    macs = sum(l.macs for l in eng.layers)
    flops = 2 * batch * (3 * macs - eng.layers[0].macs)  # fwd, weight grad, input grad (not layer 0)
    return {"task": f"{model}/{dataset}", "batch": batch, "plan": {k: np.asarray(v).tolist() for k, v in plan_args.items()},
            "compressed_step_s": t_comp, "plain_step_s": t_plain, "ratio": t_comp / t_plain,
            "flops_per_step": flops, "compressed_gflops": flops / t_comp / 1e9, "plain_gflops": flops / t_plain / 1e9,
            "compile_s_prepare_and_step": cc.seconds}


def compile_time(model: str, dataset: str, repeats: int = 5) -> dict:
    """The compiles of a study's first Engine.run in a process (median of `repeats` fresh starts). The engine shares compiled
    functions across Engines, and step_costs has already compiled this model's prepare: forget
    them, or the figure leaves out the largest compile."""
    task = models.get_task(model, dataset)
    params = _random_params(task)
    runs = []
    for _ in range(repeats):  # compile times on a shared CPU vary by +-0.5 s: report them all
        engine_mod._FN_CACHE.clear()
        jax.clear_caches()
        t0 = time.perf_counter()
        with count_compiles() as cc:
            eng = Engine(task, params, FinetuneConfig(steps=2, batch_size=128, k=1, loop="python"))
            eng.run([make_plan(np.full(len(eng.layers), 0.5), CHANNEL, 8, 8)], return_models=True)
        runs.append((cc.seconds, cc.count, sorted(cc.durations, reverse=True)[:4], time.perf_counter() - t0))
    with count_compiles() as again:
        eng.run([make_plan(np.full(len(eng.layers), 0.3), NM, 4, 6)])
    mid = sorted(runs)[len(runs) // 2]
    return {"task": f"{model}/{dataset}", "xla_compiles": mid[1], "compile_s_total": mid[0],
            "compile_s_each_run": [r[0] for r in runs], "largest_compiles_s": mid[2], "first_run_wall_s": mid[3],
            "recompiles_on_new_plan": again.count}


def choose_k(model: str, dataset: str) -> dict:
    task = models.get_task(model, dataset)
    eng = Engine(task, _random_params(task), FinetuneConfig(steps=20, batch_size=256 if model == "lenet300" else 128))
    return {"task": f"{model}/{dataset}", "chosen_k": eng.k, "chosen_loop": eng.loop,
            "seconds_per_plan_step": {str(k): v for k, v in eng.k_timings.items()},
            "loop_seconds_per_plan_step_at_k1": eng.loop_timings}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--quick", action="store_true", help="fewer trials, digits only")
    args = ap.parse_args()
    fm = "fashion-mnist" if Path("/usr/share/datasets/fashion-mnist").exists() and not args.quick else "digits"
    res = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "backend": jax.default_backend(),
                       "load_avg_start": os.getloadavg()}}
    res["matmul_peak_gflops"] = matmul_peak() / 1e9
    typical = dict(ratio=[0.5, 0.5, 0.2], granularity=UNSTRUCTURED, weight_bits=8, act_bits=8)
    res["step_lenet300"] = step_costs("lenet300", fm, 256, typical)
    res["step_lenet300"]["fraction_of_matmul_peak"] = res["step_lenet300"]["compressed_gflops"] / res["matmul_peak_gflops"]
    res["step_lenet300"]["plain_fraction_of_matmul_peak"] = res["step_lenet300"]["plain_gflops"] / res["matmul_peak_gflops"]
    res["step_lenet5"] = step_costs("lenet5", "digits", 128, dict(ratio=[0.5, 0.5, 0.5, 0.2], granularity=CHANNEL,
                                                                weight_bits=8, act_bits=8))
    res["compile_lenet5"] = compile_time("lenet5", "digits")
    res["k_choice"] = [choose_k("lenet300", "digits"), choose_k("lenet5", "digits")]
    res["trials"] = bench_trials(3 if args.quick else args.trials)
    res["machine"]["load_avg_end"] = os.getloadavg()
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "bench_engine.json").write_text(json.dumps(res, indent=2, default=float))
    t, s3, s5, c5 = res["trials"], res["step_lenet300"], res["step_lenet5"], res["compile_lenet5"]
    print(f"load average at start/end: {res['machine']['load_avg_start']} / {res['machine']['load_avg_end']}")
    print(f"trials/min lenet300/digits (200 steps, batch 128): engine {t['engine_trials_per_min']:.1f}, "
          f"straightforward {t['naive_trials_per_min']:.1f}: {t['speedup_steady']:.1f}x steady "
          f"({t['speedup_incl_setup']:.1f}x including the engine's one compile, {t['trials']} trials)")
    print(f"matmul peak {res['matmul_peak_gflops']:.1f} GFLOP/s; {s3['task']} batch 256 fine-tune "
          f"{s3['compressed_gflops']:.1f} GFLOP/s = {100 * s3['fraction_of_matmul_peak']:.0f}% "
          f"(plain dense step {100 * s3['plain_fraction_of_matmul_peak']:.0f}%)")
    print(f"compressed/plain step: {s3['task']} {s3['ratio']:.2f}x ({1e3 * s3['compressed_step_s']:.2f} vs "
          f"{1e3 * s3['plain_step_s']:.2f} ms); {s5['task']} {s5['ratio']:.2f}x "
          f"({1e3 * s5['compressed_step_s']:.2f} vs {1e3 * s5['plain_step_s']:.2f} ms)")
    print(f"lenet5 compile: {c5['compile_s_total']:.1f} s (median of "
          f"{', '.join(f'{v:.1f}' for v in c5['compile_s_each_run'])}) over {c5['xla_compiles']} XLA compiles "
          f"(largest {', '.join(f'{d:.1f}' for d in c5['largest_compiles_s'])}); new plan recompiles: "
          f"{c5['recompiles_on_new_plan']}")
    for k in res["k_choice"]:
        print(f"K per plan-step {k['task']}: {k['seconds_per_plan_step']} -> K={k['chosen_k']}")
    print(f"saved {OUT / 'bench_engine.json'}")


if __name__ == "__main__":
    main()
