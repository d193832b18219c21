"""Fixtures for the PostgreSQL tests: a migrated schema of this run's own.

Without a reachable server the tests are skipped locally and fail under ``CI``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

try:
    import psycopg
    from pg_support import BASE_URL, drop_schema, ensure_database, new_schema, with_schema

    from worq_postgres import migrate
except ImportError:  # an editable set-up without worq-postgres (nox always installs it)
    if os.environ.get("CI"):
        raise
    collect_ignore_glob = ["*.py"]


@pytest.fixture(scope="session")
def pg_base_url() -> str:
    """The server's URL; skips (or fails under CI) when it does not answer."""
    try:
        ensure_database(BASE_URL)
        with psycopg.connect(BASE_URL, connect_timeout=2) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as exc:
        message = f"no PostgreSQL at {BASE_URL} ({exc}); set WORQ_TEST_POSTGRES_URL"
        if os.environ.get("CI"):
            pytest.fail(message + " - under CI a missing PostgreSQL is an error")
        pytest.skip(message)
    return BASE_URL


@pytest.fixture(scope="class")
def pg_url(pg_base_url: str) -> Iterator[str]:
    """A broker URL on a schema migrated for this test class alone, dropped afterwards.

    Contract cases use queues of their own, but a few fix job ids, so two classes running
    the same case must not share a schema.
    """
    schema = new_schema()
    url = with_schema(pg_base_url, schema)
    migrate(url)
    yield url
    drop_schema(pg_base_url, schema)
