"""Plain data that crosses the boundary between worq-core and its backends."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class JobStatus(enum.StrEnum):
    """Where a job is in its life, as reported by :meth:`worq_core.Job.status`."""

    QUEUED = "queued"
    """Waiting in its queue for a worker."""
    SCHEDULED = "scheduled"
    """Delayed until its due time (``delay=`` or ``eta=``)."""
    RUNNING = "running"
    """Leased by a worker that is running it."""
    RETRYING = "retrying"
    """Failed at least once and waiting for its retry backoff to pass."""
    SUCCEEDED = "succeeded"
    """Finished; its result is in the storage until the result TTL runs out."""
    DEAD = "dead"
    """Failed for good and kept in the dead-letter queue."""
    UNKNOWN = "unknown"
    """Never enqueued, or finished so long ago that its result expired."""


class Capability(enum.StrEnum):
    """Optional abilities a broker declares in :attr:`Broker.capabilities`.

    The conformance suite skips the cases a broker does not declare, so a small backend can still
    prove the rest of the contract.
    """

    DELAYED = "delayed"
    """Honours ``Message.eta``: a job is never delivered before it."""
    PRIORITIES = "priorities"
    """A larger ``Message.priority`` is delivered first within a queue."""
    DEAD_LETTER = "dead_letter"
    """Keeps dead-lettered jobs, and can list, requeue and purge them."""
    SHARED = "shared"
    """Visible to other processes and machines (not just the one that created the broker)."""
    WORKER_REGISTRY = "worker_registry"
    """Keeps the heartbeats of live workers (:meth:`Broker.register_worker`) for ``worq stats``."""


@dataclass(frozen=True, slots=True)
class Message:
    """A job on its way into a broker: opaque bytes plus what the broker needs to route them."""

    id: str
    queue: str
    body: bytes
    priority: int = 0
    eta: float | None = None
    """Unix time before which the job must not be delivered; ``None`` means now."""


@dataclass(frozen=True, slots=True)
class Delivery:
    """A leased job handed to a worker by :meth:`Broker.fetch`.

    ``token`` fences the lease: only the holder of the current token may extend or settle it.
    ``attempts`` counts fetches including this one, so a job that keeps killing its worker is
    recognised on its next delivery.
    """

    id: str
    queue: str
    body: bytes
    token: str
    attempts: int


class Outcome(enum.StrEnum):
    """How a worker settles a delivery."""

    ACK = "ack"
    """Done: forget the job."""
    RETRY = "retry"
    """Failed: deliver again after ``Settlement.delay`` seconds."""
    DEAD = "dead"
    """Failed for good: move to the dead-letter queue with ``Settlement.reason``."""


@dataclass(frozen=True, slots=True)
class Settlement:
    """A worker's verdict on one delivery, applied by :meth:`Broker.settle`.

    ``record`` is the job's storage record (result or final error) and ``ttl`` its lifetime. The
    worker has already saved it unless the broker said, through
    :meth:`Broker.stores_results_in`, that it writes it itself atomically with the settlement.
    """

    delivery: Delivery
    outcome: Outcome
    delay: float = 0.0
    reason: str = ""
    record: bytes | None = None
    ttl: float = 0.0


@dataclass(frozen=True, slots=True)
class QueueStats:
    """Counts of one queue's jobs by state."""

    queue: str
    ready: int
    delayed: int
    running: int
    dead: int


@dataclass(frozen=True, slots=True)
class DeadJob:
    """A dead-lettered job as listed by :meth:`Broker.dead_jobs`."""

    id: str
    queue: str
    body: bytes
    reason: str
    attempts: int
    died_at: float


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    """A live worker as it registers itself with every heartbeat."""

    id: str
    host: str
    pid: int
    started: float
    queues: tuple[str, ...]
    concurrency: int
    done: int
    """Jobs finished (succeeded, retried or dead) since it started."""
    running: int
    seen: float
    """Unix time of its latest heartbeat."""
