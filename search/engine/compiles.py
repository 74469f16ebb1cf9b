"""Count XLA compiles, so tests and benchmarks can prove that new plans never recompile.

jax reports every backend compile as a duration event; a listener counts them while a
`count_compiles()` block is open.
"""
from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field
from typing import Iterator

import jax

BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


@dataclass
class CompileCount:
    """Compiles seen inside one `count_compiles()` block."""

    count: int = 0  # number of XLA backend compiles
    seconds: float = 0.0  # total time spent compiling
    durations: list[float] = field(default_factory=list)  # one entry per compile


_lock = threading.Lock()
_active: list[CompileCount] = []
_registered = False


def _listener(event: str, duration_secs: float, **kwargs) -> None:
    if event != BACKEND_COMPILE_EVENT:
        return
    with _lock:
        for c in _active:
            c.count += 1
            c.seconds += duration_secs
            c.durations.append(duration_secs)


def _ensure_registered() -> None:
    global _registered
    with _lock:
        if not _registered:
            jax.monitoring.register_event_duration_secs_listener(_listener)
            _registered = True


@contextlib.contextmanager
def count_compiles() -> Iterator[CompileCount]:
    """Yield a CompileCount that grows with every XLA compile until the block exits."""
    _ensure_registered()
    c = CompileCount()
    with _lock:
        _active.append(c)
    try:
        yield c
    finally:
        with _lock:
            _active.remove(c)
