"""Shared helpers of the tests (fixtures live in conftest.py).

The set-up of the tests that run real searches: tiny trials, and one baseline cache
for the whole pytest session (results dirs are fresh per test module, the trained baseline is
not: its cache key covers model, data and training config, so sharing it is exact)."""
from __future__ import annotations

import atexit
import dataclasses
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from search import cli
from search.compression.layers import Layer

if TYPE_CHECKING:
    import optuna

# tiny trials: lenet300 on digits, three fine-tuning steps, one trial per batch
SEARCH = ["--model", "lenet300", "--dataset", "digits", "--profile", "mobile-cpu",
          "--finetune-steps", "3", "--no-warm-start", "--quiet", "--batch", "1"]

# set by conftest.pytest_configure in the process that starts the session, so pytest-xdist's
# workers (started after it, with its environment) share one cache
CACHE_ENV = "HWCOMPRESS_TEST_CACHE"
_cache: Path | None = None


def shared_cache() -> Path:
    """The session's shared baseline cache: a baseline is trained once per pytest session
    for every test that asks train_baseline for the same task (model, data, training config),
    and each XLA program compiled once (RESULTS_DIR/cache/xla). Under pytest-xdist every worker
    uses the directory the starting process named in HWCOMPRESS_TEST_CACHE (it removes it)."""
    global _cache
    if _cache is None:
        if os.environ.get(CACHE_ENV):
            _cache = Path(os.environ[CACHE_ENV])
            _cache.mkdir(parents=True, exist_ok=True)
        else:
            _cache = Path(tempfile.mkdtemp(prefix="hwcompress-test-cache-"))
            atexit.register(shutil.rmtree, _cache, True)
    return _cache


def results_dir(parent: Path) -> Path:
    """A new results dir under `parent` whose cache/ is the session's shared baseline cache."""
    results = parent / "results"
    results.mkdir(parents=True)
    (results / "cache").symlink_to(shared_cache(), target_is_directory=True)
    return results


def start_search(results: Path, study: str, trials: int = 1, *extra: str) -> int:
    """`hwcompress search` with tiny trials into `results` (in-process); returns the exit code."""
    return cli.main(["search", *SEARCH, "--study", study, "--trials", str(trials),
                     "--results-dir", str(results), *extra])


# a hand-checkable device for the cost model's worked examples
TOY = """
name = "toy"
kind = "cpu"
description = "hand-checkable device"
[compute]
fp32_gops = 1.0
int8_gops = 4.0
efficiency_dense = 0.5
efficiency_conv = 1.0
efficiency_depthwise = 1.0
[memory]
bandwidth_gbs = 1.0
bandwidth_efficiency = 1.0
capacity_kb = 1000.0
[overhead]
layer_us = 10.0
[precision]
weight_bits = [8, 32]
act_bits = [8, 32]
float = "native"
[sparsity]
unstructured_min_sparsity = 0.5
unstructured_work_factor = 2.0
"""


def dense(index: int, n_in: int, n_out: int, src: int | None = None) -> Layer:
    """A Dense layer record fc<index> with n_in inputs and n_out outputs (bias included),
    reading layer `src`'s channels (None: the previous layer's, an MLP; -1: not a layer's)."""
    src = index - 1 if src is None else src
    return Layer(index, f"fc{index}", (f"fc{index}",), "dense", (n_in, n_out), (n_in,), (n_out,), 1, True,
                 n_in * n_out, n_in * n_out + n_out, reads=((src, n_in),))


def conv(index: int, cin: int, cout: int, hw: int, kind: str = "conv", src: int = -1) -> Layer:
    """A 3x3 Conv (or depthwise conv, whose channels join `src`'s group) record c<index> at hw x hw,
    stride 1, bias included, reading layer `src`'s cin channels (-1: not a layer's)."""
    groups = cin if kind == "depthwise" else 1
    k = (3, 3, cin // groups, cout)
    macs = hw * hw * 9 * (cin // groups) * cout
    return Layer(index, f"c{index}", (f"c{index}",), kind, k, (hw, hw, cin), (hw, hw, cout), groups, True, macs,
                 9 * (cin // groups) * cout + cout, leader=src if kind == "depthwise" else -1, reads=((src, cin),))


# a machine for calibrated_profile in the kernel-pricing tests (one thread, made-up peaks)
MACHINE = {"threads": 1, "fp32_gops": 20.0, "int8_gops": 40.0, "conv_gops": 10.0, "depthwise_gops": 2.0,
           "dram_gbs": 10.0, "cache_gbs": 40.0, "llc_kb": 8192.0, "op_overhead_us": 1.0, "memory_kb": 1e7}

# a conv stem, a depthwise conv (its channels follow the stem's), a 1x1-style conv, a head
CONV_LAYERS = (conv(0, 3, 16, 8), conv(1, 16, 16, 8, "depthwise", 0), conv(2, 16, 32, 8, src=0),
               dataclasses.replace(dense(3, 32 * 64, 10), reads=((2, 32),), in_repeat=64))  # flatten, then the head


def stored_study(results: Path, name: str, plans: list) -> optuna.Study:
    """A lenet300/digits study on mobile-cpu as `hwcompress search` stores it (its spec: 2-step
    fine-tunes), one complete trial per plan (plan, quality 0.9, costs, feasible), written
    directly into `results`/studies.db so a test needs no search."""
    import optuna

    from search.api import make_spec
    from search.engine.config import FinetuneConfig
    from search.study.space import plan_to_dict

    study = optuna.create_study(study_name=name, storage=f"sqlite:///{results / 'studies.db'}",
                                directions=["maximize", "minimize", "minimize"])
    spec = make_spec(model="lenet300", dataset="digits", profile="mobile-cpu",
                     finetune=FinetuneConfig(steps=2, batch_size=64, learning_rate=5e-4))
    study.set_user_attr("spec", spec.to_attrs())
    costs = {"mobile-cpu": {"latency_ms": 0.05, "memory_kb": 100.0, "size_kb": 40.0}}
    for plan in plans:
        study.add_trial(optuna.trial.create_trial(values=[0.9, 0.05, 100.0], user_attrs={
            "plan": plan_to_dict(plan), "quality": 0.9, "costs": costs, "feasible": True}))
    return study
