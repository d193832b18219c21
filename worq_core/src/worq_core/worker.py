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
import signal
import socket
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from types import FrameType
from typing import TYPE_CHECKING, Any

from worq_core.context import JobContext
from worq_core.context import _current as _current_job
from worq_core.errors import (
    DeserializationError,
    SerializationError,
    TaskTimeoutError,
    UnknownTaskError,
    WorqError,
)
from worq_core.job import Envelope, ErrorInfo, encode_failure, encode_success
from worq_core.lease_keeper import LeaseKeeper
from worq_core.models import Capability, Delivery, Outcome, Settlement, WorkerInfo

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
    """Seconds in-flight jobs get to finish after SIGTERM/SIGINT before they are handed back."""
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
    """Stop gracefully (``exit_reason`` "stuck") when a sync task overruns its timeout, since
    its thread cannot be stopped; ``worq worker`` sets it and replaces the process."""

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
    """A sync task overran its timeout and its thread is still busy; replace the process."""

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
    """Settlements the broker refused because the lease had expired."""

    @property
    def done(self) -> int:
        """Jobs finished one way or another."""
        return self.succeeded + self.retried + self.dead


@dataclass(slots=True, eq=False)
class _Running:
    """A job the worker holds a lease on, from fetch until the broker accepted its settlement."""

    delivery: Delivery
    task: Task[Any, Any] | None = None
    envelope: Envelope | None = None
    deadline: float | None = None
    decided: bool = False
    """Set once an outcome was chosen (by the job's thread or by the timeout watchdog)."""
    holds_slot: bool = False
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
    runs out while a task is stuck. A stuck thread is replaced with :meth:`grow`; the next thread
    to finish its work retires, so the number serving stays the same.
    """

    def __init__(self, size: int, name: str) -> None:
        self._name = name
        self._inbox: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._surplus = 0
        self._lock = threading.Lock()
        self._count = 0
        for _ in range(size):
            self._start()

    def _start(self) -> None:
        self._count += 1
        name = f"{self._name}-{self._count}"
        threading.Thread(target=self._serve, name=name, daemon=True).start()

    def _serve(self) -> None:
        while (work := self._inbox.get()) is not None:
            try:
                work()
            except Exception:  # a bug in worq or a plugin; the thread must keep serving
                log.exception("unexpected error on a slot thread")
            with self._lock:
                if self._surplus:
                    self._surplus -= 1
                    return

    def submit(self, work: Callable[[], None]) -> None:
        self._inbox.put(work)

    def grow(self) -> None:
        """Add a thread in place of one that is stuck in a task."""
        with self._lock:
            self._surplus += 1
            self._start()

    def stop(self) -> None:
        for _ in range(self._count):
            self._inbox.put(None)


def resident_memory() -> int:
    """This process's resident set size in bytes (peak size where the current one is unknown)."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


class Worker:
    """Runs an app's jobs. Create it with :meth:`Worq.worker`; call :meth:`run`.

    :meth:`stop` may be called from any thread (or a signal handler): the first call stops
    fetching and lets in-flight jobs finish within ``grace``; a second one hands back what is
    unfinished and returns at once. :attr:`exit_reason` tells why :meth:`run` returned.
    """

    def __init__(self, app: Worq, settings: WorkerSettings) -> None:
        self.app = app
        self.settings = settings
        self.counters = WorkerCounters()
        self.exit_reason: ExitReason | None = None
        self.id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.started = time.time()
        self._lock = threading.Condition()
        self._held: dict[str, _Running] = {}  # every unsettled lease, by job id
        self._busy = 0  # slots in use
        self._settle_queue: list[Settlement] = []
        self._fetch_blocked = False
        self._stopping = threading.Event()
        self._abort = threading.Event()
        self._done = threading.Event()
        self._wake_heartbeat = threading.Event()
        self._slots: _SlotThreads | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._rng = random.Random()
        self._stop_requested_at = -float("inf")
        self._keeper: LeaseKeeper | None = None
        self._broker_stores_results = app.broker.stores_results_in(app.storage)

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
        with self._signals():
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
                with contextlib.suppress(WorqError):
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

    def stop(self) -> None:
        """Ask the worker to stop: gracefully the first time, at once the second time."""
        self._stop_requested_at = time.monotonic()
        if self._stopping.is_set():
            if not self._abort.is_set():
                log.info("second stop request: handing back unfinished jobs now")
                self.exit_reason = ExitReason.ABORTED
            self._abort.set()
        else:
            log.info("stop requested: no more fetching, finishing in-flight jobs")
            self._stopping.set()
        with self._lock:
            self._lock.notify_all()

    def _retire(self, reason: ExitReason) -> None:
        """Stop gracefully so that a fresh process can take over."""
        if self.exit_reason is None and not self._stopping.is_set():
            self.exit_reason = reason
            log.info("worker %s retiring (%s): finishing in-flight jobs", self.id, reason.value)
            self._stopping.set()
            with self._lock:
                self._lock.notify_all()

    @contextlib.contextmanager
    def _signals(self) -> Iterator[None]:
        if (
            not self.settings.handle_signals
            or threading.current_thread() is not threading.main_thread()
        ):
            yield
            return

        def on_signal(signum: int, frame: FrameType | None) -> None:
            log.info("received %s", signal.Signals(signum).name)
            if time.monotonic() - self._stop_requested_at < DUPLICATE_SIGNAL_WINDOW:
                # The same stop delivered twice (to the process group and by a supervisor),
                # not an impatient second request.
                return
            self.stop()

        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _start_lease_keeper(self) -> LeaseKeeper | None:
        if not self.settings.isolated_heartbeat:
            return None
        broker = self.app.broker
        if Capability.SHARED not in broker.capabilities or not broker.url:
            log.info("leases renewed by a thread: %s cannot be shared with a process", broker.name)
            return None
        log.info("leases renewed by a separate process")
        return LeaseKeeper(broker.url, self.settings.lease, self.settings.heartbeat_interval)

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
        while not self._stopping.is_set():
            with self._lock:
                while self._busy >= settings.concurrency and not self._settle_queue:
                    if self._stopping.is_set():
                        return
                    self._lock.wait(settings.idle_wait)
                settlements, self._settle_queue = self._settle_queue, []
                free = settings.concurrency - self._busy
                if settings.max_jobs is not None:
                    free = min(free, settings.max_jobs - self.counters.fetched)
                block = not settlements
                idle = not self._held
            if free <= 0 and not settlements and idle:
                self._retire(ExitReason.MAX_JOBS)
                return
            if burst and block and idle and self._drained():
                log.info("burst: no jobs left in %s", ",".join(settings.queues))
                self.exit_reason = ExitReason.DRAINED
                return
            with self._lock:
                self._fetch_blocked = block
            try:
                applied, deliveries = broker.settle_and_fetch(
                    settlements,
                    settings.fetch_order(self._rng),
                    max(free, 0),
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
            for delivery in deliveries:
                self._dispatch(delivery)

    def _drained(self) -> bool:
        stats = self.app.broker.stats(self.settings.queues)
        return all(s.ready == 0 and s.delayed == 0 and s.running == 0 for s in stats)

    def _settled(self, settlements: Sequence[Settlement], applied: Sequence[bool]) -> None:
        with self._lock:
            for settlement, ok in zip(settlements, applied, strict=True):
                delivery = settlement.delivery
                held = self._held.get(delivery.id)
                if held is not None and held.delivery.token == delivery.token:
                    del self._held[delivery.id]
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

    def _dispatch(self, delivery: Delivery) -> None:
        """Decide what to do with a fresh delivery and start it; runs on the fetch loop."""
        running = _Running(delivery)
        with self._lock:
            self.counters.fetched += 1
            self._held[delivery.id] = running
        try:
            envelope = Envelope.decode(delivery.body, self.app.serializer)
        except DeserializationError as exc:
            _job_log(logging.ERROR, delivery, "?", "undecodable payload, dead-lettered: %s", exc)
            self._decide(running, dead=ErrorInfo.from_exception(exc))
            return
        running.envelope = envelope
        task = self.app.tasks.get(envelope.task)
        if task is None:
            unknown = UnknownTaskError(envelope.task)
            _job_log(logging.ERROR, delivery, envelope.task, "%s; dead-lettered", unknown)
            self._decide(running, dead=ErrorInfo.from_exception(unknown))
            return
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
            return
        timeout = task.config.timeout
        with self._lock:
            self._busy += 1
            running.holds_slot = True
            if timeout is not None and not task.is_async:
                running.deadline = time.monotonic() + timeout
                self._wake_heartbeat.set()  # it may need to wake earlier than it planned
        _job_log(logging.DEBUG, delivery, task.name, "attempt %d started", delivery.attempts)
        if task.is_async:
            assert self._loop is not None
            future = asyncio.run_coroutine_threadsafe(self._run_async(running), self._loop)
            running.future = future
        else:
            assert self._slots is not None
            self._slots.submit(lambda: self._run_sync(running))

    def _run_sync(self, running: _Running) -> None:
        assert running.task is not None
        assert running.envelope is not None
        token = _current_job.set(running.context())
        try:
            value = running.task.fn(*running.envelope.args, **running.envelope.kwargs)
        except BaseException as exc:  # noqa: BLE001 - a job must never kill its slot thread
            self._finished(running, error=exc, tb=traceback.format_exc())
        else:
            self._finished(running, value=value)
        finally:
            _current_job.reset(token)

    async def _run_async(self, running: _Running) -> None:
        assert running.task is not None
        assert running.envelope is not None
        task, envelope = running.task, running.envelope
        _current_job.set(running.context())  # this coroutine runs in an asyncio task of its own
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
    ) -> None:
        """A job's code returned or raised; runs on the thread that ran it."""
        try:
            if error is None:
                self._decide(running, value=value)
            else:
                self._decide(running, failure=ErrorInfo.from_exception(error, tb))
        finally:
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
    ) -> None:
        """Choose the outcome, store the record, and settle (at most once per delivery)."""
        with self._lock:
            if running.decided:
                return  # the timeout watchdog or a forced shutdown got here first
            running.decided = True
        delivery, task = running.delivery, running.task
        serializer = self.app.serializer
        record: bytes | None = None
        if dead is None and failure is None:
            try:
                record = encode_success(serializer, value)
            except SerializationError as exc:
                dead = ErrorInfo.from_exception(exc)
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
                self._settle(Settlement(delivery, Outcome.RETRY, delay, failure.summary()), None)
                self._count("retried")
                return
            dead = failure
            _job_log(
                logging.ERROR,
                delivery,
                running.task_name,
                "attempt %d failed (%s); no retries left, dead-lettered",
                delivery.attempts,
                failure.summary(),
            )
        if dead is not None:
            self._settle(
                Settlement(delivery, Outcome.DEAD, 0.0, dead.summary()),
                encode_failure(serializer, dead),
            )
            self._count("dead")
            return
        self._settle(Settlement(delivery, Outcome.ACK), record)
        self._count("succeeded")

    def _count(self, outcome: str) -> None:
        with self._lock:
            setattr(self.counters, outcome, getattr(self.counters, outcome) + 1)

    def _settle(self, settlement: Settlement, record: bytes | None) -> None:
        """Store the record, then settle with the fetch loop's next fetch.

        If the fetch loop is blocked waiting for new jobs, settle right here instead.
        """
        job_id = settlement.delivery.id
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
                with self._lock:
                    self._held.pop(job_id, None)
                return
        with self._lock:
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

        Also checks the memory limit. Never dies: an unexpected error is logged.
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
                self._check_memory()
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
            held = [r.delivery for r in self._held.values()]
        if self._keeper is not None:
            if self._keeper.hold(held):
                return time.monotonic()  # it renews them on its own schedule
            log.error("the lease keeper process is gone; renewing leases from a thread")
            self._keeper = None
        if not held:
            return time.monotonic()
        try:
            alive = self.app.broker.extend(held, self.settings.lease)
        except WorqError as exc:
            silent = time.monotonic() - renewed_at
            if silent > self.settings.lease:
                log.error(
                    "heartbeats have failed for %.0fs, longer than the %gs lease: the %d jobs "
                    "held are presumed lost and may run again elsewhere: %s",
                    silent,
                    self.settings.lease,
                    len(held),
                    exc,
                )
            else:
                log.warning("heartbeat failed, %d leases not renewed: %s", len(held), exc)
            return renewed_at
        for delivery, ok in zip(held, alive, strict=True):
            if not ok:
                _job_log(
                    logging.WARNING,
                    delivery,
                    "?",
                    "lease lost (expired before its heartbeat); it may run twice",
                )
        return time.monotonic()

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
        except WorqError as exc:
            log.debug("registering the worker failed: %s", exc)

    def _check_memory(self) -> None:
        limit = self.settings.max_memory
        if limit is not None and (used := resident_memory()) > limit:
            log.info("resident memory %d MiB passed the limit of %d MiB", used >> 20, limit >> 20)
            self._retire(ExitReason.MAX_MEMORY)

    def _expire_timeouts(self) -> None:
        now = time.monotonic()
        with self._lock:
            overdue = [
                r
                for r in self._held.values()
                if r.deadline is not None and r.deadline <= now and not r.decided
            ]
        for running in overdue:
            assert running.task is not None
            assert running.task.config.timeout is not None
            _job_log(
                logging.ERROR,
                running.delivery,
                running.task.name,
                "timed out after %gs; its thread cannot be stopped and is left behind",
                running.task.config.timeout,
            )
            exc = TaskTimeoutError(running.task.name, running.task.config.timeout)
            self._decide(running, failure=ErrorInfo.from_exception(exc))
            # The slot goes to a fresh thread; the stuck one retires whenever it returns.
            self._free_slot(running)
            assert self._slots is not None
            self._slots.grow()
            if self.settings.recycle_when_stuck:
                self._retire(ExitReason.STUCK)

    def _shutdown(self) -> None:
        """Wait for in-flight jobs within the grace period, settle them, hand back the rest."""
        deadline = time.monotonic() + self.settings.grace
        broker = self.app.broker
        while True:
            with self._lock:
                settlements, self._settle_queue = self._settle_queue, []
                # A job already decided (say, failed at its timeout) needs no waiting for, even
                # if its thread is still busy.
                undecided = sum(1 for r in self._held.values() if not r.decided)
            if settlements:
                try:
                    self._settled(settlements, broker.settle(settlements))
                except WorqError as exc:
                    log.error("settling %d jobs at shutdown failed: %s", len(settlements), exc)
            if undecided == 0 or self._abort.is_set() or time.monotonic() >= deadline:
                break
            log.info("waiting for %d running jobs to finish", undecided)
            with self._lock:
                if not self._settle_queue and not self._abort.is_set():
                    self._lock.wait(min(1.0, max(0.0, deadline - time.monotonic())))
        with self._lock:
            unfinished = [r for r in self._held.values() if not r.decided]
            self._held.clear()
            for running in unfinished:
                running.decided = True  # late finishers must not settle a handed-back job
        if unfinished:
            if self.exit_reason is None or self.exit_reason is ExitReason.STOPPED:
                self.exit_reason = ExitReason.ABORTED
            log.info("handing back %d unfinished jobs", len(unfinished))
            for running in unfinished:
                if running.future is not None:
                    running.future.cancel()
            try:
                broker.release([r.delivery for r in unfinished])
            except WorqError as exc:
                log.error("handing back jobs failed; their leases will expire: %s", exc)


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
