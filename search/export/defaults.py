"""Defaults of `hwcompress export`: its retrain (search.export.retrain) and `--within`
(search.export.select), in a module light enough for the CLI to read when it builds its help
(no JAX, no Optuna)."""

# An export's default retrain: this many times the study's fine-tune steps, cosine decay.
# Measured with `python -m bench.bench_finetune_modes --compare retrain-length` on the recipe
# below (4x the rate, gradual pruning; test accuracy, mean over the plans, bench/out/
# bench_finetune_modes_retrain-length*.json): lenet300/Fashion-MNIST searched at 1000 steps,
# 4 plans x 2 seeds: 88.56% at 5x, 88.94 at 10x, 88.87 at 20x (baseline 89.26); lenet5 (300
# steps, 3 plans): 90.55 at 5x, 91.29 at 10x (baseline 90.99); lenet300/digits (200 steps):
# 95.28 at 5x, 95.76 at 10x, lenet5/digits 98.56 and 98.61. (With the earlier recipe, the
# study's rate and one-shot masks, bench/bench_retrain.py had found 5x best on digits.)
RETRAIN_FACTOR = 10
# The retrain runs at RETRAIN_LR_FACTOR times the study's learning rate, the plan's ratios reached
# gradually (Zhu & Gupta's cubic ramp over the first half; search.engine.schedule). Measured
# with `python -m bench.bench_finetune_modes --compare retrain` (Fashion-MNIST test accuracy, the
# README has the table): lenet300, 4 plans of 92-96% sparsity at 3-4 bits, 5000 steps, 2 seeds:
# one-shot at 1x the rate 87.26% on average, gradual 1x 87.32, one-shot 4x 88.00, gradual 4x
# 88.56 (baseline 89.26).
RETRAIN_LR_FACTOR = 4
RETRAIN_PRUNING = "gradual"


SCREEN = 3.0  # the bisection starts among front plans this far below the baseline at the search's budget
CANDIDATES = 8  # at most this many retrains
# `--within` holds with this one-sided confidence on the validation split: a plan passes when the
# lower confidence bound of its per-example quality minus the baseline's (paired) is within the
# tolerance (search.export.select.margin); 0.5 is the point estimate. Why not 0.5: the most
# compressed plan just inside the line on validation is, by selection, the one whose validation
# score most over-states it (the winner's curse); on Fashion-MNIST (5000 validation examples; a
# compressed plan disagrees with the baseline on 3-6% of them, so the paired standard error is
# about 0.3 points) the 0.5-point picks of 6 searches scored 0.38-0.48 below on validation and
# 0.55-1.02 below on test in 4 of them (bench/bench_search.py, README).
CONFIDENCE = 0.8
