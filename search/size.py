"""Model size in the manner of Deep Compression (Han et al., 2016): dense fp32, after pruning,
after quantization, after Huffman coding; sizes in bits, ratios against dense fp32.

Sparse storage. A pruned kernel is stored in the cheapest of four formats, chosen per stage:
  * "dense":    every weight, zeros included, no index;
  * "relative": Deep Compression's format. Kept weights are visited in order (the kernel as
                [out, fan_in], row-major, so one output unit's fan-in is contiguous); each
                stores its value and the gap to the previous kept weight in `index_bits` bits.
                A gap of g is stored as g - 1, so one index spans at most 2**index_bits; a
                longer gap gets padding zeros (a zero value with the largest gap) first:
                ceil(g / 2**index_bits) - 1 of them. Defaults follow the paper: 5-bit indices
                for fully connected layers, 8-bit for convolutions;
  * "bitmask":  one bit per weight saying kept or not, then the kept values;
  * "rows":     one bit per output channel, then every value of the kept channels (what
                channel pruning gives: a smaller dense matrix).
Quantization. Values take `bits` bits (32: float32, untouched). Uniform mode adds one fp32
scale per output channel; codebook mode a table of 2**bits fp32 centroids.
Huffman. A real Huffman code (heapq) over the quantized value codes, and over the index gaps
when the relative format is used; each coded stream also pays a canonical code table of one
byte (the code length) per symbol. Float32 values are not Huffman coded (as in the paper);
when the tables cost more than the code saves (tiny layers), the fixed-length codes are kept.
A bias, when given, is stored as fp32 at every stage.
"""
from __future__ import annotations

import heapq
import math
from collections import Counter
from typing import Iterable, Mapping, Sequence

import numpy as np

FLOAT_BITS = 32
DEFAULT_INDEX_BITS = {"dense": 5, "conv": 8}  # Deep Compression, section 2
TABLE_BITS_PER_SYMBOL = 8  # canonical Huffman: one code length per symbol
STAGES = ("dense", "pruned", "quantized", "huffman")


def huffman_code_lengths(counts: Mapping[object, int]) -> dict[object, int]:
    """Code length per symbol of a Huffman code for these symbol counts (one symbol: 1 bit)."""
    items = [(int(c), i, s) for i, (s, c) in enumerate(counts.items()) if c > 0]
    if not items:
        return {}
    if len(items) == 1:
        return {items[0][2]: 1}
    # heap entries: (count, tie-breaker, symbols in this subtree); every merge adds one bit
    heap = [(c, i, [s]) for c, i, s in items]
    heapq.heapify(heap)
    lengths = {s: 0 for _, _, s in items}
    tie = len(items)
    while len(heap) > 1:
        c1, _, s1 = heapq.heappop(heap)
        c2, _, s2 = heapq.heappop(heap)
        for s in s1 + s2:
            lengths[s] += 1
        heapq.heappush(heap, (c1 + c2, tie, s1 + s2))
        tie += 1
    return lengths


def huffman_bits(symbols: Iterable[object] | np.ndarray) -> int:
    """Bits of the Huffman-coded stream of these symbols (payload only, no table)."""
    counts = Counter(np.asarray(symbols).ravel().tolist())
    lengths = huffman_code_lengths(counts)
    return int(sum(counts[s] * lengths[s] for s in counts))


def relative_gaps(flat_mask: np.ndarray, index_bits: int) -> tuple[np.ndarray, int]:
    """Stored gap symbols (padding entries included) and the number of padding zeros.

    Positions p_0 < p_1 < ... of the kept weights, with p_-1 = -1, give gaps g_i = p_i - p_(i-1).
    A gap longer than span = 2**index_bits is split into padding entries of gap `span`
    followed by the remainder.
    """
    pos = np.flatnonzero(np.asarray(flat_mask, bool).ravel())
    gaps = np.diff(np.concatenate([[-1], pos]))
    span = 1 << index_bits
    pads = (gaps - 1) // span  # = ceil(g / span) - 1
    last = gaps - pads * span
    symbols = np.concatenate([np.repeat(np.full(len(gaps), span), pads).astype(np.int64), last])
    # order is irrelevant for the Huffman size; keep the multiset
    return symbols, int(pads.sum())


def quantized_codes(values: np.ndarray, bits: int, quant_mode: str = "uniform",
                    mask: np.ndarray | None = None) -> np.ndarray:
    """Integer codes [out, fan_in] of a fake-quantized kernel given as [out, fan_in] floats.

    Uniform b >= 2: q = round(w / scale), scale = max|w| / (2**(b-1) - 1) per output row
    (a pruned weight is q = 0); b == 1: the sign; codebook: the index of each kept value among
    the layer's distinct kept values, pruned weights one extra code. Raises ValueError when
    the kernel is not quantized at `bits` (more distinct values than allowed).
    """
    w = np.asarray(values, np.float64)
    m = (w != 0) if mask is None else np.asarray(mask, bool)
    if quant_mode == "codebook":
        uniq, inv = np.unique(w[m], return_inverse=True)
        if len(uniq) > 2**bits:
            raise ValueError(f"kernel has {len(uniq)} distinct kept values, more than a {bits}-bit codebook holds")
        codes = np.full(w.shape, len(uniq), np.int64)
        codes[m] = inv.reshape(-1)
        return codes
    if bits == 1:
        return np.sign(w).astype(np.int64)
    qmax = 2 ** (bits - 1) - 1
    scale = np.abs(w).max(axis=1, keepdims=True) / qmax
    q = np.round(np.divide(w, scale, out=np.zeros_like(w), where=scale > 0))
    if np.abs(w - q * scale).max(initial=0.0) > 1e-4 * max(float(np.abs(w).max(initial=0.0)), 1e-12):
        raise ValueError(f"kernel is not {bits}-bit uniform quantized per output channel")
    return q.astype(np.int64)


def _as_rows(a: np.ndarray) -> np.ndarray:
    """Kernel [..., out] (Flax layout) -> [out, fan_in]."""
    a = np.asarray(a)
    return a.reshape(-1, a.shape[-1]).T if a.ndim > 1 else a.reshape(1, -1)


def _cheapest(options: dict[str, tuple[int, int]]) -> tuple[str, int, int]:
    """Pick the format with the fewest total bits; options map name -> (value bits, index bits)."""
    name = min(options, key=lambda k: (sum(options[k]), k))
    return name, *options[name]


def size_breakdown(kernel_values: np.ndarray, mask: np.ndarray | None, bits: int, *,
                   quant_mode: str = "uniform", index_bits: int | None = None,
                   bias: np.ndarray | None = None) -> dict:
    """Deep Compression size breakdown of one layer.

    kernel_values: the effective kernel (masked and fake-quantized, Flax layout [..., out]);
    mask: kept weights (None: the nonzeros of the kernel); bits: weight bit width (32 = float).
    Returns per-stage bits/bytes, their parts (values, index, codebook, tables), the index
    format chosen at each stage and the ratio dense / stage.
    """
    w = _as_rows(kernel_values)
    m = (w != 0) if mask is None else _as_rows(np.asarray(mask, bool))
    if m.shape != w.shape:
        raise ValueError(f"mask shape {np.shape(mask)} differs from kernel shape {np.shape(kernel_values)}")
    kind = "conv" if np.ndim(kernel_values) > 2 else "dense"
    ib = DEFAULT_INDEX_BITS[kind] if index_bits is None else int(index_bits)
    n, out = w.size, w.shape[0]
    flat_m = m.ravel()
    nnz = int(flat_m.sum())
    gaps, pads = relative_gaps(flat_m, ib)
    extra = 0 if bias is None else FLOAT_BITS * int(np.size(bias))

    rows_kept = m.any(axis=1)
    n_rows = int(rows_kept.sum())

    def formats(vbits: int) -> dict[str, tuple[int, int]]:
        return {"dense": (n * vbits, 0), "relative": ((nnz + pads) * vbits, (nnz + pads) * ib),
                "bitmask": (nnz * vbits, n), "rows": (n_rows * w.shape[1] * vbits, out)}

    p_fmt, p_val, p_idx = _cheapest(formats(FLOAT_BITS))
    if bits >= FLOAT_BITS:
        q_fmt, q_val, q_idx, book = p_fmt, p_val, p_idx, 0
        codes = None
    else:
        q_fmt, q_val, q_idx = _cheapest(formats(bits))
        book = FLOAT_BITS * (2**bits if quant_mode == "codebook" else out)
        codes = quantized_codes(w, bits, quant_mode, m)

    # Huffman: value codes (kept weights, plus padding zeros in the relative format) and gaps
    if codes is None:
        h_opts = formats(FLOAT_BITS)
        h_opts["relative"] = (h_opts["relative"][0], huffman_bits(gaps) + _table(gaps))
    else:
        flat_c = codes.ravel()
        zero_code = _zero_code(codes, m)
        kept = flat_c[flat_m]
        with_pads = np.concatenate([kept, np.full(pads, zero_code, kept.dtype)])
        h_opts = {"dense": (huffman_bits(flat_c) + _table(flat_c), 0),
                  "relative": (huffman_bits(with_pads) + _table(with_pads), huffman_bits(gaps) + _table(gaps)),
                  "bitmask": (huffman_bits(kept) + _table(kept), n)}
        in_rows = codes[rows_kept].ravel()
        h_opts["rows"] = (huffman_bits(in_rows) + _table(in_rows), out)
    h_fmt, h_val, h_idx = _cheapest(h_opts)
    if q_val + q_idx <= h_val + h_idx:  # the code tables cost more than they save: keep fixed length
        h_fmt, h_val, h_idx = q_fmt + " (fixed-length)", q_val, q_idx
    stage_bits = {
        "dense": FLOAT_BITS * n + extra,
        "pruned": p_val + p_idx + extra,
        "quantized": q_val + q_idx + book + extra,
        "huffman": h_val + h_idx + book + extra,
    }
    return {
        "kind": kind, "weights": n, "nonzero": nnz, "padding": pads, "index_bits": ib, "bits": int(bits),
        "quant_mode": quant_mode,
        "format": {"pruned": p_fmt, "quantized": q_fmt, "huffman": h_fmt},
        "parts": {"pruned": {"values": p_val, "index": p_idx},
                  "quantized": {"values": q_val, "index": q_idx, "codebook": book},
                  "huffman": {"values": h_val, "index": h_idx, "codebook": book},
                  "bias": extra},
        **_totals(stage_bits),
    }


def _table(symbols: np.ndarray) -> int:
    """Canonical Huffman table: one code length per distinct symbol."""
    return TABLE_BITS_PER_SYMBOL * len(np.unique(np.asarray(symbols)))


def _zero_code(codes: np.ndarray, mask: np.ndarray) -> int:
    """The code a padding zero takes: the code pruned weights have (0 when none is pruned)."""
    z = codes[~mask]
    return int(z.flat[0]) if z.size else 0


def _totals(stage_bits: Mapping[str, int]) -> dict:
    """Bits, bytes (rounded up) and the ratio dense / stage for each stage."""
    dense = stage_bits["dense"]
    return {
        "bits_by_stage": dict(stage_bits),
        "bytes_by_stage": {k: math.ceil(v / 8) for k, v in stage_bits.items()},
        "ratio": {k: (dense / v if v else math.inf) for k, v in stage_bits.items()},
    }


def total_breakdown(layers: Sequence[Mapping] | Mapping[str, Mapping], other_params: int = 0) -> dict:
    """Sum layer breakdowns (a list or a {name: breakdown} dict) into model totals.

    `other_params` counts parameters outside the compressed layers, stored fp32 at every stage.
    """
    items = list(layers.values()) if isinstance(layers, Mapping) else list(layers)
    stage_bits = {s: FLOAT_BITS * int(other_params) + sum(int(b["bits_by_stage"][s]) for b in items) for s in STAGES}
    return {"weights": sum(int(b["weights"]) for b in items),
            "nonzero": sum(int(b["nonzero"]) for b in items), **_totals(stage_bits)}
