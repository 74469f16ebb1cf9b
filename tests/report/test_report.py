"""Reports from a real Optuna study in a temporary SQLite storage, filled with hand-made
trials whose Pareto fronts are known, on the study's profile and re-priced for another."""
import dataclasses
import json

import optuna
import pandas as pd
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from hw_profiles import ProfileError, load_profile
from search.api import make_spec
from search.report.files import write_report, write_view
from search.report.view import pareto_frame, read_study
from search.study.storage import load_study, open_storage
from search.cli import main
from search.errors import UserError

LAYERS = [
    {"index": 0, "name": "fc1", "path": ["fc1"], "kind": "dense", "kernel_shape": [64, 32], "in_shape": [64],
     "out_shape": [32], "groups": 1, "has_bias": True, "macs": 2048, "params": 2080},
    {"index": 1, "name": "fc2", "path": ["fc2"], "kind": "dense", "kernel_shape": [32, 10], "in_shape": [32],
     "out_shape": [10], "groups": 1, "has_bias": True, "macs": 320, "params": 330},
]
DENSE_BYTES = 4 * (2080 + 330)
pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
SENSITIVITY = {"layers": ["fc1", "fc2"], "baseline": 0.97, "prune_ratio": 0.5, "prune_loss": [0.01, 0.08],
               "bits": 4, "bits_loss": [0.02, 0.05]}


def _plan(r1, w1):
    return {"ratio": [r1, 0.0], "granularity": ["unstructured", "channel"], "weight_bits": [w1, 8],
            "act_bits": [8, 32], "quant_mode": ["uniform", "uniform"]}


def _trial(number, quality, xeon, mcu, size_kb, state=TrialState.COMPLETE, budget=2.0, told=None, **extra):
    """A trial priced on xeon (home, latency budget `budget`) and mcu: costs are (latency_ms, memory_kb)."""
    costs = {"xeon": {"latency_ms": xeon[0], "memory_kb": xeon[1], "size_kb": size_kb},
             "mcu": {"latency_ms": mcu[0], "memory_kb": mcu[1], "size_kb": size_kb}}
    cons = {"latency_ms": xeon[0] - budget}
    attrs = {"plan": _plan(0.1 * number, 4 + number % 3), "quality": quality, "costs": costs, "constraints": cons,
             "feasible": cons["latency_ms"] <= 0, "size_bytes": int(size_kb * 1024),
             "compression_ratio": DENSE_BYTES / (size_kb * 1024), **extra}
    values = (told or [quality, xeon[0], xeon[1]]) if state == TrialState.COMPLETE else None
    return create_trial(state=state, values=values, params={"x": 0.1 * number},
                        distributions={"x": FloatDistribution(0, 1)}, user_attrs=attrs,
                        system_attrs={"constraints": list(cons.values())})


@pytest.fixture(scope="module")
def storage_url(tmp_path_factory):
    """A study "s1" whose front on xeon is trials {0, 1, 5} and on mcu {1, 2}."""
    url = f"sqlite:///{tmp_path_factory.mktemp('storage')}/studies.db"
    mcu = load_profile("mcu").budget
    assert mcu.memory_kb is not None and mcu.latency_ms is not None  # the re-pricing case needs both
    lat, mem = mcu.latency_ms, mcu.memory_kb
    study = optuna.create_study(study_name="s1", storage=url, directions=["maximize", "minimize", "minimize"])
    study.set_metric_names(["quality", "latency_ms", "memory_kb"])
    spec = make_spec(model="lenet300", dataset="digits", profile="xeon",
                     budget={"latency_ms": 2.0, "memory_kb": None, "size_kb": None})
    study.set_user_attr("spec", spec.to_attrs())
    study.set_user_attr("layers", LAYERS)
    study.set_user_attr("baseline", {"metric_name": "accuracy", "val_metric": 0.97, "test_metric": 0.965})
    study.set_user_attr("sensitivity", SENSITIVITY)
    trials = [
        _trial(0, 0.95, (1.0, 50.0), (0.5 * lat, 1.5 * mem), 8.0, test_quality=0.93),  # xeon front (best); mcu: over memory
        _trial(1, 0.90, (0.5, 40.0), (0.5 * lat, 0.8 * mem), 2.0),  # both fronts
        _trial(2, 0.85, (0.6, 45.0), (0.4 * lat, 0.5 * mem), 3.0),  # dominated by 1 on xeon; mcu front
        _trial(3, None, (3.0, 10.0), (0.1 * lat, 0.1 * mem), 0.5, TrialState.PRUNED,
               infeasible_reason="over budget: latency_ms 3 > 2"),  # never trained
        _trial(4, None, (0.2, 5.0), (0.1 * lat, 0.1 * mem), 0.5, TrialState.FAIL, fail_reason="non-finite metric"),
        _trial(5, 0.80, (0.3, 30.0), (0.3 * lat, 1.2 * mem), 1.0, test_quality=0.7925),  # xeon front (fastest); mcu: over memory
    ]
    for t in trials:
        study.add_trial(t)
    optuna.create_study(study_name="empty", storage=url)
    return url


def _study(url, name="s1"):
    return load_study(name, open_storage(url))


def test_front_on_the_home_profile(storage_url):
    view = read_study(_study(storage_url))
    assert view.profile == "xeon" and not view.repriced
    assert list(view.front["trial"]) == [0, 1, 5]  # best quality first
    t = view.trials.set_index("trial")
    assert list(t["feasible"]) == [True, True, True, False, False, True]
    assert t.loc[2, "rank"] == 1 and not t.loc[2, "pareto"]
    assert "latency_ms 3 > 2" in t.loc[3, "reason"] and t.loc[4, "reason"] == "non-finite metric"
    assert t.loc[1, "summary"] == "fc1 p.10u w5 a8 | fc2 w8"
    hv = view.trials["hypervolume"].to_numpy()
    assert (hv[1:] >= hv[:-1]).all() and 0 < hv[-1] <= 1
    assert hv[2] == hv[1]  # trial 2 is dominated: no gain
    # the same profile named explicitly is not a re-pricing
    assert list(pareto_frame(_study(storage_url), "xeon")["trial"]) == [0, 1, 5]


def test_repricing_for_another_profile_changes_the_front(storage_url):
    view = read_study(_study(storage_url), "mcu")
    assert view.repriced and view.budget["memory_kb"] == load_profile("mcu").budget.memory_kb
    assert list(view.front["trial"]) == [1, 2]  # 0 and 5 break mcu's memory budget; 3 was never trained
    t = view.trials.set_index("trial")
    assert "memory_kb" in t.loc[0, "reason"]
    assert t.loc[1, "compression_ratio"] == pytest.approx(DENSE_BYTES / 2048)
    assert t.loc[1, "latency_ms"] == pytest.approx(0.5 * load_profile("mcu").budget.latency_ms)


@pytest.fixture(scope="module")
def written(storage_url, tmp_path_factory):
    """The report of s1 on its own profile, written once for the file tests."""
    return write_report(_study(storage_url), tmp_path_factory.mktemp("report") / "out")


def test_write_report_files(written):
    paths = written
    front = pd.read_csv(paths.csv)
    assert list(front["trial"]) == [0, 1, 5]
    assert front.loc[front["trial"] == 1, "fc1.weight_bits"].item() == 5
    assert front.loc[0, "quality"] == pytest.approx(0.95)
    md = paths.markdown.read_text()
    assert "| 5 | 0.8 | 0.7925 | 0.3 | 30 | 1 | 9.41 | fc1 p.50u w6 a8 \\| fc2 w8 | `hwcompress export --study s1 --trial 5 " \
           "--out exports/s1-5` |" in md  # "|" escaped in cells; x fp32 to 3 digits
    assert "Layer sensitivity" in md and "| fc2 | 0.08 | 0.05 |" in md
    names = {p.name for p in paths.pngs}
    assert names == {"pareto.png", "layers.png", "hypervolume.png", "sensitivity.png"}
    for p in paths.pngs:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000


def test_html_is_self_contained(written):
    from plotly.offline import get_plotlyjs

    html = written.html.read_text(encoding="utf-8")
    assert get_plotlyjs()[:2000] in html  # plotly.js itself is inlined
    assert "<script src=" not in html.replace(" ", "") and 'src="http' not in html and "cdn.plot.ly/plotly" not in html
    assert html.count("Plotly.newPlot") >= 4  # pareto, heat map, hypervolume, sensitivity
    assert "fc1 p.10u w5 a8" in html


def test_a_report_file_is_replaced_whole_never_rewritten_in_place(storage_url, tmp_path):
    """A reader that opened report.html (or the CSV, a plot) before a rewrite reads that whole
    version: each file is written beside it and renamed over it, so two processes writing the
    same report at once never interleave in one file."""
    view = read_study(_study(storage_url))
    paths = write_view(view, tmp_path / "r")
    files = [paths.html, paths.markdown, paths.csv, *paths.pngs]
    before = {f: f.read_bytes() for f in files}
    handles = {f: open(f, "rb") for f in files}
    try:
        write_view(dataclasses.replace(view, name="renamed"), tmp_path / "r")
        for f in files:
            assert handles[f].read() == before[f], f.name  # the old version, whole
    finally:
        for h in handles.values():
            h.close()
    assert "renamed" in paths.markdown.read_text()
    assert sorted(p.name for p in (tmp_path / "r").iterdir() if p.name.startswith(".")) == []  # no partial files left


def test_errors_are_one_line(storage_url):
    with pytest.raises(UserError, match="unknown study 'nope'.*empty, s1"):
        _study(storage_url, "nope")
    with pytest.raises(UserError, match="no finished trials"):
        read_study(_study(storage_url, "empty"))
    with pytest.raises(ProfileError, match="unknown profile 'toaster'"):
        read_study(_study(storage_url), "toaster")


def test_cli_report_and_studies(storage_url, tmp_path, capsys):
    assert main(["report", "--study", "s1", "--storage", storage_url, "--results-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "fc1 p.50u w6 a8" in out and (tmp_path / "s1" / "report.html").is_file()
    assert main(["report", "--study", "s1", "--profile", "mcu", "--storage", storage_url,
                 "--results-dir", str(tmp_path)]) == 0
    capsys.readouterr()
    assert list(pd.read_csv(tmp_path / "s1" / "on-mcu" / "pareto.csv")["trial"]) == [1, 2]
    assert main(["report", "--study", "nope", "--storage", storage_url]) == 2
    assert "unknown study 'nope'" in capsys.readouterr().err
    assert main(["studies", "--storage", storage_url, "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert set(rows) == {"empty", "s1"}
    assert (rows["s1"]["trials"], rows["s1"]["complete"], rows["s1"]["infeasible"], rows["s1"]["failed"]) == (6, 4, 1, 1)
    states = ("complete", "infeasible", "stopped", "failed", "running", "waiting")
    assert sum(rows["s1"][k] for k in states) == rows["s1"]["trials"]  # the columns add up
    assert rows["s1"]["objectives"] == ["quality", "latency_ms", "memory_kb"] and rows["s1"]["profile"] == "xeon"
    assert rows["empty"]["profile"] is None and rows["empty"]["trials"] == 0
    assert main(["studies", "--storage", storage_url]) == 0
    assert "s1" in capsys.readouterr().out
    # reading never creates a storage
    assert main(["studies", "--results-dir", str(tmp_path / "none")]) == 2
    assert "no study storage at" in capsys.readouterr().err and not (tmp_path / "none").exists()


def test_repricing_a_profile_without_stored_costs_prices_the_plans(storage_url):
    from search.cost import roofline as cost
    from search.compression.layers import Layer
    from search.compression.plan import stack_plans
    from search.study.space import plan_from_dict

    study = _study(storage_url)
    view = read_study(study, "mobile-npu")  # s1 stores costs for xeon and mcu only
    done = [t for t in study.trials if t.state == TrialState.COMPLETE]
    layers = tuple(Layer(**{**d, "path": tuple(d["path"]), "kernel_shape": tuple(d["kernel_shape"]),
                            "in_shape": tuple(d["in_shape"]), "out_shape": tuple(d["out_shape"])}) for d in LAYERS)
    want = cost.price(load_profile("mobile-npu"), layers, stack_plans([plan_from_dict(t.user_attrs["plan"]) for t in done]))
    got = view.trials.set_index("trial").loc[[t.number for t in done]]
    assert got["latency_ms"].to_numpy() == pytest.approx(list(want.latency_ms))
    assert got["memory_kb"].to_numpy() == pytest.approx(list(want.memory_kb))


def test_two_objectives_and_a_front_with_no_feasible_trial(tmp_path):
    url = f"sqlite:///{tmp_path}/studies.db"
    study = optuna.create_study(study_name="qs", storage=url, directions=["maximize", "minimize"])
    study.set_metric_names(["quality", "size_kb"])
    study.set_user_attr("layers", LAYERS)
    study.add_trial(_trial(0, 0.9, (1.0, 50.0), (1.0, 1.0), 4.0, told=[0.9, 4.0]))
    study.add_trial(_trial(1, 0.8, (1.0, 50.0), (1.0, 1.0), 1.0, told=[0.8, 1.0]))
    study.add_trial(_trial(2, 0.7, (1.0, 50.0), (1.0, 1.0), 2.0, told=[0.7, 2.0]))  # dominated by 1 on size
    for t in study.trials:  # told values are (quality, size_kb)
        assert len(t.values) == 2
    assert list(pareto_frame(_study(url, "qs"))["trial"]) == [0, 1]
    # mcu budget made unreachable: every trial breaks it, the report still writes and says so
    huge = load_profile("mcu").budget.latency_ms * 10
    bad = optuna.create_study(study_name="bad", storage=url, directions=["maximize", "minimize", "minimize"])
    bad.set_metric_names(["quality", "latency_ms", "memory_kb"])
    bad.add_trial(_trial(0, 0.9, (1.0, 5.0), (huge, 1.0), 4.0))
    view = read_study(_study(url, "bad"), "mcu")
    assert view.front.empty and (view.trials["hypervolume"] == 0).all()
    paths = write_view(view, tmp_path / "bad")
    assert "No feasible trial" in paths.markdown.read_text()
    assert len(pd.read_csv(paths.csv)) == 0 and {p.name for p in paths.pngs} == {"pareto.png", "hypervolume.png"}


def test_test_quality_is_shown_beside_validation_and_never_ranks(storage_url, tmp_path, capsys):
    """Test quality (trial attr "test_quality", measured after the trial's fine-tuning) sits next
    to validation quality in every front table; rank, front, order and hypervolume come from the
    told (validation) values alone: a study whose test qualities rank the trials the other way
    round has exactly the same front."""
    from rich.console import Console

    from search.report import html as report_html
    from search.report.text import front_table, table_header, table_rows

    view = read_study(_study(storage_url))
    t = view.trials.set_index("trial")
    assert t.loc[0, "test_quality"] == 0.93 and t.loc[5, "test_quality"] == 0.7925
    assert pd.isna(t.loc[1, "test_quality"])  # not measured: shown as "-"
    assert pd.isna(t.loc[3, "test_quality"])  # never trained
    assert table_header(view)[:3] == ["trial", "val accuracy", "test accuracy"]
    rows = table_rows(view)
    assert rows[0][:3] == ["dense", "0.97", "0.965"]  # the baseline's validation and test accuracy
    assert [r[:3] for r in rows[1:]] == [["0", "0.95", "0.93"], ["1", "0.9", "-"], ["5", "0.8", "0.7925"]]
    md = write_view(view, tmp_path / "r").markdown.read_text()
    assert "| trial | val accuracy | test accuracy | latency (ms) |" in md
    assert "| 0 | 0.95 | 0.93 | 1 | 50 |" in md and "| 1 | 0.9 | - | 0.5 | 40 |" in md
    assert "never used to rank" in md
    html = (tmp_path / "r" / "report.html").read_text(encoding="utf-8")
    assert "<th>val accuracy</th><th>test accuracy</th>" in html and "<td>0.95</td><td>0.93</td>" in html
    hover = [h for tr in report_html.pareto_figure(view).data if tr.name == "Pareto front" for h in tr.text]
    assert any("quality 0.95 (test 0.93)" in h for h in hover)
    assert list(pd.read_csv(tmp_path / "r" / "pareto.csv")["test_quality"].fillna(-1)) == [0.93, -1, 0.7925]
    assert list(pareto_frame(_study(storage_url))["test_quality"].fillna(-1)) == [0.93, -1, 0.7925]
    capsys.readouterr()
    Console(width=200).print(front_table(view))
    out = capsys.readouterr().out
    assert "test accuracy" in out and "0.7925" in out
    dense = [line for line in out.splitlines() if "dense" in line]  # the reference row, as in report.md
    assert len(dense) == 1 and "0.965" in dense[0] and out.index("dense") < out.index("0.7925")
    # the same trials with test qualities that rank them the other way round: nothing moves
    url = f"sqlite:///{tmp_path}/flip.db"
    flip = optuna.create_study(study_name="flip", storage=url, directions=["maximize", "minimize", "minimize"])
    flip.set_metric_names(["quality", "latency_ms", "memory_kb"])
    for key in ("spec", "layers", "baseline"):
        flip.set_user_attr(key, _study(storage_url).user_attrs[key])
    for tr in _study(storage_url).trials:
        attrs = dict(tr.user_attrs)
        if attrs.get("quality") is not None:
            attrs["test_quality"] = 1.0 - attrs["quality"]  # the worst on validation is the best on test
        flip.add_trial(create_trial(state=tr.state, values=tr.values, params=tr.params, distributions=tr.distributions,
                                    user_attrs=attrs, system_attrs=tr.system_attrs))
    other = read_study(_study(url, "flip"))
    cols = ["trial", "rank", "pareto", "feasible", "hypervolume"]
    pd.testing.assert_frame_equal(view.trials[cols], other.trials[cols])
    assert list(other.front["trial"]) == list(view.front["trial"]) == [0, 1, 5]
    assert list(other.front["test_quality"]) == [pytest.approx(0.05), pytest.approx(0.1), pytest.approx(0.2)]


def test_the_layer_heat_maps_show_ranks_only_for_a_front_that_factorizes():
    from types import SimpleNamespace

    from search.report.view import rank_data

    front = pd.DataFrame({"trial": [3, 7], "a.rank": [1.0, 0.5], "a.form": ["", "svd"],
                          "b.rank": [0.25, 0.0625], "b.form": ["spatial", "kronecker"]})
    ranks, labels = rank_data(SimpleNamespace(front=front, layer_names=("a", "b")))
    assert list(ranks.columns) == ["#3", "#7"] and ranks.loc["b", "#7"] == 0.0625
    assert labels.values.tolist() == [["", "0.50"], ["0.25s", "0.06k"]]  # the layers column's marks
    flat = front.assign(**{"a.rank": 1.0, "b.rank": 1.0})
    assert rank_data(SimpleNamespace(front=flat, layer_names=("a", "b"))) is None
    assert rank_data(SimpleNamespace(front=front[["trial"]], layer_names=("a", "b"))) is None  # no rank columns
