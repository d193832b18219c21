"""How many jobs a worker fetches beyond its free slots (:attr:`WorkerSettings.prefetch`).

A prefetched job saves a round trip to the broker when the one before it ends: worth it for
short jobs from a deep queue, harmful otherwise. Fetched from a shallow queue, jobs wait here
while other workers idle; fetched ahead of long jobs, they wait behind them. So the allowance
starts at nothing and only grows while both signs say it is safe.
"""

from __future__ import annotations

#: Prefetched work is kept to about this many seconds of the slots' recent run times: enough to
#: save most round trips on jobs much shorter than it, too little to keep jobs from other workers
#: for longer than a blink.
WINDOW = 0.005

#: Weight of the newest run time in the running average: a long job is felt at once (one run
#: of 1 s takes the average of microsecond jobs to 125 ms), a return to short ones within dozens.
RECENT_WEIGHT = 0.125


class Prefetch:
    """The prefetch allowance: how many more jobs than free slots the next fetch may ask for.

    It is nothing until a run has finished and a fetch came back with every job it asked for,
    doubles with each such full fetch up to ``limit`` (the queues are deep), drops to nothing
    when a fetch comes back short (they are shallow: leave their jobs to other workers) or
    prefetched jobs had to be handed back, and never exceeds :data:`WINDOW` of work at the
    recent average run time spread over the ``slots``. Not thread-safe: the worker uses it
    under its lock.
    """

    __slots__ = ("depth", "limit", "run_time", "slots")

    def __init__(self, limit: int, slots: int) -> None:
        self.limit = limit
        self.slots = slots
        self.depth = 0
        """The allowance the queues' depth alone would give."""
        self.run_time: float | None = None
        """Running average of how long a run keeps its slot (seconds); ``None`` before one."""

    def allowance(self) -> int:
        """Jobs the next fetch may ask for beyond the worker's free slots."""
        if not self.depth or self.run_time is None:
            return 0
        if self.run_time * self.depth <= WINDOW * self.slots:
            return self.depth
        return int(WINDOW * self.slots / self.run_time)

    def fetched(self, asked: int, got: int) -> None:
        """A fetch asked for ``asked`` jobs and got ``got``."""
        if got < asked:
            self.depth = 0
        elif asked:
            self.depth = min(self.limit, 2 * self.depth or 1)

    def ran(self, seconds: float) -> None:
        """A run kept its slot for ``seconds``."""
        if self.run_time is None:
            self.run_time = seconds
        else:
            self.run_time += (seconds - self.run_time) * RECENT_WEIGHT

    def handed_back(self) -> None:
        """Prefetched jobs waited too long for a slot and went back: prefetch nothing for now."""
        self.depth = 0
