"""`hwcompress export`: write a chosen trial as packed weights, config, size breakdown and ONNX."""
from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

from search.export.defaults import CANDIDATES, CONFIDENCE, RETRAIN_FACTOR, RETRAIN_LR_FACTOR, SCREEN


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("export", help="export a trial: packed safetensors, config.json, size breakdown, model.onnx",
                              description="Re-create trial N of a study (or, with --within, the most compressed plan "
                              "within that many points of the baseline after the retrain), fine-tuned again for longer "
                              f"than the search did (by default {RETRAIN_FACTOR}x the study's steps at {RETRAIN_LR_FACTOR:g}x its learning "
                              "rate, cosine decay, "
                              "the plan's pruning reached gradually), and write OUT/config.json "
                              "(with the quality before and after that retrain), OUT/weights.safetensors (integers packed at their bit width), "
                              "OUT/size.json (Deep Compression breakdown) and OUT/model.onnx (pruned channels removed, "
                              "int8 QDQ layers), checked against the Flax model.")
    p.add_argument("--study", required=True, help="study name (see `hwcompress studies`)")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--trial", type=int, help="trial number (see `hwcompress report`)")
    which.add_argument("--within", type=float, default=None,
                       help="export the most compressed front plan whose validation quality after the retrain is within "
                       "this many points of accuracy (dB of PSNR) of the baseline's: front plans are retrained in "
                       "bisection order over their compression ratios, and each line printed (test quality shown, "
                       "never used to choose)")
    p.add_argument("--screen", type=float, default=None,
                   help=f"--within: start among the front plans within this many points of the baseline at the "
                   f"search's own budget, and go beyond them when the most compressed passes (default {SCREEN:g}, "
                   "or --within if larger)")
    p.add_argument("--candidates", type=int, default=CANDIDATES,
                   help=f"--within: at most this many retrains (default {CANDIDATES})")
    p.add_argument("--confidence", type=float, default=None,
                   help=f"--within: the one-sided confidence, on the validation split, that the pick is within it "
                   f"(the plan's per-example quality against the baseline's on the same examples; default "
                   f"{CONFIDENCE:g}; 0.5: the validation score as measured)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--finetune-steps", type=int, default=None,
                   help=f"final fine-tune steps, cosine learning-rate decay (default: {RETRAIN_FACTOR}x the study's fine-tune steps; "
                   "0: compress only; the study's own steps: the search's fine-tune, its schedule too); "
                   "config.json records the quality before and after it")
    p.add_argument("--lr", type=float, default=None,
                   help=f"peak learning rate of that fine-tune (default: {RETRAIN_LR_FACTOR:g}x the study's); a long retrain of a "
                   "heavily pruned model gains from the rate the model was trained with (learning-rate rewinding)")
    p.add_argument("--force", action="store_true", help="overwrite a non-empty output directory")
    p.add_argument("--storage", default=None, help="Optuna storage URL (default sqlite under --results-dir)")
    p.add_argument("--results-dir", default="results", help="results root: studies.db and the baseline cache (default results)")
    p.set_defaults(func=export_command)


def export_command(args: argparse.Namespace) -> int:
    from search.export.exporter import export_trial
    from search.study.storage import load_study, open_storage

    if args.within is None and (args.screen is not None or args.candidates != CANDIDATES or args.confidence is not None):
        from search.errors import UserError

        raise UserError("--screen, --candidates and --confidence choose among plans for --within: give --within, "
                        "or leave them out with --trial")
    study = load_study(args.study, open_storage(args.storage, args.results_dir, create=False))
    trial, selection = args.trial, None
    if args.within is not None:
        trial, selection = select_trial(study, args)
    r = export_trial(study, trial, args.out, finetune_steps=args.finetune_steps, force=args.force,
                     results_dir=args.results_dir, learning_rate=args.lr, selection=selection)
    c = r.config
    size = c["size"]
    print(f"exported trial {trial} of {args.study} to {r.out_dir}")
    for line in retrain_lines(c):
        print("  " + line)
    # agreement of predicted classes: NaN for an image-restoration model, which has none
    same = "" if math.isnan(r.onnx_agreement) else f", same predictions {r.onnx_agreement:.2%}"
    print(f"  {c['model']['metric']}: Flax {r.quality:.4f}, reloaded {r.reload_quality:.4f}, ONNX {r.onnx_quality:.4f} "
          f"(max |ONNX - Flax| {r.onnx_max_abs_diff:.2e}{same})")
    from search.export.exporter import ONNX_MIN_AGREEMENT

    if r.onnx_agreement < ONNX_MIN_AGREEMENT:
        print(f"  warning: ONNX and Flax predictions agree on only {r.onnx_agreement:.2%} of the test set")
    # Deep Compression's stages; a factorized layer's float32 factors are in its second stage
    factorized = any(l.get("rank") is not None for l in c["layers"])
    label = {"pruned": "pruned+factorized"} if factorized else {}
    print("  size: " + ", ".join(f"{label.get(k, k)} {size['bytes_by_stage'][k] / 1024:.1f} KB ({size['ratio'][k]:.1f}x)"
                                 for k in ("dense", "pruned", "quantized", "huffman")))
    for l in c["layers"]:
        print(f"  {l['name']:12s} {l['out_channels']:4d} -> {l['onnx_out_channels']:4d} ch, w{l['weight_bits']} a{l['act_bits']} "
              f"{l['quant_mode']:8s} onnx {l['onnx_form']}{rank_text(l)}")
    shape = "x".join(str(d) for d in c["model"].get("input_shape", []))
    searched = c.get("predicted_at_search_input")
    for name, pred in (c.get("predicted") or {}).items():
        if name == c.get("profile"):
            line = (f"  predicted on {name}: {pred.get('latency_ms', float('nan')):.4f} ms, "
                    f"{pred.get('memory_kb', float('nan')):.1f} KB memory at the exported input {shape}")
            at = (searched or {}).get("costs", {}).get(name)
            if at:  # a model searched on patches, deployed on whole images
                line += (f" (the search priced its {'x'.join(map(str, searched['input_shape']))} training input: "
                         f"{at['latency_ms']:.4f} ms, {at['memory_kb']:.1f} KB)")
            print(line)
    return 0


def select_trial(study: Any, args: argparse.Namespace) -> tuple[int, dict]:
    """--within: the trial search.export.select picks, and the record of how (config.json's
    source.selection). UserError, after every retrained line is printed, when none is within."""
    from search.errors import UserError
    from search.export.outdir import check_target
    from search.export.select import check_selection, select_within, unit as unit_of

    confidence = CONFIDENCE if args.confidence is None else args.confidence
    screen = check_selection(args.within, args.screen, args.candidates, confidence)
    check_target(Path(args.out), args.force)  # before any retrain
    base, unit = study.user_attrs["baseline"], unit_of(study)

    def amount(x: float) -> str:  # "1 point", "0.5 points", "1 dB"
        return f"{x:g} {unit[:-1] if unit == 'points' and x == 1 else unit}"

    print(f"retraining front plans of {args.study} (quality vs compression ratio), in bisection order from those within "
          f"{amount(screen)} of the baseline's validation {base['val_metric']:.4f} (--screen), at most {args.candidates}; "
          f"the pick: the most compressed within {amount(args.within)} with {confidence:.0%} confidence (--confidence):")
    pick, tried = select_within(study, args.within, screen=screen, candidates=args.candidates,
                                finetune_steps=args.finetune_steps, learning_rate=args.lr, confidence=confidence,
                                results_dir=args.results_dir, log=lambda line: print("  " + line, flush=True))
    if pick is None:
        best = max((c for c in tried if c.val is not None), key=lambda c: c.val, default=None)
        closest = f"; the closest, trial {best.trial}, reached val {best.val:.4f}" if best else ""
        raise UserError(f"no retrained plan is within {args.within:g} of the baseline's validation quality with "
                        f"{confidence:.0%} confidence ({len(tried)} tried{closest}): raise --within or --candidates, "
                        "lower --confidence, or export one with --trial")
    return pick.trial, {"within": args.within, "confidence": confidence, "screen": screen, "candidates": args.candidates,
                        "tried": [c.as_dict() for c in tried]}


def rank_text(layer: dict) -> str:
    """A factorized layer's rank for its printed line, from config.json's "rank" (the achieved
    rank r), "full_rank", "rank_ratio" and "form" (search.compression.lowrank.describe), e.g.
    ", rank 16 of 64 (svd, ratio 0.25; first factor onnx int8)"; "" for a layer not factorized
    (rank None) or an export written before factorization existed (no "rank")."""
    r = layer.get("rank")
    if r is None:
        return ""
    full = f" of {layer['full_rank']}" if layer.get("full_rank") is not None else ""
    ratio = f", ratio {layer['rank_ratio']:g}" if layer.get("rank_ratio") is not None else ""
    first = f"; first factor onnx {layer['onnx_factor_form']}" if layer.get("onnx_factor_form") else ""
    return f", rank {r}{full} ({layer.get('form') or 'svd'}{ratio}{first})"


def retrain_lines(config: dict) -> list[str]:
    """What the final fine-tune was and what it changed, from config.json's "retrain"."""
    r, metric = config.get("retrain") or {}, config["model"]["metric"]
    if not r:
        return []
    how = (f"default: {r['factor']}x the study's {r['search_steps']}" if r.get("default") else "--finetune-steps") \
        if "search_steps" in r else "given"
    lr = f" from {r['learning_rate']:g}" if r.get("learning_rate") is not None else ""
    if r.get("lr_factor") is not None and "search_learning_rate" in r:  # written since the rate became a factor
        lr += f" ({r['lr_factor']:g}x the study's {r['search_learning_rate']:g})"
    pruning = f", {r['pruning']} pruning" if r.get("pruning") else ""
    lines = [f"retrain: {r['steps']} steps, {r['schedule']} learning rate{lr}{pruning} ({how})" if r["steps"]
             else f"retrain: none, compressed only ({how})"]

    def q(d: dict) -> str:
        return "diverged" if d["val"] is None else f"val {d['val']:.4f}, test {d['test']:.4f}"

    b, a = r.get("before"), r["after"]
    kept = r.get("kept", "after")  # exports written before the choice existed kept the retrain
    if b is not None:
        lines.append(f"{metric} before, the search's fine-tune ({b['steps']} steps): {q(b)}"
                     f"{', exported' if kept == 'before' else ''}")
    lines.append(f"{metric} after, {'exported' if kept == 'after' else 'the retrain'} ({a['steps']} steps): {q(a)}")
    if kept == "before":
        lines.append(f"the retrain lowered validation {metric}: the export keeps the search's own fine-tune")
    elif b is not None and b["val"] is not None and a["val"] < b["val"]:  # an older export
        lines.append(f"warning: the retrain lowered validation {metric}; pass --finetune-steps {b['steps']} "
                     "to export the search's own fine-tune (its steps and schedule)")
    return lines
