"""The worker: fetches leased jobs, runs them on threads or an event loop, and settles them.

One worker is one process-level object with:

* the *fetch loop* (the thread that calls :meth:`Worker.run`): fetches at most as many jobs as it
  has free slots, pipelining the settlements of finished jobs with the next fetch;
* ``concurrency`` *slot threads* for sync tasks, and one *event loop thread* for ``async def``
  tasks; both count against the same ``concurrency`` slots;
* a *heartbeat thread* that extends the leases of every unsettled job and enforces timeouts, so a
  job that holds its own thread busy cannot starve its lease.

A job's result (or final error) is written to the storage by the thread that ran it, before the
broker is told, so a crash in between means the job runs again, never that a result is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import logging
import os
import queue
import random
import resource
import socket
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from worq_core.context import JobContext
from worq_core.context import _current as _current_job
from worq_core.errors import (
    SerializationError,
    TaskTimeoutError,
    UnknownTaskError,
    WorqError,
)
from worq_core.job import Envelope, ErrorInfo, encode_failure, encode_success
from worq_core.lease_keeper import LeaseKeeper
from worq_core.models import Capability, Delivery, Outcome, Settlement, WorkerInfo
from worq_core.signals import on_stop_signals

if TYPE_CHECKING:
    from worq_core.app import Worq
    from worq_core.task import Task

log = logging.getLogger("worq.worker")

#: A second SIGTERM/SIGINT this soon after the first is taken as the same request delivered
#: twice, not as "stop at once".
DUPLICATE_SIGNAL_WINDOW = 0.5


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
    max_jobs: int | None = None
    """Stop gracefully after this many jobs (``exit_reason`` "max_jobs"), so a supervisor can
    replace the process before leaks in task code grow without bound."""
    max_memory: int | None = None
    """Stop gracefully once the process's resident memory exceeds this many bytes."""
    isolated_heartbeat: bool = False
    """Renew leases from a separate process (:mod:`worq_core.lease_keeper`) that a task holding
    the GIL cannot starve. Needs a shared broker that can be rebuilt from its URL; otherwise
    the heartbeat thread renews them. ``worq worker`` turns it on."""
    recycle_when_stuck: bool = False
    """Stop gracefully (``exit_reason`` "stuck") when a task overruns its timeout and cannot
    be stopped, so that a supervisor replaces the process (``worq worker`` with a shared broker
    runs under one and sets this)."""
    stop_when_orphaned: bool = False
    """Stop gracefully if the parent process dies (set for a supervisor's children, so a
    SIGKILLed supervisor leaves no workers behind)."""

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
    refused: int = 0
    """Settlements the broker refused because the lease had expired (the job ran elsewhere)."""

    @property
    def done(self) -> int:
        """Jobs finished one way or another."""
        return self.succeeded + self.retried + self.dead


@dataclass(slots=True, eq=False)
class _Running:
    """A job the worker holds a lease on, from fetch until the broker took its settlement."""

    delivery: Delivery
    task: Task[Any, Any] | None = None
    envelope: Envelope | None = None
    deadline: float | None = None
    """When the watchdog fails the run (monotonic); set when the code starts running."""
    decided: bool = False
    """An outcome was chosen, by the job's own thread, the watchdog, or shutdown."""
    handed_off: bool = False
    """Its settlement was queued or sent (or dropped): nothing more to wait for."""
    holds_slot: bool = False
    abandoned: bool = False
    """The watchdog gave up on it; its thread retires when (if ever) the code returns."""
    lost: bool = False
    """The broker said its lease is gone: its result must not overwrite the real one."""
    pull: Settlement | None = None
    """Its settlement, when its slot thread sends it with the fetch of its next job."""
    future: Any = None

    @property
    def task_name(self) -> str:
        return self.task.name if self.task else (self.envelope.task if self.envelope else "?")

    def context(self) -> JobContext:
        assert self.task is not None
        d = self.delivery
        return JobContext(d.id, self.task.name, d.queue, d.attempts, self.task.config.max_retries)


class _SlotThreads:
    """A set of daemon threads for sync tasks.

    Daemon threads (unlike ``ThreadPoolExecutor``'s) let the process exit when the grace period
    runs out while a task is stuck. A work item returns ``True`` when its thread must retire (it
    was abandoned at a timeout and :meth:`grow` already put a fresh thread in its place).
    """

    def __init__(self, size: int, name: str) -> None:
        self._name = name
        self._inbox: queue.SimpleQueue[Callable[[], bool] | None] = queue.SimpleQueue()
        self._started = 0
        self._lock = threading.Lock()
        for _ in range(size):
            self.grow()

    def _serve(self) -> None:
        while (work := self._inbox.get()) is not None:
            try:
                if work():
                    return
            except Exception:  # a bug in worq or a plugin; the thread must keep serving
                log.exception("unexpected error on a slot thread")

    def submit(self, work: Callable[[], bool]) -> None:
        self._inbox.put(work)

    def grow(self) -> None:
        """Start one more thread (at start-up, or in place of one stuck in a task)."""
        with self._lock:
            self._started += 1
            name = f"{self._name}-{self._started}"
        threading.Thread(target=self._serve, name=name, daemon=True).start()

    def stop(self) -> None:
        for _ in range(self._started):
            self._inbox.put(None)


def resident_memory() -> int:
    """This process's resident set size in bytes (peak size where the current one is unknown)."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


#: Extra time an async task gets past its timeout to honour cancellation before the watchdog
#: gives up on it (it swallowed CancelledError, or blocks the event loop).
ASYNC_CANCEL_GRACE = 1.0


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
        self._lock = threading.Condition()
        self._held: dict[str, _Running] = {}  # every unsettled lease, by lease token
        self._busy = 0  # slots in use
        self._settle_queue: list[Settlement] = []
        self._fetch_blocked = False
        self._stopping = threading.Event()
        self._abort = threading.Event()
        self._stop_requests = 0
        self._stop_requested_at = -float("inf")
        self._done = threading.Event()
        self._wake_heartbeat = threading.Event()
        self._slots: _SlotThreads | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._keeper: LeaseKeeper | None = None
        self._parent = os.getppid()
        self._rng = random.Random()
        self._broker_stores_results = app.broker.stores_results_in(app.storage)
        # A single slot fetches its own next job as it settles (no hand-over to the fetch loop
        # and back). With more slots the fetch loop's batches win: one round trip settles and
        # refills many slots, where each slot pulling alone would make one round trip apiece.
        self._pulls = settings.concurrency == 1 and settings.max_jobs is None

    # -- lifecycle ---------------------------------------------------------------------------

    def run(self, burst: bool = False) -> ExitReason:
        """Process jobs until stopped, then shut down gracefully; returns why it stopped.

        With ``burst``, return once the queues hold no job at all: none ready, delayed or running.
        """
        settings = self.settings
        log.info(
            "worker %s starting: queues=%s concurrency=%d lease=%gs broker=%s",
            self.id,
            ",".join(settings.queues),
            settings.concurrency,
            settings.lease,
            self.app.broker.name,
        )
        self._parent = os.getppid()
        self._slots = _SlotThreads(settings.concurrency, "worq-slot")
        loop_thread = threading.Thread(target=self._run_loop, name="worq-asyncio", daemon=True)
        loop_ready = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._loop.call_soon(loop_ready.set)
        loop_thread.start()
        loop_ready.wait()
        self._keeper = self._start_lease_keeper()
        self._register()
        heartbeat = threading.Thread(target=self._heartbeat, name="worq-heartbeat", daemon=True)
        heartbeat.start()
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
                self._done.set()
                self._wake_heartbeat.set()
                heartbeat.join()
                self._loop.call_soon_threadsafe(self._loop.stop)
                loop_thread.join()
                self._loop.close()
                self._slots.stop()
                if self._keeper is not None:
                    self._keeper.close()
                with contextlib.suppress(Exception):
                    self.app.broker.unregister_worker(self.id)
        if self.exit_reason is None:
            self.exit_reason = ExitReason.ABORTED if self._abort.is_set() else ExitReason.STOPPED
        log.info(
            "worker %s stopped (%s): succeeded=%d retried=%d dead=%d",
            self.id,
            self.exit_reason.value,
            self.counters.succeeded,
            self.counters.retried,
            self.counters.dead,
        )
        return self.exit_reason

    @property
    def stopping(self) -> bool:
        """Whether the worker was asked to stop (or is retiring) and fetches no more."""
        return self._stopping.is_set()

    def stop(self) -> None:
        """Ask the worker to stop: gracefully the first time, at once the second time."""
        with self._lock:
            self._stop_requests += 1
            self._stop_requested_at = time.monotonic()
            if self._stop_requests == 1:
                log.info("stop requested: no more fetching, finishing in-flight jobs")
                self._stopping.set()
            elif not self._abort.is_set():
                log.info("second stop request: putting unfinished jobs back now")
                self.exit_reason = ExitReason.ABORTED
                self._abort.set()
            self._lock.notify_all()

    def _retire(self, reason: ExitReason) -> None:
        """Stop gracefully so that a fresh process can take over (not counted as a stop)."""
        with self._lock:
            if self.exit_reason is not None or self._stopping.is_set():
                return
            self.exit_reason = reason
            log.info("worker %s retiring (%s): finishing in-flight jobs", self.id, reason.value)
            self._stopping.set()
            self._lock.notify_all()

    def _on_stop_signal(self) -> None:
        if time.monotonic() - self._stop_requested_at < DUPLICATE_SIGNAL_WINDOW:
            return  # the same stop delivered twice (to the process group and by a supervisor)
        self.stop()

    def _start_lease_keeper(self) -> LeaseKeeper | None:
        if not self.settings.isolated_heartbeat:
            return None
        broker = self.app.broker
        url = broker.shareable_url()
        if url is None or Capability.SHARED not in broker.capabilities:
            log.info("leases renewed by a thread: %s cannot be shared with a process", broker.name)
            return None
        try:
            keeper = LeaseKeeper(url, self.settings.lease, self.settings.heartbeat_interval)
        except Exception as exc:  # noqa: BLE001 - the thread still renews leases
            log.warning("leases renewed by a thread: the lease keeper failed to start: %s", exc)
            return None
        log.info("leases renewed by a separate process")
        return keeper

    def _run_loop(self) -> None:
        assert self._loop is not None
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()

    # -- fetching ----------------------------------------------------------------------------

    def _fetch_loop(self, burst: bool) -> None:
        settings, broker = self.settings, self.app.broker
        # In burst mode an idle fetch is kept short so the end of the work is noticed promptly.
        idle_wait = min(settings.idle_wait, 0.1) if burst else settings.idle_wait
        backoff = 0.0
        while True:
            with self._lock:
                while not self._settle_queue and not self._stopping.is_set():
                    free = min(settings.concurrency - self._busy, self._budget())
                    if free > 0 or (self._budget() <= 0 and not self._held):
                        break
                    self._lock.wait(settings.idle_wait)
                if self._stopping.is_set():
                    return
                settlements, self._settle_queue = self._settle_queue, []
                free = max(0, min(settings.concurrency - self._busy, self._budget()))
                idle = not self._held
                block = not settlements and free > 0
                check_drained = burst and block and idle
                # Set together with taking the queue: a job finishing from now on settles itself.
                self._fetch_blocked = block and not check_drained
            if not settlements and idle and self._budget() <= 0:
                self._retire(ExitReason.MAX_JOBS)
                return
            if check_drained:
                if self._drained():
                    log.info("burst: no jobs left in %s", ",".join(settings.queues))
                    self.exit_reason = ExitReason.DRAINED
                    return
                with self._lock:
                    self._fetch_blocked = True
            try:
                applied, deliveries = broker.settle_and_fetch(
                    settlements,
                    settings.fetch_order(self._rng),
                    free,
                    lease=settings.lease,
                    wait=idle_wait if block else 0.0,
                )
            except Exception as exc:  # a broker bug must not end the worker either
                with self._lock:
                    self._fetch_blocked = False
                    self._settle_queue[:0] = settlements  # settling twice is refused, not doubled
                backoff = min(max(backoff * 2, 0.1), 5.0)
                log.warning(
                    "broker error, retrying in %.1fs: %s",
                    backoff,
                    exc,
                    exc_info=not isinstance(exc, WorqError),
                )
                self._stopping.wait(backoff)
                continue
            with self._lock:
                self._fetch_blocked = False
            if backoff:
                log.info("broker reachable again")
                backoff = 0.0
            self._settled(settlements, applied)
            taken = [running for d in deliveries if (running := self._take(d)) is not None]
            if taken and self._keeper is not None:
                # Before any job starts: one holding the GIL would starve this hand-over too.
                self._renew_leases(time.monotonic())
            for running in taken:
                self._launch(running)

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

    def _settled(self, settlements: Sequence[Settlement], applied: Sequence[bool]) -> None:
        with self._lock:
            self._lock.notify_all()  # a shutdown may be waiting for these
            for settlement, ok in zip(settlements, applied, strict=True):
                delivery = settlement.delivery
                held = self._held.pop(delivery.token, None)
                if not ok:
                    self.counters.refused += 1
                    _job_log(
                        logging.WARNING,
                        delivery,
                        held.task_name if held else "?",
                        "the broker refused its %s: its lease had expired and it may run again",
                        settlement.outcome.value,
                    )

    # -- running -----------------------------------------------------------------------------

    def _take(self, delivery: Delivery, slot_of: _Running | None = None) -> _Running | None:
        """Take a fresh delivery on; returns it if its task is to run (``None``: dead-lettered).

        Undecodable payloads, unknown tasks and jobs out of attempts are dead-lettered here.
        The run gets a slot of its own, or ``slot_of``'s (a slot thread pulling its next job).
        """
        running = _Running(delivery)
        with self._lock:
            self.counters.fetched += 1
            self._held[delivery.token] = running
        try:
            envelope = Envelope.decode(delivery.body, self.app.serializer)
        except Exception as exc:  # noqa: BLE001 - a plugin serializer's own error type too
            _job_log(logging.ERROR, delivery, "?", "undecodable payload, dead-lettered: %s", exc)
            self._decide(running, dead=ErrorInfo.from_exception(exc))
            return None
        running.envelope = envelope
        task = self.app.tasks.get(envelope.task)
        if task is None:
            unknown = UnknownTaskError(envelope.task)
            _job_log(logging.ERROR, delivery, envelope.task, "%s; dead-lettered", unknown)
            self._decide(running, dead=ErrorInfo.from_exception(unknown))
            return None
        running.task = task
        attempts_allowed = task.config.max_retries + 1
        if delivery.attempts > attempts_allowed:
            # Attempts are counted at fetch: more than allowed means earlier runs never settled
            # (their worker died or lost its lease), so this job keeps killing workers.
            reason = (
                f"delivered {delivery.attempts} times, more than the {attempts_allowed} attempts "
                f"allowed; earlier runs never finished (worker died or lease expired)"
            )
            _job_log(logging.ERROR, delivery, task.name, "%s; dead-lettered", reason)
            self._decide(running, dead=ErrorInfo("worq.AttemptsExhausted", reason))
            return None
        with self._lock:
            if slot_of is not None and slot_of.holds_slot:
                slot_of.holds_slot = False  # the slot passes on; busy stays the same
            else:
                self._busy += 1
            running.holds_slot = True
        _job_log(logging.DEBUG, delivery, task.name, "attempt %d started", delivery.attempts)
        return running

    def _launch(self, running: _Running) -> None:
        """Start a taken run: on the event loop, or on a slot thread."""
        assert running.task is not None
        if running.task.is_async:
            assert self._loop is not None
            running.future = asyncio.run_coroutine_threadsafe(self._run_async(running), self._loop)
        else:
            assert self._slots is not None
            self._slots.submit(lambda: self._run_sync(running))

    def _start_clock(self, running: _Running, allowance: float) -> None:
        """Arm the watchdog for a run that starts now."""
        timeout = running.task.config.timeout if running.task else None
        if timeout is not None:
            with self._lock:
                running.deadline = time.monotonic() + timeout + allowance
            self._wake_heartbeat.set()  # it may need to wake earlier than it planned

    def _run_sync(self, running: _Running) -> bool:
        """Run sync tasks on this slot thread; returns whether the thread must retire.

        In a single-slot worker, after each job the thread settles it and fetches its own next
        job in one broker call (no hand-over through the fetch loop); a sync next job runs
        right here, an async one goes to the event loop.
        """
        while True:
            assert running.task is not None
            assert running.envelope is not None
            self._start_clock(running, 0.0)
            token = _current_job.set(running.context())
            try:
                value = running.task.fn(*running.envelope.args, **running.envelope.kwargs)
            except BaseException as exc:  # noqa: BLE001 - a job must never kill its slot thread
                self._finished(running, error=exc, tb=traceback.format_exc(), pull=True)
            else:
                self._finished(running, value=value, pull=True)
            finally:
                _current_job.reset(token)
            with self._lock:
                if running.abandoned:
                    return True
            following = self._pull(running)
            if following is None:
                return False
            assert following.task is not None
            if following.task.is_async:
                self._launch(following)
                return False
            running = following

    def _pull(self, running: _Running) -> _Running | None:
        """Settle a finished run and fetch the next job for its slot, in one broker call.

        Whatever happens, the slot is either passed to the next run or freed.
        """
        with self._lock:  # shutdown may take the settlement over: exactly one side sends it
            settlement, running.pull = running.pull, None
        if settlement is None:
            self._free_slot(running)
            return None
        following: _Running | None = None
        try:
            following = self._pull_next(running, settlement)
        except Exception:  # a bug in worq or a plugin must not wedge the slot
            log.exception("job %s: taking the next job from a slot failed", running.delivery.id)
        finally:
            self._free_slot(running)  # unless the slot passed on to the next run
        return following

    def _pull_next(self, running: _Running, settlement: Settlement) -> _Running | None:
        settings = self.settings
        try:
            applied, deliveries = self.app.broker.settle_and_fetch(
                [settlement],
                settings.fetch_order(self._rng),
                0 if self._stopping.is_set() else 1,
                lease=settings.lease,
                wait=0.0,
            )
        except Exception as exc:  # noqa: BLE001 - the fetch loop retries the settlement
            log.warning("settling from a slot failed, the fetch loop will retry: %s", exc)
            with self._lock:
                running.handed_off = True
                self._settle_queue.append(settlement)
                self._lock.notify_all()
            return None
        if deliveries and self._stopping.is_set():
            # A stop came while the call was on its way: this job was never started.
            self.app.broker.release(deliveries)
            deliveries = []
        # Take the next run on before the finished one leaves: a shutdown counting what is
        # pending must never see neither.
        following = self._take(deliveries[0], slot_of=running) if deliveries else None
        self._settled([settlement], applied)
        if following is not None and self._keeper is not None:
            self._renew_leases(time.monotonic())
        return following

    async def _run_async(self, running: _Running) -> None:
        assert running.task is not None
        assert running.envelope is not None
        task, envelope = running.task, running.envelope
        _current_job.set(running.context())  # this coroutine runs in an asyncio task of its own
        self._start_clock(running, ASYNC_CANCEL_GRACE)  # the watchdog is only a backstop
        try:
            coro = task.fn(*envelope.args, **envelope.kwargs)
            if task.config.timeout is None:
                value = await coro
            else:
                try:
                    value = await asyncio.wait_for(coro, task.config.timeout)
                except TimeoutError:
                    raise TaskTimeoutError(task.name, task.config.timeout) from None
        except BaseException as exc:  # noqa: BLE001 - cancelled or failed, the job is settled
            error, tb = exc, traceback.format_exc()
            await asyncio.to_thread(self._finished, running, error=error, tb=tb)
        else:
            await asyncio.to_thread(self._finished, running, value=value)

    def _finished(
        self,
        running: _Running,
        *,
        value: Any = None,
        error: BaseException | None = None,
        tb: str | None = None,
        pull: bool = False,
    ) -> None:
        """A job's code returned or raised; runs on the thread that ran it.

        With ``pull`` the settlement may be left in ``running.pull`` for the thread to send
        with its next fetch (:meth:`_pull`); the slot stays taken until then.
        """
        try:
            if error is None:
                self._decide(running, value=value, pull=pull)
            else:
                self._decide(running, failure=ErrorInfo.from_exception(error, tb), pull=pull)
        finally:
            if running.pull is None:
                self._free_slot(running)

    def _free_slot(self, running: _Running) -> None:
        with self._lock:
            if running.holds_slot:
                running.holds_slot = False
                self._busy -= 1
                self._lock.notify_all()

    def _decide(
        self,
        running: _Running,
        *,
        value: Any = None,
        failure: ErrorInfo | None = None,
        dead: ErrorInfo | None = None,
        pull: bool = False,
    ) -> bool:
        """Choose the outcome, store the record and settle; at most once per delivery.

        Returns whether this call decided (``False``: the watchdog or shutdown came first).
        Never raises: whatever goes wrong, the job is either settled or dropped so that its
        lease runs out and it runs again.
        """
        with self._lock:
            if running.decided:
                return False
            running.decided = True
        try:
            settlement, record = self._outcome(running, value, failure, dead)
            self._settle(running, settlement, record, pull)
        except Exception:
            log.exception("job %s: settling failed; its lease will run out", running.delivery.id)
            self._drop(running)
        return True

    def _outcome(
        self,
        running: _Running,
        value: Any,
        failure: ErrorInfo | None,
        dead: ErrorInfo | None,
    ) -> tuple[Settlement, bytes | None]:
        """The settlement (and storage record) for a run's result; counts it."""
        delivery, task = running.delivery, running.task
        serializer = self.app.serializer
        if dead is None and failure is None:
            try:
                record = encode_success(serializer, value)
            except SerializationError as exc:
                dead = ErrorInfo.from_exception(exc)
            else:
                self._count("succeeded")
                return Settlement(delivery, Outcome.ACK), record
        if failure is not None:
            if task is not None and delivery.attempts <= task.config.max_retries:
                delay = task.config.retry.delay(delivery.attempts)
                _job_log(
                    logging.WARNING,
                    delivery,
                    task.name,
                    "attempt %d failed (%s); retrying in %.2fs",
                    delivery.attempts,
                    failure.summary(),
                    delay,
                )
                self._count("retried")
                return Settlement(delivery, Outcome.RETRY, delay, failure.summary()), None
            dead = failure
            _job_log(
                logging.ERROR,
                delivery,
                running.task_name,
                "attempt %d failed (%s); no retries left, dead-lettered",
                delivery.attempts,
                failure.summary(),
            )
        assert dead is not None
        self._count("dead")
        return (
            Settlement(delivery, Outcome.DEAD, 0.0, dead.summary()),
            encode_failure(serializer, dead),
        )

    def _count(self, outcome: str) -> None:
        with self._lock:
            setattr(self.counters, outcome, getattr(self.counters, outcome) + 1)

    def _drop(self, running: _Running) -> None:
        """Give up on settling a run: forget it so its lease runs out and it runs again."""
        with self._lock:
            running.handed_off = True
            self._held.pop(running.delivery.token, None)
            self._lock.notify_all()

    def _settle(
        self, running: _Running, settlement: Settlement, record: bytes | None, pull: bool = False
    ) -> None:
        """Store the record, then settle with the next fetch.

        With ``pull`` (a slot thread that will fetch its own next job) the settlement is left
        in ``running.pull``; otherwise it goes with the fetch loop's next fetch, or right here
        if the fetch loop is blocked waiting for new jobs.
        """
        job_id = settlement.delivery.id
        if running.lost:
            # Another run owns the job now: its result, not ours, belongs in the storage.
            _job_log(
                logging.WARNING,
                running.delivery,
                running.task_name,
                "its lease was lost; the result of this run is discarded",
            )
            self._drop(running)
            return
        if record is not None:
            settlement = dataclasses.replace(settlement, record=record, ttl=self.app.result_ttl)
        if record is not None and not self._broker_stores_results:
            try:
                self.app.storage.save({job_id: record}, self.app.result_ttl)
            except Exception as exc:  # a plugin's own exception type too: the job must not hang
                # Not settling lets the lease run out, so the job runs again: at-least-once.
                log.error(
                    "job %s: storing its result failed, it will run again: %s",
                    job_id,
                    exc,
                    exc_info=not isinstance(exc, WorqError),
                )
                self._drop(running)
                return
        with self._lock:
            if pull and self._pulls and not self._stopping.is_set():
                running.pull = settlement  # not handed off yet: shutdown waits for the pull
                return
            running.handed_off = True
            direct = self._fetch_blocked
            if not direct:
                self._settle_queue.append(settlement)
                self._lock.notify_all()
        if direct:
            try:
                applied = self.app.broker.settle([settlement])
            except Exception as exc:  # a plugin's own exception type too
                log.warning(
                    "job %s: settling failed, the fetch loop will retry: %s",
                    job_id,
                    exc,
                    exc_info=not isinstance(exc, WorqError),
                )
                with self._lock:
                    self._settle_queue.append(settlement)
                    self._lock.notify_all()
                return
            self._settled([settlement], applied)

    # -- heartbeat and shutdown ----------------------------------------------------------------

    def _heartbeat(self) -> None:
        """Enforce timeouts as they fall due; every interval, renew leases and register.

        Also checks the memory limit and the parent process. Never dies: an unexpected error
        is logged.
        """
        interval = self.settings.heartbeat_interval
        next_beat = time.monotonic() + interval
        renewed_at = time.monotonic()
        while not self._done.is_set():
            wake_at = min(next_beat, self._next_deadline())
            self._wake_heartbeat.wait(max(0.0, wake_at - time.monotonic()))
            self._wake_heartbeat.clear()
            try:
                self._expire_timeouts()
                if time.monotonic() < next_beat or self._done.is_set():
                    continue
                next_beat = time.monotonic() + interval
                self._check_limits()
                self._register()
                renewed_at = self._renew_leases(renewed_at)
            except Exception:
                log.exception("heartbeat error (leases may not have been renewed)")

    def _next_deadline(self) -> float:
        with self._lock:
            deadlines = [r.deadline for r in self._held.values() if r.deadline and not r.decided]
        return min(deadlines, default=float("inf"))

    def _renew_leases(self, renewed_at: float) -> float:
        """Extend every held lease; returns when leases were last known to be renewed."""
        with self._lock:
            held = [r for r in self._held.values() if not r.handed_off]
        if self._keeper is not None:
            if self._keeper.hold([r.delivery for r in held]):
                return time.monotonic()  # it renews them on its own schedule
            log.error("the lease keeper process is gone; renewing leases from a thread")
            self._keeper = None
        if not held:
            return time.monotonic()
        try:
            alive = self.app.broker.extend([r.delivery for r in held], self.settings.lease)
        except WorqError as exc:
            silent = time.monotonic() - renewed_at
            if silent <= self.settings.lease:
                log.warning("heartbeat failed, %d leases not renewed: %s", len(held), exc)
                return renewed_at
            log.error(
                "heartbeats have failed for %.0fs, longer than the %gs lease: the %d jobs held "
                "are presumed lost and may run again elsewhere: %s",
                silent,
                self.settings.lease,
                len(held),
                exc,
            )
            alive = [False] * len(held)
        else:
            renewed_at = time.monotonic()
        for running, ok in zip(held, alive, strict=True):
            if not ok and not running.lost:
                running.lost = True
                _job_log(
                    logging.WARNING,
                    running.delivery,
                    running.task_name,
                    "lease lost (it expired before its heartbeat); the job may run twice",
                )
        return renewed_at

    def _register(self) -> None:
        with self._lock:
            info = WorkerInfo(
                id=self.id,
                host=socket.gethostname(),
                pid=os.getpid(),
                started=self.started,
                queues=self.settings.queues,
                concurrency=self.settings.concurrency,
                done=self.counters.done,
                running=self._busy,
                seen=time.time(),
            )
        try:
            self.app.broker.register_worker(info, ttl=3 * self.settings.heartbeat_interval + 5)
        except Exception as exc:  # noqa: BLE001 - observability must never stop the work
            log.debug("registering the worker failed: %s", exc)

    def _check_limits(self) -> None:
        limit = self.settings.max_memory
        if limit is not None and (used := resident_memory()) > limit:
            log.info("resident memory %d MiB passed the limit of %d MiB", used >> 20, limit >> 20)
            self._retire(ExitReason.MAX_MEMORY)
        if self.settings.stop_when_orphaned and os.getppid() != self._parent:
            log.warning("the parent process (pid %d) is gone; stopping", self._parent)
            self.stop()

    def _expire_timeouts(self) -> None:
        now = time.monotonic()
        with self._lock:
            overdue = [
                r
                for r in self._held.values()
                if r.deadline is not None and r.deadline <= now and not r.decided
            ]
        for running in overdue:
            task = running.task
            assert task is not None
            assert task.config.timeout is not None
            exc = TaskTimeoutError(task.name, task.config.timeout)
            if not self._decide(running, failure=ErrorInfo.from_exception(exc)):
                continue  # it finished just in time
            _job_log(
                logging.ERROR,
                running.delivery,
                task.name,
                "timed out after %gs and could not be stopped; its slot goes to a fresh %s",
                task.config.timeout,
                "task" if task.is_async else "thread",
            )
            with self._lock:
                running.abandoned = True
            self._free_slot(running)
            if not task.is_async:
                assert self._slots is not None
                self._slots.grow()
            if self.settings.recycle_when_stuck:
                self._retire(ExitReason.STUCK)

    def _shutdown(self) -> None:
        """Wait for in-flight jobs within the grace period and settle them; put the rest back.

        Jobs still running when the grace period ends (or at a second stop) are settled as a
        retry with no delay: they go back to their queue at once, and the attempt counts.
        """
        deadline = time.monotonic() + self.settings.grace
        broker = self.app.broker
        while True:
            with self._lock:
                settlements, self._settle_queue = self._settle_queue, []
                pending = sum(1 for r in self._held.values() if not r.handed_off)
            if settlements:
                try:
                    self._settled(settlements, broker.settle(settlements))
                except Exception as exc:  # noqa: BLE001 - retried until the deadline
                    log.error("settling %d jobs at shutdown failed: %s", len(settlements), exc)
                    if self._abort.is_set() or time.monotonic() >= deadline:
                        break
                    with self._lock:
                        self._settle_queue[:0] = settlements
                    self._abort.wait(0.2)
                    continue
            if pending == 0 or self._abort.is_set() or time.monotonic() >= deadline:
                break
            log.info("waiting for %d running jobs to finish", pending)
            with self._lock:
                if not self._settle_queue and not self._abort.is_set():
                    self._lock.wait(min(1.0, max(0.0, deadline - time.monotonic())))
        with self._lock:
            # Settlements a slot thread has not sent yet: shutdown sends them itself.
            parked = [r.pull for r in self._held.values() if r.pull is not None]
            for running in self._held.values():
                running.pull = None
            unfinished = [r for r in self._held.values() if not r.decided]
            for running in unfinished:
                running.decided = running.handed_off = True  # late finishers must not settle
        if parked:
            try:
                self._settled(parked, broker.settle(parked))
            except Exception as exc:  # noqa: BLE001 - the leases are the fallback
                log.error("settling %d finished jobs at shutdown failed: %s", len(parked), exc)
        if not unfinished:
            return
        if self.exit_reason is None or self.exit_reason is ExitReason.STOPPED:
            self.exit_reason = ExitReason.ABORTED
        log.info("putting %d unfinished jobs back in their queues", len(unfinished))
        for running in unfinished:
            if running.future is not None:
                running.future.cancel()
        back = [
            Settlement(r.delivery, Outcome.RETRY, 0.0, "the worker stopped before it finished")
            for r in unfinished
        ]
        try:
            self._settled(back, broker.settle(back))
        except Exception as exc:  # noqa: BLE001 - the leases are the fallback
            log.error("putting jobs back failed; their leases will expire instead: %s", exc)


def _job_log(level: int, delivery: Delivery, task: str, message: str, *args: Any) -> None:
    """Log one line about a job, with its id and task name in the text and as ``extra`` fields."""
    if log.isEnabledFor(level):
        log.log(
            level,
            "job %s %s: " + message,
            delivery.id,
            task,
            *args,
            extra={"job_id": delivery.id, "task": task, "queue": delivery.queue},
        )
