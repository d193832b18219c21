"""The broker contract: moves opaque job bytes between producers and workers, with leases."""

from __future__ import annotations

import urllib.parse
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from typing import ClassVar, Self

from worq_core.errors import BrokerError, UnsupportedError
from worq_core.models import (
    CancelOutcome,
    Capability,
    DeadJob,
    Delivery,
    Event,
    GroupSpec,
    GroupState,
    JobState,
    JobStatus,
    LeaseState,
    ListedJob,
    Message,
    QueueStats,
    Settlement,
    WorkerInfo,
)
from worq_core.storage import Storage


def redact_url(url: str) -> str:
    """``url`` with its password, if any, replaced by ``***``."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rpartition("@")[2]
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


class Broker(ABC):
    """Base class of every broker.

    A broker knows nothing of tasks or serializers. Its duties are the delivery contract in
    ``docs/concepts.md``: at-least-once delivery, leases fenced by a token, delayed delivery,
    priorities, and a dead-letter queue. All methods must be safe to call from several threads
    at once: a worker fetches on one thread, heartbeats on another and settles on its job threads.

    Subclasses set :attr:`name`, :attr:`schemes` and :attr:`capabilities`, and are constructed
    from a URL with :meth:`from_url`.
    """

    name: ClassVar[str]
    """Unique plugin name, e.g. ``"redis"``."""
    schemes: ClassVar[tuple[str, ...]] = ()
    """URL schemes this broker serves, e.g. ``("redis", "rediss")``."""
    capabilities: ClassVar[frozenset[Capability]] = frozenset()
    """Optional abilities this broker provides; see :class:`Capability`."""

    url: str = ""
    """The URL this broker was built from (with any password: show :attr:`shown_url`)."""

    @property
    def shown_url(self) -> str:
        """:attr:`url` with its password, if any, replaced by ``***``: safe to print or show."""
        return redact_url(self.url)

    @classmethod
    def from_url(cls, url: str) -> Self:
        """Build a broker from a URL whose scheme is one of :attr:`schemes`. Does no I/O."""
        return cls(url)  # type: ignore[call-arg]

    @abstractmethod
    def enqueue(self, messages: Sequence[Message]) -> list[bool]:
        """Add jobs, all or nothing, in one batch.

        A job id is unique across every queue of the broker: an id the broker still holds in any
        state (queued, scheduled, retrying, running or dead), in any queue, is left as it is,
        and checking and adding is one atomic step. Returns, per message, ``True`` if it was
        added and ``False`` if it was already there. With :attr:`Capability.RESULTS`, a message
        with ``clear_record`` that is added has its old record deleted in the same step. Raises
        :class:`~worq_core.errors.BrokerError` (and adds nothing) on failure.
        """

    @abstractmethod
    def fetch(
        self,
        queues: Sequence[str],
        limit: int,
        *,
        lease: float,
        wait: float,
        worker: str | None = None,
    ) -> list[Delivery]:
        """Lease up to ``limit`` jobs that are due, from ``queues`` in the order given.

        Within a queue a larger priority comes first, then FIFO. Each job's attempt count grows by
        one and it is leased for ``lease`` seconds under a fresh token; expired leases are returned
        to their queue first. When nothing is due, blocks up to ``wait`` seconds for a job to
        become due, without busy polling; ``wait=0`` returns at once.

        ``worker`` is passed only to a broker with :attr:`Capability.WORKER_LEASES` (a broker
        without it may leave the parameter out): the leases granted are recorded under that
        worker id for :meth:`extend_worker` until they leave it (settled, released, expired).
        """

    @abstractmethod
    def extend(
        self,
        deliveries: Sequence[Delivery],
        lease: float,
        progress: Mapping[str, bytes] | None = None,
    ) -> list[LeaseState]:
        """Push each delivery's lease deadline to ``lease`` seconds from now.

        Returns, per delivery, :attr:`LeaseState.HELD` if its token still held the lease,
        :attr:`LeaseState.LOST` if not (the lease had expired, or the job was settled, and it
        may already be running elsewhere), and :attr:`LeaseState.CANCELLING` if it was renewed
        but :meth:`cancel` was asked for it. ``progress`` maps job ids of held leases to their
        latest progress (opaque bytes); a broker with :attr:`Capability.PROGRESS` keeps it for
        :attr:`JobState.progress` until the job is settled, others ignore it.
        """

    @abstractmethod
    def settle(self, settlements: Sequence[Settlement]) -> list[bool]:
        """Apply workers' verdicts: acknowledge, retry after a delay, or dead-letter.

        A settlement whose token no longer holds the lease is refused and changes nothing;
        returns, per settlement, whether it was applied.
        """

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
        """Settle, then fetch; a network broker overrides this to do both in one round trip.

        ``worker`` as in :meth:`fetch` (passed only with :attr:`Capability.WORKER_LEASES`).
        """
        applied = self.settle(settlements) if settlements else []
        if limit <= 0:
            return applied, []
        if worker is None:
            return applied, self.fetch(queues, limit, lease=lease, wait=wait)
        return applied, self.fetch(queues, limit, lease=lease, wait=wait, worker=worker)

    def extend_worker(
        self,
        worker: str,
        queues: Sequence[str],
        lease: float,
        progress: Mapping[str, bytes] | None = None,
    ) -> dict[str, LeaseState]:
        """Renew every lease fetched with ``worker=worker`` from ``queues`` that is still held.

        Only for :attr:`Capability.WORKER_LEASES`. Fenced as :meth:`extend`: a lease whose
        token no longer holds it (settled, released, expired, leased again) is never renewed.
        Returns the token of each lease renewed, mapped to :attr:`LeaseState.HELD`, or to
        :attr:`LeaseState.CANCELLING` when :meth:`cancel` was asked for its job; a lease the
        worker took that is not in the answer is not held any more. ``progress`` as in
        :meth:`extend`, applied to renewed leases only. The default raises
        :class:`~worq_core.errors.UnsupportedError`: worq-core checks the capability first.
        """
        raise UnsupportedError(
            self.name, Capability.WORKER_LEASES.value, "renewing a worker's leases at once"
        )

    @abstractmethod
    def release(self, deliveries: Sequence[Delivery]) -> None:
        """Hand back leased jobs that were never started.

        They go to the front of their queue at once and their attempt is not counted; a
        cancellation requested meanwhile is kept (the next delivery has
        :attr:`Delivery.cancel_requested`). Deliveries whose lease is no longer held are
        ignored.
        """

    @abstractmethod
    def job_state(self, job_id: str) -> JobState | None:
        """Where the broker holds the job, in whichever queue: its queue, status and progress.

        The status is QUEUED, SCHEDULED, RETRYING, RUNNING or DEAD; a due delayed job reads as
        QUEUED and a job whose lease expired as QUEUED. ``None`` when the broker does not hold
        it (never enqueued, acknowledged, cancelled while waiting, or purged).
        """

    def job_status(self, job_id: str, storage: Storage) -> tuple[JobState | None, bytes | None]:
        """:meth:`job_state`, and the job's record in ``storage``, for :meth:`Job.status`.

        The default makes two calls (the broker first, so a job that finishes in between is
        still seen). A broker that :meth:`stores_results_in` the storage may answer both in
        one round trip.
        """
        return self.job_state(job_id), storage.load(job_id)

    def enqueue_unique(self, messages: Sequence[Message]) -> list[str | None]:
        """:meth:`enqueue`, honouring :attr:`Message.unique`; only for :attr:`Capability.UNIQUE`.

        All or nothing, in one atomic step like :meth:`enqueue`. Per message: ``None`` if it
        was added; otherwise the id of the job that stands for it, and nothing is added: its
        own id when that id is already held, else the id of the job holding its unique key in
        its queue. A key is held from the enqueue that adds its job until that job reaches
        :attr:`UniqueKey.until` (``STARTED``: its first fetch; ``DONE``: acknowledged,
        dead-lettered or cancelled), then for :attr:`UniqueKey.hold_for` seconds more, and
        never longer than the broker holds the job (a purged or trimmed job frees its key).
        A message added in the batch holds its key for the messages after it. Messages
        without ``unique`` are plain enqueues. The default raises
        :class:`~worq_core.errors.BrokerError`: worq-core checks the capability first.
        """
        raise BrokerError(f"the {self.name} broker cannot enqueue unique jobs")

    async def enqueue_async(self, messages: Sequence[Message]) -> list[bool]:
        """:meth:`enqueue` for asyncio code: the same answers, errors and atomicity.

        The default runs :meth:`enqueue` on a thread (``asyncio.to_thread``). A broker with an
        asyncio client overrides it to send from the event loop itself, as worq-redis does, so
        a web app's enqueue costs no thread hand-off. Awaited by :meth:`Task.enqueue_async`.
        """
        import asyncio  # here, not at the top: a worker with no async task never imports it

        return await asyncio.to_thread(self.enqueue, messages)

    async def enqueue_unique_async(self, messages: Sequence[Message]) -> list[str | None]:
        """:meth:`enqueue_unique` for asyncio code; the default runs it on a thread."""
        import asyncio

        return await asyncio.to_thread(self.enqueue_unique, messages)

    def enqueue_on(self, connection: object, messages: Sequence[Message]) -> list[str | None]:
        """:meth:`enqueue_unique` on the caller's connection (:attr:`Capability.TRANSACTIONAL`).

        ``connection`` is the application's database connection (of the kind the broker
        documents), usually inside a transaction it has opened. The jobs are written through
        it and nothing is committed: they exist (and can be fetched) only once the caller
        commits, and never if it rolls back. Answers as :meth:`enqueue_unique`. A connection
        the broker cannot use raises :class:`~worq_core.errors.BrokerError` and adds nothing.
        The default raises :class:`~worq_core.errors.UnsupportedError`: worq-core checks the
        capability first.
        """
        raise UnsupportedError(
            self.name, Capability.TRANSACTIONAL.value, "enqueueing on the caller's connection"
        )

    def fire_schedule(
        self,
        schedule: str,
        tick: float,
        last: float | None,
        message: Message | None,
        queue: str | None = None,
    ) -> bool:
        """Fire one tick of a schedule; only for :attr:`Capability.SCHEDULES`.

        A compare-and-set on the schedule's recorded last fire, in one atomic step with the
        enqueue: if the record equals ``last`` (``None``: the schedule has no record yet), it
        becomes ``tick`` and ``message`` (if not ``None``) is enqueued as
        :meth:`enqueue_unique` would (a held id or unique key adds nothing, and the tick still
        counts as fired); returns ``True``. Otherwise nothing changes and it returns ``False``.
        Times are Unix seconds, compared exactly.

        ``queue`` is the queue the schedule's jobs go to (``message.queue`` when left out). A
        broker may keep each record with that queue (Redis Cluster keeps it in the queue's
        slot, so the compare-and-set and the enqueue stay one step), so a schedule is always
        fired, and read by :meth:`schedule_fires`, with the same queue; the scheduler passes
        it on every call, with a message or without. Should a schedule's queue change, such a
        broker starts it afresh (no record under the new queue). A ``message`` for another
        queue than ``queue`` (moved by a middleware) is still enqueued with the tick. Brokers
        that keep one record per name (the others) ignore it. The default raises
        :class:`~worq_core.errors.BrokerError`: worq-core checks the capability first.
        """
        raise BrokerError(f"the {self.name} broker cannot keep schedules")

    def schedule_fires(
        self, schedules: Sequence[str] | None = None, queues: Mapping[str, str] | None = None
    ) -> dict[str, float]:
        """The recorded last fire of each of ``schedules`` that has one (``None``: all).

        ``queues`` maps schedule names to the queue they are fired with (the ``queue`` of
        :meth:`fire_schedule`), for brokers that keep records per queue; a name it leaves out
        is looked up everywhere. Only for :attr:`Capability.SCHEDULES`; the default knows none.
        """
        return {}

    def open_group(self, group: GroupSpec, members: Sequence[Message]) -> list[bool]:
        """Record ``group`` and enqueue ``members`` in one step (:attr:`Capability.WORKFLOWS`).

        Returns :meth:`enqueue`'s answer per member. Each member carries its
        :attr:`Message.member` in this group, at distinct indexes; a group may be opened with
        fewer members than its size when the others are enqueued later (by a
        :attr:`Settlement.then`, or as another group's callback). From then on the broker counts
        each index once, at its member's first terminal settlement (ack: done; dead: failed;
        removal by :meth:`cancel`: failed, no output), in the same step, and the step that
        counts the last index enqueues ``group.callback`` (unless a member failed and not
        ``group.run_on_failure``). A group of size 0 is complete at once. A group id already
        recorded raises :class:`ValueError` and adds nothing. The default raises
        :class:`~worq_core.errors.BrokerError`: worq-core checks the capability first.
        """
        raise BrokerError(f"the {self.name} broker cannot run workflows")

    def group_state(self, group_id: str) -> GroupState | None:
        """A group's state; ``None`` if unknown or released (the default knows none)."""
        return None

    def cancel(self, job_id: str, record: bytes | None = None, ttl: float = 0.0) -> CancelOutcome:
        """Cancel a job, atomically, wherever it is; only for :attr:`Capability.CANCEL`.

        A waiting job (queued, scheduled or retrying) is removed: :attr:`CancelOutcome.REMOVED`,
        and ``record`` (the cancellation record, when the broker :meth:`stores_results_in` the
        app's storage) is written with ``ttl`` in the same step. A running job is flagged:
        :attr:`CancelOutcome.REQUESTED`; :meth:`extend` then answers
        :attr:`LeaseState.CANCELLING` for its lease, and a later delivery of it (after its
        lease expired, a release, or a RETRY settlement: the flag outlives all three, and
        ends only when the job is acknowledged or dead-lettered) has
        :attr:`Delivery.cancel_requested`. A dead or unknown job:
        :attr:`CancelOutcome.NOT_FOUND`, nothing changes. The default raises
        :class:`~worq_core.errors.BrokerError`: worq-core checks the capability first.
        """
        raise BrokerError(f"the {self.name} broker cannot cancel jobs")

    @abstractmethod
    def stats(self, queues: Sequence[str] | None = None) -> list[QueueStats]:
        """Counts per queue; ``None`` means every queue the broker knows of."""

    @abstractmethod
    def dead_jobs(self, queue: str, limit: int = 100) -> list[DeadJob]:
        """The most recently dead-lettered jobs of ``queue``, newest first."""

    @abstractmethod
    def requeue_dead(self, queue: str, job_ids: Sequence[str] | None = None) -> int:
        """Move dead jobs (all when ``job_ids`` is ``None``) back to ``queue`` with attempts reset.

        Returns how many were moved.
        """

    @abstractmethod
    def purge_dead(self, queue: str) -> int:
        """Delete every dead job of ``queue``; returns how many were deleted."""

    LISTED_STATES: ClassVar[frozenset[JobStatus]] = frozenset(
        {JobStatus.QUEUED, JobStatus.SCHEDULED, JobStatus.RUNNING, JobStatus.DEAD}
    )
    """The states :meth:`list_jobs` lists (RETRYING jobs are listed under SCHEDULED)."""

    def list_jobs(
        self, queue: str, status: JobStatus, offset: int = 0, limit: int = 50
    ) -> list[ListedJob]:
        """A page of ``queue``'s jobs in ``status``: at most ``limit``, skipping ``offset``.

        QUEUED jobs come in the order they will be fetched, SCHEDULED ones (retrying jobs
        among them, with their own status) by due time, RUNNING ones by lease deadline, and
        DEAD ones newest first. A page costs about ``offset + limit``, never the whole queue
        (:attr:`Capability.LISTING`). An offset is a position, so jobs that leave the state
        between two pages shift the later ones.
        """
        raise BrokerError(f"the {self.name} broker cannot list jobs")

    def find_job(self, job_id: str) -> ListedJob | None:
        """The job with this id if the broker holds it (in any state), with its body."""
        raise BrokerError(f"the {self.name} broker cannot look up jobs")

    def publish_events(self, events: Sequence[Event]) -> None:  # noqa: B027 - optional
        """Append ``events`` to the recent-events stream, dropping the oldest beyond its bound.

        Brokers with :attr:`Capability.EVENTS` keep them; by default they are dropped.
        """

    def read_events(
        self, after: str | None = None, limit: int = 100, timeout: float = 0.0
    ) -> list[Event]:
        """Events from the stream, oldest first, each with its ``id``.

        With ``after=None``, the newest ``limit`` events. With the ``id`` of an event, at most
        ``limit`` events that came after it, waiting up to ``timeout`` seconds for the first
        one (without polling). An ``after`` older than the stream's bound starts at its oldest.
        """
        return []

    def register_worker(self, info: WorkerInfo, ttl: float) -> None:  # noqa: B027 - optional
        """Record a live worker; it is forgotten ``ttl`` seconds after its last registration.

        Called by every worker at each heartbeat. Brokers that declare
        :attr:`Capability.WORKER_REGISTRY` keep it for :meth:`workers`; by default it is ignored.
        """

    def unregister_worker(self, worker_id: str) -> None:  # noqa: B027 - optional
        """Forget a worker that stopped cleanly."""

    def workers(self) -> list[WorkerInfo]:
        """Every registered worker whose registration has not expired."""
        return []

    def stores_results_in(self, storage: Storage) -> bool:
        """Whether this broker can write records into ``storage`` atomically with settlements.

        Only asked of brokers with :attr:`Capability.RESULTS`; a pure question with no side
        effects. A backend that holds both the queue and the results (say one Redis) returns
        ``True`` for its own storage, and worq-core then hands it the records
        (``Settlement.record``, ``Message.clear_record``, the ``record`` of :meth:`cancel`).
        Otherwise, the default, worq-core saves and deletes records in the storage itself.
        """
        return False

    def recipe(self) -> Callable[[], Broker] | None:
        """A picklable callable that builds this broker again in another process, or ``None``.

        The lease keeper (a child process of ``worq worker``) builds its broker with it: the
        broker it builds must reach the same server and keys, with the same settings. Without
        one (the default, and for a broker built around a client object the user made) the
        keeper imports the user's app to build it, paying that import's time, memory and
        side effects once more.
        """
        return None

    def verify(self) -> None:  # noqa: B027 - optional hook, nothing to check by default
        """Check, before a worker starts, that this broker can ever work; raise if not.

        For problems no retry can mend, such as a database schema older than the code: raise
        a :class:`~worq_core.errors.BrokerError` saying what to do, and the worker refuses to
        start. A server that cannot be reached right now is not such a problem (the worker
        retries it like any fetch), so a broker lets connection errors pass here.
        """

    def close(self) -> None:  # noqa: B027 - optional hook, nothing to release by default
        """Release connections and threads. The broker is unusable afterwards."""
