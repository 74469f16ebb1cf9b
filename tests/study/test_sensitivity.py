"""Layer sensitivity probes and the warm-start plans built from them."""
import dataclasses
import json

import numpy as np
import pytest

import models
from models.task import TrainConfig
from search.compression import plan as P
from search.engine.config import FinetuneConfig
from search.engine.finetune import Engine
from search.compression.layers import Layer
from search.study.sensitivity import (cached_sensitivity, insensitivity_ratios, measure_sensitivity, probe_plans,
                                     sensitivity_key, warm_start_plans)
from search.study.space import space_for_profile
from tests.support import shared_cache


def _dense(i, name, n_in, n_out):
    return Layer(i, name, (name,), "dense", (n_in, n_out), (n_in,), (n_out,), 1, True, n_in * n_out, n_in * n_out + n_out)


LAYERS = (_dense(0, "a", 64, 300), _dense(1, "b", 300, 100), _dense(2, "c", 100, 10))


def test_probe_plans_touch_one_layer_each():
    plans = probe_plans(3)
    assert plans.batch_shape == (6,)
    np.testing.assert_allclose(plans.ratio[:3], np.eye(3) * 0.5)
    assert np.all(plans.ratio[3:] == 0)
    assert (plans.weight_bits[3:] < 32).sum(axis=1).tolist() == [1, 1, 1]  # one 4-bit layer per row
    assert np.all(plans.weight_bits[:3] == 32)


def test_probe_of_a_group_member_prunes_its_group():
    """Layer 2 is tied to layer 0 (a residual stage): its probe sets the group's ratio, the
    leader's, which is what the tied plan prunes both with."""
    plans = probe_plans(3, leaders=[0, 1, 0])
    np.testing.assert_allclose(plans.ratio[:3], [[0.5, 0, 0], [0, 0.5, 0], [0.5, 0, 0]])


def test_insensitive_layers_are_pruned_harder_at_the_target_mean():
    sens = {"baseline": 0.9, "prune_loss": [0.001, 0.2, 0.05]}
    space = space_for_profile(None)
    r = insensitivity_ratios(sens, LAYERS, 0.5, space)
    assert r[0] > r[2] > r[1]  # least loss, most pruning
    params = np.array([l.params for l in LAYERS])
    assert abs((r * params).sum() / params.sum() - 0.5) < 0.03  # snapped to the 0.02 grid
    assert r.max() <= space.max_ratio


def test_warm_start_begins_with_uniform_int8():
    space = space_for_profile(None)
    plans = warm_start_plans({"baseline": 0.9, "prune_loss": [0.0, 0.1, 0.3]}, LAYERS, space)
    assert plans[0].weight_bits.tolist() == [8, 8, 8] and plans[0].act_bits.tolist() == [8, 8, 8]
    assert np.all(plans[0].ratio == 0)
    assert any(np.any(p.quant_mode == P.CODEBOOK) for p in plans)  # a Deep Compression-like start
    assert len(warm_start_plans(None, LAYERS, space)) == 1


def test_measured_sensitivity_on_digits(tmp_path):
    from models.train import train_baseline

    task = dataclasses.replace(models.get_task("lenet300", "digits"), train=TrainConfig(steps=150, batch_size=64))
    params, info = train_baseline(task, cache_dir=shared_cache())  # the same baseline as test_study's and test_pruner's
    engine = Engine(task, params, FinetuneConfig(steps=0, k=1, calib_examples=64))
    sens = measure_sensitivity(engine, engine.layers, info["val_metric"])
    assert sens["layers"] == ["fc1", "fc2", "fc3"]
    assert len(sens["prune_loss"]) == 3 and len(sens["bits_loss"]) == 3
    assert all(np.isfinite(sens["prune_loss"])) and all(abs(v) < 0.5 for v in sens["prune_loss"])
    # the 10-unit output layer has the fewest weights to spare: 50% of it costs the most
    assert sens["prune_loss"][2] == pytest.approx(max(sens["prune_loss"]), abs=0.03)

    # kept beside the baseline: a new study of the same baseline and settings reads it back
    key = info["cache_key"]
    assert cached_sensitivity(engine, engine.layers, info["val_metric"], tmp_path, key) == sens
    (path,) = (tmp_path / "sensitivity").glob("*.json")
    planted = {**sens, "prune_loss": [0.25, 0.5, 0.75]}
    path.write_text(json.dumps(planted))
    assert cached_sensitivity(engine, engine.layers, info["val_metric"], tmp_path, key) == planted
    path.write_text("{not json")  # a damaged file is measured again and rewritten
    assert cached_sensitivity(engine, engine.layers, info["val_metric"], tmp_path, key) == sens
    assert json.loads(path.read_text()) == sens
    # anything the answer depends on changes the key; the step driver and K do not
    other = Engine(task, params, FinetuneConfig(steps=0, k=1, calib_examples=32))
    same = Engine(task, params, FinetuneConfig(steps=0, k=2, loop="fused", calib_examples=64))
    k0 = sensitivity_key(key, engine.layers, info["val_metric"], engine)
    assert sensitivity_key(key, engine.layers, info["val_metric"], same) == k0
    assert sensitivity_key(key, engine.layers, info["val_metric"], other) != k0
    assert sensitivity_key("other-baseline", engine.layers, info["val_metric"], engine) != k0
    assert sensitivity_key(key, engine.layers, info["val_metric"] + 0.01, engine) != k0
