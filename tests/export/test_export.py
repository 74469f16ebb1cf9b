"""`hwcompress export` and `measure` end to end on a tiny real study (lenet300 on digits):
the files are there, weights reload into Flax with exactly the exported quality, the ONNX model
agrees with Flax and really has the smaller matrices; bad input gives one-line errors."""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import onnx
import optuna
import pytest

import models
from models.train import save_params, train_baseline
from search import cli
from search.engine.config import FinetuneConfig
from search.errors import UserError
from search.export.retrain import RETRAIN_FACTOR, RETRAIN_LR_FACTOR
from tests.support import results_dir, start_search, stored_study


@pytest.fixture(scope="module")
def study_env(tmp_path_factory):
    """A study as `hwcompress search` stores it (spec, layers, a complete trial with its plan,
    quality and costs, a failed trial), written directly so this test needs no search."""
    from search.compression.plan import CHANNEL, make_plan

    results = results_dir(tmp_path_factory.mktemp("export"))
    study = stored_study(results, "exp", [make_plan([0.5, 0.25, 0.0], CHANNEL, [8, 4, 8], [8, 8, 8])])
    study.tell(study.ask(), state=optuna.trial.TrialState.FAIL)  # an incomplete trial to refuse
    return results, study, 0


def _export(results, out, *extra):
    return cli.main(["export", "--study", "exp", "--results-dir", str(results), "--out", str(out), *extra])


@pytest.fixture(scope="module")
def exported(study_env, tmp_path_factory):
    """Two real exports of the study's trial into one directory, for the tests below (each one
    fine-tunes, packs, writes ONNX and checks it: seconds apiece): the default retrain budget,
    then `--finetune-steps 4 --force` over it. (out, {"default" | "four": (exit code, stdout,
    config.json as written by that export)})."""
    results, _, trial = study_env
    out = tmp_path_factory.mktemp("exported") / "out"
    runs = {}
    for name, extra in (("default", ()), ("four", ("--finetune-steps", "4", "--force"))):
        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout):
            rc = _export(results, out, "--trial", str(trial), *extra)
        config = json.loads((out / "config.json").read_text()) if rc == 0 else None
        runs[name] = (rc, stdout.getvalue(), config)
    return out, runs


def test_export_trial_files_reload_and_onnx(study_env, exported, capsys):
    results, study, trial = study_env
    out, runs = exported  # the --force export over the default one: it replaced every file
    assert runs["default"][0] == 0 and runs["four"][0] == 0
    assert {p.name for p in out.iterdir()} == {"config.json", "weights.safetensors", "size.json", "model.onnx"}
    c = json.loads((out / "config.json").read_text())
    q = c["quality"]
    assert q["test"] == q["test_reloaded"]  # exact: packed weights are the exported weights
    assert q["onnx_agreement"] >= 0.99 and q["onnx_max_abs_diff"] < 0.1  # logits of size ~10: int32-bias tolerance
    assert abs(q["test_onnx"] - q["test"]) <= 0.01
    assert c["source"] == {"study": "exp", "trial": trial, "search_quality": study.trials[trial].user_attrs["quality"]}
    assert c["profile"] == "mobile-cpu" and c["predicted"]["mobile-cpu"]["latency_ms"] == 0.05
    assert [l["onnx_out_channels"] for l in c["layers"]] == [150, 75, 10]  # channels really removed
    assert set(c["size"]["ratio"]) == {"dense", "pruned", "quantized", "huffman"}
    plan = study.trials[trial].user_attrs["plan"]
    assert [l["weight_bits"] for l in c["layers"]] == plan["weight_bits"]
    # the ONNX matrices have the exported channel counts
    model = onnx.load(str(out / "model.onnx"))
    inits = {i.name: tuple(i.dims) for i in model.graph.initializer}
    mats = [n for n in model.graph.node if n.op_type == "MatMul"]
    for layer, node in zip(c["layers"], mats):
        src = next(n for n in model.graph.node if node.input[1] in n.output) if node.input[1] not in inits else None
        dims = inits[node.input[1] if src is None else src.input[0]]
        assert dims[-1] == layer["onnx_out_channels"], (layer, dims)
    # nothing is pickled: the weights file is safetensors (8-byte header length, then JSON)
    raw = (out / "weights.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    assert json.loads(raw[8:8 + n])["__metadata__"]["hwcompress"]
    # measure: runs, prints the measured and the predicted latency
    capsys.readouterr()
    assert cli.main(["measure", str(out), "--runs", "5", "--warmup", "1"]) == 0
    text = capsys.readouterr().out
    assert "measured" in text and "predicted" in text and "mobile-cpu" in text and "runs, batch 1," in text
    # an existing output directory is refused without --force and left as it was (accepted with
    # --force: the `exported` fixture's second export, checked above)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert _export(results, out, "--trial", str(trial), "--finetune-steps", "0") == 2
    assert "--force" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_export_plan_channel_codebook_binary_reload_exact(tmp_path):
    import models
    from models.train import train_baseline
    from search.engine.config import FinetuneConfig
    from search.engine.finetune import Engine
    from search.export.pack import load_weights
    from search.export.exporter import export_plan
    from search.compression.plan import CHANNEL, make_plan

    task = models.get_task("lenet300", "digits")
    params, _ = train_baseline(task, cache_dir=Path(results_dir(tmp_path) / "cache"))
    plan = make_plan([0.5, 0.5, 0.0], [CHANNEL, CHANNEL, 0], [4, 1, 3], [8, 8, 6], [1, 0, 0])  # codebook, binary, uniform
    eng = Engine(task, params, FinetuneConfig(steps=2, k=1))  # one compile serves export and check
    r = export_plan(task, params, plan, tmp_path / "e", engine=eng)
    assert r.quality == r.reload_quality and r.onnx_agreement >= 0.99
    layers = {l["name"]: l for l in r.config["layers"]}
    assert layers["fc1"]["onnx_out_channels"] == 150 and layers["fc2"]["onnx_out_channels"] == 50
    assert layers["fc1"]["storage"] == "codebook" and layers["fc2"]["storage"] == "int"
    back, meta = load_weights(tmp_path / "e" / "weights.safetensors", template=params["params"])
    assert len(np.unique(back["fc1"]["kernel"])) <= 2**4 + 1  # 16 shared values and the pruned zeros
    assert len(np.unique(np.abs(back["fc2"]["kernel"][:, 0]))) <= 2  # 1 bit: +-a and 0
    # the reloaded weights really give the exported quality in Flax (exact, not approximate)
    res = eng.run(plan, return_models=True, finetune=False)
    import dataclasses
    cm = dataclasses.replace(res.models[0], params=back, act_ranges={k: tuple(v) for k, v in meta["extra"]["act_ranges"].items()})
    pred = np.asarray(eng.predict(cm, task.data.x_test))
    acc = float(np.mean(np.asarray(task.metric(jnp.asarray(pred), jnp.asarray(task.data.y_test)))))
    assert acc == pytest.approx(r.quality, abs=1e-6)
    # measure works on an export without a profile too (predicted: n/a)
    assert cli.main(["measure", str(tmp_path / "e"), "--runs", "3", "--warmup", "1"]) == 0
    # and times it at the batch a calibrated profile prices (profiles calibrate --batch 4)
    from types import MappingProxyType

    from hw_profiles import KERNELS, KernelModel
    from search.cost.calibrate import calibrated_profile, profile_toml
    from search.cost.measure import measure
    from tests.support import MACHINE
    four = KernelModel(1.0, MappingProxyType({k: (1.0,) + (0.0,) * 8 for k in KERNELS}), "synthetic", batch=4)
    (tmp_path / "b4.toml").write_text(profile_toml(calibrated_profile(MACHINE, name="b4", kernels=four), MACHINE))
    m = measure(tmp_path / "e", runs=3, warmup=1, profile=str(tmp_path / "b4.toml"))
    assert m["batch"] == 4 and m["predicted_ms"] > 0


def test_export_of_gradual_pruning_with_learned_ranges(tmp_path):
    """Masks made while fine-tuning and ranges trained with the weights are what is packed and
    what the ONNX model runs: the export reloads to its quality and agrees with Flax."""
    import models
    from models.train import train_baseline
    from search.compression.masks import pruned_counts
    from search.compression.plan import CHANNEL, UNSTRUCTURED, make_plan
    from search.engine.config import FinetuneConfig
    from search.engine.finetune import Engine
    from search.export.exporter import export_plan

    task = models.get_task("lenet300", "digits")
    params, _ = train_baseline(task, cache_dir=Path(results_dir(tmp_path) / "cache"))
    plan = make_plan([0.8, 0.5, 0.0], [UNSTRUCTURED, CHANNEL, UNSTRUCTURED], 8, 5)
    eng = Engine(task, params, FinetuneConfig(steps=20, k=1, pruning="gradual", act_ranges="learned"))
    r = export_plan(task, params, plan, tmp_path / "e", engine=eng)
    assert r.quality == r.reload_quality and r.onnx_agreement >= 0.99
    layers = {l["name"]: l for l in r.config["layers"]}
    assert layers["fc2"]["onnx_out_channels"] == 50
    cm = eng.run(plan, return_models=True).models[0]
    np.testing.assert_array_equal([int((cm.masks[l.name] == 0).sum()) for l in eng.layers],
                                  pruned_counts(eng.layers, cm.plan))


def test_export_refuses_a_non_empty_directory(tmp_path):
    from search.export.outdir import prepare_dir

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="--force"):
        prepare_dir(tmp_path / "out", force=False)
    prepare_dir(tmp_path / "out", force=True)
    assert not any((tmp_path / "out").iterdir())


def test_errors_are_one_line(study_env, tmp_path, capsys):
    results, study, trial = study_env
    failed = [t.number for t in study.get_trials() if t.state == optuna.trial.TrialState.FAIL][0]
    cases = [
        (["export", "--study", "nope", "--trial", "0"], "unknown study"),
        (["export", "--study", "exp", "--trial", "999"], "no trial 999"),
        (["export", "--study", "exp", "--trial", str(failed)], "not complete"),
    ]
    for argv, msg in cases:
        capsys.readouterr()
        assert cli.main([*argv, "--results-dir", str(results), "--out", str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err.strip()
        assert msg in err and "\n" not in err


def test_measure_errors_are_one_line(tmp_path, capsys):
    # not an export, a corrupt config, a corrupt model, no directory
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "config.json").write_text('{"hello": 1}')
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text('{"format": "hwcompress-export/1", "model": {"input_shape": [8, 8, 1]}}')
    (tmp_path / "broken" / "model.onnx").write_bytes(b"not a model")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "config.json").write_text("{oops")
    for d, msg in (("foreign", "not an hwcompress export"), ("broken", "corrupt"), ("junk", "corrupt"),
                   ("missing", "does not exist")):
        capsys.readouterr()
        assert cli.main(["measure", str(tmp_path / d), "--runs", "1"]) == 2
        err = capsys.readouterr().err.strip()
        assert msg in err and "\n" not in err, err


def test_export_of_a_weights_study_reproduces_the_searched_quality(tmp_path):
    """Regression: a study searched on the user's own weights (--weights) exported with the
    zoo baseline's cache key check and failed ("the cached baseline differs"); the export must
    rebuild the same baseline as the search and give back the quality the trial stored."""
    results = results_dir(tmp_path)
    task = models.get_task("lenet300", "digits")
    params, _ = train_baseline(task, cache_dir=results / "cache")
    mine = tmp_path / "mine.safetensors"
    save_params(params, mine)
    assert start_search(results, "mine", 1, "--weights", str(mine), "--k", "1") == 0
    study = optuna.load_study(study_name="mine", storage=f"sqlite:///{results / 'studies.db'}")
    trial = next(t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE)
    out = tmp_path / "out"
    assert cli.main(["export", "--study", "mine", "--trial", str(trial.number), "--results-dir", str(results),
                     "--out", str(out)]) == 0
    c = json.loads((out / "config.json").read_text())
    # "before": same baseline, plan, fine-tuning (K=1, same seed and steps) and split as the search
    assert c["retrain"]["before"]["val"] == pytest.approx(trial.user_attrs["quality"], abs=1e-6)
    assert c["retrain"]["default"] and c["retrain"]["steps"] == RETRAIN_FACTOR * 3  # tests.support: 3 steps


def test_export_retrains_longer_than_the_search_and_reports_before_and_after(exported):
    """The default export fine-tunes RETRAIN_FACTOR x the study's steps on a cosine schedule and
    records the budget with validation and test quality before (the search's fine-tune) and
    after (the exported weights); --finetune-steps overrides the budget."""
    _, runs = exported
    rc, text, c = runs["default"]
    assert rc == 0
    r, q = c["retrain"], c["quality"]
    assert (r["default"], r["factor"], r["search_steps"], r["steps"], r["schedule"]) == \
        (True, RETRAIN_FACTOR, 2, 2 * RETRAIN_FACTOR, "cosine")  # study_env searched with 2 steps
    assert (c["finetune"]["steps"], c["finetune"]["schedule"]) == (2 * RETRAIN_FACTOR, "cosine")
    assert (r["before"]["steps"], r["before"]["schedule"]) == (2, "constant")  # what the study ran
    assert r["kept"] == "after"  # the retrain is better on validation here
    assert r["after"] == {"steps": 2 * RETRAIN_FACTOR, "schedule": "cosine", "val": q["val_after_finetune"],
                          "test": q["test"]}  # the exported weights
    for d in (r["before"], r["after"]):
        assert 0.0 <= d["val"] <= 1.0 and 0.0 <= d["test"] <= 1.0
    assert r["examples"] == {"val": 180, "test": 360}  # digits: one validation example is 0.56 points
    # no --lr given: RETRAIN_LR_FACTOR x the study's, the plan's pruning ramped up on the way
    assert r["learning_rate"] == c["finetune"]["learning_rate"] == pytest.approx(RETRAIN_LR_FACTOR * 5e-4)
    assert (r["lr_factor"], r["search_learning_rate"], r["pruning"]) == (RETRAIN_LR_FACTOR, 5e-4, "gradual")
    assert (f"retrain: {2 * RETRAIN_FACTOR} steps, cosine learning rate from {r['learning_rate']:g} "
            f"({RETRAIN_LR_FACTOR:g}x the study's 0.0005), gradual pruning (default: {RETRAIN_FACTOR}x the study's 2)") in text
    assert f"accuracy before, the search's fine-tune (2 steps): val {r['before']['val']:.4f}, test {r['before']['test']:.4f}" in text
    assert f"accuracy after, exported ({2 * RETRAIN_FACTOR} steps): val {r['after']['val']:.4f}" in text
    # --finetune-steps sets the budget; "before" is still the search's fine-tune, measured the same way
    rc, text, c4 = runs["four"]
    assert rc == 0 and "(--finetune-steps)" in text
    r4 = c4["retrain"]
    assert (r4["default"], r4["steps"], r4["schedule"]) == (False, 4, "cosine")
    assert r4["before"] == r["before"]  # deterministic: same plan, baseline, seed and steps


def test_the_default_retrain_budget_is_the_one_the_cli_names():
    from search.export.retrain import retrain_config

    ft = FinetuneConfig(steps=300, learning_rate=1e-3, distill=True, k=4)
    r = retrain_config(ft)
    assert (r.steps, r.schedule, r.k) == (RETRAIN_FACTOR * 300, "cosine", 1)
    # learning-rate rewinding and Zhu & Gupta's ramp by default, the rest as the search's
    assert (r.learning_rate, r.pruning, r.distill) == (RETRAIN_LR_FACTOR * 1e-3, "gradual", True)
    assert retrain_config(ft, 0).steps == 0 and retrain_config(ft, 7).steps == 7
    # too few steps for the ramp's mask updates: the search's own pruning, not an error
    assert (retrain_config(ft, 1).pruning, retrain_config(ft, 7).pruning) == ("one-shot", "gradual")
    assert retrain_config(ft, None, None, "one-shot").pruning == "one-shot"
    with pytest.raises(UserError, match="--pruning gradual cannot reach"):
        retrain_config(ft, 1, None, "gradual")  # asked for: its error, not a silent fallback
    # at the search's own steps, the search's fine-tune (its schedule), which the export warning advises
    assert retrain_config(ft, 300) == dataclasses.replace(ft, k=1)
    # --lr: learning-rate rewinding; at the search's steps but another rate it is a cosine retrain
    assert (retrain_config(ft, None, 3e-3).learning_rate, retrain_config(ft, 300, 3e-3).schedule) == (3e-3, "cosine")
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices["export"]
    help_text = next(a.help for a in sub._actions if a.dest == "finetune_steps")
    assert f"default: {RETRAIN_FACTOR}x the study's" in help_text


def test_the_export_keeps_the_better_fine_tune_on_validation_unless_asked_to_compress_only():
    from search.export.retrain import better

    q = lambda val, steps=10: {"val": val, "test": 0.5, "steps": steps}
    assert better(None, q(0.8)) == "after"  # nothing to compare with
    assert better(q(0.9), q(0.8)) == "before" and better(q(0.8), q(0.9)) == "after"
    assert better(q(0.9), q(0.9)) == "after"  # a tie keeps the longer retrain
    assert better(q(0.9), q(None)) == "before" and better(q(None), q(0.8)) == "after"  # a diverged one never wins
    assert better(q(0.9), q(0.1, steps=0)) == "after"  # --finetune-steps 0: compressed only, as asked
