"""Which kernel each layer runs, as the pricing reads it off the layer and the runtime's channel
block (blocked NCHWc, plain, NCHW-input, the int8 block and remainder paths, uint8 weights,
Kronecker layers), and the calibration's probes in the export's forms. Nothing here is timed:
the calibration's own tests are in test_kernels.py."""
from __future__ import annotations

import dataclasses
from types import MappingProxyType

import numpy as np
import onnx
import pytest

import hw_profiles
from hw_profiles import KERNELS
from search.compression import plan as P
from search.cost import kernels as K
from search.cost.calibrate import calibrated_profile
from search.cost.measure import session
from search.cost.roofline import latency_by_kernel, price
from search.export import kernel_probes as kp
from tests.support import CONV_LAYERS as LAYERS, MACHINE, conv, dense


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
    input; 16 input channels and more read NCHWc (f32), and a 3x3 one is an f32nk kernel (a kind
    of its own for a fit on exports to scale). A profile calibrated before f32n and f32nk existed
    prices them as f32 (their fallback), and so does a calibration (f32nk has no probes)."""
    coef = {name: (0.0,) * 9 for name in KERNELS}
    coef |= {"conv_f32": (1.0,) + (0.0,) * 8, "conv_f32n": (3.0,) + (0.0,) * 3 + (1e-3,) + (0.0,) * 4,  # per call, per MN
             "conv_f32nk": (2.0,) + (0.0,) * 8}
    prof = calibrated_profile(MACHINE, name="a", kernels=hw_profiles.KernelModel(
        0.0, MappingProxyType(coef), "synthetic", channel_block=16, channel_align=4))
    pointwise = dataclasses.replace(conv(1, 32, 32, 8, src=0), kernel_shape=(1, 1, 32, 32), macs=64 * 32 * 32,
                                    params=32 * 32 + 32)
    for second, nchw in ((pointwise, 3.0 + 1e-3 * 64 * 32), (conv(1, 32, 32, 8, src=0), 2.0)):
        layers = (conv(0, 32, 32, 8), second)
        lat = lambda r: price(prof, layers, P.make_plan([r, 0.0], P.CHANNEL, 32, 32)).layer_latency_ms[0] * 1e3
        assert lat(0.5)[1] == pytest.approx(1.0)  # reads 16: NCHWc
        assert lat(0.75)[1] == pytest.approx(nchw)  # reads 8 in NCHW: M = 64 positions, N = 32 (two blocks)
        assert lat(0.75)[0] == pytest.approx(1.0)  # the producer reads all 32 of the model's input
    split = latency_by_kernel(prof, (conv(0, 32, 32, 8), pointwise), P.stack_plans([P.make_plan([0.75, 0.0], P.CHANNEL, 32, 32)]))
    assert split[0, KERNELS.index("conv_f32n")] == pytest.approx((3.0 + 1e-3 * 64 * 32) * 1e-3)
    old = {k: v for k, v in coef.items() if not k.endswith(("_f32n", "_f32nk"))}
    before = hw_profiles.KernelModel(0.0, MappingProxyType(old), "synthetic", channel_block=16, channel_align=4)
    assert before.coef["conv_f32n"] == before.coef["conv_f32nk"] == coef["conv_f32"]
    probed = [n for n in KERNELS if not n.endswith("_f32nk")]  # every other kind timed
    fitted = K.fit([(n, (1.0,) + (0.0,) * 8, 5.0 + i) for i, n in enumerate(probed)], 1.0, "synthetic")
    assert fitted.coef["conv_f32nk"] == fitted.coef["conv_f32"]  # no probes of its own: calibrated as f32


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


def test_shipped_profiles_say_they_are_analytic():
    for name in hw_profiles.list_profiles():
        p = hw_profiles.load_profile(name)
        assert p.kernels is None and 'latency_model = "roofline"' in open(p.source).read()


def test_a_study_s_shapes_include_its_dense_layers_in_the_kronecker_form():
    """layer_shapes (profiles calibrate --study) times a Dense layer that takes the Kronecker form
    at each rank the search offers it (FACTORIZE_RANKS x KRONECKER_RANK_SCALE of its full rank),
    and no Kronecker shape of a layer that cannot take it (fan-in 7: no split)."""
    kron = [s for s in kp.layer_shapes([dense(0, 784, 300)]) if s.kind == "kron"]
    assert sorted(s.rank for s in kron) == [13, 26, 39]  # full rank min(28 x 15, 28 x 20) = 420
    assert all((s.cin, s.cout) == (784, 300) for s in kron)
    assert not [s for s in kp.layer_shapes([dense(0, 7, 10)]) if s.kind == "kron"]


def test_a_fit_on_exports_scales_the_kxk_nchw_input_kernel_on_its_own():
    """f32nk has no probes: a calibration prices it with conv_f32's row. A fit on exports gives it
    a scale of its own: here the pruned model's second conv, reading 8 channels in NCHW, measured
    2.5x the blocked predictor while the dense model matched it, and the fitted profile prices both
    (sharing conv_f32's scale, one of the two would miss by 18% or more)."""
    from search.cost.calibrate import fit_profile

    coef = {name: (0.0,) * 9 for name in KERNELS if not name.endswith("_f32nk")} | {"conv_f32": (1.0,) + (0.0,) * 8}
    model = hw_profiles.KernelModel(0.0, MappingProxyType(coef), "synthetic", channel_block=16, channel_align=4)
    assert model.coef["conv_f32nk"] == coef["conv_f32"]  # calibrated as f32
    prof = calibrated_profile(MACHINE, name="a", kernels=model)
    layers = (conv(0, 32, 32, 8), conv(1, 32, 32, 8, src=0))
    full, pruned = P.make_plan([0.0, 0.0], P.CHANNEL, 32, 32), P.make_plan([0.75, 0.0], P.CHANNEL, 32, 32)
    lat = lambda p, plan: float(np.asarray(price(p, layers, P.stack_plans([plan])).latency_ms)[0]) * 1e3
    assert lat(prof, full) == pytest.approx(2.0) and lat(prof, pruned) == pytest.approx(2.0)  # us: one per call
    fitted = fit_profile(prof, [(layers, full, 2.0e-3), (layers, pruned, 3.5e-3)], prior=0.0)
    assert lat(fitted, full) == pytest.approx(2.0, rel=1e-3) and lat(fitted, pruned) == pytest.approx(3.5, rel=1e-3)
    assert fitted.kernels.coef["conv_f32nk"][0] == pytest.approx(2.5, rel=1e-3)
    assert fitted.kernels.coef["conv_f32"][0] == pytest.approx(1.0, rel=1e-3)
