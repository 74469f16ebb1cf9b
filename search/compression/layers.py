"""Layer discovery: every Dense and Conv of a Flax model, from one abstract forward pass.

Also the one place that knows how to run a model with a hook on the input of every
Dense/Conv: Linen through `nn.intercept_methods`, NNX by swapping `__call__` of
nnx.Linear / nnx.Conv while the function is traced. Both only act at trace time, so a
jitted function pays nothing for the indirection.
"""
from __future__ import annotations

import contextlib
import math
import re
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Literal, Mapping

import flax
import flax.errors
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from models.task import split_variables
from search.compression.graph import trace_coupling
from search.errors import UserError

# around(path, call, x) -> y: runs a Dense/Conv; `call(x)` is the layer itself, so a hook
# may rewrite its input (activation quantization) or look at its output (discovery).
Around = Callable[[tuple, Callable[[jax.Array], jax.Array], jax.Array], jax.Array]


@dataclass(frozen=True)
class Layer:
    """One compressible layer; index is its position in every plan array."""

    index: int  # position in the [L] plan axis (order of the forward pass)
    name: str  # "/".join(path), e.g. "conv1" or "block1/dw"
    path: tuple[str, ...]  # path of the module's params in the params tree
    kind: Literal["dense", "conv", "depthwise"]  # depthwise: feature_group_count == in channels
    kernel_shape: tuple[int, ...]  # Dense [in, out]; Conv [kh, kw, in/groups, out]
    in_shape: tuple[int, ...]  # input activation shape of one example (no batch axis)
    out_shape: tuple[int, ...]  # output activation shape of one example
    groups: int  # feature_group_count (1 for Dense)
    has_bias: bool  # whether a bias follows the kernel
    macs: int  # multiply-accumulates for one example (all calls of a layer called more than once)
    params: int  # kernel + bias parameter count
    # channel dependencies traced from the graph (search.compression.graph); the defaults are
    # what a study stored before they existed: every layer alone, inputs read in full
    leader: int = -1  # the layer whose pruning decision removes this layer's output channels (-1: itself)
    fixed: str | None = None  # why this layer's output channels cannot be removed (None: they can)
    reads: tuple[tuple[int, int], ...] = ()  # fan-in channels at one position: (leader or -1, count)
    in_repeat: int = 1  # times `reads` repeats along the fan-in (H*W for a Dense after a flatten)
    max_pooled: bool = False  # the input passed a max pooling since the layer that produced it
    clipped: bool = False  # the output is bounded below and above right after the layer (ReLU6: one Clip)
    # params paths of the BatchNorms that normalise this layer's output directly: a removed
    # output channel's scale and shift go with it (search.engine.steps.zero_removed)
    norms: tuple[tuple, ...] = ()

    @property
    def group(self) -> int:
        """Index of the layer that decides this layer's channels (its group's leader)."""
        return self.index if self.leader < 0 else self.leader

    @property
    def out_channels(self) -> int:
        return int(self.kernel_shape[-1])

    @property
    def fan_in(self) -> int:
        """Weights feeding one output unit (kernel size without the output axis)."""
        n = 1
        for d in self.kernel_shape[:-1]:
            n *= int(d)
        return n

    @property
    def weight_count(self) -> int:
        return self.fan_in * self.out_channels


_LINEN_TYPES = (nn.Dense, nn.Conv)


def _nnx() -> Any:
    """flax.nnx, or None while nothing has imported it. An NNX module can only exist once
    flax.nnx is imported, so a Linen model (every zoo model) never pays for importing it:
    0.24 s of every search's start on a 2-core CPU."""
    return sys.modules.get("flax.nnx")


def _nnx_types() -> tuple[type, ...]:
    from flax import nnx

    return nnx.Linear, nnx.Conv


class Model:
    """A Flax model seen as `apply(params, x, hook)` over a plain params dict.

    Accepts a Linen module, an nnx.Module (its nnx.Param leaves become the params dict), or
    a function `apply(params, x)` that calls Linen modules inside.

    Only `params` is compressed and fine-tuned. A Linen model's other variable collections
    (`state`, e.g. {"batch_stats": ...}) are passed to every call unchanged, and `kwargs` are
    its call arguments (e.g. {"train": False}, {"deterministic": True}). An NNX model runs in
    eval mode (`Module.eval()`: BatchNorm on its running statistics, Dropout off), on a copy,
    so the caller's module is not changed.
    """

    def __init__(self, module_or_apply: Any, state: Mapping[str, Any] | None = None,
                 kwargs: Mapping[str, Any] | None = None):
        self.source = module_or_apply
        self.state = dict(state or {})  # the other collections (Linen), fixed
        self.kwargs = dict(kwargs or {})  # call arguments of every forward pass
        self.kind: Literal["linen", "nnx", "function"]
        if isinstance(module_or_apply, nn.Module):
            self.kind = "linen"
        elif _nnx() is not None and isinstance(module_or_apply, _nnx().Module):
            nnx = _nnx()
            self.kind = "nnx"
            self._graphdef, self._param_state, self._rest = nnx.split(module_or_apply, nnx.Param, ...)
        elif callable(module_or_apply):
            self.kind = "function"
        else:
            raise UserError(
                f"cannot compress {type(module_or_apply).__name__}: pass a Flax Linen module, "
                "an nnx.Module, or a function apply(params, x)"
            )
        if self.kind != "linen" and self.state:
            raise UserError(f"variable collections {sorted(self.state)} were given for a {self.kind} model: "
                            "only a Linen module takes them (an NNX module holds its own state)")

    def saved_state(self) -> dict[str, Any]:
        """The non-param variables an export stores beside the weights, as plain dicts: a
        Linen model's other collections; an NNX model's BatchNorm statistics (its nnx.BatchStat
        leaves) under "batch_stats", as `nnx.to_pure_dict` gives them (restore them with
        `nnx.replace_by_pure_dict(nnx.state(model, nnx.BatchStat), variables["batch_stats"])`).
        RNG and other NNX state are not stored: an evaluated model does not read them."""
        if self.kind == "nnx":
            nnx = _nnx()
            stats = nnx.to_pure_dict(nnx.filter_state(self._rest, nnx.BatchStat))
            return {"batch_stats": stats} if stats else {}
        return dict(self.state)

    def initial_params(self) -> Any:
        """The params dict of an NNX module (Linen params live outside the module)."""
        if self.kind != "nnx":
            raise UserError("initial_params() is only defined for NNX modules; pass params explicitly")
        return _nnx().to_pure_dict(self._param_state)

    def apply(self, params: Any, x: jax.Array, around: Around | None = None,
              bn: Mapping[str, tuple[jax.Array, jax.Array]] | None = None) -> jax.Array:
        """Run the model; `around(path, call, x)` wraps every Dense/Conv call; `bn` replaces
        the running statistics of the BatchNorms it names ({"/".join(path): (mean [C], var
        [C])}, as `bn_statistics` returns them: adaptive BN)."""
        if not bn:
            return self._run(params, x, around, None)
        return self._run(params, x, around, lambda path, m, v: bn.get(path))

    def bn_statistics(self, params: Any, x: jax.Array, around: Around | None = None
                      ) -> dict[str, tuple[jax.Array, jax.Array]]:
        """Adaptive BN (Li et al., EagleEye, ECCV 2020): every BatchNorm re-estimates its
        statistics on the batch x (a forward pass in which each normalises with the batch's
        mean and variance over all axes but the feature axis, the way training does), so that
        pruned and quantized layers are judged with statistics that fit them. Returns
        {"/".join(module path): (mean [C], var [C])}; {} for a model without BatchNorm."""
        found: dict[str, tuple[jax.Array, jax.Array]] = {}

        def batch_stats(path, m, v):
            axes = tuple(range(v.ndim - 1))
            mean = jnp.mean(v, axis=axes)
            var = jnp.maximum(jnp.mean(jnp.square(v), axis=axes) - jnp.square(mean), 0.0)
            found[path] = (mean, var)
            return mean, var

        self._run(params, x, around, batch_stats)
        return found

    def _run(self, params, x, around, stats) -> jax.Array:
        """The forward pass; stats(path, module, input) -> (mean, var) or None picks the
        statistics of every BatchNorm over the last axis (None: its own)."""
        with _bn_override(stats):
            if self.kind == "nnx":
                nnx = _nnx()
                state = jax.tree.map(lambda a: a, self._param_state)  # a copy we may fill
                nnx.replace_by_pure_dict(state, params)
                model = nnx.merge(self._graphdef, state, self._rest)
                model.eval()  # running BatchNorm statistics, no Dropout: nothing is mutated in the trace
                names = {id(m): "/".join(str(q) for q in p) for p, m in nnx.iter_modules(model)}
                with _nnx_names(names):
                    if around is None:
                        return model(x, **self.kwargs)
                    paths = {id(m): tuple(p) for p, m in nnx.iter_modules(model) if isinstance(m, _nnx_types())}
                    with _nnx_around(paths, around):
                        return model(x, **self.kwargs)
            if self.kind == "linen":
                run = lambda: self.source.apply({"params": params, **self.state}, x, **self.kwargs)
            else:
                run = lambda: self.source(params, x, **self.kwargs)
            if around is None:
                return run()
            with nn.intercept_methods(_linen_interceptor(around)):
                return run()


_BN_STATS: list = []  # the active statistics override of _bn_override (a stack)
_NNX_NAMES: list = []  # {id(module): path} of the NNX model being run


@contextlib.contextmanager
def _bn_override(stats) -> Iterator[None]:
    """While tracing, BatchNorms over the last axis normalise with stats(path, module, x)."""
    if stats is None:
        yield
        return
    _BN_STATS.append(stats)
    nnx = _nnx()  # None: no NNX model can be running, only Linen BatchNorms to override
    orig = nnx.BatchNorm.__call__ if nnx is not None else None

    def linen(next_fun, args, kwargs, context):
        m = context.module
        if not (isinstance(m, nn.BatchNorm) and context.method_name == "__call__" and args
                and m.axis in (-1, args[0].ndim - 1) and m.axis_name is None):
            return next_fun(*args, **kwargs)
        x = args[0]
        got = stats("/".join(m.path), m, x)
        if got is None:
            return next_fun(*args, **kwargs)
        p = m.variables.get("params", {})
        return _normalise(x, *got, p.get("scale") if m.use_scale else None, p.get("bias") if m.use_bias else None,
                          m.epsilon)

    def nnx_call(self, x, *args, **kwargs):
        name = _NNX_NAMES[-1].get(id(self)) if _NNX_NAMES else None
        axis = getattr(self, "feature_axis", -1)
        got = None if name is None or axis not in (-1, x.ndim - 1) else stats(name, self, x)
        if got is None:
            return orig(self, x, *args, **kwargs)
        scale = self.scale[...] if getattr(self, "scale", None) is not None else None
        bias = self.bias[...] if getattr(self, "bias", None) is not None else None
        return _normalise(x, *got, scale, bias, self.epsilon)

    try:
        if nnx is not None:
            nnx.BatchNorm.__call__ = nnx_call
        with nn.intercept_methods(linen):
            yield
    finally:
        if nnx is not None:
            nnx.BatchNorm.__call__ = orig
        _BN_STATS.pop()


@contextlib.contextmanager
def _nnx_names(names: dict[int, str]) -> Iterator[None]:
    _NNX_NAMES.append(names)
    try:
        yield
    finally:
        _NNX_NAMES.pop()


def _normalise(x, mean, var, scale, bias, eps) -> jax.Array:
    """BatchNorm's output for given statistics (Flax's formula, feature axis last)."""
    y = (x - mean) * jax.lax.rsqrt(var + eps)
    if scale is not None:
        y = y * scale
    return y + bias if bias is not None else y


def _linen_interceptor(around: Around):
    def interceptor(next_fun, args, kwargs, context):
        if context.method_name == "__call__" and isinstance(context.module, _LINEN_TYPES) and args:
            rest = args[1:]
            return around(tuple(context.module.path), lambda x: next_fun(x, *rest, **kwargs), args[0])
        return next_fun(*args, **kwargs)

    return interceptor


@contextlib.contextmanager
def _nnx_around(paths: dict[int, tuple], around: Around) -> Iterator[None]:
    """Swap __call__ of nnx.Linear/nnx.Conv for the duration of one trace."""
    originals = {cls: cls.__dict__["__call__"] for cls in _nnx_types()}

    def wrap(orig):
        def call(self, x, *args, **kwargs):
            path = paths.get(id(self))
            if path is None:
                return orig(self, x, *args, **kwargs)
            return around(path, lambda v: orig(self, v, *args, **kwargs), x)

        return call

    try:
        for cls, orig in originals.items():
            cls.__call__ = wrap(orig)
        yield
    finally:
        for cls, orig in originals.items():
            cls.__call__ = orig


def task_model(task: Any, weights: Any) -> tuple[Model, Any]:
    """(the Model that runs `task.module` in eval mode, its params) from the trained weights:
    a Flax variables dict ({"params": ..., "batch_stats": ...}: only params are compressed,
    the other collections ride along fixed), a bare params tree, or None for an NNX module's
    own weights. The call arguments are task.eval_kwargs (e.g. train=False)."""
    params, state = split_variables(weights) if weights is not None else (None, {})
    model = Model(task.module, state, task.eval_kwargs)
    if params is None and model.kind == "nnx":
        params = model.initial_params()
    return model, params


def get_path(tree: Any, path: tuple) -> Any:
    """tree[path[0]][path[1]]..."""
    for p in path:
        tree = tree[p]
    return tree


def set_path(tree: dict, path: tuple, value: Any) -> dict:
    """A copy of nested dict `tree` with tree[path] = value (the rest shared)."""
    if not path:
        return value
    out = dict(tree)
    out[path[0]] = set_path(tree[path[0]], path[1:], value)
    return out


def discover_layers(module_or_apply: Any, params: Any, sample_input: Any) -> tuple[Layer, ...]:
    """Every Dense/Conv in forward order, with shapes, MACs and params, from jax.eval_shape.

    `params` is the params dict (Linen `variables["params"]`, or None for an NNX module);
    `sample_input` is one input batch (or its ShapeDtypeStruct). A layer called twice
    (shared weights) is listed once, at its first call, with the MACs of all its calls.
    """
    model = module_or_apply if isinstance(module_or_apply, Model) else Model(module_or_apply)
    if params is None:
        params = model.initial_params()
    seen: dict[tuple, tuple[tuple[int, ...], tuple[int, ...]]] = {}
    positions: dict[tuple, int] = {}  # output positions summed over the layer's calls
    outputs: dict[int, tuple[tuple, Any]] = {}  # id of a layer call's output -> (path, the output, kept alive)
    norms: dict[tuple, list[tuple]] = {}  # layer path -> params paths of the BatchNorms reading its output

    def around(path, call, x):
        y = call(x)
        seen.setdefault(path, (tuple(x.shape), tuple(y.shape)))
        positions[path] = positions.get(path, 0) + math.prod(y.shape[1:-1])
        outputs[id(y)] = (path, y)
        return y

    def batch_norm(name, module, x):  # a BatchNorm reading a layer's output as it is
        src = outputs.get(id(x))
        where = _params_path(params, name) if src is not None else None
        if where is not None and where not in norms.setdefault(src[0], []):
            norms[src[0]].append(where)
        return None  # its own statistics

    with flax_errors():
        jax.eval_shape(lambda p, x: model._run(p, x, around, batch_norm), params, sample_input)
    outputs.clear()
    if not seen:
        raise UserError("no Dense or Conv layer found in the model: nothing to compress")
    paths = list(seen)
    with flax_errors():
        coupling = trace_coupling(model.apply, params, sample_input, paths)
    layers = []
    for i, (path, (in_shape, out_shape)) in enumerate(seen.items()):
        node = get_path(params, path)
        kshape = tuple(int(d) for d in np.shape(node["kernel"]))
        has_bias = node.get("bias") is not None
        groups = 1 if len(kshape) == 2 else int(in_shape[-1]) // int(kshape[-2])
        kind = "dense" if len(kshape) == 2 else (
            "depthwise" if groups > 1 and groups == in_shape[-1] else "conv")
        nbias = int(np.prod(np.shape(node["bias"]))) if has_bias else 0
        layers.append(Layer(
            index=i, name="/".join(str(p) for p in path), path=path, kind=kind,
            kernel_shape=kshape, in_shape=in_shape[1:], out_shape=out_shape[1:], groups=groups,
            has_bias=has_bias, macs=positions[path] * math.prod(kshape),
            params=math.prod(kshape) + nbias,
            leader=coupling.leader[i], fixed=coupling.fixed[i], reads=coupling.reads[i],
            in_repeat=coupling.in_repeat[i], max_pooled=coupling.max_pooled[i], clipped=coupling.clipped[i],
            norms=tuple(norms.get(path, ())),
        ))
    return tuple(layers)


def _params_path(params: Any, name: str) -> tuple | None:
    """The key path in `params` of the module named `name` ("/"-joined, as Linen's module path
    or NNX's iter_modules path), or None when params holds nothing for it (a BatchNorm
    without scale and shift)."""
    node, path = params, []
    for part in name.split("/") if name else []:
        if not isinstance(node, Mapping):
            return None
        key = part if part in node else (int(part) if part.isdigit() and int(part) in node else None)
        if key is None:
            return None
        node, path = node[key], path + [key]
    if not isinstance(node, Mapping) or not any(k in node for k in ("scale", "bias")):
        return None
    return tuple(path)


_CALL_ARGS = "compress(..., apply_kwargs=...) in Python, models.Task(eval_kwargs=...) for --model"


@contextlib.contextmanager
def flax_errors() -> Iterator[None]:
    """Flax's errors about variables and call arguments as one-line UserErrors with the fix."""
    try:
        yield
    except flax.errors.ScopeCollectionNotFound as e:
        col = re.search(r'collection "([^"]+)"', str(e))
        raise UserError(f"the model reads variable collection {col.group(1) if col else '?'!r}, which was not given: pass the whole "
                        "variables dict (params and the other collections, e.g. batch_stats), not "
                        "variables['params']") from None
    except flax.errors.ModifyScopeVariableError as e:
        msg = str(e).split(" (https://")[0].splitlines()[0]
        raise UserError(f"the model updates its variables when evaluated ({msg}): run it in eval mode with the call "
                        f"arguments {{'train': False}} ({_CALL_ARGS}; BatchNorm use_running_average=True)") from None
    except flax.errors.InvalidRngError as e:
        msg = str(e).split(" (https://")[0].splitlines()[0]
        raise UserError(f"the model needs random numbers when evaluated ({msg}): run it deterministically with the "
                        f"call arguments {{'deterministic': True}} ({_CALL_ARGS}; Dropout off)") from None
    except TypeError as e:  # the module's __call__ refused the call arguments given
        msg = str(e).splitlines()[0] if str(e) else ""
        if "__call__()" not in msg or not ("argument" in msg):
            raise
        raise UserError(f"the model's call failed: {msg}: give its call arguments ({_CALL_ARGS})") from None
    except flax.errors.ApplyScopeInvalidVariablesStructureError:
        raise UserError("the variables are nested one level too deep: pass module.init(...)'s dict, whose top level "
                        "holds 'params' and the other collections") from None
    except flax.errors.TraceContextError:
        raise UserError("the NNX model changes its state while evaluated: call model.eval() (BatchNorm on running "
                        "statistics, Dropout off) before compressing it") from None
