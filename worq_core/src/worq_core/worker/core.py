"""The worker: its lifecycle, the fetch loop, and how a fetched job becomes a run.

One worker is one process-level object with:

* fetches, one at a time, each carrying the settlements of the jobs finished since the last:
  for the free slots and, while the queues are deep and jobs short, a few more that wait in
  :attr:`Worker.ready` (:mod:`~worq_core.worker.prefetch`);
* the *fetch loop* (the thread that calls :meth:`Worker.run`), which fetches while slots are
  idle and otherwise sleeps, but for settlements no fetch carried in time and prefetched runs
  that waited too long;
* executors (:mod:`~worq_core.worker.executors`): ``concurrency`` slot threads for sync tasks
  and one event loop for ``async def`` tasks, all counted against the same slots; a slot
  thread takes its next run itself, and makes the next fetch when few are ready;
* services (:mod:`~worq_core.worker.services`) on one thread: lease renewal, the timeout
  watchdog, registration, resource limits, and any that middleware adds;
* the settle path (:mod:`~worq_core.worker.settle`), which decides and settles each run.

Each fetched job is a :class:`~worq_core.worker.run.Run` whose state only moves along checked
transitions; every shared field changes under the worker's one lock.
"""

from __future__ import annotations

import collections
import contextlib
import enum
import functools
import itertools
import logging
import math
import os
import random
import socket
import sys
import threading
import time
import traceback
import uuid
from typing import TYPE_CHECKING, Any

from worq_core.context import JobContext
from worq_core.context import _current as _current_job
from worq_core.errors import (
    BrokerError,
    JobCancelled,
    StorageError,
    TaskTimeoutError,
    UnknownTaskError,
    WorqError,
)
from worq_core.job import Envelope, ErrorInfo
from worq_core.lease_keeper import START_TIMEOUT, LeaseKeeper
from worq_core.models import (
    CURRENT_SHOWN,
    Capability,
    Delivery,
    Outcome,
    Settlement,
    WorkerInfo,
)
from worq_core.retry import RetryPolicy
from worq_core.signals import on_stop_signals
from worq_core.worker.executors import AsyncExecutor, ThreadExecutor
from worq_core.worker.leases import (
    FetchAs,
    KeeperRenewer,
    LeaseService,
    Renewer,
    ThreadRenewer,
)
from worq_core.worker.prefetch import Prefetch
from worq_core.worker.run import HOLDING, Run, RunState
from worq_core.worker.scheduler import Scheduler
from worq_core.worker.services import Service, ServiceRunner
from worq_core.worker.settings import (
    ExitReason,
    WorkerCounters,
    WorkerSettings,
    resident_memory,
)
from worq_core.worker.settle import SETTLE_DELAY, SettlePath
from worq_core.worker.watchdog import Limits, Registration, Watchdog

if TYPE_CHECKING:
    from worq_core.app import Worq

log = logging.getLogger("worq.worker")

#: A second SIGTERM/SIGINT this soon after the first is taken as the same request delivered
#: twice, not as "stop at once".
DUPLICATE_SIGNAL_WINDOW = 0.5

#: Extra time an async task gets past its timeout to honour cancellation before the watchdog
#: gives up on it (it swallowed CancelledError, or blocks the event loop).
ASYNC_CANCEL_GRACE = 1.0

#: Prefetched runs that no slot has taken for this long go back to their queue, for other
#: workers: every slot is held by a job far longer than those the prefetch was sized for.
HANDBACK_AFTER = 0.1


class _Duty(enum.Enum):
    """What wakes the fetch loop."""

    FETCH = enum.auto()
    """Fetch for idle slots, or send settlements no fetch carried in time."""
    DISPATCH = enum.auto()
    """Hand ready runs to idle slots."""
    HAND_BACK = enum.auto()
    """Hand back ready runs no slot took in time."""
    RETIRE = enum.auto()
    """Retire: the worker fetched ``max_jobs`` jobs and holds none."""
    STOP = enum.auto()
    """A stop was asked for."""


class Worker:
    """Runs an app's jobs. Create it with :meth:`Worq.worker`; call :meth:`run`.

    :meth:`stop` may be called from any thread (or a signal handler): the first call stops
    fetching and lets in-flight jobs finish within ``grace``; a second one puts unfinished jobs
    back in their queue and returns at once. :attr:`exit_reason` tells why :meth:`run` returned.
    """

    def __init__(self, app: Worq, settings: WorkerSettings) -> None:
        self.app = app
        self.settings = settings
        self.counters = WorkerCounters()
        self.exit_reason: ExitReason | None = None
        self.id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.started = time.time()
        self.lock = threading.Condition()
        """Guards every run's state, :attr:`held`, the slot count and the settle queue."""
        self.held: dict[str, Run] = {}
        """Every run whose settlement the broker has not answered yet, by lease token."""
        self.busy = 0
        """Slots in use."""
        self.ready: collections.deque[Run] = collections.deque()
        """Runs taken on that wait for a slot (prefetched), oldest first."""
        self.prefetch = Prefetch(settings.prefetch, settings.concurrency)
        self._fetching = False  # a fetch is on its way (one at a time, from any thread)
        self._ready_moved = 0.0  # when a run last left ready, or ready last filled up
        self._loop_wakes_at = -math.inf  # when the fetch loop's wait ends, while it waits
        self.services: ServiceRunner | None = None
        self.settle = SettlePath(self)
        self._stopping = threading.Event()
        self._abort = threading.Event()
        self._stop_requests = 0
        self._stop_requested_at = -float("inf")
        self._threads = ThreadExecutor(settings.concurrency)
        self._loop: AsyncExecutor | None = None
        self._loop_lock = threading.Lock()
        self._leases: LeaseService | None = None
        self._fetch_as: FetchAs = {}
        """What fetches pass the broker besides their arguments: the id the leases are recorded
        under, when the lease keeper renews by worker (``Capability.WORKER_LEASES``)."""
        self._owners = itertools.count(1)
        self._watchdog = Watchdog(self)
        self._parent = os.getppid()
        self._rng = random.Random()

    # -- lifecycle ---------------------------------------------------------------------------

    def run(self, burst: bool = False) -> ExitReason:
        """Process jobs until stopped, then shut down gracefully; returns why it stopped.

        With ``burst``, return once the queues hold no job at all: none ready, delayed or running.
        """
        settings, stack = self.settings, self.app.middleware
        self.app.broker.verify()  # a broker that can never work stops the worker here
        log.info(
            "worker %s starting: queues=%s concurrency=%d lease=%gs broker=%s",
            self.id,
            ",".join(settings.queues),
            settings.concurrency,
            settings.lease,
            self.app.broker.name,
        )
        self._parent = os.getppid()
        self._threads.start()
        if any(task.is_async for task in self.app.tasks.values()):
            self._async_executor()  # else only once an async task comes (none may ever)
        renewer = self._renewer()
        if isinstance(renewer, KeeperRenewer) and renewer.by_worker:
            self._fetch_as = {"worker": self.id}  # the broker records our leases for the keeper
        self._leases = LeaseService(self, renewer)
        services: list[Service] = [self._leases, self._watchdog, Registration(self), Limits(self)]
        services += self._scheduler()
        for middleware in stack.middlewares:
            services.extend(middleware.services(self))
        self.services = ServiceRunner(services)
        self._each_middleware("worker_start")
        self.services.start()
        signals = (
            on_stop_signals(self._on_stop_signal, log)
            if settings.handle_signals
            else contextlib.nullcontext()
        )
        with signals:
            try:
                self._fetch_loop(burst)
            finally:
                self._shutdown()
                self.services.stop()
                if self._loop is not None:
                    self._loop.stop()
                self._threads.stop()
                self._each_middleware("worker_stop")
                with contextlib.suppress(Exception):
                    self.app.broker.unregister_worker(self.id)
        if self.exit_reason is None:
            self.exit_reason = ExitReason.ABORTED if self._abort.is_set() else ExitReason.STOPPED
        log.info(
            "worker %s stopped (%s): succeeded=%d retried=%d dead=%d cancelled=%d",
            self.id,
            self.exit_reason.value,
            self.counters.succeeded,
            self.counters.retried,
            self.counters.dead,
            self.counters.cancelled,
        )
        return self.exit_reason

    @property
    def stopping(self) -> bool:
        """Whether the worker was asked to stop (or is retiring) and fetches no more."""
        return self._stopping.is_set()

    def stop(self) -> None:
        """Ask the worker to stop: gracefully the first time, at once the second time."""
        with self.lock:
            self._stop_requests += 1
            self._stop_requested_at = time.monotonic()
            if self._stop_requests == 1:
                log.info("stop requested: no more fetching, finishing in-flight jobs")
                self._stopping.set()
            elif not self._abort.is_set():
                log.info("second stop request: putting unfinished jobs back now")
                self.exit_reason = ExitReason.ABORTED
                self._abort.set()
            self.lock.notify_all()

    def retire(self, reason: ExitReason) -> None:
        """Stop gracefully so that a fresh process can take over (not counted as a stop)."""
        with self.lock:
            if self.exit_reason is not None or self._stopping.is_set():
                return
            self.exit_reason = reason
            log.info("worker %s retiring (%s): finishing in-flight jobs", self.id, reason.value)
            self._stopping.set()
            self.lock.notify_all()

    def _on_stop_signal(self) -> None:
        if time.monotonic() - self._stop_requested_at < DUPLICATE_SIGNAL_WINDOW:
            return  # the same stop delivered twice (to the process group and by a supervisor)
        self.stop()

    def _each_middleware(self, hook: str) -> None:
        for middleware in self.app.middleware.middlewares:
            try:
                getattr(middleware, hook)(self)
            except Exception:
                log.exception("middleware %r failed in %s", middleware, hook)

    def _scheduler(self) -> list[Service]:
        schedules = list(self.app.schedules.values())
        if not schedules or not self.settings.scheduler:
            return []
        broker = self.app.broker
        if Capability.SCHEDULES not in broker.capabilities:
            log.warning(
                "%d schedules not run: the %s broker cannot keep schedules",
                len(schedules),
                broker.name,
            )
            return []
        return [Scheduler(broker, schedules)]

    def _renewer(self) -> Renewer:
        settings, broker = self.settings, self.app.broker
        thread = ThreadRenewer(broker, settings.lease)
        if not settings.isolated_heartbeat:
            return thread
        if Capability.SHARED not in broker.capabilities:
            log.info("leases renewed by a thread: %s cannot be shared with a process", broker.name)
            return thread
        if settings.broker_factory is None:
            log.warning(
                "leases renewed by a thread: the lease keeper needs WorkerSettings.broker_factory "
                "to build exactly this app's broker"
            )
            return thread
        # By worker when the broker can: the keeper then needs nothing from us per job.
        by_worker = Capability.WORKER_LEASES in broker.capabilities
        factory = settings.broker_factory

        def start_keeper() -> LeaseKeeper:
            # The owner id fetches go under now: a fetch that failed while the worker idled has
            # moved it on, and a first job holding the GIL leaves no heartbeat to say so.
            return LeaseKeeper(
                factory,
                settings.lease,
                settings.heartbeat_interval,
                worker=self._fetch_as.get("worker") if by_worker else None,
                queues=settings.queues,
            )

        renewer = KeeperRenewer(
            start_keeper,
            thread,
            lambda: self._fetch_as.get("worker"),
            self._new_lease_owner,
            by_worker=by_worker,
        )
        if not by_worker:
            # It renews only what it is told: a job fetched before it is ready and holding the
            # GIL from its start would never be handed to it. Start it and wait for it, as it
            # always did. By worker it starts with the first jobs (LeaseService.jobs_fetched).
            renewer.start()
            if renewer.keeper is not None:
                with contextlib.suppress(RuntimeError):  # KeeperRenewer logs it
                    renewer.keeper.ready(timeout=START_TIMEOUT)
        return renewer

    # -- fetching ----------------------------------------------------------------------------
    #
    # One fetch is on its way at a time, made by whichever thread needs it: a slot thread whose
    # job ended when too few prefetched runs are left (it sends every queued settlement along),
    # or the fetch loop, which blocks waiting for jobs while slots are idle, sends settlements no
    # fetch carried within SETTLE_DELAY, and hands back prefetched runs that wait too long. While
    # slot threads keep themselves busy the fetch loop sleeps.

    def _fetch_loop(self, burst: bool) -> None:
        settings, settle = self.settings, self.settle
        # In burst mode an idle fetch is kept short so the end of the work is noticed promptly.
        idle_wait = min(settings.idle_wait, 0.1) if burst else settings.idle_wait
        backoff = 0.0
        while True:
            with self.lock:
                duty = self._await_duty()
                if duty is _Duty.STOP:
                    return
                if duty is _Duty.RETIRE:
                    self.retire(ExitReason.MAX_JOBS)
                    return
                if duty is _Duty.HAND_BACK:
                    waiting = self._unready()
                    self.prefetch.handed_back()
                elif duty is _Duty.FETCH:
                    settlements, limit = self._claim_fetch()
                    block = not settlements and limit > 0 and self.busy < settings.concurrency
                    check_drained = burst and block and not self.held
                    # Set with taking the queue: a job finishing from now on settles itself.
                    settle.direct = block and not check_drained
            if duty is _Duty.DISPATCH:
                self._dispatch(None)
                continue
            if duty is _Duty.HAND_BACK:
                log.info("handing back %d prefetched jobs no slot took in time", len(waiting))
                self._release([r.delivery for r in waiting])
                continue
            if check_drained:
                if self._drained():
                    log.info("burst: no jobs left in %s", ",".join(settings.queues))
                    self.exit_reason = ExitReason.DRAINED
                    with self.lock:
                        self._fetching = False
                    return
                with self.lock:
                    settle.direct = True
            try:
                self._fetch(settlements, limit, idle_wait if block else 0.0)
            except Exception as exc:  # a broker bug must not end the worker either
                backoff = min(max(backoff * 2, 0.1), 5.0)
                log.warning(
                    "broker error, retrying in %.1fs: %s",
                    backoff,
                    exc,
                    exc_info=not isinstance(exc, WorqError),
                )
                self._stopping.wait(backoff)
                continue
            if backoff:
                log.info("broker reachable again")
                backoff = 0.0
            self._dispatch(None)

    def _await_duty(self) -> _Duty:
        """Sleep until the fetch loop has something to do; called with the lock held.

        Nothing is the loop's to do while a fetch is on its way: whoever makes it wakes the
        loop afterwards if there is.
        """
        settings, settle = self.settings, self.settle
        try:
            while not self._stopping.is_set():
                now = time.monotonic()
                timeout = settings.idle_wait
                if not self._fetching:
                    free = settings.concurrency - self.busy
                    if self.ready and now >= self._ready_moved + HANDBACK_AFTER:
                        return _Duty.HAND_BACK
                    if self.ready and free > 0:
                        return _Duty.DISPATCH
                    if free > 0 and self._fetch_limit(len(settle.pending)) > 0:
                        return _Duty.FETCH
                    if settle.pending and (free > 0 or now >= settle.since + SETTLE_DELAY):
                        return _Duty.FETCH
                    if not self.held and self._budget() <= 0:
                        return _Duty.RETIRE
                    if settle.pending:
                        timeout = min(timeout, settle.since + SETTLE_DELAY - now)
                    if self.ready:
                        timeout = min(timeout, self._ready_moved + HANDBACK_AFTER - now)
                self._loop_wakes_at = now + timeout
                self.lock.wait(timeout)
            return _Duty.STOP
        finally:
            self._loop_wakes_at = -math.inf

    def _claim_fetch(self) -> tuple[list[Settlement], int]:
        """Become the one fetch on its way: the settlements it carries, and jobs to ask for.

        Called with the lock held.
        """
        settle = self.settle
        settlements, settle.pending = settle.pending, []
        self._fetching = True
        return settlements, self._fetch_limit(len(settlements))

    def _fetch_limit(self, sending: int) -> int:
        """Jobs a fetch carrying ``sending`` settlements may ask for; called with the lock held.

        The worker never holds more than ``concurrency`` plus the prefetch allowance leases, the
        ones those settlements give up (in the same call) not counted.
        """
        room = self.settings.concurrency + self.prefetch.allowance() - len(self.held) + sending
        return max(0, min(room, self._budget()))

    def _fetch(self, settlements: list[Settlement], limit: int, wait: float) -> None:
        """Settle and fetch in one broker call; the jobs taken on join :attr:`ready`.

        Ends the fetch claimed by :meth:`_claim_fetch`, also when it raises what the broker
        raised (its settlements are queued again first). A blocking fetch (``wait``) is the
        fetch loop's, with :attr:`SettlePath.direct` set.
        """
        settings, settle = self.settings, self.settle
        try:
            applied, deliveries = self.app.broker.settle_and_fetch(
                settlements,
                settings.fetch_order(self._rng),
                limit,
                lease=settings.lease,
                wait=wait,
                **self._fetch_as,
            )
        except BaseException:
            self.let_leases_lapse()  # it may have leased jobs whose answer never came
            with self.lock:
                settle.direct = False
                self._fetching = False
            settle.retry_later(settlements)
            raise
        runs: list[Run] = []
        back: list[Run] = []
        try:
            if wait:
                with self.lock:
                    settle.direct = False
            settle.settled(settlements, applied)
            if deliveries and self._stopping.is_set():
                # A stop came while the fetch was on its way: these jobs were never started.
                self._release(deliveries)
                deliveries = []
            runs = self._take_all(deliveries)
            if runs and self._leases is not None:
                self._leases.jobs_fetched()
        finally:
            with self.lock:
                self._fetching = False
                self.prefetch.fetched(limit, len(deliveries))
                if runs:
                    if not self.ready:
                        self._ready_moved = time.monotonic()
                    self.ready.extend(runs)
                if self._stopping.is_set():
                    back = self._unready()  # a stop came meanwhile
                else:
                    if self.ready:
                        self.nudge(self._ready_moved + HANDBACK_AFTER)
                    if settle.pending:
                        self.nudge(settle.since + SETTLE_DELAY)
            if back:
                self._release([r.delivery for r in back])

    def _dispatch(self, slot_of: Run | None) -> Run | None:
        """Hand ready runs to ``slot_of``'s slot, then to free slots, in fetch order.

        Returns the run for ``slot_of``'s slot, which the calling slot thread runs itself;
        without one, that slot is freed. The others are launched on slots of their own.
        """
        launch: list[Run] = []
        following: Run | None = None
        with self.lock:
            if not self._stopping.is_set():
                if slot_of is not None and self.ready:
                    following = self._pass_slot(slot_of)
                while self.ready and self.busy < self.settings.concurrency:
                    run = self.ready.popleft()
                    run.holds_slot = True
                    self.busy += 1
                    launch.append(run)
                if launch:
                    self._ready_moved = time.monotonic()
            if slot_of is not None and following is None:
                self._free_slot_locked(slot_of)
            elif self.busy < self.settings.concurrency and not self._fetching:
                self.lock.notify_all()  # the fetch loop fetches for idle slots
        for run in launch:
            self._launch(run)
        return following

    def _pass_slot(self, run: Run) -> Run:
        """Give ``run``'s slot to the oldest ready run; called with the lock held."""
        following = self.ready.popleft()
        run.holds_slot = False
        following.holds_slot = True
        self._ready_moved = time.monotonic()
        return following

    def nudge(self, at: float) -> None:
        """Wake the fetch loop if it would sleep past ``at`` (monotonic); lock held."""
        if self._loop_wakes_at > at or self._stopping.is_set():
            self.lock.notify_all()

    def _unready(self) -> list[Run]:
        """Take every ready run out to hand it back; called with the lock held."""
        runs = list(self.ready)
        self.ready.clear()
        self._unhold(runs)
        return runs

    def _unhold(self, runs: list[Run]) -> None:
        """Forget unstarted runs that go back to their queue; called with the lock held.

        They no longer count as fetched: the next worker to fetch them takes them on, and the
        broker does not count the attempt of a job handed back.
        """
        for run in runs:
            run.move(RunState.RELEASED)
            del self.held[run.delivery.token]
        self.counters.fetched -= len(runs)
        self.lock.notify_all()  # a shutdown, or a worker at its job limit, may wait for these

    def let_leases_lapse(self) -> None:
        """Stop the lease keeper renewing the leases this worker does not hold (any more).

        For a keeper renewing by worker, which renews every lease recorded under the worker's
        owner id: after a fetch that failed (it may have leased jobs whose answer never came)
        and a run given up on (its lease must run out so that it runs again). The worker
        fetches under a new owner id from then on and tells the keeper at once; the keeper
        renews the new id's record and, of the old ones, only the leases the worker holds.
        """
        if self._new_lease_owner() is not None and self._leases is not None:
            self._leases.owner_changed()

    def _new_lease_owner(self) -> str | None:
        """Fetch under a new owner id from now on, when the keeper renews by worker; returns it."""
        if not self._fetch_as:
            return None
        owner = f"{self.id}/{next(self._owners)}"
        self._fetch_as = {"worker": owner}
        return owner

    def _release(self, deliveries: list[Delivery]) -> None:
        try:
            self.app.broker.release(deliveries)
        except Exception as exc:  # noqa: BLE001 - their leases run out instead
            log.warning("handing back %d unstarted jobs failed: %s", len(deliveries), exc)
            self.let_leases_lapse()

    def _budget(self) -> int:
        """Jobs this worker may still fetch (``max_jobs``); called with the lock held."""
        limit = self.settings.max_jobs
        return sys.maxsize if limit is None else limit - self.counters.fetched

    def _drained(self) -> bool:
        try:
            stats = self.app.broker.stats(self.settings.queues)
        except Exception as exc:  # noqa: BLE001 - a blip: not drained, the loop will try again
            log.warning("burst: cannot read queue counts: %s", exc)
            return False
        return all(s.ready == 0 and s.delayed == 0 and s.running == 0 for s in stats)

    # -- taking a job on ---------------------------------------------------------------------

    def _take_all(self, deliveries: list[Delivery]) -> list[Run]:
        """Take fresh deliveries on; returns the runs whose task is to run, in fetch order."""
        if not deliveries:
            return []
        runs = [Run(delivery) for delivery in deliveries]
        with self.lock:
            self.counters.fetched += len(runs)
            for run in runs:
                self.held[run.delivery.token] = run
        return [run for run in runs if self._prepare(run)]

    def _prepare(self, run: Run) -> bool:
        """Decode and check a taken run; ``False`` if its task is not to run.

        Undecodable payloads, unknown tasks and jobs out of attempts are dead-lettered here,
        and a job cancelled while an earlier delivery ran it ends cancelled.
        """
        delivery = run.delivery
        try:
            envelope = Envelope.decode(delivery.body, self.app.serializer)
        except Exception as exc:  # noqa: BLE001 - a plugin serializer's own error type too
            run.context = JobContext(delivery.id, "?", delivery.queue, delivery.attempts, 0)
            self.job_log(logging.ERROR, run, "undecodable payload, dead-lettered: %s", exc)
            self.settle.decide(run, dead=ErrorInfo.from_exception(exc))
            return False
        run.envelope = envelope
        if envelope.workflow:
            # Workflows are imported with the first step a worker runs, not at its start.
            from worq_core import canvas

            if envelope.task == canvas.FAILED_MARKER_TASK:
                run.context = JobContext(delivery.id, envelope.task, delivery.queue, 1, 0)
                why = str(envelope.args[0]) if envelope.args else "a step failed"
                self.settle.decide(run, dead=ErrorInfo("worq.WorkflowMemberFailed", why))
                return False
        task = self.app.tasks.get(envelope.task)
        if task is None:
            run.context = JobContext(
                delivery.id, envelope.task, delivery.queue, delivery.attempts, 0, envelope.headers
            )
            unknown = UnknownTaskError(envelope.task)
            self.job_log(logging.ERROR, run, "%s; dead-lettered", unknown)
            self.settle.decide(run, dead=ErrorInfo.from_exception(unknown))
            return False
        run.task = task
        if envelope.workflow and "chord" in envelope.workflow:
            from worq_core import canvas

            if canvas.cancelled(self.app, envelope.workflow):
                # Its workflow was cancelled while the members ran: it ends cancelled unrun.
                run.context = JobContext(
                    delivery.id, task.name, delivery.queue, delivery.attempts, 0, envelope.headers
                )
                run.context._cancel()
                self.settle.decide(run)
                return False
            try:
                envelope = run.envelope = canvas.chord_arguments(self.app, envelope)
            except (BrokerError, StorageError) as exc:
                # The inputs are there, the broker is not: the job runs again after its lease.
                log.warning("job %s: cannot read its chord's results: %s", delivery.id, exc)
                with self.lock:
                    run.move(RunState.DECIDED)  # decided to leave it to its lease
                self.settle.drop(run)
                return False
            except Exception as exc:  # noqa: BLE001 - a failed member, or the group is gone
                run.context = JobContext(
                    delivery.id, task.name, delivery.queue, delivery.attempts, 0, envelope.headers
                )
                self.job_log(logging.ERROR, run, "chord callback not run: %s; dead-lettered", exc)
                self.settle.decide(run, dead=ErrorInfo.from_exception(exc))
                return False
        config, overrides = task.config, envelope.options
        run.timeout = overrides.get("timeout", config.timeout) if overrides else config.timeout
        run.max_retries = (
            overrides.get("max_retries", config.max_retries) if overrides else config.max_retries
        )
        run.retry = RetryPolicy(*overrides["retry"]) if "retry" in overrides else config.retry
        run.context = JobContext(
            delivery.id,
            task.name,
            delivery.queue,
            delivery.attempts,
            run.max_retries,
            envelope.headers,
            self._progress_reported,
            enqueued_at=envelope.enqueued_at,
        )
        if delivery.cancel_requested:
            self.settle.decide(run)  # it was cancelled while an earlier delivery ran it
            return False
        attempts_allowed = run.max_retries + 1
        if delivery.attempts > attempts_allowed:
            # Attempts are counted at fetch: more than allowed means earlier runs never settled
            # (their worker died or lost its lease), so this job keeps killing workers.
            reason = (
                f"delivered {delivery.attempts} times, more than the {attempts_allowed} attempts "
                f"allowed; earlier runs never finished (worker died or lease expired)"
            )
            self.job_log(logging.ERROR, run, "%s; dead-lettered", reason)
            self.settle.decide(run, dead=ErrorInfo("worq.AttemptsExhausted", reason))
            return False
        return True

    def _progress_reported(self, context: JobContext) -> None:
        if self._leases is not None:
            self._leases.soon()

    def _launch(self, run: Run) -> None:
        """Start a taken run: on the event loop, or on a slot thread."""
        assert run.task is not None
        if run.task.is_async:
            run.future = self._async_executor().submit(self._run_async(run))
        else:
            self._threads.submit(lambda: self._run_sync(run))

    def _async_executor(self) -> AsyncExecutor:
        """The event loop of ``async def`` tasks, started on first use."""
        with self._loop_lock:
            if self._loop is None:
                self._loop = AsyncExecutor()
                self._loop.start()
            return self._loop

    def _start(self, run: Run, allowance: float) -> bool:
        """Mark a run started and arm the watchdog; ``False`` if it is not to start.

        It is not when shutdown took it back first, or when a stop came before it started:
        then it is handed back to its queue at once.
        """
        with self.lock:
            if run.state is not RunState.TAKEN:
                return False
            if self._stopping.is_set():
                self._unhold([run])
                handed_back = True
            else:
                handed_back = False
                now = run.started = time.monotonic()
                run.move(RunState.RUNNING)
                if run.timeout is not None:
                    run.deadline = now + run.timeout + allowance
        if handed_back:
            self._release([run.delivery])
            return False
        if run.deadline is not None:
            self._watchdog.arm(run.deadline)
        self.job_log(logging.DEBUG, run, "attempt %d started", run.delivery.attempts)
        return True

    # -- running -----------------------------------------------------------------------------

    def _run_sync(self, run: Run) -> bool:
        """Run sync tasks on this slot thread; returns whether the thread must retire.

        After each job the thread takes its slot's next run itself (:meth:`_next_run`): a sync
        one runs right here, an async one goes to the event loop.
        """
        wraps = self.app.middleware
        while True:
            fn, envelope, context = run.task.fn if run.task else None, run.envelope, run.context
            assert fn is not None
            assert envelope is not None
            assert context is not None
            if not self._start(run, 0.0):
                self._free_slot(run)
                return False
            token = _current_job.set(context)
            try:
                if context.cancelled:
                    raise JobCancelled(context.id)
                if wraps.wraps:
                    value = wraps.run(
                        context, functools.partial(fn, *envelope.args, **envelope.kwargs)
                    )
                else:
                    value = fn(*envelope.args, **envelope.kwargs)
            except BaseException as exc:  # noqa: BLE001 - a job must never kill its slot thread
                self._finished(run, error=exc, tb=traceback.format_exc(), pull=True)
            else:
                self._finished(run, value=value, pull=True)
            finally:
                _current_job.reset(token)
            following = self._next_run(run)
            if following is None:
                return run.abandoned  # an abandoned thread's slot went to a fresh one
            assert following.task is not None
            if following.task.is_async:
                self._launch(following)
                return False
            run = following

    def _next_run(self, run: Run) -> Run | None:
        """The next run for the slot of ``run``, which just finished on this thread.

        The oldest ready (prefetched) run, if any. When fewer ready runs are left than there
        are slots, this thread also makes the next fetch itself, carrying every queued
        settlement (``run``'s among them), and hands what comes back to idle slots. ``None``
        when the slot is freed instead: nothing to run, a stop, or ``run`` was abandoned at a
        timeout (its slot went to a fresh thread then).
        """
        settle = self.settle
        with self.lock:
            if run.abandoned:
                return None
            self.prefetch.ran(time.monotonic() - run.started)
            stopping = self._stopping.is_set()
            following = self._pass_slot(run) if self.ready and not stopping else None
            fetch = (
                not self._fetching
                and not stopping
                and len(self.ready) < self.settings.concurrency
                and (
                    self._fetch_limit(len(settle.pending)) > 0
                    or (following is None and bool(settle.pending))
                )
            )
            if fetch:
                settlements, limit = self._claim_fetch()
            else:
                if settle.pending:
                    self.nudge(settle.since + SETTLE_DELAY)
                if following is None:
                    self._free_slot_locked(run)
                return following
        try:
            self._fetch(settlements, limit, 0.0)
        except Exception as exc:  # noqa: BLE001 - the fetch loop retries the settlements
            log.warning("fetching from a slot failed, the fetch loop will retry: %s", exc)
            if following is None:
                with self.lock:
                    self._free_slot_locked(run)
            return following
        if following is not None:
            self._dispatch(None)
            return following
        return self._dispatch(run)

    async def _run_async(self, run: Run) -> None:
        import asyncio  # here, not at the top: a worker with no async task never imports it

        task, envelope, context = run.task, run.envelope, run.context
        assert task is not None
        assert envelope is not None
        assert context is not None
        if not self._start(run, ASYNC_CANCEL_GRACE):  # the watchdog is only a backstop
            self._free_slot(run)
            return
        _current_job.set(context)  # this coroutine runs in an asyncio task of its own
        stack = self.app.middleware
        timeout = run.timeout
        try:
            if context.cancelled:
                raise asyncio.CancelledError

            async def call() -> Any:
                coro = task.fn(*envelope.args, **envelope.kwargs)
                if timeout is None:
                    return await coro
                try:
                    return await asyncio.wait_for(coro, timeout)
                except TimeoutError:
                    raise TaskTimeoutError(task.name, timeout) from None

            if stack.async_wraps:
                value = await stack.run_async(context, call)
            else:
                value = await call()
        except BaseException as exc:  # noqa: BLE001 - cancelled or failed, the job is settled
            error, tb = exc, traceback.format_exc()
            await asyncio.to_thread(self._finished, run, error=error, tb=tb)
        else:
            await asyncio.to_thread(self._finished, run, value=value)

    def _finished(
        self,
        run: Run,
        *,
        value: Any = None,
        error: BaseException | None = None,
        tb: str | None = None,
        pull: bool = False,
    ) -> None:
        """A job's code returned or raised; runs on the thread that ran it.

        With ``pull`` the calling slot thread goes on to :meth:`_next_run`, which passes the
        slot on (or frees it) and sends the settlement with its fetch; otherwise the slot is
        passed on or freed here.
        """
        try:
            if error is None:
                self.settle.decide(run, value=value, pull=pull)
            else:
                info = ErrorInfo.from_exception(error, tb)
                self.settle.decide(run, error=error, info=info, pull=pull)
        finally:
            if not pull:
                self._free_slot(run)

    def _free_slot(self, run: Run) -> None:
        """Pass ``run``'s slot to the oldest ready run (launched), or free it."""
        with self.lock:
            if not run.holds_slot:
                return
            if run.started:
                self.prefetch.ran(time.monotonic() - run.started)
            if not self.ready or self._stopping.is_set():
                self._free_slot_locked(run)
                return
            following = self._pass_slot(run)
        self._launch(following)

    def _free_slot_locked(self, run: Run) -> None:
        """Free ``run``'s slot; called with the lock held."""
        if run.holds_slot:
            run.holds_slot = False
            self.busy -= 1
            if not self._fetching or self._stopping.is_set():
                self.lock.notify_all()  # the fetch loop fetches for idle slots

    # -- what services and the settle path call ----------------------------------------------

    def time_out(self, run: Run, error: BaseException) -> bool:
        """Fail a run past its deadline and give up on its code; ``False`` if it finished first.

        The run is marked abandoned in the same step that decides it, so its thread, should
        the code return now, retires instead of serving on beside its replacement.
        """
        info = ErrorInfo.from_exception(error)
        if not self.settle.decide(run, error=error, info=info, abandon=True):
            return False
        self._free_slot(run)
        if run.task is not None and not run.task.is_async:
            self._threads.grow()
        return True

    def cancel_run(self, run: Run) -> None:
        """Tell a running job that it was cancelled (its lease renewal said so)."""
        context = run.context
        if context is None or context.cancelled:
            return
        context._cancel()
        self.job_log(logging.INFO, run, "cancellation requested; telling the task")
        with self.lock:
            # Only a started coroutine: one cancelled before its first step would never run
            # the code that settles it (an unstarted run checks ``cancelled`` as it starts).
            started = run.state is RunState.RUNNING
        if started and run.future is not None:
            run.future.cancel()  # CancelledError at the async task's next await

    def count(self, outcome: str) -> None:
        """Add one to a counter of :class:`WorkerCounters`."""
        with self.lock:
            setattr(self.counters, outcome, getattr(self.counters, outcome) + 1)

    def register(self) -> None:
        """Record this worker with the broker (for ``worq stats``); never raises."""
        with self.lock:
            info = WorkerInfo(
                id=self.id,
                host=socket.gethostname(),
                pid=os.getpid(),
                started=self.started,
                queues=self.settings.queues,
                concurrency=self.settings.concurrency,
                done=self.counters.done,
                running=self.busy,
                seen=time.time(),
                current=tuple(
                    itertools.islice(
                        (r.delivery.id for r in self.held.values() if r.holds_slot),
                        CURRENT_SHOWN,
                    )
                ),
            )
        try:
            self.app.broker.register_worker(info, ttl=3 * self.settings.heartbeat_interval + 5)
        except Exception as exc:  # noqa: BLE001 - observability must never stop the work
            log.debug("registering the worker failed: %s", exc)

    def check_limits(self) -> None:
        """Retire past the memory limit; stop if the parent process is gone."""
        limit = self.settings.max_memory
        if limit is not None and (used := resident_memory()) > limit:
            log.info("resident memory %d MiB passed the limit of %d MiB", used >> 20, limit >> 20)
            self.retire(ExitReason.MAX_MEMORY)
        if self.settings.stop_when_orphaned and os.getppid() != self._parent:
            log.warning("the parent process (pid %d) is gone; stopping", self._parent)
            self.stop()

    def job_log(self, level: int, run: Run, message: str, *args: Any) -> None:
        """Log one line about a job, with its id and task in the text and as ``extra`` fields."""
        if log.isEnabledFor(level):
            delivery = run.delivery
            log.log(
                level,
                "job %s %s: " + message,
                delivery.id,
                run.task_name,
                *args,
                extra={"job_id": delivery.id, "task": run.task_name, "queue": delivery.queue},
            )

    # -- shutdown ----------------------------------------------------------------------------

    def _shutdown(self) -> None:
        """Hand back unstarted runs, let running ones finish within the grace period, settle.

        Prefetched runs no slot has started go back to their queue at once, their attempt not
        counted. Jobs still running when the grace period ends (or at a second stop) are
        settled as a retry with no delay: they go back to their queue at once, and the attempt
        counts.
        """
        deadline = time.monotonic() + self.settings.grace
        broker, settle = self.app.broker, self.settle
        while True:
            with self.lock:
                # A fetch on its way hands back what it brings and what is ready when it ends.
                back = [] if self._fetching else self._unready()
                settlements, settle.pending = settle.pending, []
                pending = sum(1 for r in self.held.values() if r.state in HOLDING)
                pending += self._fetching
            if back:
                self._release([r.delivery for r in back])
            if settlements:
                try:
                    settle.settled(settlements, broker.settle(settlements))
                except Exception as exc:  # noqa: BLE001 - retried until the deadline
                    log.error("settling %d jobs at shutdown failed: %s", len(settlements), exc)
                    if self._abort.is_set() or time.monotonic() >= deadline:
                        break
                    settle.retry_later(settlements)
                    self._abort.wait(0.2)
                    continue
            if pending == 0 or self._abort.is_set() or time.monotonic() >= deadline:
                break
            log.info("waiting for %d running jobs to finish", pending)
            with self.lock:
                if not settle.pending and not self._abort.is_set():
                    self.lock.wait(min(1.0, max(0.0, deadline - time.monotonic())))
        with self.lock:
            back = self._unready()
            unfinished: list[Run] = []
            for run in self.held.values():
                if run.state is RunState.TAKEN or run.state is RunState.RUNNING:
                    run.move(RunState.SENT)  # late finishers must not settle
                    unfinished.append(run)
        if back:
            self._release([r.delivery for r in back])
        if not unfinished:
            return
        if self.exit_reason is None or self.exit_reason is ExitReason.STOPPED:
            self.exit_reason = ExitReason.ABORTED
        log.info("putting %d unfinished jobs back in their queues", len(unfinished))
        for run in unfinished:
            if run.future is not None:
                run.future.cancel()
        back_as_retry = [
            Settlement(r.delivery, Outcome.RETRY, 0.0, "the worker stopped before it finished")
            for r in unfinished
        ]
        try:
            settle.settled(back_as_retry, broker.settle(back_as_retry))
        except Exception as exc:  # noqa: BLE001 - the leases are the fallback
            log.error("putting jobs back failed; their leases will expire instead: %s", exc)
