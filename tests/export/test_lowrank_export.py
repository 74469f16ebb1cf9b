"""Factorized layers exported as the pair they are (issue 18): two MatMuls for a Dense (SVD), a
kxk Conv with r filters then a 1x1 Conv for a conv (SVD), a kh x 1 then a 1 x kw Conv (spatial),
reshapes and two batched MatMuls (Kronecker); the ONNX model agrees with Flax, reloads exactly,
and its MACs and stored bits are the cost model's and the size breakdown's."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

import models
from search.compression import plan as P
from search.cost.roofline import price
from search.engine.config import FinetuneConfig
from search.engine.finetune import Engine
from search.export.exporter import export_plan
from search.export.onnx.macs import node_macs
from tests.export.test_export_cnn import _task

U, C = P.UNSTRUCTURED, P.CHANNEL


def _onnx_pairs(path, layers) -> dict[str, list[tuple[str, tuple, int]]]:
    """{layer: [(op, weight dims, MACs)]} of every Conv/MatMul node of a layer ("<layer>" and
    its factor "<layer>.svd_a"), MACs from the graph's shapes (search.export.onnx.macs)."""
    model = onnx.load(str(path))
    macs = node_macs(model)
    inits = {i.name: tuple(i.dims) for i in model.graph.initializer}
    prod = {o: n for n in model.graph.node for o in n.output}
    weight = lambda t: inits.get(t) or (inits.get(prod[t].input[0]) if t in prod else None)  # float, or DQ(q)
    out: dict[str, list] = {}
    for node in model.graph.node:
        if node.name in macs:
            name = node.name.removesuffix("_int").removesuffix(".svd_a")
            out.setdefault(name, []).append((node.op_type, weight(node.input[1]) or weight(node.input[0]), macs[node.name]))
    return out


def _export_priced(task, variables, plan, config, out):
    """Export `plan` and check what every factorized export must hold: ONNX agrees with Flax and
    reloads exactly, nothing is kept back, every layer's ONNX MACs are the cost model's and the
    stored bits the size breakdown's quantized stage = the cost model's size. Returns (layers,
    config.json's layers, size.json, {layer: [(op, weight dims, MACs)]})."""
    engine = Engine(task, variables, config)
    layers = engine.layers
    r = export_plan(task, variables, plan, out, engine=engine, profile="xeon")
    # quantized activations: a value within float rounding of a grid boundary may round one level
    # the other way in onnxruntime (its AVX-512 kernels sum in another order than XLA's)
    tol = 1e-4 if np.all(np.asarray(plan.act_bits) > 8) else 5e-3
    assert r.onnx_agreement >= 0.999 and r.onnx_max_abs_diff < tol and r.reload_quality == r.quality
    assert r.config["onnx_kept_back"] == []
    cost = price("xeon", layers, P.stack_plans([plan]))
    size = json.loads((out / "size.json").read_text())
    pairs = _onnx_pairs(out / "model.onnx", layers)
    for l in layers:
        assert sum(n[2] for n in pairs[l.name]) == pytest.approx(float(cost.layer_macs[0, l.index]), rel=1e-9), l.name
    assert size["total"]["bits_by_stage"]["quantized"] == pytest.approx(float(cost.size_kb[0]) * 8192, rel=1e-9)
    for l, c in zip(layers, r.config["layers"]):
        # config.json's held weights are size.json's and the ONNX model's weight elements
        assert c["held_weights"] == size["layers"][l.name]["held"] == sum(int(np.prod(n[1])) for n in pairs[l.name]), l.name
    return layers, r.config, size, pairs


@pytest.mark.parametrize("arch", ["lenet300", "convbn"])
def test_factorized_layers_export_as_priced_pairs(arch, tmp_path):
    # the engines' settings are test_export.py's and test_export_cnn.py's: in a whole run, compiled there
    if arch == "lenet300":  # 64 -> 300 -> 100 -> 10: fc1 factorizes on its left side, fc2 on its right
        task = models.get_task("lenet300", "digits")
        variables = task.init_variables()
        # int8: A on integer kernels, B in float (its input is not quantized), fc2 channel-pruned
        plan = P.make_plan([0.0, 0.5, 0.0], [U, C, U], 8, 8, rank=[0.25, 0.5, 1.0])
        want_r = {"fc1": 16, "fc2": 50}
        config = FinetuneConfig(steps=0, k=1)
    else:  # conv(1->4) + BN, conv(4->6, stride 2) + BN, flatten, Dense: every layer factorized
        task, variables = _task("convbn")
        plan = P.make_plan([0.5, 0.0, 0.0], [C, U, U], 32, 32, rank=[0.5, 0.5, 0.5])
        want_r = {"c1": 2, "c2": 3, "fc": 5}
        config = FinetuneConfig(steps=0, k=1, calib_examples=64)
    layers, cfg, size, pairs = _export_priced(task, variables, plan, config, tmp_path / arch)
    for l, c in zip(layers, cfg["layers"]):
        nodes = pairs[l.name]
        if l.name not in want_r:
            assert len(nodes) == 1 and c["rank"] is None and c["storage"] != "lowrank"
            continue
        rank = want_r[l.name]
        assert (c["rank_ratio"], c["rank"], c["form"], c["storage"]) == (float(plan.rank[l.index]), rank, "svd", "lowrank")
        (op_a, dims_a, _), (op_b, dims_b, _) = nodes
        kept = c["onnx_out_channels"]
        if l.kind == "dense":  # MatMul [fan_in, r] then MatMul [r, out]
            assert op_a.startswith("MatMul") and op_b == "MatMul" and dims_a[1] == rank and dims_b == (rank, kept)
        else:  # Conv [r, cin, kh, kw] then a 1x1 Conv [out, r, 1, 1]
            assert op_a == op_b == "Conv" and dims_a[0] == rank and dims_a[2:] == tuple(l.kernel_shape[:2])
            assert dims_b == (kept, rank, 1, 1)
        assert size["layers"][l.name]["rank"] == rank
    if arch == "lenet300":
        assert cfg["onnx_float_factors"] == ["fc1", "fc2"] and cfg["layers"][1]["onnx_out_channels"] == 50
        # fc2's packed factors hold A [300, 50] and B's 50 kept columns (a mask drops the 50
        # removed ones: 2,500 values of 8 bits against a 5,000-bit mask), as the model does
        assert (cfg["layers"][1]["kept_weights"], cfg["layers"][1]["held_weights"]) == (17_500, 17_500)
        assert [c["onnx_factor_form"] for c in cfg["layers"]] == ["MatMulInteger", "MatMulInteger", None]
        assert [c["onnx_form"] for c in cfg["layers"]] == ["float", "float", "MatMulInteger"]


SP, KR = P.SPATIAL, P.KRONECKER


@pytest.mark.parametrize("arch", ["lenet300", "convbn"])
def test_spatial_and_kronecker_forms_export_as_priced_pairs(arch, tmp_path):
    """lenet300: fc1 (64 = 8*8 -> 300 = 15*20) as r = 6 Kronecker products, fc2 SVD at int8
    with half its channels; convbn: both 3x3 convs in the spatial form (c1 channel-pruned, so
    c2's first factor loses input rows; int8, so it runs on integer kernels), the Dense
    (96 = 8*12 -> 10 = 2*5) as r = 4 Kronecker products."""
    if arch == "lenet300":
        task = models.get_task("lenet300", "digits")
        variables = task.init_variables()
        plan = P.make_plan([0.0, 0.5, 0.0], [U, C, U], 8, 8, rank=[0.05, 0.5, 1.0], form=[KR, P.SVD, P.SVD])
        want = {"fc1": (6, "kronecker"), "fc2": (50, "svd")}  # fc1: R(W) is [8*15, 8*20], d = 120
        config = FinetuneConfig(steps=0, k=1)
    else:
        task, variables = _task("convbn")
        plan = P.make_plan([0.5, 0.0, 0.0], [C, U, U], 8, 8, rank=[0.67, 0.5, 0.25], form=[SP, SP, KR])
        want = {"c1": (2, "spatial"), "c2": (6, "spatial"), "fc": (4, "kronecker")}  # d = 3, 12 and 16
        config = FinetuneConfig(steps=0, k=1, calib_examples=64)
    layers, cfg, size, pairs = _export_priced(task, variables, plan, config, tmp_path / arch)
    for l, c in zip(layers, cfg["layers"]):
        nodes = pairs[l.name]
        if l.name not in want:
            assert len(nodes) == 1 and c["rank"] is None
            continue
        rank, form = want[l.name]
        assert (c["rank"], c["form"], c["storage"]) == (rank, form, "lowrank"), l.name
        assert size["layers"][l.name]["rank"] == rank and size["layers"][l.name]["form"] == form
        (op_a, dims_a, _), (op_b, dims_b, _) = nodes
        kept = c["onnx_out_channels"]
        if form == "kronecker":  # B_i stacked [r, m2, n2], then A_i^T stacked [n1, r * m1]
            (m1, n1), (m2, n2) = c["kronecker"]["a"], c["kronecker"]["b"]
            assert (op_a, op_b) == ("MatMul", "MatMul") and dims_a == (rank, m2, n2) and dims_b == (n1, rank * m1)
            assert m1 * m2 == l.fan_in and n1 * n2 == l.out_channels
        elif form == "spatial":  # [r, cin, kh, 1] then [out, r, 1, kw]
            kh, kw, cin, _ = l.kernel_shape
            assert op_a in ("Conv", "ConvInteger") and op_b == "Conv"
            assert dims_a[0] == rank and dims_a[2:] == (kh, 1) and dims_b == (kept, rank, 1, kw)
    if arch == "convbn":  # int8 spatial first factors on integer kernels; Kronecker's run in float
        assert [c["onnx_factor_form"] for c in cfg["layers"]][:2] == ["ConvInteger", "ConvInteger"]
        assert cfg["layers"][2]["onnx_factor_form"] == "float"
