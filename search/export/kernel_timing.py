"""Timing the kernel probes (search.export.kernel_probes) in onnxruntime and fitting the
kernel-level predictors (search.cost.kernels) to them: what `hwcompress profiles calibrate` runs.

Each layer probe is timed at the profile's batch (1, or a server batch such as 32) with
`threads` intra-op threads: float and QLinear layers in the middle of a chain (four layers
against two), the others alone less the per-inference cost, so a sample is the kernel's own
time (measure_kernels). The fastest run over interleaved rounds is kept (fastest_us)."""
from __future__ import annotations

import dataclasses
import time
from typing import Callable, Sequence

import numpy as np

from hw_profiles.schema import KERNELS, KernelModel
from search.cost import kernels as K
from search.cost.measure import session
from search.export.kernel_probes import (
    ELTWISE_OPS,
    Shape,
    eltwise_probe,
    emul_probe,
    nchwc_layout,
    partner,
    pool_u8_probe,
    probe,
    probe_chain,
    relu_chain,
)


def fastest_us(sess, x: np.ndarray, min_s: float, min_runs: int = 20) -> float:
    """Fastest run (microseconds) over at least `min_s` seconds and `min_runs` runs, after warm-up.

    Other work on the machine only ever slows a run down, so the fastest run is the most
    repeatable estimate of the kernel's own time (as Python's `timeit` advises); the cost-truth
    bench measures exports the same way."""
    feed = {sess.get_inputs()[0].name: x}
    for _ in range(3):
        sess.run(None, feed)
    best, n, start = np.inf, 0, time.perf_counter()
    while n < min_runs or time.perf_counter() - start < min_s:
        t0 = time.perf_counter()
        sess.run(None, feed)
        best = min(best, time.perf_counter() - t0)
        n += 1
    return best * 1e6


def measure_kernels(shapes: Sequence[Shape], threads: int = 1, min_s: float = 0.05, sizes: Sequence[int] | None = None,
                    rounds: int = 2, progress: Callable[[int, int], None] | None = None, block: int = 1,
                    align: int = 1) -> tuple[list[tuple[str, list[float], float]], float]:
    """Time every shape in every form (a kron shape in f32 only), ReLU6 after the blocked float
    ones, and the emul, eltwise and pool_u8 ops at `sizes` elements (default 16 sizes from 16 to
    200,000); returns ([(KERNELS name, features, us)], inference_us).

    f32 (kron included) and q8 layers are measured where they run in a network, between other layers of their
    form: a shape X (at stride 1) and its partner P (back to X's input channels) as X, P, X, P
    against X, P; the difference is one X and one P in the middle of a chain (no layout reorders,
    quantize or dequantize at its ends: those belong to the network's first and last layers), and
    the sample's features are X's plus P's (the predictors are linear in them). A blocked conv
    reading fewer channels than the block reads NCHW, behind a ReorderOutput of its producer's
    output: those reorders are taken off the sample at the eltwise ops' fit, as the pricing
    charges them as eltwise ops (runtime_graph.reorder_count); a 1x1 one makes the sample a conv_f32n
    one, of the members that read NCHW (the other member, a conv_f32 kernel, is taken off at
    conv_f32's fit on the pairs that read no NCHW). i8 layers (float
    output, their input quantization and output scaling included), emul, eltwise and pool_u8 ops are
    measured alone, less the per-inference cost: a one-Relu graph minus one operator (a chain of
    33 Relus against one, / 32). Every session is built first, then all are timed in `rounds`
    interleaved rounds (the fastest run of all rounds is kept); at a batch above 1, in chunks of
    512 / batch sessions (at least 16), whose arenas would not all fit in memory. `block`, `align`: the runtime's
    channel block and alignment (nchwc_layout): a float conv chain whose layers all run blocked is
    an f32 sample with blocked features, one whose layers all run plain an f32p sample, a mix of
    the two is not used; a blocked chain is timed again with ReLU6 (Clip) activations, the
    difference a `clip` sample (the pass over each output MLAS's NCHWc kernels run for an activation
    other than ReLU); likewise a q8 conv chain is a q8 sample when both layers' output channels
    are multiples of `block`, a q8p sample when neither is; a q8u conv or depthwise sample's
    features count its output channels rounded up to `block` (kernels.q8u_channels)."""
    jobs: list[tuple[str, bytes, tuple[int, ...], list[float], int]] = [
        ("", relu_chain(1), (1, 16), [], -1), ("", relu_chain(33), (1, 16), [], -1)]
    reorders: dict[int, list[int]] = {}  # job -> elements of each layout reorder in its measured pair
    blocked_f32: dict[int, list[float]] = {}  # f32n job -> features of its pair's conv_f32 member
    for s in shapes:
        flat = dataclasses.replace(s, stride=1)
        pair = partner(flat)
        if s.kind == "kron":  # float factors only (the export's form): one chain, as the f32 ones
            jobs.append(("", *probe_chain([flat, pair], "f32"), [], -1))
            feats = np.sum([x.features() for x in (flat, pair)], axis=0).tolist()
            jobs.append(("kron", *probe_chain([flat, pair, flat, pair], "f32"), feats, len(jobs) - 1))
            continue
        for form in ("f32", "q8", "q8u"):
            name, b, ob = f"{s.kind}_{form}", 1, block if form == "q8u" else 1
            members = (flat, pair)
            if form == "q8" and s.kind != "dense" and block > 1:
                runs = {bool(K.q8_on_blocks(x.cout, block)) for x in (flat, pair)}
                if len(runs) > 1:
                    continue  # one layer on the int8 channel block, the other off it
                name = name if runs == {True} else f"{s.kind}_q8p"
            if form == "f32" and s.kind != "dense" and block > 1:
                dw = s.kind == "depthwise"
                runs = {bool(K.on_blocks(x.cout, 1 if dw else x.cin, block, align, dw)) for x in (flat, pair)}
                if len(runs) > 1:
                    continue  # one layer blocked, the other plain: neither kind's sample
                name, b = (name, block) if runs == {True} else (f"{s.kind}_f32p", 1)
                nchw = [x for x in (flat, pair) if x.cin < block] if runs == {True} and not dw and s.k == 1 else []
                if nchw:  # a blocked 1x1 conv reading NCHW runs the f32n kernel: the sample is that member's
                    name, members = "conv_f32n", nchw
            feats = np.sum([x.features(b, ob) for x in members], axis=0).tolist()
            jobs.append(("", *probe_chain([flat, pair], form), [], -1))
            if name in ("conv_f32", "conv_f32n"):  # blocked: the reorders to NCHW for a reader of fewer channels than the block
                reorders[len(jobs)] = [x.out_elems for x in (flat, pair) if x.cout < block]
            if len(members) == 1:  # the other member runs conv_f32: taken off at conv_f32's fit
                blocked_f32[len(jobs)] = next(x for x in (flat, pair) if x is not members[0]).features(b, ob)
            jobs.append((name, *probe_chain([flat, pair, flat, pair], form), feats, len(jobs) - 1))
            if b > 1:  # blocked: the same chain with ReLU6 (Clip) after every layer, less the ReLU one
                elems = [x.out_elems for x in (flat, pair, flat, pair)]
                jobs.append(("clip", *probe_chain([flat, pair, flat, pair], form, clip=True),
                             np.sum([K.features(e, 1.0, 1.0) for e in elems], axis=0).tolist(), len(jobs) - 1))
        jobs.append((f"{s.kind}_i8", *probe(s, "i8"), s.features(), 0))
    sizes = sizes or sorted({int(x) for x in np.geomspace(16, 200_000, 16)})
    for n in sizes:
        jobs.append(("emul", *emul_probe(n), K.features(n, 1, 1).tolist(), 0))
        for op in ELTWISE_OPS:
            model, xs = eltwise_probe(n, op)
            jobs.append(("eltwise", model, xs, K.features(np.prod(xs), 1, 1).tolist(), 0))
        model, xs = pool_u8_probe(n)
        jobs.append(("pool_u8", model, xs, K.features(np.prod(xs), 1, 1).tolist(), 0))
    rng = np.random.default_rng(0)
    best = np.full(len(jobs), np.inf)
    # every session of a chunk is built first, then timed in interleaved rounds; at a server batch
    # a session's arena holds tens of MB, so fewer are alive at once (700 at batch 32: 16 GB)
    batch = max((s.batch for s in shapes), default=1)
    chunk = len(jobs) if batch == 1 else max(16, 512 // batch)
    done = 0
    for start in range(0, len(jobs), chunk):
        part = range(start, min(start + chunk, len(jobs)))
        sessions = [(sess, rng.integers(0, 256, xs, dtype=np.uint8) if sess.get_inputs()[0].type == "tensor(uint8)"
                     else rng.random(xs, dtype=np.float32))
                    for sess, xs in ((session(jobs[i][1], threads), jobs[i][2]) for i in part)]
        for r in range(rounds):
            for i, (sess, x) in zip(part, sessions):
                best[i] = min(best[i], fastest_us(sess, x, min_s))
                done += 1
                if progress is not None:
                    progress(done, rounds * len(jobs))
        del sessions
    op_us = max((best[1] - best[0]) / 32, 0.0)
    base = max(best[0] - op_us, 0.1)
    diff = [us - (base if ref == 0 else best[ref]) for (_, _, _, _, ref), us in zip(jobs, best)]
    # a blocked conv pair whose layer reads fewer channels than the block times the ReorderOutput
    # onnxruntime puts in front of it too (runtime_graph.reorder_count): priced as `eltwise` ops, so
    # taken off the conv's sample at the eltwise ops' own fit
    elt = [(j[3], d) for j, d, us in zip(jobs, diff, best) if j[0] == "eltwise" and d > 0.02 * us]
    if elt and any(reorders.values()):
        coef = np.asarray(K.fit_kind("eltwise", elt))
        for i, elems in reorders.items():
            diff[i] -= sum(float(K.features(e, 1.0, 1.0) @ coef) for e in elems)
    # an f32n sample whose pair has one conv_f32 member: that member's time, at conv_f32's own fit
    f32 = [(j[3], d) for j, d, us in zip(jobs, diff, best) if j[0] == "conv_f32" and d > 0.02 * us]
    if f32 and blocked_f32:
        coef = np.asarray(K.fit_kind("conv_f32", f32))
        for i, feats in blocked_f32.items():
            diff[i] -= float(np.dot(coef, feats))
    samples = []
    for (name, _, _, feats, ref), us, t in zip(jobs, best, diff):
        if name and t > 0.02 * us:  # a difference lost in timing noise says nothing
            samples.append((name, feats, float(t)))
    return samples, float(base)


def runtime_name(threads: int, batch: int = 1) -> str:
    """What a calibration measured, for the profile file."""
    import onnxruntime as ort

    return f"onnxruntime {ort.__version__} CPUExecutionProvider, {threads} thread(s), batch {batch}, fastest run"


# The held-out check's median error above which a calibration's timing was noisy. On this
# project's 2-core AVX2 host, eight calibrations on a quiet machine gave 6.7-11.3% (an AVX-512
# host: 5.8-9.2%); seven timed during a shared host's slow phases gave 16.6-31.3%, and a 21.7% one priced
# lenet5 at w8a8 at 56 us where it runs in about 100 (its int8 convs' per-position terms fitted to 0).
NOISY_HELD_OUT_ERROR = 0.15


def calibrate_kernels(shapes: Sequence[Shape], threads: int = 1, min_s: float = 0.05, rounds: int = 2,
                      sizes: Sequence[int] | None = None, progress: Callable[[int, int], None] | None = None,
                      batch: int = 1) -> tuple[KernelModel, dict]:
    """Measure the probes and fit the predictors: (KernelModel, report).

    Every layer probe runs `batch` examples per call (KernelModel.batch: the profile prices one
    forward pass of that many). The report holds the fit's errors on its own samples and, as a
    check of the predictor's form, those of a refit on every other sample tested on the rest (not
    used for the model), and the samples themselves ([KERNELS name, KERNEL_FEATURES, microseconds]).
    The runtime's channel block and alignment (nchwc_layout) are detected first and kept in the model."""
    t0 = time.perf_counter()
    block, align = nchwc_layout(threads)
    shapes = [dataclasses.replace(s, batch=int(batch)) for s in shapes]
    samples, base = measure_kernels(shapes, threads, min_s, sizes, rounds=rounds, progress=progress, block=block,
                                    align=align)
    model = K.fit(samples, base, runtime_name(threads, batch), channel_block=block, channel_align=align, q8u_block=block,
                  batch=batch)
    report: dict = {"kernels_timed": len(samples), "inference_us": float(base), "channel_block": block,
                    "channel_align": align}
    err = np.abs(K.relative_errors(model, samples))
    report.update(fit_median_error=float(np.median(err)), fit_within_10pct=float(np.mean(err <= 0.10)))
    try:
        rng = np.random.default_rng(0)  # a random half of each kind's samples (samples come in kind cycles)
        kinds = np.array([n for n, _, _ in samples])
        fit_half = np.zeros(len(samples), bool)
        for k in set(kinds):
            idx = rng.permutation(np.flatnonzero(kinds == k))
            fit_half[idx[0::2]] = True
        half = K.fit([s for s, f in zip(samples, fit_half) if f], base, "check", channel_block=block, channel_align=align, batch=batch,
                     q8u_block=block)
        err = np.abs(K.relative_errors(half, [s for s, f in zip(samples, fit_half) if not f]))
        report.update(held_out_median_error=float(np.median(err)), held_out_within_10pct=float(np.mean(err <= 0.10)))
    except ValueError:
        pass
    report["seconds"] = time.perf_counter() - t0
    report["per_kernel"] = {k: int(sum(1 for n, _, _ in samples if n == k)) for k in KERNELS}
    report["samples"] = [[n, [float(v) for v in f], float(us)] for n, f, us in samples]  # to refit later
    return model, report
