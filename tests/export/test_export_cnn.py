"""Real CNN shapes end to end (issue 14): a plan that channel-prunes every group exports an ONNX
model that holds exactly the plan's channels (no kept-back channels), agrees with Flax, and
whose MACs and stored bytes are the cost model's and the size breakdown's; int8 conv+BN
stages run as integer kernels."""
from __future__ import annotations

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import onnx
import pytest

import models
from search.compression import plan as P
from search.compression.groups import tie_plan
from search.cost import kernels, runtime_graph
from search.cost.roofline import price
from search.engine.config import FinetuneConfig
from search.engine.finetune import Engine
from search.export.exporter import export_plan
from search.export.pack import load_variables
from tests.archs import Concat, ConvBN, MobileV2, ResNet, Shared, init_variables

ARCHS = {"convbn": ConvBN, "resnet": ResNet, "concat": Concat, "mobilev2": MobileV2, "shared": Shared}
INTEGER = {"QLinearConv", "QLinearGemm", "ConvInteger", "MatMulInteger"}  # qdq.integer_kernels forms
KERNEL_FORM = {"QLinearConv": "q8", "QLinearGemm": "q8", "ConvInteger": "i8", "MatMulInteger": "i8", "float": "f32"}


def _task(name: str):
    data = models.load_dataset("digits")
    module = ARCHS[name]()
    variables = init_variables(module, np.zeros((1, *data.input_shape), np.float32))
    # a head of c classes (10, 3 or 2) learns the digits modulo c
    c = jax.eval_shape(lambda x: module.apply(variables, x), np.zeros((1, *data.input_shape), np.float32)).shape[-1]
    data = dataclasses.replace(data, num_classes=c, **{f: getattr(data, f) % c for f in ("y_train", "y_val", "y_test")})
    task = models.Task(name=f"arch-{name}", module=module, data=data, loss=models.metrics.cross_entropy,
                       metric=models.metrics.accuracy, metric_name="accuracy")
    return task, variables


def _onnx_macs(path, layers) -> dict[str, int]:
    """MACs of every layer's kernels in the exported file: output positions x kernel elements,
    summed over the layer's calls (nodes "<layer>", "<layer>_<n>", each maybe "..._int")."""
    model = onnx.load(str(path))
    inits = {i.name: tuple(i.dims) for i in model.graph.initializer}
    prod = {o: n for n in model.graph.node for o in n.output}
    by_name = {l.name: l for l in layers}
    out: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type not in ("Conv", "MatMul", "Gemm", "ConvInteger", "MatMulInteger"):
            continue
        name = node.name[: -len("_int")] if node.name.endswith("_int") else node.name
        base, _, n = name.rpartition("_")
        layer = by_name.get(name) or (by_name.get(base) if n.isdigit() else None)
        w = node.input[1]
        dims = inits.get(w) or inits.get(prod[w].input[0])  # float, or DequantizeLinear(q)
        out[layer.name] = out.get(layer.name, 0) + math.prod(layer.out_shape[:-1]) * math.prod(dims)
    return out


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_every_group_pruned_exports_exactly_the_priced_channels(name, tmp_path):
    task, variables = _task(name)
    engine = Engine(task, variables, FinetuneConfig(steps=0, k=1, calib_examples=64))
    layers = engine.layers
    # half of every group's channels; layers whose channels are fixed (the head) are not pruned,
    # so every count is exact (unstructured masks spread their zeros over rows the export drops)
    ratio = np.array([0.0 if l.fixed else 0.5 for l in layers])
    checks = {"float": P.make_plan(ratio, P.CHANNEL, 32, 32), "int8": P.make_plan(ratio, P.CHANNEL, 8, 8)}
    for label, plan in checks.items():
        r = export_plan(task, variables, plan, tmp_path / label, engine=engine, profile="xeon")
        cfg = r.config
        assert cfg["onnx_kept_back"] == [], cfg["onnx_kept_back"]
        size = json.loads((tmp_path / label / "size.json").read_text())
        tied = tie_plan(plan, layers)
        cost = price("xeon", layers, P.stack_plans([plan]))
        macs = _onnx_macs(tmp_path / label / "model.onnx", layers)
        for l, c in zip(layers, cfg["layers"]):
            held = size["layers"][l.name]["channels"]
            want = l.out_channels - round(tied.ratio[l.index] * l.out_channels)
            assert c["onnx_out_channels"] == held["out"][0] == want, (label, l.name)
            # the export's kernel is the priced one: MACs equal, and the stored rows are the held ones
            assert macs[l.name] == pytest.approx(float(cost.layer_macs[0, l.index]), rel=1e-9), (label, l.name)
            calls = l.macs // (math.prod(l.out_shape[:-1]) * math.prod(l.kernel_shape))  # a shared layer: 2
            assert macs[l.name] == calls * math.prod(l.out_shape[:-1]) * held["out"][0] * held["fan_in"][0], (label, l.name)
        # stored bytes: the size breakdown's quantized stage is the cost model's size
        assert size["total"]["bits_by_stage"]["quantized"] == pytest.approx(float(cost.size_kb[0]) * 8192, rel=1e-9)
        # removed channels are exactly 0 (their biases and BatchNorms pruned with them): every
        # conv's bias is one value per channel, never a full-size map added after the conv
        graph = onnx.load(str(tmp_path / label / "model.onnx")).graph
        shapes = {i.name: tuple(i.dims) for i in graph.initializer}
        maps = [n.name for n in graph.node if n.op_type == "Add"
                for i in n.input if len(shapes.get(i, ())) == 4 and math.prod(shapes[i][2:]) > 1]
        assert maps == [], (label, maps)
        if label == "float":
            assert r.onnx_agreement >= 0.999 and r.onnx_max_abs_diff < 1e-3
            # ReLU6 is one Clip, which onnxruntime fuses into the conv, never Relu -> Min (fold.clip_activations)
            ops = [n.op_type for n in graph.node]
            assert "Min" not in ops and ("Clip" in ops) == (name == "mobilev2"), ops
            # one Clip per layer the cost model charges a ReLU6 pass (Layer.clipped, traced)
            assert ops.count("Clip") == sum(l.clipped for l in layers), (name, ops)
            # weights.safetensors holds every collection: Flax runs the exported model from it
            back = load_variables(tmp_path / label / "weights.safetensors")
            assert set(back) == set(variables)
            x = task.data.x_test[:64]
            want = engine.predict(engine.run(plan, return_models=True, finetune=False).models[0], x)
            np.testing.assert_allclose(jax.jit(task.module.apply)(back, x), want, rtol=1e-5, atol=1e-5)
        else:  # every conv and dense stage on integer kernels, outputs within int8 rounding
            assert {c["onnx_form"] for c in cfg["layers"]} <= INTEGER, [c["onnx_form"] for c in cfg["layers"]]
            assert r.onnx_agreement >= 0.99
            # a ReLU6 between integer layers leaves no Min (qdq._saturated_min), nor one elsewhere
            assert "Min" not in [n.op_type for n in graph.node]
            # the kernel-level cost model expects the kernels the export runs (QLinear or Integer)
            # (removed channels are exactly 0: no conv gets a bias map, steps.zero_removed)
            expected = kernels.forms(runtime_graph.chained_to(layers), plan.weight_bits[None], plan.act_bits[None],
                                     np.zeros((1, len(layers)), bool))[0]
            # (q8u: a QLinear kernel with 8-bit weights, stored as uint8)
            assert [kernels.FORMS[f].removesuffix("u") for f in expected] == [KERNEL_FORM[c["onnx_form"]] for c in cfg["layers"]], name


def test_nnx_resnet_int8_channel_pruned_export_keeps_nothing_back(tmp_path):
    """The issue's NNX ResNet (stem conv+BN, two basic blocks with identity shortcuts, global
    average pooling, Linear head), left in train mode: 50% of every conv's channels at int8
    exports with no kept-back channels and every conv on integer kernels."""
    from flax import nnx

    class Block(nnx.Module):
        def __init__(self, c, rngs):
            self.conv1, self.bn1 = nnx.Conv(c, c, (3, 3), use_bias=False, rngs=rngs), nnx.BatchNorm(c, rngs=rngs)
            self.conv2, self.bn2 = nnx.Conv(c, c, (3, 3), use_bias=False, rngs=rngs), nnx.BatchNorm(c, rngs=rngs)

        def __call__(self, x):
            return nnx.relu(x + self.bn2(self.conv2(nnx.relu(self.bn1(self.conv1(x))))))

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.stem, self.bn = nnx.Conv(1, 8, (3, 3), use_bias=False, rngs=rngs), nnx.BatchNorm(8, rngs=rngs)
            self.block1, self.block2 = Block(8, rngs), Block(8, rngs)
            self.head = nnx.Linear(8, 10, rngs=rngs)

        def __call__(self, x):
            x = self.block2(self.block1(nnx.relu(self.bn(self.stem(x)))))
            return self.head(x.mean(axis=(1, 2)))

    net = Net(nnx.Rngs(0))
    rng = np.random.default_rng(0)
    for _, bn in nnx.iter_modules(net):  # statistics that are not the identity
        if isinstance(bn, nnx.BatchNorm):
            bn.mean[...] = rng.normal(size=bn.mean.shape).astype(np.float32) * 0.1
            bn.var[...] = rng.uniform(0.5, 1.5, bn.var.shape).astype(np.float32)
    task = models.Task(name="nnx-resnet", module=net, data=models.load_dataset("digits"),
                       loss=models.metrics.cross_entropy, metric=models.metrics.accuracy, metric_name="accuracy")
    engine = Engine(task, None, FinetuneConfig(steps=0, k=1, calib_examples=64))
    layers = engine.layers
    assert [layers[l.group].name for l in layers] == ["stem", "block1/conv1", "stem", "block2/conv1", "stem", "head"]
    plan = P.make_plan([0.0 if l.fixed else 0.5 for l in layers], P.CHANNEL, 8, 8)
    r = export_plan(task, None, plan, tmp_path / "e", engine=engine)
    assert r.config["onnx_kept_back"] == []
    assert [c["onnx_out_channels"] for c in r.config["layers"]] == [4, 4, 4, 4, 4, 10]
    assert {c["onnx_form"] for c in r.config["layers"]} <= INTEGER and r.onnx_agreement >= 0.99
    # the float form of the plan: its weights file holds the NNX BatchNorm statistics adaptive BN
    # gave it, and the user's module, filled from the file, reproduces the engine's outputs
    fplan = P.make_plan([0.0 if l.fixed else 0.5 for l in layers], P.CHANNEL)
    export_plan(task, None, fplan, tmp_path / "f", engine=engine)
    back = load_variables(tmp_path / "f" / "weights.safetensors")
    assert set(back) == {"params", "batch_stats"}
    user = nnx.clone(net)
    params, stats = nnx.state(user, nnx.Param), nnx.state(user, nnx.BatchStat)
    nnx.replace_by_pure_dict(params, back["params"])
    nnx.replace_by_pure_dict(stats, back["batch_stats"])
    nnx.update(user, params, stats)
    user.eval()
    x = task.data.x_test[:64]
    want = engine.predict(engine.run(fplan, return_models=True, finetune=False).models[0], x)
    np.testing.assert_allclose(np.asarray(user(jnp.asarray(x))), want, rtol=1e-5, atol=1e-5)


def _runtime_profile(block: int, align: int):
    """A calibrated profile (synthetic coefficients) of a runtime with blocked float convs."""
    from types import MappingProxyType

    import hw_profiles
    from hw_profiles import KERNELS
    from search.cost.calibrate import calibrated_profile
    from tests.support import MACHINE

    coef = MappingProxyType({name: (1.0,) + (0.0,) * 8 for name in KERNELS})
    return calibrated_profile(MACHINE, name="blocked", kernels=hw_profiles.KernelModel(
        1.0, coef, "synthetic", channel_block=block, channel_align=align, q8u_block=block))


def test_channels_emptied_by_unstructured_pruning_go_only_down_to_the_runtime_alignment(tmp_path):
    """Unstructured pruning empties whole output channels, which the export removes; on a runtime
    whose fast conv kernels want multiples of its channel alignment (float) or channel block
    (integer), an odd count would run 2-3x slower (MobileNetV2 at 90%: 180 us against 126 dense),
    so some empty channels stay, never past the count the cost model priced: a channel-pruned
    layer keeps exactly its plan's channels. The export still agrees with Flax."""
    task, variables = _task("mobilev2")
    engine = Engine(task, variables, FinetuneConfig(steps=0, k=1, calib_examples=64))
    layers = engine.layers
    prof = _runtime_profile(16, 4)
    sparse = P.make_plan([0.0 if l.fixed else 0.9 for l in layers], P.UNSTRUCTURED, 32, 32)
    convs = [l for l in layers if l.kind == "conv"]
    counts = {}
    for label, profile in (("none", None), ("blocked", prof)):
        r = export_plan(task, variables, sparse, tmp_path / label, engine=engine, profile=profile)
        counts[label] = {c["name"]: c["onnx_out_channels"] for c in r.config["layers"]}
        assert r.onnx_agreement >= 0.999 and r.onnx_max_abs_diff < 1e-3, label
    assert any(counts["none"][l.name] % 4 for l in convs), counts["none"]  # the pruning did empty channels
    for l in convs:
        n = counts["blocked"][l.name]
        assert n % 4 == 0 or n == l.out_channels, (l.name, n)
        assert counts["none"][l.name] <= n <= l.out_channels
    # integer layers round up to the channel block, capped by a channel-pruned plan's own count
    ratio = np.array([0.0 if l.fixed else 0.5 for l in layers])
    pruned = P.make_plan(ratio, P.CHANNEL, 8, 8)
    r = export_plan(task, variables, pruned, tmp_path / "int8", engine=engine, profile=_runtime_profile(16, 16))
    tied = tie_plan(pruned, layers)
    assert [c["onnx_out_channels"] for c in r.config["layers"]] == [
        l.out_channels - round(tied.ratio[l.index] * l.out_channels) for l in layers]
    r = export_plan(task, variables, P.make_plan([0.0 if l.fixed else 0.9 for l in layers], P.UNSTRUCTURED, 8, 8),
                    tmp_path / "int8-sparse", engine=engine, profile=_runtime_profile(16, 16))
    for l, c in zip(layers, r.config["layers"]):
        if l.kind == "conv":
            assert c["onnx_out_channels"] % 16 == 0 or c["onnx_out_channels"] == l.out_channels, (l.name, c)
    assert r.onnx_agreement >= 0.99
