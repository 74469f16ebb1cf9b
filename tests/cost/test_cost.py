"""The cost model: a hand-computed example, monotonicity properties, sparsity and width rules."""
from __future__ import annotations

import numpy as np
import pytest

from hw_profiles import list_profiles, load_profile, profile_from_text
from search.compression import plan as P
from search.cost.roofline import min_costs, price, price_all
from search.compression.layers import Layer
from tests.support import TOY, dense


def lenet300(n_in: int) -> tuple[Layer, ...]:
    return (dense(0, n_in, 300), dense(1, 300, 100), dense(2, 100, 10))


# 64*300+300 + 300*100+100 + 100*10+10 = 50,610 params on 8x8 digits (the brief said 50,890,
# an arithmetic slip); 784*300+300 + 30,100 + 1,010 = 266,610 on 28x28
def test_lenet300_param_counts():
    assert sum(l.params for l in lenet300(64)) == 50_610
    assert sum(l.params for l in lenet300(784)) == 266_610


def test_two_layer_example_by_hand():
    toy = profile_from_text(TOY, "toy")
    layers = (dense(0, 100, 50), dense(1, 50, 10))
    plan = P.make_plan([0.0, 0.5], [P.UNSTRUCTURED, P.CHANNEL], [32, 8], [32, 8])
    c = price(toy, layers, P.stack_plans([plan]))
    # layer 0: fp32, 5000 MACs -> 2*5000 / (1e9 * 0.5) = 20 us compute.
    #   bytes: 5000*4 weights + 50*4 bias + 100*4 input + 50*1 output (next layer reads int8) = 20650 -> 20.65 us.
    l0 = max(20e-6, 20650e-9) + 10e-6
    # layer 1: channel 50% -> 5 of 10 outputs, 250 MACs at int8: 2*250/(4e9*0.5) = 0.25 us.
    #   bytes: 250 weights + 5*4 bias + 5*4 scales + 50 input + 5*4 output (float logits) = 360 -> 0.36 us.
    l1 = max(0.25e-6, 360e-9) + 10e-6
    assert c.layer_latency_ms[0] == pytest.approx([l0 * 1e3, l1 * 1e3], rel=1e-12)
    assert c.latency_ms[0] == pytest.approx((l0 + l1) * 1e3, rel=1e-12)
    weights = 20000 + 200 + 250 + 20 + 20  # bytes
    act_peak = max(400 + 50, 50 + 20)
    assert c.memory_kb[0] == pytest.approx((weights + act_peak) / 1024, rel=1e-12)
    assert c.size_kb[0] == pytest.approx(weights / 1024, rel=1e-12)


def random_plans(rng, k: int, n_layers: int) -> P.Plan:
    return P.Plan(
        ratio=rng.uniform(0, P.MAX_RATIO, (k, n_layers)).astype(np.float32),
        granularity=rng.integers(0, 3, (k, n_layers)).astype(np.int32),
        weight_bits=rng.choice(P.WEIGHT_BITS, (k, n_layers)).astype(np.int32),
        act_bits=rng.choice(P.ACT_BITS, (k, n_layers)).astype(np.int32),
        quant_mode=rng.integers(0, 2, (k, n_layers)).astype(np.int32),
        rank=np.ones((k, n_layers), np.float32), form=np.zeros((k, n_layers), np.int32),
    )


def fewer(rng, plans: P.Plan) -> P.Plan:
    """Each layer: more pruning (same granularity) and narrower or equal bit widths."""
    narrow = lambda allowed, bits: np.array([[rng.choice([b for b in allowed if b <= x]) for x in row] for row in bits], np.int32)
    return P.Plan(
        ratio=np.minimum(plans.ratio + rng.uniform(0, 0.5, plans.ratio.shape), P.MAX_RATIO).astype(np.float32),
        granularity=plans.granularity,
        weight_bits=narrow(P.WEIGHT_BITS, plans.weight_bits),
        act_bits=narrow(P.ACT_BITS, plans.act_bits),
        quant_mode=plans.quant_mode, rank=plans.rank, form=plans.form,
    )


@pytest.mark.parametrize("name", list_profiles())
def test_more_compression_never_costs_more(name):
    rng = np.random.default_rng(0)
    layers = lenet300(784)
    a = random_plans(rng, 300, len(layers))
    b = fewer(rng, a)
    ca, cb = price(name, layers, a), price(name, layers, b)
    for key in ("latency_ms", "memory_kb", "size_kb"):
        assert np.all(getattr(cb, key) <= getattr(ca, key) * (1 + 1e-12)), key
    assert np.all(cb.layer_latency_ms <= ca.layer_latency_ms * (1 + 1e-12))


def test_unsupported_width_gives_no_compute_speedup():
    layers = lenet300(784)
    xeon = load_profile("xeon")  # kernels: 8, 16, 32
    c = {b: price(xeon, layers, P.make_plan(np.zeros(3), P.UNSTRUCTURED, b, 8)) for b in (4, 5, 8)}
    # 4- and 5-bit weights compute as int8: the same compute; only bytes (packed) shrink.
    huge = profile_from_text(TOY.replace("bandwidth_gbs = 1.0", "bandwidth_gbs = 1e9"), "fast-memory")
    t = {b: price(huge, layers, P.make_plan(np.zeros(3), P.UNSTRUCTURED, b, 8)).latency_ms[0] for b in (2, 5, 8)}
    assert t[2] == t[5] == t[8]
    assert c[4].size_kb[0] < c[5].size_kb[0] < c[8].size_kb[0]


def test_unstructured_below_threshold_gives_no_speedup():
    toy = profile_from_text(TOY.replace("bandwidth_gbs = 1.0", "bandwidth_gbs = 1e9"), "toy")  # compute bound
    layers = lenet300(784)
    lat = lambda r, g=P.UNSTRUCTURED: price(toy, layers, P.make_plan(np.full(3, r), g, 32, 32)).latency_ms[0]
    assert lat(0.0) == lat(0.3) == lat(0.49)
    assert lat(0.9) < lat(0.0)  # 10% density x work factor 2 = 20% of the work
    assert lat(0.3, P.CHANNEL) < lat(0.0)  # channel pruning always shrinks the work
    gpu = load_profile("gpu-h100")  # never speeds up unstructured sparsity, but 2:4 does
    big = (Layer(0, "c", ("c",), "conv", (3, 3, 256, 256), (64, 64, 256), (64, 64, 256), 1, True, 64 * 64 * 9 * 256 * 256, 0),)
    g = lambda r, gr: price(gpu, big, P.make_plan([r], gr, 16, 16)).layer_latency_ms[0, 0]
    assert g(0.9, P.UNSTRUCTURED) == g(0.0, P.UNSTRUCTURED)
    assert g(0.5, P.NM) < g(0.0, P.NM)


def test_mcu_budget_breaks_dense_and_compressed_plans_meet_it():
    mcu = load_profile("mcu")
    for n_in in (64, 784):
        layers = lenet300(n_in)
        d = price(mcu, layers, P.stack_plans([P.dense_plan(3)]))
        b = mcu.budget
        assert d.memory_kb[0] > b.memory_kb
        small = price(mcu, layers, P.make_plan(np.full(3, 0.5), P.CHANNEL, 4, 8))
        assert small.memory_kb[0] <= b.memory_kb and small.size_kb[0] <= b.size_kb and small.latency_ms[0] <= b.latency_ms
        m = min_costs(mcu, layers)
        assert m["memory_kb"] <= small.memory_kb[0] and m["size_kb"] <= small.size_kb[0] and m["latency_ms"] <= small.latency_ms[0]


def test_npu_float_layers_fall_back_or_are_disallowed():
    layers = lenet300(64)
    npu = load_profile("mobile-npu")
    f, q = (price(npu, layers, P.make_plan(np.zeros(3), P.UNSTRUCTURED, b, b)).latency_ms[0] for b in (32, 8))
    assert np.isfinite(f) and f > 5 * q
    strict = profile_from_text(open(npu.source).read().replace('float = "fallback"', 'float = "disallow"'), "strict")
    assert np.isinf(price(strict, layers, P.make_plan(np.zeros(3), P.UNSTRUCTURED, 32, 32)).latency_ms[0])


def test_price_all_covers_every_profile_and_shapes():
    layers = lenet300(64)
    plans = random_plans(np.random.default_rng(1), 5, 3)
    out = price_all(layers, plans)
    assert sorted(out) == list_profiles()
    for c in out.values():
        assert c.latency_ms.shape == c.memory_kb.shape == c.size_kb.shape == (5,)
        assert c.layer_latency_ms.shape == (5, 3)


def test_channel_pruning_shrinks_the_next_layers_inputs_in_a_chain():
    """Pruning fc0's output channels removes fc1's input rows (the ONNX export does it for
    real); a layer that does not read fc0's channels keeps its work."""
    toy = profile_from_text(TOY, "toy")
    chain = (dense(0, 100, 50), dense(1, 50, 10))
    apart = (dense(0, 100, 50), dense(1, 64, 10, src=-1))  # 64 inputs: not fc0's 50 channels
    plans = P.stack_plans([P.make_plan([r, 0.0], P.CHANNEL, 32, 32) for r in (0.0, 0.5)])
    c = price(toy, chain, plans)
    # fc1 at fp32: 2*500 MACs / 0.5 GOPS = 2 us; bytes 500*4 weights + 10*4 bias + 50*4 input
    # + 10*4 output = 2280 -> 2.28 us. Half its inputs gone: 1 us; 1000 + 40 + 100 + 40 = 1180 bytes.
    assert c.layer_latency_ms[:, 1] == pytest.approx([2.28e-3 + 1e-2, 1.18e-3 + 1e-2], rel=1e-9)
    assert c.size_kb[1] < c.size_kb[0]
    a = price(toy, apart, plans)
    assert a.layer_latency_ms[0, 1] == a.layer_latency_ms[1, 1]


def test_codebook_wider_than_8_bits_is_priced_as_the_uniform_kernel_it_runs():
    layers = lenet300(64)
    plans = P.stack_plans([P.make_plan([0.0] * 3, P.UNSTRUCTURED, 16, 16, q) for q in (P.UNIFORM, P.CODEBOOK)])
    for name in list_profiles():
        c = price(name, layers, plans)
        assert c.size_kb[0] == c.size_kb[1] and c.latency_ms[0] == c.latency_ms[1], name


def test_a_factorized_layer_is_priced_as_its_pair():
    """Weight SVD of a 100x50 Dense at rank r: MACs and weights 100 r + 50 r (channel pruning
    removes B's columns), each factor with its scales; cheaper than the layer only below
    r = 100 * 50 / 150 = 33.3; rank 1 is the unfactorized price."""
    layers = (dense(0, 100, 50), dense(1, 50, 10))
    full = P.make_plan([0.0, 0.0], P.CHANNEL, 8, 8)
    plans = P.stack_plans([full, P.make_plan([0.0, 0.0], P.CHANNEL, 8, 8, rank=[1.0, 1.0]),
                           P.make_plan([0.5, 0.0], P.CHANNEL, 8, 8, rank=[0.5, 1.0]),  # r = 25, 25 of 50 kept
                           P.make_plan([0.0, 0.0], P.CHANNEL, 8, 8, rank=[0.66, 1.0]),  # r = 33
                           P.make_plan([0.0, 0.0], P.CHANNEL, 8, 8, rank=[0.68, 1.0])])  # r = 34
    for name in list_profiles():
        c = price(name, layers, plans)
        assert c.layer_macs[0, 0] == c.layer_macs[1, 0] == 5000 and c.size_kb[0] == c.size_kb[1]
        assert c.layer_macs[2, 0] == 100 * 25 + 25 * 25 and c.layer_macs[2, 1] == 25 * 10
        assert c.layer_macs[3, 0] == 150 * 33 < 5000 < c.layer_macs[4, 0] == 150 * 34
    bits = lambda p: price("xeon", layers, P.stack_plans([p])).size_kb[0] * 8192
    pair = (100 * 25 * 8 + 25 * 32) + (25 * 25 * 8 + 25 * 32) + 25 * 32  # A, B (25 kept columns), bias
    # layer 1 reads the 25 kept channels: values, its scales and bias
    assert bits(P.make_plan([0.5, 0.0], P.CHANNEL, 8, 8, rank=[0.5, 1.0])) == pytest.approx(pair + 25 * 10 * 8 + 10 * 64)
    assert bits(P.make_plan([0.0, 0.0], P.CHANNEL, 32, 32, rank=[0.5, 1.0])) == pytest.approx(
        150 * 25 * 32 + 50 * 32 + 50 * 10 * 32 + 10 * 32)  # float: no scales


def _graded_kernel_profile():
    """xeon with synthetic kernel predictors: kernel kind i costs i + 1 us a call and (i + 1) ns
    per unit of its next seven features (MT's 0 is added), so every kind has a distinct, checkable price."""
    import dataclasses
    from types import MappingProxyType

    from hw_profiles.schema import KERNELS, KernelModel

    coef = {k: (float(i + 1),) + (1e-3 * (i + 1),) * 7 for i, k in enumerate(KERNELS)}
    return dataclasses.replace(load_profile("xeon"), name="kern", kernels=KernelModel(10.0, MappingProxyType(coef), "synthetic"))


def test_a_kernel_level_profile_prices_the_pair_as_the_export_runs_it():
    """With learned kernel predictors (search.cost.kernels), a factorized Dense is two dense
    kernels, A (N = r, K = fan-in) and B (N = out, K = r), as the export runs them: A integer
    (i8, not chained) at w8a8, else f32 behind the input's rounding in float ops; B in f32."""
    from search.cost import kernel_price as KP
    from search.cost import kernels as K

    prof = _graded_kernel_profile()
    layers = (dense(0, 100, 50), dense(1, 50, 10))
    plans = P.stack_plans([P.make_plan([0.0, 0.0], P.UNSTRUCTURED, [8, 32], [8, 32], rank=[0.5, 1.0]),  # r = 25, w8a8
                           P.make_plan([0.0, 0.0], P.UNSTRUCTURED, [16, 32], [8, 32], rank=[0.5, 1.0])])  # w16a8
    got = price(prof, layers, plans).layer_latency_ms[:, 0]
    kernel = lambda form: np.array(prof.kernels.coef["dense_" + form])  # 8 given, MT's 0 added
    b = kernel("f32") @ K.features(1, 50, 25)
    emul = K.features(100, 1, 1) @ np.array(prof.kernels.coef["emul"])  # the input's 8-bit rounding in float ops
    # no eltwise op: a Dense output reaches the next Dense with nothing unfused between (its ReLU is fused)
    # A runs four of its i8 probe's six fixed-cost ops (no bias Add or ReLU: they follow B)
    a = kernel("i8") @ K.features(1, 25, 100) - (1.0 - KP.I8_A_OPS) * kernel("i8")[0]
    assert got[0] == pytest.approx((a + b) * 1e-3, rel=1e-12)
    assert got[1] == pytest.approx((kernel("f32") @ K.features(1, 25, 100) + b + emul) * 1e-3, rel=1e-12)


def test_a_layer_feeding_a_kronecker_layer_runs_an_integer_kernel_with_a_float_output():
    """The export writes a Kronecker layer in float (its input rounded in float ops), so the int8
    layer in front of it is not re-quantized for it: it runs MatMulInteger / ConvInteger, Cast
    and scale (i8), where it chains into an unfactorized integer reader (q8, QLinear)."""
    from hw_profiles.schema import KERNELS
    from search.cost.roofline import latency_by_kernel

    prof = _graded_kernel_profile()
    layers = (dense(0, 100, 50), dense(1, 50, 10))  # 50 = 5 x 10, 10 = 2 x 5: a Kronecker split
    kinds = lambda rank: {KERNELS[i] for i, v in enumerate(latency_by_kernel(
        prof, layers, P.make_plan([0.0, 0.0], P.UNSTRUCTURED, 7, 8, rank=[1.0, rank], form=P.KRONECKER))[0]) if v > 0}
    assert {"dense_i8", "kron"} <= kinds(0.5) and "dense_q8" not in kinds(0.5)
    assert "dense_q8" in kinds(1.0) and "kron" not in kinds(1.0)


def test_plans_nothing_runs_are_refused_in_one_line_not_priced():
    """price() refuses what the engine and the export refuse (issue 18's bad input): a rank ratio
    outside (0, 1], and a form the layer's shape does not take."""
    layers = (dense(0, 100, 50), dense(1, 50, 7))  # 7 is prime: fc1 has no Kronecker split
    for rank in (1.5, 0.0, -1.0):
        with pytest.raises(ValueError, match=r"^plan.rank of layer fc0 is .*; a rank ratio lies in \(0, 1\]"):
            price("xeon", layers, P.make_plan(np.zeros(2), rank=[rank, 1.0]))
    # out-of-range fields name the layer and the allowed values (codes with their names)
    with pytest.raises(ValueError, match=r"^plan.form of layer fc1 is 7; allowed values are 0 = svd, 1 = spatial, 2 = kronecker$"):
        price("xeon", layers, P.make_plan(np.zeros(2), form=[0, 7]))
    with pytest.raises(ValueError, match=r"^plan.weight_bits of layer fc0 is 9; allowed values are 1, 2, .*, 16, 32$"):
        price("xeon", layers, P.make_plan(np.zeros(2), weight_bits=[9, 8]))
    with pytest.raises(ValueError, match=r"^plan.rank 0.5 factorizes layer fc0 in form spatial, but .*; its forms: svd, kronecker$"):
        price("xeon", layers, P.make_plan(np.zeros(2), rank=[0.5, 1.0], form=P.SPATIAL))
    with pytest.raises(ValueError, match=r"layer fc1 in form kronecker, but .* 50 x 7 does not; its forms: svd$"):
        price("xeon", layers, P.make_plan(np.zeros(2), rank=[1.0, 0.5], form=P.KRONECKER))
    # a plan for another model, or with no per-layer values, is named, not an IndexError
    with pytest.raises(ValueError, match=r"^plan has 3 layers but the model has 2 \(fc0, fc1\)"):
        price("xeon", layers, P.make_plan(np.zeros(3)))
    with pytest.raises(ValueError, match=r"^plan has no per-layer values but the model has 2"):
        price("xeon", layers, P.make_plan(0.5))
    # make_plan broadcasts a scalar ratio to the per-layer fields' length, and names a mismatch
    assert price("xeon", layers, P.make_plan(0.0, weight_bits=[8, 4])).latency_ms.shape == (1,)
    with pytest.raises(ValueError, match=r"^make_plan's per-layer values have different lengths"):
        P.make_plan([0.0, 0.0], weight_bits=[8, 4, 8])
    ok = price("xeon", layers, P.make_plan(np.zeros(2), rank=[0.5, 1.0], form=P.KRONECKER))
    assert ok.layer_macs.shape == (1, 2)
