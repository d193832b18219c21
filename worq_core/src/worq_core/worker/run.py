"""One leased job inside a worker, from fetch until the broker took its settlement."""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, Any

from worq_core.context import JobContext
from worq_core.job import Envelope
from worq_core.models import Delivery
from worq_core.retry import RetryPolicy

if TYPE_CHECKING:
    from worq_core.middleware import Decision
    from worq_core.task import Task


class RunState(enum.IntEnum):
    """Where a run is; it only moves along the transitions in :data:`NEXT`.

    An ``IntEnum`` because transitions are checked on every job: its members hash as ints.
    """

    TAKEN = 1
    """Fetched and leased; being decoded and checked, waiting among the prefetched runs, or
    handed to its slot and about to start."""
    RUNNING = 2
    """Its task's code has started."""
    DECIDED = 3
    """Its outcome is chosen (by its own thread, the watchdog, or shutdown), not yet sent."""
    SENT = 4
    """Its settlement is queued for, or on its way to, the broker."""
    DROPPED = 5
    """Given up (lease lost, or the record could not be stored): its lease runs out."""
    RELEASED = 6
    """Handed back to its queue unstarted (a stop, or prefetched runs that waited too long)."""
    DONE = 7
    """The broker answered its settlement."""


NEXT: dict[RunState, frozenset[RunState]] = {
    RunState.TAKEN: frozenset(
        {RunState.RUNNING, RunState.DECIDED, RunState.SENT, RunState.RELEASED}
    ),
    RunState.RUNNING: frozenset({RunState.DECIDED, RunState.SENT}),
    RunState.DECIDED: frozenset({RunState.SENT, RunState.DROPPED}),
    RunState.SENT: frozenset({RunState.DONE}),
    RunState.DROPPED: frozenset(),
    RunState.RELEASED: frozenset(),
    RunState.DONE: frozenset(),
}

#: States in which the worker still holds the lease and must renew it.
HOLDING = frozenset({RunState.TAKEN, RunState.RUNNING, RunState.DECIDED})


_NO_RETRY_POLICY = RetryPolicy()  # until take() sets the task's (shared: a frozen value)


class InvalidTransition(RuntimeError):
    """A bug in the worker: a run was moved along a transition the state machine forbids."""


class Run:
    """A leased job and what the worker knows of it. Every field changes under the worker lock.

    Besides its :class:`RunState`, a run carries three facts learned from outside: ``lost``
    (the broker said its lease is gone, so its result must not overwrite another run's),
    ``abandoned`` (the watchdog gave up on its thread at a timeout) and, in ``context``,
    whether it was cancelled.
    """

    __slots__ = (
        "abandoned",
        "context",
        "deadline",
        "decision",
        "delivery",
        "envelope",
        "future",
        "holds_slot",
        "lost",
        "max_retries",
        "progress_sent",
        "retry",
        "started",
        "state",
        "task",
        "timeout",
    )

    def __init__(self, delivery: Delivery) -> None:
        self.delivery = delivery
        self.state = RunState.TAKEN
        self.task: Task[Any, Any] | None = None
        self.envelope: Envelope | None = None
        self.context: JobContext | None = None
        self.decision: Decision | None = None
        self.timeout: float | None = None
        self.max_retries = 0
        self.retry = _NO_RETRY_POLICY
        self.started = 0.0
        """When its code started (monotonic); 0 before."""
        self.deadline: float | None = None
        """When the watchdog fails the run (monotonic); set when its code starts."""
        self.holds_slot = False
        self.lost = False
        self.abandoned = False
        self.progress_sent: object = None
        self.future: Any = None

    def __repr__(self) -> str:
        return f"<Run {self.delivery.id} {self.task_name} {self.state.name.lower()}>"

    @property
    def task_name(self) -> str:
        """The task's name, as far as it is known."""
        if self.task is not None:
            return self.task.name
        return self.envelope.task if self.envelope is not None else "?"

    @property
    def cancelled(self) -> bool:
        """Whether a cancellation of the job reached this run."""
        return self.delivery.cancel_requested or (
            self.context is not None and self.context.cancelled
        )

    def move(self, state: RunState) -> None:
        """Move to ``state``; raises :class:`InvalidTransition` if the machine forbids it."""
        if state not in NEXT[self.state]:
            raise InvalidTransition(f"{self!r} cannot move to {state.name.lower()}")
        self.state = state
