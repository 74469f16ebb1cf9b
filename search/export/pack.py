"""Exact bit packing and the packed-weights safetensors file of an export.

Integers of any width 1..16 are packed LSB-first into bytes and unpacked exactly. A compressed
layer is stored as: the kept weights only (packed integers + per-channel scales, or packed
codebook indices + codebook, or float32 values), a 1-bit mask, and bits/shape in the metadata.
The integers are re-derived from the *effective* kernels (masked and fake-quantized, exactly
what the model computes with) and checked: loading gives back those kernels bit for bit.
A factorized layer (search.compression.lowrank) stores its two factors A [m, r] and B [r, n]
instead, each encoded as a layer of its own (storage "lowrank", with its form); its kernel is
their product, rearranged back from the form's matrix view, computed in float32 the same way on
export and on load.
No pickle: tensors are raw arrays, the structure is JSON in the safetensors metadata.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from search.compression.lowrank import FORM_NAMES, kernel_from_matrix
from search.compression.plan import FORMS
from search.compression.quant import grid_scales
from search.errors import UserError

FORMAT = "hwcompress-weights/1"  # metadata tag; a file without it is foreign
FLOAT_BITS = 32


# ---------------------------------------------------------------- bit packing

def pack_uint(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned integers in [0, 2**bits) into uint8 bytes, LSB first, no padding between."""
    if not 1 <= bits <= 16:
        raise ValueError(f"bits must be in 1..16, got {bits}")
    u = np.asarray(values).astype(np.int64).ravel()
    if u.size and (u.min() < 0 or u.max() >= (1 << bits)):
        raise ValueError(f"values {u.min()}..{u.max()} do not fit in {bits} unsigned bits")
    bit_matrix = ((u[:, None] >> np.arange(bits)) & 1).astype(np.uint8)
    return np.packbits(bit_matrix.ravel(), bitorder="little")


def unpack_uint(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of pack_uint: the first `count` integers, as int64."""
    need = (count * bits + 7) // 8
    if packed.size < need:
        raise ValueError(f"{packed.size} bytes hold fewer than {count} values of {bits} bits")
    flat = np.unpackbits(np.asarray(packed, np.uint8), count=count * bits, bitorder="little")
    return flat.reshape(count, bits).astype(np.int64) @ (np.int64(1) << np.arange(bits, dtype=np.int64))


def pack_int(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack signed integers: two's complement in `bits`; at 1 bit the values are -1 / +1."""
    q = np.asarray(values).astype(np.int64).ravel()
    if bits == 1:
        if q.size and not np.all(np.abs(q) == 1):
            raise ValueError("1-bit values must be -1 or +1")
        return pack_uint(q > 0, 1)
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    if q.size and (q.min() < lo or q.max() > hi):
        raise ValueError(f"values {q.min()}..{q.max()} do not fit in {bits} signed bits")
    return pack_uint(q & ((1 << bits) - 1), bits)


def unpack_int(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of pack_int."""
    u = unpack_uint(packed, bits, count)
    if bits == 1:
        return 2 * u - 1
    return u - ((u >> (bits - 1)) << bits)


# ---------------------------------------------------------------- one layer

def _channel_index(shape: Sequence[int]) -> np.ndarray:
    """Output channel (last axis) of every flat position of a kernel."""
    out = int(shape[-1])
    return np.arange(int(np.prod(shape)), dtype=np.int64) % out


def _uniform_codes(w: np.ndarray, mask: np.ndarray, bits: int, scale: np.ndarray | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Integers q and per-channel float32 scales with q * scale ~= w on the mask.

    The effective kernels sit on this grid up to float rounding (a straight-through
    estimator adds and subtracts w), so q is exact and q * scale is the grid point. `scale`
    ([out]): the grid's scales as the engine fixed them (`CompressedModel.weight_scales`);
    None infers them from the kernel (`quant.grid_scales`, the median magnitude at 1 bit), which
    is the grid only when some weight of every channel sits at its end.
    """
    out = w.shape[-1]
    w2, m2 = w.reshape(-1, out), mask.reshape(-1, out)
    a = np.where(m2, np.abs(w2), 0).astype(np.float32)
    if scale is not None:
        scales = np.asarray(scale, np.float32).reshape(out)
        scales = np.where(scales > 0, scales, np.float32(1.0)).astype(np.float32)
        if bits == 1:
            q = np.where(w2 >= 0, 1, -1).astype(np.int64)
        else:
            qmax = (1 << (bits - 1)) - 1
            q = np.clip(np.round(w2 / scales), -qmax, qmax).astype(np.int64)
    elif bits == 1:  # sign(w) * mean|w|: all kept magnitudes equal up to rounding; the median is one
        scales = np.array([np.median(a[m2[:, c], c]) if m2[:, c].any() else 1.0 for c in range(out)], np.float32)
        q = np.where(w2 >= 0, 1, -1).astype(np.int64)
    else:
        qmax = (1 << (bits - 1)) - 1
        scales = grid_scales(w2, bits, m2)
        q = np.clip(np.round(w2 / scales), -qmax, qmax).astype(np.int64)
    q = np.where(m2, q, 0)
    return q.reshape(w.shape), np.where(scales > 0, scales, np.float32(1.0)).astype(np.float32)


def _codebook(kept: np.ndarray, bits: int) -> np.ndarray:
    """At most 2**bits shared values: the distinct values, or group means split at the widest gaps."""
    vals = np.unique(kept).astype(np.float32)
    k = 1 << bits
    if vals.size <= k:
        return vals
    cuts = np.sort(np.argsort(np.diff(vals))[-(k - 1):]) + 1
    groups = np.split(np.sort(kept), np.searchsorted(np.sort(kept), vals[cuts]))
    return np.array([g.mean() for g in groups if g.size], np.float32)


def encode_layer(kernel: np.ndarray, mask: np.ndarray | None, bits: int, mode: str,
                 scale: np.ndarray | None = None) -> tuple[dict, dict]:
    """Encode one effective kernel -> (tensors, info). mode: "uniform" or "codebook";
    scale: the uniform grid's [out] scales (`_uniform_codes`).

    info["storage"] says what was stored: "int" (packed q + scales), "codebook" (packed
    indices + codebook) or "float" (float32 values, 32-bit layers). The stored kernel is
    the grid point of every weight; info["max_abs_change"] says how far that is from the
    given kernel (float rounding only, for kernels the engine made). Exporters use
    decode_layer(encode_layer(...)) as the model's weights, so a reload is exact.
    """
    w = np.asarray(kernel, np.float32)
    m = np.ones(w.shape, bool) if mask is None else np.asarray(mask, bool).reshape(w.shape)
    m = m & (w != 0) if bits == 1 else m  # 1 bit has no zero: a zero weight can only be pruned
    tensors: dict[str, np.ndarray] = {}
    info: dict[str, Any] = {"shape": list(w.shape), "bits": int(bits), "mode": mode,
                            "kept": int(m.sum()), "note": ""}
    if not m.all():
        tensors["mask"] = pack_uint(m.ravel(), 1)
    kept = w.ravel()[m.ravel()]
    if bits < FLOAT_BITS and mode == "codebook":
        book = _codebook(kept, bits)
        idx = np.clip(np.searchsorted(book, kept), 1, max(book.size - 1, 1)) if book.size > 1 else np.zeros(kept.size, int)
        if book.size > 1:  # nearest of the two neighbours
            idx = np.where(np.abs(kept - book[idx - 1]) <= np.abs(kept - book[idx]), idx - 1, idx)
        tensors["index"] = pack_uint(idx, bits)
        tensors["codebook"] = book
        info["storage"] = "codebook"
    elif bits < FLOAT_BITS:
        q, scales = _uniform_codes(w, m, bits, scale)
        tensors["q"] = pack_int(q.ravel()[m.ravel()], bits)
        tensors["scale"] = scales
        info["storage"] = "int"
    else:
        tensors["values"] = kept
        info["storage"] = "float"
    back = decode_layer(tensors, info)
    info["max_abs_change"] = float(np.max(np.abs(back - np.where(m, w, 0)), initial=0.0))
    return tensors, info


def encode_factored(form: int, a: np.ndarray, b: np.ndarray, shape: Sequence[int], bits: int, mode: str
                    ) -> tuple[dict, dict]:
    """Encode a factorized layer -> (tensors, info): the factors A [m, r] and B [r, n] of its
    form (plan.FORMS) each as `encode_layer` does (A whole; B without its all-zero columns, the
    removed output channels, behind a mask when that is smaller; scales inferred, exact for
    fake-quantized factors), info["storage"] "lowrank" with the form's name, the rank, both factors' infos and
    the layer's kernel shape. `decode_layer` gives back the kernel whose matrix is A @ B."""
    ta, ia = encode_layer(a, None, bits, mode)
    # B's all-zero columns (removed output channels) are left out behind a mask where the values
    # they would take (bits each) outweigh the mask's one bit per value
    cols = np.any(np.asarray(b) != 0, axis=0)
    drop = int((~cols).sum()) * min(int(bits), FLOAT_BITS) > cols.size
    tb, ib = encode_layer(b, np.broadcast_to(cols, np.shape(b)) if drop else None, bits, mode)
    tensors = {**{f"a:{k}": v for k, v in ta.items()}, **{f"b:{k}": v for k, v in tb.items()}}
    info = {"shape": [int(d) for d in shape], "bits": int(bits), "mode": mode, "storage": "lowrank",
            "form": FORM_NAMES[int(form)], "rank": int(np.shape(a)[1]), "kept": ia["kept"] + ib["kept"], "note": "",
            "a": ia, "b": ib, "max_abs_change": max(ia["max_abs_change"], ib["max_abs_change"])}
    return tensors, info


def decode_factors(tensors: Mapping[str, np.ndarray], info: Mapping[str, Any]) -> tuple[int, np.ndarray, np.ndarray]:
    """(form, A [m, r], B [r, n]) float32 of a layer `encode_factored` stored (a file written
    before the form was recorded holds the SVD form)."""
    part = lambda p: decode_layer({k[2:]: v for k, v in tensors.items() if k.startswith(p + ":")}, info[p])
    form = info.get("form", "svd")
    if form not in FORMS:
        raise ValueError(f"factorized layer stored in unknown form {form!r}; known forms: {', '.join(FORMS)}")
    return FORMS[form], part("a"), part("b")


def decode_layer(tensors: Mapping[str, np.ndarray], info: Mapping[str, Any]) -> np.ndarray:
    """Inverse of encode_layer (and of encode_factored): the effective float32 kernel."""
    shape = tuple(int(d) for d in info["shape"])
    if info["storage"] == "lowrank":
        form, a, b = decode_factors(tensors, info)
        return np.ascontiguousarray(kernel_from_matrix(np.matmul(a, b, dtype=np.float32), shape, form))
    size = int(np.prod(shape))
    m = unpack_uint(tensors["mask"], 1, size).astype(bool) if "mask" in tensors else np.ones(size, bool)
    n, bits = int(m.sum()), int(info["bits"])
    if n != int(info["kept"]):
        raise ValueError(f"mask keeps {n} weights, metadata says {info['kept']}")
    if info["storage"] == "int":
        q = unpack_int(tensors["q"], bits, n)
        vals = (q.astype(np.float32) * tensors["scale"][_channel_index(shape)[m]]).astype(np.float32)
    elif info["storage"] == "codebook":
        vals = tensors["codebook"][unpack_uint(tensors["index"], bits, n)]
    elif info["storage"] == "float":
        vals = tensors["values"]
    else:
        raise ValueError(f"unknown storage {info['storage']!r}")
    flat = np.zeros(size, np.float32)
    flat[m] = vals
    return flat.reshape(shape)


# ---------------------------------------------------------------- the file

def _flatten(params: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for k, v in params.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, prefix + (str(k),)))
        else:
            out["/".join(prefix + (str(k),))] = np.asarray(v, np.float32)
    return out


def _unflatten(flat: Mapping[str, np.ndarray]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for key, v in flat.items():
        *head, leaf = key.split("/")
        node = tree
        for h in head:
            node = node.setdefault(h, {})
        node[leaf] = v
    return tree


def _digest(tensors: Mapping[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for k in sorted(tensors):
        h.update(k.encode())
        h.update(np.ascontiguousarray(tensors[k]).tobytes())
    return h.hexdigest()


def save_weights(path: str | Path, params: Mapping[str, Any], layers: Sequence[Any],
                 bits: Sequence[int], modes: Sequence[str],
                 masks: Mapping[str, np.ndarray] | None = None,
                 extra: Mapping[str, Any] | None = None,
                 scales: Mapping[str, np.ndarray] | None = None,
                 state: Mapping[str, Any] | None = None,
                 factors: Mapping[str, tuple[int, np.ndarray, np.ndarray]] | None = None) -> dict[str, dict]:
    """Write effective params as packed weights; returns per-layer info (storage, notes).

    `layers` are search.layers.Layer (only .name and .path are used); other leaves (biases)
    are stored as float32. `extra` goes into the metadata as JSON (e.g. activation ranges).
    `scales`: {layer name: [out] uniform grid scales} (`encode_layer`). `state`: the model's
    other variable collections (e.g. {"batch_stats": ...}), stored as float32 so that
    `load_variables` gives back everything `module.apply` needs. `factors`: {layer name:
    (form, A, B)} of the factorized layers, stored as the pair (`encode_factored`) instead of the kernel.
    """
    from safetensors.numpy import save

    flat = _flatten(params)
    tensors: dict[str, np.ndarray] = {}
    infos: dict[str, dict] = {}
    kernel_keys = set()
    for layer, b, mode in zip(layers, bits, modes):
        key = "/".join(layer.path) + "/kernel"
        kernel_keys.add(key)
        mask = None if masks is None or layer.name not in masks else np.asarray(masks[layer.name])
        if factors and layer.name in factors:
            t, info = encode_factored(*factors[layer.name], flat[key].shape, int(b), mode)
        else:
            t, info = encode_layer(flat[key], mask, int(b), mode, (scales or {}).get(layer.name))
        info["param"] = key
        infos[layer.name] = info
        tensors.update({f"layer:{layer.name}:{k}": v for k, v in t.items()})
    for key, v in flat.items():
        if key not in kernel_keys:
            tensors[f"param:{key}"] = v
    flat_state = _flatten(state or {})
    tensors.update({f"state:{k}": v for k, v in flat_state.items()})
    meta = {"format": FORMAT, "layers": infos,
            "params": {k: list(v.shape) for k, v in flat.items()},
            "state": {k: list(v.shape) for k, v in flat_state.items()},
            "extra": dict(extra or {}), "sha256": _digest(tensors)}
    # the bytes written as any file is (safetensors' save_file leaves it readable by its owner only)
    Path(path).write_bytes(save({k: np.ascontiguousarray(v) for k, v in tensors.items()},
                                metadata={"hwcompress": json.dumps(meta)}))
    return infos


def load_weights(path: str | Path, template: Mapping[str, Any] | None = None) -> tuple[dict, dict]:
    """Read a weights file -> (effective params tree, metadata).

    Raises UserError for a missing, foreign or corrupt file, and when `template` (a params
    tree or its shapes) does not match the stored shapes.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise UserError(f"weights file {path} does not exist; export a trial first (hwcompress export)")
    try:
        with safe_open(str(path), framework="numpy") as f:
            raw_meta = (f.metadata() or {}).get("hwcompress")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path} is corrupt or not a safetensors file ({str(e).splitlines()[0]}); re-export it") from None
    try:
        meta = json.loads(raw_meta) if raw_meta else None
    except json.JSONDecodeError:
        meta = None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise UserError(f"{path} is not an hwcompress weights file (no '{FORMAT}' metadata); pass the weights.safetensors of an export")
    if _digest(tensors) != meta.get("sha256"):
        raise UserError(f"{path} is corrupt: its checksum does not match; re-export it")
    flat: dict[str, np.ndarray] = {}
    try:
        for name, info in meta["layers"].items():
            prefix = f"layer:{name}:"
            t = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            flat[info["param"]] = decode_layer(t, info)
        for k, v in tensors.items():
            if k.startswith("param:"):
                flat[k[len("param:"):]] = v
    except (KeyError, ValueError, IndexError) as e:
        raise UserError(f"{path} is corrupt ({e}); re-export it") from None
    if template is not None:
        check_shapes(flat, template, path)
    return _unflatten(flat), meta


def load_variables(path: str | Path) -> dict[str, Any]:
    """The Flax variables of an exported model: {"params": effective params, **other
    collections} (e.g. batch_stats), ready for `module.apply(variables, x, train=False)`.
    Raises UserError as `load_weights` does."""
    from safetensors import safe_open

    params, _ = load_weights(path)
    with safe_open(str(path), framework="numpy") as f:
        state = {k[len("state:"):]: f.get_tensor(k) for k in f.keys() if k.startswith("state:")}
    return {"params": params, **_unflatten(state)}


def check_shapes(flat: Mapping[str, np.ndarray], template: Mapping[str, Any], path: Any = "weights") -> None:
    """UserError when the stored leaves differ from the model's in names or shapes."""
    want = {k: tuple(np.shape(v)) for k, v in _flatten_shapes(template).items()}
    have = {k: tuple(v.shape) for k, v in flat.items()}
    if set(want) != set(have):
        diff = sorted(set(want) ^ set(have))[:3]
        raise UserError(f"{path} holds params {sorted(have)[:4]}... that do not match the model (differ at {diff}); export from the same model")
    for k in sorted(want):
        if want[k] != have[k]:
            raise UserError(f"{path}: param {k} has shape {have[k]}, the model expects {want[k]}; export from the same model and hparams")


def _flatten_shapes(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(_flatten_shapes(v, prefix + (str(k),)))
        else:
            out["/".join(prefix + (str(k),))] = v
    return out
