"""The PostgreSQL broker: one row per job, leased with ``FOR UPDATE SKIP LOCKED``."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Self

from typing_extensions import override

if TYPE_CHECKING:
    import psycopg
    from psycopg_pool import ConnectionPool

from worq_core import Broker, Capability, JobStatus, Storage
from worq_core.errors import BrokerConnectionError, BrokerError
from worq_core.models import (
    CancelOutcome,
    DeadJob,
    Delivery,
    Event,
    EventKind,
    GroupSpec,
    GroupState,
    JobState,
    LeaseState,
    ListedJob,
    Message,
    Outcome,
    QueueStats,
    Settlement,
    WorkerInfo,
)
from worq_postgres.connection import (
    SAFETY_TIMEOUT,
    LazyPool,
    Listener,
    PostgresError,
    Target,
    logger,
    parse_url,
    setting,
    translated,
)
from worq_postgres.storage import PostgresStorage

_OUTCOMES = {Outcome.ACK: "ack", Outcome.RETRY: "retry", Outcome.DEAD: "dead"}
_LEASES = {"held": LeaseState.HELD, "cancelling": LeaseState.CANCELLING, "lost": LeaseState.LOST}
_SWEEP_EVERY = 100  # settle calls between two sweeps (expired rows, dead jobs past retention)
_SWEEP_BATCH = 1000  # rows one statement of a sweep deletes at most
_SWEEP_BATCHES = 50  # statements per table and sweep at most: bounded work, yet it keeps up
_NO_TOKEN = -1  # a token that no lease holds (a delivery from another broker)


def _token(delivery: Delivery) -> int:
    try:
        return int(delivery.token)
    except ValueError:
        return _NO_TOKEN


class PostgresBroker(Broker):
    """Jobs in the ``worq_jobs`` table of the URL's schema (``?schema=``, default ``worq``).

    Every operation is one call of a PL/pgSQL function from the shipped migrations, in one
    transaction: fetch promotes due delayed jobs and expired leases, then leases the next
    jobs with ``FOR UPDATE SKIP LOCKED``; settle checks the lease token and writes the job's
    record (when the app's storage is the same database and schema) in the same transaction.
    Idle fetches sleep on a LISTEN connection that every enqueue's NOTIFY wakes (sent at
    commit), and otherwise only until the next delayed job or lease comes due.

    The schema must be at the version this package ships; if it is not, the first operation
    raises :class:`~worq_postgres.SchemaError` (run ``worq postgres migrate URL``).
    """

    name: ClassVar[str] = "postgres"
    schemes: ClassVar[tuple[str, ...]] = ("postgresql", "postgres")
    capabilities: ClassVar[frozenset[Capability]] = frozenset(
        {
            Capability.DELAYED,
            Capability.PRIORITIES,
            Capability.DEAD_LETTER,
            Capability.SHARED,
            Capability.WORKER_REGISTRY,
            Capability.CANCEL,
            Capability.PROGRESS,
            Capability.RESULTS,
            Capability.TRANSACTIONAL,
            Capability.SCHEDULES,
            Capability.LISTING,
            Capability.EVENTS,
            Capability.UNIQUE,
            Capability.WORKFLOWS,
            Capability.LIMITS,
            Capability.WORKER_LEASES,
        }
    )

    def __init__(
        self,
        url: str,
        *,
        pool_size: int = 10,
        events_max: int = 10_000,
        vacuum_after: int | None = 50_000,
        dead_max_count: int | None = None,
        dead_max_age: float | None = None,
    ) -> None:
        self.url = url
        self.target: Target = parse_url(url)
        self.events_max = events_max
        self.vacuum_after = vacuum_after
        """Dead rows in ``worq_jobs``, ``worq_results`` or ``worq_events`` past which a settling
        broker vacuums that table (``None``: never, leave it to autovacuum)."""
        self.dead_max_count: int = setting(
            self.target, "dead_max_count", dead_max_count, int, 10_000
        )
        """Dead jobs kept per queue (``?dead_max_count=``); the oldest beyond it are dropped."""
        self.dead_max_age: float = setting(
            self.target, "dead_max_age", dead_max_age, float, 7 * 24 * 3600.0
        )
        """Seconds a dead job is kept (``?dead_max_age=``)."""
        if self.dead_max_count < 0 or not 0 <= self.dead_max_age < float("inf"):
            raise PostgresError(
                f"dead_max_count and dead_max_age must be finite and >= 0, not "
                f"{self.dead_max_count!r} and {self.dead_max_age!r}"
            )
        self._dead_queues: set[str] = set()  # queues dead-lettered into since the last sweep
        self._pool_size = pool_size
        self._pool = LazyPool(self.target, self.url, pool_size, "worq-broker")
        self._listener = Listener(self.target, self.target.channel)
        self._event_listener = Listener(self.target, self.target.channel + "_events")
        self._settles = 0  # settle calls, to sweep every _SWEEP_EVERY
        self._sweep_lock = threading.Lock()
        self._sweeper: threading.Thread | None = None  # the running sweep, if any

    @override
    @classmethod
    def from_url(cls, url: str) -> Self:
        return cls(url)

    @override
    def recipe(self) -> Callable[[], Broker] | None:
        """This class with this broker's URL and options, for the lease keeper's process.

        ``None`` for a subclass with a constructor of its own (unless it gives its own recipe).
        """
        if type(self).__init__ is not PostgresBroker.__init__:
            return None
        return functools.partial(
            type(self),
            self.url,
            pool_size=self._pool_size,
            events_max=self.events_max,
            vacuum_after=self.vacuum_after,
            dead_max_count=self.dead_max_count,
            dead_max_age=self.dead_max_age,
        )

    def pool(self) -> ConnectionPool:
        """The connection pool, opened (and the schema version checked) on first use."""
        return self._pool.get()

    @override
    def verify(self) -> None:
        """Raise :class:`~worq_postgres.SchemaError` if the schema is not at this version.

        An unreachable server passes: the worker retries it like any fetch.
        """
        try:
            self.pool()
        except BrokerConnectionError:
            return

    def _call(self, what: str, query: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._connection(what) as conn:
            return conn.execute(query, params).fetchall()

    def _connection(self, what: str) -> contextlib.AbstractContextManager[psycopg.Connection[Any]]:
        """A pooled connection; after a connection error the pool drops its broken ones."""
        return self._pool.connection(what)

    @override
    def stores_results_in(self, storage: Storage) -> bool:
        return (
            isinstance(storage, PostgresStorage)
            and storage.target.conninfo == self.target.conninfo
            and storage.target.schema == self.target.schema
        )

    # -- producer side -----------------------------------------------------------------------

    def _enqueue_params(self, messages: Sequence[Message]) -> tuple[Any, ...]:
        return (
            self.target.channel,
            [m.id for m in messages],
            [m.queue for m in messages],
            [m.body for m in messages],
            [int(m.priority) for m in messages],
            [None if m.eta is None else float(m.eta) for m in messages],
            [m.clear_record for m in messages],
        )

    @property
    def _enqueue_sql(self) -> str:
        return f"SELECT {self.target.q('worq_enqueue')}(%s, %s, %s, %s, %s, %s, %s)"

    @property
    def _enqueue_one_sql(self) -> str:
        return f"SELECT {self.target.q('worq_enqueue')}(%s, {_one(_ENQUEUE_TYPES)})"

    @staticmethod
    def _added(messages: Sequence[Message], refused: Sequence[str]) -> list[str | None]:
        """Per message, ``None`` if :sql:`worq_enqueue` added it, else its own id (held).

        ``refused`` has an id once per message not added: as many times as the batch holds it
        when none was (the id was held), once fewer when the first was.
        """
        if not refused:
            return [None] * len(messages)
        left = Counter(refused)
        sent = Counter(m.id for m in messages)
        answer: list[str | None] = []
        first = set()
        for message in messages:
            if message.id in first:  # a second message with the id in the batch never is
                answer.append(message.id)
                continue
            first.add(message.id)
            answer.append(None if sent[message.id] > left[message.id] else message.id)
        return answer

    def _send(self, conn: Any, messages: Sequence[Message]) -> list[str | None]:
        """Enqueue on ``conn`` (any psycopg connection, in whatever transaction it has)."""
        if not messages:
            return []
        if not any(
            m.unique is not None
            or m.member is not None
            or m.closes is not None
            or m.rate is not None
            or m.concurrency is not None
            for m in messages
        ):
            channel, *columns = self._enqueue_params(messages)
            if len(messages) == 1:  # one by one: scalars, which psycopg dumps much faster
                [(refused,)] = conn.execute(
                    self._enqueue_one_sql, (channel, *(c[0] for c in columns))
                ).fetchall()
            else:
                # A uniform column (queue, priority, eta, clear) goes as one element: psycopg
                # dumps lists element by element, the largest cost of a big batch.
                ids, queues, bodies, *rest = columns
                [(refused,)] = conn.execute(
                    self._enqueue_sql,
                    (channel, ids, _uniform(queues), bodies, *map(_uniform, rest)),
                ).fetchall()
            return self._added(messages, refused)
        [(holders,)] = conn.execute(
            f"SELECT {self.target.q('worq_add')}"
            "(%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
            (
                *self._enqueue_params(messages),
                [None if m.unique is None else m.unique.key for m in messages],
                [None if m.unique is None else m.unique.until.value for m in messages],
                [0.0 if m.unique is None else float(m.unique.hold_for) for m in messages],
                [None if m.member is None else m.member.group for m in messages],
                [None if m.member is None else m.member.index for m in messages],
                [m.closes for m in messages],
                [None if m.rate is None else m.rate.key for m in messages],
                [None if m.rate is None else float(m.rate.interval) for m in messages],
                [None if m.rate is None else int(m.rate.burst) for m in messages],
                [None if m.concurrency is None else m.concurrency.key for m in messages],
                [None if m.concurrency is None else int(m.concurrency.limit) for m in messages],
            ),
        ).fetchall()
        return list(holders)

    @override
    def enqueue(self, messages: Sequence[Message]) -> list[bool]:
        return [holder is None for holder in self.enqueue_unique(messages)]

    @override
    def enqueue_unique(self, messages: Sequence[Message]) -> list[str | None]:
        if not messages:
            return []
        with self._connection("enqueue") as conn:
            return self._send(conn, messages)

    @override
    def enqueue_on(self, connection: object, messages: Sequence[Message]) -> list[str | None]:
        """Write the jobs through the application's own ``psycopg.Connection``; no commit.

        They join the connection's open transaction (psycopg opens one at the first statement
        unless the connection is in autocommit mode): workers see them, and are woken by
        NOTIFY, only when the application commits; a rollback leaves no trace. The connection
        must be a synchronous :class:`psycopg.Connection` to the broker's database.
        """
        import psycopg
        from psycopg.conninfo import conninfo_to_dict

        if not isinstance(connection, psycopg.Connection):
            raise PostgresError(
                f"enqueue on a connection needs a psycopg.Connection (for SQLAlchemy, "
                f"session.connection().connection.driver_connection), "
                f"not {type(connection).__name__}"
            )
        wanted = conninfo_to_dict(self.target.conninfo).get("dbname")
        if wanted is not None and connection.info.dbname != wanted:
            raise PostgresError(
                f"the connection is to database {connection.info.dbname!r}, the broker's "
                f"is {wanted!r}: a job written there would never be seen"
            )
        if not messages:
            return []
        self.pool()  # the schema version is checked once, on the broker's own connection
        with translated(self.url, "enqueue on the caller's connection"):
            return self._send(connection, messages)

    @override
    def fire_schedule(
        self,
        schedule: str,
        tick: float,
        last: float | None,
        message: Message | None,
        queue: str | None = None,
    ) -> bool:
        """One transaction: the compare-and-set and the enqueue.

        One record per schedule name: every queue is in the same database, so ``queue`` is not
        needed.
        """
        q = self.target.q
        with self._connection("fire a schedule") as conn, conn.transaction():
            [(fired,)] = conn.execute(
                f"SELECT {q('worq_fire_schedule')}(%s, %s, %s)",
                (schedule, float(tick), None if last is None else float(last)),
            ).fetchall()
            if fired and message is not None:
                self._send(conn, [message])  # a held id or key adds nothing: the tick still fired
        return bool(fired)

    @override
    def schedule_fires(
        self, schedules: Sequence[str] | None = None, queues: Mapping[str, str] | None = None
    ) -> dict[str, float]:
        q = self.target.q
        if schedules is None:
            rows = self._call(
                "read schedules", f"SELECT name, last_fire FROM {q('worq_schedules')}"
            )
        else:
            rows = self._call(
                "read schedules",
                f"SELECT name, last_fire FROM {q('worq_schedules')} WHERE name = ANY(%s)",
                (list(schedules),),
            )
        return {str(name): float(last) for name, last in rows}

    @override
    def open_group(self, group: GroupSpec, members: Sequence[Message]) -> list[bool]:
        if group.size < 0:
            raise ValueError(f"group {group.id!r} has a negative size")
        indexes = set()
        for message in members:
            member = message.member
            if member is None or member.group != group.id:
                raise ValueError(f"job {message.id!r} is not a member of group {group.id!r}")
            if not 0 <= member.index < group.size or member.index in indexes:
                raise ValueError(f"job {message.id!r} has a bad index in group {group.id!r}")
            indexes.add(member.index)
        q = self.target.q
        cb = group.callback
        with self._connection("open a group") as conn, conn.transaction():
            conn.execute(
                f"DELETE FROM {q('worq_groups')} WHERE id = %s AND expires <= {q('worq_now')}()",
                (group.id,),
            )
            inserted = conn.execute(
                f"INSERT INTO {q('worq_groups')} (id, size, run_on_failure, ttl, outputs, "
                "cb_id, cb_queue, cb_body, cb_priority, cb_eta, cb_clear, cb_group, cb_index, "
                "cb_closes) VALUES (%s, %s, %s, %s, array_fill(NULL::bytea, ARRAY[%s]), "
                "%s, %s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT (id) DO NOTHING RETURNING id",
                (
                    group.id,
                    group.size,
                    group.run_on_failure,
                    float(group.ttl),
                    group.size,
                    None if cb is None else cb.id,
                    None if cb is None else cb.queue,
                    None if cb is None else cb.body,
                    None if cb is None else int(cb.priority),
                    None if cb is None or cb.eta is None else float(cb.eta),
                    None if cb is None else cb.clear_record,
                    None if cb is None or cb.member is None else cb.member.group,
                    None if cb is None or cb.member is None else cb.member.index,
                    None if cb is None else cb.closes,
                ),
            ).fetchall()
            if not inserted:
                raise ValueError(f"group {group.id!r} is already recorded")
            holders = self._send(conn, members)
            if group.size == 0:
                conn.execute(
                    f"SELECT {q('worq_complete_group')}(%s, %s, {q('worq_now')}())",
                    (self.target.channel, group.id),
                )
        return [holder is None for holder in holders]

    @override
    def group_state(self, group_id: str) -> GroupState | None:
        q = self.target.q
        rows = self._call(
            "read a group",
            f"SELECT size, outputs, finished, failed, cb_id, callback_sent "
            f"FROM {q('worq_groups')} WHERE id = %s "
            f"AND (expires IS NULL OR expires > {q('worq_now')}())",
            (group_id,),
        )
        if not rows:
            return None
        size, outputs, finished, failed, callback_id, sent = rows[0]
        return GroupState(
            group_id,
            size,
            tuple(None if o is None else bytes(o) for o in outputs),
            frozenset(finished),
            frozenset(failed),
            callback_id,
            complete=len(finished) == size,
            callback_sent=sent,
        )

    # -- worker side -------------------------------------------------------------------------

    @override
    def fetch(
        self,
        queues: Sequence[str],
        limit: int,
        *,
        lease: float,
        wait: float,
        worker: str | None = None,
    ) -> list[Delivery]:
        """With ``worker``, each lease's row names it (``holder``) for :meth:`extend_worker`."""
        if limit <= 0 or not queues:
            return []
        queues = list(queues)
        deadline = time.monotonic() + wait
        if wait > 0:
            self._listener.start()
        while True:
            seen = self._listener.version(queues)
            with self._connection("fetch") as conn:
                _, deliveries, pause = self._look(conn, [], queues, limit, lease, wait > 0, worker)
            if deliveries:
                return deliveries
            left = deadline - time.monotonic()
            if left <= 0:
                return []
            self._sleep(queues, seen, left, pause)

    def _sleep(
        self, queues: list[str], seen: tuple[int, ...], left: float, pause: float | None
    ) -> None:
        """Sleep until a notification for ``queues`` after ``seen``, or the next due time."""
        if pause is not None:
            left = min(left, max(pause, 0.001))
        self._listener.wait(queues, seen, min(left, SAFETY_TIMEOUT))

    def _look(
        self,
        conn: Any,
        settlements: Sequence[Settlement],
        queues: list[str],
        limit: int,
        lease: float,
        waiting: bool,
        worker: str | None,
    ) -> tuple[list[bool], list[Delivery], float | None]:
        """Settle (no follow-ups), then lease, in one call of :sql:`worq_settle_fetch`.

        Returns the settlement's answer, the deliveries, and, when there are none and the
        caller is ``waiting``, the seconds until the next job of ``queues`` comes due
        (``None``: none will unless one is enqueued, or not asked).
        """
        channel, *columns = self._settle_call(settlements)[1]
        if len(settlements) == 1:  # a worker's slot settles one job: scalars, dumped faster
            arrays, values = _one(_SETTLE_TYPES), [c[0] for c in columns]
        elif not settlements:
            arrays, values = ", ".join(f"'{{}}'::{t}[]" for t in _SETTLE_TYPES), []
        else:
            arrays, values = ", ".join(["%s"] * len(columns)), columns
        rows = conn.execute(
            f"SELECT * FROM {self.target.q('worq_settle_fetch')}(%s, {arrays}, %s, %s, %s, %s, %s)",
            (channel, *values, queues, limit, float(lease), waiting, worker),
        ).fetchall()
        jobs = [row[3:] for row in rows if row[0] is None]
        [(applied, next_due, now)] = [row[:3] for row in rows if row[0] is not None]
        pause = None if jobs or next_due is None else next_due - now
        return list(applied), _deliveries(jobs), pause

    @override
    def extend(
        self,
        deliveries: Sequence[Delivery],
        lease: float,
        progress: Mapping[str, bytes] | None = None,
    ) -> list[LeaseState]:
        if not deliveries:
            return []
        progress = progress or {}
        [(states,)] = self._call(
            "extend leases",
            f"SELECT {self.target.q('worq_extend')}(%s, %s, %s, %s)",
            (
                [d.id for d in deliveries],
                [_token(d) for d in deliveries],
                float(lease),
                [progress.get(d.id) for d in deliveries],
            ),
        )
        return [_LEASES[s] for s in states]

    @override
    def extend_worker(
        self,
        worker: str,
        queues: Sequence[str],
        lease: float,
        progress: Mapping[str, bytes] | None = None,
    ) -> dict[str, LeaseState]:
        """Renew the running jobs whose row names ``worker``, whatever their number.

        One call of :sql:`worq_extend_worker`.
        """
        latest = progress or {}
        rows = self._call(
            "extend a worker's leases",
            f"SELECT * FROM {self.target.q('worq_extend_worker')}(%s, %s, %s, %s, %s)",
            (worker, list(queues), float(lease), list(latest), [bytes(latest[i]) for i in latest]),
        )
        return {
            str(token): LeaseState.CANCELLING if cancel else LeaseState.HELD
            for token, cancel in rows
        }

    @override
    def settle(self, settlements: Sequence[Settlement]) -> list[bool]:
        if not settlements:
            return []
        self._count_settle()
        query, params = self._settle_call(settlements)
        if not any(s.then for s in settlements):
            [(applied,)] = self._call("settle jobs", query, params)
        else:
            with self._connection("settle jobs") as conn, conn.transaction():
                applied = self._settle_on(conn, settlements)
        self._note_dead(settlements, applied)
        return list(applied)

    def _count_settle(self) -> None:
        """Every _SWEEP_EVERY settle calls, start a sweep on a thread of its own.

        The settling worker never waits for it (a sweep may vacuum), and one runs at a time:
        a sweep still running when the next is due makes it skip a turn.
        """
        with self._sweep_lock:
            self._settles += 1
            if self._settles % _SWEEP_EVERY or self._sweeper is not None:
                return
            self._sweeper = threading.Thread(
                target=self._sweep_quietly, name="worq-postgres-sweep", daemon=True
            )
            self._sweeper.start()

    def _sweep_quietly(self) -> None:
        try:
            self._sweep()
        except Exception as exc:  # noqa: BLE001 - upkeep: the next sweep tries again
            logger.warning("worq-postgres upkeep failed, the next sweep tries again: %s", exc)
        finally:
            with self._sweep_lock:
                self._sweeper = None

    def _note_dead(self, settlements: Sequence[Settlement], applied: Sequence[bool]) -> None:
        """Remember the queues that got dead jobs: the next sweep checks their count."""
        dead = {
            s.delivery.queue
            for s, ok in zip(settlements, applied, strict=True)
            if ok and s.outcome is Outcome.DEAD
        }
        if dead:
            with self._sweep_lock:
                self._dead_queues |= dead

    def _settle_on(self, conn: Any, settlements: Sequence[Settlement]) -> list[bool]:
        """Settle on ``conn``, inside the caller's transaction, with the follow-ups."""
        query, params = self._settle_call(settlements)
        [(applied,)] = conn.execute(query, params).fetchall()
        # Follow-ups of the settlements that applied, in the same transaction.
        then = [m for s, ok in zip(settlements, applied, strict=True) if ok for m in s.then]
        self._send(conn, then)
        return list(applied)

    @override
    def settle_and_fetch(
        self,
        settlements: Sequence[Settlement],
        queues: Sequence[str],
        limit: int,
        *,
        lease: float,
        wait: float,
        worker: str | None = None,
    ) -> tuple[list[bool], list[Delivery]]:
        """Settle, then fetch, in one transaction: one commit (one WAL flush) for both.

        Without follow-ups (``Settlement.then``) that is one round trip, a single call of
        :sql:`worq_settle_fetch`; with them, the follow-ups are sent between the two, in the
        same transaction.
        """
        if not settlements or limit <= 0 or not queues:
            return super().settle_and_fetch(
                settlements, queues, limit, lease=lease, wait=wait, worker=worker
            )
        queues = list(queues)
        self._count_settle()
        deadline = time.monotonic() + wait
        if wait > 0:
            self._listener.start()
        seen = self._listener.version(queues)
        pause: float | None = None
        plain = not any(s.then for s in settlements)
        with self._connection("settle and fetch") as conn:
            if plain:
                applied, deliveries, pause = self._look(
                    conn, settlements, queues, limit, lease, wait > 0, worker
                )
            else:
                with conn.transaction():
                    applied = self._settle_on(conn, settlements)
                    rows = conn.execute(
                        f"SELECT * FROM {self.target.q('worq_fetch')}(%s, %s, %s, %s)",
                        (queues, limit, float(lease), worker),
                    ).fetchall()
                deliveries = _deliveries(rows)
        self._note_dead(settlements, applied)
        if deliveries or wait <= 0:
            return applied, deliveries
        if plain:  # the look found nothing and when to look again: sleep before the next
            self._sleep(queues, seen, deadline - time.monotonic(), pause)
        left = max(0.0, deadline - time.monotonic())
        return applied, self.fetch(queues, limit, lease=lease, wait=left, worker=worker)

    def _settle_call(self, settlements: Sequence[Settlement]) -> tuple[str, tuple[Any, ...]]:
        params = (
            self.target.channel,
            [s.delivery.id for s in settlements],
            [_token(s.delivery) for s in settlements],
            [_OUTCOMES[s.outcome] for s in settlements],
            [float(s.delay) for s in settlements],
            [s.reason for s in settlements],
            [s.record for s in settlements],
            [float(s.ttl) for s in settlements],
            [s.output for s in settlements],
        )
        query = f"SELECT {self.target.q('worq_settle')}(%s, %s, %s, %s, %s, %s, %s, %s, %s)"
        return query, params

    def _sweep(self) -> None:
        """Bounded upkeep piggy-backed on settles, off their transactions.

        Expired records and groups go in batches until a batch comes back short (so a sweep
        keeps up with however many records the settles since the last one wrote); dead jobs
        past retention in one batch (a queue that got new dead jobs is checked for its count,
        every queue for age); and the churned tables are vacuumed if autovacuum lags.
        """
        q = self.target.q
        for table in ("worq_results", "worq_groups"):
            for _ in range(_SWEEP_BATCHES):
                with self._connection("delete expired rows") as conn:
                    gone = conn.execute(
                        f"DELETE FROM {q(table)} WHERE id IN (SELECT id FROM {q(table)} "
                        f"WHERE expires <= {q('worq_now')}() LIMIT {_SWEEP_BATCH})"
                    ).rowcount
                if gone < _SWEEP_BATCH:
                    break
        with self._sweep_lock:
            queues, self._dead_queues = self._dead_queues, set()
        if self._trim_dead(sorted(queues), _SWEEP_BATCH) >= _SWEEP_BATCH:
            with self._sweep_lock:  # more to drop: the next sweep goes on
                self._dead_queues |= queues
        if self.vacuum_after is None:
            return
        # Autovacuum looks at a database once a minute at most (and may be off); a busy queue
        # leaves tens of thousands of dead rows in that time, in the jobs table and in the
        # records' (each acknowledged job deletes one row from each). Past the threshold, the
        # upkeep vacuums the table itself (SKIP_LOCKED: when another one is at it already, it
        # does not wait).
        rows = self._call(
            "read the dead rows",
            "SELECT relname FROM pg_stat_user_tables WHERE schemaname = %s "
            "AND relname IN ('worq_jobs', 'worq_results', 'worq_events') AND n_dead_tup > %s "
            "ORDER BY relname",
            (self.target.schema, self.vacuum_after),
        )
        for (table,) in rows:
            self._call_none("vacuum", f"VACUUM (SKIP_LOCKED) {q(table)}", ())

    def _trim_dead(self, queues: Sequence[str], limit: int | None = None) -> int:
        """Drop dead jobs past retention (see :sql:`worq_trim_dead`); how many went."""
        [(gone,)] = self._call(
            "drop dead jobs past retention",
            f"SELECT {self.target.q('worq_trim_dead')}(%s, %s, %s, %s)",
            (list(queues), self.dead_max_count, self.dead_max_age, limit),
        )
        return int(gone)

    @override
    def release(self, deliveries: Sequence[Delivery]) -> None:
        if not deliveries:
            return
        self._call(
            "release jobs",
            f"SELECT {self.target.q('worq_release')}(%s, %s, %s)",
            (self.target.channel, [d.id for d in deliveries], [_token(d) for d in deliveries]),
        )

    # -- inspection and admin ----------------------------------------------------------------

    def _state_sql(self) -> str:
        q = self.target.q
        return (
            f"WITH now AS (SELECT {q('worq_now')}() AS t) "
            "SELECT queue, CASE "
            "WHEN state IN ('scheduled', 'retrying') AND due <= now.t THEN 'queued' "
            "WHEN state = 'running' AND lease_until <= now.t THEN 'queued' ELSE state END, "
            "attempts, "
            "CASE WHEN state = 'running' AND lease_until > now.t THEN progress END, "
            "cancel_requested "
            f"FROM {q('worq_jobs')}, now WHERE id = %s"
        )

    @staticmethod
    def _state(row: Sequence[Any] | None) -> JobState | None:
        if row is None or row[0] is None:
            return None
        progress = None if row[3] is None else bytes(row[3])
        return JobState(row[0], JobStatus(row[1]), row[2], progress, row[4])

    @override
    def job_state(self, job_id: str) -> JobState | None:
        rows = self._call("read a job's state", self._state_sql(), (job_id,))
        return self._state(rows[0] if rows else None)

    @override
    def job_status(self, job_id: str, storage: Storage) -> tuple[JobState | None, bytes | None]:
        if not self.stores_results_in(storage):
            return super().job_status(job_id, storage)
        q = self.target.q
        query = (
            f"WITH j AS ({self._state_sql()}) "
            "SELECT j.*, (SELECT data FROM "
            f"{q('worq_results')} r WHERE r.id = %s AND r.expires > {q('worq_now')}()) "
            "FROM (SELECT 1) AS one LEFT JOIN j ON true"
        )
        [row] = self._call("read a job's state", query, (job_id, job_id))
        return self._state(row), None if row[5] is None else bytes(row[5])

    @override
    def cancel(self, job_id: str, record: bytes | None = None, ttl: float = 0.0) -> CancelOutcome:
        [(outcome,)] = self._call(
            "cancel a job",
            f"SELECT {self.target.q('worq_cancel')}(%s, %s, %s, %s)",
            (self.target.channel, job_id, record, float(ttl)),
        )
        return CancelOutcome(outcome)

    @override
    def stats(self, queues: Sequence[str] | None = None) -> list[QueueStats]:
        q = self.target.q
        if queues is None:
            names = [
                r[0]
                for r in self._call(
                    "list queues", f"SELECT name FROM {q('worq_queues')} ORDER BY name"
                )
            ]
        else:
            names = list(queues)
        if not names:
            return []
        self._trim_dead(names)
        rows = self._call(
            "count jobs",
            f"WITH now AS (SELECT {q('worq_now')}() AS t) "
            "SELECT n.name, "
            "count(j.id) FILTER (WHERE j.state = 'queued' "
            "  OR (j.state IN ('scheduled', 'retrying') AND j.due <= now.t) "
            "  OR (j.state = 'running' AND j.lease_until <= now.t)), "
            "count(j.id) FILTER (WHERE j.state IN ('scheduled', 'retrying') AND j.due > now.t), "
            "count(j.id) FILTER (WHERE j.state = 'running' AND j.lease_until > now.t), "
            "count(j.id) FILTER (WHERE j.state = 'dead') "
            "FROM unnest(%s::text[]) WITH ORDINALITY AS n(name, ord) CROSS JOIN now "
            f"LEFT JOIN {q('worq_jobs')} j ON j.queue = n.name "
            "GROUP BY n.name, n.ord ORDER BY n.ord",
            (names,),
        )
        return [QueueStats(r[0], r[1], r[2], r[3], r[4]) for r in rows]

    @override
    def dead_jobs(self, queue: str, limit: int = 100) -> list[DeadJob]:
        self._trim_dead([queue])
        rows = self._call(
            "list dead jobs",
            f"SELECT id, queue, body, reason, attempts, died_at FROM {self.target.q('worq_jobs')} "
            "WHERE queue = %s AND state = 'dead' ORDER BY died_at DESC, seq DESC LIMIT %s",
            (queue, max(0, limit)),
        )
        return [DeadJob(r[0], r[1], bytes(r[2]), r[3], r[4], r[5]) for r in rows]

    @override
    def requeue_dead(self, queue: str, job_ids: Sequence[str] | None = None) -> int:
        q = self.target.q
        only = "" if job_ids is None else "AND id = ANY(%s)"
        params: list[Any] = [queue] if job_ids is None else [queue, list(job_ids)]
        self._trim_dead([queue])
        with self._connection("requeue dead jobs") as conn, conn.transaction():
            moved = conn.execute(
                f"UPDATE {q('worq_jobs')} SET state = 'queued', attempts = 0, reason = '', "
                "unique_key = NULL, granted = false, "  # a new run: no key, its rate counts
                f"died_at = NULL, seq = nextval('{q('worq_seq')}') "
                f"WHERE queue = %s AND state = 'dead' {only}",
                params,
            ).rowcount
            if moved:
                conn.execute("SELECT pg_notify(%s, %s)", (self.target.channel, queue))
        return moved

    @override
    def purge_dead(self, queue: str) -> int:
        self._trim_dead([queue])
        with self._connection("purge dead jobs") as conn:
            return conn.execute(
                f"DELETE FROM {self.target.q('worq_jobs')} WHERE queue = %s AND state = 'dead'",
                (queue,),
            ).rowcount

    _LISTINGS: ClassVar[dict[JobStatus, tuple[str, str, str]]] = {
        # status: (condition, order, the "at" column); "now.t" is the server's time
        JobStatus.QUEUED: (
            "(state = 'queued' OR (state IN ('scheduled', 'retrying') AND due <= now.t) "
            "OR (state = 'running' AND lease_until <= now.t))",
            "priority DESC, seq",
            "NULL::float8",
        ),
        JobStatus.SCHEDULED: (
            "state IN ('scheduled', 'retrying') AND due > now.t",
            "due, seq",
            "due",
        ),
        JobStatus.RUNNING: (
            "state = 'running' AND lease_until > now.t",
            "lease_until",
            "lease_until",
        ),
        JobStatus.DEAD: ("state = 'dead'", "died_at DESC, seq DESC", "died_at"),
    }

    def _listed_sql(self, where: str, at: str = "NULL::float8") -> str:
        q = self.target.q
        return (
            f"WITH now AS (SELECT {q('worq_now')}() AS t) "
            "SELECT id, queue, CASE "
            "WHEN state IN ('scheduled', 'retrying') AND due <= now.t THEN 'queued' "
            "WHEN state = 'running' AND lease_until <= now.t THEN 'queued' ELSE state END, "
            f"body, attempts, {at}, reason "
            f"FROM {q('worq_jobs')}, now WHERE {where}"
        )

    @staticmethod
    def _listed(row: Sequence[Any]) -> ListedJob:
        return ListedJob(row[0], row[1], JobStatus(row[2]), bytes(row[3]), row[4], row[5], row[6])

    @override
    def list_jobs(
        self, queue: str, status: JobStatus, offset: int = 0, limit: int = 50
    ) -> list[ListedJob]:
        if status not in self.LISTED_STATES:
            raise BrokerError(f"cannot list jobs by status {status.value!r}")
        if limit <= 0:
            return []
        condition, order, at = self._LISTINGS[status]
        if status is JobStatus.DEAD:
            self._trim_dead([queue])
        rows = self._call(
            "list jobs",
            self._listed_sql(f"queue = %s AND {condition}", at)
            + f" ORDER BY {order} OFFSET %s LIMIT %s",
            (queue, max(0, offset), limit),
        )
        return [self._listed(r) for r in rows]

    @override
    def find_job(self, job_id: str) -> ListedJob | None:
        at = (
            "CASE WHEN state = 'dead' THEN died_at WHEN state = 'running' THEN lease_until "
            "WHEN state IN ('scheduled', 'retrying') THEN due END"
        )
        rows = self._call("find a job", self._listed_sql("id = %s", at), (job_id,))
        return self._listed(rows[0]) if rows else None

    @override
    def publish_events(self, events: Sequence[Event]) -> None:
        if not events:
            return
        q = self.target.q
        with self._connection("publish events") as conn, conn.transaction():
            cursor = conn.cursor()
            cursor.executemany(
                f"INSERT INTO {q('worq_events')} "
                "(kind, job_id, task, queue, at, attempt, worker, detail) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s, %s) RETURNING id",
                [
                    (
                        e.kind.value,
                        e.job_id,
                        e.task,
                        e.queue,
                        float(e.at),
                        e.attempt,
                        e.worker,
                        e.detail,
                    )
                    for e in events
                ],
                returning=True,
            )
            last = 0
            while True:
                row = cursor.fetchone()
                if row is not None:
                    last = max(last, row[0])
                if not cursor.nextset():
                    break
            # Bounded: everything older than the newest events_max goes (an index range scan).
            conn.execute(
                f"DELETE FROM {q('worq_events')} WHERE id <= %s", (last - self.events_max,)
            )
            conn.execute("SELECT pg_notify(%s, '')", (self.target.channel + "_events",))

    @override
    def read_events(
        self, after: str | None = None, limit: int = 100, timeout: float = 0.0
    ) -> list[Event]:
        if limit <= 0:
            return []
        try:
            last = None if after is None else int(after)
        except ValueError:
            raise BrokerError(f"not an event id of this broker: {after!r}") from None
        q = self.target.q
        columns = "id, kind, job_id, task, queue, at, attempt, worker, detail"
        if last is None:
            rows = self._call(
                "read events",
                f"SELECT * FROM (SELECT {columns} FROM {q('worq_events')} "
                "ORDER BY id DESC LIMIT %s) newest ORDER BY id",
                (limit,),
            )
            return [_event(r) for r in rows]
        deadline = time.monotonic() + timeout
        if timeout > 0:
            self._event_listener.start()
        while True:
            seen = self._event_listener.version(("",))
            rows = self._call(
                "read events",
                f"SELECT {columns} FROM {q('worq_events')} WHERE id > %s ORDER BY id LIMIT %s",
                (last, limit),
            )
            left = deadline - time.monotonic()
            if rows or left <= 0:
                return [_event(r) for r in rows]
            self._event_listener.wait(("",), seen, min(left, SAFETY_TIMEOUT))

    @override
    def register_worker(self, info: WorkerInfo, ttl: float) -> None:
        q = self.target.q
        self._call_none(
            "register a worker",
            f"INSERT INTO {q('worq_workers')} (id, info, expires) "
            f"VALUES (%s, %s, {q('worq_now')}() + %s) "
            "ON CONFLICT (id) DO UPDATE SET info = excluded.info, expires = excluded.expires",
            (info.id, json.dumps(dataclasses.asdict(info)), float(ttl)),
        )

    @override
    def unregister_worker(self, worker_id: str) -> None:
        self._call_none(
            "unregister a worker",
            f"DELETE FROM {self.target.q('worq_workers')} WHERE id = %s",
            (worker_id,),
        )

    @override
    def workers(self) -> list[WorkerInfo]:
        q = self.target.q
        with self._connection("list workers") as conn:
            conn.execute(f"DELETE FROM {q('worq_workers')} WHERE expires <= {q('worq_now')}()")
            rows = conn.execute(f"SELECT info FROM {q('worq_workers')}").fetchall()
        infos = []
        known = {f.name for f in dataclasses.fields(WorkerInfo)}
        for (info,) in rows:
            # Fields a newer or older worq-core wrote are dropped or defaulted: never an error.
            fields = {k: v for k, v in info.items() if k in known}
            fields["queues"] = tuple(fields.get("queues", ()))
            if "current" in fields:
                fields["current"] = tuple(fields["current"])
            infos.append(WorkerInfo(**fields))
        return sorted(infos, key=lambda i: i.started)

    def _call_none(self, what: str, query: str, params: Sequence[Any]) -> None:
        with self._connection(what) as conn:
            conn.execute(query, params)

    @override
    def close(self) -> None:
        sweeper = self._sweeper
        if sweeper is not None:
            sweeper.join(timeout=10.0)  # a vacuum under way ends on its own; only upkeep is lost
        self._event_listener.close()
        self._listener.close()
        self._pool.close()


# The SQL types of worq_enqueue's and worq_settle's array parameters, in order.
_ENQUEUE_TYPES = ("text", "text", "bytea", "integer", "float8", "boolean")
_SETTLE_TYPES = ("text", "bigint", "text", "float8", "text", "bytea", "float8", "bytea")


def _uniform(values: list[Any]) -> list[Any]:
    """``values``, or its one value when every element is equal (worq_enqueue broadcasts it)."""
    first = values[0]
    return [first] if all(v == first for v in values) else values


def _one(types: Sequence[str]) -> str:
    """One-element arrays built by the server from scalar parameters.

    psycopg dumps a list parameter element by element in Python, which cost a producer or a
    worker about a tenth of a millisecond per call.
    """
    return ", ".join(f"ARRAY[%s::{t}]" for t in types)


def _event(row: Sequence[Any]) -> Event:
    return Event(
        EventKind(row[1]), row[2], row[3], row[4], row[5], row[6], row[7], row[8], id=str(row[0])
    )


def _deliveries(rows: list[tuple[Any, ...]]) -> list[Delivery]:
    """worq_fetch's rows as deliveries, queue by queue, larger priority first, then FIFO."""
    rows.sort(key=lambda r: (r[0], -r[7], r[8]))
    return [Delivery(r[1], r[2], bytes(r[3]), str(r[4]), r[5], cancel_requested=r[6]) for r in rows]
