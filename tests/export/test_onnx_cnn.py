"""ONNX export of CNNs with eval-mode BatchNorm, residual adds and concatenations (issue 14).

BN (and any per-channel affine right after a layer) folds into the layer; integer convs run
as onnxruntime integer kernels (QLinearConv when chained, ConvInteger otherwise); channels
removed before a BN, a residual add or a concatenation stay removed; everything agrees with
the Flax model under the same fake quantization.
"""
from __future__ import annotations

import collections
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import onnx
import onnxruntime as ort
import pytest

from search.compression import compress, quant
from search.compression.layers import Model, discover_layers
from search.export.onnx.convert import LayerExport, to_onnx

ZEROED = [1, 4, 6]  # output channels zeroed (pruned) in the tests' layers; BN sign flips on c % 3 == 1


def _bn(name: str, train: bool) -> nn.BatchNorm:
    return nn.BatchNorm(use_running_average=not train, name=name)


class BNCNN(nn.Module):
    """conv (no bias) + BN + ReLU -> conv + BN + ReLU -> flatten -> Dense."""

    padding: str = "SAME"

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(_bn("bn1", train)(nn.Conv(8, (3, 3), use_bias=False, padding=self.padding, name="conv1")(x)))
        x = nn.relu(_bn("bn2", train)(nn.Conv(8, (3, 3), padding=self.padding, name="conv2")(x)))
        return nn.Dense(10, name="fc")(x.reshape((x.shape[0], -1)))


class ResNetBlock(nn.Module):
    """stem conv-BN-ReLU, then conv-BN-ReLU-conv-BN + identity shortcut, ReLU, mean, Dense."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(_bn("bn0", train)(nn.Conv(8, (3, 3), use_bias=False, name="stem")(x)))
        r = nn.relu(_bn("bn1", train)(nn.Conv(8, (3, 3), use_bias=False, name="conv1")(x)))
        r = _bn("bn2", train)(nn.Conv(8, (3, 3), use_bias=False, name="conv2")(r))
        return nn.Dense(10, name="fc")(nn.relu(x + r).mean(axis=(1, 2)))


class Branches(nn.Module):
    """Dense(10)(concat([Dense(8)(x), Dense(8)(x)]))."""

    @nn.compact
    def __call__(self, x):
        h = jnp.concatenate([nn.relu(nn.Dense(8, name="a")(x)), nn.Dense(8, name="b")(x)], -1)
        return nn.Dense(10, name="head")(h)


class ConvBranches(nn.Module):
    """Two conv branches and a constant concatenated on channels, a conv reads them, then a
    split and a slice of channels feed two heads."""

    @nn.compact
    def __call__(self, x):
        a = nn.relu(nn.Conv(6, (3, 3), name="ca")(x))
        b = nn.Conv(4, (1, 1), name="cb")(x)
        h = jnp.concatenate([a, b, jnp.full((x.shape[0], *x.shape[1:3], 2), 0.5)], -1)
        h = nn.relu(nn.Conv(8, (3, 3), name="cc")(h))
        lo, hi = jnp.split(h, 2, axis=-1)
        y = nn.Dense(10, name="h1")(lo.mean(axis=(1, 2)))
        return y + nn.Dense(10, name="h2")(hi[..., 1:3].reshape((hi.shape[0], -1)))


def _variables(module, shape, seed=0):
    """Variables from module.init, BN statistics and affine randomised (BN is not the identity;
    the scale is negative on every third channel, to fold a sign into the integer kernel)."""
    key = jax.random.key(seed, impl="rbg")  # threefry's init compiles ~7x slower on CPU

    @jax.jit
    def init(key):
        v = module.init(key, jnp.zeros((1, *shape)))
        x = jax.random.normal(jax.random.fold_in(key, 7), (2048, *shape))
        params, stats = dict(v["params"]), {}
        for i, (name, st) in enumerate(v.get("batch_stats", {}).items()):
            k = jax.random.split(jax.random.fold_in(key, i), 4)
            c = st["mean"].shape
            stats[name] = {"mean": 0.5 * jax.random.normal(k[0], c), "var": jax.random.uniform(k[1], c, minval=0.3, maxval=2.0)}
            sign = jnp.where(jnp.arange(c[0]) % 3 == 1, -1.0, 1.0)
            params[name] = {"scale": sign * jax.random.uniform(k[2], c, minval=0.5, maxval=1.5),
                            "bias": 0.3 * jax.random.normal(k[3], c)}
        for j, (name, leaf) in enumerate(params.items()):  # non-zero biases: removed channels leave constants behind
            if "bias" in leaf and "kernel" in leaf:
                params[name] = {**leaf, "bias": 0.2 * jax.random.normal(jax.random.fold_in(key, 100 + j), leaf["bias"].shape)}
        return params, stats, x

    params, stats, x = init(key)
    x = np.asarray(x, np.float32)
    return jax.tree.map(lambda a: np.array(a, np.float32), params), jax.tree.map(np.array, stats), x


def _apply(module, stats):
    if not stats:
        return lambda p, x: module.apply({"params": p}, x)
    return lambda p, x: module.apply({"params": p, "batch_stats": stats}, x)


def _int_exports(fn, p, x, prune):
    """int8 kernels (per-channel symmetric, as the model computes with) and uint8 inputs; returns
    (exports, the fake-quantized Flax output). `prune`: {layer: output channels zeroed}."""
    for layer, chans in prune.items():
        p[layer]["kernel"][..., chans] = 0.0
    model = Model(fn)
    layers = discover_layers(model, p, x[:1])
    lo, hi = jax.jit(lambda p, x: compress.calibrate_ranges(model, layers, p, x))(p, x)
    exports = {}
    for l in layers:
        q, scale = quant.quantize_weight(p[l.name]["kernel"], 8)
        p[l.name]["kernel"] = (q * scale.astype(np.float32)).astype(np.float32)
        s, z, _ = quant.act_qparams(lo[l.index], hi[l.index], 8)
        exports[l.name] = LayerExport(l.name, "int", q, scale, (float(s), int(z), 8))
    bits = jnp.full(len(layers), 8)
    want = jax.jit(lambda p, x: compress.quantized_apply(model, layers, p, lo, hi, bits, x))(p, x)
    return exports, np.asarray(want)


def _session(model: onnx.ModelProto, tmp_path) -> tuple[ort.InferenceSession, collections.Counter]:
    """A CPU session and the op types of the graph onnxruntime really runs (its optimized model)."""
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.optimized_model_filepath = os.path.join(tmp_path, "optimized.onnx")
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess, collections.Counter(n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node)


def _assert_folded(model: onnx.ModelProto):
    """No BN left: no BatchNormalization or Sub, every Mul scales an integer accumulator and a Div only follows a ReduceSum (a mean)."""
    prod = {o: n for n in model.graph.node for o in n.output}
    ops = [n.op_type for n in model.graph.node]
    assert not {"BatchNormalization", "Sub"} & set(ops), ops
    for n in model.graph.node:
        if n.op_type in ("Mul", "Div"):
            assert prod[n.input[0]].op_type == ("Cast" if n.op_type == "Mul" else "ReduceSum"), n


def _assert_agrees(got, want):
    # integer kernels round the bias to int32 at s_x * s_w and re-quantize on the next grid:
    # an activation within half a step of a rounding boundary may move by one level (measured:
    # about 5 in 8192 inputs change their argmax, each one a near-tie of the Flax logits)
    tol = 2e-2 * max(1.0, float(np.abs(want).max()))
    assert np.max(np.abs(got - want)) < tol
    assert np.mean(got.argmax(-1) == want.argmax(-1)) >= 0.999
    top2 = np.sort(want, -1)[:, -2:]
    differ = got.argmax(-1) != want.argmax(-1)
    assert np.all(top2[differ, 1] - top2[differ, 0] < tol)  # only near-ties may differ


@pytest.mark.parametrize("padding", ["SAME", "VALID"])
def test_bn_cnn_folds_and_runs_integer_convs(padding, tmp_path):
    module = BNCNN(padding)
    p, stats, x = _variables(module, (8, 8, 3))
    stats["bn1"]["mean"][ZEROED], p["bn1"]["bias"][ZEROED] = 0.0, 0.4  # removed: relu(bn(0)) = 0.4, not 0
    fn = _apply(module, stats)
    exports, want = _int_exports(fn, p, x, {"conv1": ZEROED})
    model, info = to_onnx(fn, p, (8, 8, 3), exports)
    _assert_folded(model)
    sess, ran = _session(model, tmp_path)
    # VALID: conv2's constant from conv1's removed channels is per channel, so conv1 -> conv2 -> fc
    # chain (QLinearConv); SAME: it is a map (padding), conv2 runs as ConvInteger + the map
    conv2 = "QLinearConv" if padding == "VALID" else "ConvInteger"
    assert info["forms"] == {"conv1": "QLinearConv", "conv2": conv2, "fc": "MatMulInteger"}
    assert ran["QLinearConv"] + ran["ConvInteger"] == 2 and ran["Conv"] == 0, ran
    assert info["kept"] == {"conv1": 8 - len(ZEROED), "conv2": 8, "fc": 10} and not info["kept_back"]
    _assert_agrees(sess.run(None, {"input": x})[0], want)


def test_residual_block_keeps_removal_and_integer_convs(tmp_path):
    module = ResNetBlock()
    p, stats, x = _variables(module, (8, 8, 3), seed=1)
    fn = _apply(module, stats)
    exports, want = _int_exports(fn, p, x, {"stem": ZEROED, "conv2": ZEROED})
    model, info = to_onnx(fn, p, (8, 8, 3), exports)
    _assert_folded(model)
    sess, ran = _session(model, tmp_path)
    # stem feeds conv1 and the add, conv2 the add: neither is re-quantized next, both ConvInteger
    assert info["forms"]["stem"] == info["forms"]["conv2"] == "ConvInteger"
    assert info["forms"]["conv1"] in ("QLinearConv", "ConvInteger")
    assert ran["QLinearConv"] + ran["ConvInteger"] == 3 and ran["Conv"] == 0, ran
    assert info["kept"]["stem"] == info["kept"]["conv2"] == 8 - len(ZEROED) and info["kept"]["conv1"] == 8
    assert not info["kept_back"]
    _assert_agrees(sess.run(None, {"input": x})[0], want)


def _run(model, x):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]


class DenseBN(nn.Module):
    """Dense (no bias) + BN + ReLU -> Dense: BN folding on a MatMul, kernel signs flipped."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(_bn("bn", train)(nn.Dense(16, use_bias=False, name="fc1")(x)))
        return nn.Dense(10, name="fc2")(x)


def test_dense_bn_folds_into_an_integer_gemm(tmp_path):
    module = DenseBN()
    p, stats, x = _variables(module, (20,))
    fn = _apply(module, stats)
    exports, want = _int_exports(fn, p, x, {"fc1": ZEROED})
    model, info = to_onnx(fn, p, (20,), exports)
    _assert_folded(model)
    sess, ran = _session(model, tmp_path)
    assert info["forms"] == {"fc1": "QLinearGemm", "fc2": "MatMulInteger"}
    assert ran["QGemm"] == 1 and ran["MatMulInteger"] == 1 and ran["MatMul"] == 0, ran
    assert info["kept"]["fc1"] == 16 - len(ZEROED) and not info["kept_back"]
    _assert_agrees(sess.run(None, {"input": x})[0], want)


def test_concatenated_dense_branches():
    module = Branches()
    p0, _, x = _variables(module, (12,))
    flax_apply = jax.jit(module.apply)
    for prune in ({}, {"a": ZEROED}, {"a": ZEROED, "b": [0, 7]}):  # float; one branch pruned; both
        p = jax.tree.map(np.copy, p0)
        for layer, chans in prune.items():
            p[layer]["kernel"][:, chans] = 0.0
        model, info = to_onnx(module, p, (12,))
        np.testing.assert_allclose(_run(model, x), np.asarray(flax_apply({"params": p}, x)), atol=2e-5, rtol=1e-4)
        assert info["kept"]["a"] == 8 - len(prune.get("a", [])) and info["kept"]["b"] == 8 - len(prune.get("b", []))
        assert not info["kept_back"]
        inits = {i.name: tuple(i.dims) for i in model.graph.initializer}
        head = next(n for n in model.graph.node if n.name == "head")
        assert inits[head.input[1]] == (info["kept"]["a"] + info["kept"]["b"], 10)  # only kept channels are read


def test_concatenated_dense_branches_int8():
    module = Branches()
    p, _, x = _variables(module, (12,))
    exports, want = _int_exports(lambda q, x: module.apply({"params": q}, x), p, x, {"a": ZEROED})
    model, info = to_onnx(module, p, (12,), exports)
    assert info["kept"] == {"a": 5, "b": 8, "head": 10} and not info["kept_back"]
    _assert_agrees(_run(model, x), want)


def test_conv_concat_with_constant_split_and_slice():
    module = ConvBranches()
    p, _, x = _variables(module, (6, 6, 2))
    p["ca"]["kernel"][..., [0, 2]] = 0.0
    p["cc"]["kernel"][..., [1, 5]] = 0.0
    model, info = to_onnx(module, p, (6, 6, 2))
    np.testing.assert_allclose(_run(model, x), np.asarray(jax.jit(module.apply)({"params": p}, x)), atol=2e-5, rtol=1e-4)
    assert info["kept"]["ca"] == 4 and info["kept"]["cc"] == 6 and not info["kept_back"]
    ops = collections.Counter(n.op_type for n in model.graph.node)
    assert ops["Concat"] >= 1 and ops["Slice"] >= 1


def test_bn_scale_zero_channel_is_kept_and_exact():
    # a BN scale of 0 (network slimming) makes a channel the constant BN bias: its folded kernel
    # column is 0 and the channel stays (the masks did not remove it, so neither do the cost
    # model and the size breakdown); the export agrees with Flax
    module = BNCNN("VALID")
    p, stats, x = _variables(module, (8, 8, 3))
    p["bn1"]["scale"][[2, 5]] = 0.0
    fn = _apply(module, stats)
    want = np.asarray(jax.jit(fn)(p, x))
    model, info = to_onnx(fn, p, (8, 8, 3))
    np.testing.assert_allclose(_run(model, x), want, atol=2e-5, rtol=1e-4)
    assert info["kept"]["conv1"] == 8 and not info["kept_back"]
    _assert_folded(model)
    model, info = to_onnx(fn, p, (8, 8, 3), {"conv1": LayerExport("conv1", prune=False)})
    np.testing.assert_allclose(_run(model, x), want, atol=2e-5, rtol=1e-4)
    assert info["kept"]["conv1"] == 8


def test_layer_output_read_twice_is_not_folded():
    # h is read by the affine and by the add: folding would need the layer twice; it stays
    class Fork(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.Dense(8, name="a")(x)
            return nn.Dense(4, name="b")(h * 2.0 + h)

    module = Fork()
    p, _, x = _variables(module, (5,))
    model, _ = to_onnx(module, p, (5,))
    np.testing.assert_allclose(_run(model, x), np.asarray(jax.jit(module.apply)({"params": p}, x)), atol=2e-5, rtol=1e-4)
    assert [n.op_type for n in model.graph.node].count("MatMul") == 2
