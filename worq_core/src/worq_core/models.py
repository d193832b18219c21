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
    CANCELLED = "cancelled"
    """Cancelled by :meth:`worq_core.Job.cancel`; never retried nor dead-lettered."""
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
    CANCEL = "cancel"
    """Implements :meth:`Broker.cancel`: removes waiting jobs and flags running ones, whose
    workers learn of it from :meth:`Broker.extend` (:attr:`LeaseState.CANCELLING`) or from
    :attr:`Delivery.cancel_requested`."""
    PROGRESS = "progress"
    """Keeps the progress that :meth:`Broker.extend` carries, in :attr:`JobState.progress`,
    while the job runs."""
    RESULTS = "results"
    """Writes ``Settlement.record`` (and drops a replaced one, ``Message.clear_record``)
    itself, atomically with the state change, for a storage it :meth:`Broker.stores_results_in`."""
    SCHEDULES = "schedules"
    """Keeps periodic schedules' last fire times and implements :meth:`Broker.fire_schedule`:
    recording a tick and enqueueing its job is one atomic step, so one tick fires once however
    many workers run the scheduler."""
    UNIQUE = "unique"
    """Honours :attr:`Message.unique` in :meth:`Broker.enqueue_unique`: a second job with the
    key of one still held is not added, and the holder's id is returned instead."""
    LIMITS = "limits"
    """Honours :attr:`Message.rate` and :attr:`Message.concurrency` at fetch: a job over its
    limit is set aside (not delivered, not blocking the jobs behind it) until it is allowed."""
    WORKFLOWS = "workflows"
    """Enqueues :attr:`Settlement.then` with the settlement, and counts group members as they
    settle (:meth:`Broker.open_group`): the step that settles a group's last member enqueues
    its callback. Chains, groups and chords are built on it."""
    LISTING = "listing"
    """Lists a queue's jobs by state a page at a time (:meth:`Broker.list_jobs`) and finds a
    held job by id with its body (:meth:`Broker.find_job`), for operators' tools."""
    EVENTS = "events"
    """Keeps a bounded stream of recent job events (:meth:`Broker.publish_events`) that other
    processes follow (:meth:`Broker.read_events`) without scanning anything."""
    TRANSACTIONAL = "transactional"
    """Enqueues on the application's own database connection (:meth:`Broker.enqueue_on`,
    ``task.options(connection=conn)``), inside its open transaction: the job exists only if
    that transaction commits."""
    WORKER_LEASES = "worker_leases"
    """Records the leases a fetch grants under the fetching worker (``worker=`` of
    :meth:`Broker.fetch`) until they leave it, and renews all of a worker's leases in one call
    (:meth:`Broker.extend_worker`): the lease keeper then needs nothing from the worker per job."""


class LeaseState(enum.StrEnum):
    """What :meth:`Broker.extend` found for one lease."""

    HELD = "held"
    """Renewed: the token still holds the lease."""
    LOST = "lost"
    """Not renewed: the lease expired (or the job was settled); it may run elsewhere."""
    CANCELLING = "cancelling"
    """Renewed, and :meth:`Broker.cancel` was asked for the job: the run should stop."""


class CancelOutcome(enum.StrEnum):
    """What :meth:`Broker.cancel` did."""

    REMOVED = "removed"
    """The job was waiting (queued, scheduled or retrying) and is gone: it ends cancelled."""
    REQUESTED = "requested"
    """The job is running: its worker is told at its next lease renewal."""
    NOT_FOUND = "not_found"
    """The broker does not hold the job, or it is dead: nothing changed."""


class UniqueUntil(enum.StrEnum):
    """When a unique job lets go of its key (see :class:`UniqueKey`)."""

    STARTED = "started"
    """When it is first fetched: an equal job may be queued while it runs."""
    DONE = "done"
    """When it is acknowledged, dead-lettered or cancelled: no equal job while it runs."""


@dataclass(frozen=True, slots=True)
class UniqueKey:
    """A unique job's key, for a broker with :attr:`Capability.UNIQUE`.

    While the job holding ``key`` in its queue is held by the broker and has not reached
    ``until``, another message with the same key in the same queue is not added. From that
    moment the key stays taken for ``hold_for`` more seconds (still answering with the
    holder's id), then it is free.
    """

    key: str
    until: UniqueUntil = UniqueUntil.DONE
    hold_for: float = 0.0


@dataclass(frozen=True, slots=True)
class RateLimit:
    """At most ``burst`` jobs of ``key`` at once, then one per ``interval`` seconds (GCRA).

    Counted per queue, across every worker, at fetch, by a broker with
    :attr:`Capability.LIMITS`. A job over the limit gets the next free slot: it waits
    (SCHEDULED) until then, and the slot is its own when it comes due. Over any window of
    ``w`` seconds at most ``burst + w / interval`` jobs of the key start.
    """

    key: str
    interval: float
    burst: int = 1


@dataclass(frozen=True, slots=True)
class ConcurrencyLimit:
    """At most ``limit`` jobs of ``key`` leased at once, per queue, across every worker.

    A permit is tied to the job's lease: it comes back when the job is settled or released,
    and when its lease expires (a dead worker). A job with no permit free is set aside until
    one is given back, then goes to the front of its queue.
    """

    key: str
    limit: int


# Not frozen, unlike the other models: one is built for every job sent, and a frozen
# dataclass's __init__ (a call per field) took 2.2 µs against 0.5 µs, 8% of what an
# enqueue_many spends per job in worq-core and Redis together.
@dataclass(slots=True)
class Message:
    """A job on its way into a broker: opaque bytes plus what the broker needs to route them.

    Brokers read it and never change it.
    """

    id: str
    queue: str
    body: bytes
    priority: int = 0
    eta: float | None = None
    """Unix time before which the job must not be delivered; ``None`` means now."""
    clear_record: bool = False
    """The id was chosen by the caller, so an earlier run may have left a record. A broker that
    :meth:`Broker.stores_results_in` the app's storage deletes that record in the same atomic
    step that adds the job (and only if it adds it); any other broker ignores the flag, and
    worq-core clears a stale record itself."""
    unique: UniqueKey | None = None
    """Only through :meth:`Broker.enqueue_unique`, on a broker with :attr:`Capability.UNIQUE`."""
    rate: RateLimit | None = None
    """Only for a broker with :attr:`Capability.LIMITS`."""
    concurrency: ConcurrencyLimit | None = None
    """Only for a broker with :attr:`Capability.LIMITS`."""
    member: GroupMember | None = None
    """Its place in a group (:meth:`Broker.open_group`): its terminal settlement is counted
    there. Only for a broker with :attr:`Capability.WORKFLOWS`."""
    closes: str | None = None
    """A group id: this job's terminal settlement (ack or dead), or its removal by
    :meth:`Broker.cancel`, releases that group's state. Only for :attr:`Capability.WORKFLOWS`."""


@dataclass(frozen=True, slots=True)
class GroupMember:
    """A message's place in a group: which group, at which index (``0 <= index < size``)."""

    group: str
    index: int


@dataclass(frozen=True, slots=True)
class GroupSpec:
    """A group as :meth:`Broker.open_group` records it."""

    id: str
    size: int
    callback: Message | None = None
    """Enqueued by the step that counts the group's last member."""
    run_on_failure: bool = False
    """Enqueue the callback even when a member ended dead or cancelled."""
    ttl: float = 86400.0
    """Seconds the state of a complete group is kept, unless a job's ``closes`` releases it
    first."""


@dataclass(frozen=True, slots=True)
class GroupState:
    """A group's progress, from :meth:`Broker.group_state`."""

    id: str
    size: int
    outputs: tuple[bytes | None, ...]
    """Per index, the :attr:`Settlement.output` its member finished with; ``None`` before."""
    finished: frozenset[int]
    """The indexes counted: acknowledged, dead, or removed by cancel."""
    failed: frozenset[int]
    """The finished indexes that ended dead or were cancelled."""
    callback_id: str | None
    complete: bool
    """Every index is finished."""
    callback_sent: bool
    """The callback was enqueued (complete, and no failure or ``run_on_failure``)."""


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
    cancel_requested: bool = False
    """:meth:`Broker.cancel` was asked for the job while an earlier delivery ran it (its lease
    then expired, or it was released): the worker ends it cancelled without running it."""


@dataclass(frozen=True, slots=True)
class JobState:
    """Where a broker holds a job, from :meth:`Broker.job_state`."""

    queue: str
    status: JobStatus
    """QUEUED, SCHEDULED, RETRYING, RUNNING or DEAD."""
    attempts: int = 0
    """Deliveries so far."""
    progress: bytes | None = None
    """The latest progress its worker reported (serialized by worq-core), while it runs."""
    cancel_requested: bool = False
    """:meth:`Broker.cancel` flagged it while it was running."""


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

    ``record`` is the job's storage record (result, final error, or cancellation) and ``ttl``
    its lifetime. It is set only for a broker with :attr:`Capability.RESULTS` that
    :meth:`Broker.stores_results_in` the app's storage, which must then write it atomically
    with the settlement; otherwise the worker saved the record itself and ``record`` is ``None``.
    """

    delivery: Delivery
    outcome: Outcome
    delay: float = 0.0
    reason: str = ""
    record: bytes | None = None
    ttl: float = 0.0
    then: tuple[Message, ...] = ()
    """Enqueued in the same atomic step, only if the settlement applies (as :meth:`Broker.enqueue`
    would: a held id adds nothing). Only for :attr:`Capability.WORKFLOWS`."""
    output: bytes | None = None
    """For a group member's ack or dead settlement: kept at its index in the group."""


@dataclass(frozen=True, slots=True)
class QueueStats:
    """Counts of one queue's jobs by state."""

    queue: str
    ready: int
    """Jobs due and waiting for a worker, including jobs waiting for a concurrency permit."""
    delayed: int
    """Scheduled and retrying jobs not yet due, including jobs waiting for their rate slot."""
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
class ListedJob:
    """A job the broker holds, as :meth:`Broker.list_jobs` and :meth:`Broker.find_job` give it."""

    id: str
    queue: str
    status: JobStatus
    """QUEUED, SCHEDULED, RETRYING, RUNNING or DEAD."""
    body: bytes
    attempts: int = 0
    at: float | None = None
    """Its due time (scheduled, retrying), lease deadline (running) or death (dead)."""
    reason: str = ""
    """The last error of a retried or dead job."""


class EventKind(enum.StrEnum):
    """What happened to a job, as an :class:`Event` says."""

    ENQUEUED = "enqueued"
    STARTED = "started"
    PROGRESS = "progress"
    RETRIED = "retried"
    SUCCEEDED = "succeeded"
    DEAD = "dead"
    CANCELLED = "cancelled"


@dataclass(frozen=True, slots=True)
class Event:
    """One state change of a job, in the broker's recent-events stream."""

    kind: EventKind
    job_id: str
    task: str
    queue: str
    at: float
    """Unix time it happened."""
    attempt: int = 0
    worker: str = ""
    """The id of the worker it happened in (empty for an enqueue)."""
    detail: str = ""
    """The error of a retry or death, a progress message, or a run's duration in seconds."""
    id: str = ""
    """Its place in the stream, set by the broker: a cursor for :meth:`Broker.read_events`."""


CURRENT_SHOWN = 20
"""How many of a worker's running jobs its registration names."""


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
    current: tuple[str, ...] = ()
    """The ids of the jobs it is running (at most :data:`CURRENT_SHOWN` of them)."""
