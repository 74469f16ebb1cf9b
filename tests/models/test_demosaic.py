"""DemosaicNet and demosaic-images: parameter count, mosaic packing on known patterns, the data
set's splits, the bilinear reference scored exactly as the model is, and a tiny search on
`mobile-npu` that exports."""
from __future__ import annotations

import dataclasses
import json
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
from models import data_demosaic as D
from models.errors import ModelError
from models.demosaicnet import DemosaicNet, depth_to_space, masked_mosaic
from models.train import evaluate, train_baseline
from search.api import make_spec, search
from search.compression import plan as P
from search.compression.layers import discover_layers, task_model
from search.cost.roofline import price
from search.engine.config import FinetuneConfig
from search.export.exporter import export_plan
from search.study.space import plan_from_dict
from tests.support import results_dir

TINY = {"depth": 1, "width": 4}


def _n_params(module: nn.Module, shape: tuple[int, ...]) -> int:
    shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), jnp.zeros((1, *shape)))["params"]
    return sum(int(np.prod(a.shape)) for a in jax.tree_util.tree_leaves(shapes))


def test_param_count():
    # 5 input planes (R, G, G, B, noise level), depth D, width W; kernel + bias per layer:
    #   conv1     3*3*5*W + W
    #   conv2..D  (D - 1) * (3*3*W*W + W)
    #   subpixel  1*1*W*12 + 12        (3 colours x 4 positions of the 2x2 block)
    #   fullres   3*3*6*W + W          (masked mosaic 3 + unpacked image 3)
    #   output    1*1*W*3 + 3
    # total 9 (D - 1) W^2 + (D + 115) W + 15
    # D=2, W=4: 144 + 468 + 15 = 627 (184 + 148 + 60 + 220 + 15)
    assert _n_params(DemosaicNet(depth=2, width=4), (8, 8, 5)) == 627
    # defaults D=6, W=32: 46080 + 3872 + 15 = 49967
    assert _n_params(DemosaicNet(), (8, 8, 5)) == 49967
    assert models.task_hparams("demosaicnet", "demosaic-images") == {"depth": 6, "width": 32}


def test_mosaic_and_packing_on_a_known_pattern():
    # pixel (y, x) of colour c holds 100 c + 10 y + x
    y, x = np.mgrid[0:4, 0:4]
    rgb = np.stack([100 * c + 10 * y + x for c in range(3)], axis=-1).astype(np.float32)
    bayer = D.mosaic(rgb)
    np.testing.assert_array_equal(bayer[:2, :2], [[0, 101], [110, 211]])  # R G / G B
    planes = D.pack(bayer)  # [2, 2, 4]: R, G (red rows), G (blue rows), B
    np.testing.assert_array_equal(planes[..., 0], [[0, 2], [20, 22]])
    np.testing.assert_array_equal(planes[..., 1], [[101, 103], [121, 123]])
    np.testing.assert_array_equal(planes[..., 2], [[110, 112], [130, 132]])
    np.testing.assert_array_equal(planes[..., 3], [[211, 213], [231, 233]])
    # unpacking puts every sample back at its pixel, in its own colour channel
    colour = np.zeros((4, 4, 3), np.float32)
    colour[0::2, 0::2, 0] = colour[0::2, 1::2, 1] = colour[1::2, 0::2, 1] = colour[1::2, 1::2, 2] = 1
    np.testing.assert_array_equal(np.asarray(masked_mosaic(planes[None]))[0], rgb * colour)
    # depth_to_space: channel 4 c + 2 dy + dx -> pixel (2i + dy, 2j + dx) of colour c
    z = np.arange(8, dtype=np.float32).reshape(1, 1, 1, 8)
    np.testing.assert_array_equal(np.asarray(depth_to_space(z))[0, ..., 1], [[4, 5], [6, 7]])


def test_network_input_planes_and_noise():
    rgb = np.full((2, 8, 8, 3), 0.5, np.float32)
    x = D.network_input(rgb, np.random.default_rng(0), sigma=0.1)
    assert x.shape == (2, 4, 4, 5) and x.dtype == np.float32
    np.testing.assert_array_equal(x[..., 4], np.float32(0.1))  # the known noise level, as a plane
    assert 0.05 < float(np.std(x[..., :4])) < 0.15
    clean = D.network_input(rgb, np.random.default_rng(0), sigma=0.0)
    np.testing.assert_array_equal(clean[..., :4], 0.5)


def test_bilinear_kernels_reproduce_a_linear_ramp():
    # bilinear interpolation is exact on a plane; the border is reflect-padded
    y, x = np.mgrid[0:16, 0:16].astype(np.float32)
    rgb = np.stack([0.01 * x + 0.02 * y, 0.3 + 0.01 * y, 0.5 - 0.01 * x], axis=-1)[None]
    out = np.asarray(D.bilinear(D.network_input(rgb, np.random.default_rng(0), sigma=0.0)))
    np.testing.assert_allclose(out[0, 1:-1, 1:-1], rgb[0, 1:-1, 1:-1], atol=1e-6)


@pytest.fixture(scope="module")
def small():
    return D.load_demosaic_images(0, n_patches=64)


def test_splits_are_deterministic_and_hold_out_whole_images(small):
    again = D.load_demosaic_images(0, n_patches=64)
    for f in ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test"):
        np.testing.assert_array_equal(getattr(small, f), getattr(again, f), err_msg=f)
    assert small.info == again.info
    tr, va, te = (set(small.info[f"{s}_images"]) for s in ("train", "val", "test"))
    assert not (tr & va) and not (tr & te) and not (va & te)
    assert (len(va), len(te)) == (D.N_VAL, D.N_TEST)
    n = D.EVAL_SIZE
    assert small.x_test.shape == (D.N_TEST, n // 2, n // 2, 5) and small.y_test.shape == (D.N_TEST, n, n, 3)
    assert small.x_train.shape == (64, D.PATCH // 2, D.PATCH // 2, 5)
    other = D.load_demosaic_images(1, n_patches=64)
    assert not np.array_equal(other.x_train, small.x_train)


def test_bilinear_psnr_is_computed_as_the_models(small):
    """The stored figure is the task's metric on the bilinear output, averaged as a model's
    quality on a split is (models.train.evaluate): a module that outputs bilinear scores it."""
    class Bilinear(nn.Module):
        @nn.compact
        def __call__(self, x):
            return D.bilinear(x)

    task = models.Task(name="bilinear", module=Bilinear(), data=small, loss=models.metrics.mse,
                       metric=models.metrics.psnr_db, metric_name="psnr_db")
    for split in ("train", "val", "test"):
        stored = small.info["bilinear_psnr_db"][split]
        assert evaluate(task, {}, split) == pytest.approx(stored, abs=1e-4)
        x, y = getattr(small, f"x_{split}"), getattr(small, f"y_{split}")
        direct = models.metrics.psnr_db(D.bilinear(jnp.asarray(x)), jnp.asarray(y))
        assert float(np.mean(direct)) == pytest.approx(stored, abs=1e-4)  # float32 sums
    assert 25.0 < small.info["bilinear_psnr_db"]["test"] < 40.0


def test_untrained_model_is_bilinear_demosaicking(small):
    """The full-resolution convs start as the bilinear kernels, so training begins at the
    reference (as vdsr begins at bicubic); only the border differs (zero padding, where the
    reference reflects) and ReLU clips what noise made negative."""
    x = small.x_val[:, :16, :16]
    module = DemosaicNet(depth=1, width=4)
    out = np.asarray(module.apply(jax.jit(module.init)(jax.random.PRNGKey(0), x), x))
    want = np.maximum(np.asarray(D.bilinear(jnp.asarray(x))), 0.0)
    np.testing.assert_allclose(out[:, 1:-1, 1:-1], want[:, 1:-1, 1:-1], atol=1e-6)


def test_registry_pairs_demosaicnet_only_with_its_data():
    assert "demosaicnet/demosaic-images" in models.valid_pairs()
    assert "vdsr/demosaic-images" not in models.valid_pairs()
    assert "demosaicnet/sr-images" not in models.valid_pairs()
    with pytest.raises(ModelError, match="demosaicnet depth=6, width=2 is too small.*width >= 3"):
        models.get_task("demosaicnet", "demosaic-images", width=2)


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    """`hwcompress search --model demosaicnet --dataset demosaic-images --profile mobile-npu
    --trials 2 --finetune-steps 2` through the API, at a tiny width and with a 30-step baseline
    (the default training takes 40 s even at this width)."""
    results = results_dir(tmp_path_factory.mktemp("demosaic"))
    task = models.get_task("demosaicnet", "demosaic-images", **TINY)
    task = dataclasses.replace(task, train=models.TrainConfig(steps=30, batch_size=16, learning_rate=5e-3))
    variables, info = train_baseline(task, cache_dir=results / "cache")
    spec = make_spec(model="demosaicnet", dataset="demosaic-images", profile="mobile-npu", hparams=TINY,
                     finetune=FinetuneConfig(steps=2, batch_size=16), n_trials=2)
    study = search(spec, None, results, study_name="dm", task=task, params=variables, baseline=info, k=1,
                   warm_start=False)
    return task, variables, study


def test_search_on_mobile_npu_runs(searched):
    _, _, study = searched
    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert len(done) == 2 and all(np.isfinite(t.user_attrs["quality"]) for t in done)
    layers = {d["name"]: d for d in study.user_attrs["layers"]}
    assert list(layers) == ["conv1", "subpixel", "fullres", "output"]
    assert layers["subpixel"]["fixed"]  # its 12 channels are pixels of the 2x2 block: never pruned
    assert all("mobile-npu" in t.user_attrs["costs"] for t in done)


def test_search_result_exports(searched, tmp_path):
    task, variables, study = searched
    trial = next(t for t in study.trials if t.state.name == "COMPLETE")
    plan = plan_from_dict(trial.user_attrs["plan"])
    result = export_plan(task, variables, plan, tmp_path / "export", finetune=FinetuneConfig(steps=2, batch_size=16, k=1),
                         profile="mobile-npu", costs=trial.user_attrs["costs"])
    q = result.config["quality"]
    assert q["test"] == q["test_reloaded"] and abs(q["test_onnx"] - q["test"]) < 0.05
    assert (tmp_path / "export" / "model.onnx").is_file()
    # standard JSON (what JSON.parse reads): a PSNR model's class agreement is null, not NaN
    def no_constants(name):
        raise ValueError(f"non-standard JSON constant {name}")
    for name in ("config.json", "size.json"):
        written = json.loads((tmp_path / "export" / name).read_text(), parse_constant=no_constants)
    assert written is not None and math.isnan(q["onnx_agreement"])
    assert json.loads((tmp_path / "export" / "config.json").read_text())["quality"]["onnx_agreement"] is None
    # trained on patches, exported for whole images: predicted at the exported input, the search's
    # patch costs kept beside
    image = tuple(task.data.x_test.shape[1:])
    assert result.config["model"]["input_shape"] == list(image) != list(task.data.input_shape)
    model, params = task_model(task, variables)
    whole = discover_layers(model, params, np.zeros((1, *image), np.float32))
    want = price("mobile-npu", whole, P.stack_plans([plan]))
    assert result.config["predicted"]["mobile-npu"]["latency_ms"] == pytest.approx(float(want.latency_ms[0]), rel=1e-9)
    searched_at = result.config["predicted_at_search_input"]
    assert searched_at["input_shape"] == list(task.data.input_shape) and searched_at["costs"] == trial.user_attrs["costs"]
    assert result.config["predicted"]["mobile-npu"]["latency_ms"] > 4 * searched_at["costs"]["mobile-npu"]["latency_ms"]
