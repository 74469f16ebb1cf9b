"""Kernel-level latency predictors: probes in the export's forms, a real (tiny) calibration in
onnxruntime, monotone predictions, vectorised pricing, the profile file round trip, refitting
to measured models, and one-line errors for a missing or corrupt [kernels] table."""
from __future__ import annotations

import dataclasses
import re
from types import MappingProxyType

import numpy as np
import onnx
import pytest

import hw_profiles
from hw_profiles import KERNELS, ProfileError
from hw_profiles.schema import KERNEL_FEATURES
from search.compression import plan as P
from search.cost import kernels as K
from search.cost.calibrate import calibrated_profile, fit_profile, profile_toml
from search.cost.measure import session
from search.cost.roofline import latency_by_kernel, latency_features, price
from search.export import kernel_probes as kp
from search.export import kernel_timing as kt
from tests.support import CONV_LAYERS as LAYERS, MACHINE, conv, dense

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


def test_probes_run_as_the_export_forms_they_stand_for():
    """Every (layer kind, form) probe loads in onnxruntime; the QDQ rewrite gives QLinear kernels
    for q8 and Integer kernels for i8 (probe raises otherwise); outputs have the layer's shape."""
    for shape in (kp.Shape("dense", 40, 24), kp.Shape("conv", 3, 8, 8, 3, 2), kp.Shape("depthwise", 8, 8, 8, 3, 1)):
        for form in K.FORMS:
            model, xs = kp.probe(shape, form)
            sess = session(model, 1)
            (y,) = sess.run(None, {"input": np.ones(xs, np.float32)})
            want = (1, shape.cout) if shape.kind == "dense" else (1, shape.cout, shape.out_hw, shape.out_hw)
            assert y.shape == want, (shape, form)
    assert kp.Shape("conv", 4, 8, 8, 3, 2).features() == K.features(16, 8, 36, 9).tolist()  # 9 taps


def test_a_kron_probe_is_the_layer_the_export_writes():
    """A kron probe holds the export's Kronecker nodes (layers.kronecker: Reshape, broadcast MatMul,
    Reshape, MatMul, Reshape), then the bias Add and the ReLU, and runs in onnxruntime; a chain of
    two maps 64 -> 300 -> 64."""
    shape = kp.Shape("kron", 64, 300, rank=8)
    model, xs = kp.probe(shape, "f32")
    ops = [n.op_type for n in onnx.load_from_string(model).graph.node]
    assert ops == ["Reshape", "MatMul", "Reshape", "MatMul", "Reshape", "Add", "Relu", "Identity"]
    assert session(model, 1).run(None, {"input": np.ones(xs, np.float32)})[0].shape == (1, 300)
    model, xs = kp.probe_chain([shape, kp.partner(shape)], "f32")
    assert session(model, 1).run(None, {"input": np.ones(xs, np.float32)})[0].shape == (1, 64)
    kinds = [s.kind for s in kp.sampled_shapes(8)]
    assert kinds.count("kron") == 4 and all(s.rank >= 1 for s in kp.sampled_shapes(8) if s.kind == "kron")


def test_q8u_probes_hold_the_uint8_weights_the_export_writes_for_8_bits():
    """A q8u probe's kernel is uint8 with zero point 128 (codes past 63, as layers.py writes 8-bit
    weights), a q8 probe's int8 with codes within 63: the two kernels onnxruntime runs apart."""
    from onnx import numpy_helper

    for form, dtype in (("q8", np.int8), ("q8u", np.uint8)):
        model = onnx.load_from_string(kp.probe(kp.Shape("conv", 16, 16, 8, 3, 1), form)[0])
        arrays = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        (w,) = [a for a in arrays.values() if a.ndim == 4]
        assert w.dtype == dtype
        codes = w.astype(np.int32) - (128 if form == "q8u" else 0)
        assert (np.abs(codes).max() > 63) == (form == "q8u")


def test_float_convolutions_are_priced_on_the_runtime_channel_blocks():
    """With channel_block 16 (onnxruntime's NCHWc layout on AVX-512), a float conv keeping 17 to
    32 of its channels is priced as 32 (input and output), fewer than 16 input channels are not
    padded, depthwise kernels pad N only, and integer kernels are not blocked; block 1 keeps the
    counts. Pricing stays monotone in the kept channels (the unfused op after a layer is priced
    on its kept elements, so it is left out here)."""
    n, k = K.blocked([1, 16, 17, 24, 32, 33], [8, 16, 17, 24, 32, 33], 9, 16)
    assert n.tolist() == [16, 16, 32, 32, 32, 48] and k.tolist() == [72, 144, 288, 288, 288, 432]
    n, k = K.blocked([20], [1], 9, 16, depthwise=True)
    assert n.tolist() == [32] and k.tolist() == [9]
    n, k = K.blocked([20], [24], 9, 1)
    assert n.tolist() == [20] and k.tolist() == [216]
    assert kp.Shape("conv", 24, 20, 8, 3).features(16) == K.features(64, 32, 288, 9).tolist()
    coef = {name: (1.0,) + (1e-3,) * 7 for name in KERNELS} | {"eltwise": (0.0,) * 8}  # ops after: not blocked
    blocked_prof = lambda b: calibrated_profile(MACHINE, name="b", kernels=hw_profiles.KernelModel(
        5.0, MappingProxyType(coef), "synthetic", channel_block=b))
    layers = (conv(0, 32, 32, 8), conv(1, 32, 32, 8, src=0))
    ratios = np.linspace(0, 0.9, 10)  # of layer 0's 32 output channels (layer 1's input channels)
    for bits, blocked_too in ((32, True), (8, False)):
        plans = P.stack_plans([P.make_plan([r, 0.0], P.CHANNEL, bits, bits) for r in ratios])
        t16, t1 = (price(blocked_prof(b), layers, plans).latency_ms for b in (16, 1))
        assert np.all(np.diff(t16) <= 1e-12) and np.all(np.diff(t1) <= 1e-12)  # more pruned, never slower
        same = np.isclose(t16, t16[0], rtol=1e-12)
        if blocked_too:  # keeping 17..32 channels: one price; 16 or fewer: cheaper
            assert same.tolist() == [kept > 16 for kept in np.round(32 * (1 - ratios))]
        else:
            np.testing.assert_allclose(t16, t1, rtol=1e-12)


def test_float_convolutions_off_the_channel_alignment_run_the_plain_kernels():
    """With channel_align 4 (read off onnxruntime's optimized graph: a 3x3 conv reading 22 or
    50 channels, a depthwise conv with 86, leave its blocked kernels; one writing 22 or 50 does
    not), such a conv is priced as an f32p kernel on its unpadded counts; inputs below the block
    do not count, nor does a conv's output count (padded up to the block)."""
    assert K.on_blocks([20, 22, 24, 8, 20, 50], [24, 24, 22, 6, 1, 20], 16, 4).tolist() == [True, True, False, True, True, True]
    assert K.on_blocks([84, 86], [1, 1], 16, 4, depthwise=True).tolist() == [True, False]
    assert not K.on_blocks([32], [32], 1, 1).any()  # no blocked kernels at all
    coef = {name: (1.0,) + (0.0,) * 7 for name in KERNELS} | {"eltwise": (0.0,) * 8}
    coef |= {"conv_f32": (0.0,) * 7 + (1e-3,), "conv_f32p": (0.0,) * 7 + (5e-3,)}  # per MAC: plain 5x dearer
    prof = calibrated_profile(MACHINE, name="a", kernels=hw_profiles.KernelModel(
        0.0, MappingProxyType(coef), "synthetic", channel_block=16, channel_align=4))
    layers = (conv(0, 32, 32, 8), conv(1, 32, 32, 8, src=0))
    kept = lambda r: 32 - round(32 * r)
    lat = lambda r: float(price(prof, layers, P.make_plan([r, 0.0], P.CHANNEL, 32, 32)).layer_latency_ms[0, 1])
    macs = lambda cin, cout: 64 * 9 * cin * cout * 1e-6  # ms at 1e-3 us per MAC
    assert kept(0.25) == 24 and lat(0.25) == pytest.approx(macs(32, 32))  # 24 input channels: blocked, as 32
    assert kept(0.3125) == 22 and lat(0.3125) == pytest.approx(5 * macs(22, 32))  # 22: plain, unpadded


def test_a_blocked_1x1_conv_reading_fewer_channels_than_the_block_runs_the_nchw_input_kernel():
    """A float conv reading fewer input channels than the channel block takes them in NCHW, on
    onnxruntime's NCHW-input kernel; a 1x1 one (measured 3-5x the NCHWc-input predictor reading
    4-12 channels) is priced as an f32n kernel, on its blocked output channels and unpadded
    input; 16 input channels and more read NCHWc (f32), and a 3x3 conv stays f32 (stems measured
    within 30% of it). A profile calibrated before f32n existed prices it as f32 (its fallback)."""
    coef = {name: (0.0,) * 9 for name in KERNELS}
    coef |= {"conv_f32": (1.0,) + (0.0,) * 8, "conv_f32n": (3.0,) + (0.0,) * 3 + (1e-3,) + (0.0,) * 4}  # per call, per MN
    prof = calibrated_profile(MACHINE, name="a", kernels=hw_profiles.KernelModel(
        0.0, MappingProxyType(coef), "synthetic", channel_block=16, channel_align=4))
    pointwise = dataclasses.replace(conv(1, 32, 32, 8, src=0), kernel_shape=(1, 1, 32, 32), macs=64 * 32 * 32,
                                    params=32 * 32 + 32)
    for second, nchw in ((pointwise, 3.0 + 1e-3 * 64 * 32), (conv(1, 32, 32, 8, src=0), 1.0)):
        layers = (conv(0, 32, 32, 8), second)
        lat = lambda r: price(prof, layers, P.make_plan([r, 0.0], P.CHANNEL, 32, 32)).layer_latency_ms[0] * 1e3
        assert lat(0.5)[1] == pytest.approx(1.0)  # reads 16: NCHWc
        assert lat(0.75)[1] == pytest.approx(nchw)  # reads 8 in NCHW: M = 64 positions, N = 32 (two blocks)
        assert lat(0.75)[0] == pytest.approx(1.0)  # the producer reads all 32 of the model's input
    split = latency_by_kernel(prof, (conv(0, 32, 32, 8), pointwise), P.stack_plans([P.make_plan([0.75, 0.0], P.CHANNEL, 32, 32)]))
    assert split[0, KERNELS.index("conv_f32n")] == pytest.approx((3.0 + 1e-3 * 64 * 32) * 1e-3)
    old = {k: v for k, v in coef.items() if not k.endswith("_f32n")}
    before = hw_profiles.KernelModel(0.0, MappingProxyType(old), "synthetic", channel_block=16, channel_align=4)
    assert before.coef["conv_f32n"] == coef["conv_f32"]


def test_a_factorized_conv_runs_its_two_kernels_blocked_or_plain_by_its_rank():
    """An SVD-factorized 3x3 conv (32 -> 32) is r 3x3 filters then a 1x1 conv reading r channels:
    at rank 8 or 10 both run on the blocked kernels, the 1x1 conv reading its input below the block
    of 16 in NCHW (f32n), at rank 18 the 1x1 conv's input is off the alignment of 4 and it runs the
    plain kernels (lenet5 factorized at rank 25 took 1.6x the prediction that priced it blocked)."""
    coef = {name: (0.0,) * 9 for name in KERNELS}
    coef |= {"conv_f32": (1.0,) + (0.0,) * 8, "conv_f32p": (5.0,) + (0.0,) * 8,  # per call: plain 5x dearer
             "conv_f32n": (3.0,) + (0.0,) * 8}
    prof = calibrated_profile(MACHINE, name="a", kernels=hw_profiles.KernelModel(
        0.0, MappingProxyType(coef), "synthetic", channel_block=16, channel_align=4))
    layers = (conv(0, 32, 32, 8),)
    lat = lambda rank: float(price(prof, layers, P.make_plan([0.0], rank=rank)).layer_latency_ms[0, 0]) * 1e3
    full = min(9 * 32, 32)  # the SVD form's full rank
    assert lat(8 / full) == lat(10 / full) == pytest.approx(1 + 3)  # both blocked, B reading NCHW
    assert lat(18 / full) == pytest.approx(1 + 5)  # A blocked, B plain
    unblocked = calibrated_profile(MACHINE, name="b", kernels=dataclasses.replace(prof.kernels, channel_block=1, channel_align=1))
    assert float(price(unblocked, layers, P.make_plan([0.0], rank=18 / full)).layer_latency_ms[0, 0]) * 1e3 == pytest.approx(2)


def test_int8_convolutions_off_the_channel_block_run_the_remainder_kernels():
    """A QLinear conv or depthwise conv (weights <= 7 bits) whose kept output channels are not a
    multiple of the channel block (measured: a depthwise one 2-3x slower) is priced as a q8p
    kernel; 8-bit weights (q8u), integer kernels with float outputs (i8) and Dense layers are not."""
    assert K.q8_on_blocks([16, 32, 24, 72, 80], 16).tolist() == [True, True, False, False, True]
    assert K.q8_on_blocks([3, 24], 1).all()  # no channel blocks: one path
    per_mac = lambda c: (0.0,) * 7 + (c,)
    coef = {name: per_mac(1e-3) for name in KERNELS} | {"eltwise": (0.0,) * 8, "emul": (0.0,) * 8}
    coef |= {"depthwise_q8p": per_mac(3e-3), "conv_q8p": per_mac(2e-3), "dense_q8p": per_mac(9.0)}
    prof = calibrated_profile(MACHINE, name="a", kernels=hw_profiles.KernelModel(
        0.0, MappingProxyType(coef), "synthetic", channel_block=16, channel_align=4))
    lat = lambda r, w: price(prof, LAYERS, P.make_plan([r, 0.0, r, 0.0], P.CHANNEL, w, 8)).layer_latency_ms[0] * 1e3
    macs = np.array([64 * 27, 64 * 9, 64 * 9, 64])  # MACs per kept output channel and kept input channel
    kept = lambda r: np.array([16 - round(16 * r), 16 - round(16 * r), 32 - round(32 * r), 10])
    fan_in = lambda r: np.array([1, 1, kept(r)[0], kept(r)[2]])  # conv2 reads the stem's kept channels
    np.testing.assert_allclose(lat(0.0, 4), 1e-3 * macs * kept(0.0) * fan_in(0.0))  # 16, 16, 32: on the block
    np.testing.assert_allclose(lat(0.25, 4), [2e-3, 3e-3, 2e-3, 1e-3] * macs * kept(0.25) * fan_in(0.25))  # 12, 12, 24
    np.testing.assert_allclose(lat(0.5, 4), [2e-3, 3e-3, 1e-3, 1e-3] * macs * kept(0.5) * fan_in(0.5))  # 8, 8, 16
    np.testing.assert_allclose(lat(0.25, 8), 1e-3 * macs * kept(0.25) * fan_in(0.25))  # q8u: no remainder form


def test_uint8_weight_convolutions_are_priced_on_whole_channel_blocks():
    """A q8u conv or depthwise conv (8-bit weights, onnxruntime's u8u8 kernels) is priced at its
    kept output channels rounded up to the profile's q8u_block (measured: 8 or 12 channels cost
    what 16 do), as calibration fits it; a profile without the field (q8u_block 1) prices the
    kept count, and Dense layers are never rounded."""
    from search.export.kernel_probes import Shape

    assert K.q8u_channels([1, 12, 16, 17, 32], 16).tolist() == [16, 16, 16, 32, 32]
    assert K.q8u_channels([12], 1).tolist() == [12]
    assert Shape("conv", 8, 12, 8, 3).features(1, 16) == K.features(64, 16, 72, 9).tolist()  # the probes' features
    per_mac = lambda c: (0.0,) * 7 + (c,)
    coef = {name: per_mac(1e-3) for name in KERNELS} | {"eltwise": (0.0,) * 8, "emul": (0.0,) * 8}
    model = lambda q: hw_profiles.KernelModel(0.0, MappingProxyType(coef), "synthetic", channel_block=16,
                                              channel_align=4, q8u_block=q)
    macs = np.array([64 * 27, 64 * 9, 64 * 9, 64])  # MACs per output channel and kept input channel
    kept = np.array([12, 12, 24, 10])  # 25% of every group pruned
    fan_in = np.array([1, 1, 12, 24])
    for q, n in ((16, [16, 16, 32, 10]), (1, kept)):
        prof = calibrated_profile(MACHINE, name="a", kernels=model(q))
        lat = price(prof, LAYERS, P.make_plan([0.25, 0.0, 0.25, 0.0], P.CHANNEL, 8, 8)).layer_latency_ms[0] * 1e3
        np.testing.assert_allclose(lat, 1e-3 * macs * np.asarray(n) * fan_in)


def test_sampled_shapes_feed_both_float_and_both_int8_paths():
    """Calibration's sampled shapes give blocked and plain float conv and depthwise probes, and
    int8 ones on and off the channel block (16 on AVX-512, 8 on AVX2)."""
    shapes = kp.sampled_shapes(8, seed=0)
    for kind in ("conv", "depthwise"):
        dw = kind == "depthwise"
        # a chain of the shape and its partner (which reads its output), as measure_kernels times it
        runs = [{bool(K.on_blocks(x.cout, 1 if dw else x.cin, 16, 4, dw)) for x in (s, kp.partner(s))}
                for s in shapes if s.kind == kind]
        assert {True} in runs and {False} in runs, (kind, runs)
        for block in (8, 16):
            paths = [bool(K.q8_on_blocks(s.cout, block) & K.q8_on_blocks(s.cin, block)) for s in shapes if s.kind == kind]
            off = [not (K.q8_on_blocks(s.cout, block) | K.q8_on_blocks(s.cin, block)) for s in shapes if s.kind == kind]
            assert any(paths) and any(off), (kind, block, paths, off)
    # blocked conv chains with a member reading fewer channels than the block (the f32n kernel)
    assert any(s.cin < 16 and s.k == 1 and K.on_blocks(s.cin, kp.partner(s).cin, 16, 4) for s in shapes if s.kind == "conv")


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


def test_a_relu6_after_a_blocked_float_conv_is_a_pass_over_its_output():
    """MLAS's NCHWc kernels fuse only ReLU: a ReLU6 (one Clip) after a blocked float conv costs a
    `clip` pass over its output elements; after a conv on the plain kernels nothing (they apply
    every activation as such a pass, the probes' ReLU included), after an integer one nothing (the
    grid absorbs it), after a float Dense layer one unfused op."""
    coef = {name: (0.0,) * 9 for name in KERNELS} | {"clip": (0.0, 1e-3) + (0.0,) * 7, "eltwise": (1.0,) + (0.0,) * 8}
    prof = calibrated_profile(MACHINE, name="a", kernels=hw_profiles.KernelModel(
        0.0, MappingProxyType(coef), "synthetic", channel_block=16, channel_align=4))

    def extra(layers, w, a):  # us that the ReLU6s add to each layer
        plan = P.make_plan([0.0] * len(layers), P.CHANNEL, w, a)
        clip = tuple(dataclasses.replace(l, clipped=True) for l in layers)
        return (price(prof, clip, plan).layer_latency_ms[0] - price(prof, layers, plan).layer_latency_ms[0]) * 1e3

    layers = (conv(0, 16, 16, 8), conv(1, 16, 32, 8, src=0), dataclasses.replace(dense(2, 32, 10), reads=((1, 32),)))
    np.testing.assert_allclose(extra(layers, 32, 32), [1.024, 2.048, 1.0])  # 8 x 8 x 16 and 8 x 8 x 32 elements
    np.testing.assert_allclose(extra(layers, 8, 8), [0.0, 0.0, 0.0])  # integer kernels
    plain = (conv(0, 18, 16, 8), conv(1, 16, 32, 8, src=0))  # 18 input channels: off the alignment
    np.testing.assert_allclose(extra(plain, 32, 32), [0.0, 2.048])


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


def test_shipped_profiles_say_they_are_analytic():
    for name in hw_profiles.list_profiles():
        p = hw_profiles.load_profile(name)
        assert p.kernels is None and 'latency_model = "roofline"' in open(p.source).read()


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


def test_a_study_s_shapes_include_its_dense_layers_in_the_kronecker_form():
    """layer_shapes (profiles calibrate --study) times a Dense layer that takes the Kronecker form
    at each rank the search offers it (FACTORIZE_RANKS x KRONECKER_RANK_SCALE of its full rank),
    and no Kronecker shape of a layer that cannot take it (fan-in 7: no split)."""
    kron = [s for s in kp.layer_shapes([dense(0, 784, 300)]) if s.kind == "kron"]
    assert sorted(s.rank for s in kron) == [13, 26, 39]  # full rank min(28 x 15, 28 x 20) = 420
    assert all((s.cin, s.cout) == (784, 300) for s in kron)
    assert not [s for s in kp.layer_shapes([dense(0, 7, 10)]) if s.kind == "kron"]
