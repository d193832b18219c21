"""Job records in a PostgreSQL table, with a TTL, and waits woken by LISTEN/NOTIFY."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Self

from typing_extensions import override

if TYPE_CHECKING:
    import psycopg
    from psycopg_pool import ConnectionPool

from worq_core import Storage
from worq_postgres.connection import (
    SAFETY_TIMEOUT,
    LazyPool,
    Listener,
    Target,
    parse_url,
)


class PostgresStorage(Storage):
    """Records in ``worq_results`` of the URL's schema; expired rows are never returned.

    A PostgreSQL broker on the same database and schema writes records itself, in the
    transaction that settles the job (:attr:`~worq_core.Capability.RESULTS`). Expired rows
    are deleted in small batches as records are saved. :meth:`wait` listens on the schema's
    ``worq_<schema>_results`` channel, so ``Job.result()`` wakes without polling.
    """

    name: ClassVar[str] = "postgres"
    schemes: ClassVar[tuple[str, ...]] = ("postgresql", "postgres")

    def __init__(self, url: str, *, pool_size: int = 4) -> None:
        self.url = url
        self.target: Target = parse_url(url)
        self._pool = LazyPool(self.target, self.url, pool_size, "worq-storage", storage=True)
        self._listener = Listener(self.target, self.target.channel + "_results")
        self._saves = 0

    @override
    @classmethod
    def from_url(cls, url: str) -> Self:
        return cls(url)

    def pool(self) -> ConnectionPool:
        """The connection pool, opened (and the schema version checked) on first use."""
        return self._pool.get()

    def _connection(self, what: str) -> contextlib.AbstractContextManager[psycopg.Connection[Any]]:
        """A pooled connection; after a connection error the pool drops its broken ones."""
        return self._pool.connection(what)

    @override
    def save(self, records: Mapping[str, bytes], ttl: float) -> None:
        if not records:
            return
        q = self.target.q
        with self._connection("save records") as conn:
            conn.execute(
                f"SELECT {q('worq_save')}(%s, %s, %s, %s)",
                (self.target.channel, list(records), list(records.values()), float(ttl)),
            )
            self._saves += 1
            if self._saves % 100 == 0:
                self._sweep(conn)

    def _sweep(self, conn: Any) -> None:
        """Delete expired records in batches, piggy-backed on saves.

        Batches go until one comes back short, so the sweep keeps up with however many
        records the saves since the last one wrote (a save may hold many); at most 50.
        """
        q = self.target.q
        for _ in range(50):
            gone = conn.execute(
                f"DELETE FROM {q('worq_results')} WHERE id IN (SELECT id FROM "
                f"{q('worq_results')} WHERE expires <= {q('worq_now')}() LIMIT 1000)"
            ).rowcount
            if gone < 1000:
                break

    @override
    def load(self, job_id: str) -> bytes | None:
        q = self.target.q
        with self._connection("load a record") as conn:
            row = conn.execute(
                f"SELECT data FROM {q('worq_results')} "
                f"WHERE id = %s AND expires > {q('worq_now')}()",
                (job_id,),
            ).fetchone()
        return None if row is None else bytes(row[0])

    @override
    def wait(self, job_id: str, timeout: float | None) -> bytes | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        self._listener.start()
        while True:
            seen = self._listener.version((job_id,))
            data = self.load(job_id)
            if data is not None:
                return data
            left = SAFETY_TIMEOUT if deadline is None else deadline - time.monotonic()
            if left <= 0:
                return None
            self._listener.wait((job_id,), seen, min(left, SAFETY_TIMEOUT))

    @override
    def delete(self, job_ids: Sequence[str]) -> None:
        if not job_ids:
            return
        q = self.target.q
        with self._connection("delete records") as conn:
            conn.execute(f"DELETE FROM {q('worq_results')} WHERE id = ANY(%s)", (list(job_ids),))

    @override
    def close(self) -> None:
        self._listener.close()
        self._pool.close()
