"""Models and the task registry: parameter counts, layer names, registry errors."""
from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import traverse_util

import models
from models.errors import ModelError
from models.lenet import LeNet5, LeNet300
from models.mobilenet import MobileNet
from models.vdsr import VDSR


def count(module, shape) -> int:
    """Parameters of a module for one input shape, from an abstract init (nothing allocated)."""
    tree = jax.eval_shape(module.init, jax.random.PRNGKey(0), np.zeros((1, *shape), np.float32))
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree["params"]))


def test_lenet300_param_counts():
    # 8x8 digits: 64*300+300 + 300*100+100 + 100*10+10 = 19500 + 30100 + 1010
    assert count(LeNet300(), (8, 8, 1)) == 50610
    # 28x28: 784*300+300 + 30100 + 1010 = 235500 + 31110; Han et al. say 267K
    assert count(LeNet300(), (28, 28, 1)) == 266610


def test_lenet5_param_counts():
    # 28x28 VALID: conv1 5*5*1*20+20 = 520 (28->24, pool 12); conv2 5*5*20*50+50 = 25050
    # (12->8, pool 4); fc1 4*4*50*500+500 = 400500; fc2 500*10+10 = 5010; Han et al.: 431K
    assert count(LeNet5(), (28, 28, 1)) == 520 + 25050 + 400500 + 5010 == 431080
    # 8x8 SAME: 8 -> pool 4 -> pool 2, so fc1 is 2*2*50*500+500 = 100500
    assert count(LeNet5(padding="SAME"), (8, 8, 1)) == 520 + 25050 + 100500 + 5010


def test_mobilenet_param_count():
    # stem 3*3*1*16+16 = 160
    # block1: dw 3*3*1*16+16 = 160, pw 16*32+32 = 544
    # block2: dw 3*3*1*32+32 = 320, pw 32*64+64 = 2112
    # block3: dw 3*3*1*64+64 = 640, pw 64*128+128 = 8320
    # fc 128*10+10 = 1290; pooling makes the count independent of the input size
    expected = 160 + 160 + 544 + 320 + 2112 + 640 + 8320 + 1290
    assert count(MobileNet(), (8, 8, 1)) == expected == 13546
    assert count(MobileNet(stem_stride=2), (28, 28, 1)) == expected


def test_vdsr_param_counts():
    # 8x32: conv1 3*3*1*32+32 = 320; six 3*3*32*32+32 = 9248; conv8 3*3*32*1+1 = 289
    assert count(VDSR(), (32, 32, 1)) == 320 + 6 * 9248 + 289 == 56097
    # the paper's 20x64: 640 + 18 * (3*3*64*64+64) + 577 = 665921 (Kim et al.: ~665K)
    assert count(VDSR(depth=20, width=64), (32, 32, 1)) == 640 + 18 * 36928 + 577


def test_layer_names_and_depthwise():
    params = models.get_task("mobilenet", "digits").init_params()
    names = sorted(traverse_util.flatten_dict(params, sep="/"))
    assert "block1/dw/kernel" in names and "block3/pw/bias" in names and "fc/kernel" in names
    # depthwise kernel: [3, 3, in/groups = 1, channels]
    assert params["block2"]["dw"]["kernel"].shape == (3, 3, 1, 32)
    lenet = models.get_task("lenet300", "digits").init_params()
    assert sorted(lenet) == ["fc1", "fc2", "fc3"]


def test_output_shapes_and_vdsr_starts_at_bicubic():
    for name in ("lenet300", "lenet5", "mobilenet"):
        task = models.get_task(name, "digits")
        out = task.module.apply({"params": task.init_params()}, task.data.x_val[:5])
        assert out.shape == (5, 10)
    task = models.get_task("vdsr", "sr-images")
    x = task.data.x_val
    out = task.module.apply({"params": task.init_params()}, x)
    # the last conv starts at zero, so the untrained model is exactly bicubic upscaling
    np.testing.assert_array_equal(np.asarray(out), x)
    psnr = float(task.metric(out, task.data.y_val).mean())
    assert psnr == pytest.approx(task.data.info["bicubic_psnr_db"]["val"], abs=1e-3)


def test_registry_lists_and_hparams():
    assert models.list_models() == ["demosaicnet", "lenet300", "lenet5", "mobilenet", "mobilenetv2", "resnet20",
                                    "vdsr"]
    assert models.list_datasets() == ["demosaic-images", "digits", "fashion-mnist", "sr-images"]
    task = models.get_task("vdsr", "sr-images", depth=4, width=8)
    assert task.hparams == {"depth": 4, "width": 8}
    assert task.metric_name == "psnr_db" and task.data.kind == "regression"
    assert models.get_task("lenet5", "digits").hparams["padding"] == "SAME"
    resnet = models.get_task("resnet20", "digits")
    assert resnet.hparams == {"depth": 3, "width": 1.0, "shortcut": "projection"}
    assert resnet.eval_kwargs == {"train": False} and resnet.train_kwargs == {"train": True}
    assert sorted(models.get_task("mobilenetv2", "fashion-mnist").hparams) == ["blocks", "last", "width"]
    lenet = models.get_task("lenet300", "digits")
    assert lenet.eval_kwargs == {} and lenet.train_kwargs == {}  # stateless: plain apply


@pytest.mark.parametrize("model, dataset, words", [
    ("resnet", "digits", ["'resnet'", "lenet300", "lenet5", "mobilenet", "vdsr"]),
    ("lenet300", "mnist", ["'mnist'", "digits", "fashion-mnist", "sr-images"]),
    ("vdsr", "digits", ["vdsr/sr-images", "lenet300/digits"]),
    ("lenet300", "sr-images", ["valid pairs", "lenet5/fashion-mnist"]),
])
def test_unknown_or_mismatched_names_list_valid_ones(model, dataset, words):
    with pytest.raises(ModelError) as e:
        models.get_task(model, dataset)
    msg = str(e.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg


def test_unknown_hparam_lists_valid_ones():
    with pytest.raises(ModelError, match="'depht'.*depth, width"):
        models.get_task("vdsr", "sr-images", depht=4)
    with pytest.raises(ModelError, match="padding"):
        models.get_task("lenet5", "digits", padding="FULL")
    with pytest.raises(ModelError, match="'projection' or 'padding'"):
        models.get_task("resnet20", "digits", shortcut="B")
    with pytest.raises(ModelError, match="rows"):
        models.get_task("mobilenetv2", "digits", blocks=[[6, 24, 2]])
    with pytest.raises(ModelError, match="width > 0"):
        models.get_task("mobilenetv2", "digits", width=0)


def test_image_restoration_models_fine_tune_on_their_training_batch():
    """`hwcompress search`'s default fine-tune batch: 128 for a classifier, the training batch of
    patches (16) for vdsr and demosaicnet, and 128 for a model that is not the zoo's."""
    assert models.finetune_batch_size("lenet300", "digits") == 128
    assert models.finetune_batch_size("resnet20", "fashion-mnist") == 128
    assert models.finetune_batch_size("vdsr", "sr-images") == models.get_task("vdsr", "sr-images").train.batch_size == 16
    assert models.finetune_batch_size("demosaicnet", "demosaic-images") == 16
    assert models.finetune_batch_size("my_model.py:build", "demosaic-images") == 128
