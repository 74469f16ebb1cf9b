"""The trained LeNet-300-100 on digits that the engine tests compress (trained once per run)."""
import dataclasses

import pytest

import models
from models.task import TrainConfig
from models.train import fit


@pytest.fixture(scope="session")
def lenet300():
    """(task, trained params) of lenet300 on digits, 300 training steps."""
    task = models.get_task("lenet300", "digits")
    task = dataclasses.replace(task, train=TrainConfig(steps=300, batch_size=64, learning_rate=2e-3))
    variables, _ = fit(task)
    return task, variables["params"]


@pytest.fixture(scope="session")
def lenet300_engine(lenet300):
    """An Engine on `lenet300` (30 fine-tune steps, batch 64, K = 1), shared by test_engine.py and
    test_lowrank.py so that its functions compile once per run."""
    from search.engine.config import FinetuneConfig
    from search.engine.finetune import Engine

    task, params = lenet300
    return Engine(task, params, FinetuneConfig(steps=30, batch_size=64, k=1))
