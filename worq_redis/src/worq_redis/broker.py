"""The Redis broker: queues as sorted sets and hashes, every state change one Lua script."""

from __future__ import annotations

import dataclasses
import json
import threading
import time
import urllib.parse
from collections.abc import Iterable, Sequence
from typing import Any, ClassVar, Self, TypeVar

import redis
from typing_extensions import override

from worq_core import Broker, BrokerConnectionError, BrokerError, Capability, JobStatus, Storage
from worq_core.models import (
    DeadJob,
    Delivery,
    Message,
    Outcome,
    QueueStats,
    Settlement,
    WorkerInfo,
)
from worq_redis.connection import (
    DEFAULT_URL,
    SCRIPTS,
    Arg,
    Call,
    Clock,
    KeyArg,
    RedisSettings,
    clock_arg,
    command,
    connect,
    queue_keys,
    registry_key,
    result_keys,
    run_script,
    run_scripts,
    run_transaction,
    server_identity,
    translate_errors,
)
from worq_redis.storage import RedisStorage

T = TypeVar("T")

_STATES = {
    b"q": JobStatus.QUEUED,
    b"s": JobStatus.SCHEDULED,
    b"r": JobStatus.RETRYING,
    b"l": JobStatus.RUNNING,
    b"d": JobStatus.DEAD,
}
_OUTCOMES = {Outcome.ACK: "a", Outcome.RETRY: "r", Outcome.DEAD: "d"}


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _by_queue(items: Sequence[T], queue_of: Any) -> dict[str, list[tuple[int, T]]]:
    groups: dict[str, list[tuple[int, T]]] = {}
    for index, item in enumerate(items):
        groups.setdefault(queue_of(item), []).append((index, item))
    return groups


class RedisBroker(Broker):
    """Jobs in Redis, shared by every producer and worker that reaches the same server.

    Build it from a ``redis://``, ``rediss://`` or ``unix://`` URL (user and password from the
    URL, ``?prefix=`` for the key prefix) or from a ``redis.Redis`` client made with
    ``decode_responses=False``. Thread-safe: every call takes a connection from the client's
    pool, so the fetch loop, the heartbeat and job threads never wait for one another.

    Each queue's keys live under one Cluster hash tag and every state change is one Lua script
    that uses Redis ``TIME``; ``clock`` replaces it in tests. The layout and the reasons behind it
    are in ``docs/redis.md``.
    """

    name: ClassVar[str] = "redis"
    schemes: ClassVar[tuple[str, ...]] = ("redis", "rediss", "unix")
    capabilities: ClassVar[frozenset[Capability]] = frozenset(
        {
            Capability.DELAYED,
            Capability.PRIORITIES,
            Capability.DEAD_LETTER,
            Capability.SHARED,
            Capability.WORKER_REGISTRY,
        }
    )

    def __init__(
        self,
        url: str | redis.Redis = DEFAULT_URL,
        settings: RedisSettings | None = None,
        *,
        prefix: str | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.client, self.url, self.settings, self._owned = connect(url, settings, prefix)
        self.prefix = self.settings.prefix
        self.clock = clock
        self._keys: dict[str, tuple[str, ...]] = {}
        self._known: set[str] = set()
        self._lock = threading.Lock()
        self._writes_results = False

    @override
    @classmethod
    def from_url(cls, url: str) -> Self:
        return cls(url)

    def __repr__(self) -> str:
        return f"<RedisBroker {self.url.split('@')[-1]} prefix={self.prefix!r}>"

    # -- producer side -----------------------------------------------------------------------

    @override
    def enqueue(self, messages: Sequence[Message]) -> list[bool]:
        """Add jobs, all or nothing: one script call per queue and chunk.

        A batch that needs several calls runs them in one ``MULTI``/``EXEC`` transaction. Raises
        :class:`BrokerConnectionError` within about ``connect_timeout`` or ``socket_timeout``
        (times ``retries + 1``) when Redis cannot be reached.
        """
        if not messages:
            return []
        calls: list[Call] = []
        order: list[list[int]] = []
        chunk = self.settings.enqueue_chunk
        for queue, items in _by_queue(messages, lambda m: m.queue).items():
            keys = self._queue_keys(queue)
            for start in range(0, len(items), chunk):
                part = items[start : start + chunk]
                args: list[Arg] = [clock_arg(self.clock), len(part)]
                for _, message in part:
                    args += [
                        message.id,
                        message.body,
                        str(-message.priority),
                        "" if message.eta is None else repr(float(message.eta)),
                    ]
                calls.append((SCRIPTS["enqueue"], keys, args))
                order.append([index for index, _ in part])
        extra = self._register(queue for queue in {m.queue for m in messages})
        with self._errors():
            if len(calls) == 1:
                results = run_scripts(self.client, calls, extra=extra)
            else:
                results = run_transaction(self.client, calls, extra=extra)
        added = [False] * len(messages)
        for indexes, result in zip(order, results, strict=True):
            for index, flag in zip(indexes, result, strict=True):
                added[index] = bool(flag)
        self._registered(extra)
        return added

    # -- worker side -------------------------------------------------------------------------

    @override
    def fetch(
        self, queues: Sequence[str], limit: int, *, lease: float, wait: float
    ) -> list[Delivery]:
        """Lease up to ``limit`` due jobs; when none, block on the queues' wake-up keys.

        Each fetch first returns a bounded number of expired leases to their queue and moves due
        delayed jobs to ready. Blocking uses ``BZPOPMIN`` on the queues' ``signal`` keys, with a
        timeout no longer than the time to the next due job or lease deadline.
        """
        return self.settle_and_fetch([], queues, limit, lease=lease, wait=wait)[1]

    @override
    def settle_and_fetch(
        self,
        settlements: Sequence[Settlement],
        queues: Sequence[str],
        limit: int,
        *,
        lease: float,
        wait: float,
    ) -> tuple[list[bool], list[Delivery]]:
        """Settle, then fetch from the first queue, in one pipelined round trip.

        Further queues cost one more round trip each, only while the earlier ones did not fill
        ``limit``.
        """
        settle_calls, assemble = self._settle_calls(settlements)
        if limit <= 0:
            with self._errors():
                results = run_scripts(self.client, settle_calls) if settle_calls else []
            return assemble(results), []
        deadline = time.monotonic() + wait
        extra = self._register(queues)
        applied: list[bool] | None = None
        with self._errors():
            while True:
                deliveries: list[Delivery] = []
                soonest: float | None = None
                for position, queue in enumerate(queues):
                    need = limit - len(deliveries)
                    if need <= 0:
                        break
                    fetch_call = self._fetch_call(queue, need, lease)
                    if applied is None and position == 0:
                        results = run_scripts(self.client, [*settle_calls, fetch_call], extra=extra)
                        applied = assemble(results[:-1])
                        self._registered(extra)
                        reply = results[-1]
                    else:
                        reply = run_script(self.client, *fetch_call)
                    due_in = self._parse_fetch(queue, reply, deliveries)
                    if due_in is not None:
                        soonest = due_in if soonest is None else min(soonest, due_in)
                if applied is None:  # no queue at all
                    applied = assemble(run_scripts(self.client, settle_calls))
                if deliveries:
                    return applied, deliveries
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return applied, []
                if soonest is not None and soonest <= 0:
                    continue  # more due work than one fetch moves; fetch again now
                timeout = min(remaining, soonest if soonest is not None else remaining)
                timeout = max(0.001, min(timeout, self.settings.blocking_timeout))
                signals = [self._queue_keys(q)[6] for q in queues]
                command(self.client, "BZPOPMIN", *signals, f"{timeout:.3f}")

    @override
    def extend(self, deliveries: Sequence[Delivery], lease: float) -> list[bool]:
        """Renew leases, one script per queue, all in one round trip."""
        if not deliveries:
            return []
        calls: list[Call] = []
        groups = list(_by_queue(deliveries, lambda d: d.queue).items())
        for queue, items in groups:
            args: list[Arg] = [clock_arg(self.clock), repr(float(lease))]
            for _, delivery in items:
                args += [delivery.id, delivery.token]
            calls.append((SCRIPTS["extend"], self._queue_keys(queue), args))
        with self._errors():
            results = run_scripts(self.client, calls)
        alive = [False] * len(deliveries)
        for (_, items), result in zip(groups, results, strict=True):
            for (index, _), flag in zip(items, result, strict=True):
                alive[index] = bool(flag)
        return alive

    @override
    def settle(self, settlements: Sequence[Settlement]) -> list[bool]:
        """Apply verdicts, one script per queue, in one round trip.

        When :meth:`stores_results_in` said yes, ``Settlement.record`` is written in the same
        script as the ack or dead-lettering, with ``Settlement.ttl``.
        """
        if not settlements:
            return []
        calls, assemble = self._settle_calls(settlements)
        with self._errors():
            results = run_scripts(self.client, calls)
        applied: list[bool] = assemble(results)
        return applied

    @override
    def release(self, deliveries: Sequence[Delivery]) -> None:
        if not deliveries:
            return
        calls: list[Call] = []
        for queue, items in _by_queue(deliveries, lambda d: d.queue).items():
            args: list[Arg] = [clock_arg(self.clock)]
            for _, delivery in items:
                args += [delivery.id, delivery.token]
            calls.append((SCRIPTS["release"], self._queue_keys(queue), args))
        with self._errors():
            run_scripts(self.client, calls)

    def reap(self, queue: str, limit: int = 1000) -> int:
        """Return up to ``limit`` expired leases of ``queue`` to ready now; how many moved.

        Fetching does this already in bounded steps; this is for admin tools and tests.
        """
        with self._errors():
            return int(
                run_script(
                    self.client,
                    SCRIPTS["reap"],
                    self._queue_keys(queue),
                    [clock_arg(self.clock), limit],
                )
            )

    @override
    def stores_results_in(self, storage: Storage) -> bool:
        """True for a :class:`RedisStorage` on the same server, database and key prefix."""
        same = (
            isinstance(storage, RedisStorage)
            and storage.prefix == self.prefix
            and server_identity(storage.client) == server_identity(self.client)
        )
        if same:
            self._writes_results = True
        return same

    @override
    def shareable_url(self) -> str | None:
        """This broker's URL with its key prefix, for the lease-keeper process.

        ``None`` for a TLS client handed to us (its certificates cannot travel in a URL).
        """
        if self._owned:
            url = self.url
        else:
            kw = self.client.get_connection_kwargs()
            if kw.get("ssl") or "ssl_keyfile" in kw:
                return None
            user = urllib.parse.quote(kw.get("username") or "", safe="")
            password = urllib.parse.quote(kw.get("password") or "", safe="")
            auth = f"{user}:{password}@" if (user or password) else ""
            if kw.get("path"):
                url = f"unix://{auth}{kw['path']}?db={kw.get('db', 0)}"
            else:
                host = kw.get("host", "localhost")
                url = f"redis://{auth}{host}:{kw.get('port', 6379)}/{kw.get('db', 0)}"
        base, _, query = url.partition("?")
        params = [(k, v) for k, v in urllib.parse.parse_qsl(query) if k != "prefix"]
        params.append(("prefix", self.prefix))
        return f"{base}?{urllib.parse.urlencode(params)}"

    # -- worker registry -----------------------------------------------------------------------

    @override
    def register_worker(self, info: WorkerInfo, ttl: float) -> None:
        """Record ``info`` until ``ttl`` seconds from now (two keys, expiring with the last)."""
        data, seen = self._worker_keys()
        # The keys outlive every registration they hold (crashed workers never unregister).
        keep_ms = max(int(ttl * 1000), 600_000)
        with self._errors():
            pipe = self.client.pipeline(transaction=False)
            pipe.hset(data, info.id, json.dumps(dataclasses.asdict(info)))
            pipe.zadd(seen, {info.id: time.time() + ttl})
            pipe.pexpire(data, keep_ms)
            pipe.pexpire(seen, keep_ms)
            pipe.execute()

    @override
    def unregister_worker(self, worker_id: str) -> None:
        data, seen = self._worker_keys()
        with self._errors():
            pipe = self.client.pipeline(transaction=False)
            pipe.hdel(data, worker_id)
            pipe.zrem(seen, worker_id)
            pipe.execute()

    @override
    def workers(self) -> list[WorkerInfo]:
        """Live workers, oldest first; expired registrations are dropped on the way."""
        data, seen = self._worker_keys()
        now = time.time()
        with self._errors():
            expired: list[bytes] = list(command(self.client, "ZRANGEBYSCORE", seen, "-inf", now))
            if expired:
                pipe = self.client.pipeline(transaction=False)
                pipe.hdel(data, *expired)
                pipe.zrem(seen, *expired)
                pipe.execute()
            live: list[bytes] = list(command(self.client, "ZRANGEBYSCORE", seen, now, "+inf"))
            values: list[bytes | None] = (
                list(command(self.client, "HMGET", data, *live)) if live else []
            )
        found = []
        for raw in values:
            if raw is None:
                continue
            fields = json.loads(raw)
            fields["queues"] = tuple(fields["queues"])
            found.append(WorkerInfo(**fields))
        return sorted(found, key=lambda w: (w.started, w.id))

    # -- inspection and admin ----------------------------------------------------------------

    @override
    def job_state(self, queue: str, job_id: str) -> JobStatus | None:
        with self._errors():
            state = run_script(
                self.client,
                SCRIPTS["job_state"],
                self._queue_keys(queue),
                [clock_arg(self.clock), job_id],
            )
        return _STATES.get(state) if state else None

    @override
    def stats(self, queues: Sequence[str] | None = None) -> list[QueueStats]:
        with self._errors():
            if queues is None:
                members = self.client.smembers(registry_key(self.prefix))
                queues = sorted(_text(m) for m in members)
            if not queues:
                return []
            args: list[Arg] = [
                clock_arg(self.clock),
                self.settings.dead_max_count,
                repr(self.settings.dead_max_age),
            ]
            results = run_scripts(
                self.client, [(SCRIPTS["stats"], self._queue_keys(q), args) for q in queues]
            )
        return [
            QueueStats(q, ready=int(r[0]), delayed=int(r[1]), running=int(r[2]), dead=int(r[3]))
            for q, r in zip(queues, results, strict=True)
        ]

    @override
    def dead_jobs(self, queue: str, limit: int = 100) -> list[DeadJob]:
        args: list[Arg] = [
            clock_arg(self.clock),
            self.settings.dead_max_count,
            repr(self.settings.dead_max_age),
            limit,
        ]
        with self._errors():
            flat = run_script(self.client, SCRIPTS["dead_jobs"], self._queue_keys(queue), args)
        return [
            DeadJob(
                _text(flat[i]),
                queue,
                bytes(flat[i + 1]),
                _text(flat[i + 2]),
                int(flat[i + 3]),
                float(flat[i + 4]),
            )
            for i in range(0, len(flat), 5)
        ]

    @override
    def requeue_dead(self, queue: str, job_ids: Sequence[str] | None = None) -> int:
        args: list[Arg] = [clock_arg(self.clock), "all" if job_ids is None else "ids"]
        args += list(job_ids or [])
        with self._errors():
            return int(
                run_script(self.client, SCRIPTS["requeue_dead"], self._queue_keys(queue), args)
            )

    @override
    def purge_dead(self, queue: str) -> int:
        with self._errors():
            return int(
                run_script(
                    self.client,
                    SCRIPTS["purge_dead"],
                    self._queue_keys(queue),
                    [clock_arg(self.clock)],
                )
            )

    @override
    def close(self) -> None:
        """Close the connection pool, unless the client was handed to us."""
        if self._owned:
            self.client.close()

    # -- internals -----------------------------------------------------------------------------

    def _errors(self) -> Any:
        return translate_errors(self.url, BrokerConnectionError, BrokerError)

    def _worker_keys(self) -> tuple[str, str]:
        return f"{self.prefix}:workers", f"{self.prefix}:workers:seen"

    def _queue_keys(self, queue: str) -> tuple[str, ...]:
        keys = self._keys.get(queue)
        if keys is None:
            keys = self._keys[queue] = queue_keys(self.prefix, queue)
        return keys

    def _register(self, queues: Iterable[str]) -> list[list[Arg]]:
        """A ``SADD`` of the queues this broker has not recorded yet, for :meth:`stats`."""
        new = [q for q in queues if q not in self._known]
        return [["SADD", registry_key(self.prefix), *new]] if new else []

    def _registered(self, extra: list[list[Arg]]) -> None:
        with self._lock:
            for command in extra:
                self._known.update(str(q) for q in command[2:])

    def _fetch_call(self, queue: str, limit: int, lease: float) -> Call:
        settings = self.settings
        args: list[Arg] = [
            clock_arg(self.clock),
            limit,
            repr(float(lease)),
            settings.reap_batch,
            settings.promote_batch,
        ]
        return SCRIPTS["fetch"], self._queue_keys(queue), args

    def _parse_fetch(self, queue: str, reply: list[Any], into: list[Delivery]) -> float | None:
        """Append the reply's deliveries to ``into``; seconds until the next due time, if any."""
        for i in range(2, len(reply), 4):
            into.append(
                Delivery(
                    _text(reply[i]),
                    queue,
                    bytes(reply[i + 1]),
                    _text(reply[i + 2]),
                    int(reply[i + 3]),
                )
            )
        if not reply[1]:
            return None
        return float(reply[1]) - float(reply[0])

    def _settle_calls(self, settlements: Sequence[Settlement]) -> tuple[list[Call], Any]:
        """Script calls for ``settlements`` and a function that maps their replies to flags."""
        calls: list[Call] = []
        groups = list(_by_queue(settlements, lambda s: s.delivery.queue).items())
        base: list[Arg] = [
            clock_arg(self.clock),
            self.settings.dead_max_count,
            repr(self.settings.dead_max_age),
        ]
        for queue, items in groups:
            keys: list[KeyArg] = list(self._queue_keys(queue))
            args = list(base)
            for _, s in items:
                index = 0
                record: bytes = b""
                ttl_ms = 0
                if self._writes_results and s.record is not None and s.outcome is not Outcome.RETRY:
                    index = len(keys) + 1
                    keys += result_keys(self.prefix, s.delivery.id)
                    record = s.record
                    ttl_ms = int(s.ttl * 1000)
                args += [
                    s.delivery.id,
                    s.delivery.token,
                    _OUTCOMES[s.outcome],
                    repr(float(s.delay)),
                    s.reason,
                    index,
                    ttl_ms,
                    record,
                ]
            calls.append((SCRIPTS["settle"], keys, args))

        def assemble(results: Sequence[Any]) -> list[bool]:
            applied = [False] * len(settlements)
            for (_, items), result in zip(groups, results, strict=True):
                for (index, _), flag in zip(items, result, strict=True):
                    applied[index] = bool(flag)
            return applied

        return calls, assemble
