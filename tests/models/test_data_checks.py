"""Issue 17, item 3: every split is checked before any work starts, and a bad one is one line
naming the split and the fix: at Dataset construction (present, non-empty, as many targets as
inputs, finite numeric inputs, integer labels inside num_classes), and when the Engine is
built (a batch no larger than the training split, outputs that fit the targets), through
compress() and through `hwcompress search --model file.py:build`."""
from __future__ import annotations

import dataclasses
import textwrap

import flax.linen as nn
import jax
import numpy as np
import pytest

import models
from models.errors import ModelError
from search import cli
from search.api import compress
from search.engine.config import FinetuneConfig
from search.engine.finetune import Engine

DIGITS = models.load_dataset("digits")


class MLP(nn.Module):
    """A user's small classifier: flatten, Dense(16), Dense(classes)."""

    classes: int = 10

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(16, name="fc1")(x.reshape(x.shape[0], -1)))
        return nn.Dense(self.classes, name="fc2")(x)


def _variables(module, shape=DIGITS.input_shape):
    return module.init(jax.random.PRNGKey(0), np.zeros((1, *shape), np.float32))


def _with(a, i, v):
    a = np.array(a)
    a[i] = v
    return a


EMPTY = dict(x_val=DIGITS.x_val[:0], y_val=DIGITS.y_val[:0])
CASES = {  # changed fields -> what the one line must say
    "empty validation": (EMPTY, "validation split: it is empty .*give it at least one example"),
    "missing test": (dict(y_test=None), "the test split is missing \\(y_test is None\\)"),
    "lengths": (dict(y_train=DIGITS.y_train[:-1]), "training split: x_train has 1257 examples but y_train has 1256"),
    "nan input": (dict(x_test=_with(DIGITS.x_test, (5, 0, 0, 0), np.nan)), "test split: x_test has NaN .*example 5"),
    "inf input": (dict(x_val=_with(DIGITS.x_val, (0, 1, 1, 0), np.inf)), "validation split: x_val has NaN or infinite"),
    "label too big": (dict(y_train=_with(DIGITS.y_train, 3, 10)), "training split: y_train holds label 10 but num_classes=10"),
    "negative label": (dict(y_val=_with(DIGITS.y_val, 0, -1)), "validation split: y_val holds the negative label -1"),
    "float labels": (dict(y_test=DIGITS.y_test.astype(np.float32)), "test split: y_test .*give integer class labels"),
    "one-hot labels": (dict(y_val=np.eye(10, dtype=np.int32)[DIGITS.y_val]), "validation split: y_val has shape \\(180, 10\\)"),
    "other channels": (dict(x_val=np.repeat(DIGITS.x_val, 3, -1)), "validation split: x_val has examples of shape \\(8, 8, 3\\)"),
    "no example axis": (dict(x_test=DIGITS.x_test[:, 0, 0, 0]), "test split: x_test has shape \\(360,\\)"),
    "text inputs": (dict(x_val=DIGITS.x_val.astype(str)), "validation split: x_val .*give numeric inputs"),
    "kind": (dict(kind="clasification"), "kind 'clasification' is not one of classification, regression"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_bad_split_is_one_line_naming_it_and_the_fix(case):
    changes, match = CASES[case]
    with pytest.raises(ModelError, match=match) as e:
        dataclasses.replace(DIGITS, **changes)
    assert "\n" not in str(e.value) and str(e.value).startswith("data set 'digits'")


def test_regression_targets_are_checked_too():
    reg = dict(kind="regression", num_classes=None, y_train=np.zeros((1257, 8, 8, 1), np.float32),
               y_val=np.zeros((180, 8, 8, 1), np.float32), y_test=np.zeros((360, 8, 8, 1), np.float32))
    dataclasses.replace(DIGITS, **reg)  # fine
    with pytest.raises(ModelError, match="validation split: y_val has NaN"):
        dataclasses.replace(DIGITS, **{**reg, "y_val": _with(reg["y_val"], (2, 0, 0, 0), np.nan)})
    # a model whose outputs are not the targets' shape
    task = models.Task(name="mlp", module=MLP(), data=dataclasses.replace(DIGITS, **reg), loss=models.metrics.mse,
                       metric=models.metrics.psnr_db, metric_name="psnr_db")
    with pytest.raises(ModelError, match="training split .*outputs have shape \\(10,\\) .*y_train has \\(8, 8, 1\\)"):
        task.check()


def _compress(module, variables, data):
    return compress(module, variables, data, models.metrics.cross_entropy, models.metrics.accuracy, "mobile-cpu",
                    metric_name="accuracy", n_trials=1, finetune_steps=1, k=1, batch=1, storage="memory",
                    results_dir="unused-results")


def test_compress_with_an_empty_validation_split_says_so(tmp_path, monkeypatch):
    """The reported case: was `ValueError: range() arg 3 must not be zero` from the engine."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelError, match="validation split: it is empty"):
        _compress(MLP(), _variables(MLP()), dataclasses.replace(DIGITS, **EMPTY))


@pytest.mark.parametrize("module,shape,num_classes,match", [
    (MLP(classes=3), None, 10, "training split of 'digits': outputs have shape \\(3,\\) .*\\[N, 10\\]"),
    (MLP(classes=3), None, None, "y_train holds label 9 but the model gives 3 class scores"),
])
def test_compress_checks_the_model_against_the_data_before_training(tmp_path, monkeypatch, module, shape,
                                                                     num_classes, match):
    monkeypatch.chdir(tmp_path)
    data = dataclasses.replace(DIGITS, num_classes=num_classes)
    with pytest.raises(ModelError, match=match) as e:
        _compress(module, _variables(module, shape or DIGITS.input_shape), data)
    assert "\n" not in str(e.value)
    assert not list(tmp_path.iterdir())  # nothing trained, nothing cached


def test_a_batch_larger_than_the_training_split_is_refused_when_it_trains():
    task = models.Task(name="mlp", module=MLP(), data=DIGITS, loss=models.metrics.cross_entropy,
                       metric=models.metrics.accuracy, metric_name="accuracy")
    with pytest.raises(ModelError, match="training split: it has 1257 examples, fewer than the batch size 2000"):
        Engine(task, _variables(MLP()), FinetuneConfig(steps=1, batch_size=2000, k=1))
    Engine(task, _variables(MLP()), FinetuneConfig(steps=0, batch_size=2000, k=1))  # compress only: no batches


def test_weights_for_other_inputs_are_refused_by_the_engine():
    task = models.Task(name="mlp", module=MLP(), data=DIGITS, loss=models.metrics.cross_entropy,
                       metric=models.metrics.accuracy, metric_name="accuracy")
    with pytest.raises(ModelError, match="does not run on the training split .*shape \\(8, 8, 1\\).*ScopeParamShapeError"):
        Engine(task, _variables(MLP(), (28, 28, 1)), FinetuneConfig(steps=1, k=1))


BUILDER = textwrap.dedent('''
    import dataclasses
    import flax.linen as nn
    import numpy as np
    import models


    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.relu(nn.Dense(16, name="fc1")(x.reshape(x.shape[0], -1)))
            return nn.Dense(10, name="fc2")(x)


    def build():
        d = models.load_dataset("digits")
        data = dataclasses.replace(d, {changes})
        return models.Task(name="mynet", module=Net(), data=data, loss=models.metrics.cross_entropy,
                           metric=models.metrics.accuracy, metric_name="accuracy",
                           train=models.TrainConfig(steps=5, batch_size=32))
''')


@pytest.mark.parametrize("changes,match", [
    ("x_val=d.x_val[:0], y_val=d.y_val[:0]", "validation split: it is empty"),
    ("y_test=d.y_test.astype(np.float32)", "test split: y_test has shape \\(360,\\) and dtype float32"),
])
def test_cli_own_model_with_bad_data_is_one_line(tmp_path, capsys, changes, match):
    (tmp_path / "mynet.py").write_text(BUILDER.format(changes=changes))
    results = tmp_path / "results"
    code = cli.main(["search", "--model", f"{tmp_path / 'mynet.py'}:build", "--trials", "1", "--finetune-steps", "1",
                     "--no-warm-start", "--quiet", "--results-dir", str(results)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and "\n" not in err, err
    assert "data set 'digits'" in err and __import__("re").search(match, err), err
    assert not (results / "studies.db").exists()


def test_compress_takes_a_batch_that_fits_a_small_training_split(tmp_path):
    """100 training examples: the default batch (128) is refused in one line that names the
    option, and compress(finetune_batch_size=32) searches."""
    small = dataclasses.replace(DIGITS, x_train=DIGITS.x_train[:100], y_train=DIGITS.y_train[:100])
    kw = dict(n_trials=1, batch=1, finetune_steps=1, k=1, metric_name="accuracy", results_dir=str(tmp_path))
    with pytest.raises(ModelError, match="finetune_batch_size"):
        compress(MLP(), _variables(MLP()), small, models.metrics.cross_entropy, models.metrics.accuracy,
                 "mobile-cpu", **kw)
    front = compress(MLP(), _variables(MLP()), small, models.metrics.cross_entropy, models.metrics.accuracy,
                     "mobile-cpu", finetune_batch_size=32, **kw)
    assert len(front) == 1 and np.isfinite(front["quality"].iloc[0])  # one trial, fine-tuned on batches of 32
