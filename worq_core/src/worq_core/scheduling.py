"""Periodic schedules: a task, fixed arguments, and a trigger (cron or every).

Declared with ``@app.periodic(...)`` or :meth:`Worq.schedule`; fired by the scheduler service
that every worker runs (:mod:`worq_core.worker.scheduler`). The broker keeps each schedule's
last fire, and firing a tick is one atomic compare-and-set with its enqueue
(:meth:`Broker.fire_schedule`), so a tick fires once however many workers run the scheduler.
"""

from __future__ import annotations

import enum
import functools
import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from worq_core.limits import argument_hash

if TYPE_CHECKING:
    from zoneinfo import ZoneInfo

    from worq_core.broker import Broker
    from worq_core.middleware import EnqueueRequest
    from worq_core.models import Message
    from worq_core.task import Task
    from worq_core.triggers import Trigger

TICK_HEADER = "worq-tick"
"""The header a scheduled job carries: the Unix time of the tick that fired it."""
SCHEDULE_HEADER = "worq-schedule"
"""The header a scheduled job carries: the name of the schedule that fired it."""


class Missed(enum.StrEnum):
    """What a schedule does with ticks that passed while no scheduler ran (every worker down)."""

    ONCE = "once"
    """Fire one job, at once, for the latest missed tick; the others are dropped. The default:
    an hourly report missed overnight runs once in the morning, not eight times."""
    SKIP = "skip"
    """Fire nothing for missed ticks; wait for the next one. A tick counts as missed when the
    scheduler reaches it more than :attr:`Schedule.grace` seconds late."""


@dataclass(frozen=True, slots=True)
class Schedule:
    """One periodic schedule of a task."""

    name: str
    """Unique within the app; what ``worq schedule`` lists."""
    task: Task[Any, Any]
    trigger: Trigger
    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    missed: Missed = Missed.ONCE
    grace: float = 60.0
    """With ``missed="skip"``, how late a tick may be reached and still fire."""
    queue: str | None = None
    """The queue its jobs go to; ``None`` means the task's own."""

    @property
    def job_queue(self) -> str:
        """The queue its jobs go to: :attr:`queue`, or else the task's own.

        What the scheduler passes to :meth:`Broker.fire_schedule` as ``queue``.
        """
        return self.queue or self.task.config.queue

    @property
    def key(self) -> str:
        """The broker's name for this schedule's record: its name and its trigger.

        A changed trigger is a new record, so it starts from its next tick instead of
        replaying the old trigger's missed ticks; a removed schedule's record is just unused.
        """
        return f"{self.name} [{self.trigger.describe()}]"

    def message(self, tick: float) -> Message:
        """The job this schedule enqueues for ``tick``, prepared as any enqueue is."""
        return self.prepare(tick)[0]

    def prepare(self, tick: float) -> tuple[Message, EnqueueRequest | None]:
        """:meth:`message`, with the request middleware saw (``None`` without middleware).

        Whoever sends the message tells the middleware how the send ended
        (:meth:`tell_sent`), as every enqueue call does.
        """
        headers = {SCHEDULE_HEADER: self.name, TICK_HEADER: repr(tick)}
        bound = self.task.options(queue=self.queue, headers=headers)
        message, _, request = bound._prepare(list(self.args), dict(self.kwargs), None)
        return message, request

    def tell_sent(self, request: EnqueueRequest | None, error: BaseException | None) -> None:
        """Call the app's ``after_enqueue`` hooks for a tick's job: sent, or not and why."""
        if request is not None:
            from worq_core.task import tell_after_enqueue

            tell_after_enqueue(self.task.app.middleware.after_enqueues, [request], error)


@functools.cache
def _takes(method: Callable[..., object], parameter: str) -> bool:
    """Whether ``method`` accepts the keyword ``parameter`` (or any keyword)."""
    found = inspect.signature(method).parameters.values()
    return any(p.name == parameter or p.kind is inspect.Parameter.VAR_KEYWORD for p in found)


def fire_tick(
    broker: Broker,
    schedule: Schedule,
    tick: float,
    last: float | None,
    message: Message | None,
) -> bool:
    """:meth:`Broker.fire_schedule` for ``schedule``'s tick, with its :attr:`~Schedule.job_queue`.

    A broker written before ``fire_schedule`` took a ``queue`` is called without one.
    """
    if _takes(type(broker).fire_schedule, "queue"):
        return broker.fire_schedule(schedule.key, tick, last, message, queue=schedule.job_queue)
    return broker.fire_schedule(schedule.key, tick, last, message)


def recorded_fires(broker: Broker, schedules: Sequence[Schedule]) -> dict[str, float]:
    """:meth:`Broker.schedule_fires` of ``schedules``, by key, each with its queue.

    A broker written before ``schedule_fires`` took ``queues`` is called with the keys alone.
    """
    keys = [s.key for s in schedules]
    if not keys:
        return {}
    if _takes(type(broker).schedule_fires, "queues"):
        return broker.schedule_fires(keys, queues={s.key: s.job_queue for s in schedules})
    return broker.schedule_fires(keys)


def make_schedule(
    task: Task[Any, Any],
    *,
    cron: str | None,
    every: timedelta | float | None,
    tz: str | ZoneInfo | None,
    args: Sequence[Any],
    kwargs: Mapping[str, Any] | None,
    name: str | None,
    missed: Missed | str,
    grace: float,
    queue: str | None,
) -> Schedule:
    """Check a schedule's declaration and build it (raises :class:`ScheduleError`)."""
    # Imported here, not at the top: croniter (and dateutil) load only in apps with schedules.
    from worq_core.triggers import CronTrigger, EveryTrigger, ScheduleError

    if (cron is None) == (every is None):
        raise ScheduleError(f"schedule of {task.name!r}: give cron= or every=, exactly one")
    trigger: Trigger
    if cron is not None:
        trigger = CronTrigger(cron, tz)
    else:
        if tz is not None:
            raise ScheduleError(f"schedule of {task.name!r}: tz= only applies to cron=")
        assert every is not None
        trigger = EveryTrigger(every)
    try:
        policy = Missed(missed)
    except ValueError:
        raise ScheduleError(
            f"schedule of {task.name!r}: missed must be 'once' or 'skip', not {missed!r}"
        ) from None
    if grace < 0:
        raise ScheduleError(f"schedule of {task.name!r}: grace must not be negative")
    fixed_args, fixed_kwargs = tuple(args), dict(kwargs or {})
    try:
        task._signature.bind(*fixed_args, **fixed_kwargs)
    except TypeError as exc:
        raise ScheduleError(f"schedule of {task.name!r}: bad arguments: {exc}") from exc
    if name is None:
        name = task.name
        if fixed_args or fixed_kwargs:
            name += f"#{argument_hash(fixed_args, fixed_kwargs)[:8]}"
    return Schedule(name, task, trigger, fixed_args, fixed_kwargs, policy, grace, queue)


__all__ = ["Missed", "Schedule", "fire_tick", "make_schedule", "recorded_fires"]
