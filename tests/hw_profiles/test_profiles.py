"""Shipped profiles load; every kind of bad field gives one line naming file, field, value, expected."""
from __future__ import annotations

import pytest

from hw_profiles import (PROFILE_DIR, ProfileError, dump_profile, list_profiles, load_profile,
                         profile_from_text)

SHIPPED = ["gpu-h100", "mcu", "mobile-cpu", "mobile-npu", "xeon"]
MCU_TEXT = (PROFILE_DIR / "mcu.toml").read_text()


def test_every_shipped_profile_loads_and_round_trips():
    assert list_profiles() == SHIPPED
    for name in SHIPPED:
        p = load_profile(name)
        assert p.name == name and p.peak_gops and p.budget is not None
        assert profile_from_text(dump_profile(p), p.source) == p
    assert load_profile("mobile-npu").float_policy == "fallback"
    assert load_profile("gpu-h100").nm_patterns == ((2, 4),)
    assert load_profile("xeon").budget.memory_kb is None  # unbounded


def test_load_by_path(tmp_path):
    f = tmp_path / "mine.toml"
    f.write_text(MCU_TEXT.replace('name = "mcu"', 'name = "mine"'))
    assert load_profile(str(f)).name == "mine"


@pytest.mark.parametrize("edit, words", [
    (lambda t: t.replace("bandwidth_gbs = 0.864", ""), ["memory.bandwidth_gbs", "<missing>", "missing", "positive number"]),
    (lambda t: t.replace("bandwidth_gbs = 0.864", 'bandwidth_gbs = "fast"'), ["memory.bandwidth_gbs", "'fast'", "wrong type str", "positive number"]),
    (lambda t: t.replace("layer_us = 20.0", "layer_us = -1.0"), ["overhead.layer_us", "-1.0", "out of range", ">= 0"]),
    (lambda t: t.replace("fp32_gops = 0.432", "fp32_gop = 0.432"), ["compute.fp32_gop", "0.432", "unknown field", "fp32_gops"]),
    (lambda t: t.replace('kind = "mcu"', 'kind = "toaster"'), ["kind", "'toaster'", "not allowed", "'mcu'"]),
    (lambda t: t.replace("weight_bits = [4, 8, 32]", "weight_bits = [4, 9]"), ["precision.weight_bits", "[4, 9]", "expected"]),
    (lambda t: t.replace("[budget]", "[budget\n"), ["malformed TOML", "line"]),
])
def test_bad_fields_give_one_line_errors(tmp_path, edit, words):
    f = tmp_path / "bad.toml"
    f.write_text(edit(MCU_TEXT))
    with pytest.raises(ProfileError) as e:
        load_profile(str(f))
    msg = str(e.value)
    assert "\n" not in msg and str(f) in msg
    for w in words:
        assert w in msg, (w, msg)


def test_unknown_name_lists_shipped_profiles():
    with pytest.raises(ProfileError, match="mobile-npu"):
        load_profile("tpu-v9")
