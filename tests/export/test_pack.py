"""Bit packing is exact at every width, and the weights file round-trips bit for bit."""
from __future__ import annotations

import json

import numpy as np
import pytest

from search.compression import quant
from search.errors import UserError
from search.export.pack import (decode_layer, encode_layer, load_weights, pack_int, pack_uint, save_weights,
                         unpack_int, unpack_uint)
from search.compression.layers import Layer


@pytest.mark.parametrize("bits", list(range(1, 17)))
def test_uint_roundtrip_every_width(bits):
    rng = np.random.default_rng(bits)
    v = rng.integers(0, 1 << bits, size=1001)
    v[:2] = [0, (1 << bits) - 1]  # both ends of the range
    packed = pack_uint(v, bits)
    assert packed.dtype == np.uint8 and packed.size == (v.size * bits + 7) // 8  # no padding between values
    np.testing.assert_array_equal(unpack_uint(packed, bits, v.size), v)


@pytest.mark.parametrize("bits", list(range(1, 17)))
def test_int_roundtrip_every_width(bits):
    rng = np.random.default_rng(100 + bits)
    if bits == 1:
        v = rng.choice([-1, 1], size=333)
    else:
        v = rng.integers(-(1 << (bits - 1)), 1 << (bits - 1), size=333)
    np.testing.assert_array_equal(unpack_int(pack_int(v, bits), bits, v.size), v)


def test_pack_rejects_values_that_do_not_fit():
    with pytest.raises(ValueError):
        pack_uint(np.array([4]), 2)
    with pytest.raises(ValueError):
        pack_int(np.array([2]), 2)
    with pytest.raises(ValueError):
        pack_int(np.array([0]), 1)


def _effective(w, bits, mask):
    """What the engine computes with: masked, then fake-quantized (search.quant)."""
    w = np.asarray(w, np.float32) * mask
    if bits >= 32:
        return w
    return np.asarray(quant.fake_quant_weight(w, bits))


@pytest.mark.parametrize("bits", [4, 5, 8])
def test_uniform_layer_packs_on_the_engines_fixed_grid(bits):
    """The engine keeps a trial's scales while fine-tuning, so a channel whose weights shrank
    no longer reaches the end of its grid: packing with the engine's scales is exact, and
    inferring the scale from the kernel (max |w| / qmax) would not be."""
    rng = np.random.default_rng(bits)
    qmax = 2 ** (bits - 1) - 1
    scale = rng.uniform(0.01, 0.1, size=5).astype(np.float32)
    q = rng.integers(-qmax, qmax + 1, size=(7, 5))
    q[:, 1] = np.clip(q[:, 1], -(qmax // 2), qmax // 2)  # channel 1 uses half its grid
    q[0, 1], q[1, 1] = qmax // 2, qmax // 2 - 1  # its largest code and one not a multiple of it
    eff = (q * scale).astype(np.float32)
    mask = np.ones(eff.shape, np.float32)
    tensors, info = encode_layer(eff, mask, bits, "uniform", scale)
    np.testing.assert_array_equal(tensors["scale"], scale)
    np.testing.assert_allclose(decode_layer(tensors, info), eff, rtol=1e-6, atol=1e-8)
    _, guessed = encode_layer(eff, mask, bits, "uniform")
    assert guessed["max_abs_change"] > 1e-4 * float(np.abs(eff).max())


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 8, 16])
def test_uniform_layer_is_the_engines_grid_and_reloads_exactly(bits):
    rng = np.random.default_rng(bits)
    w = rng.normal(size=(3, 3, 4, 6)).astype(np.float32)
    mask = (rng.random(w.shape) > 0.4).astype(np.float32)
    mask[..., 2] = 0  # a whole pruned channel
    eff = _effective(w, bits, mask)
    tensors, info = encode_layer(eff, mask, bits, "uniform")
    assert info["storage"] == "int"
    back = decode_layer(tensors, info)
    # the grid point of every weight: only float rounding away from what the engine computed
    np.testing.assert_allclose(back, eff, rtol=1e-5, atol=1e-7)
    assert np.all(back[mask == 0] == 0)
    # encoding the stored kernel again changes nothing, bit for bit
    np.testing.assert_array_equal(decode_layer(*encode_layer(back, mask, bits, "uniform")), back)
    # at most 2**bits levels per channel (1 bit: two), and the packed integers take bits per kept weight
    levels = max(np.unique(back[..., c][mask[..., c] > 0]).size for c in range(6))
    assert levels <= 2**bits
    assert tensors["q"].size == (int(np.sum(mask * (eff != 0) if bits == 1 else mask)) * bits + 7) // 8


def test_codebook_layer_and_float_fallback():
    rng = np.random.default_rng(0)
    book = np.array([-0.5, -0.1, 0.2, 0.7], np.float32)
    w = book[rng.integers(0, 4, size=(20, 8))]
    mask = rng.random(w.shape) > 0.5
    w = w * mask
    tensors, info = encode_layer(w, mask, 2, "codebook")
    assert info["storage"] == "codebook" and tensors["codebook"].size <= 4
    np.testing.assert_array_equal(decode_layer(tensors, info), w)
    # float noise around the centroids (as a straight-through estimator leaves): snapped back
    noisy = (w + rng.normal(size=w.shape).astype(np.float32) * 1e-7) * mask
    tensors, info = encode_layer(noisy, mask, 2, "codebook")
    assert tensors["codebook"].size == 4 and info["max_abs_change"] < 1e-6
    np.testing.assert_allclose(decode_layer(tensors, info), w, atol=1e-6)


def _params(rng):
    return {"fc1": {"kernel": rng.normal(size=(16, 8)).astype(np.float32), "bias": rng.normal(size=8).astype(np.float32)},
            "fc2": {"kernel": rng.normal(size=(8, 3)).astype(np.float32), "bias": np.zeros(3, np.float32)}}


def _layers():
    return [Layer(0, "fc1", ("fc1",), "dense", (16, 8), (16,), (8,), 1, True, 128, 136),
            Layer(1, "fc2", ("fc2",), "dense", (8, 3), (8,), (3,), 1, True, 24, 27)]


def test_file_roundtrip_and_errors(tmp_path):
    rng = np.random.default_rng(1)
    p = _params(rng)
    mask = {"fc1": (rng.random((16, 8)) > 0.5).astype(np.float32)}
    p["fc1"]["kernel"] = decode_layer(*encode_layer(_effective(p["fc1"]["kernel"], 4, mask["fc1"]), mask["fc1"], 4, "uniform"))
    path = tmp_path / "weights.safetensors"
    infos = save_weights(path, p, _layers(), [4, 32], ["uniform", "uniform"], mask, {"act": {"fc1": [0, 1]}})
    assert infos["fc1"]["storage"] == "int" and infos["fc2"]["storage"] == "float"
    back, meta = load_weights(path, template=p)
    for k in ("fc1", "fc2"):
        for leaf in ("kernel", "bias"):
            np.testing.assert_array_equal(back[k][leaf], p[k][leaf])
    assert meta["extra"]["act"]["fc1"] == [0, 1]
    # as readable as any file written here (the umask's), not the owner only
    (tmp_path / "plain").write_text("x")
    assert path.stat().st_mode & 0o777 == (tmp_path / "plain").stat().st_mode & 0o777
    # wrong shapes
    bad = {**p, "fc2": {"kernel": np.zeros((8, 4)), "bias": np.zeros(4)}}
    with pytest.raises(UserError, match="shape"):
        load_weights(path, template=bad)
    # corrupt: flip one byte of the data
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0xFF
    (tmp_path / "corrupt.safetensors").write_bytes(bytes(raw))
    with pytest.raises(UserError, match="corrupt"):
        load_weights(tmp_path / "corrupt.safetensors")
    # truncated / not safetensors at all
    (tmp_path / "junk.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(UserError, match="corrupt|not"):
        load_weights(tmp_path / "junk.safetensors")
    # a valid safetensors file that is not ours
    from safetensors.numpy import save_file
    save_file({"x": np.zeros(3, np.float32)}, str(tmp_path / "foreign.safetensors"), metadata={"a": json.dumps(1)})
    with pytest.raises(UserError, match="not an hwcompress"):
        load_weights(tmp_path / "foreign.safetensors")
    with pytest.raises(UserError, match="does not exist"):
        load_weights(tmp_path / "missing.safetensors")
