"""The per-layer search space: sampling, round trips through Optuna params, extremes."""
from types import SimpleNamespace

import numpy as np
import optuna
import pytest

from search.compression import plan as P
from search.compression.layers import Layer
from search.study.space import (
    extreme_plans,
    nearest_bits,
    plan_from_dict,
    plan_to_dict,
    plan_to_params,
    snap_ratio,
    space_for_profile,
    suggest_plan,
)

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _dense(i, name, n_in, n_out):
    return Layer(i, name, (name,), "dense", (n_in, n_out), (n_in,), (n_out,), 1, True, n_in * n_out, n_in * n_out + n_out)


LAYERS = (_dense(0, "fc1", 64, 30), _dense(1, "blk/fc2", 30, 10))


def test_profile_restricts_granularity_and_activation_bits():
    prof = SimpleNamespace(name="p", weight_bits=(8, 16, 32), act_bits=(8, 32), nm_patterns=(), float_policy="native")
    space = space_for_profile(prof)
    assert "nm" not in space.granularities
    assert set(space.act_bits) == {8, 32}  # only kernels (and float) for activations
    assert {2, 4, 8, 32} <= set(space.weight_bits)  # packed storage widths stay allowed
    npu = SimpleNamespace(name="q", weight_bits=(4, 8), act_bits=(8,), nm_patterns=((2, 4),), float_policy="disallow")
    nm = space_for_profile(npu)
    assert "nm" in nm.granularities
    assert nm.act_bits == (8,)  # no float where the device has no float kernels
    assert max(nm.weight_bits) == 8 and 2 in nm.weight_bits


def test_sampled_plans_lie_in_the_space():
    space = space_for_profile(SimpleNamespace(name="p", weight_bits=(8, 32), act_bits=(8, 32)))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(20):
        t = study.ask()
        plan = suggest_plan(t, LAYERS, space)
        P.validate_plan(plan)
        assert plan.ratio.shape == (2,)
        assert np.all(plan.ratio <= space.max_ratio + 1e-6)
        assert set(plan.act_bits.tolist()) <= set(space.act_bits)
        assert set(plan.weight_bits.tolist()) <= set(space.weight_bits)
        assert np.allclose(plan.ratio / space.ratio_step, np.round(plan.ratio / space.ratio_step), atol=1e-4)
        study.tell(t, 0.0)


def test_enqueued_params_reproduce_the_plan():
    space = space_for_profile(None)
    want = P.make_plan([0.9, 0.31], [P.UNSTRUCTURED, P.CHANNEL], [5, 8], [8, 32], [P.CODEBOOK, P.UNIFORM])
    study = optuna.create_study()
    study.enqueue_trial(plan_to_params(want, LAYERS, space))
    got = suggest_plan(study.ask(), LAYERS, space)
    assert np.allclose(got.ratio, [0.9, 0.32])  # 0.31 snaps to the 0.02 grid
    assert got.granularity.tolist() == [P.UNSTRUCTURED, P.CHANNEL]
    assert got.weight_bits.tolist() == [5, 8] and got.act_bits.tolist() == [8, 32]
    assert got.quant_mode.tolist() == [P.CODEBOOK, P.UNIFORM]


def test_plan_dict_round_trip_is_exact():
    plan = P.make_plan([0.5, 0.0], [P.NM, P.UNSTRUCTURED], [4, 32], [8, 16], [P.UNIFORM, P.CODEBOOK])
    d = plan_to_dict(plan)
    assert d["granularity"] == ["nm", "unstructured"] and d["quant_mode"] == ["uniform", "codebook"]
    back = plan_from_dict(d)
    for f in ("ratio", "granularity", "weight_bits", "act_bits", "quant_mode"):
        np.testing.assert_array_equal(getattr(back, f), getattr(plan, f))


def test_extreme_plans_cover_every_discrete_combination():
    space = space_for_profile(SimpleNamespace(name="p", weight_bits=(8, 32), act_bits=(8, 32)))
    ext = extreme_plans(3, space)
    k = len(space.granularities) * len(space.weight_bits) * len(space.act_bits) * len(space.quant_modes)
    assert ext.batch_shape == (k,) and ext.num_layers == 3
    assert np.allclose(ext.ratio, 0.98)
    assert min(ext.weight_bits.ravel()) == min(space.weight_bits)


@pytest.mark.parametrize("bits,allowed,want", [(8, (4, 8, 32), 8), (5, (4, 8, 32), 8), (40, (4, 8), 8), (1, (4, 8), 4)])
def test_nearest_bits_rounds_up(bits, allowed, want):
    assert nearest_bits(bits, allowed) == want


def test_snap_ratio_clips_and_grids():
    space = space_for_profile(None)
    assert snap_ratio(0.999, space) == 0.98
    assert snap_ratio(-0.1, space) == 0.0
    assert snap_ratio(0.471, space) == pytest.approx(0.48)
