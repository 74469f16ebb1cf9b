"""`hwcompress search --model path/to/file.py:build`: the user's own model (a BatchNorm net
with a residual add) searched, reported and exported from the command line; bad references
are one-line errors."""
from __future__ import annotations

import json
import re
import textwrap

import pytest

from search import cli
from search.study import storage as S
from tests.support import results_dir

OWN = textwrap.dedent('''
    import flax.linen as nn
    import numpy as np
    import models
    from models.train import fit


    class Net(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool = False):
            x = nn.Conv(8, (3, 3), use_bias=False, name="c1")(x)
            x = nn.relu(nn.BatchNorm(use_running_average=not train, name="bn1")(x))
            y = nn.Conv(8, (3, 3), use_bias=False, name="c2")(x)
            x = nn.relu(x + nn.BatchNorm(use_running_average=not train, name="bn2")(y))
            return nn.Dense(10, name="fc")(x.mean((1, 2)))


    def build():
        task = models.Task(name="mynet", module=Net(), data=models.load_dataset("digits"),
                           loss=models.metrics.cross_entropy, metric=models.metrics.accuracy,
                           metric_name="accuracy", train=models.TrainConfig(steps=60, batch_size=64),
                           eval_kwargs={"train": False}, train_kwargs={"train": True})
        return task, fit(task)[0]


    def not_a_task():
        return 42
''')


def test_own_model_searches_and_exports_its_residual_group_whole(tmp_path, capsys):
    results = results_dir(tmp_path)
    own = tmp_path / "mynet.py"
    own.write_text(OWN)
    # channel pruning only, so the export's channel counts are the plan's
    assert cli.main(["search", "--model", f"{own}:build", "--profile", "xeon", "--trials", "2", "--k", "1",
                     "--finetune-steps", "5", "--no-warm-start", "--quiet", "--results-dir", str(results)]) == 0
    name = "mynet-build-digits-xeon"
    study = S.load_study(name, S.open_storage(None, results))
    spec = study.user_attrs["spec"]
    assert spec["model"] == f"{own.resolve()}:build" and spec["dataset"] == "digits"
    layers = {d["name"]: d for d in study.user_attrs["layers"]}
    assert layers["c2"]["leader"] == 0 and layers["fc"]["fixed"] == "the model's output"
    plan = study.trials[0].user_attrs["plan"]
    assert plan["ratio"][0] == plan["ratio"][1] and plan["granularity"][0] == plan["granularity"][1]
    capsys.readouterr()
    out = tmp_path / "exp"
    assert cli.main(["export", "--study", name, "--trial", "0", "--out", str(out), "--finetune-steps", "0",
                     "--results-dir", str(results)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["onnx_kept_back"] == []


@pytest.mark.parametrize("ref,match", [
    ("{dir}/missing.py:build", "no such file"),
    ("{dir}/mynet.py:nope", "has no function 'nope'"),
    ("{dir}/mynet.py:not_a_task", "not_a_task\\(\\) returned int: expected a models.Task"),
    ("{dir}/broken.py:build", "cannot import .*SyntaxError"),
    ("{dir}/mynet.py", "name the function that builds the task too, e.g. .*mynet.py:build"),
])
def test_bad_model_reference_is_one_line(tmp_path, capsys, ref, match):
    (tmp_path / "mynet.py").write_text(OWN)
    (tmp_path / "broken.py").write_text("def build(:\n")
    code = cli.main(["search", "--model", ref.format(dir=tmp_path), "--trials", "1",
                     "--results-dir", str(tmp_path / "results")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: --model") and "\n" not in err
    assert re.search(match, err), err
    assert not (tmp_path / "results" / "studies.db").exists()
