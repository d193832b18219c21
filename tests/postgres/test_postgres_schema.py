"""The schema ships as versioned migrations; code on a schema of another version refuses."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator

import psycopg
import pytest
from pg_support import drop_schema, new_schema, with_schema

from worq_core import Worq
from worq_core.models import Message
from worq_postgres import PostgresBroker, PostgresStorage, SchemaError, latest_version, migrate
from worq_postgres import migrations as migrations_module


@pytest.fixture
def bare_url(pg_base_url: str) -> Iterator[str]:
    """A URL on a schema nobody migrated (dropped afterwards, whatever the test made)."""
    schema = new_schema()
    yield with_schema(pg_base_url, schema)
    drop_schema(pg_base_url, schema)


def worq_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "worq_core", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_worq_postgres_migrate_applies_the_shipped_versions_once(bare_url: str) -> None:
    first = worq_cli("postgres", "migrate", bare_url)
    assert first.returncode == 0, first.stderr
    every = ", ".join(str(v) for v in range(1, latest_version() + 1))
    assert f"applied version(s) {every}; now at {latest_version()}" in first.stdout
    again = worq_cli("postgres", "migrate", bare_url)
    assert again.returncode == 0, again.stderr
    assert "already at version" in again.stdout
    assert migrate(bare_url) == []
    shown = worq_cli("postgres", "version", bare_url)
    assert f"version {latest_version()}; needed {latest_version()}" in shown.stdout


def test_a_broker_on_an_unmigrated_schema_refuses_with_the_command_to_run(bare_url: str) -> None:
    broker = PostgresBroker(bare_url)
    try:
        with pytest.raises(SchemaError, match="worq postgres migrate") as caught:
            broker.stats(["q"])
        assert (caught.value.found, caught.value.needed) == (0, latest_version())
        with pytest.raises(SchemaError):
            broker.verify()
    finally:
        broker.close()
    storage = PostgresStorage(bare_url)
    try:
        with pytest.raises(SchemaError):
            storage.load("some-job")
    finally:
        storage.close()


@contextlib.contextmanager
def one_more_migration(sql: str = "SELECT 1;") -> Iterator[int]:
    """As if a later release shipped one more migration (in this process only); its version.

    The schema ships as a single migration until a release changes it, so the tests of an
    outdated schema and of an upgrade add the next one themselves.
    """
    shipped = migrations_module.migrations()
    later = migrations_module.Migration(shipped[-1].version + 1, "later", sql)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(migrations_module, "migrations", lambda: [*shipped, later])
        yield later.version


def test_a_worker_on_an_outdated_schema_refuses_to_start(bare_url: str) -> None:
    migrate(bare_url)
    with one_more_migration() as needed:
        app = Worq(bare_url)
        try:
            with pytest.raises(
                SchemaError,
                match=f"version {needed - 1}; this worq-postgres needs version {needed}",
            ):
                app.worker(queues=["default"]).run(burst=True)
        finally:
            app.close()


def test_a_schema_one_version_behind_is_refused_until_it_is_upgraded_in_place(
    bare_url: str,
) -> None:
    shipped = migrate(bare_url)
    assert shipped == list(range(1, latest_version() + 1))
    broker = PostgresBroker(bare_url)
    try:
        broker.enqueue([Message("kept-across-the-upgrade", "q", b"body")])
    finally:
        broker.close()
    with one_more_migration("CREATE TABLE worq_upgrade_probe (id integer);") as later:
        broker = PostgresBroker(bare_url)
        try:
            with pytest.raises(SchemaError, match=f"is at worq schema version {later - 1}"):
                broker.verify()
        finally:
            broker.close()
        assert migrate(bare_url) == [later], "only the new version is applied"
        broker = PostgresBroker(bare_url)
        try:
            broker.verify()
            [delivery] = broker.fetch(["q"], 1, lease=30, wait=0)
            assert delivery.id == "kept-across-the-upgrade", "an upgrade keeps the jobs"
        finally:
            broker.close()


def test_a_worker_started_from_the_cli_on_an_unmigrated_schema_says_what_to_do(
    bare_url: str,
) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "worq_core", "--broker", bare_url, "worker", "pg_app:app"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=__file__.rpartition("/")[0],
    )
    assert result.returncode != 0
    assert "worq postgres migrate" in result.stderr


def test_a_schema_newer_than_the_code_is_refused_too(bare_url: str) -> None:
    migrate(bare_url)
    schema = bare_url.rpartition("schema=")[2]
    with psycopg.connect(bare_url.split("?")[0], autocommit=True) as conn:
        conn.execute(
            f'INSERT INTO "{schema}".worq_schema_version (version, name) VALUES (%s, %s)',
            (latest_version() + 1, "from_the_future"),
        )
    broker = PostgresBroker(bare_url)
    try:
        with pytest.raises(SchemaError, match="upgrade worq-postgres"):
            broker.verify()
    finally:
        broker.close()
    with pytest.raises(SchemaError):
        migrate(bare_url)


def test_a_bad_schema_name_in_the_url_is_a_clear_error() -> None:
    from worq_postgres import PostgresError

    with pytest.raises(PostgresError, match="bad schema"):
        PostgresBroker("postgresql://127.0.0.1/db?schema=Robert');DROP")
