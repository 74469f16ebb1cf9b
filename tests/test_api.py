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


def test_a_hand_built_plan_is_priced_and_exported_as_the_readme_shows(tmp_path):
    """The README's "A plan of your own": make_plan by names, price, export_plan; the export's
    quantized size is the price's size_kb."""
    import models
    from models.train import train_baseline
    from search import Engine, FinetuneConfig, export_plan, make_plan, price
    from tests.support import shared_cache

    task = models.get_task("lenet300", "digits")
    variables, _ = train_baseline(task, cache_dir=str(shared_cache()))
    engine = Engine(task, variables, FinetuneConfig(steps=2, k=1))
    assert [l.name for l in engine.layers] == ["fc1", "fc2", "fc3"]
    plan = make_plan([0.5, 0.0, 0.0], "channel", weight_bits=8, act_bits=8, rank=[0.5, 1.0, 1.0], form="svd")
    cost = price("mobile-cpu", engine.layers, plan)
    result = export_plan(task, variables, plan, tmp_path / "mine", engine=engine, profile="mobile-cpu")
    assert result.config["size"]["bytes_by_stage"]["quantized"] == pytest.approx(float(cost.size_kb[0]) * 1024)
    assert result.config["layers"][0]["rank"] == 32 and result.onnx_agreement >= 0.99
    with pytest.raises(ValueError, match=r"^plan.rank of layer fc2 is 1.5; a rank ratio lies in \(0, 1\]"):
        price("mobile-cpu", engine.layers, make_plan([0.5, 0.0, 0.0], "channel", rank=[1.0, 1.5, 1.0]))
