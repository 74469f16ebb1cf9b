"""`hwcompress export --within`: the most compressed front plan within a tolerance of the
baseline after the export's retrain (search.export.select), on a tiny real study (lenet300 on
digits) whose trials are written directly; and the bisection that orders the retrains."""
from __future__ import annotations

import json

import optuna
import pytest

import models
from models.train import train_baseline
from search import cli
from search.api import make_spec
from search.engine.config import FinetuneConfig
from search.export.select import front_by_ratio, margin, probe_order, select_within
from tests.support import results_dir

# (ratio per layer, weight bits, stored searched-quality offset from the baseline, stored ratio, feasible)
TRIALS = {
    "mild": ([0.5, 0.5, 0.0], 8, -0.01, 8.0, True),
    "ruined": ([0.99, 0.99, 0.99], 2, -0.02, 400.0, True),  # nothing survives: far below after any retrain
    "dominated": ([0.6, 0.6, 0.0], 8, -0.015, 6.0, True),  # less compressed and worse than "mild"
    "over budget": ([0.9, 0.9, 0.5], 4, -0.005, 30.0, False),
    "screened out": ([0.99, 0.99, 0.99], 2, -0.5, 500.0, True),  # 50 points below at the search's budget
    "dense": ([0.0, 0.0, 0.0], 8, -0.001, 4.0, True),
}


def _study(results, name: str, which: list[str], base: dict) -> dict[str, int]:
    from search.compression.plan import UNSTRUCTURED, make_plan
    from search.study.space import plan_to_dict

    study = optuna.create_study(study_name=name, storage=f"sqlite:///{results / 'studies.db'}",
                                directions=["maximize", "minimize"])
    spec = make_spec(model="lenet300", dataset="digits", profile="mobile-cpu", objectives=("quality", "size"),
                     finetune=FinetuneConfig(steps=3, batch_size=64, learning_rate=5e-4))
    study.set_user_attr("spec", spec.to_attrs())
    study.set_user_attr("baseline", {k: base[k] for k in ("val_metric", "test_metric", "cache_key")})
    numbers = {}
    for label in which:
        ratio, bits, dq, cr, feasible = TRIALS[label]
        q = base["val_metric"] + dq
        study.add_trial(optuna.trial.create_trial(values=[q, 100.0 / cr], user_attrs={
            "plan": plan_to_dict(make_plan(ratio, UNSTRUCTURED, [bits] * 3, [8, 8, 8])), "quality": q,
            "compression_ratio": cr, "feasible": feasible}))
        numbers[label] = len(study.trials) - 1
    return numbers


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    results = results_dir(tmp_path_factory.mktemp("select"))
    _, base = train_baseline(models.get_task("lenet300", "digits"), cache_dir=results / "cache")
    return results, base, _study(results, "sel", list(TRIALS), base), _study(results, "ruin", ["ruined"], base)


def test_candidates_are_the_screened_front_most_compressed_first(env):
    results, base, numbers, _ = env
    study = optuna.load_study(study_name="sel", storage=f"sqlite:///{results / 'studies.db'}")
    front = front_by_ratio(study, 3.0)
    # dominated, over budget and screened-out trials are not candidates
    assert [c.trial for c in front] == [numbers["ruined"], numbers["mild"], numbers["dense"]]
    assert [c.ratio for c in front] == [400.0, 8.0, 4.0]
    assert [c.trial for c in front_by_ratio(study, 100.0)][:2] == [numbers["screened out"], numbers["ruined"]]


def test_a_trial_as_good_as_the_float32_baseline_is_within_zero_points(tmp_path):
    """The baseline's metric is stored as float32, a trial's as float64: 177/180 of each must
    compare equal (regression: `--within 0` refused a plan exactly as good as the baseline)."""
    import numpy as np

    study = optuna.create_study(directions=["maximize", "minimize"])
    study.set_user_attr("baseline", {"val_metric": float(np.float32(177 / 180))})
    study.add_trial(optuna.trial.create_trial(values=[177 / 180, 1.0], user_attrs={
        "plan": {}, "quality": 177 / 180, "compression_ratio": 5.0, "feasible": True}))
    assert float(np.float32(177 / 180)) != 177 / 180
    assert [c.trial for c in front_by_ratio(study, 0.0)] == [0]


def test_the_confidence_margin_is_the_paired_standard_error_times_the_normal_quantile():
    import numpy as np

    base = np.ones(400)
    plan = base.copy()
    plan[:20] = 0  # 20 of 400 examples lost: a drop of 5 points
    se = np.std(plan - base, ddof=1) / np.sqrt(400)
    assert margin(plan, base, 0.5) == 0.0  # the point estimate
    assert margin(plan, base, 0.8) == pytest.approx(0.8416212 * se, rel=1e-6)
    assert margin(plan, base, 0.95) == pytest.approx(1.6448536 * se, rel=1e-6)
    assert margin(base, base, 0.99) == 0.0  # a plan that agrees on every example: no doubt about it
    swapped = plan.copy()
    swapped[20:40] = 0
    swapped[:20] = 1  # the same accuracy, 40 disagreements: a wider bound
    assert margin(swapped, plan, 0.8) > margin(plan, base, 0.8)


def test_within_holds_with_the_confidence_asked_for(env):
    """Each candidate's bound is its validation quality less the paired margin against the
    baseline's per-example quality: equal to it at confidence 0.5, below it at 0.99 for a plan
    that disagrees with the baseline on some example, and a plan passes only on its bound."""
    results, base, numbers, _ = env
    study = optuna.load_study(study_name="sel", storage=f"sqlite:///{results / 'studies.db'}")
    _, point = select_within(study, 30, confidence=0.5, results_dir=str(results))
    pick, sure = select_within(study, 30, confidence=0.99, results_dir=str(results))
    assert [c.trial for c in point] == [c.trial for c in sure] == [numbers["ruined"], numbers["mild"]]
    for a, b in zip(point, sure):
        assert a.val_low == a.val and b.val == pytest.approx(a.val, abs=1e-6)  # the same retrain
        assert b.val_low <= b.val
    ruined = sure[0]
    assert ruined.val_low < ruined.val - 0.01  # ruined disagrees with the baseline on most examples
    assert pick.trial == numbers["mild"] and pick.val_low >= base["val_metric"] - 0.30


def test_probe_order_bisects_for_the_boundary_then_tries_just_beyond_it():
    calls = []

    def passes(threshold):
        def f(i):
            calls.append(i)
            return i >= threshold
        return f

    # 10 plans, the 7 least compressed pass: bisection finds index 3, then 2, 1, 0 are tried
    assert probe_order(10, 8, passes(3)) == [4, 1, 2, 3, 0] and calls == [4, 1, 2, 3, 0]
    calls.clear()
    assert probe_order(10, 3, passes(3)) == [4, 1, 2]  # the budget ends the bisection
    calls.clear()
    assert probe_order(5, 8, passes(99)) == [2, 3, 4]  # nothing passes: bisection ends at the least compressed
    assert probe_order(5, 8, passes(0)) == [2, 0]  # everything passes: the most compressed is found
    assert probe_order(1, 8, passes(0)) == [0]


def test_export_within_picks_the_most_compressed_plan_that_passes_after_the_retrain(env, tmp_path, capsys):
    results, base, numbers, _ = env
    out = tmp_path / "out"
    rc = cli.main(["export", "--study", "sel", "--within", "30", "--results-dir", str(results), "--out", str(out)])
    got = capsys.readouterr()
    text = got.out
    assert rc == 0, got.err
    c = json.loads((out / "config.json").read_text())
    sel = c["source"]["selection"]
    tried = {t["trial"]: t for t in sel["tried"]}
    assert (sel["within"], sel["screen"], sel["confidence"]) == (30.0, 30.0, 0.8)  # the screen is at least --within
    assert all(t["val_low"] <= t["val"] for t in sel["tried"])  # passed on the bound
    # bisection over [ruined, mild, dense]: mild passes, ruined fails; dense, less compressed, is not needed
    assert [t["trial"] for t in sel["tried"]] == [numbers["ruined"], numbers["mild"]]
    assert all(t["retrained"] and t["test"] is not None for t in tried.values())
    # ranked on validation only: the ruined plan fails, the mild one is the most compressed within 30 points
    assert tried[numbers["ruined"]]["val"] < base["val_metric"] - 0.30 <= tried[numbers["mild"]]["val"]
    assert c["source"]["trial"] == numbers["mild"]
    # the export retrained it the same way (same config, seed and K): the same weights, the same quality
    assert c["retrain"]["after"]["val"] == pytest.approx(tried[numbers["mild"]]["val"], abs=1e-6)
    assert c["retrain"]["after"]["test"] == pytest.approx(tried[numbers["mild"]]["test"], abs=1e-6)
    assert f"trial {numbers['mild']}: 8.00x" in text and f"exported trial {numbers['mild']} of sel" in text


def test_where_the_retrain_lowers_validation_the_export_keeps_the_searchs_own_fine_tune(env, tmp_path, capsys):
    """A retrain that ruins the plans (a learning rate of 50) must not cost the pick: each
    candidate is also fine-tuned as the search did, the better on validation is what is ranked
    and exported, and config.json says which."""
    results, base, numbers, _ = env
    out = tmp_path / "out"
    rc = cli.main(["export", "--study", "sel", "--within", "30", "--lr", "50", "--results-dir", str(results),
                   "--out", str(out)])
    got = capsys.readouterr()
    assert rc == 0, got.err
    c = json.loads((out / "config.json").read_text())
    r, tried = c["retrain"], {t["trial"]: t for t in c["source"]["selection"]["tried"]}
    assert c["source"]["trial"] == numbers["mild"] and tried[numbers["mild"]]["kept"] == "before"
    assert r["kept"] == "before" and (r["after"]["val"] is None or r["after"]["val"] < r["before"]["val"])
    # the exported weights are the search's fine-tune run again: its steps, its quality
    assert (c["finetune"]["steps"], c["finetune"]["learning_rate"]) == (3, 5e-4)
    assert r["before"]["val"] == pytest.approx(tried[numbers["mild"]]["val"], abs=1e-6)
    assert r["before"]["val"] == c["quality"]["val_after_finetune"] and r["before"]["test"] == c["quality"]["test"]
    assert "keeps the search's fine-tune" in got.out
    assert "accuracy before, the search's fine-tune (3 steps)" in got.out and ", exported" in got.out
    assert "the export keeps the search's own fine-tune" in got.out


def test_when_the_screens_most_compressed_plan_passes_the_search_goes_beyond_the_screen(env, tmp_path, capsys):
    results, base, numbers, _ = env
    out = tmp_path / "out"
    # screen 1.5 points: mild and dense are inside, ruined and screened-out (more compressed) outside
    rc = cli.main(["export", "--study", "sel", "--within", "30", "--screen", "1.5", "--results-dir", str(results),
                   "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    sel = json.loads((out / "config.json").read_text())["source"]["selection"]
    # mild, the screen's most compressed, passes: the two beyond it are retrained too, and fail
    assert [t["trial"] for t in sel["tried"]] == [numbers["screened out"], numbers["ruined"], numbers["mild"]]
    assert json.loads((out / "config.json").read_text())["source"]["trial"] == numbers["mild"]


def test_export_within_errors_are_one_line_and_name_the_flag(env, tmp_path, capsys):
    results, base, numbers, ruin = env

    def run(*args):
        capsys.readouterr()
        rc = cli.main(["export", "--results-dir", str(results), "--out", str(tmp_path / "x"), *args])
        return rc, capsys.readouterr()

    rc, got = run("--study", "ruin", "--within", "5")
    err = got.err.strip()
    assert rc == 2 and "\n" not in err and "no retrained plan is within 5" in err
    assert f"the closest, trial {ruin['ruined']}, reached val" in err
    assert f"trial {ruin['ruined']}: 400.00x" in got.out  # what was computed is printed before the error
    assert not (tmp_path / "x").exists()
    for args, flag in ((("--within", "-1"), "--within -1"), (("--within", "2", "--screen", "-1"), "--screen -1"),
                       (("--within", "1", "--candidates", "0"), "--candidates 0"),
                       (("--within", "1", "--confidence", "1"), "--confidence 1.0"),
                       (("--within", "1", "--confidence", "0.3"), "--confidence 0.3"),
                       (("--within", "0", "--screen", "0"), "no complete, feasible trial within 0")):
        rc, got = run("--study", "sel", *args)
        err = got.err.strip()
        assert rc == 2 and flag in err and "\n" not in err, err
        if "feasible" not in flag:  # bad flags are refused before anything is printed or retrained
            assert got.out == "", got.out
    rc, got = run("--study", "sel", "--trial", str(numbers["mild"]), "--candidates", "3")
    assert rc == 2 and "give --within" in got.err and "\n" not in got.err.strip()
    with pytest.raises(SystemExit):  # one of --trial and --within, not both
        cli.main(["export", "--study", "sel", "--trial", "0", "--within", "1", "--out", str(tmp_path / "y")])
