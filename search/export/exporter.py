"""Export one compressed configuration as files that really run smaller and faster.

`export_plan` (a task, its trained params and a plan) and `export_trial` (a trial of a study)
write into one directory:
  config.json          every layer's plan, kept channels, the profile, predicted costs,
                       measured quality (Flax, reloaded Flax, ONNX), ONNX agreement
  weights.safetensors  packed integers at their bit width, scales, codebooks, masks (search.pack)
  size.json            Deep Compression size breakdown (search.size): dense, pruned, quantized, Huffman
  model.onnx           pruned channels removed, int8 QDQ layers, float layers float (search.onnx_export)
The exported weights are the grid points of the engine's effective kernels (pack snaps float
rounding away), so the reloaded Flax model reproduces the exported quality exactly.

An exported trial is fine-tuned again for longer than the search did (retrain.retrain_config: by
default RETRAIN_FACTOR times the study's steps at RETRAIN_LR_FACTOR times its learning rate,
cosine decay, the plan's ratios reached gradually), so a plan found with a short budget is not
exported at that budget's quality; config.json's "retrain" records the budget and the
validation and test quality before (the search's fine-tune) and after. The export keeps the
better of the two on validation (retrain.better): a long retrain at a higher rate can lower a
lightly pruned plan.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import optuna
from optuna.trial import TrialState

from hw_profiles import HardwareProfile, load_profile
from search.compression import lowrank, quant
from search.compression.layers import discover_layers
from search.compression.plan import CHANNEL, CODEBOOK, FLOAT, Plan, stack_plans
from search.cost.budget import costs_at
from search.cost.roofline import price
from search.engine.config import FinetuneConfig
from search.engine.finetune import Engine
from search.errors import UserError
from search.export import pack, size
from search.export.retrain import RETRAIN_FACTOR, better, finetuned, metric, retrain_config, same_finetune
from search.export.onnx.convert import LayerExport, to_onnx
from search.export.outdir import check_target, staged_dir
from search.study.context import load_context
from search.study.space import plan_from_dict
from search.study.spec import StudySpec

# Documented ONNX tolerance. Float layers agree with Flax to float rounding (~1e-6). Integer
# layers are exact but for the bias: QLinearConv/QGemm take it as int32 on the s_x * s_w grid,
# as every int8 runtime does, so an activation within s_x * s_w / 2 of a rounding boundary may
# land one level away. Exports report the max |ONNX - Flax| output difference and the share of
# test examples with the same prediction; tests require >= 99% agreement.
ONNX_MIN_AGREEMENT = 0.99


@dataclass(frozen=True)
class ExportResult:
    """What an export wrote and how well the files agree with the model."""

    out_dir: Path  # the export directory
    quality: float  # test metric of the exported (packed) weights in Flax
    reload_quality: float  # the same after reading weights.safetensors back: equal to quality
    onnx_quality: float  # test metric of model.onnx in onnxruntime
    onnx_max_abs_diff: float  # max |ONNX output - Flax output| over the test set
    onnx_agreement: float  # share of test examples with the same prediction (classification)
    config: dict  # the contents of config.json


def weight_mode(bits: int, mode: int) -> str:
    """The weight transform the engine applies (search.compress.weight_branch), by name."""
    if bits >= FLOAT:
        return "float"
    return "codebook" if mode == CODEBOOK and bits <= 8 else "uniform"


def snap_params(params: Any, layers, plan: Plan, masks, scales=None, factors=None) -> tuple[dict, dict, dict]:
    """Encode every kernel as it will be stored -> (exported params, tensors, infos) per layer.
    scales: {layer name: [out]} uniform grid scales (`CompressedModel.weight_scales`); factors:
    {layer name: (form, A, B)} of factorized layers (`CompressedModel.factors`), stored as the pair
    (pack.encode_factored) and computing with their product."""
    out = jax.tree.map(lambda a: np.array(a, np.float32), params)
    tensors, infos = {}, {}
    for l in layers:
        bits, mode = int(plan.weight_bits[l.index]), weight_mode(int(plan.weight_bits[l.index]), int(plan.quant_mode[l.index]))
        node = out
        for p in l.path:
            node = node[p]
        if factors and l.name in factors:
            t, info = pack.encode_factored(*factors[l.name], np.shape(node["kernel"]), bits, mode)
        else:
            t, info = pack.encode_layer(node["kernel"], np.asarray(masks[l.name]), bits, mode, (scales or {}).get(l.name))
        node["kernel"] = pack.decode_layer(t, info)
        tensors[l.name], infos[l.name] = t, info
    return out, tensors, infos


def channel_alignment(profile: HardwareProfile | str | Path | None) -> tuple[int, int]:
    """(float, integer) multiples that onnxruntime's fast conv kernels want of output channel
    counts, as a calibrated profile measured them: its channel alignment for float convs (the
    blocked NCHWc kernels; off it they run the plain ones, 2-3x slower on MobileNetV2) and its
    channel block for integer ones (off it, the remainder path); (1, 1) for a profile without a
    kernel model (no runtime measured: removed channels are simply removed)."""
    k = load_profile(profile).kernels if profile is not None else None
    if k is None or k.channel_block <= 1:
        return 1, 1
    return int(k.channel_align), int(k.channel_block)


def _onnx_exports(layers, plan: Plan, tensors, infos, act_ranges, masks=None, align: tuple[int, int] = (1, 1)) -> dict:
    """LayerExport per layer. A conv's all-zero output channels are removed, then kept back up to
    a multiple of `align` (channel_alignment: float, integer kernel), within the channels the
    cost model priced: all of them, or those its channel pruning kept (`masks`)."""
    out = {}
    for l in layers:
        wb, ab, info = int(plan.weight_bits[l.index]), int(plan.act_bits[l.index]), infos[l.name]
        act = None
        if ab < FLOAT:
            lo, hi = act_ranges[l.name]
            s, z, _ = quant.act_qparams(jnp.float32(lo), jnp.float32(hi), ab)
            act = (float(np.float32(s)), int(z), ab)
        if info["storage"] == "lowrank":  # the pair: A's integers when it has them, B in float
            t = tensors[l.name]
            a_int = None
            if info["a"]["storage"] == "int" and wb <= 8 and info.get("form", "svd") != "kronecker":
                a_int = (_int_codes({k[2:]: v for k, v in t.items() if k.startswith("a:")}, info["a"], wb), t["a:scale"])
            out[l.name] = LayerExport(l.name, "float", act=act, factors=pack.decode_factors(t, info), factor_q=a_int)
        elif info["storage"] == "int" and wb <= 8:
            out[l.name] = LayerExport(l.name, "int", _int_codes(tensors[l.name], info, wb), tensors[l.name]["scale"], act)
        else:
            out[l.name] = LayerExport(l.name, "float", act=act)
        e = out[l.name]
        if l.kind == "conv" and e.factors is None and max(align) > 1:
            integer = e.weight == "int" and act is not None and ab <= 8
            cap = l.out_channels
            if masks is not None and int(plan.granularity[l.index]) == CHANNEL:
                cap = int(np.any(np.asarray(masks[l.name]).reshape(-1, l.out_channels) != 0, axis=0).sum())
            out[l.name] = dataclasses.replace(e, align=align[1] if integer else align[0], cap=cap)
    return out


def _int_codes(t: dict, info: dict, bits: int) -> np.ndarray:
    """The integer kernel (like the stored kernel's shape) of a layer pack stored as "int"."""
    n = int(np.prod(info["shape"]))
    m = pack.unpack_uint(t["mask"], 1, n).astype(bool) if "mask" in t else np.ones(n, bool)
    q = np.zeros(n, np.int64)
    q[m] = pack.unpack_int(t["q"], bits, int(m.sum()))
    return q.reshape(info["shape"])


def _size(layers, params, masks, plan: Plan, scales, factors=None) -> dict:
    modes = [weight_mode(int(plan.weight_bits[l.index]), int(plan.quant_mode[l.index])) for l in layers]
    return size.model_breakdown(layers, params, masks, plan, modes, scales=scales, factors=factors)


def export_plan(task, base_params: Any, plan: Plan, out_dir: str | Path, *, finetune: Any = None,
                profile: Any = None, costs: dict | None = None, force: bool = False,
                source: dict | None = None, engine: Any = None, before: FinetuneConfig | None = None,
                retrain: dict | None = None, channel_align: tuple[int, int] | None = None) -> ExportResult:
    """Fine-tune (finetune.steps, 0 = compress only) a plan [L] and export it to out_dir.

    `profile` (a HardwareProfile or name) prices the plan for config.json unless `costs`
    (the stored {profile: costs}) is given; `source` is recorded (study, trial). `before` (the
    search's fine-tune) is run too, and its weights are exported instead where their validation
    quality is higher (search.export.retrain.better); config.json's "retrain" holds `retrain`
    (how the budget was chosen) with the validation and test quality before and after, and
    which was kept. `channel_align`: the (float, integer) channel multiples a conv's output keeps
    when its all-zero channels are removed (None: the profile's, channel_alignment). The files are
    written into a directory beside out_dir that becomes out_dir only when all of them are
    written and checked (staged_dir): a failure leaves out_dir as it was. UserError, before any
    work, when out_dir holds files and force is False.
    """
    out_dir = Path(out_dir)
    with staged_dir(out_dir, force) as work:
        result = _export_into(work, task, base_params, plan, finetune=finetune, profile=profile, costs=costs,
                              source=source, engine=engine, before=before, retrain=retrain,
                              align=channel_align or channel_alignment(profile))
    return dataclasses.replace(result, out_dir=out_dir)


def _export_into(out_dir: Path, task, base_params: Any, plan: Plan, *, finetune: Any, profile: Any,
                 costs: dict | None, source: dict | None, engine: Any, before: FinetuneConfig | None,
                 retrain: dict | None, align: tuple[int, int]) -> ExportResult:
    """export_plan's work: every file written into the (staging) directory `out_dir`."""
    import onnx
    import onnxruntime as ort

    t0 = time.perf_counter()
    engine = engine or Engine(task, base_params, finetune or FinetuneConfig(steps=0, k=1))
    layers, retrain_cfg = engine.layers, engine.config
    cm, after = finetuned(task, base_params, plan, retrain_cfg, engine)
    first, kept = None, "after"
    if before is not None and not same_finetune(before, retrain_cfg):
        # the search's own fine-tune, measured beside the retrain; kept when validation prefers it
        before_engine = Engine(task, base_params, dataclasses.replace(before, k=1))
        cm_before, first = finetuned(task, base_params, plan, before, before_engine)
        kept = better(first, after)
        if kept == "before":
            cm, engine = cm_before, before_engine
    if not cm.finite:
        raise UserError("fine-tuning this plan diverged (NaN/inf); export with --finetune-steps 0 or a smaller learning rate")
    params, tensors, infos = snap_params(cm.params, layers, cm.plan, cm.masks, cm.weight_scales, cm.factors)
    factors = {n: pack.decode_factors(tensors[n], infos[n]) for n in cm.factors}  # as stored
    cm = dataclasses.replace(cm, params=params)
    predict = jax.jit(lambda p, x: engine.predict(dataclasses.replace(cm, params=p), x))
    x, y = task.data.x_test, task.data.y_test
    quality, flax_out = metric(task, predict, params, x, y)
    exported = {"steps": engine.config.steps, "schedule": engine.config.schedule, "val": float(cm.metric), "test": quality}
    if kept == "before":
        first = exported
    else:
        after = exported
        if before is not None and first is None:  # the retrain is the search's fine-tune
            first = {**after, "steps": before.steps, "schedule": before.schedule}

    wpath = out_dir / "weights.safetensors"
    extra = {"act_ranges": cm.act_ranges, "act_bits": [int(b) for b in cm.plan.act_bits]}
    pack.save_weights(wpath, params, layers, [int(b) for b in cm.plan.weight_bits],
                      [infos[l.name]["mode"] for l in layers], {l.name: np.asarray(cm.masks[l.name]) for l in layers}, extra,
                      scales=cm.weight_scales, state=adapted_state(engine.model.saved_state(), cm.bn_stats),
                      factors=factors)
    back, _ = pack.load_weights(wpath, template=params)
    reload_quality, _ = metric(task, predict, back, x, y)

    exports = _onnx_exports(layers, cm.plan, tensors, infos, cm.act_ranges, cm.masks, align)
    layers_by_name = {l.name: l for l in layers}
    # the deployed input: the test split's examples (whole images for vdsr and demosaicnet,
    # which train on patches), the shape the ONNX model is checked and timed at
    shape = tuple(np.shape(x)[1:])
    model, oinfo = to_onnx(lambda p, v: engine.model.apply(p, v, bn=cm.bn_stats), params, shape, exports,
                           {"/".join(l.path) + "/kernel": l.name for l in layers})
    onnx.save(model, str(out_dir / "model.onnx"))
    sess = ort.InferenceSession(str(out_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    onnx_out = np.concatenate([sess.run(None, {"input": np.asarray(x[i:i + 512], np.float32)})[0]
                               for i in range(0, len(x), 512)])
    onnx_quality = float(np.mean(np.asarray(task.metric(jnp.asarray(onnx_out), jnp.asarray(y)))))
    diff = float(np.max(np.abs(onnx_out - flax_out)))
    agree = float(np.mean(np.argmax(onnx_out, -1) == np.argmax(flax_out, -1))) if task.data.kind == "classification" else float("nan")

    breakdown = _size(layers, params, cm.masks, cm.plan, cm.weight_scales, factors)
    (out_dir / "size.json").write_text(_strict_json(breakdown))
    searched_costs = None
    if shape != tuple(task.data.input_shape):
        # a model trained on patches is deployed on whole images: the search's costs are the
        # patch's; config.json predicts the exported model at its own input shape (what
        # `hwcompress measure` compares with), and keeps the search's beside it
        searched_costs, costs = costs, None
        layers_priced = discover_layers(engine.model, engine.base_params, jax.ShapeDtypeStruct((1, *shape), jnp.float32))
    else:
        layers_priced = layers
    if costs is None and profile is not None:
        costs = _price(profile, layers_priced, cm.plan)
    config = {
        "format": "hwcompress-export/1",
        "source": source or {},
        "model": {"name": task.name, "hparams": task.hparams, "dataset": task.data.name,
                  "input_shape": list(shape), "metric": task.metric_name},
        "profile": getattr(profile, "name", profile),
        "predicted": costs or {},
        # the costs the search ranked on, at its training input shape, where that differs from input_shape
        "predicted_at_search_input": None if searched_costs is None else
        {"input_shape": list(task.data.input_shape), "costs": searched_costs},
        "quality": {"test": quality, "test_reloaded": reload_quality, "test_onnx": onnx_quality,
                    "val_after_finetune": float(cm.metric), "onnx_max_abs_diff": diff,
                    "onnx_agreement": agree, "onnx_min_agreement": ONNX_MIN_AGREEMENT},
        "finetune": dataclasses.asdict(engine.config),
        # the final fine-tune's budget (how it was chosen) and quality before it (the search's
        # fine-tune, None when not measured) and after it (the exported weights)
        # kept: which of them the exported weights are ("before" where the retrain lowered
        # validation quality, search.export.retrain.better)
        "retrain": {**(retrain or {}), "steps": retrain_cfg.steps, "schedule": retrain_cfg.schedule,
                    "learning_rate": retrain_cfg.learning_rate, "pruning": retrain_cfg.pruning,
                    "before": first, "after": after, "kept": kept,
                    "examples": {"val": len(task.data.x_val), "test": len(task.data.x_test)}},
        "layers": [{"name": l.name, "kind": l.kind, "kernel_shape": list(l.kernel_shape),
                    "ratio": round(float(cm.plan.ratio[l.index]), 6), "granularity": int(cm.plan.granularity[l.index]),
                    "weight_bits": int(cm.plan.weight_bits[l.index]), "act_bits": int(cm.plan.act_bits[l.index]),
                    "quant_mode": infos[l.name]["mode"], "storage": infos[l.name]["storage"],
                    # kept_weights: the weights weights.safetensors stores for the layer (the Flax
                    # parameters); held_weights: those the deployed model holds, without the rows
                    # and columns of removed channels (size.json's "held", what the cost model prices)
                    "kept_weights": infos[l.name]["kept"], "held_weights": breakdown["layers"][l.name]["held"],
                    "out_channels": l.out_channels,
                    "onnx_out_channels": oinfo["kept"].get(l.name, l.out_channels),
                    "onnx_weight": exports[l.name].weight,
                    "onnx_form": oinfo["forms"].get(l.name, "float"), "act_range": list(cm.act_ranges[l.name]),
                    # a factorized layer's first factor A (its second, B, is "onnx_form")
                    "onnx_factor_form": oinfo["forms"].get(f"{l.name}.svd_a", "float") if l.name in factors else None,
                    "group": layers[l.group].name, "channels_fixed": l.fixed,
                    # factorization (search.compression.lowrank): the plan's ratio, the achieved rank r, the form
                    **lowrank.describe(l, float(cm.plan.rank[l.index]), int(cm.plan.form[l.index]))}
                   for l in layers],
        "onnx_kept_back": oinfo["kept_back"],
        # factorized layers with quantized weights whose factor B ONNX runs as float32 values (its input,
        # A's output, is not quantized in the model); A runs on integer kernels where its input is <= 8 bits
        "onnx_float_factors": [n for n in factors if int(cm.plan.weight_bits[layers_by_name[n].index]) < FLOAT],
        "size": breakdown["total"],
        "export_seconds": time.perf_counter() - t0,
    }
    (out_dir / "config.json").write_text(_strict_json(config))
    return ExportResult(out_dir, quality, reload_quality, onnx_quality, diff, agree, config)


def adapted_state(state: dict, bn_stats: dict) -> dict:
    """A model's saved state (`Model.saved_state`) with the BatchNorm statistics adaptive BN
    gave the plan (`CompressedModel.bn_stats`) in place of the dense model's."""
    out = jax.tree.map(np.asarray, dict(state))
    for path, (mean, var) in bn_stats.items():
        node = out.get("batch_stats", {})
        for part in path.split("/"):  # an NNX list index is an int key
            node = node.get(part, node.get(int(part), {}) if part.isdigit() else {}) if isinstance(node, dict) else {}
        if "mean" in node and "var" in node:
            node["mean"], node["var"] = np.asarray(mean), np.asarray(var)
    return out


def _json(v: Any) -> Any:
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    return str(v)


def _finite(v: Any) -> Any:
    """v with numpy values as Python ones and NaN or infinite floats as None, recursively."""
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite(x) for x in v]
    if isinstance(v, (np.generic, np.ndarray)):
        return _finite(_json(v))
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _strict_json(v: Any) -> str:
    """Standard JSON (RFC 8259, what JSON.parse reads): a value that is not a number (a PSNR
    model's class agreement, an unbounded figure) is written as null, not NaN or Infinity."""
    return json.dumps(_finite(v), indent=1, default=_json, allow_nan=False)


def _price(profile: HardwareProfile | str | Path, layers, plan: Plan) -> dict:
    """Predicted costs of one plan on a profile: {name: {latency_ms, memory_kb, size_kb}}."""
    prof = load_profile(profile)
    return {prof.name: costs_at(price(prof, layers, stack_plans([plan])), 0)}


def export_trial(study: optuna.Study, trial_number: int, out_dir: str | Path, *, finetune_steps: int | None = None,
                 force: bool = False, results_dir: str | Path = "results",
                 learning_rate: float | None = None, selection: dict | None = None) -> ExportResult:
    """Export trial `trial_number` of a study, fine-tuned again for `finetune_steps` (None:
    RETRAIN_FACTOR x the study's steps) at peak `learning_rate` (None: RETRAIN_LR_FACTOR x the
    study's), the plan's ratios reached gradually (`retrain_config`), with the quality the
    study's own fine-tune gives measured beside it (config.json "retrain": before and after).
    `selection` (how the trial was chosen, search.export.select) is recorded in config.json's
    "source".

    Task, profile and baseline are rebuilt from the study's record (search.study.context),
    the same way its workers rebuilt them: the user's weights file for a `--weights` study.
    Raises UserError for a trial that is missing or not complete, or a learning rate <= 0.
    """
    if learning_rate is not None and not (math.isfinite(learning_rate) and learning_rate > 0):
        raise UserError(f"--lr {learning_rate} must be a positive number (e.g. 3e-3), or leave it out to use the study's learning rate")
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    if trial_number not in trials:
        done = [n for n, t in trials.items() if t.state == TrialState.COMPLETE]
        listed = ", ".join(map(str, done[:20])) + (f", ... ({len(done)} in all)" if len(done) > 20 else "")
        raise UserError(f"study {study.study_name!r} has no trial {trial_number}; complete trials: {listed or 'none'} "
                        f"(see `hwcompress report --study {study.study_name}`)")
    trial = trials[trial_number]
    if trial.state != TrialState.COMPLETE or "plan" not in trial.user_attrs:
        raise UserError(f"trial {trial_number} of study {study.study_name!r} is {trial.state.name.lower()}, not complete; export a complete trial from the Pareto report")
    if finetune_steps is not None and finetune_steps < 0:
        raise UserError(f"--finetune-steps {finetune_steps} must be >= 0")
    check_target(Path(out_dir), force)  # before the baseline is rebuilt
    ctx = load_context(StudySpec.of_study(study), results_dir, study=study)
    # one plan at a time, on the loop the search measured (a fixed K and loop measure nothing)
    searched = dataclasses.replace(ctx.spec.finetune, k=1, loop=ctx.spec.finetune.loop
                                   or trial.user_attrs.get("engine_loop") or "python")
    config = retrain_config(searched, finetune_steps, learning_rate)
    budget = {"default": finetune_steps is None, "factor": RETRAIN_FACTOR, "search_steps": searched.steps,
              "search_learning_rate": searched.learning_rate,
              "lr_factor": None if learning_rate is not None else config.learning_rate / searched.learning_rate}
    plan = plan_from_dict(trial.user_attrs["plan"])
    return export_plan(ctx.task, ctx.params, plan, out_dir, finetune=config,
                       profile=ctx.profile, costs=trial.user_attrs.get("costs"), force=force,
                       source={"study": study.study_name, "trial": trial_number,
                               "search_quality": trial.user_attrs.get("quality"),
                               **({"selection": selection} if selection else {})},
                       before=searched, retrain=budget)
