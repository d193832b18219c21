"""``worq postgres ...``: schema administration, added to the worq CLI by the plugin."""

from __future__ import annotations

import click

from worq_core.errors import WorqError
from worq_postgres.connection import parse_url, translated
from worq_postgres.migrations import current_version, latest_version, migrate


@click.group("postgres")
def postgres() -> None:
    """PostgreSQL broker administration (worq-postgres)."""


@postgres.command("migrate")
@click.argument("url", metavar="URL")
def migrate_command(url: str) -> None:
    """Create or upgrade worq's tables at URL (postgresql://...[?schema=NAME]).

    Safe to run again, and from several processes at once.
    """
    try:
        applied = migrate(url)
    except WorqError as exc:
        raise click.ClickException(str(exc)) from exc
    target = parse_url(url)
    if applied:
        click.echo(
            f"schema {target.schema!r}: applied version(s) {', '.join(map(str, applied))}; "
            f"now at {latest_version()}"
        )
    else:
        click.echo(f"schema {target.schema!r}: already at version {latest_version()}")


@postgres.command("version")
@click.argument("url", metavar="URL")
def version_command(url: str) -> None:
    """Show the schema version at URL and the one this worq-postgres needs."""
    import psycopg

    target = parse_url(url)
    try:
        with translated(url, "read the schema version"), psycopg.connect(target.conninfo) as conn:
            found = current_version(conn, target)
    except WorqError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"schema {target.schema!r}: version {found}; needed {latest_version()}")
