"""The scheduler: a worker service that fires the app's periodic schedules.

Every worker may run it (``worq worker`` does unless ``--no-scheduler``). It holds no lock of
its own: the broker keeps each schedule's last fire, and :meth:`Broker.fire_schedule` records a
tick and enqueues its job in one atomic compare-and-set. Ten workers that reach the same tick
all ask; one wins, the rest see the new record and go back to sleep. A worker killed between
computing a tick and firing it has changed nothing, so another fires it. Each call names the
queue the schedule's jobs go to, where a broker may keep its record (Redis Cluster does).

Tick times come from the trigger alone (a cron tick is a wall-clock instant, an ``every`` tick a
multiple of its interval since the epoch), never from when a worker woke, so workers with
slightly different clocks still agree on which tick they are firing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from worq_core.errors import ScheduleTaken
from worq_core.scheduling import Missed, Schedule, fire_tick, recorded_fires
from worq_core.worker.services import Service

if TYPE_CHECKING:
    from worq_core.broker import Broker

log = logging.getLogger("worq.scheduler")

#: Longest sleep between two looks at the records, so a tick another worker fired, or a clock
#: that was stepped, is noticed within this many seconds.
MAX_SLEEP = 30.0

#: Compare-and-set rounds per schedule and look; losing one means another worker fired.
ROUNDS = 3


def iso(timestamp: float) -> str:
    """A Unix time as ISO 8601 in UTC, for logs and ``worq schedule``."""
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="milliseconds")


_TAKEN = ScheduleTaken()
"""Why a tick's job was not sent: another scheduler fired the tick first."""


class Scheduler(Service):
    """Fires each due tick of ``schedules`` through ``broker``; see the module docstring."""

    name = "scheduler"

    def __init__(
        self,
        broker: Broker,
        schedules: Sequence[Schedule],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.broker = broker
        self.schedules = tuple(schedules)
        self.clock = clock
        self.fired = 0
        """Ticks this scheduler fired (won the compare-and-set for), for tests and logs."""

    def tick(self, now: float) -> float:
        """Fire what is due; returns when (monotonic) the next tick of any schedule is."""
        wall = self.clock()
        records = recorded_fires(self.broker, self.schedules)
        soonest = wall + MAX_SLEEP
        for schedule in self.schedules:
            try:
                upcoming = self.fire_due(schedule, records.get(schedule.key), wall)
            except Exception:
                log.exception("schedule %s: firing failed; trying again shortly", schedule.name)
                upcoming = wall + self.retry_after
            soonest = min(soonest, upcoming)
        return now + max(0.0, soonest - self.clock())

    def fire_due(self, schedule: Schedule, last: float | None, wall: float) -> float:
        """Fire ``schedule``'s latest due tick if no one has; returns its next tick's time.

        A schedule without a record starts now: only ticks after its first look fire.
        """
        broker = self.broker
        for _ in range(ROUNDS):
            if last is None:
                if fire_tick(broker, schedule, wall, None, None):
                    log.info("schedule %s: first seen; fires from its next tick", schedule.name)
                    last = wall
                    break
            else:
                due = schedule.trigger.last_at(wall)
                if due is None or due <= last:
                    break
                late = wall - due
                skip = schedule.missed is Missed.SKIP and late > schedule.grace
                message, request = (None, None) if skip else schedule.prepare(due)
                try:
                    fired = fire_tick(broker, schedule, due, last, message)
                except BaseException as exc:
                    schedule.tell_sent(request, exc)
                    raise
                schedule.tell_sent(request, None if fired else _TAKEN)
                if fired:
                    if skip:
                        log.info("schedule %s: skipped the tick of %s", schedule.name, iso(due))
                    else:
                        self.fired += 1
                        log.info(
                            "schedule %s: fired the tick of %s (%.3fs late) as job %s",
                            schedule.name,
                            iso(due),
                            late,
                            message.id if message is not None else "-",
                        )
                    last = due
                    break
            # Another worker changed the record first: look again.
            last = recorded_fires(broker, [schedule]).get(schedule.key)
        return schedule.trigger.next_after(wall if last is None else max(wall, last))
