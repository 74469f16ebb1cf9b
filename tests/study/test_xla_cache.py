"""The persistent XLA compilation cache: a search process (and every worker) reads and writes
its compiled programs under RESULTS_DIR/cache/xla unless the user chose a cache directory."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from jax.experimental.compilation_cache import compilation_cache

from search.study import xla_cache
from tests.support import results_dir, start_search


@pytest.fixture
def clean_jax(monkeypatch):
    """jax's cache settings and this module's memory as before the test, whatever it sets."""
    saved = (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs)
    monkeypatch.delenv(xla_cache.ENV_DIR, raising=False)
    monkeypatch.delenv(xla_cache.ENV_MIN_COMPILE_TIME, raising=False)
    jax.config.update("jax_compilation_cache_dir", None)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", xla_cache.JAX_DEFAULT_MIN_COMPILE_TIME)
    monkeypatch.setattr(xla_cache, "_chosen", None)
    compilation_cache.reset_cache()
    yield
    jax.config.update("jax_compilation_cache_dir", saved[0])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", saved[1])
    compilation_cache.reset_cache()


def _entries(path):
    return [p for p in path.rglob("*") if p.is_file()] if path.exists() else []


def test_the_cache_goes_in_the_results_dir_and_keeps_small_programs(clean_jax, tmp_path):
    path = xla_cache.use_compilation_cache(tmp_path / "results")
    assert path == (tmp_path / "results" / "cache" / "xla").resolve()
    assert jax.config.jax_compilation_cache_dir == str(path)
    assert jax.config.jax_persistent_cache_min_compile_time_secs == 0.0  # ours compile in < 1 s
    jax.jit(lambda x: x * 3.0 + 1.0)(jnp.arange(7.0)).block_until_ready()  # a tiny new program
    assert _entries(path), "the compiled program was not written to the cache"
    # another results directory: the process switches to that one's cache
    other = xla_cache.use_compilation_cache(tmp_path / "other")
    assert jax.config.jax_compilation_cache_dir == str(other) != str(path)
    jax.jit(lambda x: x * 5.0 - 2.0)(jnp.arange(5.0)).block_until_ready()
    assert _entries(other)


def test_a_cache_dir_the_user_chose_is_kept_with_their_settings(clean_jax, tmp_path):
    mine = str(tmp_path / "mine")
    jax.config.update("jax_compilation_cache_dir", mine)  # as JAX_COMPILATION_CACHE_DIR does at import
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 2.0)
    assert str(xla_cache.use_compilation_cache(tmp_path / "results")) == mine
    assert jax.config.jax_compilation_cache_dir == mine
    assert jax.config.jax_persistent_cache_min_compile_time_secs == 2.0
    assert not (tmp_path / "results").exists()


def test_a_min_compile_time_from_the_environment_is_respected(clean_jax, tmp_path, monkeypatch):
    monkeypatch.setenv(xla_cache.ENV_MIN_COMPILE_TIME, "1.0")
    xla_cache.use_compilation_cache(tmp_path / "results")
    assert jax.config.jax_persistent_cache_min_compile_time_secs == 1.0
    assert xla_cache.worker_env(tmp_path / "results") == {
        xla_cache.ENV_DIR: str((tmp_path / "results" / "cache" / "xla").resolve())}


def test_workers_get_the_same_cache_unless_the_user_set_one(clean_jax, tmp_path, monkeypatch):
    env = xla_cache.worker_env(tmp_path)
    assert env == {xla_cache.ENV_DIR: str((tmp_path / "cache" / "xla").resolve()), xla_cache.ENV_MIN_COMPILE_TIME: "0"}
    monkeypatch.setenv(xla_cache.ENV_DIR, "/somewhere")
    assert xla_cache.worker_env(tmp_path) == {}


def test_hwcompress_search_compiles_into_the_results_dir(clean_jax, tmp_path):
    results = results_dir(tmp_path)
    assert start_search(results, "c", 1) == 0
    assert jax.config.jax_compilation_cache_dir == str((results / "cache" / "xla").resolve())
    assert _entries(results / "cache" / "xla")
