"""Bad input, through the CLI as a user types it: each case exits 2 with one line
`error: ...` that names the problem (no traceback), and changes nothing already stored.

One study ("kept", one trial) lives in the results dir every case points at; its trial
count and the studies in the storage are compared before and after each case.
"""
from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest

import hw_profiles
from search import cli
from search.study import storage as S
from tests.support import SEARCH, results_dir, start_search

REPO = Path(__file__).resolve().parents[2]
PROFILE = (Path(hw_profiles.__file__).parent / "mobile-cpu.toml").read_text()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """{"R": results dir with study "kept", "F": a dir of bad files, "C": results dir whose
    studies.db is a text file}."""
    root = tmp_path_factory.mktemp("bad")
    results = results_dir(root)
    assert start_search(results, "kept", 1) == 0
    files = root / "files"
    files.mkdir()
    (files / "malformed.toml").write_text('name = "x"\n[compute\nfp32_gops = 1\n')
    (files / "unknown-field.toml").write_text(PROFILE.replace("[overhead]\n", "[overhead]\nlayer_ms = 3.0\n"))
    (files / "unknown-top.toml").write_text('colour = "blue"\n' + PROFILE)
    (files / "missing-field.toml").write_text(
        "\n".join(line for line in PROFILE.splitlines() if not line.startswith("bandwidth_gbs"))
    )
    (files / "negative-field.toml").write_text(PROFILE.replace("bandwidth_gbs = 34.1", "bandwidth_gbs = -34.1"))
    _wrong_shapes(files / "wrong-shapes.safetensors")
    corrupt = root / "corrupt"
    corrupt.mkdir()
    (corrupt / "studies.db").write_text("not a database, just text\n" * 50)
    return {"R": str(results), "F": str(files), "C": str(corrupt)}


def _wrong_shapes(path: Path) -> None:
    """lenet300's parameter names with transposed kernels: right names, wrong shapes."""
    import jax
    from flax import traverse_util
    from safetensors.numpy import save_file

    import models

    like = jax.eval_shape(models.get_task("lenet300", "digits").init_params)
    flat = traverse_util.flatten_dict(like, sep="/")
    save_file({k: np.zeros(v.shape[::-1] + (1,) if len(v.shape) == 1 else v.shape[::-1], np.float32)
               for k, v in flat.items()}, str(path))


def search(*extra: str) -> list[str]:
    return ["search", *SEARCH, "--study", "kept", "--results-dir", "{R}", *extra]


# (id, argv with {R}/{F}/{C} placeholders, a word the message must contain)
CASES = [
    ("malformed-toml-profile", search("--profile", "{F}/malformed.toml"), "malformed TOML"),
    ("unknown-profile-field", search("--profile", "{F}/unknown-field.toml"), "layer_ms"),
    ("unknown-profile-top-field", search("--profile", "{F}/unknown-top.toml"), "colour"),
    ("missing-profile-field", search("--profile", "{F}/missing-field.toml"), "bandwidth_gbs"),
    ("negative-profile-field", search("--profile", "{F}/negative-field.toml"), "bandwidth_gbs"),
    ("unknown-profile-name", search("--profile", "tpu-v9"), "tpu-v9"),
    ("negative-budget", search("--latency-ms", "-1"), "latency_ms"),
    ("zero-budget", search("--memory-kb", "0"), "memory_kb"),
    ("infeasible-budget", search("--size-kb", "0.0001"), "size_kb"),
    ("zero-trials", search("--trials", "0"), "--trials"),
    ("negative-trials", search("--trials", "-3"), "--trials"),
    ("negative-finetune-steps", search("--finetune-steps", "-1"), "--finetune-steps"),
    ("unknown-pruning", search("--pruning", "iterative"), "--pruning"),
    ("unknown-act-ranges", search("--act-ranges", "pact"), "--act-ranges"),
    ("gradual-pruning-too-few-steps", search("--pruning", "gradual", "--finetune-steps", "1"), "--finetune-steps"),
    ("resume-with-other-pruning", search("--pruning", "gradual"), "pruning"),
    ("zero-batch", search("--batch", "0"), "--batch"),
    ("zero-timeout", search("--timeout", "0"), "--timeout"),
    ("nan-timeout", search("--timeout", "nan"), "--timeout"),
    ("zero-k", search("--k", "0"), "--k"),
    ("unknown-loop", search("--loop", "scan"), "--loop"),
    ("unknown-model", search("--model", "resnet999"), "resnet999"),
    ("unknown-dataset", search("--dataset", "imagenet"), "imagenet"),
    ("model-dataset-mismatch", search("--model", "vdsr"), "vdsr"),
    ("unknown-objective", search("--objectives", "quality,speed"), "speed"),
    ("resume-with-other-settings", search("--finetune-steps", "7"), "kept"),
    ("unknown-study-report", ["report", "--study", "nope", "--results-dir", "{R}"], "nope"),
    ("unknown-study-worker", ["worker", "--study", "nope", "--results-dir", "{R}"], "nope"),
    ("conflicting-heartbeat-flags", ["worker", "--study", "kept", "--results-dir", "{R}",
                                     "--heartbeat", "10", "--grace", "5"], "grace"),
    ("worker-zero-batch", ["worker", "--study", "kept", "--results-dir", "{R}", "--batch", "0"], "--batch"),
    ("worker-negative-timeout", ["worker", "--study", "kept", "--results-dir", "{R}", "--timeout", "-5"], "--timeout"),
    ("worker-zero-k", ["worker", "--study", "kept", "--results-dir", "{R}", "--k", "-1"], "--k"),
    ("worker-unknown-loop", ["worker", "--study", "kept", "--results-dir", "{R}", "--loop", "scan"], "--loop"),
    ("unsupported-storage-url", search("--storage", "mysql://u@localhost/db"), "not supported"),
    ("unreachable-storage", search("--storage", "postgresql://u:pw@127.0.0.1:1/db"), "cannot reach"),
    ("corrupt-sqlite-search", ["search", *SEARCH, "--study", "kept", "--results-dir", "{C}"], "SQLite"),
    ("corrupt-sqlite-report", ["report", "--study", "kept", "--results-dir", "{C}"], "SQLite"),
    ("corrupt-sqlite-studies", ["studies", "--results-dir", "{C}"], "SQLite"),
    ("corrupt-sqlite-worker", ["worker", "--study", "kept", "--results-dir", "{C}"], "SQLite"),
    ("unknown-trial-export", ["export", "--study", "kept", "--trial", "999", "--results-dir", "{R}",
                              "--out", "{F}/out"], "999"),
    # the user's own trained weights for a zoo model, with the right names but wrong shapes
    ("wrong-shape-safetensors", search("--weights", "{F}/wrong-shapes.safetensors"), "shape"),
    ("export-dir-without-export", ["measure", "{F}"], "config.json"),
    ("export-zero-lr", ["export", "--study", "kept", "--trial", "0", "--results-dir", "{R}", "--out", "{F}/out",
                        "--lr", "0"], "--lr 0"),
    # profiles calibrate: refused before any timing
    ("calibrate-out-is-a-directory", ["profiles", "calibrate", "--out", "{F}", "--force"], "directory"),
    ("calibrate-empty-name", ["profiles", "calibrate", "--out", "{F}/p.toml", "--name", " "], "--name"),
    ("calibrate-negative-seconds", ["profiles", "calibrate", "--out", "{F}/p.toml", "--seconds", "-1"], "--seconds -1"),
    ("calibrate-too-few-shapes", ["profiles", "calibrate", "--out", "{F}/p.toml", "--kernel-shapes", "1"], "--kernel-shapes"),
    ("calibrate-zero-batch", ["profiles", "calibrate", "--out", "{F}/p.toml", "--batch", "0"], "--batch 0"),
    ("calibrate-batch-roofline", ["profiles", "calibrate", "--out", "{F}/p.toml", "--batch", "32", "--roofline-only"],
     "--roofline-only"),
    ("calibrate-unknown-study", ["profiles", "calibrate", "--out", "{F}/p.toml", "--study", "nope", "--results-dir", "{R}"], "nope"),
]


def _trial_counts(results: str) -> dict[str, int]:
    storage = S.open_storage(None, results)
    return {name: len(S.load_study(name, storage).get_trials(deepcopy=False))
            for name in S.study_names(storage)}


@pytest.mark.parametrize("argv, word", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(env, capsys, argv, word):
    before = _trial_counts(env["R"])
    corrupt_before = Path(env["C"], "studies.db").read_bytes()
    capsys.readouterr()
    rc = cli.main([a.format(**env) for a in argv])
    out = capsys.readouterr()
    assert "Traceback" not in out.err
    lines = out.err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: "), out.err[-3000:]
    assert word in lines[0], lines[0]
    assert _trial_counts(env["R"]) == before
    assert Path(env["C"], "studies.db").read_bytes() == corrupt_before


def test_nothing_unpickles_user_input():
    """Profiles and configs are TOML/JSON, weights safetensors: no pickle, no eval anywhere."""
    patterns = (r"import (c?pickle|dill|joblib|shelve|marshal)|from (c?pickle|dill|joblib) import|"
                r"pickle\.loads?\(|allow_pickle=True|torch\.load\(|yaml\.(unsafe_)?load\(|"
                r"(^|[^.\w])eval\(|(^|[^.\w])exec\(")
    out = subprocess.run(
        ["grep", "-rnE", patterns, "--include=*.py", "search", "models", "hw_profiles"],
        cwd=REPO, capture_output=True, text=True,
    )
    assert out.returncode == 1, f"code that can run what a user hands in:\n{out.stdout}"


def test_a_reader_that_goes_away_is_not_an_error_with_a_traceback():
    """`hwcompress ... | head`: the pipe closes while the command still prints. Regression: a
    BrokenPipeError traceback; now exit 141 (as a shell reports SIGPIPE) and nothing on stderr."""
    import sys

    p = subprocess.Popen([sys.executable, "-m", "search.cli", "profiles", "show", "mobile-cpu"], cwd=REPO,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()  # the reader is gone before the first line
    err = p.stderr.read().decode()
    assert p.wait(timeout=60) == 141 and "Traceback" not in err, err
