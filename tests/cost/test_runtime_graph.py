"""What onnxruntime runs around the kernels (search.cost.runtime_graph): QLinear chains, the
unfused ops after a layer, layout reorders and uint8 max pooling, read off the traced layers and
charged by pricing on a synthetic kernel profile (1 us per op)."""
from __future__ import annotations

import dataclasses
import re
from types import MappingProxyType

import numpy as np
import pytest

import hw_profiles
from hw_profiles import KERNELS
from search.compression import plan as P
from search.cost import kernels as K
from search.cost import runtime_graph as G
from search.cost.calibrate import calibrated_profile, profile_toml
from search.cost.roofline import price
from tests.support import CONV_LAYERS as LAYERS, MACHINE, conv, dense

def test_unfused_ops_come_from_the_graph_and_the_form():
    """Pooling, flatten and residual adds are read off the traced layers; a float conv on the
    blocked layout pays the reorders around a pooling too, an activation is never charged (fused
    into the kernel), a residual add only after an i8 kernel, and pricing charges exactly that
    many `eltwise` ops per layer."""
    pooled = (conv(0, 1, 8, 8), conv(1, 8, 8, 4, src=0),  # a 2x2 pooling between them
              dataclasses.replace(dense(2, 32, 10), reads=((1, 8),), in_repeat=4))  # pooled to 2x2, flattened
    assert G.unfused_ops(pooled).tolist() == [[1, 0, 0], [1, 1, 0], [0, 0, 0]]
    residual = (conv(0, 8, 8, 4), dataclasses.replace(conv(1, 8, 8, 4, src=0), leader=0), conv(2, 8, 8, 4, src=0))
    assert G.unfused_ops(residual)[:, 2].tolist() == [1, 1, 0]
    f32, f32p, q8, i8 = (K.FORMS.index(x) for x in ("f32", "f32p", "q8", "i8"))
    u = np.array([[1, 0, 0], [1, 1, 0], [0, 0, 1], [0, 0, 1]])
    # blocked: ReorderOutput, MaxPool, ReorderInput into an NCHWc reader; ReorderOutput, MaxPool,
    # Transpose, Reshape into a Dense; a residual add only after i8
    assert G.eltwise_count(u, np.array([[f32, f32, f32, i8]]), np.array([[True, True, True, False]]),
                           np.array([[True, False, False, False]])).tolist() == [[3, 4, 0, 1]]
    # NCHW (plain) into an NCHWc reader: MaxPool, ReorderInput; a QLinear chain pools in NHWC
    assert G.eltwise_count(u, np.array([[f32p, q8, q8, f32]]), np.array([[False] * 4]),
                           np.array([[True, True, False, False]])).tolist() == [[2, 2, 0, 0]]
    coef = {name: (0.0,) * 8 for name in KERNELS} | {"eltwise": (1.0,) + (0.0,) * 7}  # 1 us per op
    prof = calibrated_profile(MACHINE, name="a", kernels=hw_profiles.KernelModel(
        0.0, MappingProxyType(coef), "synthetic", channel_block=16, channel_align=4))
    ops = lambda w, a: price(prof, LAYERS, P.make_plan([0.0] * 4, P.CHANNEL, w, a)).layer_latency_ms[0] * 1e3
    np.testing.assert_allclose(ops(32, 32), [0, 0, 2, 0])  # the head flattens conv2's blocked output
    np.testing.assert_allclose(ops(4, 8), [0, 0, 1, 0])  # the same on integer kernels: no reorder


def test_a_reader_behind_a_strided_depthwise_conv_is_not_a_pooling():
    """MobileNetV2's expand -> stride-2 depthwise -> project: the project conv reads the depthwise
    conv's 4x4 map (they share the expand's channel group), not the expand's 8x8 one, so the expand
    has no pooling after it (it was charged a pooling and two reorders of its whole map)."""
    expand = conv(0, 8, 16, 8)
    dw = dataclasses.replace(conv(1, 16, 16, 8, "depthwise", 0), out_shape=(4, 4, 16), macs=16 * 16 * 9)
    project = dataclasses.replace(conv(2, 16, 8, 4, src=0), in_shape=(4, 4, 16))
    layers = (expand, dw, project)
    assert G.direct_readers(layers).tolist() == [[False, True, False], [False, False, True], [False, False, False]]
    assert G.unfused_ops(layers).tolist() == [[0, 0, 0], [0, 0, 0], [0, 0, 0]]


def test_layout_reorders_between_float_convs_are_priced_where_onnxruntime_runs_them():
    """A blocked float conv whose reader takes NCHW (a conv of fewer input channels than the
    block, an integer kernel) pays one reorder of its output, as onnxruntime's optimized graph of
    resnet20 with 4-channel layers shows (a ReorderOutput after each conv); with a block of
    channels or more there is none, and a pooling's reorders are not charged twice."""
    def chain(c):
        return (conv(0, 1, c, 8), conv(1, c, c, 8, src=0), conv(2, c, 32, 8, src=1),
                dataclasses.replace(dense(3, 32 * 64, 10), reads=((2, 32),), in_repeat=64))
    coef = {name: (0.0,) * 9 for name in KERNELS} | {"eltwise": (1.0,) + (0.0,) * 8}  # 1 us per op
    prof = calibrated_profile(MACHINE, name="a", kernels=hw_profiles.KernelModel(
        0.0, MappingProxyType(coef), "synthetic", channel_block=16, channel_align=4))
    ops = lambda c, w, a: price(prof, chain(c), P.make_plan([0.0] * 4, P.CHANNEL, w, a)).layer_latency_ms[0] * 1e3
    np.testing.assert_allclose(ops(4, 32, 32), [1, 1, 2, 0])  # 4 < 16 channels read as NCHW; the head's flatten
    np.testing.assert_allclose(ops(16, 32, 32), [0, 0, 2, 0])  # a block of channels: NCHWc throughout
    np.testing.assert_allclose(ops(16, [32, 8, 8, 8], [32, 8, 8, 8]), [1, 0, 1, 0])  # into an integer kernel
    n = np.array([[0.0, 1.0], [0.0, 0.0]])  # a plain conv read by a blocked one of a block of input channels
    assert G.reorder_count(n, np.array([[False, True]]), np.array([[False, False]]), np.array([[False, True]]),
                           np.array([False, False])).tolist() == [[1.0, 0.0]]
    assert G.reorder_count(n, np.array([[False, True]]), np.array([[False, False]]), np.array([[False, True]]),
                           np.array([True, False])).tolist() == [[0.0, 0.0]]


def test_a_max_pooling_between_a_float_and_an_integer_layer_is_priced_on_uint8():
    """onnxruntime moves an integer layer's QuantizeLinear ahead of the max pooling in front of it,
    so a float conv's pooled output is pooled on uint8 (the slow `pool_u8` kernel) when, and only
    when, the layer reading it through the pooling is integer; that pooling replaces one eltwise
    op. Not after an average pooling (the reader is not max_pooled), and a profile calibrated
    before pool_u8 prices it as an eltwise op, as it did."""
    pooled = (conv(0, 1, 8, 8), dataclasses.replace(conv(1, 8, 8, 4, src=0), max_pooled=True),
              dataclasses.replace(dense(2, 32, 10), reads=((1, 8),), in_repeat=4, max_pooled=True))
    assert G.max_pool_reader(pooled).tolist() == [1, 2, -1]
    coef = {name: (0.0,) * 9 for name in KERNELS} | {"eltwise": (1.0,) + (0.0,) * 8, "pool_u8": (0.0, 0.01) + (0.0,) * 7}
    prof = calibrated_profile(MACHINE, name="a", kernels=hw_profiles.KernelModel(
        0.0, MappingProxyType(coef), "synthetic", channel_block=8, channel_align=4))
    lat = lambda layers, w, a: price(prof, layers, P.make_plan([0.0] * 3, P.CHANNEL, w, a)).layer_latency_ms[0] * 1e3
    # float conv0 (blocked: reorder, pool, reorder), int8 conv1 (chained to the int8 head: no reorders)
    u8 = 0.01 * 8 * 8 * 8  # conv0's 512 output elements, 0.01 us each on uint8
    np.testing.assert_allclose(lat(pooled, [32, 4, 4], [32, 8, 8]), [2 + u8, 1 + 1, 0])
    # all float: no uint8 pooling; conv1: ReorderOutput, MaxPool, Transpose, Reshape (lenet5's graph)
    np.testing.assert_allclose(lat(pooled, [32, 32, 32], [32, 32, 32]), [3, 2 + 2, 0])
    np.testing.assert_allclose(lat(pooled, [4, 4, 4], [8, 8, 8]), [1, 1 + 1, 0])  # all integer: NhwcMaxPool, one op
    # an i8 conv0 (NCHW) pooled into a blocked float conv1: MaxPool, ReorderInput; float conv1
    # into the integer head: ReorderOutput, MaxPool on uint8, Transpose, Reshape
    np.testing.assert_allclose(lat(pooled, [4, 32, 4], [8, 32, 8]), [2, 3 + 0.01 * 128, 0])
    avg = tuple(dataclasses.replace(l, max_pooled=False) for l in pooled)
    np.testing.assert_allclose(lat(avg, [32, 4, 4], [32, 8, 8]), [3, 2, 0])
    text = profile_toml(dataclasses.replace(prof, kernels=dataclasses.replace(prof.kernels, coef=MappingProxyType(
        coef | {"pool_u8": coef["eltwise"]}))))
    old_text = re.sub(r"(?m)^pool_u8 = .*\n", "", text)
    assert "pool_u8 = " in text and "pool_u8" not in old_text
    before = hw_profiles.profile_from_text(old_text)
    assert before.kernels.coef["pool_u8"] == coef["eltwise"]
    np.testing.assert_allclose(price(before, pooled, P.make_plan([0.0] * 3, P.CHANNEL, [32, 4, 4], [32, 8, 8])).layer_latency_ms[0] * 1e3,
                               [3, 2, 0])


def test_integer_layers_chain_as_the_export_does():
    """q8 (QLinear) when the next layer is integer and reads only this layer, q8u when its
    weights have 8 bits (stored as uint8); i8 for the last layer, before a float layer, and for a
    layer in a residual group (two non-depthwise members)."""
    chained = G.chained_to(LAYERS)
    assert chained.tolist() == [1, 2, 3, -1]
    f = K.forms(chained, np.array([[8, 8, 8, 8], [8, 8, 32, 8], [4, 7, 8, 4]]), np.array([[8, 8, 8, 8]] * 3),
                np.zeros((3, 4), bool))
    q8, q8u, i8, f32 = (K.FORMS.index(x) for x in ("q8", "q8u", "i8", "f32"))
    assert f.tolist() == [[q8u, q8u, q8u, i8], [q8u, i8, f32, i8], [q8, q8, q8u, i8]]
    residual = (dense(0, 8, 8), dataclasses.replace(dense(1, 8, 8), leader=0), dense(2, 8, 4, src=0))
    assert G.chained_to(residual).tolist() == [-1, -1, -1]


def test_a_factorized_conv_pays_the_reorder_between_its_kernels_where_their_layouts_differ():
    """onnxruntime's graph of lenet5 factorized at ranks 5 and 13 runs A (blocked, writing NCHWc),
    a ReorderOutput, then B (a 1x1 conv reading fewer channels than the block, in NCHW). At rank
    16 B reads NCHWc and no reorder runs; at rank 18 B runs the plain kernels (NCHW) and one does
    again. The op is priced on A's output, r x 8 x 8 elements."""
    coef = {name: (0.0,) * 9 for name in KERNELS} | {"eltwise": (1.0, 1e-3) + (0.0,) * 7}  # 1 us + 1 ns per element
    prof = calibrated_profile(MACHINE, name="a", kernels=hw_profiles.KernelModel(
        0.0, MappingProxyType(coef), "synthetic", channel_block=16, channel_align=4))
    layers = (conv(0, 32, 32, 8),)
    lat = lambda rank: float(price(prof, layers, P.make_plan([0.0], rank=rank / 32)).layer_latency_ms[0, 0]) * 1e3
    assert lat(8) == pytest.approx(1 + 8 * 64e-3)
    assert lat(16) == pytest.approx(0.0)
    assert lat(18) == pytest.approx(1 + 18 * 64e-3)


def test_channels_unstructured_pruning_empties_are_priced_as_the_export_removes_them():
    """MobileNetV2's expand 1x1 conv (8 -> 64) and depthwise 3x3 conv pruned unstructured at 90%:
    a channel is all-zero in the expand conv with probability 0.9^8 and in the depthwise one with
    0.9^9, and the export removes it when either is (the expand's is constant, the depthwise's
    unread), so a kernel-level profile prices both on C (1 - 0.9^8)(1 - 0.9^9) = 22.4 of 64
    channels, rounded up to the channel alignment (24), and the project conv on 24 input
    channels. More sparsity never prices slower; channel pruning and N:M are priced as before; a
    group meeting in a residual add keeps every channel (the export cannot remove one addend's)."""
    from search.compression.layers import Model, discover_layers
    from search.cost.roofline import _emptiable
    from tests.archs import MobileV2, init_variables

    coef = {name: (0.0,) * 9 for name in KERNELS}
    coef |= {k: (0.0,) * 7 + (1e-3,) + (0.0,) for k in ("conv_f32", "depthwise_f32")}  # per MAC
    prof = calibrated_profile(MACHINE, name="a", kernels=hw_profiles.KernelModel(
        0.0, MappingProxyType(coef), "synthetic", channel_block=1, channel_align=4))  # no blocks: MACs as kept
    one = lambda l, cin, cout: dataclasses.replace(l, kernel_shape=(1, 1, cin, cout), macs=64 * cin * cout)
    layers = (one(conv(0, 8, 64, 8), 8, 64), conv(1, 64, 64, 8, "depthwise", 0), one(conv(2, 64, 8, 8, src=0), 64, 8))
    lat = lambda r, g=P.UNSTRUCTURED: price(prof, layers, P.make_plan([r] * 3, g, 32, 32)).layer_latency_ms[0] * 1e3
    dense = lat(0.0)
    np.testing.assert_allclose(lat(0.9), dense * [24 / 64, 24 / 64, 24 / 64])
    totals = [lat(r).sum() for r in np.linspace(0.0, 0.95, 20)]
    assert np.all(np.diff(totals) <= 1e-9) and totals[-1] < totals[0]
    np.testing.assert_allclose(lat(0.5, P.NM), dense)
    np.testing.assert_allclose(lat(0.5, P.CHANNEL), dense * [0.5, 0.5, 0.25])  # the project keeps 4 of its 8 too
    x = np.zeros((1, 8, 8, 3), np.float32)
    variables = dict(init_variables(MobileV2(), x))
    params = variables.pop("params")
    traced = discover_layers(Model(MobileV2(), variables, {}), params, x)
    assert {l.name for l, e in zip(traced, _emptiable(traced, G.unfused_ops(traced))) if e} == {"i1/expand", "i1/dw", "i2/expand", "i2/dw", "i2/project"}
