"""The user's own model from a reference: `path/to/file.py:build` or `package.module:build`.

`build()` takes no arguments and returns a `models.Task` (module, data set, loss, metric; its
baseline is then trained and cached like a zoo model's), or `(task, variables)` with the
model's trained Flax variables (`module.init`'s dict, or the bare params). The reference is
what a study records, so workers, `report` and `export` rebuild the same task by calling
`build()` again.
"""
from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

import jax
import numpy as np

from models.errors import ModelError
from models.task import Task

EXPECTED = "expected path/to/file.py:function or package.module:function"


def is_reference(model: str) -> bool:
    """Whether `model` names the user's own builder rather than a zoo model."""
    return ":" in str(model)


def normalise(ref: str) -> str:
    """The reference as a study records it: a file path made absolute (workers started from
    another directory find the same file), a module reference unchanged."""
    target, sep, func = str(ref).rpartition(":")
    if not sep or not target or not func:
        raise ModelError(f"--model {ref}: {EXPECTED}")
    if _is_file(target):
        target = str(Path(target).expanduser().resolve())
    return f"{target}:{func}"


def load_reference(ref: str) -> tuple[Task, Any]:
    """(task, variables or None) from calling the builder `ref` names (once per process and
    file version). Raises ModelError, one line, naming what was wrong and what was expected."""
    ref = normalise(ref)
    target = ref.rpartition(":")[0]
    stamp = os.stat(target).st_mtime_ns if _is_file(target) and os.path.exists(target) else 0
    return _load(ref, stamp)


@functools.lru_cache(maxsize=8)
def _load(ref: str, stamp: int) -> tuple[Task, Any]:
    target, _, func = ref.rpartition(":")
    module = _import(ref, target)
    fn = getattr(module, func, None)
    if not callable(fn):
        have = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_")
                      and getattr(v, "__module__", None) == module.__name__)
        raise ModelError(f"--model {ref}: {target} has no function {func!r}"
                         + (f" (it defines {', '.join(have[:8])})" if have else ""))
    try:
        out = fn()
    except Exception as e:  # the user's code: say where it failed, in one line
        msg = str(e).splitlines()[0] if str(e) else ""
        raise ModelError(f"--model {ref}: {func}() raised {type(e).__name__}: {msg}"[:400]) from None
    task, variables = out if isinstance(out, tuple) and len(out) == 2 else (out, None)
    if not isinstance(task, Task):
        raise ModelError(f"--model {ref}: {func}() returned {type(out).__name__}: expected a models.Task, "
                         "or (models.Task, its trained variables)")
    return task, variables


def _is_file(target: str) -> bool:
    return target.endswith(".py") or "/" in target or os.sep in target


def _import(ref: str, target: str):
    try:
        if _is_file(target):
            path = Path(target)
            if not path.is_file():
                raise ModelError(f"--model {ref}: no such file {target}")
            name = "hwcompress_user_" + hashlib.sha256(str(path).encode()).hexdigest()[:12]
            spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module  # dataclasses and pickling look their module up here
            spec.loader.exec_module(module)
            return module
        return importlib.import_module(target)
    except ModelError:
        raise
    except Exception as e:  # a syntax error, a missing import in the user's file...
        msg = str(e).splitlines()[0] if str(e) else ""
        raise ModelError(f"--model {ref}: cannot import {target}: {type(e).__name__}: {msg}"[:400]) from None


def variables_digest(variables: Any) -> str:
    """A short SHA-256 of the variables' names, shapes and values (the baseline's identity)."""
    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]:
        a = np.ascontiguousarray(np.asarray(leaf))
        h.update(jax.tree_util.keystr(path).encode() + str(a.shape).encode() + str(a.dtype).encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]
