"""Deep Compression size breakdown on hand-made kernels whose sizes are counted by hand."""
import numpy as np
import pytest

from search import size


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
    # 2 outputs x 8 inputs, kept: flat positions 7 and 8; 4-bit uniform codes +7 and -7
    rows = np.zeros((2, 8), np.float32)
    rows[0, 7], rows[1, 0] = 0.7, -0.7
    b = size.size_breakdown(_kernel(rows), _kernel(rows != 0), 4, index_bits=2)
    assert (b["weights"], b["nonzero"], b["padding"]) == (16, 2, 1)  # gap 8 > span 4: one pad
    bits = b["bits_by_stage"]
    assert bits["dense"] == 16 * 32
    # fp32: dense 512, relative 3 * (32 + 2) = 102, bitmask 2 * 32 + 16 = 80
    assert b["format"]["pruned"] == "bitmask" and bits["pruned"] == 80
    # 4 bits: dense 64, relative 3 * (4 + 2) = 18, bitmask 8 + 16 = 24; plus 2 fp32 scales
    assert b["format"]["quantized"] == "relative" and bits["quantized"] == 18 + 64
    # Huffman tables cost more than they save here: fixed-length codes are kept
    assert bits["huffman"] == bits["quantized"] and "fixed-length" in b["format"]["huffman"]
    assert b["ratio"]["pruned"] == pytest.approx(512 / 80)
    assert b["bytes_by_stage"]["quantized"] == 11  # ceil(82 / 8)


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
