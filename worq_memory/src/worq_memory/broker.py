"""An in-process broker with the full delivery contract: the reference implementation."""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Self

from typing_extensions import override

from worq_core import Broker, Capability, JobStatus
from worq_core.models import (
    DeadJob,
    Delivery,
    Message,
    Outcome,
    QueueStats,
    Settlement,
    WorkerInfo,
)

Clock = Callable[[], float]
_WAITING = (JobStatus.SCHEDULED, JobStatus.RETRYING)


@dataclass(slots=True)
class _Job:
    message: Message
    seq: int
    state: JobStatus = JobStatus.UNKNOWN  # UNKNOWN: not yet counted in any state
    attempts: int = 0
    token: str = ""
    lease_until: float = 0.0
    due: float = 0.0
    reason: str = ""
    died_at: float = 0.0


@dataclass(slots=True)
class _Queue:
    ready: list[tuple[int, int, str]] = field(default_factory=list)  # (-priority, seq, id)
    delayed: list[tuple[float, int, str]] = field(default_factory=list)  # (due, seq, id)
    leased: dict[str, _Job] = field(default_factory=dict)
    dead: OrderedDict[str, _Job] = field(default_factory=OrderedDict)  # oldest first
    counts: dict[JobStatus, int] = field(default_factory=dict)


class MemoryBroker(Broker):
    """Jobs in this process's memory. Thread-safe; nothing survives the process.

    Fetching blocks on a condition variable that enqueues notify, and wakes on its own when the
    next delayed job or lease comes due. ``clock`` (Unix seconds) can be replaced in tests.
    """

    name: ClassVar[str] = "memory"
    schemes: ClassVar[tuple[str, ...]] = ("memory",)
    capabilities: ClassVar[frozenset[Capability]] = frozenset(
        {
            Capability.DELAYED,
            Capability.PRIORITIES,
            Capability.DEAD_LETTER,
            Capability.WORKER_REGISTRY,
        }
    )

    def __init__(
        self,
        url: str = "memory://",
        *,
        clock: Clock = time.time,
        dead_max_count: int = 10_000,
        dead_max_age: float = 7 * 24 * 3600.0,
    ) -> None:
        self.url = url
        self.clock = clock
        self.dead_max_count = dead_max_count
        self.dead_max_age = dead_max_age
        self._jobs: dict[str, _Job] = {}
        self._queues: dict[str, _Queue] = {}
        self._seq = itertools.count()
        self._tokens = itertools.count(1)
        self._changed = threading.Condition()
        self._workers: dict[str, tuple[float, WorkerInfo]] = {}  # id -> (expires, info)

    @override
    @classmethod
    def from_url(cls, url: str) -> Self:
        return cls(url)

    # -- producer side -----------------------------------------------------------------------

    @override
    def enqueue(self, messages: Sequence[Message]) -> list[bool]:
        added = []
        with self._changed:
            now = self.clock()
            for message in messages:
                if message.id in self._jobs:
                    added.append(False)
                    continue
                job = _Job(message, next(self._seq))
                self._jobs[message.id] = job
                if message.eta is not None and message.eta > now:
                    self._to_delayed(job, message.eta, JobStatus.SCHEDULED)
                else:
                    self._to_ready(job)
                added.append(True)
            self._changed.notify_all()
        return added

    # -- worker side ---------------------------------------------------------------------------

    @override
    def fetch(
        self, queues: Sequence[str], limit: int, *, lease: float, wait: float
    ) -> list[Delivery]:
        deadline = time.monotonic() + wait
        with self._changed:
            while True:
                now = self.clock()
                deliveries: list[Delivery] = []
                for name in queues:
                    queue = self._queue(name)
                    self._promote(queue, now)
                    while queue.ready and len(deliveries) < limit:
                        _, seq, job_id = heapq.heappop(queue.ready)
                        job = self._jobs.get(job_id)
                        if job is None or job.state is not JobStatus.QUEUED or job.seq != seq:
                            continue  # a stale heap entry
                        deliveries.append(self._lease(queue, job, now + lease))
                if deliveries or limit <= 0:
                    return deliveries
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return []
                next_due = self._next_due(queues)
                if next_due is not None:
                    remaining = min(remaining, max(next_due - now, 0.001))
                self._changed.wait(remaining)

    @override
    def extend(self, deliveries: Sequence[Delivery], lease: float) -> list[bool]:
        with self._changed:
            now = self.clock()
            alive = []
            for delivery in deliveries:
                job = self._held(delivery, now)
                if job is not None:
                    job.lease_until = now + lease
                alive.append(job is not None)
            return alive

    @override
    def settle(self, settlements: Sequence[Settlement]) -> list[bool]:
        with self._changed:
            now = self.clock()
            applied = []
            for settlement in settlements:
                job = self._held(settlement.delivery, now)
                applied.append(job is not None)
                if job is None:
                    continue
                queue = self._queue(job.message.queue)
                del queue.leased[job.message.id]
                job.token = ""
                if settlement.outcome is Outcome.ACK:
                    self._set_state(job, JobStatus.UNKNOWN)
                    del self._jobs[job.message.id]
                elif settlement.outcome is Outcome.RETRY:
                    job.reason = settlement.reason
                    self._to_delayed(job, now + settlement.delay, JobStatus.RETRYING)
                else:
                    job.reason = settlement.reason
                    self._to_dead(queue, job, now)
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
                del self._queue(job.message.queue).leased[job.message.id]
                job.token = ""
                job.attempts -= 1
                self._to_ready(job, keep_seq=True)
            self._changed.notify_all()

    # -- inspection and admin ------------------------------------------------------------------

    @override
    def job_state(self, queue: str, job_id: str) -> JobStatus | None:
        with self._changed:
            self._promote(self._queue(queue), self.clock())
            job = self._jobs.get(job_id)
            if job is None or job.message.queue != queue:
                return None
            return job.state

    @override
    def stats(self, queues: Sequence[str] | None = None) -> list[QueueStats]:
        with self._changed:
            now = self.clock()
            result = []
            for name in queues if queues is not None else sorted(self._queues):
                queue = self._queue(name)
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
            q = self._queue(queue)
            self._trim_dead(q, self.clock())
            newest = list(reversed(q.dead.values()))[:limit]
            return [
                DeadJob(j.message.id, queue, j.message.body, j.reason, j.attempts, j.died_at)
                for j in newest
            ]

    @override
    def requeue_dead(self, queue: str, job_ids: Sequence[str] | None = None) -> int:
        with self._changed:
            q = self._queue(queue)
            ids = list(q.dead) if job_ids is None else [i for i in job_ids if i in q.dead]
            for job_id in ids:
                job = q.dead.pop(job_id)
                job.attempts = 0
                job.reason = ""
                job.seq = next(self._seq)
                self._to_ready(job)
            self._changed.notify_all()
            return len(ids)

    @override
    def purge_dead(self, queue: str) -> int:
        with self._changed:
            q = self._queue(queue)
            count = len(q.dead)
            for job_id in q.dead:
                del self._jobs[job_id]
            q.dead.clear()
            return count

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

    def _queue(self, name: str) -> _Queue:
        queue = self._queues.get(name)
        if queue is None:
            queue = self._queues[name] = _Queue()
        return queue

    def _set_state(self, job: _Job, state: JobStatus) -> None:
        """Move ``job`` to ``state`` keeping the per-state counts (dead jobs are counted apart)."""
        counts = self._queue(job.message.queue).counts
        if job.state not in (JobStatus.UNKNOWN, JobStatus.DEAD):
            counts[job.state] -= 1
        if state not in (JobStatus.UNKNOWN, JobStatus.DEAD):
            counts[state] = counts.get(state, 0) + 1
        job.state = state

    def _to_ready(self, job: _Job, *, keep_seq: bool = False) -> None:
        if not keep_seq:
            job.seq = next(self._seq)
        self._set_state(job, JobStatus.QUEUED)
        queue = self._queue(job.message.queue)
        heapq.heappush(queue.ready, (-job.message.priority, job.seq, job.message.id))

    def _to_delayed(self, job: _Job, due: float, state: JobStatus) -> None:
        job.due = due
        self._set_state(job, state)
        heapq.heappush(self._queue(job.message.queue).delayed, (due, job.seq, job.message.id))

    def _to_dead(self, queue: _Queue, job: _Job, now: float) -> None:
        self._set_state(job, JobStatus.DEAD)
        job.died_at = now
        queue.dead[job.message.id] = job
        self._trim_dead(queue, now)

    def _trim_dead(self, queue: _Queue, now: float) -> None:
        while queue.dead:
            oldest_id, oldest = next(iter(queue.dead.items()))
            if len(queue.dead) <= self.dead_max_count and now - oldest.died_at <= self.dead_max_age:
                break
            del queue.dead[oldest_id]
            del self._jobs[oldest_id]

    def _lease(self, queue: _Queue, job: _Job, until: float) -> Delivery:
        job.attempts += 1
        job.token = str(next(self._tokens))
        job.lease_until = until
        self._set_state(job, JobStatus.RUNNING)
        queue.leased[job.message.id] = job
        message = job.message
        return Delivery(message.id, message.queue, message.body, job.token, job.attempts)

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
        for job_id, job in list(queue.leased.items()):
            if job.lease_until <= now:
                del queue.leased[job_id]
                job.token = ""
                self._to_ready(job, keep_seq=True)
        while queue.delayed and queue.delayed[0][0] <= now:
            _, seq, job_id = heapq.heappop(queue.delayed)
            due = self._jobs.get(job_id)
            if due is not None and due.seq == seq and due.state in _WAITING:
                self._to_ready(due, keep_seq=True)

    def _next_due(self, queues: Sequence[str]) -> float | None:
        dues = [
            due
            for name in queues
            for due in ([self._queue(name).delayed[0][0]] if self._queue(name).delayed else [])
            + [job.lease_until for job in self._queue(name).leased.values()]
        ]
        return min(dues, default=None)
