"""worq-postgres: a PostgreSQL broker and result storage, with transactional enqueue."""

from worq_postgres.broker import PostgresBroker
from worq_postgres.connection import PostgresError, SchemaError
from worq_postgres.migrations import latest_version, migrate
from worq_postgres.storage import PostgresStorage

__all__ = [
    "PostgresBroker",
    "PostgresError",
    "PostgresStorage",
    "SchemaError",
    "latest_version",
    "migrate",
]
