"""How each candidate is fine-tuned: one frozen value, stored in a study's record."""
from __future__ import annotations

from dataclasses import dataclass

from search.engine.schedule import check_schedule
from search.errors import UserError


SCHEDULES = ("constant", "cosine")  # learning-rate schedules of the fine-tuning
ACT_RANGES = ("calibrated", "learned")  # how activation quantization ranges are set
# how a trial's fine-tune steps are driven: "python" calls the jitted step once per step;
# "fused" runs up to a chunk of steps inside one jitted `lax.while_loop` on the device
LOOPS = ("python", "fused")


def check_k_and_loop(k: int | None, loop: str | None) -> None:
    """UserError unless K (plans per vmapped step) is None (measure) or >= 1, and `loop` None
    (measure) or one of LOOPS: the flags `search` and `worker` share."""
    if k is not None and k < 1:
        raise UserError(f"--k {k} must be at least 1 (or leave it out to measure the fastest K here)")
    check_loop(loop)


def check_loop(loop: str | None) -> None:
    """UserError unless `loop` is None (measure) or one of LOOPS."""
    if loop is not None and loop not in LOOPS:
        raise UserError(f"loop {loop!r} is unknown: use one of {', '.join(LOOPS)}, "
                        "or leave it out to measure the faster one here (--loop)")


@dataclass(frozen=True)
class FinetuneConfig:
    """How each candidate is fine-tuned after compression."""

    steps: int = 200  # optimizer steps per plan (0: compress only)
    batch_size: int = 128  # examples per step
    learning_rate: float = 5e-4  # Adam learning rate (peak, with schedule="cosine")
    # "constant", or "cosine": decays to 0 over `steps` (Loshchilov & Hutter 2017, optax's
    # cosine_decay_schedule), for long fine-tunes such as an export's retrain
    schedule: str = "constant"
    distill: bool = False  # add Hinton distillation from the dense baseline
    temperature: float = 4.0  # distillation temperature T
    alpha: float = 0.5  # weight of the distillation term (1 - alpha on the task loss)
    seed: int = 0  # batch order
    k: int | None = None  # plans per vmapped step; None = measure what is fastest here
    # "python" or "fused" (LOOPS); None = measure which is faster here, with K, and remember it
    loop: str | None = None
    calib_examples: int = 512  # training examples used to calibrate activation ranges
    eval_batch: int = 1024  # examples per evaluation chunk
    # re-estimate BatchNorm statistics of each compressed plan on the calibration examples
    # before fine-tuning and evaluating it (EagleEye's adaptive BN); no effect without BatchNorm
    adaptive_bn: bool = True
    # training examples adaptive BN estimates the statistics from: resnet20/digits lost 0.8 points of
    # test accuracy with 512 (sampling noise in the variances), none with all 1257
    bn_examples: int = 2048
    # when the masks are computed (search.engine.schedule): "one-shot" from the pretrained
    # weights before fine-tuning, or "gradual": from dense to the plan's ratio on Zhu & Gupta's
    # cubic schedule, masks recomputed from the current weights `gradual_updates` times
    # (None: up to 8) by step gradual_end * steps
    pruning: str = "one-shot"
    # activation ranges: "calibrated" on calib_examples (re-estimated halfway), or "learned":
    # calibrated, then trained with the weights (LSQ, Esser et al. 2020; quant.fake_quant_act_learned)
    act_ranges: str = "calibrated"
    # fine-tune on the task's own training augmentation (TrainConfig.crop / flip: random shifts and
    # flips for resnet20 and mobilenetv2 on Fashion-MNIST; nothing for tasks trained without)
    augment: bool = True
    gradual_end: float = 0.5
    gradual_updates: int | None = None

    def check(self) -> None:
        """Raise UserError naming the first field that is out of range."""
        for name, ok, want in (
            ("steps", self.steps >= 0, ">= 0"),
            ("batch_size", self.batch_size >= 1, ">= 1"),
            ("learning_rate", self.learning_rate > 0, "> 0"),
            ("temperature", self.temperature > 0, "> 0"),
            ("alpha", 0.0 <= self.alpha <= 1.0, "in [0, 1]"),
            ("k", self.k is None or self.k >= 1, "None or >= 1"),
            ("calib_examples", self.calib_examples >= 1, ">= 1"),
            ("eval_batch", self.eval_batch >= 1, ">= 1"),
            ("bn_examples", self.bn_examples >= 2, ">= 2"),
            ("schedule", self.schedule in SCHEDULES, f"one of {', '.join(SCHEDULES)}"),
        ):
            if not ok:
                raise UserError(f"finetune {name}={getattr(self, name)!r} is invalid: it must be {want}")
        check_loop(self.loop)
        if self.act_ranges not in ACT_RANGES:
            raise UserError(f"act_ranges {self.act_ranges!r} is unknown: use one of {', '.join(ACT_RANGES)} (--act-ranges)")
        check_schedule(self)
