"""How a worker runs (:class:`WorkerSettings`), why it stopped, and what it has done."""

from __future__ import annotations

import enum
import os
import random
import resource
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from worq_core.broker import Broker


@dataclass(frozen=True, slots=True)
class WorkerSettings:
    """How a worker runs. Built by :meth:`Worq.worker` or the ``worq worker`` command."""

    queues: tuple[str, ...] = ("default",)
    """Queues to fetch from, highest priority first."""
    concurrency: int = 8
    """Jobs run at once (threads for sync tasks, the event loop for async ones)."""
    lease: float = 30.0
    """Seconds a fetched job stays leased without a heartbeat; the heartbeat renews it."""
    grace: float = 30.0
    """Seconds in-flight jobs get to finish after SIGTERM/SIGINT before they are put back in
    their queue (as an immediate retry)."""
    idle_wait: float = 1.0
    """Longest single blocking fetch; bounds how quickly an idle worker notices a stop."""
    heartbeat: float | None = None
    """Seconds between lease renewals; ``None`` means a third of ``lease``."""
    handle_signals: bool = True
    """Install SIGTERM/SIGINT handlers when run on the main thread."""
    weights: tuple[int, ...] | None = None
    """Relative weights of ``queues``: each fetch orders the queues by a weighted draw, so a
    queue of weight 3 is asked first three times as often as one of weight 1. ``None`` keeps
    the strict order of ``queues``."""
    prefetch: int = 16
    """Most jobs fetched beyond the free slots, so that short jobs from a deep queue are fetched
    (and their settlements sent) several per round trip. The worker holds at most
    ``concurrency + prefetch`` leases at once, which bounds what a SIGKILL leaves behind (see
    ``docs/guarantees.md``); how many it actually prefetches adapts to the queues' depth and
    the recent run times (:mod:`worq_core.worker.prefetch`). ``0`` fetches only for free slots."""
    max_jobs: int | None = None
    """Stop gracefully after this many jobs (``exit_reason`` "max_jobs"), so a supervisor can
    replace the process before leaks in task code grow without bound."""
    max_memory: int | None = None
    """Stop gracefully once the process's resident memory exceeds this many bytes."""
    isolated_heartbeat: bool = False
    """Renew leases from a separate process (:mod:`worq_core.lease_keeper`) that a task holding
    the GIL cannot starve. Needs a shared broker and ``broker_factory``; otherwise a thread
    renews them. ``worq worker`` turns it on."""
    recycle_when_stuck: bool = False
    """Stop gracefully (``exit_reason`` "stuck") when a task overruns its timeout and cannot
    be stopped, so that a supervisor replaces the process (``worq worker`` with a shared broker
    runs under one and sets this)."""
    stop_when_orphaned: bool = False
    """Stop gracefully if the parent process dies (set for a supervisor's children, so a
    SIGKILLed supervisor leaves no workers behind)."""
    scheduler: bool = True
    """Run the app's periodic schedules (:mod:`worq_core.worker.scheduler`) in this worker.
    Safe in every worker at once: each tick fires once across all of them."""
    broker_factory: Callable[[], Broker] | None = None
    """How the lease-keeper process builds exactly this app's broker: a picklable callable
    (``worq worker`` passes the broker's :meth:`~worq_core.Broker.recipe`, or else one that
    imports ``MODULE:ATTR``). Without it the keeper is not used and a thread renews leases."""

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        if self.lease <= 0 or self.grace < 0 or self.idle_wait <= 0:
            raise ValueError("lease and idle_wait must be positive, grace not negative")
        if not self.queues:
            raise ValueError("a worker needs at least one queue")
        if self.weights is not None and (
            len(self.weights) != len(self.queues) or min(self.weights) < 1
        ):
            raise ValueError("weights must give each queue a weight of at least 1")
        if (self.max_jobs is not None and self.max_jobs < 1) or (
            self.max_memory is not None and self.max_memory < 1
        ):
            raise ValueError("max_jobs and max_memory must be positive")
        if self.heartbeat is not None and self.heartbeat <= 0:
            raise ValueError("heartbeat must be positive")
        if self.prefetch < 0:
            raise ValueError("prefetch must not be negative")

    def fetch_order(self, rng: random.Random) -> tuple[str, ...]:
        """The queues in the order to ask them for jobs this time."""
        if self.weights is None:
            return self.queues
        pool = list(zip(self.queues, self.weights, strict=True))
        order = []
        while pool:
            pick = rng.choices(range(len(pool)), weights=[w for _, w in pool])[0]
            order.append(pool.pop(pick)[0])
        return tuple(order)

    @property
    def heartbeat_interval(self) -> float:
        """Seconds between heartbeats."""
        return self.heartbeat if self.heartbeat is not None else self.lease / 3


class ExitReason(enum.StrEnum):
    """Why :meth:`Worker.run` returned."""

    STOPPED = "stopped"
    """A stop request (or signal); in-flight jobs finished within the grace period."""
    ABORTED = "aborted"
    """A second stop request, or the grace period ran out: unfinished jobs were handed back."""
    DRAINED = "drained"
    """Burst mode: the queues held no more jobs."""
    MAX_JOBS = "max_jobs"
    """``max_jobs`` jobs were done; the process should be replaced."""
    MAX_MEMORY = "max_memory"
    """Resident memory passed ``max_memory``; the process should be replaced."""
    STUCK = "stuck"
    """A task overran its timeout and could not be stopped; replace the process."""

    @property
    def wants_replacement(self) -> bool:
        """Whether a supervisor should start a fresh process in this one's place."""
        return self in (ExitReason.MAX_JOBS, ExitReason.MAX_MEMORY, ExitReason.STUCK)


@dataclass(slots=True)
class WorkerCounters:
    """What a worker has done since it started; updated under the worker's lock."""

    fetched: int = 0
    succeeded: int = 0
    retried: int = 0
    dead: int = 0
    cancelled: int = 0
    refused: int = 0
    """Settlements the broker refused because the lease had expired (the job ran elsewhere)."""

    @property
    def done(self) -> int:
        """Jobs finished one way or another."""
        return self.succeeded + self.retried + self.dead + self.cancelled


def resident_memory() -> int:
    """This process's resident set size in bytes (peak size where the current one is unknown)."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024
