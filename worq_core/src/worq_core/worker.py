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
import logging
import queue
import signal
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from types import FrameType
from typing import TYPE_CHECKING, Any

from worq_core.errors import (
    DeserializationError,
    SerializationError,
    TaskTimeoutError,
    UnknownTaskError,
    WorqError,
)
from worq_core.job import Envelope, ErrorInfo, encode_failure, encode_success
from worq_core.models import Delivery, Outcome, Settlement

if TYPE_CHECKING:
    from worq_core.app import Worq
    from worq_core.task import Task

log = logging.getLogger("worq.worker")


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

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        if self.lease <= 0 or self.grace < 0 or self.idle_wait <= 0:
            raise ValueError("lease and idle_wait must be positive, grace not negative")
        if not self.queues:
            raise ValueError("a worker needs at least one queue")

    @property
    def heartbeat_interval(self) -> float:
        """Seconds between heartbeats."""
        return self.heartbeat if self.heartbeat is not None else self.lease / 3


@dataclass(slots=True)
class WorkerCounters:
    """What a worker has done since it started; read it from any thread."""

    fetched: int = 0
    succeeded: int = 0
    retried: int = 0
    dead: int = 0
    refused: int = 0
    """Settlements the broker refused because the lease had expired."""


@dataclass(slots=True, eq=False)
class _Running:
    """A job the worker holds a lease on, from fetch until the broker accepted its settlement."""

    delivery: Delivery
    task: Task[Any, Any] | None = None
    envelope: Envelope | None = None
    deadline: float | None = None
    decided: bool = False
    """Set once an outcome was chosen (by the job's thread or by the timeout watchdog)."""
    future: Any = None
    started: float = field(default_factory=time.monotonic)


class _SlotThreads:
    """A fixed set of daemon threads for sync tasks.

    Daemon threads (unlike ``ThreadPoolExecutor``'s) let the process exit when the grace period
    runs out while a task is stuck; its job is handed back to the broker first.
    """

    def __init__(self, size: int, name: str) -> None:
        self._inbox: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._serve, name=f"{name}-{i}", daemon=True)
            for i in range(size)
        ]
        for thread in self._threads:
            thread.start()

    def _serve(self) -> None:
        while (work := self._inbox.get()) is not None:
            work()

    def submit(self, work: Callable[[], None]) -> None:
        self._inbox.put(work)

    def stop(self) -> None:
        for _ in self._threads:
            self._inbox.put(None)


class Worker:
    """Runs an app's jobs. Create it with :meth:`Worq.worker`; call :meth:`run`.

    :meth:`stop` may be called from any thread (or a signal handler): the first call stops
    fetching and lets in-flight jobs finish within ``grace``; a second one hands back what is
    unfinished and returns at once.
    """

    def __init__(self, app: Worq, settings: WorkerSettings) -> None:
        self.app = app
        self.settings = settings
        self.counters = WorkerCounters()
        self._lock = threading.Condition()
        self._held: dict[str, _Running] = {}  # every unsettled lease, by job id
        self._busy = (
            0  # slots in use (a timed-out sync job keeps its slot until its thread returns)
        )
        self._settle_queue: list[Settlement] = []
        self._fetch_blocked = False
        self._stopping = threading.Event()
        self._abort = threading.Event()
        self._done = threading.Event()
        self._slots: _SlotThreads | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._broker_stores_results = app.broker.stores_results_in(app.storage)

    # -- lifecycle ---------------------------------------------------------------------------

    def run(self, burst: bool = False) -> None:
        """Process jobs until stopped, then shut down gracefully and return.

        With ``burst``, return once the queues hold no job at all: none ready, delayed or running.
        """
        settings = self.settings
        log.info(
            "worker starting: queues=%s concurrency=%d lease=%gs broker=%s",
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
        heartbeat = threading.Thread(target=self._heartbeat, name="worq-heartbeat", daemon=True)
        heartbeat.start()
        with self._signals():
            try:
                self._fetch_loop(burst)
            finally:
                self._shutdown()
                self._done.set()
                heartbeat.join()
                self._loop.call_soon_threadsafe(self._loop.stop)
                loop_thread.join()
                self._loop.close()
                self._slots.stop()
        log.info(
            "worker stopped: succeeded=%d retried=%d dead=%d",
            self.counters.succeeded,
            self.counters.retried,
            self.counters.dead,
        )

    def stop(self) -> None:
        """Ask the worker to stop: gracefully the first time, at once the second time."""
        if self._stopping.is_set():
            if not self._abort.is_set():
                log.info("second stop request: handing back unfinished jobs now")
            self._abort.set()
        else:
            log.info("stop requested: no more fetching, finishing in-flight jobs")
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
            self.stop()

        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _run_loop(self) -> None:
        assert self._loop is not None
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()

    # -- fetching ----------------------------------------------------------------------------

    def _fetch_loop(self, burst: bool) -> None:
        settings, broker = self.settings, self.app.broker
        backoff = 0.0
        while not self._stopping.is_set():
            with self._lock:
                while self._busy >= settings.concurrency and not self._settle_queue:
                    if self._stopping.is_set():
                        return
                    self._lock.wait(settings.idle_wait)
                settlements, self._settle_queue = self._settle_queue, []
                free = settings.concurrency - self._busy
                block = not settlements
                self._fetch_blocked = block
            try:
                applied, deliveries = broker.settle_and_fetch(
                    settlements,
                    settings.queues,
                    free,
                    lease=settings.lease,
                    wait=settings.idle_wait if block else 0.0,
                )
            except WorqError as exc:
                with self._lock:
                    self._fetch_blocked = False
                    self._settle_queue[:0] = settlements  # settling twice is refused, not doubled
                backoff = min(max(backoff * 2, 0.1), 5.0)
                log.warning("broker error, retrying in %.1fs: %s", backoff, exc)
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
            if burst and not deliveries and self._drained():
                log.info("burst: no jobs left in %s", ",".join(settings.queues))
                return

    def _drained(self) -> bool:
        with self._lock:
            if self._held or self._settle_queue:
                return False
        stats = self.app.broker.stats(self.settings.queues)
        return all(s.ready == 0 and s.delayed == 0 and s.running == 0 for s in stats)

    def _settled(self, settlements: Sequence[Settlement], applied: Sequence[bool]) -> None:
        with self._lock:
            for settlement, ok in zip(settlements, applied, strict=True):
                held = self._held.get(settlement.delivery.id)
                if held is not None and held.delivery.token == settlement.delivery.token:
                    del self._held[settlement.delivery.id]
                if not ok:
                    self.counters.refused += 1
                    log.warning(
                        "job %s: the broker refused its %s: its lease had expired and it may "
                        "run again elsewhere",
                        settlement.delivery.id,
                        settlement.outcome.value,
                    )

    # -- running -----------------------------------------------------------------------------

    def _dispatch(self, delivery: Delivery) -> None:
        """Decide what to do with a fresh delivery and start it; runs on the fetch loop."""
        self.counters.fetched += 1
        running = _Running(delivery)
        with self._lock:
            self._held[delivery.id] = running
        try:
            envelope = Envelope.decode(delivery.body, self.app.serializer)
        except DeserializationError as exc:
            log.error("job %s: undecodable payload, dead-lettered: %s", delivery.id, exc)
            self._decide(running, dead=ErrorInfo.from_exception(exc))
            return
        running.envelope = envelope
        task = self.app.tasks.get(envelope.task)
        if task is None:
            unknown = UnknownTaskError(envelope.task)
            log.error("job %s: %s; dead-lettered", delivery.id, unknown)
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
            log.error("job %s %s: %s; dead-lettered", delivery.id, task.name, reason)
            self._decide(running, dead=ErrorInfo("worq.AttemptsExhausted", reason))
            return
        timeout = task.config.timeout
        with self._lock:
            self._busy += 1
            if timeout is not None and not task.is_async:
                running.deadline = time.monotonic() + timeout
        log.debug("job %s %s: attempt %d started", delivery.id, task.name, delivery.attempts)
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
        try:
            value = running.task.fn(*running.envelope.args, **running.envelope.kwargs)
        except BaseException as exc:  # noqa: BLE001 - a job must never kill its slot thread
            self._finished(running, error=exc, tb=traceback.format_exc())
        else:
            self._finished(running, value=value)

    async def _run_async(self, running: _Running) -> None:
        assert running.task is not None
        assert running.envelope is not None
        task, envelope = running.task, running.envelope
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
            with self._lock:
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
                return  # the timeout watchdog already settled this run
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
                log.warning(
                    "job %s %s: attempt %d failed (%s); retrying in %.2fs",
                    delivery.id,
                    task.name,
                    delivery.attempts,
                    failure.summary(),
                    delay,
                )
                self._settle(Settlement(delivery, Outcome.RETRY, delay, failure.summary()), None)
                self.counters.retried += 1
                return
            dead = failure
        if dead is not None:
            if failure is not None:
                log.error(
                    "job %s %s: attempt %d failed (%s); no retries left, dead-lettered",
                    delivery.id,
                    task.name if task else "?",
                    delivery.attempts,
                    failure.summary(),
                )
            self._settle(
                Settlement(delivery, Outcome.DEAD, 0.0, dead.summary()),
                encode_failure(serializer, dead),
            )
            self.counters.dead += 1
            return
        self._settle(Settlement(delivery, Outcome.ACK), record)
        self.counters.succeeded += 1

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
            except WorqError as exc:
                # Not settling lets the lease run out, so the job runs again: at-least-once.
                log.error("job %s: storing its result failed, it will run again: %s", job_id, exc)
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
            except WorqError as exc:
                log.warning("job %s: settling failed, the fetch loop will retry: %s", job_id, exc)
                with self._lock:
                    self._settle_queue.append(settlement)
                return
            self._settled([settlement], applied)

    # -- heartbeat and shutdown ----------------------------------------------------------------

    def _heartbeat(self) -> None:
        interval = self.settings.heartbeat_interval
        while not self._done.wait(interval):
            self._expire_timeouts()
            with self._lock:
                held = [r.delivery for r in self._held.values()]
            if not held:
                continue
            try:
                alive = self.app.broker.extend(held, self.settings.lease)
            except WorqError as exc:
                log.warning("heartbeat failed, leases of %d jobs not renewed: %s", len(held), exc)
                continue
            for delivery, ok in zip(held, alive, strict=True):
                if not ok:
                    log.warning(
                        "job %s: lease lost (expired before its heartbeat); it may run twice",
                        delivery.id,
                    )

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
            log.error(
                "job %s %s: timed out after %gs; its thread keeps its slot until it returns",
                running.delivery.id,
                running.task.name,
                running.task.config.timeout,
            )
            exc = TaskTimeoutError(running.task.name, running.task.config.timeout)
            self._decide(running, failure=ErrorInfo.from_exception(exc))

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
            log.info("handing back %d unfinished jobs", len(unfinished))
            for running in unfinished:
                if running.future is not None:
                    running.future.cancel()
            try:
                broker.release([r.delivery for r in unfinished])
            except WorqError as exc:
                log.error("handing back jobs failed; their leases will expire: %s", exc)
