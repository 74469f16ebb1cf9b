"""Layer discovery: every Dense and Conv of a Flax model, from one abstract forward pass.

Also the one place that knows how to run a model with a hook on the input of every
Dense/Conv: Linen through `nn.intercept_methods`, NNX by swapping `__call__` of
nnx.Linear / nnx.Conv while the function is traced. Both only act at trace time, so a
jitted function pays nothing for the indirection.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Literal

import flax.linen as nn
import jax
import numpy as np
from flax import nnx

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
    macs: int  # multiply-accumulates for one example
    params: int  # kernel + bias parameter count

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
_NNX_TYPES = (nnx.Linear, nnx.Conv)


class Model:
    """A Flax model seen as `apply(params, x, hook)` over a plain params dict.

    Accepts a Linen module, an nnx.Module (its nnx.Param leaves become the params dict), or
    a function `apply(params, x)` that calls Linen modules inside.
    """

    def __init__(self, module_or_apply: Any):
        self.source = module_or_apply
        self.kind: Literal["linen", "nnx", "function"]
        if isinstance(module_or_apply, nn.Module):
            self.kind = "linen"
        elif isinstance(module_or_apply, nnx.Module):
            self.kind = "nnx"
            self._graphdef, self._param_state, self._rest = nnx.split(module_or_apply, nnx.Param, ...)
        elif callable(module_or_apply):
            self.kind = "function"
        else:
            raise UserError(
                f"cannot compress {type(module_or_apply).__name__}: pass a Flax Linen module, "
                "an nnx.Module, or a function apply(params, x)"
            )

    def initial_params(self) -> Any:
        """The params dict of an NNX module (Linen params live outside the module)."""
        if self.kind != "nnx":
            raise UserError("initial_params() is only defined for NNX modules; pass params explicitly")
        return nnx.to_pure_dict(self._param_state)

    def apply(self, params: Any, x: jax.Array, around: Around | None = None) -> jax.Array:
        """Run the model; `around(path, call, x)` wraps every Dense/Conv call."""
        if self.kind == "nnx":
            state = jax.tree.map(lambda a: a, self._param_state)  # a copy we may fill
            nnx.replace_by_pure_dict(state, params)
            model = nnx.merge(self._graphdef, state, self._rest)
            if around is None:
                return model(x)
            paths = {id(m): tuple(p) for p, m in nnx.iter_modules(model) if isinstance(m, _NNX_TYPES)}
            with _nnx_around(paths, around):
                return model(x)
        run = (lambda: self.source.apply({"params": params}, x)) if self.kind == "linen" else (
            lambda: self.source(params, x))
        if around is None:
            return run()
        with nn.intercept_methods(_linen_interceptor(around)):
            return run()


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
    originals = {cls: cls.__dict__["__call__"] for cls in _NNX_TYPES}

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


def reads_previous(prev: Layer, cur: Layer) -> bool:
    """Whether `cur`'s input carries `prev`'s output channels (directly, pooled, or flattened).

    The chain rule shared by the cost model (a chained layer loses the input channels its
    producer loses) and the size breakdown (those input rows are not stored)."""
    c = prev.out_channels
    if len(cur.in_shape) > 1:
        return cur.in_shape[-1] == c
    return cur.in_shape[0] == c or (len(prev.out_shape) > 1 and cur.in_shape[0] % c == 0)


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
    (shared weights) is listed once, at its first call.
    """
    model = module_or_apply if isinstance(module_or_apply, Model) else Model(module_or_apply)
    if params is None:
        params = model.initial_params()
    seen: dict[tuple, tuple[tuple[int, ...], tuple[int, ...]]] = {}

    def around(path, call, x):
        y = call(x)
        seen.setdefault(path, (tuple(x.shape), tuple(y.shape)))
        return y

    jax.eval_shape(lambda p, x: model.apply(p, x, around), params, sample_input)
    if not seen:
        raise UserError("no Dense or Conv layer found in the model: nothing to compress")
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
            has_bias=has_bias, macs=math.prod(out_shape[1:-1]) * math.prod(kshape),
            params=math.prod(kshape) + nbias,
        ))
    return tuple(layers)
