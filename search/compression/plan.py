"""A compression plan is data: per-layer arrays, shape [L] for one plan or [K, L] for K.

The arrays are passed INTO jitted functions, so new ratios, granularities or bit widths
never recompile. Nothing here is a Python constant on the hot path.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import jax
import numpy as np

# granularity codes
UNSTRUCTURED = 0  # magnitude pruning of single weights (Han et al.)
CHANNEL = 1  # whole output channels / filters by L1 norm (real speedups everywhere)
NM = 2  # N:M: in every group of NM_GROUP consecutive fan-in weights keep N
GRANULARITIES = {"unstructured": UNSTRUCTURED, "channel": CHANNEL, "nm": NM}
NM_GROUP = 4  # M of N:M; pruned per group = round(ratio * NM_GROUP), so 2:4 is ratio 0.5

# quantization modes
UNIFORM = 0  # symmetric uniform fake quantization, per-output-channel scales
CODEBOOK = 1  # Deep Compression trained quantization: 2**bits shared values per layer
QUANT_MODES = {"uniform": UNIFORM, "codebook": CODEBOOK}

# factorization forms (the layer's kernel as a product of smaller ones; rank < 1 turns it on)
SVD = 0  # "Weight SVD" (AIMET): a Dense as two matmuls, a kxk conv as r kxk filters then a 1x1 conv
SPATIAL = 1  # "Spatial SVD" (AIMET; Jaderberg et al. 2014): a kxk conv as a kx1 conv to r channels, then a 1xk conv
KRONECKER = 2  # a Dense as a sum of r Kronecker products A_i (x) B_i (Van Loan and Pitsianis 1993)
FORMS = {"svd": SVD, "spatial": SPATIAL, "kronecker": KRONECKER}

FLOAT = 32  # a bit width of 32 means "leave in float32"
WEIGHT_BITS = (1, 2, 3, 4, 5, 6, 7, 8, 16, FLOAT)  # allowed weight widths
ACT_BITS = (4, 5, 6, 7, 8, 16, FLOAT)  # allowed activation widths
MAX_RATIO = 0.99  # the largest prune ratio


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class Plan:
    """Per-layer compression decisions; every field has shape [L] or [K, L]."""

    ratio: np.ndarray  # float32: fraction of the layer's weights removed, in [0, MAX_RATIO]
    granularity: np.ndarray  # int32: UNSTRUCTURED | CHANNEL | NM
    weight_bits: np.ndarray  # int32: weight bit width, FLOAT for float32
    act_bits: np.ndarray  # int32: input-activation bit width, FLOAT for float32
    quant_mode: np.ndarray  # int32: UNIFORM | CODEBOOK
    rank: np.ndarray  # float32: rank ratio in (0, 1] of a factorized layer, 1 = not factorized (search.compression.lowrank)
    form: np.ndarray  # int32: the factorization's form, SVD | SPATIAL | KRONECKER (used where rank < 1)

    @property
    def num_layers(self) -> int:
        return int(np.shape(self.ratio)[-1])

    @property
    def batch_shape(self) -> tuple[int, ...]:
        return tuple(np.shape(self.ratio)[:-1])


def dense_plan(num_layers: int) -> Plan:
    """The identity plan: nothing pruned, everything float."""
    return make_plan(np.zeros(num_layers), UNSTRUCTURED, FLOAT, FLOAT, UNIFORM)


def make_plan(ratio, granularity=UNSTRUCTURED, weight_bits=FLOAT, act_bits=FLOAT, quant_mode=UNIFORM,
              rank=1.0, form=SVD) -> Plan:
    """Build a plan from scalars or per-layer sequences, broadcast to one shape ([L] or [K, L]).

    granularity, quant_mode and form take their codes (CHANNEL, KRONECKER, ...) or their names
    ("channel", "kronecker", ...), alone or per layer.

    Raises:
        ValueError: a name that is not one of the field's (the message lists them).
    """
    fields = [ratio, _codes(granularity, GRANULARITIES, "granularity"), weight_bits, act_bits,
              _codes(quant_mode, QUANT_MODES, "quant_mode"), rank, _codes(form, FORMS, "form")]
    try:
        shape = np.broadcast_shapes(*(np.shape(v) for v in fields))
    except ValueError:
        raise ValueError("make_plan's per-layer values have different lengths "
                         f"({', '.join(str(np.shape(v)) for v in fields)}); give each a scalar or one value per layer") from None
    cast = lambda v, t: np.broadcast_to(np.asarray(v, t), shape).copy()
    return Plan(cast(fields[0], np.float32), *(cast(v, np.int32) for v in fields[1:5]), cast(fields[5], np.float32),
                cast(fields[6], np.int32))


def _codes(value, names: dict[str, int], field: str):
    """Names of a field's values (alone or in a sequence) -> their int codes; codes pass through."""
    def one(v):
        if isinstance(v, str):
            if v not in names:
                raise ValueError(f"{field} {v!r} is not one of {list(names)}; pass one of these names or its code")
            return names[v]
        return v
    if isinstance(value, str):
        return one(value)
    if isinstance(value, (list, tuple)):
        return [one(v) for v in value]
    return value


def stack_plans(plans: Sequence[Plan]) -> Plan:
    """K plans of shape [L] -> one plan of shape [K, L]."""
    return jax.tree.map(lambda *xs: np.stack(xs), *plans)


def unstack_plans(plan: Plan) -> list[Plan]:
    """One plan of shape [K, L] -> K plans of shape [L]."""
    k = plan.batch_shape[0]
    return [jax.tree.map(lambda a: np.asarray(a)[i], plan) for i in range(k)]


def validate_plan(plan: Plan, layers: Sequence | None = None) -> None:
    """Raise ValueError (one line) naming the field, the first layer with a bad value (its name
    from `layers`, else its index) and the allowed values, when a plan [L] or [K, L] is out of
    range."""
    def where(bad: np.ndarray) -> tuple[str, tuple[int, ...]]:
        """(the first bad layer's name or index, its position in the plan's arrays)"""
        i = tuple(int(x) for x in np.argwhere(bad)[0])
        return (layers[i[-1]].name if layers is not None and i[-1] < len(layers) else str(i[-1])), i

    r = np.asarray(plan.ratio)
    bad = ~(np.isfinite(r) & (r >= 0) & (r <= MAX_RATIO))
    if np.any(bad):
        name, i = where(bad)
        raise ValueError(f"plan.ratio of layer {name} is {float(r[i]):.6g}; a prune ratio lies in [0, {MAX_RATIO}]")
    k = np.asarray(plan.rank)
    bad = ~(np.isfinite(k) & (k > 0) & (k <= 1))
    if np.any(bad):
        name, i = where(bad)
        raise ValueError(f"plan.rank of layer {name} is {float(k[i]):.6g}; a rank ratio lies in (0, 1] (1 = not factorized)")
    for field, allowed, names in (
        ("granularity", tuple(GRANULARITIES.values()), GRANULARITIES),
        ("weight_bits", WEIGHT_BITS, None),
        ("act_bits", ACT_BITS, None),
        ("quant_mode", tuple(QUANT_MODES.values()), QUANT_MODES),
        ("form", tuple(FORMS.values()), FORMS),
    ):
        v = np.asarray(getattr(plan, field))
        bad = ~np.isin(v, allowed)
        if np.any(bad):
            name, i = where(bad)
            legal = ", ".join(f"{c} = {n}" for n, c in names.items()) if names else ", ".join(map(str, allowed))
            raise ValueError(f"plan.{field} of layer {name} is {v[i]}; allowed values are {legal}")
