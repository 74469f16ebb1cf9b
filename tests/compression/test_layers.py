"""Layer discovery: shapes, MACs and params from one abstract pass, for Linen, NNX and functions."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx
from flax.linen import summary

from models.lenet import LeNet300, LeNet5
from models.mobilenet import MobileNet
from search.errors import UserError
from search.compression.layers import Model, discover_layers, get_path


def _init(module, shape):
    """Params filled from numpy: jax.random's compile time varies wildly with shape on this CPU."""
    x = jnp.zeros(shape, jnp.float32)
    shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), x)["params"]
    rng = np.random.default_rng(0)
    return jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape) * 0.1, jnp.float32), shapes), x


def test_lenet300_counts_by_hand():
    params, x = _init(LeNet300(), (1, 8, 8, 1))
    layers = discover_layers(LeNet300(), params, x)
    assert [l.name for l in layers] == ["fc1", "fc2", "fc3"]
    assert [l.index for l in layers] == [0, 1, 2]
    # 8x8 digits flattened: 64 -> 300 -> 100 -> 10
    assert [l.kernel_shape for l in layers] == [(64, 300), (300, 100), (100, 10)]
    assert [l.macs for l in layers] == [64 * 300, 300 * 100, 100 * 10]
    assert [l.params for l in layers] == [64 * 300 + 300, 300 * 100 + 100, 100 * 10 + 10]
    assert layers[0].in_shape == (64,) and layers[2].out_shape == (10,)
    for l in layers:
        assert get_path(params, l.path)["kernel"].shape == l.kernel_shape


def test_conv_and_depthwise():
    params, x = _init(MobileNet(), (1, 8, 8, 1))
    layers = {l.name: l for l in discover_layers(MobileNet(), params, jax.ShapeDtypeStruct(x.shape, x.dtype))}
    dw = layers["block2/dw"]
    assert dw.kind == "depthwise" and dw.groups == 32 and dw.kernel_shape == (3, 3, 1, 32)
    assert dw.path == ("block2", "dw") and dw.out_shape == (4, 4, 32)  # stride 2
    assert dw.macs == 4 * 4 * 3 * 3 * 32
    assert layers["stem"].kind == "conv" and layers["stem"].groups == 1
    assert layers["fc"].kind == "dense"


@pytest.mark.parametrize("module,shape", [(LeNet300(), (1, 8, 8, 1)), (LeNet5(padding="SAME"), (1, 8, 8, 1)),
                                          (MobileNet(), (1, 8, 8, 1))])
def test_cross_check_with_flax_tabulate(module, shape):
    """Flax's own summary table (the rows behind nn.tabulate) agrees on shapes, params and FLOPs."""
    params, x = _init(module, shape)
    layers = discover_layers(module, params, x)
    table = summary._get_module_table(module, depth=None, show_repeated=False, compute_flops=True,
                                      compute_vjp_flops=False)(jax.random.PRNGKey(0), x)
    rows = {tuple(r.path): r for r in table if r.method == "__call__"}
    for l in layers:
        row = rows[l.path]
        assert tuple(row.outputs.shape[1:]) == l.out_shape
        assert sum(np.size(v) for v in jax.tree.leaves(row.counted_variables)) == l.params
        # XLA counts 2 FLOPs per MAC that touches the image (not the zero padding), plus bias adds;
        # a custom conv (models.conv.depthwise_conv: shifted views) counts its own way
        expect = 2 * _in_image_macs(l, row.module_copy) + int(np.prod(l.out_shape))
        if getattr(row.module_copy, "conv_general_dilated", None) is None:
            assert row.flops == expect
        else:
            assert expect / 2 <= row.flops <= 2 * expect
    text = nn.tabulate(module, jax.random.PRNGKey(0))(x)
    for l in layers:
        assert f"{l.params:,}" in text


def _in_image_macs(layer, module):
    """MACs without the taps that fall on SAME padding (what XLA's cost analysis counts)."""
    if layer.kind == "dense":
        return layer.macs
    kh, kw = layer.kernel_shape[:2]
    h, w = layer.in_shape[:2]
    taps = jax.lax.conv_general_dilated(jnp.ones((1, h, w, 1)), jnp.ones((kh, kw, 1, 1)),
                                        _pair(module.strides), module.padding,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return int(taps.sum()) * layer.kernel_shape[2] * layer.out_channels


def _pair(s):
    return (s, s) if isinstance(s, int) else tuple(s)


class _TinyNNX(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Conv(1, 4, (3, 3), rngs=rngs)
        self.head = nnx.Linear(8 * 8 * 4, 10, rngs=rngs)

    def __call__(self, x):
        return self.head(nnx.relu(self.conv(x)).reshape(x.shape[0], -1))


def test_nnx_module():
    net = _TinyNNX(nnx.Rngs(0))
    layers = discover_layers(net, None, jnp.zeros((2, 8, 8, 1)))
    assert [(l.name, l.kind, l.kernel_shape) for l in layers] == [
        ("conv", "conv", (3, 3, 1, 4)), ("head", "dense", (256, 10))]
    assert layers[0].macs == 8 * 8 * 9 * 4
    model = Model(net)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 8, 8, 1)), jnp.float32)
    np.testing.assert_array_equal(model.apply(model.initial_params(), x), net(x))
    # the hook sees every layer input and can rewrite it
    seen = []
    y = model.apply(model.initial_params(), x, lambda p, call, v: (seen.append(p), call(v * 0))[1])
    assert seen == [("conv",), ("head",)]
    np.testing.assert_allclose(y, jnp.broadcast_to(net.head.bias[...], (2, 10)), atol=1e-6)


def test_apply_function_and_shared_layer():
    dense = nn.Dense(3, name="shared")

    class Twice(nn.Module):
        @nn.compact
        def __call__(self, x):
            d = nn.Dense(3, name="shared")
            return d(nn.relu(d(x)))

    params, x = _init(Twice(), (1, 3))
    layers = discover_layers(lambda p, v: Twice().apply({"params": p}, v), params, x)
    assert [l.name for l in layers] == ["shared"]  # listed once, at its first call
    del dense


def test_no_layers_is_a_user_error():
    class Nothing(nn.Module):
        @nn.compact
        def __call__(self, x):
            return x * 2

    with pytest.raises(UserError, match="no Dense or Conv"):
        discover_layers(Nothing(), {}, jnp.zeros((1, 3)))
    with pytest.raises(UserError, match="cannot compress"):
        Model(42)
