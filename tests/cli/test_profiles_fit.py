"""`hwcompress profiles fit`: exports measured in onnxruntime refit a profile, which loads and
prices them closer to what they measured; bad input is a one-line error before any timing."""
from __future__ import annotations

import dataclasses
import json
from types import MappingProxyType

import pytest

import hw_profiles
from hw_profiles.schema import KERNEL_FEATURES, KERNELS, KernelModel
from search import cli
from search.compression.plan import CHANNEL, UNSTRUCTURED, make_plan
from tests.support import results_dir, stored_study


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """Two real exports of lenet300/digits: dense fp32, and half its channels at 8 bits."""
    results = results_dir(tmp_path_factory.mktemp("fit"))
    stored_study(results, "fit", [make_plan([0.0, 0.0, 0.0], UNSTRUCTURED, [32, 32, 32], [32, 32, 32]),
                                  make_plan([0.5, 0.5, 0.0], CHANNEL, [8, 8, 8], [8, 8, 8])])
    dirs = []
    for trial in (0, 1):
        out = results / f"export{trial}"
        assert cli.main(["export", "--study", "fit", "--results-dir", str(results), "--out", str(out),
                         "--trial", str(trial), "--finetune-steps", "2"]) == 0
        dirs.append(str(out))
    return dirs


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    """A kernel-level profile as `profiles calibrate` writes one, its predictors made up (a
    calibration takes minutes): every kind 2 us per kernel plus 1 ns per unit of each feature."""
    coef = MappingProxyType({k: (2.0,) + (1e-3,) * (len(KERNEL_FEATURES) - 1) for k in KERNELS})
    prof = dataclasses.replace(hw_profiles.load_profile("xeon"), name="made-up",
                               kernels=KernelModel(5.0, coef, "synthetic"))
    path = tmp_path_factory.mktemp("profile") / "made-up.toml"
    path.write_text(hw_profiles.dump_profile(prof))
    return str(path)


def test_fit_writes_a_profile_that_prices_the_exports_closer(exports, calibrated, tmp_path, capsys):
    out = tmp_path / "here.toml"
    capsys.readouterr()
    assert cli.main(["profiles", "fit", *exports, "--profile", calibrated, "--out", str(out), "--runs", "30",
                     "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    fitted = hw_profiles.load_profile(out)
    assert fitted.name == "here" and report["base"] == "made-up" and len(report["exports"]) == 2
    assert fitted.kernels is not None and fitted.kernels.coef != hw_profiles.load_profile(calibrated).kernels.coef
    err = lambda key: max(abs(r[key] / r["measured_ms"] - 1) for r in report["exports"])
    assert err("predicted_ms_after") < err("predicted_ms_before")
    assert "hwcompress profiles fit" in out.read_text()


@pytest.mark.parametrize("case", ["one export", "the same export twice", "not an export", "out exists", "unknown profile",
                                  "roofline profile"])
def test_bad_input_is_one_line_before_any_timing(exports, calibrated, tmp_path, capsys, case):
    out = tmp_path / "p.toml"
    args = {"one export": [exports[0]], "the same export twice": [exports[0], exports[0] + "/"],
            "not an export": [exports[0], str(tmp_path)]}.get(case, exports)
    if case == "out exists":
        out.write_text("keep me")
    profile = {"unknown profile": "no-such-device", "roofline profile": "mobile-cpu"}.get(case, calibrated)
    capsys.readouterr()
    assert cli.main(["profiles", "fit", *args, "--profile", profile, "--out", str(out)]) != 0
    err = capsys.readouterr()
    lines = [ln for ln in err.err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "measured" not in err.err, err.err
    assert {"one export": "2 or more", "the same export twice": "twice", "not an export": "config.json", "out exists": "--force",
            "unknown profile": "unknown profile", "roofline profile": "profiles calibrate"}[case] in lines[0]
    assert case != "out exists" or out.read_text() == "keep me"
