"""worq-postgres' entry point: ``postgresql://`` and ``postgres://`` brokers and storages."""

from __future__ import annotations

from collections.abc import Iterable

import click

from worq_core import Broker, Storage, hookimpl
from worq_postgres.broker import PostgresBroker
from worq_postgres.storage import PostgresStorage


@hookimpl
def worq_register_brokers() -> Iterable[type[Broker]]:
    """The PostgreSQL broker."""
    return [PostgresBroker]


@hookimpl
def worq_register_storages() -> Iterable[type[Storage]]:
    """The PostgreSQL result storage."""
    return [PostgresStorage]


@hookimpl
def worq_register_commands() -> Iterable[click.Command]:
    """``worq postgres migrate URL`` and ``worq postgres version URL``."""
    from worq_postgres.cli import postgres

    return [postgres]
