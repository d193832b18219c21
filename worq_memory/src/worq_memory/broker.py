"""An in-process broker with the full delivery contract: the reference implementation."""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import math
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Self

from typing_extensions import override

from worq_core import Broker, BrokerError, Capability, JobStatus, Storage
from worq_core.models import (
    CancelOutcome,
    ConcurrencyLimit,
    DeadJob,
    Delivery,
    Event,
    GroupSpec,
    GroupState,
    JobState,
    LeaseState,
    ListedJob,
    Message,
    Outcome,
    QueueStats,
    RateLimit,
    Settlement,
    UniqueUntil,
    WorkerInfo,
)
from worq_memory.storage import MemoryStorage

Clock = Callable[[], float]
_WAITING = (JobStatus.SCHEDULED, JobStatus.RETRYING)
_UNCOUNTED = (JobStatus.UNKNOWN, JobStatus.DEAD)  # dead jobs are counted by ``_Queue.dead``
_SLACK = 64  # stale heap entries tolerated beyond the live ones before a heap is rebuilt
_SET_ASIDE = 100  # jobs one pass of fetch may set aside per queue before it looks again


@dataclass(slots=True, eq=False)
class _Queue:
    name: str
    ready: list[tuple[int, int, str]] = field(default_factory=list)  # (-priority, seq, id)
    delayed: list[tuple[float, int, str]] = field(default_factory=list)  # (due, seq, id)
    leased: dict[str, _Job] = field(default_factory=dict)
    dead: OrderedDict[str, _Job] = field(default_factory=OrderedDict)  # oldest first
    counts: dict[JobStatus, int] = field(default_factory=dict)
    keys: dict[str, _Hold] = field(default_factory=dict)  # unique keys taken, by key
    tats: dict[str, float] = field(default_factory=dict)  # rate key -> theoretical arrival time
    permits: dict[str, _Permits] = field(default_factory=dict)  # by concurrency key
    prune_at: int = _SLACK  # prune lapsed ``keys`` and idle ``tats`` once they outgrow this


@dataclass(slots=True, eq=False)
class _Hold:
    """A unique key taken: by ``job`` until it lets go, then until ``until`` (``hold_for``)."""

    holder: str
    job: _Job | None
    until: float = 0.0


@dataclass(slots=True, eq=False)
class _Permits:
    """One concurrency key of a queue: leases holding a permit, and the jobs waiting for one.

    A permit given back wakes the oldest parked job: it goes back to ready and the permit is
    reserved for it (``woken``) until a fetch reaches it, so no other job of the key takes it
    first and parked jobs come back in the order they were parked.
    """

    leased: int = 0
    woken: int = 0
    parked: dict[str, _Job] = field(default_factory=dict)  # oldest first

    def free(self, limit: ConcurrencyLimit) -> bool:
        return self.leased + self.woken < limit.limit


@dataclass(slots=True, eq=False)
class _Group:
    """A group's progress (:meth:`MemoryBroker.open_group`); ``expires`` is set once complete."""

    spec: GroupSpec
    outputs: list[bytes | None]
    finished: set[int] = field(default_factory=set)
    failed: set[int] = field(default_factory=set)
    callback_sent: bool = False
    expires: float = math.inf


@dataclass(slots=True, eq=False)
class _Job:
    message: Message
    queue: _Queue
    seq: int
    state: JobStatus = JobStatus.UNKNOWN  # UNKNOWN: not yet (or no longer) counted in any state
    attempts: int = 0
    token: str = ""
    lease_until: float = 0.0
    holder: str | None = None  # the worker it was fetched for (``fetch(worker=)``), while leased
    due: float = 0.0
    reason: str = ""
    died_at: float = 0.0
    progress: bytes | None = None  # only while RUNNING
    cancel_requested: bool = False  # set by cancel() while RUNNING, kept until it ends
    granted: bool = False  # its rate slot is counted for this run (until a retry or expiry)
    permit: bool = False  # holds a concurrency permit (while RUNNING)
    parked: bool = False  # QUEUED but waiting for a permit, out of ``ready``
    woken: bool = False  # back in ``ready`` with a permit reserved for it


class MemoryBroker(Broker):
    """Jobs in this process's memory. Thread-safe; nothing survives the process.

    Fetching blocks on a condition variable that enqueues notify, and wakes on its own when the
    next delayed job or lease comes due. ``clock`` (Unix seconds) can be replaced in tests.

    Given a ``storage``, the broker writes job records into it under its own lock, atomically
    with the settlement, cancellation or enqueue they belong to (:attr:`Capability.RESULTS`),
    and :meth:`stores_results_in` answers ``True`` for that one storage. Share it with the app::

        storage = MemoryStorage()
        app = Worq(broker=MemoryBroker(storage=storage), storage=storage)

    Without one (``memory://``), worq-core saves records in the app's storage itself.

    Unique keys, rate and concurrency limits are kept per queue (:attr:`Capability.UNIQUE`,
    :attr:`Capability.LIMITS`). A fetch that pops a job over its limit sets it aside and goes on
    to the jobs behind it: a job waiting for its rate slot is SCHEDULED until then, in the
    delayed heap like any eta; a job waiting for a concurrency permit is parked (QUEUED, out of
    the ready heap) until a permit is given back. Schedules' last fires are a dict
    (:attr:`Capability.SCHEDULES`).

    Groups (:attr:`Capability.WORKFLOWS`) are a dict by id, counted under the same lock as the
    settlement or cancellation that ends a member; a complete group's expiry is checked lazily
    (when groups are opened, completed or read), and a released group leaves nothing behind.
    """

    name: ClassVar[str] = "memory"
    schemes: ClassVar[tuple[str, ...]] = ("memory",)
    capabilities: ClassVar[frozenset[Capability]] = frozenset(
        {
            Capability.DELAYED,
            Capability.PRIORITIES,
            Capability.DEAD_LETTER,
            Capability.WORKER_REGISTRY,
            Capability.CANCEL,
            Capability.PROGRESS,
            Capability.RESULTS,
            Capability.SCHEDULES,
            Capability.UNIQUE,
            Capability.LIMITS,
            Capability.WORKFLOWS,
            Capability.LISTING,
            Capability.EVENTS,
            Capability.WORKER_LEASES,
        }
    )

    def __init__(
        self,
        url: str = "memory://",
        *,
        clock: Clock = time.time,
        dead_max_count: int = 10_000,
        dead_max_age: float = 7 * 24 * 3600.0,
        storage: MemoryStorage | None = None,
        events_max: int = 10_000,
    ) -> None:
        self.url = url
        self.clock = clock
        self.dead_max_count = dead_max_count
        self.dead_max_age = dead_max_age
        self.storage = storage
        """The storage this broker writes records into, if any."""
        self._jobs: dict[str, _Job] = {}  # every job held, by id: ids are unique across queues
        self._queues: dict[str, _Queue] = {}  # only queues that ever held a job
        self._seq = itertools.count()
        self._tokens = itertools.count(1)
        self._changed = threading.Condition()
        self._workers: dict[str, tuple[float, WorkerInfo]] = {}  # id -> (expires, info)
        self._schedules: dict[str, float] = {}  # schedule -> its last fire
        self._groups: dict[str, _Group] = {}  # recorded and not yet released nor expired
        self._expiring: list[tuple[float, str]] = []  # (expires, id) of complete groups; a heap
        self._complete = 0  # complete groups in ``_groups``, to bound stale ``_expiring`` entries
        self._events: deque[Event] = deque(maxlen=events_max)  # ids: consecutive integers
        self._event_ids = itertools.count(1)
        self._new_events = threading.Condition()

    @override
    @classmethod
    def from_url(cls, url: str) -> Self:
        return cls(url)

    @override
    def stores_results_in(self, storage: Storage) -> bool:
        return self.storage is not None and storage is self.storage

    # -- producer side -----------------------------------------------------------------------

    @override
    def enqueue(self, messages: Sequence[Message]) -> list[bool]:
        return [holder is None for holder in self.enqueue_unique(messages)]

    @override
    def enqueue_unique(self, messages: Sequence[Message]) -> list[str | None]:
        with self._changed:
            holders = self._add(messages, self.clock())
            self._changed.notify_all()
        return holders

    @override
    def fire_schedule(
        self,
        schedule: str,
        tick: float,
        last: float | None,
        message: Message | None,
        queue: str | None = None,
    ) -> bool:
        """One record per schedule name, whatever its ``queue``."""
        with self._changed:
            if self._schedules.get(schedule) != last:
                return False
            self._schedules[schedule] = tick
            if message is not None:
                self._add([message], self.clock())  # a held id or key: the tick still fired
                self._changed.notify_all()
            return True

    @override
    def schedule_fires(
        self, schedules: Sequence[str] | None = None, queues: Mapping[str, str] | None = None
    ) -> dict[str, float]:
        with self._changed:
            if schedules is None:
                return dict(self._schedules)
            return {s: self._schedules[s] for s in schedules if s in self._schedules}

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
        with self._changed:
            now = self.clock()
            self._expire_groups(now)
            if group.id in self._groups:
                raise ValueError(f"group {group.id!r} is already recorded")
            holders = self._add(members, now)
            recorded = self._groups[group.id] = _Group(group, [None] * group.size)
            if group.size == 0:
                self._complete_group(recorded, now)
            self._changed.notify_all()
        return [holder is None for holder in holders]

    @override
    def group_state(self, group_id: str) -> GroupState | None:
        with self._changed:
            self._expire_groups(self.clock())
            group = self._groups.get(group_id)
            if group is None:
                return None
            spec = group.spec
            return GroupState(
                spec.id,
                spec.size,
                tuple(group.outputs),
                frozenset(group.finished),
                frozenset(group.failed),
                None if spec.callback is None else spec.callback.id,
                complete=len(group.finished) == spec.size,
                callback_sent=group.callback_sent,
            )

    # -- worker side ---------------------------------------------------------------------------

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
        deadline = time.monotonic() + wait
        more = False
        with self._changed:
            while True:
                now = self.clock()
                deliveries: list[Delivery] = []
                for name in queues:
                    queue = self._queues.get(name)
                    if queue is None:
                        continue
                    self._promote(queue, now)
                    set_aside = 0
                    while queue.ready and len(deliveries) < limit:
                        if set_aside >= _SET_ASIDE:
                            more = True  # bounded work under the lock: look again below
                            break
                        _, seq, job_id = heapq.heappop(queue.ready)
                        job = self._jobs.get(job_id)
                        if (
                            job is None
                            or job.state is not JobStatus.QUEUED
                            or job.seq != seq
                            or job.queue is not queue
                        ):
                            continue  # a stale heap entry
                        message = job.message
                        if (
                            message.rate is not None or message.concurrency is not None
                        ) and not self._admit(job, now):
                            set_aside += 1  # and on to the jobs behind it
                            continue
                        deliveries.append(self._lease(job, now, now + lease, worker))
                if deliveries or limit <= 0:
                    return deliveries
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return []
                if more:
                    more = False
                    self._changed.wait(0)  # let other callers in, then go on popping
                    continue
                next_due = self._next_due(queues)
                if next_due is not None:
                    remaining = min(remaining, max(next_due - now, 0.001))
                self._changed.wait(remaining)

    @override
    def extend(
        self,
        deliveries: Sequence[Delivery],
        lease: float,
        progress: Mapping[str, bytes] | None = None,
    ) -> list[LeaseState]:
        with self._changed:
            now = self.clock()
            states = []
            for delivery in deliveries:
                job = self._held(delivery, now)
                if job is None:
                    states.append(LeaseState.LOST)
                    continue
                job.lease_until = now + lease
                if progress is not None and (latest := progress.get(delivery.id)) is not None:
                    job.progress = bytes(latest)
                states.append(LeaseState.CANCELLING if job.cancel_requested else LeaseState.HELD)
            return states

    @override
    def extend_worker(
        self,
        worker: str,
        queues: Sequence[str],
        lease: float,
        progress: Mapping[str, bytes] | None = None,
    ) -> dict[str, LeaseState]:
        with self._changed:
            now = self.clock()
            states: dict[str, LeaseState] = {}
            for name in queues:
                queue = self._queues.get(name)
                if queue is None:
                    continue
                for job in queue.leased.values():
                    if job.holder != worker or job.lease_until <= now:
                        continue
                    job.lease_until = now + lease
                    latest = None if progress is None else progress.get(job.message.id)
                    if latest is not None:
                        job.progress = bytes(latest)
                    held = LeaseState.CANCELLING if job.cancel_requested else LeaseState.HELD
                    states[job.token] = held
            return states

    @override
    def settle(self, settlements: Sequence[Settlement]) -> list[bool]:
        with self._changed:
            if self.storage is None and any(s.record is not None for s in settlements):
                raise BrokerError("this memory broker has no storage to write records into")
            now = self.clock()
            applied = []
            for settlement in settlements:
                job = self._held(settlement.delivery, now)
                applied.append(job is not None)
                if job is None:
                    continue
                if settlement.record is not None and self.storage is not None:
                    self.storage.save({job.message.id: settlement.record}, settlement.ttl)
                self._unlease(job)
                if settlement.outcome is not Outcome.RETRY:  # a retry keeps a cancel request
                    job.cancel_requested = False
                    self._let_go(job, now)  # and its unique key
                if settlement.outcome is Outcome.ACK:
                    self._forget(job)
                elif settlement.outcome is Outcome.RETRY:
                    job.reason = settlement.reason
                    job.granted = False  # the next run counts against its rate again
                    self._to_delayed(job, now + settlement.delay, JobStatus.RETRYING)
                else:
                    job.reason = settlement.reason
                    self._to_dead(job, now)
                message = job.message
                if settlement.outcome is not Outcome.RETRY and (
                    message.member is not None or message.closes is not None
                ):
                    self._end_member(
                        message, settlement.outcome is Outcome.DEAD, settlement.output, now
                    )
                if settlement.then:
                    self._add(settlement.then, now)
            self._changed.notify_all()
            return applied

    @override
    def release(self, deliveries: Sequence[Delivery]) -> None:
        with self._changed:
            now = self.clock()
            for delivery in deliveries:
                job = self._held(delivery, now)
                if job is None:
                    continue
                self._unlease(job)  # a cancel request stays: the next delivery carries it
                job.attempts -= 1  # and it never ran, so it keeps its rate slot (granted)
                self._to_ready(job, keep_seq=True)
            self._changed.notify_all()

    # -- inspection and admin ------------------------------------------------------------------

    @override
    def job_state(self, job_id: str) -> JobState | None:
        with self._changed:
            return self._state(job_id)

    @override
    def job_status(self, job_id: str, storage: Storage) -> tuple[JobState | None, bytes | None]:
        if not self.stores_results_in(storage):
            return super().job_status(job_id, storage)
        with self._changed:  # one snapshot: records are written under this lock too
            return self._state(job_id), storage.load(job_id)

    @override
    def cancel(self, job_id: str, record: bytes | None = None, ttl: float = 0.0) -> CancelOutcome:
        with self._changed:
            if record is not None and self.storage is None:
                raise BrokerError("this memory broker has no storage to write records into")
            now = self.clock()
            job = self._current(job_id, now)
            if job is None or job.state is JobStatus.DEAD:
                return CancelOutcome.NOT_FOUND
            if job.state is JobStatus.RUNNING:
                job.cancel_requested = True
                return CancelOutcome.REQUESTED
            self._let_go(job, now)
            self._forget(job)
            self._compact(job.queue)
            if record is not None and self.storage is not None:
                self.storage.save({job_id: record}, ttl)
            woke = self._unpark(job)  # the permit reserved for it went to the next parked job
            message = job.message
            if message.member is not None or message.closes is not None:
                self._end_member(message, True, None, now)
                woke = True  # it may have sent a group's callback
            if woke:
                self._changed.notify_all()
            return CancelOutcome.REMOVED

    @override
    def stats(self, queues: Sequence[str] | None = None) -> list[QueueStats]:
        with self._changed:
            now = self.clock()
            result = []
            for name in queues if queues is not None else sorted(self._queues):
                queue = self._queues.get(name)
                if queue is None:
                    result.append(QueueStats(name, ready=0, delayed=0, running=0, dead=0))
                    continue
                self._promote(queue, now)
                self._trim_dead(queue, now)
                counts = queue.counts
                result.append(
                    QueueStats(
                        name,
                        ready=counts.get(JobStatus.QUEUED, 0),
                        delayed=counts.get(JobStatus.SCHEDULED, 0)
                        + counts.get(JobStatus.RETRYING, 0),
                        running=counts.get(JobStatus.RUNNING, 0),
                        dead=len(queue.dead),
                    )
                )
            return result

    @override
    def dead_jobs(self, queue: str, limit: int = 100) -> list[DeadJob]:
        with self._changed:
            q = self._queues.get(queue)
            if q is None:
                return []
            self._trim_dead(q, self.clock())
            newest = list(reversed(q.dead.values()))[:limit]
            return [
                DeadJob(j.message.id, queue, j.message.body, j.reason, j.attempts, j.died_at)
                for j in newest
            ]

    @override
    def requeue_dead(self, queue: str, job_ids: Sequence[str] | None = None) -> int:
        with self._changed:
            q = self._queues.get(queue)
            if q is None:
                return 0
            self._trim_dead(q, self.clock())
            ids = list(q.dead) if job_ids is None else [i for i in job_ids if i in q.dead]
            for job_id in ids:
                job = q.dead.pop(job_id)
                job.attempts = 0
                job.reason = ""
                job.granted = False  # a new run; its unique key is not taken again
                self._to_ready(job)
            self._changed.notify_all()
            return len(ids)

    @override
    def purge_dead(self, queue: str) -> int:
        with self._changed:
            q = self._queues.get(queue)
            if q is None:
                return 0
            self._trim_dead(q, self.clock())
            count = len(q.dead)
            for job_id in q.dead:
                del self._jobs[job_id]
            q.dead.clear()
            return count

    @override
    def list_jobs(
        self, queue: str, status: JobStatus, offset: int = 0, limit: int = 50
    ) -> list[ListedJob]:
        if status not in self.LISTED_STATES:
            raise BrokerError(f"cannot list jobs by status {status.value!r}")
        with self._changed:
            q = self._queues.get(queue)
            if q is None or limit <= 0:
                return []
            now = self.clock()
            self._promote(q, now)
            # In-process and small: sorting what the queue holds is cheaper than indexes kept
            # on every state change (a Redis page costs offset + limit instead).
            if status is JobStatus.DEAD:
                self._trim_dead(q, now)
                jobs = list(reversed(q.dead.values()))
            elif status is JobStatus.QUEUED:
                jobs = sorted(
                    (j for j in self._jobs.values() if j.queue is q and j.state is status),
                    key=lambda j: (-j.message.priority, j.seq),
                )
            elif status is JobStatus.RUNNING:
                jobs = sorted(q.leased.values(), key=lambda j: j.lease_until)
            else:
                jobs = sorted(
                    (j for j in self._jobs.values() if j.queue is q and j.state in _WAITING),
                    key=lambda j: (j.due, j.seq),
                )
            return [_listed(j) for j in jobs[max(0, offset) : max(0, offset) + limit]]

    @override
    def find_job(self, job_id: str) -> ListedJob | None:
        with self._changed:
            job = self._current(job_id, self.clock())
            return None if job is None else _listed(job)

    @override
    def publish_events(self, events: Sequence[Event]) -> None:
        with self._new_events:
            for event in events:
                self._events.append(dataclasses.replace(event, id=str(next(self._event_ids))))
            self._new_events.notify_all()

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
        deadline = time.monotonic() + timeout
        with self._new_events:
            while True:
                events = self._events
                if last is None:
                    return list(events)[-limit:]
                start = max(0, last + 1 - int(events[0].id)) if events else 0
                newer = list(itertools.islice(events, start, start + limit))
                left = deadline - time.monotonic()
                if newer or left <= 0:
                    return newer
                self._new_events.wait(left)

    @override
    def register_worker(self, info: WorkerInfo, ttl: float) -> None:
        with self._changed:
            self._workers[info.id] = (self.clock() + ttl, info)

    @override
    def unregister_worker(self, worker_id: str) -> None:
        with self._changed:
            self._workers.pop(worker_id, None)

    @override
    def workers(self) -> list[WorkerInfo]:
        with self._changed:
            now = self.clock()
            for worker_id in [w for w, (expires, _) in self._workers.items() if expires <= now]:
                del self._workers[worker_id]
            return sorted((info for _, info in self._workers.values()), key=lambda i: i.started)

    # -- internals (called with the lock held) -------------------------------------------------

    def _add(self, messages: Sequence[Message], now: float) -> list[str | None]:
        """Add each message unless its id or unique key is held: ``None``, or the holder's id."""
        holders: list[str | None] = []
        cleared = []
        for message in messages:
            held = self._jobs.get(message.id)
            if held is not None and held.state is JobStatus.DEAD:
                self._trim_dead(held.queue, now)  # a dead job past its age frees its id
                held = self._jobs.get(message.id)
            if held is not None:
                holders.append(message.id)
                continue
            queue = self._queues.get(message.queue)
            unique = message.unique
            if unique is not None and queue is not None:
                holder = self._holder(queue, unique.key, now)
                if holder is not None:
                    holders.append(holder)
                    continue
            if queue is None:
                queue = self._queues[message.queue] = _Queue(message.queue)
            job = _Job(message, queue, next(self._seq))
            self._jobs[message.id] = job
            if unique is not None:
                queue.keys[unique.key] = _Hold(message.id, job)
                self._prune(queue, now)
            if message.eta is not None and message.eta > now:
                self._to_delayed(job, message.eta, JobStatus.SCHEDULED)
            else:
                self._to_ready(job)
            if message.clear_record:
                cleared.append(message.id)
            holders.append(None)
        if cleared and self.storage is not None:
            self.storage.delete(cleared)
        return holders

    def _holds(self, hold: _Hold, now: float) -> bool:
        """Whether ``hold`` still takes its key: its job is still held, or ``hold_for`` runs."""
        if hold.job is not None:
            return self._jobs.get(hold.holder) is hold.job  # a purged or trimmed job lets go
        return now < hold.until

    def _holder(self, queue: _Queue, key: str, now: float) -> str | None:
        """The id of the job that takes ``key`` in ``queue``, if the key is taken."""
        hold = queue.keys.get(key)
        if hold is None:
            return None
        if self._holds(hold, now):
            return hold.holder
        del queue.keys[key]
        return None

    def _let_go(self, job: _Job, now: float) -> None:
        """``job`` reached its unique key's ``until``: the key stays taken ``hold_for`` more."""
        unique = job.message.unique
        if unique is None:
            return
        hold = job.queue.keys.get(unique.key)
        if hold is None or hold.job is not job:
            return  # it let go already (or never took it: requeued from the dead letters)
        if unique.hold_for > 0:
            hold.job = None
            hold.until = now + unique.hold_for
        else:
            del job.queue.keys[unique.key]

    def _prune(self, queue: _Queue, now: float) -> None:
        """Drop lapsed unique keys and idle rate states once they pile up (amortised O(1))."""
        if len(queue.keys) + len(queue.tats) <= queue.prune_at:
            return
        queue.keys = {k: h for k, h in queue.keys.items() if self._holds(h, now)}
        queue.tats = {k: tat for k, tat in queue.tats.items() if tat > now}
        queue.prune_at = 2 * (len(queue.keys) + len(queue.tats)) + _SLACK

    def _admit(self, job: _Job, now: float) -> bool:
        """Whether a limited job just popped from ready may be leased; if not, set it aside.

        The concurrency permit is checked first: without one the job is parked. Then its rate
        slot is reserved (once per run): a slot in the future sets it aside until then.
        """
        message, queue = job.message, job.queue
        concurrency = message.concurrency
        permits = None
        if concurrency is not None:
            permits = queue.permits.get(concurrency.key)
            if permits is None:
                permits = queue.permits[concurrency.key] = _Permits()
            if job.woken:  # the permit reserved for it is its own now
                job.woken = False
                permits.woken -= 1
            if not permits.free(concurrency):
                job.parked = True
                permits.parked[message.id] = job
                return False
        rate = message.rate
        if rate is not None and not job.granted:
            job.granted = True
            start = self._reserve(queue, rate, now)
            if start > now:
                self._to_delayed(job, start, JobStatus.SCHEDULED)
                if concurrency is not None:
                    self._wake(queue, concurrency.key)  # it takes no permit yet
                return False
        if permits is not None:
            permits.leased += 1
            job.permit = True
        return True

    def _reserve(self, queue: _Queue, rate: RateLimit, now: float) -> float:
        """Count one job against ``rate`` (GCRA); returns when its slot starts."""
        tat = max(queue.tats.get(rate.key, now), now)  # a TAT in the past means idle
        queue.tats[rate.key] = tat + rate.interval
        self._prune(queue, now)
        return max(now, tat - (rate.burst - 1) * rate.interval)

    def _wake(self, queue: _Queue, key: str) -> bool:
        """Hand ``key``'s free permits to its oldest parked jobs; whether any went back to ready.

        A woken job goes back to ready under its own sequence number (as a released job does),
        ahead of every job that was behind it, with the permit reserved for it.
        """
        permits = queue.permits.get(key)
        if permits is None:
            return False
        woke = False
        while permits.parked:
            job = next(iter(permits.parked.values()))
            concurrency = job.message.concurrency
            assert concurrency is not None  # only jobs with a limit are parked
            if not permits.free(concurrency):
                break
            del permits.parked[job.message.id]
            job.parked = False
            job.woken = True
            permits.woken += 1
            heapq.heappush(queue.ready, (-job.message.priority, job.seq, job.message.id))
            woke = True
        if not (permits.leased or permits.woken or permits.parked):
            del queue.permits[key]
        return woke

    def _unpark(self, job: _Job) -> bool:
        """Take a waiting job out of its key's permits (it is cancelled); whether one woke."""
        concurrency = job.message.concurrency
        if concurrency is None or not (job.parked or job.woken):
            return False
        permits = job.queue.permits[concurrency.key]
        if job.parked:
            del permits.parked[job.message.id]
            job.parked = False
        else:
            permits.woken -= 1
            job.woken = False
        return self._wake(job.queue, concurrency.key)

    def _end_member(self, message: Message, failed: bool, output: bytes | None, now: float) -> None:
        """Count a job with ``member`` or ``closes`` that ended: acked, dead, or cancelled.

        Its index is counted once (later ends change nothing); the one that completes its group
        sends the group's callback. Then the group it ``closes`` is released.
        """
        member = message.member
        if member is not None:
            group = self._groups.get(member.group)
            if (
                group is not None
                and 0 <= member.index < group.spec.size
                and member.index not in group.finished
            ):
                group.finished.add(member.index)
                group.outputs[member.index] = output
                if failed:
                    group.failed.add(member.index)
                if len(group.finished) == group.spec.size:
                    self._complete_group(group, now)
        if message.closes is not None:
            released = self._groups.pop(message.closes, None)
            if released is not None and released.expires != math.inf:
                self._complete -= 1

    def _complete_group(self, group: _Group, now: float) -> None:
        """Every index of ``group`` is counted: send its callback, and start its ttl."""
        spec = group.spec
        group.expires = now + spec.ttl
        self._complete += 1
        heapq.heappush(self._expiring, (group.expires, spec.id))
        if spec.callback is not None and (not group.failed or spec.run_on_failure):
            group.callback_sent = True
            self._add([spec.callback], now)
        self._expire_groups(now)

    def _expire_groups(self, now: float) -> None:
        """Drop complete groups past their ttl; rebuild the heap once stale entries pile up."""
        expiring = self._expiring
        while expiring and expiring[0][0] <= now:
            expires, group_id = heapq.heappop(expiring)
            group = self._groups.get(group_id)
            if group is not None and group.expires == expires:  # not released (nor reopened)
                del self._groups[group_id]
                self._complete -= 1
        if len(expiring) > 2 * self._complete + _SLACK:
            self._expiring = [
                (g.expires, group_id)
                for group_id, g in self._groups.items()
                if g.expires != math.inf
            ]
            heapq.heapify(self._expiring)

    def _current(self, job_id: str, now: float) -> _Job | None:
        """The job as it stands at ``now``: due jobs and expired leases queued, old dead gone."""
        job = self._jobs.get(job_id)
        if job is None:
            return None
        self._promote(job.queue, now)
        if job.state is JobStatus.DEAD:
            self._trim_dead(job.queue, now)
            return self._jobs.get(job_id)
        return job

    def _state(self, job_id: str) -> JobState | None:
        job = self._current(job_id, self.clock())
        if job is None:
            return None
        return JobState(job.queue.name, job.state, job.attempts, job.progress, job.cancel_requested)

    def _set_state(self, job: _Job, state: JobStatus) -> None:
        """Move ``job`` to ``state`` keeping the per-state counts (dead jobs are counted apart)."""
        counts = job.queue.counts
        if job.state not in _UNCOUNTED:
            counts[job.state] -= 1
        if state not in _UNCOUNTED:
            counts[state] = counts.get(state, 0) + 1
        job.state = state

    def _forget(self, job: _Job) -> None:
        """Drop a job that is not leased nor dead: its id is free again."""
        self._set_state(job, JobStatus.UNKNOWN)
        del self._jobs[job.message.id]

    def _to_ready(self, job: _Job, *, keep_seq: bool = False) -> None:
        if not keep_seq:
            job.seq = next(self._seq)
        self._set_state(job, JobStatus.QUEUED)
        heapq.heappush(job.queue.ready, (-job.message.priority, job.seq, job.message.id))

    def _to_delayed(self, job: _Job, due: float, state: JobStatus) -> None:
        job.due = due
        self._set_state(job, state)
        heapq.heappush(job.queue.delayed, (due, job.seq, job.message.id))

    def _to_dead(self, job: _Job, now: float) -> None:
        self._set_state(job, JobStatus.DEAD)
        job.died_at = now
        job.queue.dead[job.message.id] = job
        self._trim_dead(job.queue, now)

    def _trim_dead(self, queue: _Queue, now: float) -> None:
        while queue.dead:
            oldest_id, oldest = next(iter(queue.dead.items()))
            if len(queue.dead) <= self.dead_max_count and now - oldest.died_at <= self.dead_max_age:
                break
            del queue.dead[oldest_id]
            del self._jobs[oldest_id]

    def _lease(self, job: _Job, now: float, until: float, worker: str | None) -> Delivery:
        job.attempts += 1
        job.token = str(next(self._tokens))
        job.lease_until = until
        job.holder = worker
        self._set_state(job, JobStatus.RUNNING)
        job.queue.leased[job.message.id] = job
        message = job.message
        if message.unique is not None and message.unique.until is UniqueUntil.STARTED:
            self._let_go(job, now)
        return Delivery(
            message.id,
            message.queue,
            message.body,
            job.token,
            job.attempts,
            cancel_requested=job.cancel_requested,
        )

    def _unlease(self, job: _Job) -> None:
        """Take a running job off its lease, giving back its permit; the caller sets its state."""
        del job.queue.leased[job.message.id]
        job.token = ""
        job.holder = None
        job.progress = None
        if job.permit:
            job.permit = False
            concurrency = job.message.concurrency
            assert concurrency is not None  # only jobs with a limit take a permit
            job.queue.permits[concurrency.key].leased -= 1
            self._wake(job.queue, concurrency.key)

    def _held(self, delivery: Delivery, now: float) -> _Job | None:
        """The job if ``delivery``'s token still holds an unexpired lease on it."""
        job = self._jobs.get(delivery.id)
        if (
            job is None
            or job.state is not JobStatus.RUNNING
            or job.token != delivery.token
            or job.lease_until <= now
        ):
            return None
        return job

    def _promote(self, queue: _Queue, now: float) -> None:
        """Return expired leases to the queue and move due delayed jobs to ready."""
        for job in [j for j in queue.leased.values() if j.lease_until <= now]:
            self._unlease(job)
            job.granted = False  # it may have run: its redelivery counts against its rate again
            self._to_ready(job, keep_seq=True)
        while queue.delayed and queue.delayed[0][0] <= now:
            due_at, seq, job_id = heapq.heappop(queue.delayed)
            due = self._jobs.get(job_id)
            if due is not None and self._is_delayed_entry(queue, due, due_at, seq):
                self._to_ready(due, keep_seq=True)

    def _compact(self, queue: _Queue) -> None:
        """Rebuild a heap once removed jobs' entries outnumber its live ones."""
        counts = queue.counts
        if len(queue.ready) > 2 * counts.get(JobStatus.QUEUED, 0) + _SLACK:
            queue.ready = [e for e in queue.ready if self._is_ready_entry(queue, *e)]
            heapq.heapify(queue.ready)
        waiting = counts.get(JobStatus.SCHEDULED, 0) + counts.get(JobStatus.RETRYING, 0)
        if len(queue.delayed) > 2 * waiting + _SLACK:
            queue.delayed = [
                (due_at, seq, job_id)
                for due_at, seq, job_id in queue.delayed
                if (job := self._jobs.get(job_id)) is not None
                and self._is_delayed_entry(queue, job, due_at, seq)
            ]
            heapq.heapify(queue.delayed)

    def _is_ready_entry(self, queue: _Queue, _priority: int, seq: int, job_id: str) -> bool:
        job = self._jobs.get(job_id)
        return (
            job is not None
            and job.queue is queue
            and job.seq == seq
            and job.state is JobStatus.QUEUED
        )

    @staticmethod
    def _is_delayed_entry(queue: _Queue, job: _Job, due_at: float, seq: int) -> bool:
        return job.queue is queue and job.seq == seq and job.due == due_at and job.state in _WAITING

    def _next_due(self, queues: Sequence[str]) -> float | None:
        dues = []
        for name in queues:
            queue = self._queues.get(name)
            if queue is None:
                continue
            if queue.delayed:
                dues.append(queue.delayed[0][0])
            dues.extend(job.lease_until for job in queue.leased.values())
        return min(dues, default=None)


def _listed(job: _Job) -> ListedJob:
    at = {
        JobStatus.SCHEDULED: job.due,
        JobStatus.RETRYING: job.due,
        JobStatus.RUNNING: job.lease_until,
        JobStatus.DEAD: job.died_at,
    }.get(job.state)
    message = job.message
    return ListedJob(
        message.id, job.queue.name, job.state, message.body, job.attempts, at, job.reason
    )
