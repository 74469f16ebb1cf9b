"""Model state (BatchNorm): variables vs params, training updates batch_stats, eval mode,
the cache and --weights files with every collection; ResNet and MobileNetV2 shapes."""
from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np
import pytest
from flax import traverse_util

import models
from models import train as train_mod
from models.errors import ModelError
from models.mobilenetv2 import MobileNetV2, make_divisible
from models.resnet import ResNet
from models.task import join_variables, split_variables
from models.train import evaluate, save_params, train_baseline, user_baseline
from tests.models.test_models import count


def tiny(model: str, steps: int = 3):
    """A tiny BatchNorm model on digits with a few steps: compiles and trains in seconds."""
    hp = ({"depth": 1, "width": 0.25} if model == "resnet20" else
          {"width": 0.5, "blocks": ((1, 8, 1, 1), (2, 8, 2, 2)), "last": 16})
    task = models.get_task(model, "digits", **hp)
    return dataclasses.replace(task, train=dataclasses.replace(task.train, steps=steps))


def leaves_equal(a, b) -> bool:
    return (jax.tree.structure(a) == jax.tree.structure(b)
            and all(np.array_equal(np.asarray(x), np.asarray(y))
                    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))))


def test_resnet20_param_counts():
    # He et al. 2016 table 6: ResNet-20 has 0.27M params (option A shortcuts, RGB input):
    # stem 3*3*3*16 = 432; stage 1: 6 convs 3*3*16*16 = 13824; stage 2: 3*3*16*32 + 5 * 3*3*32*32
    # = 50688; stage 3: 3*3*32*64 + 5 * 3*3*64*64 = 202752; BN scale+bias 2*(16 + 6*16 + 6*32
    # + 6*64) = 1376; fc 64*10+10 = 650
    assert count(ResNet(shortcut="padding"), (32, 32, 3)) == 269722
    # grayscale: the stem loses 3*3*2*16 = 288; projections add 16*32 + 2*32 and 32*64 + 2*64
    assert count(ResNet(shortcut="padding"), (28, 28, 1)) == 269722 - 288
    assert count(ResNet(), (28, 28, 1)) == 269722 - 288 + 576 + 2176 == 272186


def test_mobilenetv2_param_count_and_rounding():
    # stem 3*3*1*32 + bn 64; b1 (t=1): dw 3*3*32 + 64, project 32*16 + 32;
    # b2 (t=6, 16 -> 96 -> 24): expand 16*96 + 192, dw 9*96 + 192, project 96*24 + 48;
    # last 24*32 + 64; fc 32*10 + 10
    expected = 352 + 352 + 544 + 1728 + 1056 + 2352 + 832 + 330
    assert count(MobileNetV2(blocks=((1, 16, 1, 1), (6, 24, 1, 2)), last=32), (8, 8, 1)) == expected
    # the reference _make_divisible: nearest multiple of 8, never 10% below
    assert [make_divisible(v) for v in (32 * 0.35, 12, 3, 100)] == [16, 16, 8, 104]


def test_layer_names_and_collections():
    for model, names in (
            ("resnet20", ["stem/kernel", "stem_bn/scale", "s1b1/conv1/kernel", "s1b1/bn2/bias",
                          "s2b1/proj/kernel", "s3b1/proj_bn/scale", "fc/kernel"]),
            ("mobilenetv2", ["stem/kernel", "b1/dw/kernel", "b2/expand/kernel", "b2/project_bn/bias",
                             "last/kernel", "fc/bias"])):
        variables = jax.eval_shape(tiny(model).init_variables)
        assert sorted(variables) == ["batch_stats", "params"]
        have = set(traverse_util.flatten_dict(variables["params"], sep="/"))
        assert set(names) <= have, model
        assert "b1/expand/kernel" not in have  # t == 1: no expansion conv
        assert "s1b1/proj/kernel" not in have  # same shape: identity shortcut
        stats = set(traverse_util.flatten_dict(variables["batch_stats"], sep="/"))
        assert "stem_bn/mean" in stats and "stem_bn/var" in stats
    padded = jax.eval_shape(models.get_task("resnet20", "digits", depth=1, shortcut="padding").init_params)
    assert "proj" not in padded["s2b1"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """model -> (task, fresh variables, train_baseline's variables and info, cache dir): each
    tiny model is compiled and trained once for the tests below."""
    cache = tmp_path_factory.mktemp("cache")
    out = {}
    for model in ("resnet20", "mobilenetv2"):
        task = tiny(model)
        variables, info = train_baseline(task, cache_dir=cache)
        out[model] = (task, task.init_variables(), variables, info, cache)
    return out


@pytest.mark.parametrize("model", ["resnet20", "mobilenetv2"])
def test_training_updates_params_and_batch_stats(trained, model):
    task, before, after, info, _ = trained[model]
    assert info["loaded"] is False and info["steps_run"] == task.train.steps
    assert sorted(after) == ["batch_stats", "params"]
    for col in ("params", "batch_stats"):
        moved = [not np.array_equal(a, b) for a, b in
                 zip(jax.tree.leaves(before[col]), jax.tree.leaves(after[col]))]
        assert all(moved), col


def test_eval_mode_is_per_example(trained):
    """In eval mode BatchNorm uses its running averages: an example's output does not depend
    on the rest of its batch (in training mode it does)."""
    task, _, variables, _, _ = trained["resnet20"]
    x = task.data.x_val[:8]
    evaluate = jax.jit(functools.partial(task.module.apply, **task.eval_kwargs))
    np.testing.assert_allclose(evaluate(variables, x)[:1], evaluate(variables, x[:1]),
                               rtol=1e-5, atol=1e-5)
    train = jax.jit(functools.partial(task.module.apply, **task.train_kwargs, mutable=["batch_stats"]))
    eight, _ = train(variables, x)
    one_of_them, _ = train(variables, np.concatenate([x[:1], x[:1] * 0.5] * 4))
    assert not np.allclose(eight[:1], one_of_them[:1], atol=1e-4)


@pytest.mark.parametrize("model", ["resnet20", "mobilenetv2"])
def test_baseline_cache_round_trip_keeps_every_collection(trained, model, monkeypatch):
    task, _, variables, info, cache = trained[model]
    monkeypatch.setattr(train_mod, "fit", None)  # a cache hit must not train
    again, info2 = train_baseline(task, cache_dir=cache)
    assert info2["loaded"] is True and leaves_equal(variables, again)
    assert info2["val_metric"] == info["val_metric"]
    assert info2["val_metric"] == pytest.approx(evaluate(task, again, "val"))
    with pytest.raises(ModelError, match="variables dict"):
        evaluate(task, variables["params"], "val")  # the running averages are missing


def test_split_and_join_variables():
    params = {"fc1": {"kernel": np.ones((2, 3)), "bias": np.zeros(3)}}
    assert split_variables(params) == (params, {})
    variables = {"params": params, "batch_stats": {"bn": {"mean": np.zeros(3)}}}
    p, state = split_variables(variables)
    assert p is params and list(state) == ["batch_stats"]
    assert join_variables(p, state) == variables
    assert split_variables({"params": params}) == (params, {})
    # a layer named like a collection but holding arrays is still a params tree
    assert split_variables({"params": np.ones(2)})[1] == {}


def test_user_weights_in_both_layouts(tmp_path):
    task = models.get_task("lenet300", "digits", hidden=(16,))
    variables = task.init_variables(seed=5)
    save_params(variables, tmp_path / "full.safetensors")  # as the cache holds them
    save_params(variables["params"], tmp_path / "bare.safetensors")  # as older versions did
    for name in ("full", "bare"):
        got, info = user_baseline(task, tmp_path / f"{name}.safetensors")
        assert leaves_equal(got, variables), name
        assert info["loaded"] is True and info["cache_key"].startswith("weights-")
    bn = tiny("resnet20")
    bn_vars = jax.tree.map(lambda a: np.ones(a.shape, a.dtype), jax.eval_shape(bn.init_variables))
    save_params(bn_vars, tmp_path / "bn.safetensors")
    assert leaves_equal(user_baseline(bn, tmp_path / "bn.safetensors")[0], bn_vars)
    save_params(bn_vars["params"], tmp_path / "bn_bare.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors")
    for wrong, task_, words in (("bn.safetensors", task, "names differ"),
                                ("bn_bare.safetensors", bn, "missing 'batch_stats/"),
                                ("junk.safetensors", task, "not a safetensors file"),
                                ("absent.safetensors", task, "cannot read")):
        with pytest.raises(ModelError) as e:
            user_baseline(task_, tmp_path / wrong)
        assert "\n" not in str(e.value) and words in str(e.value), wrong
