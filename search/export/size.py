"""Model size in the manner of Deep Compression (Han et al., 2016): dense fp32, after pruning,
after quantization, after Huffman coding; sizes in bits, ratios against dense fp32.

What is counted. The dense stage is the whole original layer (kernel and bias, fp32). Every
later stage counts what the exported model holds (`held_channels`, `model_breakdown`): a
channel-pruned layer only its kept output channels (values, scales, biases), and a layer that
reads channel-pruned groups (search.compression.graph, as the cost model prices it) only
the fan-in rows of their kept channels; the ONNX export removes the rest (the
constant output of a removed channel folds into the consumer's bias, so it costs nothing).

Sparse storage. The held kernel is stored in the cheapest of these formats, chosen per stage:
  * "dense":    every weight, zeros included, no index;
  * "relative": Deep Compression's format. Kept weights are visited in order (the kernel as
                [out, fan_in], row-major, so one output unit's fan-in is contiguous); each
                stores its value and the gap to the previous kept weight in `index_bits` bits.
                A gap of g is stored as g - 1, so one index spans at most 2**index_bits; a
                longer gap gets padding zeros (a zero value with the largest gap) first:
                ceil(g / 2**index_bits) - 1 of them. `size_breakdown` defaults follow the
                paper (5-bit indices for fully connected layers, 8-bit for convolutions);
                `model_breakdown` (the export) uses the cost model's 5 bits for every layer;
  * "bitmask":  one bit per weight saying kept or not, then the kept values;
  * "rows":     one bit per output channel, then every value of the output channels that
                keep something;
  * "nm":       N:M pruned layers only: log2(M) bits per kept weight (its place in its group).
Quantization. Values take `bits` bits (32: float32, untouched). Uniform mode adds one fp32
scale per held output channel; codebook mode a table of min(2**bits, held weights) fp32
centroids. A layer whose quantized form is larger than its float32 form (tiny layers, big
codebooks) is stored float32, as the cost model prices it.
Huffman. A real Huffman code (heapq) over the quantized value codes, and over the index gaps
when the relative format is used; each coded stream also pays a canonical code table of one
byte (the code length) per symbol. Float32 values are not Huffman coded (as in the paper);
when the tables cost more than the code saves (tiny layers), the fixed-length codes are kept.
A bias, when given, is stored as fp32 at every stage (held channels only after the dense stage).
Factorized layers (search.compression.lowrank): every stage after dense counts the two factors
A [fan_in, r] (the held fan-in rows) and B [r, out] (the held output channels, and the bias),
each a layer of its own here (`factored_breakdown`), as the cost model prices the pair.
"""
from __future__ import annotations

import heapq
import math
from collections import Counter
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from search.compression import lowrank
from search.compression.groups import tie_plan
from search.compression.layers import get_path
from search.compression.plan import CHANNEL, NM, NM_GROUP
from search.compression.quant import grid_scales
from search.cost.roofline import REL_INDEX_BITS

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
                    mask: np.ndarray | None = None, scale: np.ndarray | None = None) -> np.ndarray:
    """Integer codes [out, fan_in] of a fake-quantized kernel given as [out, fan_in] floats.

    Uniform b >= 2: q = round(w / scale), scale per output row from `quant.grid_scales`, or
    the given `scale` [out] (the grid the engine fixed); a pruned weight is q = 0. b == 1: the
    sign; codebook: the index of each kept value among the layer's distinct kept values,
    pruned weights one extra code. Raises ValueError when
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
    if scale is None:
        scale = grid_scales(w.T, bits).astype(np.float64).reshape(-1, 1)
    else:  # the grid the engine fixed (its largest code need not be used)
        scale = np.asarray(scale, np.float64).reshape(-1, 1)
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
                   bias: np.ndarray | None = None, out_keep: np.ndarray | None = None,
                   in_keep: np.ndarray | None = None, nm_group: int | None = None,
                   scale: np.ndarray | None = None) -> dict:
    """Deep Compression size breakdown of one layer.

    kernel_values: the effective kernel (masked and fake-quantized, Flax layout [..., out]);
    mask: kept weights (None: the nonzeros of the kernel); bits: weight bit width (32 = float).
    out_keep (bool [out]) / in_keep (bool [fan_in]): the output channels and fan-in rows the
    exported model holds (None: all); removed channels store no values, scales or bias, and
    removed fan-in rows (inputs from a producer's removed channels) store nothing. The dense
    stage is the whole original layer. nm_group: the layer is N:M pruned in groups of this
    many fan-in weights, which offers the "nm" format (log2(M) bits per kept weight).
    scale: [out] scales of a uniform grid (`quantized_codes`), None to infer them.
    Returns per-stage bits/bytes, their parts (values, index, codebook, tables), the index
    format chosen at each stage and the ratio dense / stage.
    """
    w_all = _as_rows(kernel_values)
    m_all = (w_all != 0) if mask is None else _as_rows(np.asarray(mask, bool))
    if m_all.shape != w_all.shape:
        raise ValueError(f"mask shape {np.shape(mask)} differs from kernel shape {np.shape(kernel_values)}")
    ok = np.ones(w_all.shape[0], bool) if out_keep is None else np.asarray(out_keep, bool).ravel()
    ik = np.ones(w_all.shape[1], bool) if in_keep is None else np.asarray(in_keep, bool).ravel()
    if ok.shape != (w_all.shape[0],) or ik.shape != (w_all.shape[1],):
        raise ValueError(f"out_keep {ok.shape} / in_keep {ik.shape} do not match the kernel's [out, fan_in] {w_all.shape}")
    kind = "conv" if np.ndim(kernel_values) > 2 else "dense"
    ib = DEFAULT_INDEX_BITS[kind] if index_bits is None else int(index_bits)
    w, m = w_all[ok][:, ik], m_all[ok][:, ik]  # what the exported model holds
    n, out = w.size, w.shape[0]
    flat_m = m.ravel()
    nnz = int(flat_m.sum())
    gaps, pads = relative_gaps(flat_m, ib)
    b = None if bias is None else np.asarray(bias).ravel()
    extra = 0 if b is None else FLOAT_BITS * int(b[ok].size)
    dense_bits = FLOAT_BITS * (w_all.size + (0 if b is None else b.size))

    rows_kept = m.any(axis=1)
    n_rows = int(rows_kept.sum())
    nm_bits = _nm_index_bits(m, nm_group)

    def formats(vbits: int) -> dict[str, tuple[int, int]]:
        f = {"dense": (n * vbits, 0), "relative": ((nnz + pads) * vbits, (nnz + pads) * ib),
             "bitmask": (nnz * vbits, n), "rows": (n_rows * w.shape[1] * vbits, out)}
        if nm_bits is not None:
            f["nm"] = (nnz * vbits, nnz * nm_bits)
        return f

    p_fmt, p_val, p_idx = _cheapest(formats(FLOAT_BITS))
    codes, q_fmt, q_val, q_idx, book = None, p_fmt, p_val, p_idx, 0
    if bits < FLOAT_BITS:
        q_fmt, q_val, q_idx = _cheapest(formats(bits))
        # uniform: one scale per held output channel; codebook: 2**bits centroids (never more than weights)
        book = FLOAT_BITS * (min(2**bits, n) if quant_mode == "codebook" else out)
        if q_val + q_idx + book > p_val + p_idx:  # larger than float32 (tiny layers): stored float
            q_fmt, q_val, q_idx, book = p_fmt + " (float32, smaller than quantized)", p_val, p_idx, 0
        else:  # codes from whole rows (a row's scale is its max over the full fan-in)
            codes = quantized_codes(w_all[ok], bits, quant_mode, m_all[ok],
                                    None if scale is None else np.asarray(scale).ravel()[ok])[:, ik]

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
        if nm_bits is not None:
            h_opts["nm"] = (huffman_bits(kept) + _table(kept), nnz * nm_bits)
    h_fmt, h_val, h_idx = _cheapest(h_opts)
    if q_val + q_idx <= h_val + h_idx:  # the code tables cost more than they save: keep fixed length
        h_fmt, h_val, h_idx = q_fmt + " (fixed-length)", q_val, q_idx
    stage_bits = {
        "dense": dense_bits,
        "pruned": p_val + p_idx + extra,
        "quantized": q_val + q_idx + book + extra,
        "huffman": h_val + h_idx + book + extra,
    }
    return {
        "kind": kind, "weights": int(w_all.size), "held": n, "nonzero": nnz, "padding": pads,
        "channels": {"out": [int(ok.sum()), int(ok.size)], "fan_in": [int(ik.sum()), int(ik.size)]},
        "index_bits": ib, "bits": int(bits), "quant_mode": quant_mode,
        "format": {"pruned": p_fmt, "quantized": q_fmt, "huffman": h_fmt},
        "parts": {"pruned": {"values": p_val, "index": p_idx},
                  "quantized": {"values": q_val, "index": q_idx, "codebook": book},
                  "huffman": {"values": h_val, "index": h_idx, "codebook": book},
                  "bias": extra},
        **_totals(stage_bits),
    }


def factored_breakdown(form: int, a: np.ndarray, b: np.ndarray, kernel_shape: Sequence[int], bits: int, *,
                       quant_mode: str = "uniform", index_bits: int | None = None, bias: np.ndarray | None = None,
                       out_keep: np.ndarray | None = None, in_keep: np.ndarray | None = None,
                       layer: Any = None) -> dict:
    """The size breakdown of a factorized layer in a form (plan.FORMS, search.compression.lowrank):
    `size_breakdown` of A [m, r] (the rows of kept fan-in rows `in_keep`, bool [fan_in]) and of
    B [r, n] (the columns of kept output channels `out_keep`, bool [out]), added, with the bias of
    the kept output channels; `layer` (search.compression.layers.Layer) maps the keeps onto the
    factors' rows and columns (`lowrank.factor_keeps`; None: the SVD form's, rows and columns are
    fan-in and output channels). The dense stage is the original layer (kernel_shape, the bias),
    fp32. Both factors are stored dense (every value, a scale per column at `bits` < 32);
    "factors" holds the two breakdowns."""
    kind = "conv" if len(kernel_shape) > 2 else "dense"
    ib = DEFAULT_INDEX_BITS[kind] if index_bits is None else int(index_bits)
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    out_n = int(kernel_shape[-1])
    ok = np.ones(out_n, bool) if out_keep is None else np.asarray(out_keep, bool).ravel()
    ik = np.ones(int(np.prod(kernel_shape[:-1])), bool) if in_keep is None else np.asarray(in_keep, bool).ravel()
    a_rows, b_cols = (ik, ok) if layer is None else lowrank.factor_keeps(layer, form, ok, ik)
    ba = size_breakdown(a, np.ones(a.shape, bool), bits, quant_mode=quant_mode, index_bits=ib, in_keep=a_rows)
    bb = size_breakdown(b, np.ones(b.shape, bool), bits, quant_mode=quant_mode, index_bits=ib, out_keep=b_cols)
    extra = 0 if bias is None else FLOAT_BITS * int(np.asarray(bias).ravel()[ok].size)
    weights = int(np.prod(kernel_shape))
    stage_bits = {s: ba["bits_by_stage"][s] + bb["bits_by_stage"][s] + extra for s in STAGES}
    stage_bits["dense"] = FLOAT_BITS * (weights + (0 if bias is None else int(np.size(bias))))
    return {
        "kind": kind, "weights": weights, "held": ba["held"] + bb["held"], "nonzero": ba["nonzero"] + bb["nonzero"],
        "padding": 0, "rank": int(a.shape[1]), "form": lowrank.FORM_NAMES[int(form)],
        "channels": {"out": [int(ok.sum()), int(ok.size)], "fan_in": [int(ik.sum()), int(ik.size)]},
        "index_bits": ib, "bits": int(bits), "quant_mode": quant_mode,
        "format": {k: f"factors ({ba['format'][k]}, {bb['format'][k]})" for k in ("pruned", "quantized", "huffman")},
        "parts": {st: {p: ba["parts"][st][p] + bb["parts"][st][p] for p in ba["parts"][st]}
                  for st in ("pruned", "quantized", "huffman")} | {"bias": extra},
        "factors": {"a": ba, "b": bb},
        **_totals(stage_bits),
    }


def _nm_index_bits(m: np.ndarray, group: int | None) -> int | None:
    """Bits per kept weight of the N:M format (its position in its group), or None when the
    held mask [out, fan_in] is not N:M: every full group of `group` fan-in weights keeps the
    same count and a ragged last group keeps at most that many."""
    if not group or group < 2 or m.size == 0:
        return None
    fan_in = m.shape[1]
    full = fan_in // group * group
    counts = m[:, :full].reshape(m.shape[0], -1, group).sum(axis=2)
    if counts.size and np.any(counts != counts.flat[0]):
        return None
    if full < fan_in and counts.size and np.any(m[:, full:].sum(axis=1) > counts.flat[0]):
        return None
    return max(1, math.ceil(math.log2(group)))


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
    return {"weights": sum(int(b["weights"]) for b in items), "held": sum(int(b.get("held", b["weights"])) for b in items),
            "nonzero": sum(int(b["nonzero"]) for b in items), **_totals(stage_bits)}


def held_channels(layers: Sequence, masks: Mapping[str, np.ndarray],
                  granularity: Sequence[int]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(out_keep bool [out], in_keep bool [fan_in]) of every layer, as the export holds them.

    `granularity` is the tied plan's (compression.groups.tie_plan). A channel-pruned layer
    holds the output channels its mask keeps (every member of a channel group the same ones);
    every layer loses the fan-in rows of the channels its producing groups removed
    (`Layer.reads`: through adds, concatenations and flattens; their constant contribution
    folds into its bias), exactly the rows the cost model prices. Other layers hold everything.
    """
    out_ok: dict[int, np.ndarray] = {}
    rows = {}
    for i, l in enumerate(layers):
        m = _as_rows(np.asarray(masks[l.name]) != 0)
        rows[l.name] = m
        out_ok[l.index] = m.any(axis=1) if int(granularity[i]) == CHANNEL else np.ones(m.shape[0], bool)
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for l in layers:
        m = rows[l.name]
        ik = np.ones(m.shape[1], bool)
        segs = [out_ok[src] if src >= 0 and out_ok[src].size == c else np.ones(c, bool) for src, c in l.reads]
        chans = np.concatenate(segs) if segs else np.ones(0, bool)
        if l.kind != "depthwise" and l.groups == 1 and chans.size and m.shape[1] % chans.size == 0:
            ik = np.tile(chans, m.shape[1] // chans.size)  # fan-in: (..., channel), channel fastest
        out[l.name] = (out_ok[l.index], ik)
    return out


def model_breakdown(layers: Sequence, params: Mapping, masks: Mapping[str, np.ndarray], plan,
                    quant_modes: Sequence[str], *, index_bits: int | None = None,
                    scales: Mapping[str, np.ndarray] | None = None,
                    factors: Mapping[str, tuple[int, np.ndarray, np.ndarray]] | None = None) -> dict:
    """{"total", "layers"} of a compressed model: every layer's `size_breakdown` with the
    channels and fan-in rows it holds (`held_channels`). `plan` is a search.plan.Plan [L];
    quant_modes the weight transform per layer ("uniform", "codebook" or "float"); scales
    {layer name: [out]} the uniform grids (`CompressedModel.weight_scales`). Indices
    default to the cost model's width (5 bits, search.cost.REL_INDEX_BITS) for every kind, so
    the quantized stage is what search.cost prices as size_kb (see ARCHITECTURE.md). `factors`:
    {layer name: (form, A, B)} of the factorized layers (`factored_breakdown`)."""
    plan = tie_plan(plan, layers)
    keeps = held_channels(layers, masks, plan.granularity)
    per = {}
    for l in layers:
        node = get_path(params, l.path)
        bits, g = int(plan.weight_bits[l.index]), int(plan.granularity[l.index])
        ok, ik = keeps[l.name]
        bias = np.asarray(node["bias"]) if node.get("bias") is not None else None
        if factors and l.name in factors:
            per[l.name] = factored_breakdown(*factors[l.name], np.shape(node["kernel"]), bits,
                                             quant_mode=quant_modes[l.index],
                                             index_bits=REL_INDEX_BITS if index_bits is None else index_bits,
                                             bias=bias, out_keep=ok, in_keep=ik, layer=l)
            continue
        per[l.name] = size_breakdown(
            np.asarray(node["kernel"]), np.asarray(masks[l.name]) != 0, bits, quant_mode=quant_modes[l.index],
            index_bits=REL_INDEX_BITS if index_bits is None else index_bits,
            bias=np.asarray(node["bias"]) if node.get("bias") is not None else None,
            out_keep=ok, in_keep=ik, nm_group=NM_GROUP if g == NM else None,
            scale=(scales or {}).get(l.name))
    return {"total": total_breakdown(per), "layers": per}
