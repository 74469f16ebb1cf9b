"""Deep Compression size breakdown on hand-made kernels whose sizes are counted by hand."""
import math

import numpy as np
import pytest

from search.export import size


def test_huffman_of_a_known_distribution():
    # counts 4, 2, 1, 1: code lengths 1, 2, 3, 3 -> 4*1 + 2*2 + 1*3 + 1*3 = 14 bits (entropy 1.75 bits)
    symbols = list("aaaabbcd")
    lengths = size.huffman_code_lengths({"a": 4, "b": 2, "c": 1, "d": 1})
    assert lengths == {"a": 1, "b": 2, "c": 3, "d": 3}
    assert size.huffman_bits(symbols) == 14
    # one symbol still costs one bit each; uniform over 4 symbols costs 2 bits each
    assert size.huffman_bits(np.zeros(10)) == 10
    assert size.huffman_bits(np.arange(8) % 4) == 16


def test_huffman_is_prefix_free_and_within_one_bit_of_entropy():
    rng = np.random.default_rng(0)
    sym = rng.choice(16, size=5000, p=np.r_[0.5, np.full(15, 0.5 / 15)])
    counts = np.bincount(sym)
    lengths = size.huffman_code_lengths(dict(enumerate(counts.tolist())))
    assert sum(2.0 ** -v for v in lengths.values()) <= 1.0 + 1e-12  # Kraft inequality
    p = counts / counts.sum()
    entropy = -(p * np.log2(p)).sum() * counts.sum()
    assert entropy <= size.huffman_bits(sym) < entropy + counts.sum()


def test_relative_gaps_insert_padding_zeros():
    # kept at 0, 3, 19 of 20; gaps 1, 3, 16; 2-bit indices span 4: 16 -> three padding entries + 4
    mask = np.zeros(20, bool)
    mask[[0, 3, 19]] = True
    gaps, pads = size.relative_gaps(mask, 2)
    assert pads == 3
    assert sorted(gaps.tolist()) == sorted([1, 3, 4, 4, 4, 4])


def _kernel(rows: np.ndarray) -> np.ndarray:
    """[out, fan_in] rows -> Flax Dense kernel [in, out]."""
    return np.ascontiguousarray(rows.T)


def test_breakdown_of_a_tiny_layer_counts_every_bit():
    # 2 outputs x 8 inputs, kept: flat positions 7 and 8; 2-bit uniform codes +1 and -1
    rows = np.zeros((2, 8), np.float32)
    rows[0, 7], rows[1, 0] = 0.7, -0.7
    b = size.size_breakdown(_kernel(rows), _kernel(rows != 0), 2, index_bits=2)
    assert (b["weights"], b["nonzero"], b["padding"]) == (16, 2, 1)  # gap 8 > span 4: one pad
    bits = b["bits_by_stage"]
    assert bits["dense"] == 16 * 32
    # fp32: dense 512, relative 3 * (32 + 2) = 102, bitmask 2 * 32 + 16 = 80
    assert b["format"]["pruned"] == "bitmask" and bits["pruned"] == 80
    # 2 bits: dense 32, relative 3 * (2 + 2) = 12, bitmask 4 + 16 = 20; plus 2 fp32 scales
    assert b["format"]["quantized"] == "relative" and bits["quantized"] == 12 + 64
    # Huffman tables cost more than they save here: fixed-length codes are kept
    assert bits["huffman"] == bits["quantized"] and "fixed-length" in b["format"]["huffman"]
    assert b["ratio"]["pruned"] == pytest.approx(512 / 80)
    assert b["bytes_by_stage"]["quantized"] == 10  # ceil(76 / 8)
    # at 4 bits the quantized form (relative 3 * (4 + 2) = 18, + 64 scales = 82) is larger than
    # fp32 (80): the layer is stored float32, as the cost model prices it
    b4 = size.size_breakdown(_kernel(rows), _kernel(rows != 0), 4, index_bits=2)
    assert b4["bits_by_stage"]["quantized"] == 80 and b4["format"]["quantized"].startswith("bitmask (float32")
    assert b4["parts"]["quantized"]["codebook"] == 0


def test_breakdown_at_90_percent_sparsity_with_skewed_codes():
    # 1 output x 1000 inputs, every 10th kept (gaps 1, then 99 x 10): codes 50 x +7, 25 x -7, 25 x +3
    q = np.zeros(1000)
    q[0:500:10], q[500:750:10], q[750:1000:10] = 7, -7, 3
    kernel = _kernel((q * 0.01)[None, :].astype(np.float32))
    b = size.size_breakdown(kernel, kernel != 0, 4)  # Dense: 5-bit indices (span 32, no padding)
    bits = b["bits_by_stage"]
    assert (b["nonzero"], b["padding"], b["index_bits"]) == (100, 0, 5)
    assert bits["pruned"] == 100 * (32 + 5)  # relative beats bitmask 100 * 32 + 1000
    assert bits["quantized"] == 100 * (4 + 5) + 32  # one scale
    # values: lengths 1, 2, 2 -> 50 + 50 + 50 = 150, table 3 bytes; gaps {1: 1, 10: 99} -> 100, table 2 bytes
    assert b["format"]["huffman"] == "relative"
    assert b["parts"]["huffman"]["values"] == 150 + 24
    assert b["parts"]["huffman"]["index"] == 100 + 16
    assert bits["huffman"] == 150 + 24 + 100 + 16 + 32
    r = b["ratio"]
    assert r["pruned"] < r["quantized"] < r["huffman"]
    assert r["huffman"] == pytest.approx(32000 / 322)


def test_codebook_and_unquantized_kernels():
    rng = np.random.default_rng(1)
    centroids = np.array([-0.5, -0.1, 0.2, 0.6], np.float32)
    w = centroids[rng.integers(0, 4, size=(6, 5, 3, 8))]  # a conv kernel: 8-bit indices by default
    mask = rng.random(w.shape) > 0.7
    b = size.size_breakdown(np.where(mask, w, 0), mask, 2, quant_mode="codebook")
    assert b["kind"] == "conv" and b["index_bits"] == 8
    assert b["parts"]["quantized"]["codebook"] == 4 * 32
    with pytest.raises(ValueError, match="distinct"):
        size.size_breakdown(np.where(mask, w, 0), mask, 1, quant_mode="codebook")
    with pytest.raises(ValueError, match="not 4-bit"):
        size.size_breakdown(rng.normal(size=(8, 4)), None, 4)
    # float32 kept: quantized stage equals pruned, bias counted fp32 at every stage
    f = size.size_breakdown(rng.normal(size=(8, 4)), None, 32, bias=np.zeros(4))
    assert f["bits_by_stage"]["quantized"] == f["bits_by_stage"]["pruned"] == 32 * 32 + 4 * 32


def test_total_breakdown_sums_layers():
    a = size.size_breakdown(np.eye(4, dtype=np.float32), None, 32)
    t = size.total_breakdown({"a": a, "b": a}, other_params=10)
    assert t["bits_by_stage"]["dense"] == 2 * 16 * 32 + 320
    assert t["ratio"]["dense"] == 1.0


def test_channel_pruning_stores_a_smaller_matrix():
    # 8 output channels of fan-in 10, channels 0 and 5 kept: rows format = 2 * 10 * 32 + 8 bits;
    # bitmask 20 * 32 + 80 = 720; relative 21 entries (one pad for the gap of 41) * 37 = 777
    rows = np.zeros((8, 10), np.float32)
    rows[[0, 5]] = np.arange(1, 21).reshape(2, 10) / 20
    b = size.size_breakdown(_kernel(rows), None, 32)
    assert b["padding"] == 1
    assert b["format"]["pruned"] == "rows" and b["bits_by_stage"]["pruned"] == 2 * 10 * 32 + 8


# ---------------------------------------------------------------- the export's breakdown vs the cost model

from search.compression import plan as P  # noqa: E402
from search.cost.roofline import price  # noqa: E402
from search.compression.layers import Layer  # noqa: E402


def _dense(i: int, n_in: int, n_out: int, in_shape=None, reads=None, in_repeat=1) -> Layer:
    """Reading the previous layer's channels unless `reads` says otherwise (graph.Coupling)."""
    return Layer(i, f"l{i}", (f"l{i}",), "dense", (n_in, n_out), in_shape or (n_in,), (n_out,), 1, True,
                 n_in * n_out, n_in * n_out + n_out, reads=reads or ((i - 1, n_in),), in_repeat=in_repeat)


def _conv(i: int, hw: int, cin: int, cout: int) -> Layer:
    return Layer(i, f"l{i}", (f"l{i}",), "conv", (3, 3, cin, cout), (hw, hw, cin), (hw, hw, cout), 1, True,
                 hw * hw * 9 * cin * cout, 9 * cin * cout + cout, reads=((i - 1, cin),))


def _rows_mask(rng, layer: Layer, g: int, r: float, in_keep: np.ndarray) -> np.ndarray:
    """A mask [out, fan_in] with the cost model's exact counts: channel keeps (1 - r) of the
    outputs; unstructured keeps (1 - r) of each output's held fan-in (spread, no long gaps) and
    as many of its other rows (they read removed channels); N:M keeps the same count per group."""
    out, fan_in = layer.out_channels, layer.fan_in
    m = np.ones((out, fan_in), bool)
    if g == P.CHANNEL:
        m[out - round(r * out):] = False  # the last channels: a 2:4 consumer keeps whole groups
    elif g == P.UNSTRUCTURED and r > 0:
        for rows in (np.flatnonzero(in_keep), np.flatnonzero(~in_keep)):
            for o in range(out):  # every other held weight, shifted per output: density exactly 1 - r = 0.5
                m[o, rows[(np.arange(len(rows)) + o) % 2 == 1]] = False
    elif g == P.NM:
        groups = m.reshape(out, -1, P.NM_GROUP)
        groups[:, :, : round(r * P.NM_GROUP)] = False
    return m


def _model(rng, layers, plan):
    """Effective params (kernels on their bit grid, masked) and masks for a plan, built by hand."""
    params, masks, prev_keep = {}, {}, None
    for l in layers:
        i = l.index
        g, r, b, qm = (int(plan.granularity[i]), float(plan.ratio[i]), int(plan.weight_bits[i]), int(plan.quant_mode[i]))
        in_keep = np.ones(l.fan_in, bool) if prev_keep is None else np.tile(prev_keep, l.fan_in // prev_keep.size)
        m = _rows_mask(rng, l, g, r, in_keep)
        if b >= P.FLOAT:
            w = rng.normal(size=m.shape) + 0.01
        elif qm == P.CODEBOOK:
            w = rng.choice(np.linspace(-1, 1, 2**b + 1)[1:], size=m.shape)
        else:
            qmax = 2 ** (b - 1) - 1
            q = rng.integers(1, qmax + 1, size=m.shape) * rng.choice([-1, 1], size=m.shape)
            q[np.arange(m.shape[0]), np.argmax(m, axis=1)] = qmax  # every row reaches its scale
            w = q * rng.uniform(0.01, 0.1, size=(m.shape[0], 1))
        w = np.where(m, w, 0.0).astype(np.float32)
        params[l.name] = {"kernel": w.T.reshape(l.kernel_shape), "bias": rng.normal(size=l.out_channels).astype(np.float32)}
        masks[l.name] = m.T.reshape(l.kernel_shape).astype(np.float32)
        prev_keep = m.any(axis=1) if g == P.CHANNEL else np.ones(l.out_channels, bool)
    return params, masks


def _modes(plan) -> list[str]:
    return ["float" if b >= P.FLOAT else ("codebook" if q == P.CODEBOOK and b <= 8 else "uniform")
            for b, q in zip(plan.weight_bits, plan.quant_mode)]


MLP = (_dense(0, 16, 12), _dense(1, 12, 8), _dense(2, 8, 4))
CNN = (_conv(0, 6, 2, 4), _dense(1, 144, 8, in_shape=(144,), reads=((0, 4),), in_repeat=36), _dense(2, 8, 4))
U, C, N = P.UNSTRUCTURED, P.CHANNEL, P.NM
AGREE = [
    # channel-pruned producer, unstructured consumer (its rows from removed channels go), dense tail
    (MLP, P.make_plan([0.5, 0.5, 0.0], [C, U, U], [4, 4, 8], [8, 8, 8], [0, 0, 0])),
    # codebook producer, channel consumer of a channel producer, 2:4 tail on the held group
    (MLP, P.make_plan([0.25, 0.5, 0.5], [C, C, N], [3, 2, 4], [8, 8, 8], [1, 0, 0])),
    # float32 everywhere: pruning alone; an 8-bit codebook tail too small to beat float32
    (MLP, P.make_plan([0.5, 0.75, 0.0], [C, C, U], [32, 32, 8], [8, 8, 8], [0, 0, 1])),
    # conv -> flatten -> dense: the dense loses every spatial copy of the removed conv channels
    (CNN, P.make_plan([0.5, 0.5, 0.0], [C, U, U], [5, 6, 32], [8, 8, 8], [0, 0, 0])),
]


@pytest.mark.parametrize("layers,plan", AGREE)
def test_quantized_stage_is_the_cost_model_size(layers, plan):
    """The export's quantized stage and the cost model's size_kb are one quantity: exactly equal
    when the masks have the counts the cost model assumes (real masks differ only by the
    rounding and padding documented in ARCHITECTURE.md)."""
    rng = np.random.default_rng(0)
    params, masks = _model(rng, layers, plan)
    bd = size.model_breakdown(layers, params, masks, plan, _modes(plan))
    cost_bits = float(price("xeon", layers, P.stack_plans([plan])).size_kb[0]) * 1024 * 8
    assert bd["total"]["bits_by_stage"]["quantized"] == pytest.approx(cost_bits, rel=1e-9)
    assert bd["total"]["bytes_by_stage"]["quantized"] == math.ceil(round(cost_bits) / 8)
    # the consumer of the channel-pruned first layer holds only the rows of its kept channels
    l0, l1 = (bd["layers"][l.name] for l in layers[:2])
    assert l1["channels"]["fan_in"][0] == l1["channels"]["fan_in"][1] * l0["channels"]["out"][0] // l0["channels"]["out"][1]
    assert l1["held"] == l1["channels"]["fan_in"][0] * l1["channels"]["out"][0]


def test_counting_the_removed_input_rows_breaks_the_agreement(monkeypatch):
    """Guard: the agreement above fails if a consumer's rows from removed channels are counted."""
    layers, plan = AGREE[0]
    params, masks = _model(np.random.default_rng(0), layers, plan)
    cost_bits = float(price("xeon", layers, P.stack_plans([plan])).size_kb[0]) * 1024 * 8
    held = size.held_channels
    monkeypatch.setattr(size, "held_channels", lambda *a: {k: (ok, np.ones_like(ik)) for k, (ok, ik) in held(*a).items()})
    bd = size.model_breakdown(layers, params, masks, plan, _modes(plan))
    assert bd["layers"]["l1"]["held"] == 12 * 8  # every input row
    assert bd["total"]["bits_by_stage"]["quantized"] > cost_bits + 100


@pytest.mark.parametrize("ratio", [0.96, 0.98])
def test_the_cost_model_counts_the_relative_index_padding_of_very_sparse_layers(ratio):
    """At 96-98% sparsity a 5-bit relative index needs padding entries (gaps past 32 positions):
    the export counts them on its mask, the cost model in expectation (roofline.relative_padding).
    A random mask with the plan's exact count: the two agree within 3%, where leaving the
    padding out would price the layer 25-60% small."""
    layer = _dense(0, 800, 100, reads=((-1, 800),))
    plan = P.make_plan([ratio], U, [5], [8])
    rng = np.random.default_rng(1)
    m = np.zeros(800 * 100, bool)
    m[rng.choice(m.size, round((1 - ratio) * m.size), replace=False)] = True
    m = m.reshape(100, 800)
    q = rng.integers(1, 16, size=m.shape) * rng.choice([-1, 1], size=m.shape)
    q[np.arange(100), np.argmax(m, axis=1)] = 15
    w = np.where(m, q * 0.01, 0.0).astype(np.float32)
    params = {"l0": {"kernel": w.T, "bias": np.zeros(100, np.float32)}}
    bd = size.model_breakdown([layer], params, {"l0": m.T.astype(np.float32)}, plan, ["uniform"])
    layer_bd = bd["layers"]["l0"]
    assert layer_bd["format"]["quantized"] == "relative" and layer_bd["padding"] > 0.25 * layer_bd["nonzero"]
    cost_bits = float(price("xeon", [layer], P.stack_plans([plan])).size_kb[0]) * 1024 * 8
    assert cost_bits == pytest.approx(bd["total"]["bits_by_stage"]["quantized"], rel=0.03)
    from search.cost.roofline import relative_padding

    unpadded = cost_bits - float(relative_padding(layer_bd["nonzero"], 1 - ratio)) * (5 + 5)  # the model before
    assert bd["total"]["bits_by_stage"]["quantized"] > 1.2 * unpadded
