"""A study with factorization in its space, end to end through the CLI (issue 18's acceptance:
"a lenet300 study with factorization in the space reports, exports and re-prices on another
profile"): `hwcompress search --factorize`, a plan factorizing fc1 enqueued and run on resume,
`hwcompress report`, `hwcompress export` of that plan (config.json and the printed layer lines
carry its rank), `hwcompress report --profile` on a profile the study never priced."""
from __future__ import annotations

import json

import numpy as np
import optuna

from search import cli
from search.compression import plan as P
from search.cost.roofline import price
from search.study import storage as S
from search.study.context import load_context
from search.study.space import plan_to_params
from search.study.spec import StudySpec
from tests.support import TOY, results_dir, start_search

# K and the loop given: a test run alone measures neither (seconds of compiles); no fine-tune
# steps: the search's engine then shares its factorizing programs with the export's (steps 0)
FLAGS = ("--factorize", "--k", "1", "--loop", "python", "--finetune-steps", "0")


def test_a_factorizing_study_reports_exports_and_reprices(tmp_path, capsys):
    results = results_dir(tmp_path)
    assert start_search(results, "f", 1, *FLAGS) == 0
    study = S.load_study("f", S.open_storage(None, results))
    spec = StudySpec.of_study(study)
    assert spec.space.factorize
    layers = load_context(spec, str(results), study=study).layers
    # fc1 (64 -> 300) at rank ratio .25: r = 16 of its 64; the rest dense, float
    plan = P.make_plan(np.zeros(3), rank=[0.25, 1.0, 1.0])
    study.enqueue_trial(plan_to_params(plan, layers, spec.space))
    assert start_search(results, "f", 2, *FLAGS) == 0  # resumes: runs the enqueued plan
    trial = S.load_study("f", S.open_storage(None, results)).trials[1]
    assert trial.state == optuna.trial.TrialState.COMPLETE
    assert trial.user_attrs["plan"]["rank"] == [0.25, 1.0, 1.0]

    capsys.readouterr()
    assert cli.main(["report", "--study", "f", "--results-dir", str(results)]) == 0
    assert {"report.html", "report.md", "pareto.csv"} <= {p.name for p in (results / "f").iterdir()}
    assert "factorization (--factorize) at rank ratios 0.75, 0.5, 0.25, forms svd, spatial, kronecker" in \
        (results / "f" / "report.md").read_text()

    out = tmp_path / "export"
    assert cli.main(["export", "--study", "f", "--trial", "1", "--out", str(out), "--results-dir", str(results),
                     "--finetune-steps", "0"]) == 0
    fc1, fc2 = json.loads((out / "config.json").read_text())["layers"][:2]
    assert (fc1["rank_ratio"], fc1["rank"], fc1["form"]) == (0.25, 16, "svd")
    assert fc2["rank"] is None and fc2["rank_ratio"] == 1.0
    text = capsys.readouterr().out
    printed = {line.split()[0]: line for line in text.splitlines() if line.startswith("  fc")}
    assert "rank 16 of 64 (svd, ratio 0.25" in printed["fc1"]
    assert "  size: dense 197.7 KB (1.0x), pruned+factorized " in text  # its float32 factors: the second stage
    assert "rank" not in printed["fc2"]

    # re-priced on a profile the trials never stored costs for: the factorized pair's price
    toy = tmp_path / "toy.toml"
    toy.write_text(TOY)
    assert cli.main(["report", "--study", "f", "--results-dir", str(results), "--profile", str(toy)]) == 0
    from search.report.view import read_study

    view = read_study(S.load_study("f", S.open_storage(None, results)), str(toy))
    row = view.trials.set_index("trial").loc[1]
    want = float(np.asarray(price(str(toy), layers, P.stack_plans([plan])).latency_ms)[0])
    dense = float(np.asarray(price(str(toy), layers, P.stack_plans([P.make_plan(np.zeros(3))])).latency_ms)[0])
    assert row["latency_ms"] == want != dense
    assert any(p.name == "pareto.csv" for p in (results / "f").rglob("*") if p.parent != results / "f")
