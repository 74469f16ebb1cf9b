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
