"""URLs, connection pools and the LISTEN thread shared by the broker and the storage."""

from __future__ import annotations

import contextlib
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

if TYPE_CHECKING:  # psycopg is imported on first use: `worq plugins` and workers start fast
    import psycopg
    from psycopg_pool import ConnectionPool

from worq_core.broker import redact_url
from worq_core.errors import (
    BrokerConnectionError,
    BrokerError,
    StorageConnectionError,
    StorageError,
)

logger = logging.getLogger("worq.postgres")

SCHEMES = ("postgresql", "postgres")
DEFAULT_SCHEMA = "worq"
_SCHEMA = re.compile(r"^[a-z_][a-z0-9_]{0,39}$")
T = TypeVar("T")

#: Query parameters of a URL that are worq's settings (``schema`` aside), not libpq's.
OPTIONS = ("dead_max_count", "dead_max_age")

#: Longest an idle fetch or wait sleeps between two looks, even with nothing announced: a
#: safety net for a notification lost with a dropped connection, never the wake-up path.
SAFETY_TIMEOUT = 5.0


class PostgresError(BrokerError, StorageError):
    """PostgreSQL refused or failed an operation of the worq broker or storage."""


class SchemaError(PostgresError):
    """The worq schema in the database is missing or older (or newer) than this code needs.

    Raised before any job is touched: run ``worq postgres migrate URL`` (or
    :func:`worq_postgres.migrate`) with the same URL, then start again.
    """

    def __init__(self, url: str, schema: str, found: int, needed: int) -> None:
        url = redact_url(url)
        self.url = url
        self.schema = schema
        self.found = found
        self.needed = needed
        what = "has no worq tables" if found == 0 else f"is at worq schema version {found}"
        advice = (
            f"run `worq postgres migrate {url}`"
            if found < needed
            else "upgrade worq-postgres: the database was migrated by a newer version"
        )
        super().__init__(
            f"schema {schema!r} of {url} {what}; this worq-postgres needs version {needed}: "
            f"{advice}"
        )


@dataclass(frozen=True, slots=True)
class Target:
    """Where a URL points: libpq connection info, and the schema worq's tables live in."""

    url: str
    conninfo: str
    schema: str
    options: tuple[tuple[str, str], ...] = ()
    """worq's settings given in the URL (names from :data:`OPTIONS`), as written."""

    @property
    def channel(self) -> str:
        """The NOTIFY channel of job wake-ups (``_results`` appended: records saved)."""
        return f"worq_{self.schema}"

    def q(self, name: str) -> str:
        """``name`` qualified with the schema (already checked to be a plain identifier)."""
        return f'"{self.schema}".{name}'


def parse_url(url: str) -> Target:
    """Split ``?schema=`` off a ``postgresql://`` URL; every other part goes to libpq."""
    parts = urlsplit(url)
    if parts.scheme not in SCHEMES:
        raise PostgresError(f"not a PostgreSQL URL: {url!r} (use postgresql:// or postgres://)")
    query = parse_qsl(parts.query, keep_blank_values=True)
    schema = DEFAULT_SCHEMA
    rest = []
    options = []
    for key, value in query:
        if key == "schema":
            schema = value
        elif key in OPTIONS:
            options.append((key, value))
        else:
            rest.append((key, value))
    if not _SCHEMA.match(schema):
        raise PostgresError(
            f"bad schema {schema!r} in {url!r}: lowercase letters, digits and _, up to 40"
        )
    conninfo = urlunsplit(("postgresql", parts.netloc, parts.path, urlencode(rest), ""))
    return Target(url, conninfo, schema, tuple(options))


def setting(
    target: Target, name: str, given: T | None, convert: Callable[[str], T], default: T
) -> T:
    """A setting: the keyword ``given`` if not ``None``, else the URL's, else ``default``."""
    if given is not None:
        return given
    found = dict(target.options).get(name)
    if found is None:
        return default
    try:
        return convert(found)
    except ValueError:
        raise PostgresError(
            f"bad {name}={found!r} in {redact_url(target.url)}: not a {convert.__name__}"
        ) from None


def make_pool(target: Target, max_size: int, name: str) -> ConnectionPool:
    """A pool of autocommit connections; opened (and connected) on first use."""
    from psycopg_pool import ConnectionPool

    return ConnectionPool(
        target.conninfo,
        min_size=1,
        max_size=max_size,
        kwargs={"autocommit": True, "prepare_threshold": 0},
        open=False,
        name=name,
        timeout=30.0,
        reconnect_timeout=60.0,
    )


class LazyPool:
    """A connection pool opened, and the schema version checked, on first use.

    Shared by the broker and the storage; errors come out as theirs (``storage``). After a
    connection error the pool checks its idle connections, since a server restart leaves
    every one of them dead.
    """

    def __init__(
        self, target: Target, url: str, max_size: int, name: str, *, storage: bool = False
    ) -> None:
        self.target, self.url, self.storage = target, url, storage
        self._pool = make_pool(target, max_size, name)
        self._opened = False
        self._lock = threading.Lock()

    def get(self) -> ConnectionPool:
        """The pool, opened (and the schema version checked) on first use."""
        if not self._opened:
            with self._lock:
                if not self._opened:
                    from worq_postgres.migrations import check_version

                    with translated(self.url, "connect", storage=self.storage):
                        self._pool.open(wait=True, timeout=30.0)
                        with self._pool.connection() as conn:
                            check_version(conn, self.target)
                    self._opened = True
        return self._pool

    @contextlib.contextmanager
    def connection(self, what: str) -> Iterator[psycopg.Connection[Any]]:
        """A pooled connection, errors translated; ``what`` names the call in them."""
        try:
            with translated(self.url, what, storage=self.storage), self.get().connection() as conn:
                yield conn
        except (BrokerConnectionError, StorageConnectionError):
            if self._opened:
                with contextlib.suppress(Exception):
                    self._pool.check()
            raise

    def close(self) -> None:
        """Close the pool's connections."""
        self._pool.close()


@contextlib.contextmanager
def translated(url: str, what: str, *, storage: bool = False) -> Iterator[None]:
    """Turn psycopg and pool errors into worq's: connection problems and everything else."""
    import psycopg
    from psycopg_pool import PoolTimeout

    shown = redact_url(url)  # never a password in a message or a log line
    try:
        yield
    except PostgresError:
        raise
    except (psycopg.OperationalError, PoolTimeout) as exc:
        if storage:
            raise StorageConnectionError(shown, f"{what}: {exc}") from exc
        raise BrokerConnectionError(shown, f"{what}: {exc}") from exc
    except psycopg.Error as exc:
        raise PostgresError(f"PostgreSQL failed to {what} ({shown}): {exc}") from exc


class Listener:
    """One connection that LISTENs on a channel and wakes the threads waiting on it.

    Each notification's payload (a queue name, or a job id) bumps a version per payload and
    a global one; a waiter reads :meth:`version` before looking at the database, then
    :meth:`wait` returns as soon as it changes, so nothing announced in between is missed. A
    lost connection is re-established in the background; every reconnection wakes all
    waiters (a notification may have been missed while it was down).
    """

    def __init__(self, target: Target, channel: str) -> None:
        self.target = target
        self.channel = channel
        self._cond = threading.Condition()
        self._versions: dict[str, int] = {}
        self._epoch = 0
        self._listening = False
        self._closed = False
        self._thread: threading.Thread | None = None
        self._conn: psycopg.Connection[Any] | None = None

    def start(self, timeout: float = 10.0) -> None:
        """Start listening (once); returns when LISTEN is in place, or after ``timeout``."""
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name=f"worq-listen-{self.channel}", daemon=True
                )
                self._thread.start()
            deadline = time.monotonic() + timeout
            while not self._listening and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)

    def version(self, keys: list[str] | tuple[str, ...]) -> tuple[int, ...]:
        """A snapshot to hand to :meth:`wait`."""
        with self._cond:
            return (self._epoch, *(self._versions.get(k, 0) for k in keys))

    def wait(
        self, keys: list[str] | tuple[str, ...], seen: tuple[int, ...], timeout: float
    ) -> bool:
        """Block until a notification for one of ``keys`` came after ``seen``, or ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                if (self._epoch, *(self._versions.get(k, 0) for k in keys)) != seen:
                    return True
                left = deadline - time.monotonic()
                if left <= 0 or self._closed:
                    return False
                self._cond.wait(left)

    def close(self) -> None:
        """Stop listening; the thread ends within its poll interval."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        conn = self._conn
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.cancel_safe(timeout=1.0)

    def _run(self) -> None:
        import psycopg

        backoff = 0.05
        while not self._closed:
            try:
                with psycopg.connect(self.target.conninfo, autocommit=True) as conn:
                    self._conn = conn
                    conn.execute(f'LISTEN "{self.channel}"')
                    with self._cond:
                        self._listening = True
                        self._epoch += 1  # anything may have happened while we were away
                        self._cond.notify_all()
                    backoff = 0.05
                    self._pump(conn)
            except Exception as exc:  # noqa: BLE001 - reconnect whatever broke
                if self._stopped():
                    break
                logger.warning(
                    "LISTEN %s lost its connection (%s); reconnecting", self.channel, exc
                )
            finally:
                self._conn = None
                with self._cond:
                    self._listening = False
            with self._cond:  # back off before reconnecting; close() cuts it short
                if not self._closed:
                    self._cond.wait(backoff)
            backoff = min(backoff * 2, 2.0)

    def _stopped(self) -> bool:
        return self._closed

    def _pump(self, conn: psycopg.Connection[Any]) -> None:
        while not self._closed:
            # The generator ends after its timeout, so a closed listener stops within a second.
            for note in conn.notifies(timeout=1.0):
                with self._cond:
                    key = note.payload
                    self._versions[key] = self._versions.get(key, 0) + 1
                    if len(self._versions) > 100_000:  # many one-off job ids: start afresh
                        self._versions.clear()
                        self._epoch += 1
                    self._cond.notify_all()
                if self._stopped():
                    return
