"""`hwcompress search` flags end to end: budgets from the flags reach the study, --weights
searches the user's own weights, --workers runs the trials in worker processes."""
from __future__ import annotations

import json
import shutil

import numpy as np

from search.study import storage as S
from tests.support import SEARCH, results_dir, start_search


def _study(results, name):
    return S.load_study(name, S.open_storage(None, results))


def test_budget_flags_replace_the_profile_defaults_and_keep_the_others(tmp_path):
    results = results_dir(tmp_path)
    assert start_search(results, "b", 1, "--latency-ms", "0.5") == 0
    budget = _study(results, "b").user_attrs["spec"]["budget"]
    assert budget["latency_ms"] == 0.5
    assert budget["memory_kb"] == 65536.0  # mobile-cpu's default stays


def test_k_flag_sets_plans_per_step_and_a_study_resumes_with_another(tmp_path):
    """--k is how this machine fine-tunes, not part of the study: each trial records the K
    that fine-tuned it, and the study resumes with a different one."""
    results = results_dir(tmp_path)
    assert start_search(results, "k", 1, "--k", "2") == 0
    assert start_search(results, "k", 2, "--k", "1") == 0
    st = _study(results, "k")
    assert [t.user_attrs.get("engine_k") for t in st.trials] == [2, 1]
    assert st.user_attrs["spec"]["finetune"]["k"] is None


def test_pruning_and_act_ranges_flags_reach_the_study_a_resume_and_the_export(tmp_path):
    from search import cli

    results = results_dir(tmp_path)
    flags = ("--pruning", "gradual", "--act-ranges", "learned", "--finetune-steps", "4")
    assert start_search(results, "g", 1, *flags) == 0
    assert start_search(results, "g", 2, *flags) == 0  # the same flags resume it
    st = _study(results, "g")
    ft = st.user_attrs["spec"]["finetune"]
    assert (ft["pruning"], ft["act_ranges"], len(st.trials)) == ("gradual", "learned", 2)
    assert cli.main(["report", "--study", "g", "--results-dir", str(results)]) == 0  # --quiet wrote none
    for report in ("report.md", "report.html"):  # the report says how its candidates were fine-tuned
        assert "gradual pruning, learned activation ranges" in (results / "g" / report).read_text(encoding="utf-8")
    out = tmp_path / "e"
    assert cli.main(["export", "--study", "g", "--trial", "1", "--results-dir", str(results), "--out", str(out),
                     "--finetune-steps", "4"]) == 0
    ft = json.loads((out / "config.json").read_text())["finetune"]
    assert (ft["pruning"], ft["act_ranges"], ft["steps"]) == ("gradual", "learned", 4)


def test_search_on_the_users_own_weights(tmp_path):
    """The cached baseline's file passed as --weights: same layers, the study records the file's
    hash and evaluates those weights; a changed file is refused on resume, nothing added."""
    results = results_dir(tmp_path)
    assert start_search(results, "base", 1) == 0
    # this study's baseline (the shared cache may hold other lenet300/digits baselines by now)
    key = _study(results, "base").user_attrs["baseline"]["cache_key"]
    cached = results / "cache" / key / "params.safetensors"
    mine = tmp_path / "mine.safetensors"
    shutil.copy(cached, mine)
    assert start_search(results, "mine", 1, "--weights", str(mine)) == 0
    st = _study(results, "mine")
    assert st.user_attrs["spec"]["weights"]["path"] == str(mine.resolve())
    base = _study(results, "base").user_attrs["baseline"]
    assert st.user_attrs["baseline"]["val_metric"] == base["val_metric"]  # the same weights
    from models.train import save_params
    from safetensors.numpy import load_file

    flat = load_file(str(mine))
    save_params({k: v * np.float32(0.5) for k, v in flat.items()}, mine)  # other weights, same shapes
    assert start_search(results, "mine", 2, "--weights", str(mine)) == 2
    assert len(_study(results, "mine").trials) == 1


def test_workers_flag_runs_the_trials_in_worker_processes(tmp_path, capfd):
    from search import cli

    results = results_dir(tmp_path)
    argv = ["search", *[a for a in SEARCH if a != "--quiet"], "--study", "w", "--trials", "2",
            "--results-dir", str(results), "--workers", "1", "--k", "2", "--loop", "fused", "--json"]
    assert cli.main(argv) == 0
    out = capfd.readouterr()
    summary = json.loads(out.out)  # --json: stdout is one JSON object, workers or not
    assert summary["study"] == "w" and summary["trials_done"] == 2
    # the worker process was given --k and --loop (a CPU measures K 1, 2 or 4, and may pick either loop)
    assert "(K=2, fused loop)" in out.err
    trials = _study(results, "w").trials
    workers = {t.user_attrs.get("worker") for t in trials}
    assert len(workers) == 1 and None not in workers  # run by the worker process, not in-process
    assert {(t.user_attrs.get("engine_k"), t.user_attrs.get("engine_loop")) for t in trials} == {(2, "fused")}


def test_quiet_leaves_the_report_to_hwcompress_report_and_says_how(tmp_path, capsys):
    """--quiet writes no report files (their plots took seconds of a warm start); its summary
    line is the command that writes them, and that command does."""
    import shlex

    from search import cli

    results = results_dir(tmp_path)
    assert start_search(results, "q", 1) == 0
    assert not (results / "q").exists()
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert "report not written (--quiet)" in line
    cmd = shlex.split(line.split("(--quiet): ", 1)[1])
    assert cmd[:2] == ["hwcompress", "report"] and cmd[cmd.index("--results-dir") + 1] == str(results)
    assert cli.main(cmd[1:]) == 0
    assert {"report.html", "report.md", "pareto.csv"} <= {p.name for p in (results / "q").iterdir()}


def test_timeout_starts_no_trial_after_it_and_a_rerun_goes_on(tmp_path, capsys):
    """--timeout (seconds from the command's start, set-up included) stops claiming trials; the
    study keeps its budget, the note says so, and the same command again runs the rest. A
    worker's --timeout does the same."""
    from search import cli

    results = results_dir(tmp_path)
    assert start_search(results, "t", 3, "--timeout", "0.001") == 0  # shorter than the set-up
    err = capsys.readouterr().err
    assert "--timeout 0.001 s passed after 0 of 3 trials: run the same command again" in err
    assert len(_study(results, "t").trials) == 0
    assert cli.main(["worker", "--study", "t", "--results-dir", str(results), "--timeout", "0.001"]) == 0
    err = capsys.readouterr().err
    assert "ran 0 trials" in err and "--timeout 0.001 s passed; the study holds 0 of its 3" in err
    assert len(_study(results, "t").trials) == 0
    # without --quiet: no report of a study with no finished trial, a line that says why (regression:
    # the report step failed with "no finished trials yet; run hwcompress search first")
    argv = ["search", *[a for a in SEARCH if a != "--quiet"], "--study", "t", "--trials", "3",
            "--results-dir", str(results), "--timeout", "0.001"]
    assert cli.main(argv) == 0
    got = capsys.readouterr()
    assert "study t: no trial finished before --timeout 0.001 s" in got.out and "error" not in got.err
    assert start_search(results, "t", 3) == 0
    trials = _study(results, "t").trials
    assert len(trials) == 3 and all(t.state.name == "COMPLETE" for t in trials)
    assert "--timeout" not in capsys.readouterr().err
