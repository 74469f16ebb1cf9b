"""Issue 17, item 2: a study name is one folder name under the results directory, never a path.

A name typed with `--study` or read back from storage that holds a path separator, is "." or
"..", is empty or holds a control character is a one-line error (exit 2), and nothing is
written outside --results-dir: not by `search`, not by `report`, not by the report writer's API.
"""
from __future__ import annotations

import optuna
import pytest

from search import cli
from search.api import make_spec
from search.compression.plan import CHANNEL, make_plan
from search.errors import UserError
from search.report.files import report_dir, write_report
from search.study.space import plan_to_dict
from search.study.spec import check_study_name, safe_study_name
from tests.support import results_dir, start_search

UNSAFE = ["../escaped", "/srv/elsewhere", "a/b", "a\\b", "..", ".", "", "  ", "tab\there", "new\nline",
          "nul\x00", "esc\x1b[31m", "x" * 256]


def _files(root):
    """Every file under `root`, as paths relative to it."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


@pytest.mark.parametrize("name", ["lenet300-digits-mobile-cpu", "my study", "v1..2", "[x]", "é" * 100, ".hidden"])
def test_a_folder_name_is_a_study_name(name):
    assert check_study_name(name) == name


@pytest.mark.parametrize("name", UNSAFE + [None, 3])
def test_a_path_or_control_character_is_a_one_line_error(name):
    with pytest.raises(UserError, match="cannot be a study name") as e:
        check_study_name(name)
    assert "\n" not in str(e.value) and str(e.value).startswith("--study ")


def test_safe_study_name_maps_other_fields_to_one_folder():
    assert safe_study_name("custom-net-../../data-mobile-cpu") == "custom-net-..-..-data-mobile-cpu"
    assert safe_study_name("a\nb/c") == "a-b-c" and safe_study_name("..") == "study"
    for text in UNSAFE:
        check_study_name(safe_study_name(text))


@pytest.mark.parametrize("name", ["../escaped", "{abs}"])
def test_search_with_a_path_as_study_writes_nothing_outside(tmp_path, capsys, name):
    results = results_dir(tmp_path / "root")
    name = name.format(abs=tmp_path / "elsewhere")
    before = _files(tmp_path)
    assert start_search(results, name, 1) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "cannot be a study name" in err and "\n" not in err
    outside = [f for f in _files(tmp_path) if f not in before and not f.startswith("root/results/")]
    assert outside == [] and not (tmp_path / "elsewhere").exists() and not (tmp_path / "root" / "escaped").exists()
    assert [f for f in _files(tmp_path) if f not in before] == []  # not even an empty studies.db


@pytest.fixture
def stored_unsafe(tmp_path):
    """A results dir whose storage holds a finished study named "../escaped" (as an older
    hwcompress or plain Optuna could store it)."""
    results = results_dir(tmp_path / "root")
    study = optuna.create_study(study_name="../escaped", storage=f"sqlite:///{results / 'studies.db'}",
                                directions=["maximize", "minimize", "minimize"])
    study.set_user_attr("spec", make_spec(model="lenet300", dataset="digits", profile="mobile-cpu").to_attrs())
    costs = {"mobile-cpu": {"latency_ms": 0.05, "memory_kb": 100.0, "size_kb": 40.0}}
    study.add_trial(optuna.trial.create_trial(values=[0.9, 0.05, 100.0], user_attrs={
        "plan": plan_to_dict(make_plan([0.5, 0.25, 0.0], CHANNEL, [8, 4, 8], [8, 8, 8])), "quality": 0.9,
        "costs": costs, "feasible": True}))
    return results, study


def test_report_of_a_stored_unsafe_name_writes_nothing_outside(stored_unsafe, tmp_path, capsys):
    results, study = stored_unsafe
    before = _files(tmp_path)
    for argv in (["--study", "../escaped"], ["--study", "../escaped", "--profile", "xeon"]):
        assert cli.main(["report", *argv, "--results-dir", str(results)]) == 2
        err = capsys.readouterr().err.strip()
        assert "cannot be a study name" in err and "\n" not in err
    # the API: the report writer refuses the stored name whatever folder it is given
    with pytest.raises(UserError, match="'../escaped' cannot be a study name"):
        write_report(study, results / "anywhere")
    assert _files(tmp_path) == before


def test_report_dir_is_one_folder_under_the_results_dir(tmp_path):
    assert report_dir(tmp_path, "s") == tmp_path / "s"
    assert report_dir(tmp_path, "s", "profiles/../../my-dev.toml") == tmp_path / "s" / "on-my-dev"
    with pytest.raises(UserError, match="cannot be a study name"):
        report_dir(tmp_path, "/srv/elsewhere")
    with pytest.raises(UserError, match="--profile 'on-\\\\n'"):
        report_dir(tmp_path, "s", "\n")


def test_studies_lists_a_stored_name_as_it_is(tmp_path, capsys):
    """A name rich would read as markup ("[/x]") is listed literally, not an error."""
    results = results_dir(tmp_path)
    optuna.create_study(study_name="[/x]", storage=f"sqlite:///{results / 'studies.db'}")
    assert cli.main(["studies", "--results-dir", str(results)]) == 0
    assert "[/x]" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["../escaped", "/srv/elsewhere", "", "a\nb"])
def test_search_api_refuses_an_unsafe_name_before_any_work(tmp_path, name):
    from search.api import search

    spec = make_spec(model="lenet300", dataset="digits", profile="mobile-cpu", n_trials=1)
    with pytest.raises(UserError, match="study name"):
        search(spec, "memory", tmp_path / "r", study_name=name)
    assert not (tmp_path / "r").exists()
