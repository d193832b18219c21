"""PostgreSQL for the tests: one schema per test run, so two runs at once never meet.

The server comes from ``WORQ_TEST_POSTGRES_URL`` (default
``postgresql://postgres@127.0.0.1:5432/worq_pg_test``). A run migrates a fresh schema
``worq_t_<random>`` and drops it (and only it) at the end.
"""

from __future__ import annotations

import os
import uuid

import psycopg

BASE_URL = os.environ.get(
    "WORQ_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/worq_pg_test"
)


def with_schema(base: str, schema: str) -> str:
    """``base`` with ``?schema=`` set (other query parameters kept)."""
    return f"{base}{'&' if '?' in base else '?'}schema={schema}"


def new_schema() -> str:
    """A schema name no other run uses."""
    return f"worq_t_{uuid.uuid4().hex[:12]}"


def drop_schema(base: str, schema: str) -> None:
    """Drop one test schema, with everything in it."""
    with psycopg.connect(base.split("?")[0], autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
