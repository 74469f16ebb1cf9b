"""Shared fixtures of the tests. `pg_url`: the PostgreSQL the multi-worker tests run against: HWCOMPRESS_TEST_POSTGRES (set by
.ci/services.sh). Each test gets a fresh database on that server, dropped afterwards.

Without the URL a plain `make test` skips these tests and says why; in CI (CI set) a missing
URL is a failure, because there the PostgreSQL tests must run.

`make test` runs the suite in pytest-xdist workers (one per core, at most 4, a file per worker at
a time); the starting process makes the one baseline and XLA cache they share."""
from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from urllib.parse import urlsplit

import pytest

CACHE_ENV = "HWCOMPRESS_TEST_CACHE"  # tests.support.CACHE_ENV (that module imports jax; this one must not)


def pytest_configure(config):
    """The process that starts the session (plain pytest, or pytest-xdist's controller) makes the
    baseline and XLA cache its workers share (tests.support.shared_cache, CACHE_ENV), and names its
    xla/ folder as jax's persistent compilation cache for every process of the session (read by
    jax at import, so set before any test module imports it): a program one test compiled, another
    test, worker or `hwcompress` child process loads instead of compiling it again, as
    RESULTS_DIR/cache/xla does for a user's searches (search.study.xla_cache). The tests of that
    module reset jax's cache settings for themselves."""
    if not os.environ.get("PYTEST_XDIST_WORKER") and not os.environ.get(CACHE_ENV):
        config._hwcompress_cache = tempfile.mkdtemp(prefix="hwcompress-test-cache-")
        os.environ[CACHE_ENV] = config._hwcompress_cache
        os.environ["JAX_COMPILATION_CACHE_DIR"] = os.path.join(config._hwcompress_cache, "xla")
        os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"


def pytest_unconfigure(config):
    made = getattr(config, "_hwcompress_cache", None)
    if made:
        for name in (CACHE_ENV, "JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"):
            os.environ.pop(name, None)
        shutil.rmtree(made, ignore_errors=True)


def _ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _admin(url: str):
    import psycopg  # psycopg 3, the `postgres` extra's driver

    parts = urlsplit(url)
    return psycopg.connect(
        host=parts.hostname or "localhost", port=parts.port or 5432, user=parts.username,
        password=parts.password, dbname=parts.path.strip("/") or "postgres", connect_timeout=10,
        autocommit=True,
    )


@pytest.fixture
def pg_url():
    """postgresql://... URL of a new, empty database."""
    url = os.environ.get("HWCOMPRESS_TEST_POSTGRES")
    if not url:
        why = "HWCOMPRESS_TEST_POSTGRES is not set, so there is no PostgreSQL to test against"
        if _ci():
            pytest.fail(f"{why}; in CI .ci/services.sh must start one and export it")
        pytest.skip(f"{why} (run `source .ci/services.sh` to start a local one)")
    name = "hwc_" + uuid.uuid4().hex[:12]
    con = _admin(url)
    try:
        with con.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{name}"')
    finally:
        con.close()
    parts = urlsplit(url)
    yield parts._replace(path="/" + name).geturl()
    con = _admin(url)
    try:
        with con.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        con.close()
