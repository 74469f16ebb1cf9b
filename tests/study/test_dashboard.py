"""optuna-dashboard, the way Optuna users look at studies, on a finished hwcompress study.

The dashboard's WSGI app is opened with the storage URL exactly as a user passes it to
`optuna-dashboard URL`, and its JSON API (what the web page draws) is read through plain WSGI
calls, no browser and no server: the study, its objectives' names, every trial with its values,
the budgets' constraint values with the feasibility verdict, and the per-layer plan.
SQLite always; PostgreSQL when .ci/services.sh started one (HWCOMPRESS_TEST_POSTGRES).
"""
from __future__ import annotations

import json
import wsgiref.util

import optuna
import optuna_dashboard
import pytest

from tests.support import results_dir, start_search

# a size budget (kB) that splits the four seeded plans of lenet300 on digits (about 12, 44,
# 68 and 20 kB): two trained, two over budget and never trained
SIZE_KB = 30
BUDGETS = {"latency_ms", "memory_kb", "size_kb"}  # every budget is one constraint


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/studies.db"
    return request.getfixturevalue("pg_url")  # skipped (or failed in CI) without a server


def _get(app, path: str) -> dict:
    """GET `path` from a WSGI app as a server would call it; the decoded JSON body."""
    environ: dict = {}
    wsgiref.util.setup_testing_defaults(environ)
    path, _, query = path.partition("?")
    environ.update(REQUEST_METHOD="GET", PATH_INFO=path, QUERY_STRING=query)
    status: list[str] = []
    body = b"".join(app(environ, lambda s, headers, exc_info=None: status.append(s)))
    assert status and status[0].startswith("200"), (path, status, body[:500])
    return json.loads(body)


def test_dashboard_shows_a_finished_study(url, tmp_path):
    results = results_dir(tmp_path)
    assert start_search(results, "dash", 4, "--storage", url, "--size-kb", str(SIZE_KB)) == 0
    study = optuna.load_study(study_name="dash", storage=url)
    app = optuna_dashboard.wsgi(url)

    [summary] = _get(app, "/api/studies")["study_summaries"]
    assert summary["study_name"] == "dash"
    assert summary["directions"] == ["maximize", "minimize", "minimize"]
    detail = _get(app, f"/api/studies/{summary['study_id']}")
    assert detail["objective_names"] == ["quality", "latency_ms", "memory_kb"]  # study.set_metric_names
    # the front it draws is Optuna's, which is hwcompress's: over-budget trials have no values
    assert sorted(t["number"] for t in detail["best_trials"]) == sorted(t.number for t in study.best_trials)

    shown = {t["number"]: t for t in detail["trials"]}
    assert sorted(shown) == [t.number for t in study.trials] == [0, 1, 2, 3]
    layers = [layer["name"] for layer in study.user_attrs["layers"]]
    assert len(layers) == 3  # lenet300: three Dense layers
    verdicts = []
    for t in study.trials:
        d = shown[t.number]
        attrs = {a["key"]: a["value"] for a in d["user_attrs"]}
        # feasibility: each budget's constraint value (<= 0 is within budget), and the verdict
        constraints = json.loads(attrs["constraints"])
        assert set(constraints) == BUDGETS and constraints == pytest.approx(t.constraints)
        feasible = all(v <= 0 for v in constraints.values())
        assert attrs["feasible"] == str(feasible)
        verdicts.append(feasible)
        if feasible:
            assert d["state"] == "Complete" and d["values"] == pytest.approx(t.values)
        else:
            assert d["state"] == "Pruned" and "values" not in d
            assert "size" in attrs["infeasible_reason"]
        # the per-layer plan: whole (not cut at the dashboard's 1024 characters) and as params
        plan = json.loads(attrs["plan"])
        assert plan == t.user_attrs["plan"] and all(len(v) == len(layers) for v in plan.values())
        params = {p["name"]: p["param_external_value"] for p in d["params"]}
        for name in layers:
            assert f"{name}.ratio" in params and f"{name}.weight_bits" in params, sorted(params)
    assert sorted(verdicts) == [False, False, True, True], (
        f"--size-kb {SIZE_KB} no longer splits the seeded plans; pick a size between theirs"
    )
