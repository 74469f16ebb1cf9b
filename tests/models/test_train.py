"""Baseline training, batched evaluation and the checkpoint cache."""
from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np
import pytest
from safetensors import safe_open

import models
from models import train as train_mod
from models.errors import ModelError
from models.train import (
    batch_order,
    cache_key,
    evaluate,
    load_params,
    make_optimizer,
    per_example_metric,
    save_params,
    train_baseline,
    train_step,
)
from search.cli import main as cli_main


def small_task(steps: int = 60, **kw):
    """lenet300 on digits with a short schedule: trains in about a second."""
    task = models.get_task("lenet300", "digits", **kw)
    return dataclasses.replace(task, train=dataclasses.replace(task.train, steps=steps))


def test_training_learns_and_cache_hit_does_not_retrain(tmp_path, monkeypatch):
    task = small_task()
    params, info = train_baseline(task, cache_dir=tmp_path)
    assert info["loaded"] is False and info["steps_run"] == 60
    assert info["val_metric"] > 0.85  # 60 steps are enough on digits; chance is 0.1
    assert info["test_metric"] == pytest.approx(evaluate(task, params, "test"))
    assert sorted(params) == ["params"]  # the variables dict of a stateless model
    entry = tmp_path / info["cache_key"]
    meta = json.loads((entry / "meta.json").read_text())
    assert meta["train"]["steps"] == 60 and meta["model"] == "lenet300" and meta["format"] == 2
    with safe_open(str(entry / "params.safetensors"), framework="numpy") as f:
        assert set(f.keys()) == {f"params/fc{i}/{w}" for i in (1, 2, 3) for w in ("kernel", "bias")}

    def no_training(*a, **k):
        raise AssertionError("a cache hit must not train")

    monkeypatch.setattr(train_mod, "fit", no_training)
    again, info2 = train_baseline(small_task(), cache_dir=tmp_path)
    assert info2["loaded"] is True and info2["steps_run"] == 0
    assert info2["cache_key"] == info["cache_key"]
    assert info2["val_metric"] == info["val_metric"]
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(again)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert jax.tree.structure(params) == jax.tree.structure(again)


def test_force_retrains_and_broken_entry_is_replaced(tmp_path):
    task = small_task(steps=20)
    _, info = train_baseline(task, cache_dir=tmp_path)
    _, forced = train_baseline(task, cache_dir=tmp_path, force=True)
    assert forced["loaded"] is False and forced["steps_run"] == 20
    (tmp_path / info["cache_key"] / "params.safetensors").write_bytes(b"not safetensors")
    _, healed = train_baseline(task, cache_dir=tmp_path)
    assert healed["loaded"] is False
    _, loaded = train_baseline(task, cache_dir=tmp_path)
    assert loaded["loaded"] is True


def test_cache_key_tracks_what_the_baseline_depends_on():
    base = cache_key(small_task())
    assert cache_key(small_task()) == base
    assert cache_key(small_task(steps=61)) != base
    assert cache_key(small_task(seed=1)) != base
    assert cache_key(small_task(hidden=(30, 10))) != base


def test_safetensors_round_trip_is_exact(tmp_path):
    task = models.get_task("mobilenet", "digits")
    params = task.init_params(seed=3)
    save_params(params, tmp_path / "p.safetensors")
    back = load_params(tmp_path / "p.safetensors", task.init_params())
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(back)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="names differ"):
        load_params(tmp_path / "p.safetensors", models.get_task("lenet300", "digits").init_params())


def test_batched_evaluation_matches_one_pass(monkeypatch):
    task = models.get_task("lenet5", "digits")
    params = task.init_params(seed=1)
    x, y = task.data.x_test, task.data.y_test
    whole = np.asarray(task.metric(task.module.apply({"params": params}, x), y))
    monkeypatch.setattr(train_mod, "EVAL_ELEMENTS", 64 * 7)  # batches of 7 and a padded tail
    np.testing.assert_array_equal(per_example_metric(task, params, x, y), whole)
    with pytest.raises(ModelError, match="split"):
        evaluate(task, params, "holdout")


def test_batch_order_visits_every_example_once_per_epoch():
    order = batch_order(10, 3, 7, seed=0)
    assert order.shape == (7, 3)
    for epoch in (order[0:3], order[3:6]):
        assert len(set(epoch.ravel().tolist())) == 9
    np.testing.assert_array_equal(order, batch_order(10, 3, 7, seed=0))


def test_train_command_reports_cache(tmp_path, capsys):
    args = ["train", "--model", "lenet300", "--dataset", "digits", "--steps", "20",
            "--cache-dir", str(tmp_path), "--json"]
    assert cli_main(args) == 0
    first = json.loads(capsys.readouterr().out)
    assert cli_main(args) == 0
    second = json.loads(capsys.readouterr().out)
    assert first["loaded"] is False and second["loaded"] is True
    assert second["cache_path"].startswith(str(tmp_path))
    assert cli_main(["train", "--steps", "0", "--cache-dir", str(tmp_path)]) == 2
    assert cli_main(["train", "--hparam", "nonsense", "--cache-dir", str(tmp_path)]) == 2


def test_train_step_is_fit_for_a_stateless_model():
    """bench_engine's reference step takes the same steps as the baseline's training."""
    task = small_task(steps=3)
    init = task.init_params()
    fitted, _ = train_mod.fit(task)
    tx = make_optimizer(task.train)
    step = train_step(task.module, task.loss, tx)
    params, opt_state = init, tx.init(init)
    order = batch_order(len(task.data.x_train), task.train.batch_size, 3, task.train.seed)
    for idx in order:
        params, opt_state, _ = step(params, opt_state, task.data.x_train, task.data.y_train, idx)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(fitted["params"])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


def test_augmentation_shifts_and_flips_deterministically():
    x = np.arange(2 * 4 * 4, dtype=np.float32).reshape(2, 4, 4, 1)
    key = jax.random.PRNGKey(0)
    flipped = np.asarray(train_mod.augment(x, key, crop=0, flip=True))
    for a, b in zip(flipped, x):  # each image is itself or its mirror
        assert np.array_equal(a, b) or np.array_equal(a, b[:, ::-1])
    shifted = np.asarray(train_mod.augment(x, key, crop=1, flip=False))
    assert shifted.shape == x.shape
    np.testing.assert_array_equal(shifted, np.asarray(train_mod.augment(x, key, crop=1, flip=False)))
    for a, b in zip(shifted, x):  # a shift by at most one pixel, zero filled
        assert any(np.array_equal(a, np.pad(b, ((1, 1), (1, 1), (0, 0)))[i:i + 4, j:j + 4])
                   for i in range(3) for j in range(3))
