"""Channel groups traced from the graph, on small architectures whose groups are derived by hand."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

from search.compression import plan as P
from search.compression.groups import tie_plan
from search.compression.layers import Model, discover_layers
from search.compression.masks import compute_masks
from search.errors import UserError
from tests.archs import ConvBN, Concat, MobileV2, ResNet, Shared, init_variables

X = jnp.zeros((1, 8, 8, 3), jnp.float32)


def _groups(module, x=X, **kwargs):
    variables = dict(init_variables(module, x, **kwargs))
    params = variables.pop("params")
    layers = discover_layers(Model(module, variables, kwargs), params, x)
    groups: dict[str, list[str]] = {}
    for layer in layers:
        groups.setdefault(layers[layer.group].name, []).append(layer.name)
    return layers, sorted(groups.values()), params


def test_conv_bn_chain_with_dropout_and_flatten():
    layers, groups, _ = _groups(ConvBN(), train=False)
    assert groups == [["c1"], ["c2"], ["fc"]]
    c1, c2, fc = layers
    assert c2.reads == ((0, 4),) and fc.reads == ((1, 6),) and fc.in_repeat == 16  # 4x4 positions
    assert fc.fixed == "the model's output" and c1.fixed is None and c2.fixed is None


def test_resnet_identity_shortcuts_couple_the_stage_and_projection_starts_a_group():
    layers, groups, _ = _groups(ResNet())
    assert groups == [["b1/conv1"], ["b2/conv1"], ["b3/conv1"], ["b3/conv2", "b3/proj"],
                      ["fc"], ["stem", "b1/conv2", "b2/conv2"]]
    by = {l.name: l for l in layers}
    assert by["b1/conv2"].group == by["stem"].index and by["b3/proj"].group == by["b3/conv2"].group
    assert by["b3/conv1"].reads == by["b3/proj"].reads == ((by["stem"].index, 8),)
    assert by["fc"].reads == ((by["b3/conv2"].group, 16),)
    # the BatchNorm normalising each conv's output, whose scale and shift a removed channel takes with it
    assert {l.name: l.norms for l in layers} == {
        "stem": (("stem_bn",),), "fc": (),
        **{f"{b}/{c}": ((b, bn),) for b in ("b1", "b2", "b3") for c, bn in (("conv1", "bn1"), ("conv2", "bn2"))},
        "b3/proj": (("b3", "proj_bn"),)}


def test_concatenation_reads_both_groups_with_offsets():
    layers, groups, _ = _groups(Concat())
    assert groups == [["a"], ["b"], ["fc"], ["mix"]]
    mix = layers[2]
    assert mix.name == "mix" and mix.reads == ((0, 4), (1, 6))


def test_inverted_residual_couples_depthwise_and_residual():
    layers, groups, _ = _groups(MobileV2())
    assert groups == [["fc"], ["i1/expand", "i1/dw"], ["i2/expand", "i2/dw"], ["i2/project"],
                      ["stem", "i1/project"]]
    by = {l.name: l for l in layers}
    assert by["i1/dw"].kind == "depthwise" and by["i1/dw"].group == by["i1/expand"].index
    assert by["i2/expand"].reads == ((by["stem"].index, 4),)


def test_layer_called_twice_couples_its_two_inputs():
    layers, groups, _ = _groups(Shared())
    # a's and b's channel c both meet row c of the shared kernel: removing the row removes
    # both, so a and b are one group
    assert groups == [["a", "b"], ["fc"], ["shared"]]
    by = {l.name: l for l in layers}
    assert by["shared"].reads == ((by["a"].index, 8),)
    assert by["a"].fixed is None and by["shared"].fixed is None


class Pools(nn.Module):
    """conv, ReLU, 2x2 max pooling, conv, average pooling, conv, max pooling as reshape + max,
    flatten, Dense; and a residual add after a max pooling."""

    @nn.compact
    def __call__(self, x):
        a = nn.max_pool(nn.relu(nn.Conv(4, (3, 3), padding="SAME", name="a")(x)), (2, 2), (2, 2))
        b = nn.avg_pool(nn.relu(nn.Conv(4, (3, 3), padding="SAME", name="b")(a)), (2, 2), (2, 2))
        c = nn.relu(nn.Conv(6, (1, 1), name="c")(b))
        n, h, w, ch = c.shape
        c = c.reshape(n, h // 2, 2, w // 2, 2, ch).max(axis=(2, 4))
        d = nn.Dense(3, name="d")(c.reshape(n, -1))
        e = nn.Dense(3, name="e")(nn.max_pool(b, (2, 2), (2, 2)).reshape(n, -1) + c.reshape(n, -1)[:, :4])
        return d + e


def test_a_layer_knows_whether_its_input_passed_a_max_pooling():
    """max_pooled: after lax.reduce_window_max (nn.max_pool) or a reduce_max over windows, through
    activations and a flatten; not after an average pooling, and not after an op with a second
    activation input (the add), where onnxruntime would not move a quantization ahead of the pool."""
    layers, _, _ = _groups(Pools())
    assert {l.name: l.max_pooled for l in layers} == {"a": False, "b": True, "c": False, "d": True, "e": False}
    layers, _, _ = _groups(ResNet())  # a global average pooling before the head
    assert not any(l.max_pooled for l in layers)


class Bounds(nn.Module):
    @nn.compact
    def __call__(self, x):
        a = nn.relu6(nn.BatchNorm(use_running_average=True, name="bn")(nn.Conv(4, (3, 3), name="a")(x)))
        b = jnp.clip(nn.Conv(4, (1, 1), name="b")(a), 0.0, 6.0)
        c = nn.relu(nn.Conv(4, (1, 1), name="c")(b))
        d = nn.relu6(nn.Conv(4, (1, 1), name="d")(c) + b)  # a residual add before the ReLU6
        e = jnp.minimum(nn.Conv(4, (1, 1), name="e")(d), 6.0)  # bounded above only
        return nn.Dense(3, name="f")(e.mean(axis=(1, 2)))


def test_a_layer_knows_whether_its_output_is_clipped():
    """clipped: a ReLU6 (max then min with constants) or a clip right after the layer, through
    its BatchNorm and bias; not a ReLU, not after a residual add (the Clip is not the conv's), not
    a min alone; MobileNetV2's stem, expand and depthwise convs, not its project convs."""
    layers, _, _ = _groups(Bounds())
    assert {l.name: l.clipped for l in layers} == {"a": True, "b": True, "c": False, "d": False, "e": False, "f": False}
    layers, _, _ = _groups(MobileV2())
    assert [l.name for l in layers if l.clipped] == ["stem", "i1/expand", "i1/dw", "i2/expand", "i2/dw"]


def test_unknown_op_keeps_the_channels_it_reads_and_says_why():
    class Sorts(nn.Module):
        @nn.compact
        def __call__(self, x):
            y = nn.Conv(4, (3, 3), name="c")(x)
            y = jnp.sort(y, axis=-1)  # an op on the channel axis: no rule
            return nn.Dense(2, name="fc")(y.mean(axis=(1, 2)))

    layers, _, _ = _groups(Sorts())
    assert "sort" in layers[0].fixed

    class Branches(nn.Module):  # the unknown op on one branch keeps only that branch's channels
        @nn.compact
        def __call__(self, x):
            a = jnp.sort(nn.Conv(4, (3, 3), name="a")(x), axis=-1)
            b = nn.relu(nn.Conv(6, (3, 3), name="b")(x))
            y = nn.Conv(5, (1, 1), name="mix")(jnp.concatenate([a, b], axis=-1))
            return nn.Dense(2, name="fc")(y.mean(axis=(1, 2)))

    layers, _, _ = _groups(Branches())
    by = {l.name: l for l in layers}
    assert "sort" in by["a"].fixed and by["b"].fixed is None and by["mix"].fixed is None
    assert by["mix"].reads == ((-1, 4), (by["b"].index, 6))


def test_a_group_is_one_decision_with_summed_importance():
    layers, _, params = _groups(ResNet())
    by = {l.name: l for l in layers}
    L = len(layers)
    ratio = np.zeros(L, np.float32)
    ratio[by["stem"].index] = 0.5
    ratio[by["b1/conv2"].index] = 0.0  # a member's own ratio is ignored: the leader decides
    plan = P.make_plan(ratio, P.CHANNEL, 32, 32)
    tied = tie_plan(plan, layers)
    assert tied.ratio[by["b2/conv2"].index] == 0.5 and tied.granularity[by["fc"].index] == P.UNSTRUCTURED
    masks = jax.jit(compute_masks, static_argnums=1)(params, layers, plan)
    kept = [np.asarray(masks[n]).reshape(-1, 8).any(axis=0) for n in ("stem", "b1/conv2", "b2/conv2")]
    assert kept[0].sum() == 4 and all(np.array_equal(kept[0], k) for k in kept)
    norms = sum(np.abs(np.asarray(params[n]["kernel"] if "/" not in n else params[n.split("/")[0]][n.split("/")[1]]["kernel"])).reshape(-1, 8).sum(0)
                for n in ("stem", "b1/conv2", "b2/conv2"))
    assert set(np.flatnonzero(kept[0])) == set(np.argsort(norms)[4:])


def test_nnx_resnet_block_groups_and_eval_mode():
    class Block(nnx.Module):
        def __init__(self, c, rngs):
            self.conv1 = nnx.Conv(c, c, (3, 3), use_bias=False, rngs=rngs)
            self.bn1 = nnx.BatchNorm(c, rngs=rngs)
            self.conv2 = nnx.Conv(c, c, (3, 3), use_bias=False, rngs=rngs)
            self.bn2 = nnx.BatchNorm(c, rngs=rngs)

        def __call__(self, x):
            return nnx.relu(x + self.bn2(self.conv2(nnx.relu(self.bn1(self.conv1(x))))))

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.stem = nnx.Conv(3, 8, (3, 3), use_bias=False, rngs=rngs)
            self.bn = nnx.BatchNorm(8, rngs=rngs)
            self.block = Block(8, rngs)
            self.drop = nnx.Dropout(0.5, rngs=rngs)
            self.head = nnx.Linear(8, 10, rngs=rngs)

        def __call__(self, x):
            x = self.block(nnx.relu(self.bn(self.stem(x))))
            return self.head(self.drop(x.mean(axis=(1, 2))))

    net = Net(nnx.Rngs(0))  # left in train mode, as users do: compressed in eval mode
    layers = discover_layers(net, None, X)
    names = [l.name for l in layers]
    assert names == ["stem", "block/conv1", "block/conv2", "head"]
    assert layers[2].group == 0 and layers[1].group == 1 and layers[1].reads == ((0, 8),)
    assert [l.norms for l in layers] == [(("bn",),), (("block", "bn1"),), (("block", "bn2"),), ()]
    m = Model(net)
    assert jax.eval_shape(m.apply, m.initial_params(), jnp.ones((2, 8, 8, 3))).shape == (2, 10)


def test_linen_state_errors_are_one_line():
    class TrainBN(nn.Module):
        @nn.compact
        def __call__(self, x, train=True):
            return nn.BatchNorm(use_running_average=not train, name="bn")(nn.Conv(2, (1, 1), name="c")(x))

    variables = init_variables(TrainBN(), X, train=False)
    with pytest.raises(UserError, match="collection 'batch_stats'.*whole variables dict"):
        discover_layers(TrainBN(), variables["params"], X)
    with pytest.raises(UserError, match=r"eval mode with the call arguments \{'train': False\} \(compress\(\.\.\., apply_kwargs"):
        discover_layers(Model(TrainBN(), {"batch_stats": variables["batch_stats"]}), variables["params"], X)
    with pytest.raises(UserError, match=r"the model's call failed: .*unexpected keyword argument 'training'.*eval_kwargs"):
        discover_layers(Model(TrainBN(), {"batch_stats": variables["batch_stats"]}, {"training": False}),
                        variables["params"], X)
