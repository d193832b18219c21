"""The broker contract: moves opaque job bytes between producers and workers, with leases."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import ClassVar, Self

from worq_core.models import (
    Capability,
    DeadJob,
    Delivery,
    JobStatus,
    Message,
    QueueStats,
    Settlement,
    WorkerInfo,
)
from worq_core.storage import Storage


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
    """The URL this broker was built from, for messages and ``worq stats``."""

    @classmethod
    def from_url(cls, url: str) -> Self:
        """Build a broker from a URL whose scheme is one of :attr:`schemes`. Does no I/O."""
        return cls(url)  # type: ignore[call-arg]

    @abstractmethod
    def enqueue(self, messages: Sequence[Message]) -> list[bool]:
        """Add jobs, all or nothing, in one batch.

        Enqueueing is idempotent by ``Message.id``: an id the broker still holds in any state is
        left as it is. Returns, per message, ``True`` if it was added and ``False`` if it was
        already there. Raises :class:`~worq_core.errors.BrokerError` (and adds nothing) on failure.
        """

    @abstractmethod
    def fetch(
        self, queues: Sequence[str], limit: int, *, lease: float, wait: float
    ) -> list[Delivery]:
        """Lease up to ``limit`` jobs that are due, from ``queues`` in the order given.

        Within a queue a larger priority comes first, then FIFO. Each job's attempt count grows by
        one and it is leased for ``lease`` seconds under a fresh token; expired leases are returned
        to their queue first. When nothing is due, blocks up to ``wait`` seconds for a job to
        become due, without busy polling; ``wait=0`` returns at once.
        """

    @abstractmethod
    def extend(self, deliveries: Sequence[Delivery], lease: float) -> list[bool]:
        """Push each delivery's lease deadline to ``lease`` seconds from now.

        Returns, per delivery, whether its token still held the lease (``False``: the lease had
        expired and the job may already be running elsewhere).
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
    ) -> tuple[list[bool], list[Delivery]]:
        """Settle, then fetch; a network broker overrides this to do both in one round trip."""
        applied = self.settle(settlements) if settlements else []
        deliveries = self.fetch(queues, limit, lease=lease, wait=wait) if limit > 0 else []
        return applied, deliveries

    @abstractmethod
    def release(self, deliveries: Sequence[Delivery]) -> None:
        """Hand back leased jobs that were never started.

        They go to the front of their queue at once and their attempt is not counted.
        Deliveries whose lease is no longer held are ignored.
        """

    @abstractmethod
    def job_state(self, queue: str, job_id: str) -> JobStatus | None:
        """Where the broker holds the job: QUEUED, SCHEDULED, RETRYING, RUNNING or DEAD.

        ``None`` when the broker does not hold it (never enqueued, or already acknowledged).
        """

    def job_status(
        self, queue: str, job_id: str, storage: Storage
    ) -> tuple[JobStatus | None, bytes | None]:
        """:meth:`job_state`, and the job's record in ``storage``, for :meth:`Job.status`.

        The default makes two calls (the broker first, so a job that finishes in between is
        still seen). A broker that :meth:`stores_results_in` the storage may answer both in
        one round trip.
        """
        return self.job_state(queue, job_id), storage.load(job_id)

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

    def shareable_url(self) -> str | None:
        """A URL from which another process can build an equivalent broker, or ``None``.

        Used to renew leases from a separate process (:mod:`worq_core.lease_keeper`). Return
        one only if ``type(self).from_url(url)`` reaches the same jobs (same server, database
        and key prefix); the default ``None`` keeps lease renewal on a thread.
        """
        return None

    def stores_results_in(self, storage: Storage) -> bool:
        """Whether :meth:`settle` itself writes ``Settlement.record`` into ``storage``.

        A backend that holds both the queue and the results (say one Redis) returns ``True`` for
        its own storage so the record is written atomically with the ack, in one round trip.
        The default, ``False``, makes the worker save records to the storage before settling.
        """
        return False

    def close(self) -> None:  # noqa: B027 - optional hook, nothing to release by default
        """Release connections and threads. The broker is unusable afterwards."""
