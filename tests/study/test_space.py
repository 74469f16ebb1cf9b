"""The per-layer search space: sampling, round trips through Optuna params, extremes."""
import dataclasses
from types import SimpleNamespace

import numpy as np
import optuna
import pytest

from search.compression import plan as P
from search.compression.layers import Layer
from search.compression import lowrank
from search.study.space import (
    KRONECKER_RANK_SCALE,
    Space,
    aligned_rank,
    aligned_ratio,
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


def test_factorization_is_off_by_default_and_a_conditional_choice_when_on():
    prof = SimpleNamespace(name="p", weight_bits=(8, 16, 32), act_bits=(8, 32), nm_patterns=(), float_policy="native")
    off = space_for_profile(prof)
    # off: records keep their old keys, and no trial samples a rank
    assert not off.factorize and "ranks" not in off.to_dict()
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    t = study.ask()
    assert np.all(suggest_plan(t, LAYERS, off).rank == 1.0) and not any(k.endswith(".rank") for k in t.params)
    on = space_for_profile(prof, factorize=True)
    assert type(on).from_dict(on.to_dict()) == on and on.to_dict()["ranks"] == [1.0, 0.75, 0.5, 0.25]
    assert on.forms == ("svd", "spatial", "kronecker")
    # a record from before the spatial and Kronecker forms offers SVD only
    old = {k: v for k, v in on.to_dict().items() if k != "forms"}
    assert type(on).from_dict(old).forms == ("svd",)
    from search.compression.lowrank import check_plan
    seen, forms = set(), set()
    for _ in range(80):
        t = study.ask()
        plan = suggest_plan(t, LAYERS, on)
        check_plan(plan, LAYERS)  # only combinations a factorized layer takes
        for l in LAYERS:
            offered = f"{l.name}.rank" in t.params
            # offered exactly where the layer's pruning is by channel or nothing and it is no codebook
            can = (plan.granularity[l.index] == P.CHANNEL or plan.ratio[l.index] == 0) and \
                not (plan.quant_mode[l.index] == P.CODEBOOK and plan.weight_bits[l.index] <= 8)
            assert offered == can, (t.params, l.name)
            seen.add(float(plan.rank[l.index]))
            forms.add(int(plan.form[l.index]))
            # both layers take svd and kronecker (64 = 8*8, 30 = 5*6, 10 = 2*5), not spatial (no conv):
            # a form is sampled below rank 1 where the layer keeps its channels (these layers'
            # inputs are no layer's); a pruned layer takes SVD without sampling one, so the
            # stored params are the forms that ran
            drawn = t.params.get(f"{l.name}.rank", 1.0)
            assert (f"{l.name}.form" in t.params) == (drawn < 1 and plan.ratio[l.index] == 0), (t.params, l.name)
            if plan.rank[l.index] < 1:
                form = P.FORMS[t.params.get(f"{l.name}.form", "svd")]
                assert plan.form[l.index] == form
                assert lowrank.pays(l, LAYERS, form, float(plan.rank[l.index]), plan.ratio, plan.granularity)
            elif drawn < 1:  # a drawn rank as large as the layer runs the layer unfactorized
                form = P.FORMS[t.params.get(f"{l.name}.form", "svd")]
                scaled = drawn * (KRONECKER_RANK_SCALE if form == P.KRONECKER else 1)
                assert not lowrank.pays(l, LAYERS, form, scaled, plan.ratio, plan.granularity), (t.params, l.name)
        # an enqueued copy of the plan samples the same plan (ratios on Optuna's float grid)
        again = suggest_plan(optuna.trial.FixedTrial(plan_to_params(plan, LAYERS, on)), LAYERS, on)
        assert all(np.allclose(getattr(again, f), getattr(plan, f)) for f in ("ratio", "rank", "form", "weight_bits"))
        study.tell(t, 0.0)
    # 0.75 is drawn but never pays on these layers (64 x 30: r = 23, 2,162 > 1,920 weights)
    assert seen >= {1.0, 0.5, 0.25} and 0.75 not in seen and forms >= {P.SVD}
    # unpruned, Kronecker layers take 1/8 of the sampled ratio (space.KRONECKER_RANK_SCALE)
    keep_all = dataclasses.replace(on, max_ratio=0.0)
    kron = set()
    for _ in range(40):
        t = study.ask()
        plan = suggest_plan(t, LAYERS, keep_all)
        check_plan(plan, LAYERS)
        kron |= {float(r) for r, f in zip(plan.rank, plan.form) if f == P.KRONECKER}
        study.tell(t, 0.0)
    assert kron == {0.09375, 0.0625, 0.03125}
    # the cheapest plans include the lowest rank where a factorized layer may take it
    ext = extreme_plans(2, on)
    assert np.any((ext.rank == 0.25) & (ext.granularity == P.CHANNEL)) and np.all(ext.rank[ext.granularity != P.CHANNEL] == 1)
    assert np.any((ext.rank == 0.03125) & (ext.form == P.KRONECKER) & (ext.ratio == 0))


def test_a_rank_pays_only_when_the_factors_hold_fewer_weights_than_the_pruned_layer():
    fc = _dense(0, "fc", 300, 100)
    grans = np.array([P.CHANNEL])
    # unpruned, r (300 + 100) against 30,000: rank 0.75 (r = 75) holds as much, 0.5 (r = 50) less
    assert not lowrank.pays(fc, (fc,), P.SVD, 0.75, np.zeros(1), grans)
    assert lowrank.pays(fc, (fc,), P.SVD, 0.5, np.zeros(1), grans)
    # 54 of 100 outputs pruned: 50 x 346 = 17,300 against 300 x 46 = 13,800
    assert not lowrank.pays(fc, (fc,), P.SVD, 0.5, np.array([0.54]), grans)
    assert lowrank.pays(fc, (fc,), P.SVD, 0.25, np.array([0.54]), grans)
    # rank 1 and a form the layer cannot take never pay
    assert not lowrank.pays(fc, (fc,), P.SVD, 1.0, np.zeros(1), grans)
    assert not lowrank.pays(fc, (fc,), P.SPATIAL, 0.25, np.zeros(1), grans)


def test_a_factorizing_space_tries_factorization_in_its_first_trials():
    from search.study.sensitivity import warm_start_plans
    prof = SimpleNamespace(name="p", weight_bits=(8, 16, 32), act_bits=(8, 32), nm_patterns=(), float_policy="native")
    on, off = space_for_profile(prof, factorize=True), space_for_profile(prof)
    assert all(np.all(p.rank == 1) for p in warm_start_plans(None, LAYERS, off))
    plans = warm_start_plans(None, LAYERS, on)
    # the second warm start: every layer at the largest offered rank that pays (64 x 30: 0.5, r = 15,
    # 1,410 < 1,920; 30 x 10: 0.5, r = 5, 200 < 300), nothing pruned, int8
    assert len(plans) == 2 and np.allclose(plans[1].rank, [0.5, 0.5]) and np.all(plans[1].ratio == 0)
    assert np.all(plans[1].form == P.SVD) and np.all(plans[1].weight_bits == 8)
    lowrank.check_plan(plans[1], LAYERS)
    again = suggest_plan(optuna.trial.FixedTrial(plan_to_params(plans[1], LAYERS, on)), LAYERS, on)
    assert np.allclose(again.rank, plans[1].rank)


def test_plans_stored_before_factorization_load_at_full_rank():
    plan = P.make_plan([0.5, 0.0], [P.CHANNEL, P.UNSTRUCTURED], [8, 4], [8, 32], [0, 0], rank=[0.25, 1.0])
    d = plan_to_dict(plan)
    assert d["rank"] == [0.25, 1.0] and d["form"] == ["svd", "svd"]
    back = plan_from_dict(d)
    assert all(np.array_equal(getattr(back, f), getattr(plan, f)) for f in ("ratio", "rank", "form", "weight_bits"))
    old = {k: v for k, v in d.items() if k not in ("rank", "form")}
    assert np.all(plan_from_dict(old).rank == 1.0)


def test_factorize_is_a_space_option_the_study_record_keeps():
    from search.api import make_spec
    from search.study.spec import StudySpec

    spec = make_spec(model="lenet300", dataset="digits", profile="mobile-cpu", factorize=True)
    assert spec.space.ranks == (1.0, 0.75, 0.5, 0.25) and spec.space.forms == ("svd", "spatial", "kronecker")
    assert StudySpec.from_attrs(spec.to_attrs()).space == spec.space
    plain = make_spec(model="lenet300", dataset="digits", profile="mobile-cpu")
    assert not plain.space.factorize and "ranks" not in plain.to_attrs()["space"]


def test_a_factorized_warm_start_no_cheaper_than_plain_int8_is_not_tried():
    """Three 3x3 convs at 24x24 on mobile-npu (DemosaicNet's shape): factorized, each is two
    kernels with an intermediate, dearer in latency and memory than plain int8, only smaller."""
    from hw_profiles import load_profile
    from search.api import _priced_warm_starts
    from search.study.sensitivity import warm_start_plans
    from tests.support import conv as _conv

    convs = (_conv(0, 4, 32, 24), _conv(1, 32, 32, 24, src=0), _conv(2, 32, 32, 24, src=1))
    npu = load_profile("mobile-npu")
    space = space_for_profile(npu, factorize=True)
    plans = warm_start_plans(None, convs, space)
    assert len(plans) == 2 and np.any(plans[1].rank < 1)
    ctx = lambda objectives: SimpleNamespace(space=space, objectives=objectives, profile=npu, layers=convs)
    assert _priced_warm_starts(ctx(("quality", "latency_ms", "memory_kb")), plans) == plans[:1]
    assert _priced_warm_starts(ctx(("quality", "size_kb")), plans) == plans


def test_a_profile_with_blocked_float_convs_keeps_aligned_channel_counts():
    """A profile calibrated where onnxruntime runs float convs on channel blocks (kernels with
    channel_block > 1) makes the space keep multiples of its channel_align in channel-pruned
    conv groups: the sampled count rounded up (at most all channels); the study record keeps it."""
    from search.compression.groups import kept_channels

    assert aligned_ratio(0.3125, 32, 4) == 0.25  # keeps 22 -> 24
    assert aligned_ratio(0.5, 32, 4) == 0.5 and aligned_ratio(0.3, 30, 1) == 0.3 and aligned_ratio(0.0, 30, 4) == 0.0
    assert kept_channels(np.float32(aligned_ratio(0.9, 6, 4)), 6) == 4 and aligned_ratio(0.02, 30, 4) == 0.0
    kern = lambda block, align: SimpleNamespace(name="c", weight_bits=(8, 32), act_bits=(8, 32),
                                                kernels=SimpleNamespace(channel_block=block, channel_align=align))
    assert space_for_profile(kern(1, 1)).channel_multiple == 1 and space_for_profile(None).channel_multiple == 1
    space = space_for_profile(kern(16, 4))
    assert space.channel_multiple == 4 and Space.from_dict(space.to_dict()) == space
    assert "channel_multiple" not in space_for_profile(None).to_dict()  # older records read as 1
    conv = lambda i, cin, cout: Layer(i, f"c{i}", (f"c{i}",), "conv", (3, 3, cin, cout), (8, 8, cin), (8, 8, cout), 1,
                                      True, 64 * 9 * cin * cout, 9 * cin * cout + cout)
    layers = (conv(0, 3, 30), conv(1, 30, 50), _dense(2, "fc", 50 * 64, 30), _dense(3, "out", 30, 10))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen, dense_free = 0, 0
    for _ in range(40):
        plan = suggest_plan(study.ask(), layers, space)
        for layer in layers:
            if plan.granularity[layer.index] == P.CHANNEL and plan.ratio[layer.index] > 0:
                kept = int(kept_channels(np.float32(plan.ratio[layer.index]), layer.out_channels))
                if layer.kind == "conv":
                    assert kept % 4 == 0 or kept == layer.out_channels, (layer.name, kept)
                    seen += 1
                else:  # a Dense group runs no blocked kernel: its sampled count stands
                    dense_free += kept % 4 != 0
    assert seen >= 10 and dense_free > 0
    # a factorized conv (SVD or spatial form) takes a rank that is a multiple of the alignment:
    # its second factor reads that many channels
    fspace = space_for_profile(kern(16, 4), factorize=True)
    convs = (conv(0, 3, 30), conv(1, 30, 50), conv(2, 50, 50), _dense(3, "out", 50 * 64, 10))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    ranks = []
    for _ in range(60):
        plan = suggest_plan(study.ask(), convs, fspace)
        for layer in convs[:3]:
            if plan.rank[layer.index] < 1:
                form = int(plan.form[layer.index])
                d = lowrank.full_rank(layer, form)
                ranks.append(int(lowrank.achieved_rank(plan.rank[layer.index], d)))
    assert len(ranks) >= 10 and all(r % 4 == 0 for r in ranks), ranks
    assert aligned_rank(convs[1], P.SVD, 0.5, 1) == 0.5 and aligned_rank(convs[3], P.SVD, 0.5, 4) == 0.5
    assert aligned_rank(convs[1], P.KRONECKER, 0.5, 4) == 0.5 and aligned_rank(convs[1], P.SVD, 1.0, 4) == 1.0
