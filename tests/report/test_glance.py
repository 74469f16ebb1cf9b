"""A report that reads at a glance (issue 17, item 9).

The Pareto scatter's axes fit the trials (a budget far outside them is named, not drawn as a
line that squeezes every point against one edge), the dense baseline is a reference point,
every front row carries its exact `hwcompress export` command, and numbers print to 3-4
significant digits. Checked on the figures' data, on pareto.png's saved axes, and on
report.html rendered by headless Chromium to a PNG, as a user sees it.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import numpy as np
import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial
from PIL import Image

from hw_profiles import load_profile
from search import cli
from search.api import make_spec
from search.compression.plan import dense_plan, stack_plans
from search.cost import roofline as cost
from search.report import html as report_html
from search.report.files import write_view
from search.report.plots import AXES_KEY
from search.report.text import export_command, fmt
from search.report.view import read_study, scatter_axes
from search.study.create import layers_from_attr
from search.study.storage import load_study, open_storage
from tests.support import results_dir, start_search

pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")

# a 64-32-10 MLP (the shapes of tests/report/test_report.py)
LAYERS = [
    {"index": 0, "name": "fc1", "path": ["fc1"], "kind": "dense", "kernel_shape": [64, 32], "in_shape": [64],
     "out_shape": [32], "groups": 1, "has_bias": True, "macs": 2048, "params": 2080},
    {"index": 1, "name": "fc2", "path": ["fc2"], "kind": "dense", "kernel_shape": [32, 10], "in_shape": [32],
     "out_shape": [10], "groups": 1, "has_bias": True, "macs": 320, "params": 330},
]
# the demo's case: mobile-cpu's budget is 10 ms and 65536 KB, every trial takes about 0.006 ms
BUDGET = {"latency_ms": 10.0, "memory_kb": 65536.0, "size_kb": None}
# (quality, latency_ms, memory_kb, size_kb) of trials 0..4; 0, 1, 3 and 4 are the front
TRIALS = [(0.9833, 0.008658, 52.62, 52.23), (0.9444, 0.007035, 20.19, 19.25), (0.90, 0.0099, 77.0, 70.0),
          (0.6944, 0.006612, 11.74, 11.35), (0.6778, 0.006457, 8.629, 8.239)]
# float32 rounding: 4-bit fc1 loses exactly nothing, which used to print as 1.589e-08
SENSITIVITY = {"layers": ["fc1", "fc2"], "baseline": 0.9833, "prune_ratio": 0.5, "prune_loss": [0.005556, 0.01111],
               "bits": 4, "bits_loss": [1.589e-08, -0.005556]}


def _trial(number, quality, lat, mem, size, budget=BUDGET["latency_ms"]):
    costs = {"mobile-cpu": {"latency_ms": lat, "memory_kb": mem, "size_kb": size}}
    plan = {"ratio": [0.1 * number, 0.0], "granularity": ["channel", "unstructured"], "weight_bits": [4, 8],
            "act_bits": [8, 32], "quant_mode": ["uniform", "uniform"]}
    attrs = {"plan": plan, "quality": quality, "costs": costs, "constraints": {"latency_ms": lat - budget},
             "feasible": lat <= budget, "size_bytes": int(size * 1024), "compression_ratio": 9640 / (size * 1024)}
    return create_trial(state=TrialState.COMPLETE, values=[quality, lat, mem], params={"x": 0.1 * number},
                        distributions={"x": FloatDistribution(0, 1)}, user_attrs=attrs,
                        system_attrs={"constraints": [lat - budget]})


def _study(url: str, name: str, budget: dict, trials) -> optuna.Study:
    study = optuna.create_study(study_name=name, storage=url, directions=["maximize", "minimize", "minimize"])
    study.set_metric_names(["quality", "latency_ms", "memory_kb"])
    study.set_user_attr("spec", make_spec(model="lenet300", dataset="digits", profile="mobile-cpu", budget=budget).to_attrs())
    study.set_user_attr("layers", LAYERS)
    study.set_user_attr("baseline", {"metric_name": "accuracy", "val_metric": 0.9833, "test_metric": 0.9778,
                                     "cache_key": "2bbd43fa5fd24a87", "dense_bytes": 9640, "dense_size_kb": 9.414})
    study.set_user_attr("sensitivity", SENSITIVITY)
    for t in trials:
        study.add_trial(t)
    return study


@pytest.fixture(scope="module")
def url(tmp_path_factory) -> str:
    """Storage with "demo" (every point far below its budgets) and "near" (a budget among the points)."""
    url = f"sqlite:///{tmp_path_factory.mktemp('glance')}/studies.db"
    _study(url, "demo", BUDGET, [_trial(i, *t) for i, t in enumerate(TRIALS)])
    near = {"latency_ms": 0.009, "memory_kb": None, "size_kb": None}  # trial 2 (0.0099 ms) breaks it
    _study(url, "near", near, [_trial(i, *t, budget=0.009) for i, t in enumerate(TRIALS)])
    return url


def _view(url: str, name: str = "demo", **where):
    return read_study(load_study(name, open_storage(url)), **where)


@pytest.fixture(scope="module")
def demo_report(url, tmp_path_factory):
    """The files of "demo"'s report, written once (read with the default storage and results dir)."""
    return write_view(_view(url), tmp_path_factory.mktemp("demo") / "demo")


# ---------------------------------------------------------------- axes that fit the trials

def test_axes_fit_the_trials_and_a_far_budget_is_noted_not_drawn(url, demo_report):
    view = _view(url)
    lat, mem = scatter_axes(view)
    points = [t[1] for t in TRIALS] + [view.dense["latency_ms"]]
    assert lat.lo <= min(points) and lat.hi >= max(points)
    assert lat.hi - lat.lo < 1.2 * (max(points) - min(points))  # the points fill the axis
    assert not lat.budget_on_axis and lat.hi < 10
    assert lat.note.startswith("latency budget 10 ms is beyond the axis")
    assert not mem.budget_on_axis and "memory budget 65536 KB is beyond the axis" in mem.note
    # report.html's figure: the same limits, no budget line, the notes above the panels
    fig = report_html.pareto_figure(view)
    assert list(fig.layout.xaxis.range) == pytest.approx([lat.lo, lat.hi])
    assert not fig.layout.shapes
    assert {a.text for a in fig.layout.annotations} >= {lat.note, mem.note}
    # pareto.png: its axes as drawn are saved in the file
    png = next(p for p in demo_report.pngs if p.name == "pareto.png")
    saved = json.loads(Image.open(png).text[AXES_KEY])
    assert saved[0]["cost"] == "latency_ms" and saved[0]["hi"] < 10 and not saved[0]["budget_on_axis"]
    assert saved[0]["note"] == lat.note


def test_a_budget_among_the_trials_is_drawn_and_one_below_them_is_noted(url):
    view = _view(url, "near")
    (lat, _) = scatter_axes(view)
    assert lat.budget_on_axis and lat.lo < 0.009 < lat.hi and lat.note == ""
    fig = report_html.pareto_figure(view)
    assert [s.x0 for s in fig.layout.shapes] == [0.009]
    # every trial far above a budget (as when re-priced for a smaller device): noted, not drawn
    tight = dataclasses.replace(view, budget={"latency_ms": 1e-5, "memory_kb": None, "size_kb": None}, dense={})
    (lat, _) = scatter_axes(tight)
    assert not lat.budget_on_axis and lat.lo > 0.005
    assert lat.note == "latency budget 1e-05 ms is below the axis (every point plotted is above it)"


# ---------------------------------------------------------------- the dense baseline

def test_the_dense_baseline_is_a_reference_point(url, demo_report):
    view = _view(url)
    want = cost.price(load_profile("mobile-cpu"), layers_from_attr(LAYERS), stack_plans([dense_plan(2)]))
    assert view.dense["quality"] == 0.9833
    assert view.dense["latency_ms"] == pytest.approx(float(want.latency_ms[0]))
    assert view.dense["memory_kb"] == pytest.approx(float(want.memory_kb[0]))
    fig = report_html.pareto_figure(view)
    stars = [t for t in fig.data if t.name == "dense baseline"]
    assert [list(t.x) for t in stars] == [[view.dense["latency_ms"]], [view.dense["memory_kb"]]]
    assert all(list(t.y) == [0.9833] for t in stars)
    md = demo_report.markdown.read_text()
    assert f"| dense | 0.9833 | 0.9778 | {fmt(view.dense['latency_ms'])} | {fmt(view.dense['memory_kb'])} |" in md
    assert "- dense baseline: accuracy 0.9833 on validation, 0.9778 on test; latency" in md
    assert '<tr class="ref"><td>dense</td><td>0.9833</td><td>0.9778</td>' in demo_report.html.read_text(encoding="utf-8")


# ---------------------------------------------------------------- export commands

def test_every_front_row_carries_its_export_command(url, demo_report, tmp_path, capsys):
    view = _view(url)
    assert list(view.front["trial"]) == [0, 1, 3, 4]
    assert export_command(view, 3) == "hwcompress export --study demo --trial 3 --out exports/demo-3"
    md, html = demo_report.markdown.read_text(), demo_report.html.read_text(encoding="utf-8")
    for n in view.front["trial"]:
        assert f"| `hwcompress export --study demo --trial {n} --out exports/demo-{n}` |" in md
        assert f"<code><span>hwcompress export</span> <span>--study demo</span> <span>--trial {n}</span> " \
               f"<span>--out exports/demo-{n}</span></code>" in html
    # read from a storage and results dir that are not the defaults: the command names both
    results = tmp_path / "my results"
    assert cli.main(["report", "--study", "demo", "--storage", url, "--results-dir", str(results)]) == 0
    capsys.readouterr()
    md = (results / "demo" / "report.md").read_text()
    cmds = re.findall(r"`(hwcompress export [^`]*)`", md)
    assert cmds == [shlex.join(["hwcompress", "export", "--study", "demo", "--trial", str(n), "--out",
                                f"exports/demo-{n}", "--storage", url, "--results-dir", str(results)])
                    for n in (0, 1, 3, 4)] + [
        shlex.join(["hwcompress", "export", "--study", "demo", "--within", "0.5", "--out", "exports/demo-within-0.5",
                    "--storage", url, "--results-dir", str(results)])]  # the note under the table
    args = cli.build_parser().parse_args(shlex.split(cmds[0])[1:])  # what `hwcompress export` reads
    assert (args.command, args.study, args.trial, args.storage, args.results_dir) == ("export", "demo", 0, url, str(results))
    args = cli.build_parser().parse_args(shlex.split(cmds[-1])[1:])
    assert (args.trial, args.within, args.storage) == (None, 0.5, url)
    # a password in the storage URL is not written into the report
    pg = _view(url, storage="postgresql://hw:s3cret@db-host:5432/studies")
    assert "--storage 'postgresql://hw:***@db-host:5432/studies'" in export_command(pg, 0)


# ---------------------------------------------------------------- numbers

def test_numbers_print_to_3_or_4_significant_digits(demo_report):
    assert [fmt(v) for v in (0.0086583, 52.6219, 65536.0, 123456.7, -0.0, 1.589e-08, float("nan"))] == \
        ["0.008658", "52.62", "65536", "123457", "0", "1.589e-08", "-"]
    md = demo_report.markdown.read_text()
    assert "| fc1 | 0.005556 | 0 |" in md and "| fc2 | 0.01111 | -0.005556 |" in md  # rounding noise is 0
    assert "| 0 | 0.9833 | - | 0.008658 | 52.62 | 52.23 | 0.18 |" in md  # x fp32 to 3 digits; test not measured
    assert not re.search(r"\de[-+]\d", md), "no exponents in report.md"
    assert "cache_key" not in md and "dense_bytes" not in md


# ---------------------------------------------------------------- as a user sees it: Chromium

def chromium() -> str:
    """Headless Chromium's binary; a failure (not a skip) when it is missing."""
    exe = os.environ.get("HWCOMPRESS_CHROMIUM") or next(
        (p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
    if not exe:
        pytest.fail("chromium is not installed: run `bash .ci/chromium.sh` (or apt-get install chromium)", pytrace=False)
    return exe


def screenshot(html: Path, png: Path, size: tuple[int, int] = (1400, 1800)) -> np.ndarray:
    """report.html rendered by headless Chromium at `size` CSS pixels: RGB [h, w, 3]."""
    cmd = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
           "--force-device-scale-factor=1", "--virtual-time-budget=10000", f"--user-data-dir={png.parent / 'chromium'}",
           f"--screenshot={png}", f"--window-size={size[0]},{size[1]}", html.resolve().as_uri()]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0 and png.is_file(), f"chromium failed ({r.returncode}): {r.stderr[-2000:]}"
    return np.asarray(Image.open(png).convert("RGB"))


def _near(img: np.ndarray, rgb: str, tol: int = 30) -> np.ndarray:
    """Bool [h, w]: pixels within `tol` of colour `rgb` ("#rrggbb") in every channel."""
    want = np.array([int(rgb[i:i + 2], 16) for i in (1, 3, 5)])
    return np.all(np.abs(img.astype(int) - want) <= tol, axis=2)


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory) -> Path:
    """A real search (lenet300 on digits, mobile-cpu, 4 tiny trials), reported by `hwcompress report`."""
    results = results_dir(tmp_path_factory.mktemp("tiny"))
    assert start_search(results, "glance", 4) == 0
    assert cli.main(["report", "--study", "glance", "--results-dir", str(results)]) == 0
    return results


def test_report_html_reads_at_a_glance_in_chromium(tiny_study, tmp_path, monkeypatch, capsys):
    capsys.readouterr()
    png = tmp_path / "report.png"
    img = screenshot(tiny_study / "glance" / "report.html", png)
    h, w, _ = img.shape
    assert (w, h) == (1400, 1800)
    assert (img.min(axis=2) < 235).mean() > 0.03, f"{png} is blank"
    # the Pareto scatter is the first plot: its red front markers start its band of rows
    red = _near(img, report_html.PARETO_COLOURS["Pareto front"])
    rows = np.flatnonzero(red.any(axis=1))
    assert len(rows), f"no Pareto front marker visible in {png}"
    band = slice(max(rows[0] - 40, 0), rows[0] + 330)
    left = slice(0, w // 2)  # the latency panel
    star = _near(img, report_html.BASELINE)
    assert star[band, left].sum() > 30, f"no dense baseline star in the latency panel of {png}"
    # the fastest trial is on the front (red); the dense baseline (the star) is the slowest point
    cols = np.flatnonzero((red | star)[band, left].any(axis=0))
    # the points spread over the panel (about 0.4 of the page wide), not squeezed into one column
    assert cols[-1] - cols[0] > 0.25 * w, f"the trials fill {cols[-1] - cols[0]} px of the latency axis in {png}"
    # the export command of the best front row, copied from report.md, runs as it stands
    cmd = re.findall(r"`(hwcompress export [^`]*)`", (tiny_study / "glance" / "report.md").read_text())[0]
    monkeypatch.chdir(tmp_path)
    assert cli.main(shlex.split(cmd)[1:]) == 0
    out = shlex.split(cmd)[shlex.split(cmd).index("--out") + 1]
    assert (tmp_path / out / "config.json").is_file()
