"""Multi-fidelity trials (search.study.pruning, search.engine.rungs): the rules agree with
Optuna's pruners on a single objective, rungs never recompile, a stopped trial is stored as
pruned and never reaches a front, the pruner and its rungs are part of the study record and
survive a resume, and bad flags are one-line errors."""
from __future__ import annotations

import dataclasses
import os
import signal

import numpy as np
import optuna
import pytest
from optuna.trial import TrialState

import models
from models.task import TrainConfig
from models.train import train_baseline
from search import cli
from search.api import make_spec, search
from search.compression.plan import dense_plan, make_plan
from search.engine.compiles import count_compiles
from search.engine import rungs as rungs_module
from search.engine.config import FinetuneConfig
from search.engine.finetune import Engine
from search.engine.rungs import regroup
from search.errors import UserError
from search.report.view import pareto_frame
from search.study import storage as S
from search.study.create import finished_count
from search.study.loop import _CtrlC
from search.study.pruning import (PrunerConfig, bracket_of, default_rungs, make_pruner, promotable,
                                  promotion_ranks)
from search.study.spec import StudySpec
from search.study.workers import run_worker
from tests.support import SEARCH, results_dir, shared_cache, start_search

optuna.logging.set_verbosity(optuna.logging.WARNING)
FT = FinetuneConfig(steps=9, batch_size=32, k=2, calib_examples=64)
UNBOUNDED = {"latency_ms": None, "memory_kb": None, "size_kb": None}


# ------------------------------------------------------------------ the rules, against Optuna's


def _optuna_decisions(pruner: optuna.pruners.BasePruner, values: np.ndarray, name: str) -> list[tuple[bool, ...]]:
    """Optuna's own should_prune, one trial after another reporting values[i] at steps 1 and 3
    (rungs at 1/9 and 1/3 of 9 steps, eta 3): per trial, (stopped at step 1, stopped at step 3)."""
    study = optuna.create_study(study_name=name, direction="maximize", pruner=pruner)
    out = []
    for v1, v3 in values:
        t = study.ask()
        t.report(float(v1), 1)
        if t.should_prune():
            study.tell(t, state=TrialState.PRUNED)
            out.append((True, False))
            continue
        t.report(float(v3), 3)
        stop = t.should_prune()
        study.tell(t, state=TrialState.PRUNED) if stop else study.tell(t, float(v3))
        out.append((False, stop))
    return out


def _our_decisions(values: np.ndarray, name: str, hyperband: bool) -> list[tuple[bool, ...]]:
    """The same sequence through pruning's rules, quality the only objective."""
    seen: dict[tuple[int, int], list[float]] = {}  # (bracket, rung) -> values recorded there
    out = []
    for number, row in enumerate(values):
        b = bracket_of(name, number, 2, 3) if hyperband else 0
        stops = []
        for rung, v in enumerate(row):
            seen.setdefault((b, rung), []).append(float(v))
            ranks = promotion_ranks(-np.array(seen[(b, rung)])[:, None])
            stops.append(rung >= b and not promotable(int(ranks[-1]), ranks, 3))
            if stops[-1]:
                break
        out.append(tuple(stops + [False] * (2 - len(stops))))
    return out


@pytest.mark.parametrize("hyperband", [False, True], ids=["sha", "hyperband"])
def test_with_quality_alone_the_rules_are_optunas_pruners(hyperband):
    rng = np.random.default_rng(3)
    values = np.round(rng.uniform(0.5, 1.0, (60, 2)), 1)  # coarse: ties happen, as on a small split
    name = "parity"
    pruner = (optuna.pruners.HyperbandPruner(min_resource=1, max_resource=9, reduction_factor=3) if hyperband
              else optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3))
    theirs = _optuna_decisions(pruner, values, name)
    assert any(s for d in theirs for s in d) and not all(d[0] for d in theirs)  # both outcomes occur
    assert _our_decisions(values, name, hyperband) == theirs


def test_a_small_plan_competes_with_plans_as_small():
    # loss rows: (-quality, size); the 10x smaller plan of lower quality is dominated by no one
    loss = np.array([[-0.98, 100.0], [-0.90, 10.0], [-0.95, 100.0], [-0.85, 12.0]])
    ranks = promotion_ranks(loss)
    assert list(ranks) == [0, 0, 1, 1]  # the front's two ends tie; the last is dominated only by the small plan
    assert [promotable(int(r), ranks, 3) for r in ranks] == [True, True, False, False]
    assert promotable(0, [0], 3) and not promotable(1, [0, 1], 3)  # the first trials: only the undominated go on


def test_about_one_in_eta_goes_on_even_when_most_trials_are_undominated():
    """Nine trials on one front (each smaller plan a little worse): the rule that kept every
    undominated trial let all nine go on; the front's two ends and the one with the widest gap
    around it (crowding distance) are the three that do."""
    q = np.linspace(0, 1, 9)
    loss = np.stack([-q, 10 * q + q ** 2], axis=1)  # quality up, size up faster: the gaps widen with q
    ranks = promotion_ranks(loss)
    go = [promotable(int(r), ranks, 3) for r in ranks]
    assert sum(go) == 3 and go[0] and go[-1] and go[-2]
    worse = np.vstack([loss, loss + 0.5])  # a second, dominated front ranks after the whole first
    assert promotion_ranks(worse)[9:].min() > promotion_ranks(worse)[:9].max()
    assert list(promotion_ranks(np.array([[1.0], [1.0], [0.5], [2.0]]))) == [1, 1, 0, 2]  # one objective: its order


def test_default_rungs_and_bad_flags_are_one_line_errors():
    assert default_rungs(150) == (17, 50) and default_rungs(3) == (1,) and default_rungs(1) == ()
    assert make_pruner(None, None, 150) is None  # not chosen: the study's own, or the default
    assert make_pruner("sha", None, 90) == PrunerConfig(kind="sha", rungs=(10, 30))
    assert make_pruner("hyperband", [5, 20], 90).rungs == (5, 20)
    for kind, rungs, steps, match in (
        ("fast", None, 150, r"--pruner 'fast' is unknown: use one of none, sha, hyperband"),
        ("sha", [200], 150, r"--rungs 200: each rung must be a fine-tune step in 1\.\.149 \(below --finetune-steps 150\)"),
        ("sha", [50, 17], 150, r"strictly ascending, e.g. --rungs 17,50"),
        ("sha", [0], 150, r"in 1\.\.149"),
        ("none", [5], 150, r"--rungs 5 needs --pruner sha or hyperband"),
        ("sha", None, 1, r"--pruner sha needs --finetune-steps of at least 2"),
    ):
        with pytest.raises(UserError, match=match):
            make_pruner(kind, rungs, steps)


def test_bad_flags_through_the_cli(tmp_path, capsys):
    results = str(results_dir(tmp_path))
    for extra, words in ((["--pruner", "fast"], "--pruner 'fast' is unknown"),
                         (["--pruner", "sha", "--rungs", "200"], "--rungs 200: each rung must be a fine-tune step in 1..2"),
                         (["--pruner", "sha", "--rungs", "one"], "--rungs 'one': give fine-tune steps as whole numbers")):
        assert cli.main(["search", *SEARCH, "--study", "bad", "--results-dir", results, *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and words in err and "\n" not in err
    assert not (tmp_path / "results" / "studies.db").exists()  # refused before any storage was made


def test_ctrl_c_waits_for_a_rung_decision_to_be_stored():
    reached = False
    # Python's own handler, as in a terminal: a shell starting a command in the background
    # ignores SIGINT for it, and a Ctrl-C the caller ignores stays ignored (_CtrlC keeps the
    # caller's handler)
    outer = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with _CtrlC() as ctrl_c, ctrl_c.allowed():  # as during fine-tuning
            with pytest.raises(KeyboardInterrupt):
                with ctrl_c.held():  # as while a rung's decision writes the storage
                    os.kill(os.getpid(), signal.SIGINT)  # to the process, as a terminal's Ctrl-C is
                    reached = True
    finally:
        signal.signal(signal.SIGINT, outer)
    assert reached


# ------------------------------------------------------------------ the engine


@pytest.fixture(scope="module")
def base():
    task = dataclasses.replace(models.get_task("lenet300", "digits"), train=TrainConfig(steps=150, batch_size=64))
    params, info = train_baseline(task, cache_dir=shared_cache())  # trained once per session
    return task, params, info


@pytest.fixture(scope="module")
def engine(base):
    task, params, _ = base
    return Engine(task, params, FT)


def test_rungs_never_recompile_and_finished_plans_are_a_plain_runs(engine):
    plans = [make_plan([0.5, 0.9, 0.3]), make_plan([0.95, 0.95, 0.9]), dense_plan(3)]  # K=2: two groups, one padded
    plain = engine.run(plans)  # every function compiled
    seen = []

    def on_rung(step, metric, live):
        seen.append((step, metric.copy(), live.copy()))
        return np.array([True, False, True])  # the second plan stops at the first rung

    with count_compiles() as c:
        r = engine.run(plans, rungs=(1, 3), on_rung=on_rung)
    assert c.count == 0
    assert [s for s, _, _ in seen] == [1, 3] and list(seen[1][2]) == [True, False, True]
    assert list(r.stopped) == [False, True, False] and list(r.steps) == [9, 1, 9]
    assert r.metric[1] == seen[0][1][1]  # a stopped plan's result is its rung's
    np.testing.assert_array_equal(r.metric[[0, 2]], plain.metric[[0, 2]])  # evaluating at rungs changes nothing
    with pytest.raises(UserError, match=r"rungs \[9\] are not fine-tune steps in 1\.\.8"):
        engine.run(plans, rungs=(9,))


def test_plans_that_go_on_are_packed_again_and_a_lone_one_runs_by_itself(engine, monkeypatch):
    """After a rung, the plans that go on leave the slots of those that stopped: two half-empty
    groups of K become one, with the same results (the state moves with the plans), and where the
    measured timings say one plan alone costs less than a group of K, a lone survivor runs with
    K = 1 (its functions compile at that first rung only)."""
    plans = [make_plan([0.5, 0.9, 0.3]), make_plan([0.95, 0.95, 0.9]), dense_plan(3), make_plan([0.8, 0.5, 0.5])]
    plain = engine.run(plans)
    packed = []

    def spy(groups, live, k, timings):
        out = regroup(groups, live, k, timings)
        packed.append(([list(idx) for idx, _ in groups], [list(idx) for idx, _ in out]))
        return out

    monkeypatch.setattr(rungs_module, "regroup", spy)
    monkeypatch.setattr(engine, "known_timings", {2: 1.0})  # K = 1 unknown: leftovers stay in a padded group
    r = engine.run(plans, rungs=(1, 3), on_rung=lambda s, m, live: np.array([True, False, False, True]))
    assert packed[0] == ([[0, 1], [2, 3]], [[0, 3]])  # groups {0, 1} and {2, 3}: one group of the two left
    assert list(r.k) == [2, 2, 2, 2] and list(r.steps) == [9, 1, 1, 9]
    np.testing.assert_array_equal(r.metric[[0, 3]], plain.metric[[0, 3]])
    packed.clear()
    engine.known_timings = {1: 0.4, 2: 1.0}  # one plan alone: 0.4 s a step against 2 x 1.0 for a group

    def two_then_one(step, metric, live):
        return np.array([False, False, True, True]) if step == 1 else np.array([False, False, False, True])

    with count_compiles() as c:
        r = engine.run(plans, rungs=(1, 3), on_rung=two_then_one)
    assert c.count > 0  # K = 1's step and evaluation, at this first lone plan
    assert packed[1] == ([[2, 3]], [[3]]) and list(r.k) == [2, 2, 2, 1]
    np.testing.assert_allclose(r.metric[3], plain.metric[3], atol=2e-3)  # K = 1 and K = 2 round apart
    with count_compiles() as c:
        again = engine.run(plans, rungs=(1, 3), on_rung=two_then_one)
    assert c.count == 0 and again.metric[3] == r.metric[3]


# ------------------------------------------------------------------ the search


def _search(base, url, n, engine, **spec_kw):
    task, params, info = base
    spec = make_spec(model="lenet300", dataset="digits", profile="mobile-cpu", budget=UNBOUNDED, finetune=FT,
                     n_trials=n, **spec_kw)
    return search(spec, url, "results", study_name="t", task=task, params=params, baseline=info, engine=engine,
                  batch=4, warm_start=False)


def test_a_stopped_trial_is_pruned_with_its_last_quality_and_never_on_the_front(base, engine, tmp_path):
    url = f"sqlite:///{tmp_path}/studies.db"
    study = _search(base, url, 12, engine, pruner="sha")
    trials = study.get_trials()
    assert study.user_attrs["spec"]["pruner"] == {"kind": "sha", "rungs": [1, 3], "reduction_factor": 3}
    stopped = [t for t in trials if t.user_attrs.get("stopped_at") is not None]
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    assert stopped and done and len(stopped) + len(done) == 12
    assert finished_count(trials) == 12  # --trials counts the stopped trials
    front = set(pareto_frame(study)["trial"])
    for t in stopped:
        rungs = t.user_attrs["rungs"]
        assert t.state == TrialState.PRUNED and t.values is None and t.number not in front
        assert t.user_attrs["stopped_at"] == max(map(int, rungs)) and t.user_attrs["quality"] == rungs[str(t.user_attrs["stopped_at"])]
    assert all(set(t.user_attrs["rungs"]) == {"1", "3"} and t.values[0] == t.user_attrs["quality"] for t in done)
    assert front <= {t.number for t in done}
    from search.report.studies import list_studies
    from search.study.storage import open_storage

    row, = list_studies(open_storage(url, str(tmp_path)))  # `hwcompress studies` tells them apart
    assert (row["stopped"], row["infeasible"], row["complete"]) == (len(stopped), 0, len(done))
    from search.report.text import front_table, markdown
    from search.report.view import read_study

    view = read_study(study)  # and so does the report: stopped at a rung, not "never trained"
    t = view.trials.set_index("trial")
    for s in stopped:
        assert t.loc[s.number, "stopped"] and not t.loc[s.number, "trained"]
        assert t.loc[s.number, "reason"] == f"stopped by the pruner at step {s.user_attrs['stopped_at']}"
    assert f"{len(done)} trained, {len(stopped)} stopped at a rung (--pruner)" in markdown(view)
    assert str(front_table(view).title).endswith(f"/ 12 trials ({len(stopped)} stopped at a rung)")  # the terminal's


def test_the_pruner_and_rungs_are_recorded_and_survive_a_resume(base, engine, tmp_path):
    url = f"sqlite:///{tmp_path}/studies.db"
    _search(base, url, 4, engine, pruner="hyperband", rungs=[2, 5])
    study = _search(base, url, 8, engine)  # no pruner named: the study's own
    spec = StudySpec.of_study(study)
    assert spec.pruner == PrunerConfig(kind="hyperband", rungs=(2, 5))
    assert all(set(t.user_attrs["rungs"]) <= {"2", "5"} and "bracket" in t.user_attrs for t in study.get_trials())
    assert finished_count(study.get_trials()) == 8
    with pytest.raises(UserError, match=r"created with pruner.rungs=\[2, 5\] but this run asks for pruner.rungs=\[1, 3\]"):
        _search(base, url, 12, engine, pruner="hyperband")


def test_a_record_older_than_rungs_resumes_without_a_pruner(base, engine, tmp_path):
    url = f"sqlite:///{tmp_path}/studies.db"
    study = _search(base, url, 2, engine, pruner="none")
    old = {k: v for k, v in study.user_attrs["spec"].items() if k != "pruner"}  # as the previous version stored it
    study.set_user_attr("spec", old)
    assert StudySpec.of_study(study).pruner is None
    study = _search(base, url, 4, engine)
    assert finished_count(study.get_trials()) == 4 and not any("rungs" in t.user_attrs for t in study.get_trials())


def test_the_cli_records_its_rungs_and_a_worker_keeps_them(tmp_path):
    results = results_dir(tmp_path)
    assert start_search(results, "p", 2, "--pruner", "sha", "--rungs", "1,2", "--k", "1") == 0
    assert start_search(results, "p", 2, "--k", "1") == 0  # a resume without the flags: nothing to do, no conflict
    st = S.load_study("p", S.open_storage(None, results))
    assert st.user_attrs["spec"]["pruner"] == {"kind": "sha", "rungs": [1, 2], "reduction_factor": 3}
    st.set_user_attr("spec", {**st.user_attrs["spec"], "n_trials": 4})  # two more, for a worker
    assert run_worker("p", None, str(results), k=1, log=False) == 2
    trials = S.load_study("p", S.open_storage(None, results)).trials
    assert len(trials) == 4 and all(set(t.user_attrs["rungs"]) <= {"1", "2"} for t in trials)
