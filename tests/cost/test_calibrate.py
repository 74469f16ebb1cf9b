"""Calibration: `profiles calibrate` measures this machine into a profile that loads and prices;
fit_profile recovers a profile's predictions from measured latencies; the profiles CLI."""
from __future__ import annotations

import json

import numpy as np
import pytest

import hw_profiles
from search import cli
from search.compression import plan as P
from search.cost.calibrate import FIT_FIELDS, fit_profile, scaled_profile
from search.cost.roofline import price
from tests.support import TOY, dense


def _lenet(n_in: int = 784):
    return (dense(0, n_in, 300), dense(1, 300, 100), dense(2, 100, 10))


def test_fit_profile_recovers_predictions_of_a_known_device():
    """Latencies priced on a hidden device (the toy scaled by known factors) are fitted from the
    toy: the fitted profile predicts held-out plans within 2%."""
    toy = hw_profiles.profile_from_text(TOY, "toy")
    truth = scaled_profile(toy, np.log(np.array([1.7, 0.8, 1.0, 1.0, 2.5, 1.0, 0.4])[: len(FIT_FIELDS)]))
    rng = np.random.default_rng(0)
    layers = _lenet()

    def plans(n):
        return [P.make_plan(rng.uniform(0, 0.9, 3) * [1, 1, 0], rng.integers(0, 2, 3), rng.choice([8, 32], 3),
                            rng.choice([8, 32], 3)) for _ in range(n)]

    fit_plans, test_plans = plans(24), plans(12)
    measured = np.asarray(price(truth, layers, P.stack_plans(fit_plans)).latency_ms)
    fitted = fit_profile(toy, [(layers, p, m) for p, m in zip(fit_plans, measured)], name="toy-fitted")
    assert fitted.name == "toy-fitted"
    want = np.asarray(price(truth, layers, P.stack_plans(test_plans)).latency_ms)
    got = np.asarray(price(fitted, layers, P.stack_plans(test_plans)).latency_ms)
    before = np.asarray(price(toy, layers, P.stack_plans(test_plans)).latency_ms)
    assert np.max(np.abs(got / want - 1)) < 0.02
    assert np.max(np.abs(before / want - 1)) > 0.2  # the fit did the work


@pytest.mark.timing
def test_calibrate_writes_a_profile_that_loads_and_prices(tmp_path, capsys, monkeypatch):
    """`profiles calibrate --study S`: the kernel predictors are learned from sampled shapes plus
    the shapes the study's layers take; the profile prices with them. A held-out check above
    NOISY_HELD_OUT_ERROR warns in one line that the timing was noisy, and writes the profile."""
    import optuna

    from search.api import make_spec
    from search.cost import calibrate as calibrate_mod
    from tests.support import results_dir

    # the DRAM probe's 256 MiB of random weights cost ~7 of this test's ~9 s: time the same
    # batch-1 MatMul on at most 16 MiB here (the numbers are not asserted, only that they are > 0)
    bandwidth = calibrate_mod._bandwidth_gbs
    monkeypatch.setattr(calibrate_mod, "_bandwidth_gbs",
                        lambda nbytes, threads, min_s: bandwidth(min(nbytes, 16 << 20), threads, min_s))
    from search.export import kernel_probes, kernel_timing

    timed = []  # the kernel shapes calibration times: the sampled ones, then the study's
    calibrate_kernels = kernel_timing.calibrate_kernels

    def noisy(shapes, *a, **k):  # the real calibration, its held-out check read as a noisy machine's
        timed.extend(shapes)
        model, report = calibrate_kernels(shapes, *a, **k)
        return model, {**report, "held_out_median_error": kernel_timing.NOISY_HELD_OUT_ERROR + 0.05}

    monkeypatch.setattr(kernel_timing, "calibrate_kernels", noisy)
    results = results_dir(tmp_path)
    study = optuna.create_study(study_name="s", storage=f"sqlite:///{results / 'studies.db'}", directions=["maximize"])
    study.set_user_attr("spec", make_spec(model="lenet300", dataset="digits", profile="mobile-cpu").to_attrs())
    out = tmp_path / "here.toml"
    # 6 shapes per kind: at 3 (the least the command takes), a busy minute dropped every depthwise_f32
    # sample in 1 of 6 runs beside two busy processes, and the command stopped with its one-line error
    argv = ["profiles", "calibrate", "--out", str(out), "--seconds", "0.02", "--kernel-shapes", "6"]
    assert cli.main([*argv, "--study", "s", "--results-dir", str(results)]) == 0
    # a noisy timing is said in one line, and the profile is written all the same
    warned = [l for l in capsys.readouterr().err.splitlines() if l.startswith("warning:")]
    assert len(warned) == 1 and "20.0%" in warned[0] and "again when the machine is quiet" in warned[0], warned
    prof = hw_profiles.load_profile(str(out))
    assert prof.kernels is not None and "study s" in out.read_text()
    # the study's shapes were timed too (counted as timed: how many samples survive the noise
    # filter, kernel_timing.measure_kernels, depends on the machine's load)
    sampled = kernel_probes.sampled_shapes(6)
    assert timed[:len(sampled)] == sampled and len(timed) > len(sampled)
    assert prof.kernels.samples > 0
    assert prof.kind == "cpu" and prof.peak_gops[32] > 0 and prof.peak_gops[8] >= prof.peak_gops[32]
    assert prof.bandwidth_gbs > 0 and prof.layer_overhead_us > 0
    assert prof.unstructured_min_sparsity is None  # onnxruntime's CPU kernels are dense
    assert "measured" in out.read_text()  # every number says where it came from
    c = price(str(out), _lenet(), P.stack_plans([P.dense_plan(3), P.make_plan([0.5, 0.5, 0.0], P.CHANNEL)]))
    assert 0 < c.latency_ms[1] < c.latency_ms[0]
    capsys.readouterr()
    assert cli.main(["profiles", "show", str(out), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["kernels"]["coef"]["conv_q8"] == list(prof.kernels.coef["conv_q8"])
    assert shown["latency_model"] == "kernels"
    assert (shown["kernels"]["channel_block"], shown["kernels"]["channel_align"]) == (
        prof.kernels.channel_block, prof.kernels.channel_align)
    # a second run without --force changes nothing
    text = out.read_text()
    capsys.readouterr()
    assert cli.main(["profiles", "calibrate", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--force" in err[0] and out.read_text() == text


def test_profiles_list_and_show_json(capsys):
    assert cli.main(["profiles", "list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [p["name"] for p in listed] == hw_profiles.list_profiles()
    assert cli.main(["profiles", "show", "mcu", "--json"]) == 0
    mcu = json.loads(capsys.readouterr().out)
    assert mcu["budget"]["memory_kb"] == hw_profiles.load_profile("mcu").budget.memory_kb
    assert cli.main(["profiles", "show", "xeon"]) == 0
    assert "Intel ARK" in capsys.readouterr().out  # the file, with its sources


@pytest.mark.parametrize("argv", [["profiles", "show", "tpu-v9"], ["profiles", "show", "tpu-v9", "--json"]])
def test_unknown_profile_is_one_line(capsys, argv):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "tpu-v9" in err[0]
