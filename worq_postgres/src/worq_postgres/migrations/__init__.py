"""worq-postgres' schema: versioned SQL files applied in order by :func:`migrate`.

A file ``NNNN_name.sql`` holds version ``NNNN``. Each runs in one transaction with
``search_path`` set to the target schema, and its version is recorded in the same
transaction, so a failed migration leaves the schema as it was.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import psycopg

from worq_postgres.connection import SchemaError, Target, parse_url, translated

_FILE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
_LOCK_KEY = 0x776F7271  # "worq": one migrator at a time per database


@dataclass(frozen=True, slots=True)
class Migration:
    """One SQL file of the schema."""

    version: int
    name: str
    sql: str


def migrations() -> list[Migration]:
    """Every migration shipped with this package, oldest first."""
    found = []
    for entry in resources.files(__name__).iterdir():
        match = _FILE.match(entry.name)
        if match:
            found.append(Migration(int(match[1]), match[2], entry.read_text(encoding="utf-8")))
    return sorted(found, key=lambda m: m.version)


def latest_version() -> int:
    """The schema version this code needs."""
    return migrations()[-1].version


def current_version(conn: psycopg.Connection[Any], target: Target) -> int:
    """The schema version in the database; 0 when worq was never migrated there."""
    row = conn.execute(
        "SELECT to_regclass(%s) IS NOT NULL", (target.q("worq_schema_version"),)
    ).fetchone()
    if row is None or not row[0]:
        return 0
    row = conn.execute(f"SELECT max(version) FROM {target.q('worq_schema_version')}").fetchone()
    return int(row[0]) if row is not None and row[0] is not None else 0


def check_version(conn: psycopg.Connection[Any], target: Target) -> None:
    """Raise :class:`SchemaError` unless the schema is at exactly :func:`latest_version`."""
    found, needed = current_version(conn, target), latest_version()
    if found != needed:
        raise SchemaError(target.url, target.schema, found, needed)


def migrate(url: str, *, to: int | None = None) -> list[int]:
    """Bring the schema of ``url`` (``?schema=``, default ``worq``) up to date (or to ``to``).

    Safe to run from several processes at once (an advisory lock serialises them) and again
    and again (applied versions are skipped). Returns the versions it applied.
    """
    import psycopg

    target = parse_url(url)
    applied = []
    with translated(url, "migrate the schema"), psycopg.connect(target.conninfo) as conn:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
            conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{target.schema}"')
            conn.execute(
                f"CREATE TABLE IF NOT EXISTS {target.q('worq_schema_version')} ("
                "version integer PRIMARY KEY, name text NOT NULL, "
                "applied_at timestamptz NOT NULL DEFAULT now())"
            )
        found = current_version(conn, target)
        if found > latest_version():
            raise SchemaError(url, target.schema, found, latest_version())
        for migration in migrations():
            if migration.version <= found or (to is not None and migration.version > to):
                continue
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
                if current_version(conn, target) >= migration.version:
                    continue  # another migrator got here first
                conn.execute(f'SET LOCAL search_path TO "{target.schema}"')
                conn.execute(migration.sql.encode())
                conn.execute(
                    "INSERT INTO worq_schema_version (version, name) VALUES (%s, %s)",
                    (migration.version, migration.name),
                )
            applied.append(migration.version)
    return applied
