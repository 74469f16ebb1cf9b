"""The search loop end to end on digits + lenet300: tiny budgets, few steps, tmp SQLite."""
import dataclasses

import numpy as np
import optuna
import pytest
from optuna.trial import TrialState

import models
from models.task import TrainConfig
from search.api import make_spec, search
from search.engine.config import FinetuneConfig
from search.engine.finetune import Engine
from search.errors import UserError
from search.study.loop import finished_count
from tests.support import shared_cache

optuna.logging.set_verbosity(optuna.logging.WARNING)
FT = FinetuneConfig(steps=4, batch_size=32, k=2, calib_examples=64)
UNBOUNDED = {"latency_ms": None, "memory_kb": None, "size_kb": None}


class RecordingEngine(Engine):
    """The real engine, also remembering how many plans each run() call trained."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.trained: list[int] = []

    def run(self, plans, *a, **kw):
        if kw.get("finetune", True):
            self.trained.append(int(plans.batch_shape[0]))
        return super().run(plans, *a, **kw)


@pytest.fixture(scope="module")
def base():
    task = models.get_task("lenet300", "digits")
    task = dataclasses.replace(task, train=TrainConfig(steps=150, batch_size=64))
    from models.train import train_baseline

    params, info = train_baseline(task, cache_dir=shared_cache())  # trained once per session
    return task, params, info


@pytest.fixture(scope="module")
def shared_engine(base):
    """One engine (one XLA compile) for every test that does not need another config."""
    task, params, _ = base
    return RecordingEngine(task, params, FT)


@pytest.fixture
def engine(shared_engine):
    shared_engine.trained.clear()
    return shared_engine


def _search(base, storage, n, *, budget=UNBOUNDED, engine, **kw):
    """search() of the lenet300/digits record with `n` trials, on the module's baseline and engine.

    The budget defaults to none (every plan feasible unless a test says otherwise)."""
    task, params, info = base
    spec = make_spec(model="lenet300", dataset="digits", profile="mobile-cpu", budget=budget, finetune=FT, n_trials=n)
    results = kw.pop("results_dir", "results")
    opts = dict(study_name="t", task=task, params=params, baseline=info, engine=engine, batch=4)
    opts.update(kw)
    return search(spec, storage, results, **opts), engine


def _storage(tmp_path):
    return f"sqlite:///{tmp_path}/studies.db"


def _mid_budget(base):
    """A size budget between the smallest reachable size and the int8 size: some plans break it."""
    task, params, _ = base
    dense_kb = sum(np.size(x) for x in __import__("jax").tree.leaves(params)) * 4 / 1024
    return {"latency_ms": None, "memory_kb": None, "size_kb": dense_kb / 12}


def test_trials_store_attrs_and_infeasible_plans_are_not_trained(base, engine, tmp_path):
    study, _ = _search(base, _storage(tmp_path), 8, budget=_mid_budget(base), engine=engine)
    trials = study.get_trials()
    assert finished_count(trials) == 8
    feasible = [t for t in trials if t.user_attrs["feasible"]]
    infeasible = [t for t in trials if not t.user_attrs["feasible"]]
    assert infeasible and feasible  # the budget cuts through the space
    assert sum(engine.trained) == len(feasible)  # only feasible plans reach fine-tuning
    for t in infeasible:
        assert t.state == TrialState.PRUNED and t.user_attrs["quality"] is None
        assert max(t.constraints.values()) > 0 and "size_kb" in t.user_attrs["infeasible_reason"]
    for t in trials:
        a = t.user_attrs
        assert set(a["costs"]) >= {"mobile-cpu", "mcu", "xeon"}  # priced on every shipped profile
        assert len(a["plan"]["ratio"]) == 3 and a["size_bytes"] > 0 and a["compression_ratio"] > 1
        assert a["constraints"] == t.constraints  # dashboard-visible copy equals Optuna's
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    assert all(0 <= t.user_attrs["quality"] <= 1 and t.values[0] == t.user_attrs["quality"] for t in done)
    assert study.user_attrs["sensitivity"]["layers"] == ["fc1", "fc2", "fc3"]
    assert trials[0].user_attrs["plan"]["weight_bits"] == [8, 8, 8]  # warm start: uniform int8 first
    assert study.metric_names == ["quality", "latency_ms", "memory_kb"]


def test_resume_continues_the_count_and_rejects_another_spec(base, engine, tmp_path):
    url = _storage(tmp_path)
    _search(base, url, 4, warm_start=False, engine=engine)
    study, _ = _search(base, url, 8, warm_start=False, engine=engine)
    trials = study.get_trials()
    assert [t.number for t in trials] == list(range(8)) and finished_count(trials) == 8
    with pytest.raises(UserError, match="budget"):
        _search(base, url, 12, warm_start=False, budget={"latency_ms": 1e3}, engine=engine)


def test_nan_trials_fail_with_a_reason_and_the_search_goes_on(base, engine, tmp_path):
    task, params, _ = base
    url = _storage(tmp_path)
    wild = Engine(task, params, dataclasses.replace(FT, learning_rate=1e38))
    study, _ = _search(base, url, 2, warm_start=False, engine=wild, batch=2)
    failed = study.get_trials(states=(TrialState.FAIL,))
    assert len(failed) == 2 and all("NaN" in t.user_attrs["fail_reason"] for t in failed)
    study, _ = _search(base, url, 4, warm_start=False, engine=engine, batch=2)
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) == 2  # two more trials ran normally


def test_impossible_budget_is_refused_before_any_training(base, tmp_path):
    task, _, _ = base
    with pytest.raises(UserError, match="smallest any plan reaches is latency_ms"):
        search(make_spec(model=task.name, dataset="digits", profile="mobile-cpu", budget={"latency_ms": 1e-9},
                         n_trials=2), _storage(tmp_path), str(tmp_path))
    assert not (tmp_path / "cache").exists()  # the baseline was never trained, nothing was written


def test_ctrl_c_keeps_completed_trials_and_resume_reruns_the_open_ones(base, engine, tmp_path, monkeypatch):
    url = _storage(tmp_path)
    real_run, calls = engine.run, []

    def run_then_interrupt(plans, *a, **kw):  # Ctrl-C arrives during the second batch
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_run(plans, *a, **kw)

    monkeypatch.setattr(engine, "run", run_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        _search(base, url, 6, warm_start=False, engine=engine, batch=2)
    monkeypatch.setattr(engine, "run", real_run)
    trials = optuna.load_study(study_name="t", storage=url).get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2 + [TrialState.FAIL] * 2
    assert all(t.user_attrs["interrupted"] for t in trials[2:])
    study, _ = _search(base, url, 6, warm_start=False, engine=engine, batch=2)
    assert finished_count(study.get_trials()) == 6  # the two interrupted trials were run again
