"""Shared fixtures of the tests. `pg_url`: the PostgreSQL the multi-worker tests run against: HWCOMPRESS_TEST_POSTGRES (set by
.ci/services.sh). Each test gets a fresh database on that server, dropped afterwards.

Without the URL a plain `make test` skips these tests and says why; in CI (CI set) a missing
URL is a failure, because there the PostgreSQL tests must run."""
from __future__ import annotations

import os
import uuid
from urllib.parse import urlsplit

import pytest


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
