"""PostgreSQL for the tests: one schema per test run, so two runs at once never meet.

The server comes from ``WORQ_TEST_POSTGRES_URL`` (default
``postgresql://postgres@127.0.0.1:5432/worq_pg_test``). A run migrates a fresh schema
``worq_t_<random>`` and drops it (and only it) at the end.
"""

from __future__ import annotations

import contextlib
import os
import uuid

import psycopg
import psycopg.conninfo
import psycopg.sql

BASE_URL = os.environ.get(
    "WORQ_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/worq_pg_test"
)


def ensure_database(base: str) -> None:
    """Create the database ``base`` names when the server lacks it (a fresh machine has none).

    Only ``CREATE DATABASE``, through the server's ``postgres`` database; nothing is dropped.
    """
    info = psycopg.conninfo.conninfo_to_dict(base.split("?")[0])
    name = str(info.get("dbname") or "")
    try:
        with psycopg.connect(base.split("?")[0], connect_timeout=2):
            return
    except psycopg.OperationalError as exc:
        if not name or "does not exist" not in str(exc):
            raise
    maintenance = psycopg.conninfo.make_conninfo(base.split("?")[0], dbname="postgres")
    # Another run may create it first.
    with (
        psycopg.connect(maintenance, autocommit=True, connect_timeout=2) as conn,
        contextlib.suppress(psycopg.errors.DuplicateDatabase),
    ):
        conn.execute(psycopg.sql.SQL("CREATE DATABASE {}").format(psycopg.sql.Identifier(name)))


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
