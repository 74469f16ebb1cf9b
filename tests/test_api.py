"""search.api.compress on a user's own NNX model that is not in the zoo (the README example)."""
import numpy as np
import optax
import optuna
import pytest
from flax import nnx

import models
from search.api import compress
from search.errors import UserError

optuna.logging.set_verbosity(optuna.logging.WARNING)


class TinyMLP(nnx.Module):
    """64 -> 32 -> 10: small enough to train in a second on digits."""

    def __init__(self, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(64, 32, rngs=rngs)
        self.out = nnx.Linear(32, 10, rngs=rngs)

    def __call__(self, x):
        x = x.reshape(x.shape[0], -1)
        return self.out(nnx.relu(self.hidden(x)))


def loss(logits, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def accuracy(logits, y):
    return (logits.argmax(-1) == y).astype(np.float32)


@pytest.fixture(scope="module")
def trained():
    data = models.load_dataset("digits")
    model = TinyMLP(nnx.Rngs(0))
    opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt, x, y):
        grads = nnx.grad(lambda m: loss(m(x), y))(model)
        opt.update(model, grads)

    rng = np.random.default_rng(0)
    for _ in range(300):
        i = rng.integers(0, len(data.x_train), 64)
        step(model, opt, data.x_train[i], data.y_train[i])
    return model, data


def test_compress_returns_the_pareto_front_of_a_user_model(trained, tmp_path):
    model, data = trained
    front = compress(model, None, data, loss, accuracy, "mobile-cpu", n_trials=3, batch=3,
                     finetune_steps=5, metric_name="accuracy", results_dir=str(tmp_path))
    assert list(front.columns[:7]) == ["trial", "quality", "latency_ms", "memory_kb", "size_kb",
                                        "compression_ratio", "feasible"]
    assert len(front) >= 1 and front["feasible"].all()
    assert front["quality"].is_monotonic_decreasing
    assert front["quality"].iloc[0] > 0.8  # int8 of a trained MLP keeps its accuracy
    assert all(len(p["ratio"]) == 2 for p in front["plan"])  # hidden and out were found
    # the test split's quality of each front plan, measured right after its fine-tuning
    assert front["test_quality"].between(0.5, 1.0).all(), front["test_quality"].tolist()


def test_compress_names_a_bad_objective(trained, tmp_path):
    model, data = trained
    with pytest.raises(UserError, match="unknown objective 'speed'"):
        compress(model, None, data, loss, accuracy, "mobile-cpu", objectives=("quality", "speed"),
                 results_dir=str(tmp_path))
