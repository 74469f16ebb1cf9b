"""jax's persistent compilation cache for searches and workers.

Every search of a model compiles the same few XLA programs (prepare, step, evaluate,
refresh); on a 2-core CPU that was about 4 s of each warm start. With jax's persistent
cache a later process loads them from disk instead. The cache lives in
RESULTS_DIR/cache/xla unless the user chose one (JAX_COMPILATION_CACHE_DIR or
jax.config's jax_compilation_cache_dir): then theirs is used with their settings.
"""
from __future__ import annotations

import os
from pathlib import Path

import jax
from jax.experimental.compilation_cache import compilation_cache

ENV_DIR = "JAX_COMPILATION_CACHE_DIR"
ENV_MIN_COMPILE_TIME = "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"
JAX_DEFAULT_MIN_COMPILE_TIME = 1.0  # jax's default: programs faster to compile are not cached

# the directory this module chose (None: none yet); any other configured one is the user's
_chosen: str | None = None


def cache_dir_in(results_dir: str | os.PathLike) -> Path:
    """Where a results directory keeps its compiled programs: RESULTS_DIR/cache/xla."""
    return Path(results_dir, "cache", "xla").resolve()


def worker_env(results_dir: str | os.PathLike) -> dict[str, str]:
    """Environment variables that give a child process the same cache ({} when the user set one)."""
    if ENV_DIR in os.environ:
        return {}
    env = {ENV_DIR: str(cache_dir_in(results_dir))}
    if ENV_MIN_COMPILE_TIME not in os.environ:
        env[ENV_MIN_COMPILE_TIME] = "0"
    return env


def use_compilation_cache(results_dir: str | os.PathLike) -> Path | None:
    """Make this process read and write compiled XLA programs in RESULTS_DIR/cache/xla, unless
    the user configured a cache directory (kept as it is, with the user's settings). Returns
    the directory in use, None when it cannot be created (then nothing is cached).

    Our programs compile in well under jax's default minimum of 1 s each on a CPU, so with our
    directory the minimum compile time is 0 (unless JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS
    or jax.config set it); jax caches entries of any size by default. Called again with
    another results directory, the process switches to that one's cache.
    """
    global _chosen
    current = jax.config.jax_compilation_cache_dir
    if current and current != _chosen:  # the user's
        return Path(current)
    path = cache_dir_in(results_dir)
    if current == str(path):
        return path
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None  # a read-only results directory: searching still works, only slower
    jax.config.update("jax_compilation_cache_dir", str(path))
    if current is not None:
        compilation_cache.reset_cache()  # the cache opened on the previous directory
    min_time = jax.config.jax_persistent_cache_min_compile_time_secs
    if ENV_MIN_COMPILE_TIME not in os.environ and min_time == JAX_DEFAULT_MIN_COMPILE_TIME:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    _chosen = str(path)
    return path
