"""Fine-tuning modes beyond the default.

Gradual pruning (Zhu & Gupta's cubic schedule): the plan's exact counts at the end, pruned
weights exactly zero, masks really recomputed from the fine-tuned weights, the ratio followed
on the way, no recompile between plans or schedules, and one-line errors for bad schedules.
Learned activation ranges (LSQ): the quantizer's values unchanged, its gradients LSQ's, the
ranges trained and carried into the compressed model, no recompile between plans."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from search.compression.masks import pruned_counts
from search.compression.plan import CHANNEL, CODEBOOK, FLOAT, NM, UNIFORM, UNSTRUCTURED, make_plan
from search.engine.compiles import count_compiles
from search.engine.config import FinetuneConfig
from search.engine.finetune import Engine
from search.engine.schedule import cubic_fraction, mask_updates
from search.errors import UserError

PLANS = [
    make_plan([0.9, 0.7, 0.3], UNSTRUCTURED, [4, 8, 8], 8, UNIFORM),
    make_plan([0.5, 0.25, 0.0], CHANNEL, [8, 2, FLOAT], [FLOAT, 6, 8], UNIFORM),
    make_plan([0.5, 0.5, 0.5], NM, 8, 8, UNIFORM),
    make_plan([0.8, 0.8, 0.5], UNSTRUCTURED, [3, 4, 2], 8, CODEBOOK),
]


@pytest.fixture(scope="module")
def gradual(lenet300):
    task, params = lenet300
    return Engine(task, params, FinetuneConfig(steps=24, batch_size=64, k=1, pruning="gradual", gradual_updates=4))


def _pruned(cm, layers):
    return [int((cm.masks[l.name] == 0).sum()) for l in layers]


def test_gradual_ends_at_the_plans_exact_counts_with_zero_weights(gradual):
    r = gradual.run(PLANS, return_models=True)
    assert r.finite.all()
    for cm in r.models:
        np.testing.assert_array_equal(_pruned(cm, gradual.layers), pruned_counts(gradual.layers, cm.plan))
        for l in gradual.layers:
            assert (cm.params[l.name]["kernel"][cm.masks[l.name] == 0] == 0).all()


def test_masks_come_from_the_fine_tuned_weights_not_the_pretrained_ones(lenet300, gradual):
    task, params = lenet300
    one_shot = Engine(task, params, dataclasses.replace(gradual.config, pruning="one-shot"))
    plan = PLANS[0]
    a = gradual.run([plan], return_models=True).models[0].masks
    b = one_shot.run([plan], return_models=True).models[0].masks
    assert all(int(a[n].sum()) == int(b[n].sum()) for n in a)  # the same counts...
    assert any(not np.array_equal(a[n], b[n]) for n in a)  # ...of other weights


def test_the_ratio_follows_the_cubic_schedule(gradual):
    """Part-way through, each layer holds round(ratio * share * n) pruned weights."""
    updates = mask_updates(gradual.config)
    assert list(updates) == [3, 6, 9, 12] and updates[12] == 1.0  # ramp ends at 0.5 * 24
    plan = PLANS[0]
    g = gradual._start(gradual._slice(jax.tree.map(lambda a: a[None], plan), 0))
    assert all(int(m.sum()) == m.size for m in g.frozen["masks"].values())  # starts dense
    for t, share in updates.items():
        gradual._train(g, t + 1)
        for l in gradual.layers:
            want = int(np.clip(np.round(np.float32(plan.ratio[l.index]) * np.float32(share) * l.weight_count),
                               0, l.weight_count - 1))
            assert int((np.asarray(g.frozen["masks"][l.name]) == 0).sum()) == want, (t, l.name)


def test_no_recompile_between_plans_or_schedules(lenet300, gradual):
    task, params = lenet300
    gradual.run(PLANS[:1])
    rng = np.random.default_rng(1)
    with count_compiles() as c:
        for end, n in ((0.3, 2), (0.75, None)):
            eng = Engine(task, params, dataclasses.replace(gradual.config, gradual_end=end, gradual_updates=n))
            plans = [make_plan(rng.uniform(0, 0.95, 3), rng.integers(0, 3, 3), rng.choice([2, 5, 8, 32], 3),
                               rng.choice([7, 32], 3), UNIFORM) for _ in range(2)]
            r = eng.run(plans, return_models=True)
            for cm in r.models:
                np.testing.assert_array_equal(_pruned(cm, eng.layers), pruned_counts(eng.layers, cm.plan))
    assert c.count == 0, c.durations


def test_evaluation_without_fine_tuning_prunes_at_once(gradual):
    cm = gradual.evaluate([PLANS[1]], return_models=True).models[0]
    np.testing.assert_array_equal(_pruned(cm, gradual.layers), pruned_counts(gradual.layers, cm.plan))


def test_cubic_fraction():
    shares = [cubic_fraction(t, 10) for t in range(0, 13)]
    assert shares[0] == 0.0 and shares[10] == shares[12] == 1.0
    assert all(a < b for a, b in zip(shares[:10], shares[1:11]))  # rising...
    assert all(b - a > c - b for a, b, c in zip(shares[:9], shares[1:10], shares[2:11]))  # ...fast, then slowly


@pytest.mark.parametrize("changes, match", [
    ({"pruning": "iterative"}, r"pruning 'iterative' is unknown: use one of one-shot, gradual \(--pruning\)"),
    ({"act_ranges": "pact"}, r"act_ranges 'pact' is unknown: use one of calibrated, learned \(--act-ranges\)"),
    ({"pruning": "gradual", "gradual_end": 1.0}, r"gradual_end 1.0 is out of range"),
    ({"pruning": "gradual", "gradual_updates": 0}, r"gradual_updates 0 is out of range"),
    ({"pruning": "gradual", "steps": 1}, r"in 1 fine-tune step\(s\).*give --finetune-steps >= 2, or --pruning one-shot$"),
    ({"pruning": "gradual", "steps": 10, "gradual_updates": 8},
     r"its 8 mask update\(s\) must fit in the first 0.5 of the steps.*--finetune-steps >= 15, or fewer gradual_updates \(1..5\)"),
])
def test_schedules_that_cannot_work_are_one_line_errors(changes, match):
    with pytest.raises(UserError, match=match) as e:
        dataclasses.replace(FinetuneConfig(), **changes).check()
    assert "\n" not in str(e.value)


# ---- learned activation ranges (LSQ) ----------------------------------------------------

def test_learned_quantizer_has_the_same_values_and_lsq_gradients():
    from search.compression import quant

    x = jnp.array([-1.0, -0.7, -0.3, 0.0, 0.4, 1.1, 1.9, 2.3, 3.0])
    lo, hi, bits = jnp.float32(-0.5), jnp.float32(2.0), jnp.int32(4)
    np.testing.assert_array_equal(quant.fake_quant_act_learned(x, lo, hi, bits), quant.fake_quant_act(x, lo, hi, bits))
    dx = jax.grad(lambda v: quant.fake_quant_act_learned(v, lo, hi, bits).sum())(x)
    # the grid is [-0.5, 2.0] (z = 3 of 15 steps of 1/6): clipped values pass no gradient
    np.testing.assert_array_equal(dx, [0, 0, 1, 1, 1, 1, 1, 0, 0])
    # above the range, every value is clipped to hi: d/dhi of the sum is their count
    d_hi = jax.grad(lambda h: quant.fake_quant_act_learned(x, lo, h, bits).sum())(hi)
    assert d_hi > 0
    # float activations: nothing reaches the range
    assert jax.grad(lambda h: quant.fake_quant_act_learned(x, lo, h, jnp.int32(FLOAT)).sum())(hi) == 0


def test_learned_ranges_are_trained_and_kept_in_the_model(lenet300):
    task, params = lenet300
    cfg = FinetuneConfig(steps=30, batch_size=64, k=1)
    plans = [make_plan([0.5, 0.5, 0.0], UNSTRUCTURED, 4, 4), make_plan([0.0, 0.0, 0.0], UNSTRUCTURED, 8, FLOAT)]
    cal = Engine(task, params, cfg).run(plans, return_models=True).models
    eng = Engine(task, params, dataclasses.replace(cfg, act_ranges="learned"))
    r = eng.run(plans, return_models=True)
    assert r.finite.all()
    moved = [n for n in cal[0].act_ranges if cal[0].act_ranges[n][1] != r.models[0].act_ranges[n][1]]
    assert moved, "4-bit activation ranges did not move"
    # float activations: nothing to learn, the ranges stay as calibrated before fine-tuning
    assert r.models[1].act_ranges == Engine(task, params, cfg).evaluate(plans[1:], return_models=True).models[0].act_ranges
    # the compressed model computes with the learned ranges: predict() reproduces the metric
    x, y = task.data.x_val, task.data.y_val
    acc = float(np.mean(np.argmax(np.asarray(eng.predict(r.models[0], x)), -1) == y))
    assert acc == pytest.approx(r.metric[0], abs=1e-9)
    with count_compiles() as c:
        eng.run([make_plan([0.3, 0.1, 0.0], CHANNEL, 8, 5)], return_models=True)
    assert c.count == 0, c.durations


# ---- the task's augmentation while fine-tuning -----------------------------------------

def test_fine_tuning_uses_the_tasks_augmentation_without_recompiling_per_seed(lenet300):
    from models.task import TrainConfig

    task, params = lenet300
    shifted = dataclasses.replace(task, train=TrainConfig(steps=1, crop=1, flip=True))
    plan = [make_plan([0.5, 0.5, 0.0], UNSTRUCTURED, 8, 8)]
    cfg = FinetuneConfig(steps=10, batch_size=64, k=1)
    kernels = {}
    for name, t, c in (("plain", task, cfg), ("aug", shifted, cfg), ("off", shifted, dataclasses.replace(cfg, augment=False))):
        kernels[name] = Engine(t, params, c).run(plan, return_models=True).models[0].params["fc1"]["kernel"]
    np.testing.assert_array_equal(kernels["off"], kernels["plain"])  # augment=False: the batches as drawn
    assert not np.array_equal(kernels["aug"], kernels["plain"])  # shifted and flipped batches
    with count_compiles() as c:  # the augmentation's key is an array: another seed, no compile
        Engine(shifted, params, dataclasses.replace(cfg, seed=3)).run(plan)
    assert c.count == 0, c.durations


def test_gradual_pruning_and_learned_ranges_vmapped_over_plans_match_one_at_a_time(lenet300, gradual):
    task, params = lenet300
    cfg = dataclasses.replace(gradual.config, act_ranges="learned")
    one = Engine(task, params, cfg).run(PLANS[:3], return_models=True)
    two = Engine(task, params, dataclasses.replace(cfg, k=2)).run(PLANS[:3], return_models=True)  # last group padded
    np.testing.assert_allclose(one.metric, two.metric, atol=2.5 / len(task.data.x_val))
    for a, b in zip(one.models, two.models):
        # vmapped and single-plan code round differently in the last bit; at a mask update that
        # may swap two weights of equal magnitude, and through a 4-bit grid's roundings it moves a
        # learned range's gradient: the counts are exact, the ranges close (within 6% on AVX-512)
        assert _pruned(a, gradual.layers) == _pruned(b, gradual.layers)
        for n in a.act_ranges:
            np.testing.assert_allclose(a.act_ranges[n], b.act_ranges[n], rtol=0.1, atol=1e-4)
