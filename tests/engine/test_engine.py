"""The engine on real tasks (digits): baseline reproduction, properties after fine-tuning,
one compile per (task, K), K vmapped plans == K separate runs, NaN handling, NNX models."""
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

from models.metrics import accuracy
from models.train import evaluate
from search.engine.compiles import count_compiles
from search.engine.config import FinetuneConfig
from search.engine.finetune import Engine
from search.errors import UserError
from search.compression.masks import pruned_counts
from search.compression.plan import CHANNEL, CODEBOOK, FLOAT, NM, UNIFORM, UNSTRUCTURED, dense_plan, make_plan


@pytest.fixture(scope="module")
def engine(lenet300_engine):
    return lenet300_engine  # conftest.py: shared with test_lowrank.py


MIXED = [
    make_plan([0.8, 0.5, 0.2], UNSTRUCTURED, [4, 8, 8], 8, UNIFORM),
    make_plan([0.5, 0.3, 0.0], CHANNEL, [8, 2, 16], [FLOAT, 6, 4], UNIFORM),
    make_plan([0.5, 0.5, 0.5], NM, [3, 4, 1], 8, CODEBOOK),
]


def test_dense_plan_reproduces_baseline(lenet300, engine):
    task, params = lenet300
    r = engine.evaluate(dense_plan(3), return_models=True)
    assert r.metric[0] == pytest.approx(evaluate(task, params, "val"), abs=1e-6)  # float32 mean there
    x = task.data.x_val[:50]
    np.testing.assert_array_equal(engine.predict(r.models[0], x), task.module.apply({"params": params}, x))
    assert engine.evaluate(dense_plan(3), split="test").metric[0] == pytest.approx(
        evaluate(task, params, "test"), abs=1e-6)


def test_properties_after_finetuning(engine):
    r = engine.run(MIXED, return_models=True)
    assert r.finite.all() and r.reason == [None] * 3
    assert (r.metric > 0.5).all(), r.metric  # mild plans on a trained net stay useful
    for cm in r.models:
        pruned = [int((cm.masks[l.name] == 0).sum()) for l in engine.layers]
        np.testing.assert_array_equal(pruned, pruned_counts(engine.layers, cm.plan))
        zeros = [int((cm.params[l.name]["kernel"] == 0).sum()) for l in engine.layers]
        assert (np.array(zeros) >= pruned).all()  # low bit widths may round more weights to 0
        for l in engine.layers:
            k = cm.params[l.name]["kernel"]
            assert (k[cm.masks[l.name] == 0] == 0).all()  # pruned weights exactly zero
            removed = ~np.any(cm.masks[l.name] != 0, axis=0)
            if int(cm.plan.granularity[l.index]) == CHANNEL:  # a removed unit's bias goes with it
                assert removed.sum() == round(float(cm.plan.ratio[l.index]) * k.shape[-1]) or l.fixed
                assert (np.asarray(cm.params[l.name]["bias"])[removed] == 0).all()
            bits = int(cm.plan.weight_bits[l.index])
            if 2 <= bits < FLOAT and int(cm.plan.quant_mode[l.index]) == UNIFORM:
                # on the grid of the trial's fixed scales, which the exporter packs with
                q = k / cm.weight_scales[l.name]
                np.testing.assert_allclose(q, np.round(q), atol=1e-3)
                assert np.abs(np.round(q)).max() <= 2 ** (bits - 1) - 1
            if bits < FLOAT:
                for c in range(k.shape[-1]):
                    col = k[..., c].ravel()
                    nonzero = len(np.unique(col[col != 0]))  # 1 bit: +-a, plus 0 for pruned weights
                    assert nonzero <= 2**bits, (l.name, bits, nonzero)
            lo, hi = cm.act_ranges[l.name]
            assert lo <= hi and np.isfinite([lo, hi]).all()


def test_new_plans_never_recompile(engine):
    engine.run(MIXED[:1], return_models=True)  # every function compiled once
    rng = np.random.default_rng(0)
    with count_compiles() as c:
        for _ in range(2):
            plans = [make_plan(rng.uniform(0, 0.95, 3), rng.integers(0, 3, 3), rng.choice([1, 2, 5, 8, 16, 32], 3),
                               rng.choice([4, 7, 16, 32], 3), rng.integers(0, 2, 3)) for _ in range(2)]
            engine.run(plans, return_models=True)
        engine.evaluate(MIXED, split="test")
    assert c.count == 0, c.durations


def test_k_vmapped_equals_separate_runs(lenet300, engine):
    task, params = lenet300
    plans = [make_plan([0.6, 0.4, 0.1], UNSTRUCTURED), make_plan([0.5, 0.5, 0.0], CHANNEL, 32, 8),
             make_plan([0.5, 0.5, 0.5], NM, 8, FLOAT), make_plan([0.5, 0.3, 0.0], UNSTRUCTURED, 4, 8, CODEBOOK),
             make_plan([0.2, 0.2, 0.2], CHANNEL, 6, 6)]
    # K = 2: a group without a codebook plan, one with one, and a last group padded
    wide = Engine(task, params, dataclasses.replace(engine.config, k=2, loop="python"))
    a, b = engine.run(plans, return_models=True), wide.run(plans, return_models=True)
    np.testing.assert_allclose(a.metric, b.metric, atol=2.5 / len(task.data.x_val))
    for ma, mb in zip(a.models, b.models):
        for l in engine.layers:
            # vmapped and single-plan code sum in another order: a weight within float rounding
            # of a grid boundary may land one level of its low-bit grid apart (seen on AVX-512)
            diff = np.abs(np.asarray(ma.params[l.name]["kernel"]) - np.asarray(mb.params[l.name]["kernel"]))
            assert np.mean(diff > 2e-4) <= 1e-3 and diff.max() < 5e-3, (l.name, np.mean(diff > 2e-4), diff.max())


def test_a_group_skips_the_codebook_gradient_unless_one_of_its_plans_uses_it(lenet300, engine):
    """The cluster gradients' scatter-add stays behind a real conditional in the vmapped step
    (one predicate for the whole group), not a select that makes every plan pay for it."""
    task, params = lenet300
    wide = Engine(task, params, dataclasses.replace(engine.config, k=2, loop="python"))
    prepare, step, _ = wide._functions(2)
    g = wide._start(wide._slice(wide._check_plans(MIXED[:2]), 0))
    text = step.lower(g.state, g.t, g.frozen, g.plans, wide.base_params, wide._x, wide._y, wide._table,
                      wide._aug_key).as_text()
    assert "stablehlo.case" in text and "scatter" in text


def test_measured_k_is_kept_in_the_k_file(lenet300, engine, tmp_path):
    """K measured once per machine lands in the k_file given (a results dir's cache), and a
    later process reads it instead of timing again."""
    from search.engine.finetune import forget_measured_k
    from search.engine.k_file import k_file_in

    task, params = lenet300
    k_file = k_file_in(tmp_path)
    auto = dataclasses.replace(engine.config, k=None, loop=None)
    first = Engine(task, params, auto, k_file=k_file)
    # both loops timed at K = 1, then the faster one at the CPU's large K (no third K: 2 compiles, not 5)
    assert set(first.loop_timings) == {"python", "fused"}
    assert first.loop == min(first.loop_timings, key=first.loop_timings.get)
    assert first.k_timings[1] == first.loop_timings[first.loop]
    assert set(first.k_timings) in ({1, 4}, {1, 2, 4}) and first.k == min(first.k_timings, key=first.k_timings.get)
    stored = json.loads(k_file.read_text())
    assert [(v["k"], v["loop"]) for v in stored.values()] == [(first.k, first.loop)]
    forget_measured_k()  # as in a new process
    again = Engine(task, params, auto, k_file=k_file)
    assert (again.k, again.loop) == (first.k, first.loop) and again.k_timings == {} and again.loop_timings == {}
    # what the config fixes is not measured: a given K times only the two loops
    fixed_k = Engine(task, params, dataclasses.replace(auto, k=2), k_file=k_file)
    assert fixed_k.k == 2 and set(fixed_k.k_timings) == {2} and set(fixed_k.loop_timings) == {"python", "fused"}


def test_fused_loop_gives_the_results_of_python_driven_steps(lenet300, engine):
    """The fused loop (chunks of steps in one device call) runs the same steps as the
    Python-driven loop: the same metrics and weights within float tolerance, for one plan and
    K vmapped plans, with gradual pruning's mask updates and the halfway re-estimate falling
    inside a run; and new plans do not recompile it (one compile per task, K and loop)."""
    task, params = lenet300
    for cfg in (engine.config, dataclasses.replace(engine.config, k=2, pruning="gradual", gradual_updates=3)):
        py = Engine(task, params, dataclasses.replace(cfg, loop="python")).run(MIXED, return_models=True)
        fused = Engine(task, params, dataclasses.replace(cfg, loop="fused"))
        fu = fused.run(MIXED, return_models=True)
        np.testing.assert_allclose(fu.metric, py.metric, atol=1.5 / len(task.data.x_val))
        for a, b in zip(fu.models, py.models):
            for l in engine.layers:
                np.testing.assert_allclose(a.params[l.name]["kernel"], b.params[l.name]["kernel"], atol=1e-5)
                np.testing.assert_array_equal(a.masks[l.name], b.masks[l.name])
        with count_compiles() as c:
            fused.run([make_plan([0.3, 0.6, 0.9], NM, [2, 5, 8], 6, UNIFORM)] * 2)
        assert c.count == 0, c.durations


def test_nan_in_the_middle_of_a_fused_chunk_fails_only_that_plan(lenet300, engine):
    """Two plans fused in one group; plan 1's weights turn NaN after 10 steps, and the other
    20 steps run as fused chunks: plan 1 fails, plan 0 ends exactly as it does alone."""
    task, params = lenet300
    eng = Engine(task, params, dataclasses.replace(engine.config, k=2, loop="fused"))
    plans = eng._check_plans(MIXED[:2])
    clean = eng.run(plans)
    g = eng._start(eng._slice(plans, 0))
    eng._train(g, 10)
    trainable, opt_state, finite = g.state
    kernel = trainable["params"]["fc2"]["kernel"]
    trainable["params"]["fc2"]["kernel"] = kernel.at[1, 0, 0].set(jnp.nan)
    g.state = (trainable, opt_state, finite)
    eng._train(g, eng.config.steps)
    metric, ok, _ = eng._evaluate(g, "val")
    assert list(ok) == [True, False]
    assert metric[0] == clean.metric[0]


def test_distillation_runs_and_changes_the_result(lenet300, engine):
    task, params = lenet300
    plan = make_plan([0.9, 0.9, 0.5], UNSTRUCTURED, 4, 8)
    d = Engine(task, params, dataclasses.replace(engine.config, distill=True, temperature=4.0, alpha=0.7))
    rd, rp = d.run([plan], return_models=True), engine.run([plan], return_models=True)
    assert rd.finite.all()
    assert not np.array_equal(rd.models[0].params["fc1"]["kernel"], rp.models[0].params["fc1"]["kernel"])


def test_nan_is_reported_not_raised_and_a_new_engine_does_not_recompile(lenet300, engine):
    task, params = lenet300
    engine.run([dense_plan(3)])
    bad = jax.tree.map(lambda a: a, params)
    bad["fc3"] = {**bad["fc3"], "bias": bad["fc3"]["bias"].at[0].set(jnp.inf)}
    with count_compiles() as c:  # same task and config: the compiled functions are shared
        r = Engine(task, bad, engine.config).run([dense_plan(3), make_plan([0.5, 0.5, 0.5])])
    assert c.count == 0, c.durations
    assert not r.finite.any() and np.isnan(r.metric).all() and "NaN" in r.reason[0]


class _TinyCNN(nn.Module):
    """A conv, a depthwise conv and a classifier: the conv paths at a fraction of LeNet-5's compile."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(8, (3, 3), strides=2, name="conv")(x))
        x = nn.relu(nn.Conv(8, (3, 3), feature_group_count=8, name="dw")(x))
        return nn.Dense(10, name="fc")(x.reshape(x.shape[0], -1))


def test_conv_and_depthwise_layers(lenet300):
    task = dataclasses.replace(lenet300[0], module=_TinyCNN(), name="tiny-cnn")
    shapes = jax.eval_shape(task.init_params)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape) * 0.1, jnp.float32), shapes)
    eng = Engine(task, params, FinetuneConfig(steps=3, batch_size=32, k=1, eval_batch=128))
    assert [l.kind for l in eng.layers] == ["conv", "depthwise", "dense"]
    plans = [make_plan([0.5, 0.5, 0.9], [CHANNEL, NM, UNSTRUCTURED], [8, 4, 3], 8, [UNIFORM, UNIFORM, CODEBOOK])]
    r = eng.run(plans, return_models=True)
    cm = r.models[0]
    assert r.finite[0]
    pruned = [int((cm.masks[l.name] == 0).sum()) for l in eng.layers]
    np.testing.assert_array_equal(pruned, pruned_counts(eng.layers, cm.plan))
    for l in eng.layers:
        assert (cm.params[l.name]["kernel"][cm.masks[l.name] == 0] == 0).all()
    assert len(np.unique(cm.params["fc"]["kernel"])) <= 2**3 + 1  # shared values + the zeros
    with count_compiles() as c:
        eng.run([make_plan([0.1, 0.7, 0.3], NM, 5, 16, CODEBOOK)], return_models=True)
    assert c.count == 0


class _NNXNet(nnx.Module):
    def __init__(self, rngs):
        self.fc1 = nnx.Linear(64, 32, rngs=rngs)
        self.fc2 = nnx.Linear(32, 10, rngs=rngs)

    def __call__(self, x):
        return self.fc2(nnx.relu(self.fc1(x.reshape(x.shape[0], -1))))


def test_nnx_model(lenet300):
    task, _ = lenet300
    net = _NNXNet(nnx.Rngs(0))
    nt = dataclasses.replace(task, module=net, name="nnx-mlp")
    eng = Engine(nt, None, FinetuneConfig(steps=20, batch_size=64, k=1))
    assert [l.name for l in eng.layers] == ["fc1", "fc2"]
    base = eng.evaluate(dense_plan(2)).metric[0]
    x = task.data.x_val
    assert base == pytest.approx(float(accuracy(net(x), task.data.y_val).mean()), abs=1e-6)
    r = eng.run([make_plan([0.5, 0.2], UNSTRUCTURED, 4, 8)], return_models=True)
    k = r.models[0].params["fc1"]["kernel"]
    assert (k == 0).sum() == 32 * 32 and r.finite[0]


def test_user_errors(engine, lenet300):
    task, params = lenet300
    with pytest.raises(UserError, match="plan has 2 layers"):
        engine.run([make_plan([0.1, 0.2])])
    with pytest.raises(UserError, match="ratio"):
        engine.run([make_plan([0.1, 0.2, 1.5])])
    with pytest.raises(UserError, match="split"):
        engine.evaluate(dense_plan(3), split="train")
    with pytest.raises(UserError, match="alpha"):
        Engine(task, params, FinetuneConfig(alpha=2.0))
    with pytest.raises(UserError, match="loop 'scan' is unknown: use one of python, fused"):
        Engine(task, params, FinetuneConfig(loop="scan"))


def test_activation_ranges_are_estimated_again_halfway_through_fine_tuning(engine):
    """Ranges calibrated on the freshly pruned weights clip the fine-tuned activations: halfway
    through, they are calibrated again, so a fine-tuned plan's ranges differ from the ones it
    started with where the input comes from a fine-tuned layer (not where it is the data)."""
    plan = make_plan([0.8, 0.8, 0.0], CHANNEL, 8, 8)
    start = engine.evaluate([plan], return_models=True).models[0].act_ranges
    tuned = engine.run([plan], return_models=True).models[0].act_ranges
    assert tuned["fc1"] == start["fc1"]
    assert tuned["fc2"] != start["fc2"] and tuned["fc3"] != start["fc3"]
