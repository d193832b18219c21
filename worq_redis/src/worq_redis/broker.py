"""The Redis broker: queues as sorted sets and hashes, every state change one Lua script."""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Final, Self, TypeVar, cast

import redis
from redis.crc import key_slot
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError
from typing_extensions import override

from worq_core import Broker, BrokerConnectionError, BrokerError, Capability, JobStatus, Storage
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
    UniqueUntil,
    WorkerInfo,
)
from worq_redis.connection import (
    CLUSTER_SCHEMES,
    DEFAULT_URL,
    SCRIPTS,
    SENTINEL_SCHEMES,
    Arg,
    AsyncLane,
    Call,
    Clock,
    ClusterLane,
    Lane,
    RedisSettings,
    ReplicasBehind,
    Script,
    applied_key,
    async_pool,
    clock_arg,
    close_client,
    cluster_ids_key,
    cluster_schedules_key,
    command,
    connect,
    connect_cluster,
    events_key,
    group_key,
    ids_key,
    located,
    outbox_key,
    queue_keys,
    redact,
    registry_key,
    result_keys,
    schedule_queues_key,
    schedules_key,
    server_identity,
    translate_errors,
)
from worq_redis.storage import RedisStorage

if TYPE_CHECKING:
    from asyncio import AbstractEventLoop

T = TypeVar("T")
log = logging.getLogger("worq.redis")

_STATES = {
    b"q": JobStatus.QUEUED,
    b"s": JobStatus.SCHEDULED,
    b"r": JobStatus.RETRYING,
    b"l": JobStatus.RUNNING,
    b"d": JobStatus.DEAD,
    b"w": JobStatus.QUEUED,  # parked: waiting for a concurrency permit
}
_OUTCOMES = {Outcome.ACK: "a", Outcome.RETRY: "r", Outcome.DEAD: "d"}
_LEASES = (LeaseState.LOST, LeaseState.HELD, LeaseState.CANCELLING)  # extend's 0, 1, 2
_CANCELS = {
    b"r": CancelOutcome.REMOVED,
    b"q": CancelOutcome.REQUESTED,
    b"n": CancelOutcome.NOT_FOUND,
}
_ENQUEUE, _FETCH, _SETTLE = SCRIPTS["enqueue"], SCRIPTS["fetch"], SCRIPTS["settle"]
_ENQUEUE_ONE = SCRIPTS["enqueue_one"]
_SETTLE_FETCH, _EXTEND = SCRIPTS["settle_fetch"], SCRIPTS["extend"]
_EXTEND_WORKER = SCRIPTS["extend_worker"]
_JOB_STATE, _CANCEL = SCRIPTS["job_state"], SCRIPTS["cancel"]
_FIND_JOB = SCRIPTS["find_job"]
_LISTED = {
    JobStatus.QUEUED: "ready",
    JobStatus.SCHEDULED: "delayed",
    JobStatus.RUNNING: "leased",
    JobStatus.DEAD: "dead",
}
_FIRE_SCHEDULE, _SCHEDULE_CAS = SCRIPTS["fire_schedule"], SCRIPTS["schedule_cas"]
_OPEN_GROUP = SCRIPTS["open_group"]
_FORWARD, _OUTBOX_CLAIM = SCRIPTS["forward"], SCRIPTS["outbox_claim"]
_GROUP_OPEN, _GROUP_COUNT, _GROUP_SENT = (
    SCRIPTS["group_open"],
    SCRIPTS["group_count"],
    SCRIPTS["group_sent"],
)
_SWEEP_BATCH: Final = 100
"""Outbox entries a sweep forwards per queue at a time."""
_SWEEP_ROUNDS: Final = 10
"""Batches a worker's sweep forwards at most, one after the other, while they come full."""
_NO_MESSAGE: Final[tuple[Arg, ...]] = ("",) * 10
"""The ten message values of ``open_group`` for a group without a callback."""
_CLUSTER_POLL: Final = 0.1
"""Under Cluster, the longest wait before a worker looks again at its queues in other slots."""
_CLOSING: set[Any] = set()
"""The tasks closing asyncio lanes that :meth:`RedisBroker.close` started, until they are done."""
_CANCEL_LOOKUPS: Final = 16
"""How often :meth:`RedisBroker.cancel` looks a job's queue up again when the job keeps moving
to another queue between the lookup and the script (acked and enqueued elsewhere each time)."""


def _worker_arg(worker: str) -> str:
    """``worker`` as the scripts take it; it becomes part of lease tokens kept in ``meta``."""
    if not worker or "|" in worker:
        raise ValueError(f"invalid worker id {worker!r}: empty, or contains '|'")
    return worker


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _specs(message: Message) -> tuple[bytes, bytes] | None:
    """The unique spec and limits record the scripts take for ``message``; ``None`` for neither.

    Unique: ``mode|hold ms|key`` (mode ``s`` until started, ``d`` until done). Limits:
    ``permits|interval|burst|bytes of ckey|`` then the concurrency key and the rate key
    (``permits`` 0: no concurrency limit; ``interval`` empty: no rate limit).
    """
    u, c, r = message.unique, message.concurrency, message.rate
    if u is None and c is None and r is None:
        return None
    uspec = b""
    if u is not None:
        mode = b"s" if u.until == UniqueUntil.STARTED else b"d"
        hold = max(1, round(u.hold_for * 1000)) if u.hold_for > 0 else 0
        uspec = b"%s|%d|%s" % (mode, hold, u.key.encode())
    lspec = b""
    if c is not None or r is not None:
        ckey = c.key.encode() if c is not None else b""
        rkey = r.key.encode() if r is not None else b""
        interval = repr(float(r.interval)).encode() if r is not None else b""
        burst = r.burst if r is not None else 0
        permits = c.limit if c is not None else 0
        lspec = b"%d|%s|%d|%d|%s%s" % (permits, interval, burst, len(ckey), ckey, rkey)
    return uspec, lspec


def _wspec(message: Message) -> bytes:
    """The workflow record the scripts keep for ``message`` (``b""`` for none).

    ``index or empty|bytes of group id|`` then the group id and the id of the group it closes.
    """
    member, closes = message.member, message.closes
    if member is None and not closes:
        return b""
    gid = member.group.encode() if member is not None else b""
    index = b"%d" % member.index if member is not None else b""
    return b"%s|%d|%s%s" % (index, len(gid), gid, (closes or "").encode())


def _message_values(message: Message, register: bool) -> tuple[Arg, ...]:
    """The ten values a script takes for a message it enqueues by name (``check_message``).

    Raises ``ValueError`` for a bad queue name, as an enqueue into it would.
    """
    m = message
    queue_keys("-", m.queue)
    uspec, lspec = _specs(m) or (b"", b"")
    return (
        m.queue,
        1 if register else 0,
        m.id,
        m.body,
        str(-m.priority),
        "" if m.eta is None else repr(float(m.eta)),
        1 if m.clear_record else 0,
        uspec,
        lspec,
        _wspec(m),
    )


def _check_group(group: GroupSpec, members: Sequence[Message]) -> None:
    """Raise ``ValueError`` for a group :meth:`Broker.open_group` must refuse before any write."""
    if group.size < 0:
        raise ValueError(f"group {group.id!r}: size must be >= 0")
    seen: set[int] = set()
    for m in members:
        if m.member is None or m.member.group != group.id:
            raise ValueError(f"message {m.id!r} is not a member of group {group.id!r}")
        index = m.member.index
        if not 0 <= index < group.size or index in seen:
            raise ValueError(f"group {group.id!r}: bad or repeated member index {index}")
        seen.add(index)


def _netstrings(data: bytes) -> list[bytes]:
    """An outbox entry's values (written by ``netstrings`` in ``cluster.lua``)."""
    values: list[bytes] = []
    at = 0
    while at < len(data):
        colon = data.index(b":", at)
        end = colon + 1 + int(data[at:colon])
        values.append(data[colon + 1 : end])
        at = end
    return values


def _holder(reply: Any, own: str) -> str | None:
    """An enqueue reply as :meth:`Broker.enqueue_unique` answers it."""
    if reply == 1:
        return None
    if reply == 0:
        return own
    return _text(reply)


def _job_state(reply: Any) -> JobState | None:
    """The ``job_state`` script's reply as a :class:`JobState`."""
    if not reply:
        return None
    progress = bytes(reply[4]) if len(reply) > 4 and reply[4] is not None else None
    return JobState(_text(reply[0]), _STATES[reply[1]], int(reply[2]), progress, bool(reply[3]))


def _listed(
    queue: str, job_id: Any, body: Any, state: Any, attempts: Any, at: Any, reason: Any
) -> ListedJob:
    """A ``list_jobs`` / ``find_job`` entry as a :class:`ListedJob`."""
    return ListedJob(
        _text(job_id),
        queue,
        _STATES[bytes(state)],
        bytes(body),
        int(attempts),
        float(at) if at else None,
        _text(reason),
    )


def _event(entry: Any) -> Event:
    """A stream entry as an :class:`Event`."""
    entry_id, fields = entry
    return Event(
        EventKind(_text(fields[b"k"])),
        _text(fields[b"j"]),
        _text(fields[b"t"]),
        _text(fields[b"q"]),
        float(fields[b"a"]),
        int(fields[b"n"]),
        _text(fields[b"w"]),
        _text(fields[b"d"]),
        _text(entry_id),
    )


def _by_queue(items: Sequence[T], queue_of: Any) -> dict[str, list[tuple[int, T]]]:
    groups: dict[str, list[tuple[int, T]]] = {}
    for index, item in enumerate(items):
        groups.setdefault(queue_of(item), []).append((index, item))
    return groups


def _scatter(
    groups: Sequence[tuple[str, list[tuple[int, Any]]]], results: Sequence[Any], count: int
) -> list[Any]:
    """Per-queue script replies (one value per item) back in the order of the original items."""
    values: list[Any] = [0] * count
    for (_, items), result in zip(groups, results, strict=True):
        for (index, _), value in zip(items, result, strict=True):
            values[index] = value
    return values


@dataclasses.dataclass(slots=True)
class _Batch:
    """The ``enqueue`` script calls of a batch of messages, and where their replies go."""

    count: int
    """How many messages."""
    calls: list[Call] = dataclasses.field(default_factory=list)
    order: list[tuple[str, list[int]]] = dataclasses.field(default_factory=list)
    """Per call, its queue and the indexes of its messages in the batch."""
    repeats: list[tuple[int, int]] = dataclasses.field(default_factory=list)
    """Messages whose id an earlier one has, sent once: (index, the earlier one's index)."""


class RedisBroker(Broker):
    """Jobs in Redis, shared by every producer and worker that reaches the same server.

    Build it from a ``redis://``, ``rediss://`` or ``unix://`` URL (user and password from the
    URL, ``?prefix=`` for the key prefix), a ``redis+sentinel://`` or ``rediss+sentinel://``
    URL (``h1:26379,h2:26379/<service>/<db>``: the master Sentinel names, found again after a
    failover), or a ``redis.Redis`` client made with ``decode_responses=False`` (also one from a
    Sentinel's ``master_for()``). ``wait_replicas`` (or ``?wait_replicas=N``) makes enqueues
    and settlements wait until that many replicas hold them (``docs/redis.md``).

    Thread-safe: every call takes an idle connection of the broker's own
    :class:`~worq_redis.connection.Lane` (taken from the client's pool), so the fetch loop, the
    heartbeat and job threads never wait for one another.

    Each queue's keys live under one Cluster hash tag, next to one index of every job id under
    the prefix (ids are unique across queues), and every state change is one Lua script that uses
    Redis ``TIME``; ``clock`` replaces it in tests. The layout and the reasons behind it are in
    ``docs/redis.md``. A Redis Cluster client is refused (:class:`ClusterNotSupported`).
    """

    name: ClassVar[str] = "redis"
    schemes: ClassVar[tuple[str, ...]] = ("redis", "rediss", "unix", *SENTINEL_SCHEMES)
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
            Capability.UNIQUE,
            Capability.LIMITS,
            Capability.SCHEDULES,
            Capability.WORKFLOWS,
            Capability.LISTING,
            Capability.EVENTS,
            Capability.WORKER_LEASES,
        }
    )

    def __init__(
        self,
        url: str | redis.Redis = DEFAULT_URL,
        settings: RedisSettings | None = None,
        *,
        prefix: str | None = None,
        clock: Clock | None = None,
        wait_replicas: int | None = None,
    ) -> None:
        self.client, self.url, self.settings, self._owned = self._connect(url, settings, prefix)
        if wait_replicas is not None:
            self.settings = dataclasses.replace(self.settings, wait_replicas=wait_replicas)
        self.prefix = self.settings.prefix
        self.clock = clock
        self._keys: dict[str, tuple[str, ...]] = {}
        self._heads: dict[str, tuple[Arg, ...]] = {}  # numkeys and keys, as EVALSHA takes them
        self._enqueue_heads: dict[str, tuple[Arg, ...]] = {}  # the same and the queue registry
        self._one_heads: dict[str, tuple[Arg, ...]] = {}  # enqueue_one's: 5 queue keys, the index
        self._known: set[str] = set()
        self._lock = threading.Lock()
        self._ids = ids_key(self.prefix)
        self._registry = registry_key(self.prefix)
        self._schedules = schedules_key(self.prefix)
        self._events = events_key(self.prefix)
        self._ids_head: tuple[Arg, ...] = (1, self._ids)
        self._lane: Lane | ClusterLane = (
            ClusterLane(cast("redis.RedisCluster", self.client))
            if self._cluster
            else Lane(self.client)
        )
        s = self.settings
        # dead-letter retention, applied by every script that settles or reads dead jobs
        self._retention: tuple[Arg, ...] = (s.dead_max_count, repr(s.dead_max_age))
        self._fetch_tail: tuple[Arg, ...] = (s.reap_batch, s.promote_batch)
        # WAIT's arguments after each enqueue and settlement, or None
        self._wait: tuple[Arg, ...] | None = None
        if s.wait_replicas:
            self._wait = (s.wait_replicas, max(1, round(s.wait_timeout * 1000)))
        # the asyncio enqueue's lane of each event loop that used it (its connections are bound
        # to that loop); False once the client turned out to have no asyncio twin
        self._async_lanes: weakref.WeakKeyDictionary[AbstractEventLoop, AsyncLane] = (
            weakref.WeakKeyDictionary()
        )
        self._async_ok = not self._cluster

    _cluster: ClassVar[bool] = False
    """Redis Cluster layout: each queue's own id index, lookups by id queue by queue."""
    _settle_script: ClassVar[Script] = _SETTLE
    _settle_fetch_script: ClassVar[Script] = _SETTLE_FETCH
    _cancel_script: ClassVar[Script] = _CANCEL

    @staticmethod
    def _connect(
        target: object, settings: RedisSettings | None, prefix: str | None
    ) -> tuple[redis.Redis, str, RedisSettings, bool]:
        return connect(target, settings, prefix)

    @override
    @classmethod
    def from_url(cls, url: str) -> Self:
        return cls(url)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {redact(self.url).split('@')[-1]} prefix={self.prefix!r}>"

    # -- producer side -----------------------------------------------------------------------

    @override
    def enqueue(self, messages: Sequence[Message]) -> list[bool]:
        """Add jobs, all or nothing: one script call per queue and chunk.

        An id is added only if no queue of the prefix holds it (the script checks and adds in
        one step, against the prefix's id index). A message with ``clear_record`` that is added
        has its old record deleted by the same script. A batch that needs several calls runs
        them in one ``MULTI``/``EXEC`` transaction (an id sent twice counts once, the first
        time). A message with :attr:`Message.unique` is added only if its key is free, as
        :meth:`enqueue_unique` adds it. Raises :class:`BrokerConnectionError` within about
        ``connect_timeout`` or ``socket_timeout`` (times ``retries + 1``) when Redis cannot be
        reached.
        """
        return [reply == 1 for reply in self._add(messages)]

    @override
    def enqueue_unique(self, messages: Sequence[Message]) -> list[str | None]:
        """:meth:`enqueue`, answering per message ``None`` (added) or the id that stands for it.

        The same scripts as :meth:`enqueue`: a unique job's key is ``u:<key>`` under its
        queue's hash tag, holding the holder's id, checked and taken in the step that adds it.
        """
        replies = self._add(messages)
        return [_holder(reply, m.id) for reply, m in zip(replies, messages, strict=True)]

    @override
    async def enqueue_async(self, messages: Sequence[Message]) -> list[bool]:
        """:meth:`enqueue` from the event loop itself, on a ``redis.asyncio`` connection.

        The same script, answers and errors as :meth:`enqueue` (``BrokerConnectionError`` when
        Redis cannot be reached, :class:`ReplicasBehind` with ``wait_replicas``), with no thread
        hand-off. Each event loop gets connections of its own. On a Sentinel master it follows
        failovers as the blocking client does. Under Redis Cluster (and for a client whose
        connection class has no asyncio twin) it runs :meth:`enqueue` on a thread.
        """
        return [reply == 1 for reply in await self._add_async(messages)]

    @override
    async def enqueue_unique_async(self, messages: Sequence[Message]) -> list[str | None]:
        """:meth:`enqueue_unique` from the event loop itself, as :meth:`enqueue_async`."""
        replies = await self._add_async(messages)
        return [_holder(reply, m.id) for reply, m in zip(replies, messages, strict=True)]

    async def _add_async(self, messages: Sequence[Message]) -> list[Any]:
        """:meth:`_add` on this event loop's :class:`AsyncLane`, or on a thread without one."""
        lane = await self._async_lane()
        if lane is None:
            import asyncio

            return await asyncio.to_thread(self._add, messages)
        if not messages:
            return []
        single = self._single_call(messages)
        try:
            if single is not None:
                script, head, args = single
                if self._wait is None:
                    flags = await lane.script(script, head, args)
                else:
                    keys = cast("Sequence[str]", head[1:])
                    flags, acked = await lane.scripts([(script, keys, args)], wait=self._wait)
                    self._replicated(acked, strict=True)
                return [flags[0]]
            batch = self._batch_calls(messages)
            if len(batch.calls) == 1:
                results = await lane.scripts(batch.calls, wait=self._wait)
            else:
                results = await lane.transaction(batch.calls, wait=self._wait)
            return self._batch_replies(batch, results)
        except RedisError as exc:
            raise self._error(exc) from exc

    async def _async_lane(self) -> AsyncLane | None:
        """The running event loop's lane (made on its first enqueue), or ``None`` for none.

        A lane's connections are closed when its loop shuts down its async generators (as
        ``asyncio.run`` and uvicorn do before closing it), through a generator that waits for
        that moment, or by :meth:`close`.
        """
        if not self._async_ok:
            return None
        import asyncio

        loop = asyncio.get_running_loop()
        lane = self._async_lanes.get(loop)
        if lane is None:
            pool = async_pool(self.client, self.settings)
            if pool is None:
                self._async_ok = False
                return None
            s = self.settings
            lane = AsyncLane(pool, s.retries, s.async_connections)
            self._async_lanes[loop] = lane
            await lane.close_with_loop()
        return lane

    def _add(self, messages: Sequence[Message]) -> list[Any]:
        """Enqueue; per message the script's answer: 1 added, 0 id held, or the key's holder."""
        if self._cluster and messages:
            with self._errors():
                held = self._held_elsewhere(messages)
            if held:
                replies = iter(self._send([m for m in messages if m.id not in held]))
                return [0 if m.id in held else next(replies) for m in messages]
        return self._send(messages)

    def _held_elsewhere(self, messages: Sequence[Message]) -> set[str]:
        """Under Cluster, the ids of ``messages`` that another queue's index holds.

        Each queue's index is in its own slot, so this check is a step before the enqueue
        script (the registry, then one ``HMGET`` per other queue, pipelined per node), not
        part of it: two producers adding one id to two queues at the same moment may both
        succeed.
        """
        members = self._lane.command("SMEMBERS", self._registry)
        queues = sorted(self._known | {_text(q) for q in members})
        wanted: dict[str, list[str]] = {}
        for m in messages:
            wanted.setdefault(m.queue, []).append(m.id)
        checks: list[tuple[list[str], tuple[Arg, ...]]] = []
        for target, ids in wanted.items():
            for other in queues:
                if other != target:
                    checks.append((ids, ("HMGET", cluster_ids_key(self.prefix, other), *ids)))
        if not checks:
            return set()
        replies = self._lane.pipeline([command for _, command in checks])
        held: set[str] = set()
        for (ids, _), reply in zip(checks, replies, strict=True):
            if isinstance(reply, Exception):
                raise reply
            held.update(i for i, found in zip(ids, reply, strict=True) if found is not None)
        return held

    def _send(self, messages: Sequence[Message]) -> list[Any]:
        """:meth:`_add` after the checks that precede the scripts (none but under Cluster)."""
        single = self._single_call(messages)
        if single is not None:
            script, head, args = single
            try:
                if self._wait is None:
                    flags = self._lane.script(script, head, args)
                else:
                    keys = cast("Sequence[str]", head[1:])
                    flags, acked = self._lane.scripts([(script, keys, args)], wait=self._wait)
                    self._replicated(acked, strict=True)
            except RedisError as exc:
                raise self._error(exc) from exc
            return [flags[0]]
        if not messages:
            return []
        batch = self._batch_calls(messages)
        with self._errors():
            if len(batch.calls) == 1 or isinstance(self._lane, ClusterLane):
                # Under Cluster each call is atomic alone: a MULTI cannot span slots.
                results = self._lane.scripts(batch.calls, wait=self._wait)
            else:
                results = self._lane.transaction(batch.calls, wait=self._wait)
            return self._batch_replies(batch, results)

    def _single_call(
        self, messages: Sequence[Message]
    ) -> tuple[Script, tuple[Arg, ...], list[Arg]] | None:
        """The script, key part and values of the one call that enqueues one message, or ``None``.

        The common case, kept lean: one message for a queue this broker registered (its keys
        are cached). A plain job (no eta, unique key, limits, workflow record or record to
        clear) goes through ``enqueue_one``, the rest through ``enqueue``. ``None`` for anything
        else, which :meth:`_batch_calls` sends.
        """
        if len(messages) != 1 or messages[0].queue not in self._known:
            return None
        m = messages[0]
        if (
            m.eta is None
            and not (m.clear_record and not self._cluster)
            and m.unique is None
            and m.rate is None
            and m.concurrency is None
            and m.member is None
            and not m.closes
        ):
            return _ENQUEUE_ONE, self._one_heads[m.queue], [m.queue, m.id, m.body, str(-m.priority)]
        head = self._enqueue_heads[m.queue]
        clear: Arg = 0
        if m.clear_record and not self._cluster:  # under Cluster worq-core clears it
            clear = len(head)  # the result key goes last: KEYS[numkeys + 1]
            head = (clear, *head[1:], result_keys(self.prefix, m.id)[0])
        args: list[Arg] = [
            "" if self.clock is None else clock_arg(self.clock),
            m.queue,
            0,
            1,
            m.id,
            m.body,
            str(-m.priority),
            "" if m.eta is None else repr(float(m.eta)),
            clear,
        ]
        if m.member is not None or m.closes:
            args += (*(_specs(m) or (b"", b"")), _wspec(m))
        elif m.unique is not None or m.rate is not None or m.concurrency is not None:
            args += _specs(m) or ()
        return _ENQUEUE, head, args

    def _batch_calls(self, messages: Sequence[Message]) -> _Batch:
        """The ``enqueue`` calls of ``messages`` (one per queue and chunk), each id sent once."""
        batch = _Batch(len(messages))
        first: dict[str, int] = {}
        unique: list[tuple[int, Message]] = []
        for index, message in enumerate(messages):
            earlier = first.setdefault(message.id, index)
            if earlier == index:
                unique.append((index, message))
            else:
                batch.repeats.append((index, earlier))
        chunk = self.settings.enqueue_chunk
        clock = clock_arg(self.clock)
        scores: dict[int, str] = {}
        for queue, items in _by_queue(unique, lambda item: item[1].queue).items():
            if self._cluster:  # the registry is in another slot: added to after the script
                keys, register = self._queue_keys(queue), 0
            else:
                keys = (*self._queue_keys(queue), self._registry)
                register = 0 if queue in self._known else 1
            for start in range(0, len(items), chunk):
                part = items[start : start + chunk]
                args: list[Arg] = [clock, queue, register, len(part)]
                extra_keys: list[str] = []
                specs: list[Arg] | None = None  # only once some message has specs
                width = 3 if any(m.member is not None or m.closes for _, (_, m) in part) else 2
                for done, (_, (_, message)) in enumerate(part):
                    clear = 0
                    if message.clear_record and not self._cluster:
                        extra_keys.append(result_keys(self.prefix, message.id)[0])
                        clear = len(keys) + len(extra_keys)
                    score = scores.get(message.priority)
                    if score is None:
                        score = scores[message.priority] = str(-message.priority)
                    args += (
                        message.id,
                        message.body,
                        score,
                        "" if message.eta is None else repr(float(message.eta)),
                        clear,
                    )
                    if (
                        message.unique is None
                        and message.rate is None
                        and message.concurrency is None
                        and width == 2
                    ):
                        spec: tuple[bytes, ...] | None = None
                    else:
                        spec = _specs(message)
                        if width == 3:
                            spec = (*(spec or (b"", b"")), _wspec(message))
                    if spec is not None and specs is None:
                        specs = [b""] * (width * done)  # the plain messages before this one
                    if specs is not None:
                        specs += spec or (b"", b"")
                batch.calls.append((_ENQUEUE, [*keys, *extra_keys], args + (specs or [])))
                batch.order.append((queue, [index for _, (index, _) in part]))
        return batch

    def _batch_replies(self, batch: _Batch, results: list[Any]) -> list[Any]:
        """Per message, the reply of :meth:`_batch_calls`' scripts (``WAIT``'s last, if any)."""
        if self._wait is not None:
            self._replicated(results.pop(), strict=True)
        replies: list[Any] = [0] * batch.count
        for (queue, indexes), result in zip(batch.order, results, strict=True):
            for index, reply in zip(indexes, result, strict=True):
                replies[index] = reply
            if queue not in self._known and any(reply == 1 for reply in result):
                if self._cluster:
                    self._lane.command("SADD", self._registry, queue)
                with self._lock:  # registered by the script that added a job to it
                    self._known.add(queue)
        for index, earlier in batch.repeats:  # an id sent twice: held by the first if added
            replies[index] = 0 if replies[earlier] == 1 else replies[earlier]
        return replies

    # -- schedules ---------------------------------------------------------------------------

    @override
    def fire_schedule(
        self,
        schedule: str,
        tick: float,
        last: float | None,
        message: Message | None,
        queue: str | None = None,
    ) -> bool:
        """One script: the compare-and-set on ``<prefix>:schedules`` and the job's enqueue.

        The record is the ``repr`` of the tick, compared as text (so exactly); one hash holds
        every queue's schedules, so ``queue`` is not needed. With a message, the script runs on
        that queue's keys (plus the schedules hash) and sends the job as a workflow's messages
        are sent (the same ten values, added as ``enqueue`` adds a job); without one it is a
        script on the hash alone.
        """
        tick_arg = repr(float(tick))
        last_arg = "" if last is None else repr(float(last))
        clock = clock_arg(self.clock)
        with self._errors():
            if message is None:
                values = (clock, schedule, tick_arg, last_arg)
                return bool(self._lane.script(_SCHEDULE_CAS, (1, self._schedules), values))
            m, queue = message, message.queue
            keys = [*self._queue_keys(queue), self._registry, self._schedules]
            args = (
                clock,
                schedule,
                tick_arg,
                last_arg,
                *_message_values(m, queue not in self._known),
            )
            replies = self._lane.scripts([(_FIRE_SCHEDULE, keys, args)], wait=self._wait)
            if self._wait is not None:
                self._replicated(replies.pop(), strict=True)
            applied, added = replies[0]
        if added == 1 and queue not in self._known:
            with self._lock:
                self._known.add(queue)
        return bool(applied)

    @override
    def schedule_fires(
        self, schedules: Sequence[str] | None = None, queues: Mapping[str, str] | None = None
    ) -> dict[str, float]:
        """The records in ``<prefix>:schedules``: one ``HGETALL``, or one ``HMGET`` of the names."""
        with self._errors():
            if schedules is None:
                reply = self._lane.command("HGETALL", self._schedules)
                if isinstance(reply, dict):  # RESP3
                    return {_text(k): float(v) for k, v in reply.items()}
                return {_text(reply[i]): float(reply[i + 1]) for i in range(0, len(reply), 2)}
            names = list(schedules)
            if not names:
                return {}
            values = self._lane.command("HMGET", self._schedules, *names)
        return {n: float(v) for n, v in zip(names, values, strict=True) if v is not None}

    # -- workflows ---------------------------------------------------------------------------

    @override
    def open_group(self, group: GroupSpec, members: Sequence[Message]) -> list[bool]:
        """One ``open_group`` script: record the group in ``<prefix>:grp:{<id>}`` and add members.

        Each member (and later the callback) goes to its own queue, whose keys the script builds
        by name. A group already recorded raises :class:`ValueError` and adds nothing.
        """
        _check_group(group, members)
        cb = group.callback
        home = members[0].queue if members else cb.queue if cb is not None else "-"
        keys = (*self._queue_keys(home), self._registry, group_key(self.prefix, group.id))
        args: list[Arg] = [
            clock_arg(self.clock),
            group.size,
            max(1, round(group.ttl * 1000)),
            1 if group.run_on_failure else 0,
            0 if cb is None else 1,
            *(_NO_MESSAGE if cb is None else _message_values(cb, cb.queue not in self._known)),
            len(members),
        ]
        for m in members:
            args += _message_values(m, m.queue not in self._known)
        with self._errors():
            replies = self._lane.scripts([(_OPEN_GROUP, keys, args)], wait=self._wait)
            if self._wait is not None:
                self._replicated(replies.pop(), strict=True)
            reply = replies[0]
        if reply is None:
            raise ValueError(f"group {group.id!r} is already recorded")
        added = [flag == 1 for flag in reply]
        with self._lock:
            self._known.update(m.queue for m, ok in zip(members, added, strict=True) if ok)
        return added

    @override
    def group_state(self, group_id: str) -> GroupState | None:
        """The group's hash, one ``HGETALL``; ``None`` once released or expired (or unknown)."""
        with self._errors():
            reply = self._lane.command("HGETALL", group_key(self.prefix, group_id))
        if isinstance(reply, dict):  # RESP3
            fields = {bytes(k): bytes(v) for k, v in reply.items()}
        else:
            fields = {bytes(reply[i]): bytes(reply[i + 1]) for i in range(0, len(reply), 2)}
        if b"size" not in fields:
            return None
        size = int(fields[b"size"])
        outputs: list[bytes | None] = [None] * size
        finished: set[int] = set()
        failed: set[int] = set()
        for index in range(size):
            value = fields.get(b"i:%d" % index)
            if value is None:
                continue
            finished.add(index)
            if value[:1] != b"a":
                failed.add(index)
            if value[1:2] == b"=":
                outputs[index] = value[2:]
        callback = fields.get(b"ci")
        return GroupState(
            id=group_id,
            size=size,
            outputs=tuple(outputs),
            finished=frozenset(finished),
            failed=frozenset(failed),
            callback_id=None if callback is None else callback.decode(),
            complete=len(finished) == size,
            callback_sent=fields.get(b"sent") == b"1",
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
        """Lease up to ``limit`` due jobs; when none, block on the queues' wake-up keys.

        Each fetch first returns a bounded number of expired leases to their queue and moves due
        delayed jobs to ready. Blocking uses ``BZPOPMIN`` on the queues' ``signal`` keys, with a
        timeout no longer than the time to the next due job or lease deadline. With ``worker``,
        the leases join that worker's record in their queue (``held:<worker>``), which
        :meth:`extend_worker` renews.
        """
        return self.settle_and_fetch([], queues, limit, lease=lease, wait=wait, worker=worker)[1]

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
        """Settle, then fetch from the first queue: one ``settle_fetch`` script, one round trip.

        Settlements of jobs from other queues go in the same pipelined round trip (one ``settle``
        script per queue, so no script spans two queues' slots). Further queues cost one more
        round trip each, only while the earlier ones did not fill ``limit``.
        """
        if limit <= 0 or not queues:
            return self.settle(settlements), []
        deadline = time.monotonic() + wait
        first = queues[0]
        clock = "" if self.clock is None else clock_arg(self.clock)
        lease_arg = repr(float(lease))
        holder = "" if worker is None else _worker_arg(worker)
        mine: Sequence[Settlement] = settlements
        others: list[tuple[int, Settlement]] = []
        if settlements and any(s.delivery.queue != first for s in settlements):
            mine = [s for s in settlements if s.delivery.queue == first]
            others = [(i, s) for i, s in enumerate(settlements) if s.delivery.queue != first]
        if self._cluster:
            self._sweep(queues)
        keys = self._queue_keys(first)
        args: list[Arg] = [clock, *self._retention, len(mine)]
        blocks: list[Arg] = []
        all_keys = self._settle_args(mine, first, args, blocks) if mine else keys
        head: tuple[Arg, ...] = (len(all_keys), *all_keys) if mine else self._heads[first]
        args += (limit, lease_arg, *self._fetch_tail)
        if blocks:
            args += (holder, *blocks)  # with blocks the worker is always sent, "" for none
        elif holder:
            args.append(holder)
        replicas = self._wait if settlements else None
        try:
            if not others and replicas is None:
                replied = self._lane.script(self._settle_fetch_script, head, args)
                other_flags: list[Any] = []
            else:
                calls, groups = self._settle_calls([s for _, s in others], clock)
                calls.append((self._settle_fetch_script, all_keys, args))
                replies = self._lane.scripts(calls, wait=replicas)
                if replicas is not None:
                    self._replicated(replies.pop(), strict=False)
                *other_flags, replied = replies
        except RedisError as exc:
            raise self._error(exc) from exc
        if self._cluster:  # each reply comes with the outbox entries its script added
            outbox: dict[str, list[bytes]] = {}
            replied = self._unwrap(first, replied, outbox)
            if others:
                other_flags = [
                    self._unwrap(queue, flags, outbox)
                    for (queue, _), flags in zip(groups, other_flags, strict=True)
                ]
            self._forward(outbox)
        flags, reply = replied
        if others:
            applied = [False] * len(settlements)
            mine_at = [i for i, s in enumerate(settlements) if s.delivery.queue == first]
            for index, flag in zip(mine_at, flags, strict=True):
                applied[index] = bool(flag)
            for (_, items), result in zip(groups, other_flags, strict=True):
                for (index, _), flag in zip(items, result, strict=True):
                    applied[others[index][0]] = bool(flag)
        else:
            applied = [bool(flag) for flag in flags]
        deliveries: list[Delivery] = []
        soonest = self._parse_fetch(first, reply, deliveries)
        try:
            while True:
                for queue in queues[1:]:
                    need = limit - len(deliveries)
                    if need <= 0:
                        break
                    due_in = self._fetch_one(queue, need, lease_arg, holder, deliveries)
                    if due_in is not None:
                        soonest = due_in if soonest is None else min(soonest, due_in)
                if deliveries:
                    return applied, deliveries
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return applied, []
                if soonest is None or soonest > 0:
                    timeout = min(remaining, soonest if soonest is not None else remaining)
                    timeout = max(0.001, min(timeout, self.settings.blocking_timeout))
                    signals = [self._queue_keys(q)[6] for q in queues]
                    if self._cluster and len(queues) > 1:
                        # One blocking call names keys of one slot: wait on the queues in the
                        # first one's, and look at the others again soon.
                        slot = key_slot(signals[0].encode())
                        signals = [s for s in signals if key_slot(s.encode()) == slot]
                        if len(signals) < len(queues):
                            timeout = min(timeout, _CLUSTER_POLL)
                    self._lane.command("BZPOPMIN", *signals, f"{timeout:.3f}")
                # else: more due work than one fetch moves; fetch again now
                soonest = self._fetch_one(first, limit, lease_arg, holder, deliveries)
        except RedisError as exc:
            raise self._error(exc) from exc

    @override
    def extend(
        self,
        deliveries: Sequence[Delivery],
        lease: float,
        progress: Mapping[str, bytes] | None = None,
    ) -> list[LeaseState]:
        """Renew leases, one script per queue, all in one round trip.

        ``progress`` of a held lease is kept in its queue's ``progress`` hash (the same script)
        until the job leaves its lease; :attr:`LeaseState.CANCELLING` when a cancel was asked.
        """
        if not deliveries:
            return []
        calls: list[Call] = []
        groups = list(_by_queue(deliveries, lambda d: d.queue).items())
        clock, lease_arg = clock_arg(self.clock), repr(float(lease))
        for queue, items in groups:
            args: list[Arg] = [clock, lease_arg]
            for _, delivery in items:
                latest = None if progress is None else progress.get(delivery.id)
                if latest is None:
                    args += [delivery.id, delivery.token, 0, b""]
                else:
                    args += [delivery.id, delivery.token, 1, bytes(latest)]
            calls.append((_EXTEND, self._queue_keys(queue), args))
        with self._errors():
            results = self._lane.scripts(calls)
        return [_LEASES[int(code)] for code in _scatter(groups, results, len(deliveries))]

    @override
    def extend_worker(
        self,
        worker: str,
        queues: Sequence[str],
        lease: float,
        progress: Mapping[str, bytes] | None = None,
    ) -> dict[str, LeaseState]:
        """Renew the leases in ``worker``'s record of each queue, whatever their number.

        One ``extend_worker`` script per queue, all in one round trip (under Cluster, one per
        node).
        """
        holder = _worker_arg(worker)
        clock, lease_arg = clock_arg(self.clock), repr(float(lease))
        pairs: list[Arg] = []
        for job_id, latest in (progress or {}).items():
            pairs += (job_id, bytes(latest))
        calls: list[Call] = [
            (_EXTEND_WORKER, self._queue_keys(queue), [clock, lease_arg, holder, *pairs])
            for queue in dict.fromkeys(queues)
        ]
        with self._errors():
            results = self._lane.scripts(calls) if calls else []
        return {
            _text(reply[i]): _LEASES[int(reply[i + 1])]
            for reply in results
            for i in range(0, len(reply), 2)
        }

    @override
    def settle(self, settlements: Sequence[Settlement]) -> list[bool]:
        """Apply verdicts, one script per queue, in one round trip.

        A ``Settlement.record`` that is not ``None`` is written (with ``Settlement.ttl``) into
        this prefix's result key of the job by the same script, whatever the outcome, and only
        if the settlement is applied; worq-core sets it only when :meth:`stores_results_in`.
        """
        if not settlements:
            return []
        calls, groups = self._settle_calls(settlements, clock_arg(self.clock))
        with self._errors():
            results = self._lane.scripts(calls, wait=self._wait)
        if self._wait is not None:
            self._replicated(results.pop(), strict=False)
        if self._cluster:  # each reply comes with the outbox entries its script added
            outbox: dict[str, list[bytes]] = {}
            results = [
                self._unwrap(queue, result, outbox)
                for (queue, _), result in zip(groups, results, strict=True)
            ]
            self._forward(outbox)
        return [bool(flag) for flag in _scatter(groups, results, len(settlements))]

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
            self._lane.scripts(calls)

    def reap(self, queue: str, limit: int = 1000) -> int:
        """Return up to ``limit`` expired leases of ``queue`` to ready now; how many moved.

        Fetching does this already in bounded steps; this is for admin tools and tests.
        """
        with self._errors():
            return int(self._script("reap", queue, [clock_arg(self.clock), limit]))

    @override
    def stores_results_in(self, storage: Storage) -> bool:
        """True for a :class:`RedisStorage` on the same server, database and key prefix.

        A pure question: the scripts write whatever records they are handed
        (``Settlement.record``, ``Message.clear_record``, the record of :meth:`cancel`).
        """
        return self._shares_server(storage)

    @override
    def job_status(self, job_id: str, storage: Storage) -> tuple[JobState | None, bytes | None]:
        """The job's state and record in one round trip when ``storage`` is on this server.

        ``job_state`` and a ``GET`` of the record are pipelined, in that order, so a job that
        finishes in between is still seen. Otherwise the two calls of the default.
        """
        if not self._shares_server(storage):
            return super().job_status(job_id, storage)
        values = self._job_state_values(job_id)
        state_call = ("EVALSHA", _JOB_STATE.sha, *self._ids_head, *values)
        get = ("GET", result_keys(self.prefix, job_id)[0])
        with self._errors():
            state, record = self._lane.pipeline([state_call, get])
            if isinstance(state, NoScriptError):
                state = self._lane.script(_JOB_STATE, self._ids_head, values)
            for reply in (state, record):
                if isinstance(reply, Exception):
                    raise reply
        return _job_state(state), (None if record is None else bytes(record))

    @override
    def cancel(self, job_id: str, record: bytes | None = None, ttl: float = 0.0) -> CancelOutcome:
        """Cancel the job wherever it is, in one ``cancel`` script on its queue's keys.

        The job's queue is read from the id index first (a plain ``HGET``), so the script gets
        every key it touches in ``KEYS``; the script checks the index again and, if the job
        moved to another queue in between, the lookup is repeated. ``record`` is written with
        ``ttl`` (waking waiters) only when a waiting job is removed. Two round trips.
        """
        with self._errors():
            for _ in range(_CANCEL_LOOKUPS):
                found = self._home(job_id)
                if found is None:
                    return CancelOutcome.NOT_FOUND
                queue = found
                keys = self._queue_keys(queue)
                args: list[Arg] = [clock_arg(self.clock), job_id, queue, 0, b""]
                if record is not None:
                    keys = (*keys, *result_keys(self.prefix, job_id))
                    args[3:] = [int(ttl * 1000), record]
                reply = self._lane.script(self._cancel_script, (len(keys), *keys), args)
                if self._cluster:
                    outbox: dict[str, list[bytes]] = {}
                    reply = self._unwrap(queue, reply, outbox)
                    self._forward(outbox)
                outcome = _CANCELS.get(bytes(reply))
                if outcome is not None:
                    return outcome
        raise BrokerError(f"job {job_id} kept moving between queues; cancel gave up")

    def _shares_server(self, storage: Storage) -> bool:
        return (
            not self._cluster
            and isinstance(storage, RedisStorage)
            and storage.prefix == self.prefix
            and server_identity(storage.client) == server_identity(self.client)
        )

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
            fields["current"] = tuple(fields.get("current", ()))  # older workers had none
            found.append(WorkerInfo(**fields))
        return sorted(found, key=lambda w: (w.started, w.id))

    # -- inspection and admin ----------------------------------------------------------------

    @override
    def job_state(self, job_id: str) -> JobState | None:
        """Where the job is, from the id index and its queue's keys, in one read-only script."""
        with self._errors():
            head = self._lookup_head(job_id)
            if head is None:
                return None
            reply = self._lane.script(_JOB_STATE, head, self._job_state_values(job_id))
        return _job_state(reply)

    @override
    def stats(self, queues: Sequence[str] | None = None) -> list[QueueStats]:
        with self._errors():
            if queues is None:
                members = self.client.smembers(registry_key(self.prefix))
                queues = sorted(_text(m) for m in members)
            if not queues:
                return []
            args: list[Arg] = [clock_arg(self.clock), *self._retention]
            results = self._lane.scripts(
                [(SCRIPTS["stats"], self._queue_keys(q), args) for q in queues]
            )
        return [
            QueueStats(q, ready=int(r[0]), delayed=int(r[1]), running=int(r[2]), dead=int(r[3]))
            for q, r in zip(queues, results, strict=True)
        ]

    @override
    def dead_jobs(self, queue: str, limit: int = 100) -> list[DeadJob]:
        args: list[Arg] = [clock_arg(self.clock), *self._retention, limit]
        with self._errors():
            flat = self._script("dead_jobs", queue, args)
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
    def list_jobs(
        self, queue: str, status: JobStatus, offset: int = 0, limit: int = 50
    ) -> list[ListedJob]:
        """A page from one sorted set of the queue, in one read-only script (``list_jobs``)."""
        which = _LISTED.get(status)
        if which is None:
            raise BrokerError(f"cannot list jobs by status {status.value!r}")
        with self._errors():
            flat = self._script("list_jobs", queue, [which, max(0, offset), limit])
        return [_listed(queue, *flat[i : i + 6]) for i in range(0, len(flat), 6)]

    @override
    def find_job(self, job_id: str) -> ListedJob | None:
        with self._errors():
            head = self._lookup_head(job_id)
            if head is None:
                return None
            reply = self._lane.script(_FIND_JOB, head, (job_id, self.prefix))
        if not reply:
            return None
        queue, state, attempts, body, at, reason = reply
        return _listed(_text(queue), job_id, body, state, attempts, at, reason)

    @override
    def publish_events(self, events: Sequence[Event]) -> None:
        """One pipelined ``XADD ... MAXLEN ~`` per event: the stream keeps about ``events_max``."""
        if not events:
            return
        cap = self.settings.events_max
        with self._errors(), self.client.pipeline(transaction=False) as pipe:
            for event in events:
                fields: dict[Any, Any] = {
                    "k": event.kind.value,
                    "j": event.job_id,
                    "t": event.task,
                    "q": event.queue,
                    "a": repr(event.at),
                    "n": event.attempt,
                    "w": event.worker,
                    "d": event.detail,
                }
                pipe.xadd(self._events, fields, maxlen=cap, approximate=True)
            pipe.execute()

    @override
    def read_events(
        self, after: str | None = None, limit: int = 100, timeout: float = 0.0
    ) -> list[Event]:
        """``XREVRANGE`` for the newest; ``XREAD BLOCK`` (``block_max`` at most a call) after."""
        if limit <= 0:
            return []
        with self._errors():
            if after is None:
                newest: Any = self.client.xrevrange(self._events, "+", "-", count=limit)
                return [_event(entry) for entry in reversed(newest)]
            deadline = time.monotonic() + timeout
            while True:
                left = deadline - time.monotonic()
                block = max(1, int(min(left, self.settings.block_max) * 1000)) if left > 0 else None
                reply: Any = self.client.xread({self._events: after}, count=limit, block=block)
                if reply:
                    return [_event(entry) for entry in reply[0][1]]
                if block is None or time.monotonic() >= deadline:
                    return []

    @override
    def requeue_dead(self, queue: str, job_ids: Sequence[str] | None = None) -> int:
        args: list[Arg] = [clock_arg(self.clock), *self._retention]
        args += ["all" if job_ids is None else "ids", *(job_ids or [])]
        with self._errors():
            return int(self._script("requeue_dead", queue, args))

    @override
    def purge_dead(self, queue: str) -> int:
        with self._errors():
            return int(self._script("purge_dead", queue, [clock_arg(self.clock), *self._retention]))

    @override
    def recipe(self) -> Callable[[], Broker] | None:
        """This class with this broker's URL and settings; ``None`` around a client handed to it.

        A client the user built carries options no URL states (and a test clock is no setting),
        so the lease keeper then imports the app to build the broker as the app does. So does
        a subclass with a constructor of its own, unless it gives its own recipe.
        """
        our_constructor = type(self).__init__ in (RedisBroker.__init__, RedisClusterBroker.__init__)
        if not self._owned or self.clock is not None or not our_constructor:
            return None
        s = self.settings  # the URL's prefix and wait_replicas must not override the settings
        return functools.partial(
            type(self), self.url, s, prefix=s.prefix, wait_replicas=s.wait_replicas
        )

    @override
    def close(self) -> None:
        """Give the lane's connections back; close the pool unless the client was handed to us.

        The asyncio connections of :meth:`enqueue_async` are closed on their own event loop:
        at once when it is this thread's running loop, else handed to it (a loop already closed
        took its sockets with it).
        """
        self._lane.close()
        if self._owned:
            close_client(self.client)
        lanes = list(self._async_lanes.items())
        self._async_lanes.clear()
        if lanes:
            import asyncio

            try:
                running: AbstractEventLoop | None = asyncio.get_running_loop()
            except RuntimeError:
                running = None
            for loop, lane in lanes:
                if loop is running:
                    closing = loop.create_task(lane.close())
                    _CLOSING.add(closing)  # a task nothing refers to may be collected half done
                    closing.add_done_callback(_CLOSING.discard)
                elif not loop.is_closed():
                    asyncio.run_coroutine_threadsafe(lane.close(), loop)

    # -- internals -----------------------------------------------------------------------------

    def _errors(self) -> Any:
        return translate_errors(self.url, BrokerConnectionError, BrokerError)

    def _replicated(self, acked: Any, *, strict: bool) -> None:
        """Check ``WAIT``'s reply: raise :class:`ReplicasBehind` (``strict``) or log it.

        Enqueues are strict (the producer must know its job may not survive a failover);
        a settlement that stands on the master only is logged, since the worker cannot undo it
        and the worst a failover does to it is run the job again.
        """
        wanted = self.settings.wait_replicas
        if int(acked) >= wanted:
            return
        if strict:
            raise ReplicasBehind(self.url, wanted, int(acked), self.settings.wait_timeout)
        log.warning(
            "only %d of %d replicas confirmed a settlement within %ss; a failover now may run "
            "its jobs again",
            int(acked),
            wanted,
            self.settings.wait_timeout,
        )

    def _script(self, name: str, queue: str, args: Sequence[Arg]) -> Any:
        self._queue_keys(queue)
        return self._lane.script(SCRIPTS[name], self._heads[queue], args)

    def _home(self, job_id: str) -> str | None:
        """The queue whose index holds ``job_id``, or ``None``.

        One ``HGET`` of the prefix's index; under Cluster, where each queue has its own, one
        ``HEXISTS`` per queue the registry (or this broker) knows, pipelined per node.
        """
        if not self._cluster:
            found = self._lane.command("HGET", self._ids, job_id)
            return None if found is None else _text(found)
        members = self._lane.command("SMEMBERS", self._registry)
        queues = sorted(self._known | {_text(q) for q in members})
        checks = [("HEXISTS", cluster_ids_key(self.prefix, q), job_id) for q in queues]
        for queue, held in zip(queues, self._lane.pipeline(checks) if checks else [], strict=True):
            if isinstance(held, Exception):
                raise held
            if held:
                return queue
        return None

    def _lookup_head(self, job_id: str) -> tuple[Arg, ...] | None:
        """The key part of ``job_state`` and ``find_job``: the index that holds the job."""
        if not self._cluster:
            return self._ids_head
        queue = self._home(job_id)
        return None if queue is None else (1, cluster_ids_key(self.prefix, queue))

    def _job_state_values(self, job_id: str) -> tuple[Arg, ...]:
        """The values of the ``job_state`` script (its one key is the id index)."""
        return (clock_arg(self.clock), job_id, self.prefix)

    def _worker_keys(self) -> tuple[str, str]:
        return f"{self.prefix}:workers", f"{self.prefix}:workers:seen"

    def _queue_keys(self, queue: str) -> tuple[str, ...]:
        keys = self._keys.get(queue)
        if keys is None:
            keys = queue_keys(self.prefix, queue, cluster=self._cluster)
            self._heads[queue] = (len(keys), *keys)
            if self._cluster:  # the registry is in another slot: added to after the script
                self._enqueue_heads[queue] = self._heads[queue]
            else:
                self._enqueue_heads[queue] = (len(keys) + 1, *keys, self._registry)
            ready, _, _, jobs, meta, _, signal, seq, _, _, ids = keys
            self._one_heads[queue] = (6, ready, jobs, meta, signal, seq, ids)
            self._keys[queue] = keys
        return keys

    def _error(self, exc: RedisError) -> Exception:
        """The worq error for a redis-py error, as :func:`translate_errors` makes it."""
        if isinstance(exc, RedisConnectionError | RedisTimeoutError):
            return BrokerConnectionError(redact(self.url), f"{type(exc).__name__}: {exc}")
        return BrokerError(
            f"redis error at {redact(self.url)}: {type(exc).__name__}: {located(exc)}"
        )

    def _fetch_one(
        self, queue: str, limit: int, lease: str, holder: str, into: list[Delivery]
    ) -> float | None:
        """Run ``fetch`` on one queue into ``into``; seconds until its next due time, if any."""
        self._queue_keys(queue)
        clock = "" if self.clock is None else clock_arg(self.clock)
        args: tuple[Arg, ...] = (clock, limit, lease, *self._fetch_tail)
        if holder:
            args += (holder,)
        return self._parse_fetch(queue, self._lane.script(_FETCH, self._heads[queue], args), into)

    @staticmethod
    def _parse_fetch(queue: str, reply: list[Any], into: list[Delivery]) -> float | None:
        """Append the reply's deliveries to ``into``; seconds until the next due time, if any."""
        for i in range(2, len(reply), 5):
            into.append(
                Delivery(
                    _text(reply[i]),
                    queue,
                    reply[i + 1],
                    _text(reply[i + 2]),
                    int(reply[i + 3]),
                    bool(reply[i + 4]),
                )
            )
        if not reply[1]:
            return None
        return float(reply[1]) - float(reply[0])

    def _settle_args(
        self,
        settlements: Iterable[Settlement],
        queue: str,
        args: list[Arg],
        blocks: list[Arg],
    ) -> Sequence[str]:
        """Append the script values of ``settlements`` (all of ``queue``) to ``args``.

        A settlement with ``then`` messages or an ``output`` has its outcome in capitals and its
        workflow block appended to ``blocks`` (output flag, output, count, then ten values per
        message), which the caller puts after the settlements. Returns the script's keys: the
        queue's keys, then the result keys of each job whose record the script writes (every
        settlement with a ``record``).
        """
        queue_keys = self._queue_keys(queue)
        extra_keys: list[str] = []
        for s in settlements:
            delivery, outcome = s.delivery, s.outcome
            code = _OUTCOMES[outcome]
            if s.then or s.output is not None:
                code = code.upper()
                blocks += (0, b"", len(s.then)) if s.output is None else (1, s.output, len(s.then))
                for m in s.then:
                    blocks += _message_values(m, self._register(m, queue))
            if s.record is not None:
                index = len(queue_keys) + 1 + len(extra_keys)
                extra_keys += result_keys(self.prefix, delivery.id)
                args += (
                    delivery.id,
                    delivery.token,
                    code,
                    repr(float(s.delay)),
                    s.reason,
                    index,
                    int(s.ttl * 1000),
                    s.record,
                )
            else:
                args += (
                    delivery.id,
                    delivery.token,
                    code,
                    repr(float(s.delay)),
                    s.reason,
                    0,
                    0,
                    b"",
                )
        return [*queue_keys, *extra_keys] if extra_keys else queue_keys

    def _settle_calls(
        self, settlements: Sequence[Settlement], clock: str
    ) -> tuple[list[Call], list[tuple[str, list[tuple[int, Settlement]]]]]:
        """One ``settle`` call per queue, and the settlements (with their index) of each."""
        calls: list[Call] = []
        groups = list(_by_queue(settlements, lambda s: s.delivery.queue).items())
        for queue, items in groups:
            args: list[Arg] = [clock, *self._retention]
            blocks: list[Arg] = []
            keys = self._settle_args((s for _, s in items), queue, args, blocks)
            if blocks:
                start = len(args) + 1  # ARGV index of the first block
                args += blocks
                if (len(args) + 1 - 3) % 8 == 0:
                    args.append(b"")  # so the script sees the values after the first 3 are no
                    # multiple of 8, which says the last one is where the blocks start
                args.append(start)
            calls.append((self._settle_script, keys, args))
        return calls, groups

    def _register(self, message: Message, source: str) -> bool:
        """The register value of ``message`` sent by a script of queue ``source``.

        On one server: whether the script adds its queue to the registry (one this broker has
        not seen). Under Cluster (where the registry is in another slot) it means something
        else: the message is added by the script itself, in ``source``'s slot (a message for
        ``source`` with no record to clear); otherwise it goes through ``source``'s outbox.
        """
        if self._cluster:
            return message.queue == source and not message.clear_record
        return message.queue not in self._known

    def _sweep(self, queues: Sequence[str]) -> None:
        """Under Cluster, now and then, forward what dead forwarders left in these outboxes."""

    def _unwrap(self, queue: str, reply: Any, outbox: dict[str, list[bytes]]) -> Any:
        """A script's own reply (under Cluster, the outbox entries with it go to ``outbox``)."""
        return reply

    def _forward(self, outbox: Mapping[str, Sequence[bytes]]) -> int:
        """Under Cluster, apply outbox entries in their own slots; how many were applied."""
        return 0


class RedisClusterBroker(RedisBroker):
    """:class:`RedisBroker` on Redis Cluster: queues spread over the masters by their hash tag.

    Build it from a ``redis+cluster://host:port`` URL (any node; ``rediss+cluster://`` for TLS;
    ``?prefix=`` as usual) or a ``redis.RedisCluster`` client made with
    ``decode_responses=False``. Every script touches one slot, its queue's (or a workflow
    group's): each queue keeps its own id index (``<prefix>:{<queue>}:ids``), and the check
    that no other queue holds an id is a step before the enqueue script; a lookup by id alone
    (``job_state``, ``find_job``, ``cancel``) asks each known queue's index in turn, pipelined
    per node. Results live in their own slot and are written by the storage, not by the ack
    script (no ``RESULTS``). An ``enqueue_many`` over several queues or chunks is atomic per
    queue and chunk, not as a whole. ``wait_replicas`` waits on the master each write went to.

    Schedules keep their records in the slot of their jobs' queue
    (``<prefix>:{<queue>}:schedules``), so a tick's compare-and-set and its enqueue stay one
    script. Workflows go through a transactional outbox: a settle or cancel script appends its
    effects on other slots (a ``then`` message for another queue, a group member's count, a
    group's release) to its queue's outbox in the same step; the broker then applies each in its
    own slot (idempotently) and deletes it. Entries a dead forwarder left behind are forwarded
    by the next sweep of a worker of that queue (every ``RedisSettings.outbox_sweep`` seconds,
    or :meth:`forward_outbox`). :meth:`open_group` records the group, then enqueues the members:
    two steps, not one. See ``docs/redis.md``.
    """

    name: ClassVar[str] = "redis-cluster"
    schemes: ClassVar[tuple[str, ...]] = CLUSTER_SCHEMES
    capabilities: ClassVar[frozenset[Capability]] = RedisBroker.capabilities - {
        Capability.RESULTS,
    }
    _cluster: ClassVar[bool] = True
    _settle_script: ClassVar[Script] = SCRIPTS["settle@cluster"]
    _settle_fetch_script: ClassVar[Script] = SCRIPTS["settle_fetch@cluster"]
    _cancel_script: ClassVar[Script] = SCRIPTS["cancel@cluster"]

    def __init__(
        self,
        url: str | redis.RedisCluster,
        settings: RedisSettings | None = None,
        *,
        prefix: str | None = None,
        clock: Clock | None = None,
        wait_replicas: int | None = None,
    ) -> None:
        super().__init__(
            url,  # type: ignore[arg-type]
            settings,
            prefix=prefix,
            clock=clock,
            wait_replicas=wait_replicas,
        )
        self._sweep_at = 0.0  # monotonic time of the next sweep of the fetched queues' outboxes
        self._schedule_queues: set[str] = set()  # in <prefix>:schedule-queues for sure

    @staticmethod
    def _connect(
        target: object, settings: RedisSettings | None, prefix: str | None
    ) -> tuple[redis.Redis, str, RedisSettings, bool]:
        client, url, settings, owned = connect_cluster(target, settings, prefix)
        # Typed as the plain client the shared code calls: the calls it makes on it (plain
        # commands, non-transactional pipelines) are the ones RedisCluster routes by key.
        return cast("redis.Redis", client), url, settings, owned

    # -- schedules ---------------------------------------------------------------------------

    @override
    def fire_schedule(
        self,
        schedule: str,
        tick: float,
        last: float | None,
        message: Message | None,
        queue: str | None = None,
    ) -> bool:
        """One script in the slot of ``queue``: the compare-and-set and the job's enqueue.

        The record lives in ``<prefix>:{<queue>}:schedules`` (``queue`` defaults to the
        message's; a call without either raises ``ValueError``: there is no slot to look in).
        A job for that queue is added by the same script; a job for another queue (a
        middleware moved it) goes through the queue's outbox, so it is added right after, by
        the broker, or by a sweep if this process dies first.
        """
        home = queue if queue is not None else None if message is None else message.queue
        if home is None:
            raise ValueError(
                f"schedule {schedule!r}: under Redis Cluster a schedule's record lives in the "
                "slot of its queue: pass queue="
            )
        records = cluster_schedules_key(self.prefix, home)
        tick_arg = repr(float(tick))
        last_arg = "" if last is None else repr(float(last))
        clock = clock_arg(self.clock)
        with self._errors():
            if home not in self._schedule_queues:  # before the record: schedule_fires() finds it
                self._lane.command("SADD", schedule_queues_key(self.prefix), home)
                with self._lock:
                    self._schedule_queues.add(home)
            if message is None:
                values = (clock, schedule, tick_arg, last_arg)
                return bool(self._lane.script(_SCHEDULE_CAS, (1, records), values))
            # KEYS[12] stands for the queue registry, which Cluster scripts never write.
            keys = [*self._queue_keys(home), records, records]
            args = (
                clock,
                schedule,
                tick_arg,
                last_arg,
                *_message_values(message, self._register(message, home)),
            )
            script = SCRIPTS["fire_schedule@cluster"]
            replies = self._lane.scripts([(script, keys, args)], wait=self._wait)
            if self._wait is not None:
                self._replicated(replies.pop(), strict=True)
            outbox: dict[str, list[bytes]] = {}
            applied, added = self._unwrap(home, replies[0], outbox)
            if added == 1:
                self._register_queues([message.queue])
        self._forward(outbox)
        return bool(applied)

    @override
    def schedule_fires(
        self, schedules: Sequence[str] | None = None, queues: Mapping[str, str] | None = None
    ) -> dict[str, float]:
        """The records of the named schedules, each read in its queue's hash (``queues``).

        A name without a queue, and ``schedules=None``, are looked up in every queue that has
        schedules (``<prefix>:schedule-queues``), pipelined per node; a name found in several
        (a schedule whose queue changed) answers its latest fire.
        """
        wanted = None if schedules is None else list(schedules)
        if wanted == []:
            return {}
        placed: dict[str, list[str]] = {}
        unplaced: list[str] = []
        for name in wanted or ():
            home = None if queues is None else queues.get(name)
            if home is None:
                unplaced.append(name)
            else:
                placed.setdefault(home, []).append(name)
        with self._errors():
            everywhere: list[str] = []
            if wanted is None or unplaced:
                members = self._lane.command("SMEMBERS", schedule_queues_key(self.prefix))
                everywhere = sorted(self._schedule_queues | {_text(q) for q in members})
            # (names asked, or None for all; read where the caller placed them; the command)
            reads: list[tuple[list[str] | None, bool, tuple[Arg, ...]]] = []
            for home, names in placed.items():
                key = cluster_schedules_key(self.prefix, home)
                reads.append((names, True, ("HMGET", key, *names)))
            for home in everywhere:
                key = cluster_schedules_key(self.prefix, home)
                if wanted is None:
                    reads.append((None, False, ("HGETALL", key)))
                else:
                    reads.append((unplaced, False, ("HMGET", key, *unplaced)))
            replies = self._lane.pipeline([command for _, _, command in reads]) if reads else []
        found: dict[str, float] = {}
        exact: dict[str, float] = {}
        for (asked, where, _), reply in zip(reads, replies, strict=True):
            if isinstance(reply, Exception):
                raise self._error(reply) if isinstance(reply, RedisError) else reply
            if asked is None:
                flat = (
                    [x for pair in reply.items() for x in pair]
                    if isinstance(reply, dict)
                    else reply
                )
                values = {_text(flat[i]): float(flat[i + 1]) for i in range(0, len(flat), 2)}
            else:
                values = {n: float(v) for n, v in zip(asked, reply, strict=True) if v is not None}
            target = exact if where else found
            for name, at in values.items():
                target[name] = max(at, target.get(name, at))
        return found | exact

    # -- workflows ---------------------------------------------------------------------------

    @override
    def open_group(self, group: GroupSpec, members: Sequence[Message]) -> list[bool]:
        """Record the group in its slot (one script), then enqueue the members: two steps.

        A group already recorded raises :class:`ValueError` and adds nothing. The members are
        enqueued as :meth:`enqueue` adds them (atomic per queue); should that fail or the
        process die in between, the group stays recorded with members missing, and opening it
        again raises ``ValueError``. A group of size 0 sends its callback right away.
        """
        _check_group(group, members)
        cb = group.callback
        gkey = group_key(self.prefix, group.id)
        args: list[Arg] = [
            clock_arg(self.clock),
            group.size,
            max(1, round(group.ttl * 1000)),
            1 if group.run_on_failure else 0,
            0 if cb is None else 1,
            *(_NO_MESSAGE if cb is None else _message_values(cb, False)),
        ]
        with self._errors():
            replies = self._lane.scripts([(_GROUP_OPEN, [gkey], args)], wait=self._wait)
            if self._wait is not None:
                self._replicated(replies.pop(), strict=True)
        reply = replies[0]
        if reply is None:
            raise ValueError(f"group {group.id!r} is already recorded")
        added = [flag == 1 for flag in self._add(members)] if members else []
        if reply:  # complete at once (size 0), its callback due
            with self._errors():
                self._send_callbacks({group.id: list(reply)})
        return added

    # -- the outbox --------------------------------------------------------------------------

    def forward_outbox(
        self, queues: Sequence[str] | None = None, *, older_than: float | None = None
    ) -> int:
        """Forward the outbox entries of ``queues`` (every known queue for ``None``) now.

        Only entries added at least ``older_than`` seconds ago (default
        ``RedisSettings.outbox_sweep``), up to 100 per queue: younger ones are still being
        forwarded by the process whose script added them. Each is re-scored as it is taken, so
        concurrent sweeps do not forward it twice; applying it again would add nothing anyway.
        Workers run this for their queues every ``outbox_sweep`` seconds. Returns how many
        entries were applied; raises :class:`BrokerError` if some could not be.
        """
        age = self.settings.outbox_sweep if older_than is None else older_than
        with self._errors():
            if queues is None:
                members = self._lane.command("SMEMBERS", self._registry)
                queues = sorted(self._known | {_text(q) for q in members})
            if not queues:
                return 0
            tail: tuple[Arg, ...] = (clock_arg(self.clock), repr(float(age)), _SWEEP_BATCH)
            calls: list[Call] = [
                (_OUTBOX_CLAIM, [outbox_key(self.prefix, q)], tail) for q in queues
            ]
            replies = self._lane.scripts(calls)
            outbox = {q: [bytes(e) for e in r] for q, r in zip(queues, replies, strict=True) if r}
            return self._apply(outbox) if outbox else 0

    @override
    def _sweep(self, queues: Sequence[str]) -> None:
        now = time.monotonic()
        if now < self._sweep_at:
            return
        self._sweep_at = now + self.settings.outbox_sweep
        try:
            for _ in range(_SWEEP_ROUNDS):  # a backlog (say, after an outage) goes faster
                if self.forward_outbox(queues) < _SWEEP_BATCH:
                    break
        except BrokerError as exc:
            log.warning("sweeping the outboxes of %s failed; trying again later: %s", queues, exc)

    @override
    def _unwrap(self, queue: str, reply: Any, outbox: dict[str, list[bytes]]) -> Any:
        own, entries = reply
        if entries:
            outbox.setdefault(queue, []).extend(bytes(entry) for entry in entries)
        return own

    @override
    def _forward(self, outbox: Mapping[str, Sequence[bytes]]) -> int:
        """Apply the entries settle, cancel or fire_schedule just added; a sweep does on failure.

        The script that added them has applied its own part, so a failure here is logged, not
        raised: the entries stay in their outbox until a sweep forwards them.
        """
        if not outbox:
            return 0
        try:
            with self._errors():
                return self._apply(outbox)
        except BrokerError as exc:
            log.warning(
                "outbox entries of %s not forwarded yet (a sweep will): %s", sorted(outbox), exc
            )
            return 0

    def _apply(self, outbox: Mapping[str, Sequence[bytes]]) -> int:
        """Apply outbox entries (by source queue) in their own slots, then delete them.

        First, in one pipelined round trip: each message added to its queue by ``forward``
        (which remembers the entry's id, so a repeat adds nothing), and each group member
        counted by ``group_count`` (each index once). A group completed then has its callback
        sent (by ``forward`` too, under the group's id) and marked delivered. Groups released
        by a closing job are deleted, and the entries deleted from their outboxes last: a
        failure anywhere before leaves them for a sweep, and applying them again changes
        nothing. (The old records of ``clear_record`` messages go before their forward, see
        :meth:`_clear_records`.)
        """
        messages: dict[str, list[tuple[bytes, list[bytes]]]] = {}
        counts: dict[str, list[Arg]] = {}
        releases: list[str] = []
        done: dict[str, list[bytes]] = {}  # the entries applied, by outbox
        for source, raws in outbox.items():
            for raw in raws:
                try:
                    kind, marker, *data = _netstrings(raw)
                    if kind == b"m" and len(data) == 10:
                        messages.setdefault(_text(data[0]), []).append((marker, data))
                    elif kind == b"c" and len(data) == 5:
                        counts.setdefault(_text(data[0]), []).extend(data[1:5])
                    elif kind == b"x" and len(data) == 1:
                        releases.append(_text(data[0]))
                    else:
                        raise ValueError(kind)
                except ValueError:
                    # Left where it is for someone to look at; the others go on.
                    log.error("outbox of %s: an entry this version cannot read: %r", source, raw)
                    continue
                done.setdefault(source, []).append(raw)
        gids = list(counts)
        calls = self._forward_calls(messages)
        calls += [(_GROUP_COUNT, [group_key(self.prefix, g)], counts[g]) for g in gids]
        results = self._replicated_calls(calls)
        callbacks = {
            gid: list(reply)
            for gid, reply in zip(gids, results[len(messages) :], strict=True)
            if reply
        }
        if callbacks:
            self._send_callbacks(callbacks, confirm=False)
        if releases:
            dels = [("DEL", group_key(self.prefix, g)) for g in releases]
            for reply in self._lane.pipeline(dels):
                if isinstance(reply, Exception):
                    raise reply
        if done:
            self._delete_applied(done, list(callbacks))
        return sum(len(raws) for raws in done.values())

    def _delete_applied(
        self, outbox: Mapping[str, Sequence[bytes]], delivered: Sequence[str]
    ) -> None:
        """The last step of :meth:`_apply`, in one round trip.

        The groups whose callbacks were ``delivered`` marked so, and the applied entries
        deleted from their outboxes.
        """
        commands: list[tuple[Arg, ...]] = []
        for source, raws in outbox.items():
            commands.append(("ZREM", outbox_key(self.prefix, source), *raws))
        sent: list[Call] = [(_GROUP_SENT, [group_key(self.prefix, g)], ()) for g in delivered]
        self._lane.scripts(sent, extra=commands)

    def _replicated_calls(self, calls: Sequence[Call]) -> list[Any]:
        """Run ``calls`` (pipelined per node), waiting for ``wait_replicas`` if set.

        Too few replicas raise :class:`ReplicasBehind`: the entries are not deleted then, and a
        sweep applies them again (which adds nothing) until the replicas have them.
        """
        if not calls:
            return []
        results = self._lane.scripts(calls, wait=self._wait)
        if self._wait is not None:
            acked = int(results.pop())
            if acked < self.settings.wait_replicas:
                raise ReplicasBehind(
                    self.url, self.settings.wait_replicas, acked, self.settings.wait_timeout
                )
        return results

    def _forward_calls(
        self, messages: Mapping[str, Sequence[tuple[bytes, list[bytes]]]]
    ) -> list[Call]:
        """One ``forward`` call per target queue; the queues are registered first."""
        if not messages:
            return []
        self._register_queues(list(messages))
        self._clear_records(messages)
        head: tuple[Arg, ...] = (clock_arg(self.clock), int(self.settings.outbox_memory * 1000))
        calls: list[Call] = []
        for queue, items in messages.items():
            args: list[Arg] = [*head]
            for marker, values in items:
                args += (marker, *values)
            calls.append((_FORWARD, self._queue_keys(queue), args))
        return calls

    def _clear_records(self, messages: Mapping[str, Sequence[tuple[bytes, list[bytes]]]]) -> None:
        """Delete the old record of each ``clear_record`` message about to be added.

        On one server the record goes in the step that adds the job. Here it is in another
        slot, and it must go *before* the forward: once the job is in its queue a worker may
        run it and save the new run's record, which a later ``DEL`` would destroy. So first
        one pipelined look at each target queue (is the entry in ``applied``, is the id held),
        then the ``DEL`` of those the forward will add. A repeated entry is skipped: its job
        may have run already. Two round trips, for these messages only.
        """
        wanted = [
            (queue, marker, _text(values[2]))
            for queue, items in messages.items()
            for marker, values in items
            if values[6] == b"1"
        ]
        if not wanted:
            return
        looks: list[tuple[Arg, ...]] = []
        for queue, marker, job_id in wanted:
            looks.append(("ZSCORE", applied_key(self.prefix, queue), marker))
            looks.append(("HEXISTS", cluster_ids_key(self.prefix, queue), job_id))
        seen = self._lane.pipeline(looks)
        for reply in seen:
            if isinstance(reply, Exception):
                raise reply
        dels = [
            ("DEL", result_keys(self.prefix, job_id)[0])
            for (_, _, job_id), applied, held in zip(wanted, seen[::2], seen[1::2], strict=True)
            if applied is None and not held
        ]
        for reply in self._lane.pipeline(dels) if dels else ():
            if isinstance(reply, Exception):
                raise reply

    def _send_callbacks(self, callbacks: Mapping[str, list[Any]], *, confirm: bool = True) -> None:
        """Send the due callbacks of complete groups (ten message values each, by group id).

        Each goes through ``forward`` under the group's key as its entry id, so a group's
        callback is added once however often its members' entries are applied. With
        ``confirm``, the groups are marked delivered here; otherwise the caller does (with the
        deletion of the entries that completed them).
        """
        messages: dict[str, list[tuple[bytes, list[bytes]]]] = {}
        for gid, values in callbacks.items():
            marker = group_key(self.prefix, gid)[len(self.prefix) + 1 :].encode()
            data = [v if isinstance(v, bytes) else str(v).encode() for v in values]
            messages.setdefault(_text(data[0]), []).append((marker, data))
        self._replicated_calls(self._forward_calls(messages))
        if confirm:
            self._lane.scripts([(_GROUP_SENT, [group_key(self.prefix, g)], ()) for g in callbacks])

    def _register_queues(self, queues: Sequence[str]) -> None:
        """Add queues this broker has not seen to the registry (a plain ``SADD``, in its slot)."""
        new = [q for q in queues if q not in self._known]
        if new:
            self._lane.command("SADD", self._registry, *new)
            with self._lock:
                self._known.update(new)
