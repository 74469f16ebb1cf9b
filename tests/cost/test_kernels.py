"""Kernel-level latency predictors from a real (small) calibration in onnxruntime: monotone
predictions, vectorised pricing, the profile file round trip, refitting to measured models, and
one-line errors for a missing or corrupt [kernels] table. Which kernel a layer runs, and the
probes' forms, are in test_kernel_forms.py (nothing timed)."""
from __future__ import annotations

import dataclasses
import re
from types import MappingProxyType

import numpy as np
import pytest

import hw_profiles
from hw_profiles import KERNELS, ProfileError
from hw_profiles.schema import KERNEL_FEATURES
from search.compression import plan as P
from search.cost import kernels as K
from search.cost.calibrate import calibrated_profile, fit_profile, profile_toml
from search.cost.roofline import latency_by_kernel, latency_features, price
from search.export import kernel_probes as kp
from search.export import kernel_timing as kt
from tests.support import CONV_LAYERS as LAYERS, MACHINE, dense

# The calibration tests time kernels and assert on what the fit learned: a busy pytest-xdist
# worker next to them leaves a small probe's time in the noise (a stop's CI run lost every
# conv_f32n sample that way), so `make test` runs this file alone, after the parallel tests.
pytestmark = pytest.mark.timing

@pytest.fixture(scope="module")
def calibrated():
    """A real calibration, as small as holds: 16 shapes per kind, 4 sizes of elementwise ops (about
    9 s). At 4 shapes, conv_f32 had 2 samples for its 9 coefficients: a noisy minute on a shared
    host dropped one, the fit on the other priced the blocked member of each f32n pair above the
    pair and every f32n sample was dropped with it (two CI runs failed so on 2 December), or the
    fit was one constant per conv and 90% of the channels pruned priced slower than 10%."""
    model, report = kt.calibrate_kernels(kp.sampled_shapes(16, seed=1), min_s=0.002, rounds=2, sizes=(256, 2048, 16384, 65536))
    return calibrated_profile(MACHINE, name="here", kernels=model), report


def test_calibration_learns_monotone_predictors_that_round_trip_through_the_file(calibrated, tmp_path):
    profile, report = calibrated
    k = profile.kernels
    assert set(k.coef) == set(KERNELS) and k.inference_us > 0 and report["kernels_timed"] == k.samples
    assert 0 <= report["held_out_median_error"] < 10  # the form's check on a random half ran
    assert all(c >= 0 for v in k.coef.values() for c in v)
    assert all(any(c > 0 for c in k.coef[name]) for name in KERNELS)  # every kind learned something
    assert report["per_kernel"]["pool_u8"] > 0  # the uint8 pooling had probes of its own
    assert report["per_kernel"]["kron"] > 0  # so did the Kronecker layers
    if k.channel_block > 1:  # a conv reading fewer channels than the block: NCHW-input kernel samples
        assert report["per_kernel"]["conv_f32n"] > 0
        assert report["per_kernel"]["clip"] > 0  # blocked chains timed with ReLU6 against ReLU
    text = profile_toml(profile, MACHINE)
    path = tmp_path / "here.toml"
    path.write_text(text)
    back = hw_profiles.load_profile(str(path))
    assert back.kernels == k and 'latency_model = "kernels"' in text
    assert "us per 1, M, N, K, MN, MK, NK, MNK, MT" in text  # each row says what its coefficients multiply
    assert k.q8u_block == k.channel_block  # q8u probes were fitted on whole channel blocks
    plans = P.stack_plans([P.dense_plan(4), P.make_plan([0.5, 0.0, 0.5, 0.0], P.CHANNEL, 8, 8)])
    np.testing.assert_array_equal(price(back, LAYERS, plans).latency_ms, price(profile, LAYERS, plans).latency_ms)


def test_every_predictor_is_monotone_in_positions_channels_fan_in_and_taps(calibrated):
    profile, _ = calibrated
    rng = np.random.default_rng(0)
    base = rng.integers(1, 64, (200, 4)).astype(float)  # M, N, K, taps
    for name in KERNELS:
        coef = np.array(profile.kernels.coef[name])
        t0 = K.features(*base.T) @ coef
        for axis in range(4):
            more = base.copy()
            more[:, axis] += rng.integers(1, 16, 200)
            assert np.all(K.features(*more.T) @ coef >= t0), (name, axis)


@pytest.mark.parametrize("bits", [(32, 32), (8, 8), (4, 8), (8, 16), (16, 16)])
def test_more_channels_never_predict_a_faster_kernel(calibrated, bits):
    """Pruning more channels never predicts a slower layer while its kernel kind stays (from 10%
    on: an integer conv reading a producer's removed channels through zero padding gets a bias
    map and runs as ConvInteger, not QLinearConv, as the export does). A float conv moves between
    the blocked and the plain kernels (f32, f32p) as its counts leave the channel alignment, as
    onnxruntime's do, and an int8 one between the channel-block and remainder kernels (q8, q8p):
    only steps that keep each layer's side are compared. A float layer whose reader drops below
    the channel block gains a reorder of its output to NCHW (runtime_graph.reorder_count), as in
    onnxruntime: that is a side too."""
    from search.compression.groups import kept_channels

    profile, _ = calibrated
    ratios = np.linspace(0.1, 0.9, 9)
    plans = P.stack_plans([P.make_plan([r, 0.0, r, 0.0], P.CHANNEL, *bits) for r in ratios])
    lat = price(profile, LAYERS, plans)
    k16, k32 = kept_channels(ratios, 16), kept_channels(ratios, 32)
    b, a = profile.kernels.channel_block, profile.kernels.channel_align
    dw = K.on_blocks(k16, 1, b, a, True)  # the depthwise conv, blocked (reads NCHWc) or plain (NCHW)
    side = np.stack([2 * K.on_blocks(k16, 3, b, a) + dw, 2 * dw + (k16 < b),
                     K.on_blocks(k32, k16, b, a), np.ones_like(k16, bool)], axis=1)  # [plans, layers]; the head is dense
    if bits[0] > 8 or bits[1] > 8:  # float kernels
        same = side[1:] == side[:-1]
    elif bits[0] <= 7:  # QLinear kernels: on or off the channel block (q8, q8p); the head is i8
        side = np.stack([K.q8_on_blocks(k16, b), K.q8_on_blocks(k16, b), K.q8_on_blocks(k32, b),
                         np.ones_like(k16, bool)], axis=1)
        same = side[1:] == side[:-1]
    else:  # 8-bit weights (q8u) have one path
        same = np.ones((len(ratios) - 1, len(LAYERS)), bool)
    assert np.all(np.diff(lat.layer_latency_ms, axis=0)[same] <= 1e-12)  # every layer, as its channels go
    assert same.sum() >= len(LAYERS) * (len(ratios) - 1) // 2
    assert lat.latency_ms[-1] < lat.latency_ms[0]


def test_pricing_stays_vectorised(calibrated):
    """K plans priced in one call equal the same plans priced one by one; the per-inference term
    is counted once per plan and the per-kind split adds up to the latency."""
    profile, _ = calibrated
    rng = np.random.default_rng(0)
    plans = [P.make_plan(rng.uniform(0, 0.9, 4) * [1, 0, 1, 0], rng.integers(0, 3, 4), rng.choice([2, 4, 8, 16, 32], 4),
                         rng.choice([4, 8, 16, 32], 4), rng.integers(0, 2, 4)) for _ in range(64)]
    together = price(profile, LAYERS, P.stack_plans(plans)).latency_ms
    alone = [float(price(profile, LAYERS, P.stack_plans([p])).latency_ms[0]) for p in plans]
    np.testing.assert_allclose(together, alone, rtol=1e-12)
    split = latency_by_kernel(profile, LAYERS, P.stack_plans(plans))
    np.testing.assert_allclose(split.sum(axis=1) + profile.kernels.inference_us * 1e-3, together, rtol=1e-9)


def test_fit_profile_scales_each_kernel_kind_to_measured_models(calibrated):
    """Latencies priced on a hidden device (every kind's coefficients scaled by a known factor)
    are recovered from the calibrated profile within 1% on held-out plans (no pull toward the
    calibration); with the default pull, a kind no plan runs keeps its calibration."""
    profile, _ = calibrated
    rng = np.random.default_rng(1)
    factors = {name: float(rng.uniform(0.6, 1.8)) for name in KERNELS}
    truth = dataclasses.replace(profile, kernels=K.scaled(profile.kernels, factors, 1.3))

    def plans(n):
        return [P.make_plan(rng.uniform(0, 0.8, 4) * [1, 0, 1, 0], P.CHANNEL, rng.choice([4, 8, 16, 32], 4),
                            rng.choice([8, 16, 32], 4), rng.integers(0, 2, 4)) for _ in range(n)]

    fit, test = plans(60), plans(20)
    measured = price(truth, LAYERS, P.stack_plans(fit)).latency_ms
    fitted = fit_profile(profile, [(LAYERS, p, m) for p, m in zip(fit, measured)], name="fitted", prior=0.0)
    want = price(truth, LAYERS, P.stack_plans(test)).latency_ms
    got = price(fitted, LAYERS, P.stack_plans(test)).latency_ms
    assert np.max(np.abs(got / want - 1)) < 0.01
    assert np.max(np.abs(price(profile, LAYERS, P.stack_plans(test)).latency_ms / want - 1)) > 0.1
    pulled = fit_profile(profile, [(LAYERS, p, m) for p, m in zip(fit, measured)])
    assert pulled.kernels.coef["dense_q8"] == profile.kernels.coef["dense_q8"]  # no plan has an integer head here


def test_coefficient_fit_moves_cost_between_terms_that_one_scale_per_kind_cannot(calibrated):
    """A hidden device whose kernels cost differently per term (each coefficient scaled by its own
    factor: e.g. dearer per call, cheaper per MAC) is recovered within 2% on held-out plans by
    kernel_fit="coefficients", which one scale per kind misses; coefficients stay >= 0 (monotone),
    and the feature sums price exactly what `price` does."""
    profile, _ = calibrated
    rng = np.random.default_rng(2)
    coef = {n: tuple(c * rng.uniform(0.4, 2.5) for c in v) for n, v in profile.kernels.coef.items()}
    truth = dataclasses.replace(profile, kernels=dataclasses.replace(profile.kernels, coef=coef, inference_us=7.0))

    def plans(n):
        return [P.make_plan(rng.uniform(0, 0.8, 4) * [1, 0, 1, 0], P.CHANNEL, rng.choice([8, 32], 4),
                            rng.choice([8, 32], 4)) for _ in range(n)]

    fit, test = plans(80), plans(30)
    stacked = P.stack_plans(test)
    sums = latency_features(truth, LAYERS, stacked)
    assert np.allclose(7.0 + np.einsum("knf,nf->k", sums, np.array([coef[n] for n in KERNELS])),
                       price(truth, LAYERS, stacked).latency_ms * 1e3)
    samples = [(LAYERS, p, m) for p, m in zip(fit, price(truth, LAYERS, P.stack_plans(fit)).latency_ms)]
    want = price(truth, LAYERS, stacked).latency_ms
    err = {how: np.abs(price(fit_profile(profile, samples, kernel_fit=how, prior=0.0), LAYERS, stacked).latency_ms / want - 1)
           for how in ("scales", "coefficients")}
    fitted = fit_profile(profile, samples, kernel_fit="coefficients")
    assert np.median(err["coefficients"]) < 0.02 and np.median(err["coefficients"]) < np.median(err["scales"])
    assert all(c >= 0 for v in fitted.kernels.coef.values() for c in v)
    with pytest.raises(ValueError, match="kernel_fit 'trees'"):
        fit_profile(profile, samples, kernel_fit="trees")


@pytest.mark.parametrize("edit, words", [
    (lambda t: t.replace("conv_q8 = [", "conv_q9 = ["), ["kernels.conv_q9", "unknown field"]),
    (lambda t: "\n".join(l for l in t.splitlines() if not l.startswith("depthwise_i8")), ["kernels.depthwise_i8", "missing", "calibrate"]),
    (lambda t: t.replace("dense_f32 = [", "dense_f32 = [-1.0, "), ["kernels.dense_f32", "10 values"]),
    (lambda t: t.replace('latency_model = "kernels"', 'latency_model = "roofline"'), ["latency_model", "kernels given"]),
    (lambda t: t.replace('latency_model = "kernels"', 'latency_model = "nn-meter"'), ["latency_model", "'nn-meter'"]),
    (lambda t: re.sub(r"channel_block = \d+", "channel_block = 0", t), ["kernels.channel_block", "out of range", "[1, 1024]"]),
    (lambda t: re.sub(r"channel_block = \d+", "channel_block = 16.5", t), ["kernels.channel_block", "wrong type"]),
    (lambda t: re.sub(r"channel_align = \d+", "channel_align = -4", t), ["kernels.channel_align", "out of range"]),
])
def test_a_corrupt_kernels_table_is_one_line(calibrated, tmp_path, edit, words):
    profile, _ = calibrated
    f = tmp_path / "bad.toml"
    f.write_text(edit(profile_toml(profile, MACHINE)))
    with pytest.raises(ProfileError) as e:
        hw_profiles.load_profile(str(f))
    msg = str(e.value)
    assert "\n" not in msg and str(f) in msg
    for w in words:
        assert w in msg, (w, msg)


def test_a_profile_calibrated_before_q8u_and_channel_blocks_still_loads(calibrated, tmp_path):
    """A [kernels] table without the q8u, f32p and q8p kinds, channel_block and channel_align
    (written before they existed) prices 8-bit weights and int8 layers off the channel block with
    its q8 kernels and float convolutions unblocked."""
    profile, _ = calibrated
    kinds = ("dense", "conv", "depthwise")
    text = "\n".join(l for l in profile_toml(profile, MACHINE).splitlines()
                     if not l.startswith(tuple(f"{k}_{f}" for k in kinds for f in ("q8u", "f32p", "q8p")) + ("channel_", "q8u_block")))
    f = tmp_path / "old.toml"
    f.write_text(text)
    k = hw_profiles.load_profile(str(f)).kernels
    assert k.channel_block == 1 and k.channel_align == 1 and k.q8u_block == 1
    assert all(k.coef[f"{kind}_q8u"] == profile.kernels.coef[f"{kind}_q8"] for kind in kinds)
    assert all(k.coef[f"{kind}_f32p"] == profile.kernels.coef[f"{kind}_f32"] for kind in kinds)
    assert all(k.coef[f"{kind}_q8p"] == profile.kernels.coef[f"{kind}_q8"] for kind in kinds)


def test_a_server_batch_calibration_times_and_prices_whole_batches(calibrated, tmp_path):
    """`profiles calibrate --batch 4`: every layer probe runs 4 examples (a Dense GEMM has 4 rows,
    a chain of two 8 in all), the file says so and keeps it, and pricing counts positions x batch
    (the per-call terms once per batch: a batch of 4 costs less than 4 inferences); a profile
    written before `batch` existed prices batch 1."""
    # element-wise probes of 4K and 64K elements: their times stand well above the timing noise of a
    # busy CPU (at 256 a second pytest worker could hide every one, leaving `eltwise` no sample)
    model, report = kt.calibrate_kernels(kp.sampled_shapes(3, seed=2), min_s=0.002, rounds=1, sizes=(4096, 65536),
                                         batch=4)
    assert model.batch == 4 and "batch 4" in model.runtime
    m = KERNEL_FEATURES.index("M")
    assert {f[m] for n, f, _ in report["samples"] if n == "dense_i8"} == {4.0}  # one probe alone
    assert {f[m] for n, f, _ in report["samples"] if n in ("dense_f32", "dense_q8")} == {8.0}  # two in the chain
    path = tmp_path / "b4.toml"
    path.write_text(profile_toml(calibrated_profile(MACHINE, name="b4", kernels=model), MACHINE))
    assert hw_profiles.load_profile(str(path)).kernels.batch == 4
    coef = {name: (0.0,) * 9 for name in KERNELS} | {"dense_f32": (2.0, 1.0) + (0.0,) * 7}  # 2 us a call, 1 per row
    one = calibrated_profile(MACHINE, name="a", kernels=hw_profiles.KernelModel(0.5, MappingProxyType(coef), "synthetic"))
    four = calibrated_profile(MACHINE, name="b", kernels=dataclasses.replace(one.kernels, batch=4))
    head = (dense(0, 16, 10),)
    us = lambda prof: float(price(prof, head, P.dense_plan(1)).latency_ms[0]) * 1e3
    assert us(one) == pytest.approx(0.5 + 2 + 1) and us(four) == pytest.approx(0.5 + 2 + 4)
    old = "\n".join(l for l in profile_toml(four, MACHINE).splitlines() if not l.startswith("batch ="))
    assert "batch = 4" in profile_toml(four, MACHINE) and hw_profiles.profile_from_text(old).kernels.batch == 1


def test_a_profile_calibrated_before_the_clip_pass_prices_it_as_an_unfused_op(calibrated, tmp_path):
    """A [kernels] table without `clip` (written before ReLU6 was priced) prices the pass as one
    `eltwise` op on the conv's output, as fallbacks go (hw_profiles.schema.KERNEL_FALLBACK)."""
    profile, _ = calibrated
    f = tmp_path / "old.toml"
    f.write_text("\n".join(l for l in profile_toml(profile, MACHINE).splitlines() if not l.startswith("clip =")))
    assert "clip =" in profile_toml(profile, MACHINE)
    assert hw_profiles.load_profile(str(f)).kernels.coef["clip"] == profile.kernels.coef["eltwise"]


def test_a_profile_calibrated_before_the_per_tap_term_still_loads(calibrated, tmp_path):
    """Coefficient rows of 8 (written before KERNEL_FEATURES had MT) load with MT's coefficient
    0 and price as the same profile with that term zeroed."""
    import re

    profile, _ = calibrated
    text = re.sub(r"^(\w+ = \[)((?:[^,\]]+, ){7}[^,\]]+), [^,\]]+\]", r"\1\2]", profile_toml(profile, MACHINE), flags=re.M)
    f = tmp_path / "old.toml"
    f.write_text(text)
    k = hw_profiles.load_profile(str(f)).kernels
    assert all(len(v) == len(KERNEL_FEATURES) and v[-1] == 0.0 for v in k.coef.values())
    zeroed = {n: v[:-1] + (0.0,) for n, v in profile.kernels.coef.items()}
    assert k.coef == zeroed


def test_negative_coefficient_is_refused(calibrated, tmp_path):
    profile, _ = calibrated
    text = profile_toml(profile, MACHINE)
    line = next(l for l in text.splitlines() if l.startswith("conv_f32 = "))
    f = tmp_path / "neg.toml"
    f.write_text(text.replace(line, "conv_f32 = [-1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]"))
    with pytest.raises(ProfileError, match=r"kernels\.conv_f32.*out of range"):
        hw_profiles.load_profile(str(f))


def test_a_kronecker_layer_is_one_kron_kernel_priced_per_layer_and_per_call(calibrated):
    """A Kronecker layer is one `kron` kernel whose features (kernels.kron_features) count the
    layer once ("1") and the r GEMM calls of its broadcast MatMul ("MT"): with 2 us per layer and 1
    per call, a 64 x 300 Dense (8 x 8 by 15 x 20) at rank r costs 2 + r. Pricing and the probes use
    the same features (the probe of that layer at that rank is priced what the plan is); the SVD
    form of the layer stays two dense_f32 kernels."""
    profile, _ = calibrated
    F = len(K.KERNEL_FEATURES)
    coef = {k: (0.0,) * F for k in KERNELS}
    coef["kron"] = (2.0,) + (0.0,) * (F - 2) + (1.0,)
    coef["dense_f32"] = (1.0,) + (0.0,) * (F - 1)
    only = dataclasses.replace(profile, kernels=dataclasses.replace(profile.kernels, coef=coef, inference_us=0.0))
    fc = (dense(0, 64, 300),)
    us = lambda prof, plan: float(price(prof, fc, P.stack_plans([plan])).latency_ms[0]) * 1e3
    for rank, r in ((0.03125, 4), (0.0625, 8)):  # full rank min(8 * 15, 8 * 20) = 120: r = 3.75 -> 4, 7.5 -> 8
        plan = P.make_plan(np.zeros(1), rank=rank, form="kronecker")
        assert us(only, plan) == pytest.approx(2 + r)
        layer_us = float(price(profile, fc, P.stack_plans([plan])).layer_latency_ms[0, 0]) * 1e3
        assert layer_us == pytest.approx(np.dot(profile.kernels.coef["kron"], kp.Shape("kron", 64, 300, rank=r).features()))
    assert us(only, P.make_plan(np.zeros(1), rank=0.25)) == pytest.approx(2)  # SVD: two dense_f32 calls


def test_a_profile_calibrated_before_kron_prices_it_as_it_did(calibrated, tmp_path):
    """A [kernels] table without `kron` loads with kron = its dense_f32 row whose per-call term
    also counts the broadcast GEMM's calls (schema.fallback_row): a Kronecker layer then costs
    what its r + 1 GEMMs cost as dense_f32 kernels (their summed features), as before kron."""
    profile, _ = calibrated
    f = tmp_path / "old.toml"
    f.write_text("\n".join(l for l in profile_toml(profile, MACHINE).splitlines() if not l.startswith("kron =")))
    assert "kron =" in profile_toml(profile, MACHINE)
    old = hw_profiles.load_profile(str(f))
    dense_row = np.array(profile.kernels.coef["dense_f32"])
    assert np.array(old.kernels.coef["kron"])[:-1].tolist() == dense_row[:-1].tolist()
    plan = P.stack_plans([P.make_plan(np.zeros(1), rank=0.0625, form="kronecker")])  # r = 8 of 120
    gemms = 8 * K.features(8, 20, 8) + K.features(15, 20, 8 * 8)  # 8 x 8 by 15 x 20
    us = float(price(old, (dense(0, 64, 300),), plan).layer_latency_ms[0, 0]) * 1e3
    assert us == pytest.approx(float(gemms @ dense_row))


