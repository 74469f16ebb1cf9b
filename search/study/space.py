"""The per-layer search space: what Optuna samples for each layer, and how a trial becomes a Plan.

Per layer: prune ratio, granularity, weight bits, activation bits and quantization mode, and,
when the space turns factorization on (`ranks`, `--factorize`), a rank ratio and, where the layer
can take more than one, a factorization form (search.compression.lowrank).
The choices come from the hardware profile (granularities and activation widths that have
real kernels there) so the sampler never spends trials on what the device cannot run.
Weight widths below the narrowest kernel stay allowed: they compute at the next wider
kernel but are stored packed, which is what the size budget and the compression ratio see.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import optuna

from search.compression import lowrank
from search.compression import plan as P
from search.compression.groups import kept_channels
from search.compression.layers import Layer

RATIO_STEP = 0.02  # prune-ratio grid: fine enough for the 90-98% regime of Deep Compression
MAX_SEARCH_RATIO = 0.98  # the largest ratio the sampler proposes (plan.MAX_RATIO is 0.99)
STORAGE_WEIGHT_BITS = (2, 3, 4, 5, 6, 8)  # packed storage widths, kernels or not
GRAN_NAMES = {v: k for k, v in P.GRANULARITIES.items()}
MODE_NAMES = {v: k for k, v in P.QUANT_MODES.items()}
FORM_NAMES = {v: k for k, v in P.FORMS.items()}
NO_RANKS = (1.0,)  # factorization off: every layer keeps its full rank
FACTORIZE_RANKS = (1.0, 0.75, 0.5, 0.25)  # the rank ratios `--factorize` offers (plan.rank)
# a Kronecker layer takes this share of the sampled ratio: r * (m1*n1 + m2*n2) weights and
# r * (m1*m2*n2 + n1*m1*n2) MACs pay only at small r (lowrank's docstring), so its ratios are
# 0.09, 0.06 and 0.03 (e.g. r = 11, 8, 4 for a 64 x 300 Dense, whose full rank is 120)
KRONECKER_RANK_SCALE = 0.125


@dataclass(frozen=True)
class Space:
    """The choices offered for every layer (the same for all layers)."""

    granularities: tuple[str, ...]  # names from plan.GRANULARITIES
    weight_bits: tuple[int, ...]  # allowed weight widths, FLOAT included
    act_bits: tuple[int, ...]  # allowed activation widths, FLOAT included
    quant_modes: tuple[str, ...]  # names from plan.QUANT_MODES
    max_ratio: float = MAX_SEARCH_RATIO  # largest prune ratio proposed
    ratio_step: float = RATIO_STEP  # grid of the prune ratio
    ranks: tuple[float, ...] = NO_RANKS  # rank ratios offered to factorizable layers; (1.0,): factorization off
    forms: tuple[str, ...] = ("svd",)  # factorization forms offered (names from plan.FORMS), where a layer takes them
    # a channel-pruned group keeps a multiple of this many channels (the sampled count rounded up):
    # a profile calibrated on a runtime with blocked float convs sets its channel_align (aligned_ratio)
    channel_multiple: int = 1

    @property
    def factorize(self) -> bool:
        """Whether the space offers factorization (a rank ratio below 1)."""
        return any(r < 1 for r in self.ranks)

    def to_dict(self) -> dict[str, Any]:
        d = {
            "granularities": list(self.granularities),
            "weight_bits": list(self.weight_bits),
            "act_bits": list(self.act_bits),
            "quant_modes": list(self.quant_modes),
            "max_ratio": self.max_ratio,
            "ratio_step": self.ratio_step,
        }
        if self.factorize:  # a record without "ranks" is a study from before factorization: off
            d["ranks"] = list(self.ranks)
            d["forms"] = list(self.forms)
        if self.channel_multiple > 1:  # a record without it keeps every sampled count
            d["channel_multiple"] = self.channel_multiple
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Space:
        """The inverse of to_dict (a study record's "space")."""
        return cls(tuple(d["granularities"]), tuple(int(b) for b in d["weight_bits"]),
                   tuple(int(b) for b in d["act_bits"]), tuple(d["quant_modes"]),
                   float(d["max_ratio"]), float(d["ratio_step"]),
                   tuple(float(r) for r in d.get("ranks", NO_RANKS)),
                   tuple(d.get("forms", ("svd",))),  # before the spatial and Kronecker forms: SVD only
                   int(d.get("channel_multiple", 1)))


def _bits_of(profile: Any, *names: str) -> tuple[int, ...]:
    """The first attribute of `profile` among `names` that holds a sequence of bit widths."""
    for name in names:
        value = getattr(profile, name, None)
        if value is None:
            continue
        if isinstance(value, dict):  # e.g. {8: ops_per_s, 16: ...}
            value = value.keys()
        try:
            return tuple(sorted({int(v) for v in value}))
        except (TypeError, ValueError):
            continue
    return ()


def _has_nm(profile: Any) -> bool:
    """Whether the profile accelerates an N:M pattern with M = plan.NM_GROUP."""
    return any(int(m) == P.NM_GROUP for _, m in (getattr(profile, "nm_patterns", None) or ()))


def space_for_profile(profile: Any, factorize: bool = False) -> Space:
    """The per-layer choices for a hardware profile (all choices when profile is None).

    Activations get only the widths with kernels (plus float unless the profile disallows
    float); weights also get packed storage widths below the widest kernel. `factorize`: also
    a rank ratio per factorizable layer from FACTORIZE_RANKS, in every form (plan.FORMS) the
    layer takes (every profile runs the factors as dense kernels, so all of them are offered);
    off by default.
    """
    ranks = FACTORIZE_RANKS if factorize else NO_RANKS
    forms = tuple(P.FORMS) if factorize else ("svd",)
    kernels = getattr(profile, "kernels", None)
    multiple = kernels.channel_align if kernels is not None and kernels.channel_block > 1 else 1
    if profile is None:
        return Space(("unstructured", "channel", "nm"), P.WEIGHT_BITS, P.ACT_BITS, ("uniform", "codebook"),
                     ranks=ranks, forms=forms)
    grans = ["unstructured", "channel"] + (["nm"] if _has_nm(profile) else [])
    kernel_w = _bits_of(profile, "weight_bits")
    kernel_a = _bits_of(profile, "act_bits")
    no_float = getattr(profile, "float_policy", "native") == "disallow"
    widest_w = max(kernel_w) if kernel_w else P.FLOAT
    weight = {*kernel_w, *(b for b in STORAGE_WEIGHT_BITS if b <= widest_w)}
    act = set(kernel_a)
    if not no_float:
        weight.add(P.FLOAT)
        act.add(P.FLOAT)
    weight_bits = sorted(b for b in weight if b in P.WEIGHT_BITS)
    act_bits = sorted(b for b in act if b in P.ACT_BITS) or [P.FLOAT]
    return Space(tuple(grans), tuple(weight_bits), tuple(act_bits), ("uniform", "codebook"), ranks=ranks, forms=forms,
                 channel_multiple=multiple)


def param_names(layer: Layer) -> dict[str, str]:
    """Optuna parameter names for one layer, e.g. {"ratio": "fc1.ratio", ...}."""
    return {f: f"{layer.name}.{f}" for f in ("ratio", "granularity", "weight_bits", "act_bits", "quant_mode", "rank",
                                             "form")}


def rank_offered(layer: Layer, space: Space, ratio: float, gran: int, bits: int, mode: int) -> bool:
    """Whether a layer samples a rank ratio, given its group's pruning and its quantization: the
    space factorizes, the layer is a Dense or ungrouped conv, its group prunes channels or nothing,
    and it is not a codebook layer (search.compression.lowrank.check_plan's rules)."""
    return (space.factorize and lowrank.factorizable(layer) and (gran == P.CHANNEL or ratio == 0)
            and not (mode == P.CODEBOOK and bits <= 8))


def layer_forms(layer: Layer, space: Space) -> tuple[str, ...]:
    """The forms offered to a layer that samples a rank (`rank_offered`): those of the space the
    layer's shape takes (lowrank.forms_of), fixed per layer (one Optuna distribution)."""
    names = [lowrank.FORM_NAMES[f] for f in lowrank.forms_of(layer) if lowrank.FORM_NAMES[f] in space.forms]
    return tuple(names) or ("svd",)


def pruned_forms(layer: Layer, space: Space, tied: tuple[np.ndarray, np.ndarray]) -> tuple[str, ...]:
    """`layer_forms` that a layer can take under its tied pruning (ratio, granularity [L]): no
    Kronecker where its own or its input channels are pruned (it keeps every channel). Where this
    leaves one form the trial samples none (`<layer>.form` absent), so the stored params are the
    forms that ran; a Kronecker layer is a Dense, whose other form is SVD."""
    pruned = lowrank.channels_pruned(layer, *tied)
    choices = tuple(f for f in layer_forms(layer, space) if not (pruned and f == "kronecker"))
    if len(choices) not in (1, len(layer_forms(layer, space))):  # one Optuna distribution per name
        raise ValueError(f"layer {layer.name}: forms {choices} under pruning are neither one form nor all of its forms")
    return choices or ("svd",)


def _tied(prune: dict[int, tuple[float, int]], layers: Sequence[Layer]) -> tuple[np.ndarray, np.ndarray]:
    """([L] ratio, [L] granularity) of every layer from its group's decision ({leader index:
    (ratio, granularity)})."""
    return (np.array([prune[l.group][0] for l in layers]), np.array([prune[l.group][1] for l in layers]))


def _ratio_grid_top(space: Space) -> float:
    """The largest grid point <= max_ratio (Optuna needs (high - low) divisible by step)."""
    n = int(np.floor(space.max_ratio / space.ratio_step + 1e-9))
    return round(n * space.ratio_step, 6)


def snap_ratio(ratio: float, space: Space) -> float:
    """A ratio on the sampler's grid, clipped to [0, max_ratio]."""
    top = _ratio_grid_top(space)
    r = round(round(float(ratio) / space.ratio_step) * space.ratio_step, 6)
    return float(min(max(r, 0.0), top))


def aligned_ratio(ratio: float, channels: int, multiple: int) -> float:
    """The prune ratio of a channel group that keeps the channels `ratio` keeps (search.compression.
    groups.kept_channels) rounded up to a multiple of `multiple` (at most all of them).

    onnxruntime runs a float conv whose channel counts are not multiples of its alignment (4 on
    the AVX-512 host measured) on its plain kernels, where it costs more than the next aligned
    count on the blocked ones (a 3x3 conv with 22 channels 17 us, with 24 14 us; a depthwise conv
    with 86 channels 33 us, with 88 4 us): the extra channels cost no time and keep accuracy.
    Torch-Pruning's round_to does the same for GPUs' tensor-core multiples."""
    if multiple <= 1 or ratio <= 0:
        return float(ratio)
    kept = float(kept_channels(np.float32(ratio), channels))
    up = min(float(channels), float(np.ceil(kept / multiple) * multiple))
    return float((channels - up) / channels)


def aligned_rank(layer: Layer, form: int, rank: float, multiple: int) -> float:
    """The rank ratio of a factorized conv (SVD or spatial form) whose achieved rank
    (lowrank.achieved_rank) is rounded up to a multiple of `multiple`, or `rank` as it is when
    that reaches the full rank. The second factor reads r channels, and onnxruntime runs a float
    conv reading a count off its alignment on its plain kernels (kernels.on_blocks): lenet5's
    conv2 factorized at rank 25 was predicted at 0.6 of its time when priced blocked."""
    if multiple <= 1 or rank >= 1 or layer.kind != "conv" or form not in (P.SVD, P.SPATIAL):
        return float(rank)
    d = lowrank.full_rank(layer, form)
    r = float(lowrank.achieved_rank(rank, d))
    up = float(np.ceil(r / multiple) * multiple)
    return float(rank) if up >= d else up / d


def aligned_group_ratio(leader: Layer, ratio: float, multiple: int) -> float:
    """A channel-pruned group's ratio as the search stores it: aligned (aligned_ratio) where its
    leader is a conv whose channels may be pruned; a Dense group runs no blocked kernel."""
    if leader.fixed is not None or leader.kind == "dense":
        return float(ratio)
    return aligned_ratio(ratio, leader.out_channels, multiple)


def layer_granularities(layer: Layer, space: Space) -> tuple[str, ...]:
    """The granularities offered for a layer's group: no "channel" where its channels are
    fixed (the model's output, or read by an op the graph tracer does not follow)."""
    if layer.fixed is None:
        return space.granularities
    return tuple(g for g in space.granularities if g != "channel") or ("unstructured",)


def suggest_plan(trial: optuna.trial.BaseTrial, layers: Sequence[Layer], space: Space) -> P.Plan:
    """Sample one plan [L] through the trial (fixed params of enqueued trials are honoured).

    Prune ratio and granularity are sampled once per channel group, for its leader
    (compression.graph): the other members take the leader's, so the plan is already tied. A
    channel-pruned group led by a conv keeps a multiple of `space.channel_multiple` channels
    (aligned_ratio; the Optuna param keeps the sampled ratio, the plan the aligned one).
    Bit widths and quantization modes are sampled per layer, then its rank ratio where
    `rank_offered` (a conditional parameter: absent where the layer cannot factorize), and below
    1 its form where it has a choice (`layer_forms`); a Kronecker layer takes
    KRONECKER_RANK_SCALE of the sampled ratio, and one whose own or input channels the plan
    prunes takes the SVD form instead (it would have to keep them); a factorized conv's rank is
    aligned like a channel count (aligned_rank)."""
    top = _ratio_grid_top(space)
    prune: dict[int, tuple[float, int]] = {}
    for layer in layers:
        if layer.group == layer.index:
            n = param_names(layer)
            ratio = trial.suggest_float(n["ratio"], 0.0, top, step=space.ratio_step)
            gran = P.GRANULARITIES[trial.suggest_categorical(n["granularity"], layer_granularities(layer, space))]
            if gran == P.CHANNEL:  # counts a blocked conv takes
                ratio = aligned_group_ratio(layer, ratio, space.channel_multiple)
            prune[layer.index] = (ratio, gran)
    cols: dict[str, list] = {"ratio": [], "granularity": [], "weight_bits": [], "act_bits": [], "quant_mode": [],
                             "rank": [], "form": []}
    tied = _tied(prune, layers)  # every group's decision, for the forms and ranks a layer can take
    for layer in layers:
        n = param_names(layer)
        ratio, gran = prune[layer.group]
        gran = P.UNSTRUCTURED if layer.fixed is not None and gran == P.CHANNEL else gran  # as tie_plan runs it
        cols["ratio"].append(ratio)
        cols["granularity"].append(prune[layer.group][1])
        bits = trial.suggest_categorical(n["weight_bits"], space.weight_bits)
        cols["weight_bits"].append(bits)
        cols["act_bits"].append(trial.suggest_categorical(n["act_bits"], space.act_bits))
        mode = P.QUANT_MODES[trial.suggest_categorical(n["quant_mode"], space.quant_modes)]
        cols["quant_mode"].append(mode)
        offered = rank_offered(layer, space, ratio, gran, bits, mode)
        rank, form = (trial.suggest_categorical(n["rank"], space.ranks) if offered else 1.0), "svd"
        if rank < 1:
            choices = pruned_forms(layer, space, tied)
            form = trial.suggest_categorical(n["form"], choices) if len(choices) > 1 else choices[0]
            rank = rank * KRONECKER_RANK_SCALE if form == "kronecker" else rank
            rank = aligned_rank(layer, P.FORMS[form], rank, space.channel_multiple)  # ranks a blocked conv reads
            if not lowrank.pays(layer, layers, P.FORMS[form], rank, *tied):
                rank, form = 1.0, "svd"  # as large as the layer it replaces: the layer itself, unfactorized
        cols["rank"].append(rank)
        cols["form"].append(P.FORMS[form])
    return P.make_plan(cols["ratio"], cols["granularity"], cols["weight_bits"], cols["act_bits"], cols["quant_mode"],
                       cols["rank"], cols["form"])


def plan_to_params(plan: P.Plan, layers: Sequence[Layer], space: Space) -> dict[str, Any]:
    """The Optuna params that reproduce a plan [L] (for enqueue_trial); values snap to the
    space, and a group's pruning is its leader's (the params `suggest_plan` samples)."""
    out: dict[str, Any] = {}
    tied = _tied({l.index: (snap_ratio(float(plan.ratio[l.index]), space), P.GRANULARITIES[_nearest_name(
        GRAN_NAMES[int(plan.granularity[l.index])], layer_granularities(l, space))]) for l in layers
        if l.group == l.index}, layers)
    for i, layer in enumerate(layers):
        n = param_names(layer)
        if layer.group == layer.index:
            out[n["ratio"]] = snap_ratio(float(plan.ratio[i]), space)
            out[n["granularity"]] = _nearest_name(GRAN_NAMES[int(plan.granularity[i])], layer_granularities(layer, space))
        out[n["weight_bits"]] = nearest_bits(int(plan.weight_bits[i]), space.weight_bits)
        out[n["act_bits"]] = nearest_bits(int(plan.act_bits[i]), space.act_bits)
        out[n["quant_mode"]] = _nearest_name(MODE_NAMES[int(plan.quant_mode[i])], space.quant_modes)
        lead = layers[layer.group]  # the group's pruning, as suggest_plan samples it for the leader
        gran = P.GRANULARITIES[_nearest_name(GRAN_NAMES[int(plan.granularity[lead.index])], layer_granularities(lead, space))]
        gran = P.UNSTRUCTURED if layer.fixed is not None and gran == P.CHANNEL else gran
        if rank_offered(layer, space, snap_ratio(float(plan.ratio[lead.index]), space), gran, out[n["weight_bits"]],
                        P.QUANT_MODES[out[n["quant_mode"]]]):
            form = FORM_NAMES[int(plan.form[i])]
            rank = float(plan.rank[i]) / (KRONECKER_RANK_SCALE if form == "kronecker" and plan.rank[i] < 1 else 1.0)
            out[n["rank"]] = min(space.ranks, key=lambda r: (abs(r - rank), r))
            choices = pruned_forms(layer, space, tied)
            if out[n["rank"]] < 1 and len(choices) > 1:
                out[n["form"]] = _nearest_name(form, choices)
    return out


def nearest_bits(bits: int, allowed: Sequence[int]) -> int:
    """The narrowest allowed width >= bits (the widest allowed when none is wide enough)."""
    wider = [b for b in allowed if b >= bits]
    return int(min(wider)) if wider else int(max(allowed))


def _nearest_name(name: str, allowed: Sequence[str]) -> str:
    return name if name in allowed else allowed[0]


def plan_to_dict(plan: P.Plan) -> dict[str, list]:
    """A plan [L] as the JSON-able dict stored in trial user attrs "plan"."""
    return {
        "ratio": [round(float(r), 6) for r in np.asarray(plan.ratio)],
        "granularity": [GRAN_NAMES[int(g)] for g in np.asarray(plan.granularity)],
        "weight_bits": [int(b) for b in np.asarray(plan.weight_bits)],
        "act_bits": [int(b) for b in np.asarray(plan.act_bits)],
        "quant_mode": [MODE_NAMES[int(m)] for m in np.asarray(plan.quant_mode)],
        "rank": [round(float(r), 6) for r in np.asarray(plan.rank)],
        "form": [FORM_NAMES[int(f)] for f in np.asarray(plan.form)],
    }


def plan_from_dict(d: dict[str, list]) -> P.Plan:
    """Inverse of plan_to_dict (reports and exports rebuild plans from storage with it); a plan
    stored before factorization existed has no "rank" and "form": every layer at full rank."""
    n = len(d["ratio"])
    return P.make_plan(
        d["ratio"],
        [P.GRANULARITIES[g] for g in d["granularity"]],
        d["weight_bits"],
        d["act_bits"],
        [P.QUANT_MODES[m] for m in d["quant_mode"]],
        d.get("rank", [1.0] * n),
        [P.FORMS[f] for f in d.get("form", ["svd"] * n)],
    )


def extreme_plans(num_layers: int, space: Space) -> P.Plan:
    """Uniform plans [K, L] at the largest ratio for every combination of discrete choices.

    Their per-metric minimum is the smallest latency, memory and size the space can reach,
    used to reject an impossible budget before any training.
    """
    top = _ratio_grid_top(space)
    rows = []
    low = min(space.ranks)
    for g in space.granularities:
        for wb in space.weight_bits:
            for ab in space.act_bits:
                for m in space.quant_modes:
                    rows.append((P.GRANULARITIES[g], wb, ab, P.QUANT_MODES[m], 1.0, P.SVD))
                    # the smallest rank where a factorized layer may take it (channel pruning, uniform),
                    # in every form (a layer that cannot take a form is priced unfactorized)
                    if low < 1 and g == "channel" and (m == "uniform" or wb > 8):
                        rows += [(P.GRANULARITIES[g], wb, ab, P.QUANT_MODES[m],
                                  low * (KRONECKER_RANK_SCALE if f == "kronecker" else 1.0), P.FORMS[f]) for f in space.forms]
                        if "kronecker" in space.forms:  # a Kronecker layer keeps its channels: unpruned
                            rows.append((P.GRANULARITIES[g], wb, ab, P.QUANT_MODES[m], low * KRONECKER_RANK_SCALE,
                                         P.KRONECKER, 0.0))
    k = len(rows)
    arr = np.asarray([r[:4] for r in rows], np.int32)
    ones = np.ones((k, num_layers), np.int32)
    return P.Plan(
        np.ones((k, num_layers), np.float32) * np.asarray([r[6] if len(r) > 6 else top for r in rows], np.float32)[:, None],
        ones * arr[:, :1],
        ones * arr[:, 1:2],
        ones * arr[:, 2:3],
        ones * arr[:, 3:4],
        np.ones((k, num_layers), np.float32) * np.asarray([r[4] for r in rows], np.float32)[:, None],
        ones * np.asarray([r[5] for r in rows], np.int32)[:, None],
    )
