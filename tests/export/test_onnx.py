"""The jaxpr -> ONNX converter: the graph computes what the Flax model computes, pruned
channels are really gone (smaller matrices), and quantized layers are int8 QDQ."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import onnx
import onnxruntime as ort
import pytest

from models.lenet import LeNet5, LeNet300
from models.mobilenet import MobileNet
from models.vdsr import VDSR
from search.compression import compress, quant
from search.compression.layers import Model, discover_layers
from search.export.onnx.convert import LayerExport, to_onnx
from search.export.pack import decode_layer, encode_layer


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": x})[0]


def _setup(module, shape, prune, seed=0):
    """Params with non-zero biases and half the output channels of `prune` layers zeroed."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(6, *shape)).astype(np.float32)
    shapes = jax.eval_shape(module.init, jax.random.PRNGKey(seed), x)["params"]  # no compile
    p = jax.tree.map(lambda a: (rng.normal(size=a.shape) / np.sqrt(np.prod(a.shape[:-1]) if len(a.shape) > 1 else 20)
                                ).astype(np.float32), shapes)
    for path in prune:
        node = p
        for s in path.split("/"):
            node = node[s]
        c = node["kernel"].shape[-1]
        node["kernel"][..., rng.choice(c, c // 2, replace=False)] = 0.0
    return p, x


def _kernel_shapes(model: onnx.ModelProto) -> dict[str, tuple]:
    inits = {i.name: tuple(i.dims) for i in model.graph.initializer}
    return {n.name: inits.get(n.input[1]) for n in model.graph.node if n.op_type in ("Conv", "MatMul") and n.name}


CASES = [
    ("lenet300", LeNet300(), (8, 8, 1), ["fc1", "fc2"]),
    ("lenet5-valid", LeNet5(), (28, 28, 1), ["conv1", "conv2", "fc1"]),
    ("lenet5-same", LeNet5(padding="SAME"), (8, 8, 1), ["conv1", "conv2", "fc1"]),
    ("mobilenet", MobileNet(), (8, 8, 1), ["stem", "block1/pw", "block2/dw", "block3/pw"]),
    ("vdsr", VDSR(depth=3, width=6), (8, 8, 1), ["conv1", "conv2"]),
]


@pytest.mark.parametrize("name,module,shape,prune", CASES, ids=[c[0] for c in CASES])
def test_float_model_agrees_and_pruned_channels_are_removed(name, module, shape, prune):
    p, x = _setup(module, shape, prune)
    model, info = to_onnx(module, p, shape)
    want = np.asarray(module.apply({"params": p}, x))
    got = _run(model, x)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4)
    # every pruned layer's ONNX kernel has half the output channels (bias of pruned channels
    # is not zero, so removal needs the constant-folding path: this checks it is taken)
    for layer in prune:
        c = _node(p, layer)["kernel"].shape[-1]
        if layer in ("block1/pw", "block2/dw"):  # depthwise: both; what block2/dw pruned goes from block1/pw
            live = np.any(_node(p, "block1/pw")["kernel"] != 0, axis=(0, 1, 2)) & \
                np.any(_node(p, "block2/dw")["kernel"] != 0, axis=(0, 1, 2))
            assert info["kept"][layer] == live.sum() < c - c // 2
        else:
            assert info["kept"][layer] == c - c // 2, (layer, info)
    assert not info["kept_back"]


def _node(p, path):
    for s in path.split("/"):
        p = p[s]
    return p


def test_lenet5_smaller_matrices_in_the_graph():
    p, _x = _setup(LeNet5(), (28, 28, 1), ["conv1", "conv2", "fc1"])
    model, _ = to_onnx(LeNet5(), p, (28, 28, 1))
    shapes = _kernel_shapes(model)
    # conv1 [20 -> 10 out], conv2 [10 in (conv1's kept), 25 out], fc1 [4*4*25 rows, 250], fc2 [250, 10]
    assert shapes["conv1"] == (10, 1, 5, 5)
    assert shapes["conv2"] == (25, 10, 5, 5)
    assert shapes["fc1"] == (400, 250)
    assert shapes["fc2"] == (250, 10)


def test_residual_add_keeps_channels_the_add_needs():
    # vdsr's last conv feeds x + r: pruning its only output channel cannot remove it
    module = VDSR(depth=3, width=4)
    p, x = _setup(module, (8, 8, 2), ["conv1"])
    p["conv3"]["kernel"][..., 1] = 0.0
    model, info = to_onnx(module, p, (8, 8, 2))
    assert info["kept"]["conv3"] == 2 and any("conv3" in k for k in info["kept_back"])
    np.testing.assert_allclose(_run(model, x), np.asarray(module.apply({"params": p}, x)), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("wbits,abits,bias", [(8, 8, False), (4, 6, False), (2, 8, False), (1, 8, False),
                                              (8, 16, True), (32, 8, True), (4, 8, True)])
def test_quantized_layers_match_fake_quant_and_use_int8_qdq(wbits, abits, bias):
    module, shape = LeNet5(padding="SAME"), (8, 8, 1)
    p, x = _setup(module, shape, ["conv1", "fc1"], seed=1)
    if not bias:  # integer kernels round the bias to int32 at s_x * s_w (as every int8 runtime):
        for node in p.values():  # without a bias the integer graph is exact
            node["bias"][:] = 0.0
    model_ = Model(module)
    layers = discover_layers(model_, p, x[:1])
    lo, hi = compress.calibrate_ranges(model_, layers, p, jnp.asarray(x))
    exports = {}
    for l in layers:
        node = _node(p, l.name)
        w = node["kernel"]
        mask = (w != 0).astype(np.float32)
        if wbits < 32:
            eff = np.asarray(quant.fake_quant_weight(jnp.asarray(w), wbits))
            t, info = encode_layer(eff, mask, wbits, "uniform")
            node["kernel"] = decode_layer(t, info)
            size = int(np.prod(w.shape))
            q = np.zeros(size, np.int64)
            from search.export.pack import unpack_int, unpack_uint
            m = unpack_uint(t["mask"], 1, size).astype(bool) if "mask" in t else np.ones(size, bool)
            q[m] = unpack_int(t["q"], wbits, int(m.sum()))
        s, z, _ = quant.act_qparams(lo[l.index], hi[l.index], abits)
        act = (float(s), int(z), abits)
        exports[l.name] = LayerExport(l.name, "int", q.reshape(w.shape), t["scale"], act) if wbits <= 8 else \
            LayerExport(l.name, "float", act=act)
    bits = jnp.full(len(layers), abits)
    want = np.asarray(compress.quantized_apply(model_, layers, p, lo, hi, bits, jnp.asarray(x)))
    model, info = to_onnx(module, p, shape, exports)
    got = _run(model, x)
    ops = [n.op_type for n in model.graph.node]
    if wbits <= 8 and abits <= 8:
        ints = [i for i in model.graph.initializer if i.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)
                and len(i.dims) >= 2]
        assert len(ints) == len(layers)  # integer kernels (8 bits as uint8 + 128: exact u8u8 on AVX2)
        # conv1 -> relu -> pool -> conv2 is an integer chain that onnxruntime fuses into
        # QLinearConv; conv2 reads conv1's removed channels through a SAME-padded bias map
        # (when biases are not zero), which has no per-channel int32 form, so it runs as
        # ConvInteger with the map added in float after it;
        # fc1 -> fc2 fuse to QGemm; the logits layer has no next quantizer: exact MatMulInteger
        conv2 = "ConvInteger" if bias else "QLinearConv"
        assert info["forms"] == {"conv1": "QLinearConv", "conv2": conv2, "fc1": "QLinearGemm", "fc2": "MatMulInteger"}
        assert "QuantizeLinear" in ops and "MatMulInteger" in ops
    scale = max(1.0, float(np.abs(want).max()))
    if bias and wbits <= 8 and abits <= 8:
        # the int32 bias may move an activation that lies within s_x * s_w / 2 of a rounding
        # boundary by one level: small, documented tolerance
        assert np.max(np.abs(got - want)) < 5e-2 * scale
    else:
        assert np.max(np.abs(got - want)) < 1e-5 * scale
        assert np.all(got.argmax(-1) == want.argmax(-1))
    assert info["kept"]["conv1"] == 10 and info["kept"]["fc1"] == 250
