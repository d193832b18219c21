"""End-to-end contract: whole jobs through a real worker on the backend under test."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from typing import Any

import pytest

from worq_core.app import Worq
from worq_core.broker import Broker
from worq_core.context import JobContext, current_job
from worq_core.errors import (
    BrokerError,
    JobCancelled,
    JobFailed,
    Reject,
    Retry,
    SerializationError,
    UnsupportedError,
)
from worq_core.models import Capability, JobStatus, Message
from worq_core.registry import Registry
from worq_core.retry import RetryPolicy
from worq_core.serializers import MsgpackSerializer
from worq_core.storage import Storage
from worq_core.task import TaskArgumentsError
from worq_core.testing.support import (
    CLOCK_SLACK,
    BrokerCases,
    eventually,
    requires,
    running,
    unique,
)
from worq_core.worker import ExitReason, Worker, WorkerSettings

FAST_RETRY = RetryPolicy(base=0.01, factor=1.0, max_delay=0.01, jitter=False)
RESULT_WAIT = 10.0


class WorkerContract(BrokerCases):
    """Subclass and provide ``broker`` and ``storage`` fixtures (fresh, or shared)."""

    @pytest.fixture
    def app(self, broker: Broker, storage: Storage) -> Worq:
        """An app on the backend under test, with no plugin lookups."""
        return Worq(broker, storage=storage, serializer=MsgpackSerializer(), registry=Registry())

    @staticmethod
    def worker(app: Worq, queue: str, **options: Any) -> Worker:
        """A worker on ``queue`` that reacts quickly to stop requests."""
        defaults: dict[str, Any] = {
            "queues": (queue,),
            "concurrency": 4,
            "idle_wait": 0.05,
            "grace": 10.0,
            "handle_signals": False,
        }
        return Worker(app, WorkerSettings(**(defaults | options)))

    # -- enqueueing on the caller's connection -----------------------------------------------

    def test_enqueue_on_a_connection_is_refused_with_a_typed_error_and_adds_nothing(
        self, app: Worq, queue: str
    ) -> None:
        """Without TRANSACTIONAL, ``connection=`` is refused before anything is sent.

        With it, a connection the broker cannot use (here a bare object) is refused with a
        :class:`BrokerError` and nothing is added either; what a real connection does is the
        backend's own tests' business (commit, rollback, crash before commit).
        """

        @app.task(queue=queue)
        def noop() -> None: ...

        broker = app.broker
        if Capability.TRANSACTIONAL in broker.capabilities:
            with pytest.raises(BrokerError):
                noop.options(connection=object()).enqueue()
            with pytest.raises(BrokerError):
                noop.options(connection=object()).enqueue_many([(), ()])
        else:
            with pytest.raises(UnsupportedError, match="transactional"):
                noop.options(connection=object()).enqueue()
            with pytest.raises(UnsupportedError):
                broker.enqueue_on(object(), [Message(unique("job"), queue, b"")])
        assert broker.stats([queue])[0].ready == 0

    # -- results -----------------------------------------------------------------------------

    def test_a_job_runs_and_its_result_comes_back(self, app: Worq, queue: str) -> None:
        @app.task(queue=queue)
        def add(x: int, y: int) -> int:
            return x + y

        job = add.enqueue(2, 3)
        assert job.status() is JobStatus.QUEUED
        self.worker(app, queue).run(burst=True)
        assert job.result(timeout=RESULT_WAIT) == 5
        assert job.status() is JobStatus.SUCCEEDED

    def test_async_and_sync_tasks_run_in_the_same_worker(self, app: Worq, queue: str) -> None:
        @app.task(queue=queue)
        async def double(x: int) -> int:
            await asyncio.sleep(0)
            return 2 * x

        @app.task(queue=queue)
        def square(x: int) -> int:
            return x * x

        jobs = double.enqueue_many([(i,) for i in range(10)]) + square.enqueue_many(
            [{"x": i} for i in range(10)]
        )
        self.worker(app, queue).run(burst=True)
        results = [job.result(timeout=RESULT_WAIT) for job in jobs]
        assert results == [2 * i for i in range(10)] + [i * i for i in range(10)]

    def test_results_keep_plain_data_types(self, app: Worq, queue: str) -> None:
        value = {"bytes": b"\x00\x01", "list": [1, 2.5, None, True], "text": "żółw"}

        @app.task(queue=queue)
        def echo(payload: dict[str, Any]) -> dict[str, Any]:
            return payload

        job = echo.enqueue(value)
        self.worker(app, queue).run(burst=True)
        assert job.result(timeout=RESULT_WAIT) == value

    def test_slots_run_jobs_at_the_same_time(self, app: Worq, queue: str) -> None:
        together = threading.Barrier(4, timeout=10)

        @app.task(queue=queue)
        def meet() -> int:
            return together.wait()

        jobs = meet.enqueue_many([() for _ in range(4)])
        self.worker(app, queue, concurrency=4).run(burst=True)
        assert sorted(job.result(timeout=RESULT_WAIT) for job in jobs) == [0, 1, 2, 3]

    # -- failures and retries ----------------------------------------------------------------

    def test_a_failing_job_is_retried_until_it_succeeds(self, app: Worq, queue: str) -> None:
        attempts: list[int] = []

        @app.task(queue=queue, max_retries=3, retry=FAST_RETRY)
        def flaky() -> str:
            attempts.append(1)
            if len(attempts) < 3:
                raise ConnectionError("try again")
            return "ok"

        job = flaky.enqueue()
        worker = self.worker(app, queue)
        worker.run(burst=True)
        assert job.result(timeout=RESULT_WAIT) == "ok"
        assert len(attempts) == 3
        assert (worker.counters.retried, worker.counters.succeeded) == (2, 1)

    @requires(Capability.DEAD_LETTER)
    def test_a_job_out_of_retries_is_dead_lettered_with_its_error(
        self, app: Worq, queue: str
    ) -> None:
        attempts: list[int] = []

        @app.task(queue=queue, max_retries=2, retry=FAST_RETRY)
        def broken(key: str) -> None:
            attempts.append(1)
            raise KeyError(key)

        job = broken.enqueue("missing")
        self.worker(app, queue).run(burst=True)
        assert len(attempts) == 3, "max_retries=2 means three attempts in all"
        with pytest.raises(JobFailed) as failed:
            job.result(timeout=RESULT_WAIT)
        assert failed.value.error_type == "KeyError"
        assert "missing" in failed.value.message
        assert failed.value.traceback is not None
        assert "in broken" in failed.value.traceback
        assert job.status() is JobStatus.DEAD
        [dead] = app.broker.dead_jobs(queue)
        assert dead.id == job.id
        assert "KeyError" in dead.reason

    @requires(Capability.DELAYED)
    def test_retry_backoff_is_honoured(self, app: Worq, queue: str) -> None:
        runs: list[float] = []
        policy = RetryPolicy(base=0.3, factor=1.0, jitter=False)

        @app.task(queue=queue, max_retries=1, retry=policy)
        def fail_once() -> None:
            runs.append(time.time())
            if len(runs) == 1:
                raise RuntimeError("first run fails")

        job = fail_once.enqueue()
        self.worker(app, queue).run(burst=True)
        job.result(timeout=RESULT_WAIT)
        assert len(runs) == 2
        assert runs[1] - runs[0] >= 0.3 - CLOCK_SLACK

    @requires(Capability.DEAD_LETTER)
    def test_an_unknown_task_is_dead_lettered_and_the_worker_goes_on(
        self, app: Worq, queue: str
    ) -> None:
        @app.task(queue=queue, name="known")
        def known() -> str:
            return "still working"

        stranger = Worq(
            app.broker, storage=app.storage, serializer=MsgpackSerializer(), registry=Registry()
        )

        @stranger.task(queue=queue, name="unknown.task")
        def unknown() -> None: ...

        lost = unknown.enqueue()
        fine = known.enqueue()
        self.worker(app, queue).run(burst=True)
        assert fine.result(timeout=RESULT_WAIT) == "still working"
        with pytest.raises(JobFailed) as failed:
            lost.result(timeout=RESULT_WAIT)
        assert failed.value.error_type == "worq_core.errors.UnknownTaskError"
        assert "unknown.task" in app.broker.dead_jobs(queue)[0].reason

    @requires(Capability.DEAD_LETTER)
    def test_an_undecodable_payload_is_dead_lettered_and_the_worker_goes_on(
        self, app: Worq, queue: str
    ) -> None:
        @app.task(queue=queue)
        def ping() -> str:
            return "pong"

        app.broker.enqueue([Message("garbage-1", queue, b"\xc1\xff not a job")])
        app.broker.enqueue([Message("garbage-2", queue, app.serializer.dumps({"v": 99}))])
        job = ping.enqueue()
        self.worker(app, queue).run(burst=True)
        assert job.result(timeout=RESULT_WAIT) == "pong"
        dead = {d.id: d.reason for d in app.broker.dead_jobs(queue)}
        assert set(dead) == {"garbage-1", "garbage-2"}
        assert all("DeserializationError" in reason for reason in dead.values())

    @requires(Capability.DEAD_LETTER)
    def test_a_result_the_serializer_refuses_dead_letters_the_job(
        self, app: Worq, queue: str
    ) -> None:
        @app.task(queue=queue)
        def unserializable() -> object:
            return object()

        job = unserializable.enqueue()
        self.worker(app, queue).run(burst=True)
        with pytest.raises(JobFailed) as failed:
            job.result(timeout=RESULT_WAIT)
        assert failed.value.error_type == "worq_core.errors.SerializationError"

    @requires(Capability.DEAD_LETTER)
    def test_a_job_that_keeps_killing_its_worker_ends_dead(self, app: Worq, queue: str) -> None:
        @app.task(queue=queue, max_retries=1)
        def deadly() -> None: ...

        job = deadly.enqueue()
        for attempt in (1, 2):  # two workers "die": they fetch and never settle
            [delivery] = app.broker.fetch([queue], 1, lease=0.2, wait=5 if attempt > 1 else 0)
            assert delivery.attempts == attempt
        self.worker(app, queue).run(burst=True)
        with pytest.raises(JobFailed) as failed:
            job.result(timeout=RESULT_WAIT)
        assert failed.value.error_type == "worq.AttemptsExhausted"

    # -- enqueue errors ------------------------------------------------------------------------

    def test_arguments_the_serializer_refuses_raise_and_enqueue_nothing(
        self, app: Worq, queue: str
    ) -> None:
        @app.task(queue=queue)
        def take(value: Any) -> None: ...

        with pytest.raises(SerializationError):
            take.enqueue({1, 2, 3})
        with pytest.raises(SerializationError):
            take.enqueue_many([("fine",), (object(),), ("also fine",)])
        [stats] = app.broker.stats([queue])
        assert (stats.ready, stats.delayed) == (0, 0)

    def test_arguments_that_do_not_fit_the_signature_raise_and_enqueue_nothing(
        self, app: Worq, queue: str
    ) -> None:
        @app.task(queue=queue)
        def add(x: int, y: int) -> int:
            return x + y

        with pytest.raises(TaskArgumentsError):
            add.enqueue(1)  # type: ignore[call-arg]
        with pytest.raises(TaskArgumentsError):
            add.enqueue_many([(1, 2), (1, 2, 3)])
        [stats] = app.broker.stats([queue])
        assert stats.ready == 0

    def test_a_job_id_makes_enqueue_idempotent(self, app: Worq, queue: str) -> None:
        runs: list[int] = []

        @app.task(queue=queue)
        def once(x: int) -> int:
            runs.append(x)
            return x

        first = once.options(job_id="order-42").enqueue(1)
        second = once.options(job_id="order-42").enqueue(2)
        assert first.id == second.id == "order-42"
        self.worker(app, queue).run(burst=True)
        assert runs == [1]

    # -- scheduling ----------------------------------------------------------------------------

    @requires(Capability.DELAYED)
    def test_a_delayed_job_does_not_run_before_its_time(self, app: Worq, queue: str) -> None:
        ran_at: list[float] = []

        @app.task(queue=queue)
        def stamp() -> None:
            ran_at.append(time.time())

        enqueued = time.time()
        job = stamp.options(delay=0.4).enqueue()
        assert job.status() is JobStatus.SCHEDULED
        self.worker(app, queue).run(burst=True)
        job.result(timeout=RESULT_WAIT)
        assert ran_at[0] >= enqueued + 0.4 - CLOCK_SLACK

    @requires(Capability.PRIORITIES)
    def test_one_slot_runs_higher_priorities_first(self, app: Worq, queue: str) -> None:
        order: list[str] = []

        @app.task(queue=queue)
        def record(name: str) -> None:
            order.append(name)

        record.options(priority=0).enqueue("low")
        record.options(priority=5).enqueue("high")
        record.options(priority=1).enqueue("mid")
        record.options(priority=5).enqueue("high-later")
        self.worker(app, queue, concurrency=1).run(burst=True)
        assert order == ["high", "high-later", "mid", "low"]

    def test_a_worker_only_takes_jobs_from_its_own_queues(self, app: Worq, queue: str) -> None:
        other = unique("other")

        @app.task(queue=queue)
        def mine() -> str:
            return "mine"

        theirs = mine.options(queue=other).enqueue()
        job = mine.enqueue()
        self.worker(app, queue).run(burst=True)
        assert job.result(timeout=RESULT_WAIT) == "mine"
        assert theirs.status() is JobStatus.QUEUED

    # -- leases, timeouts, shutdown ------------------------------------------------------------

    def test_the_heartbeat_keeps_a_long_job_leased(self, app: Worq, queue: str) -> None:
        runs: list[int] = []

        @app.task(queue=queue)
        def long_job() -> str:
            runs.append(1)
            time.sleep(1.2)  # the job's own work: four leases long
            return "done"

        job = long_job.enqueue()
        worker = self.worker(app, queue, lease=0.3)
        worker.run(burst=True)
        assert job.result(timeout=RESULT_WAIT) == "done"
        assert runs == [1]
        assert worker.counters.refused == 0

    @requires(Capability.DEAD_LETTER)
    def test_an_async_task_past_its_timeout_is_cancelled_and_failed(
        self, app: Worq, queue: str
    ) -> None:
        cancelled = threading.Event()

        @app.task(queue=queue, timeout=0.2, max_retries=0)
        async def slow() -> None:
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                cancelled.set()
                raise

        job = slow.enqueue()
        self.worker(app, queue).run(burst=True)
        with pytest.raises(JobFailed) as failed:
            job.result(timeout=RESULT_WAIT)
        assert failed.value.error_type == "worq_core.errors.TaskTimeoutError"
        assert cancelled.is_set()

    def test_a_graceful_stop_lets_the_running_job_finish(self, app: Worq, queue: str) -> None:
        started, proceed = threading.Event(), threading.Event()

        @app.task(queue=queue)
        def long_job() -> str:
            started.set()
            proceed.wait(10)
            return "finished"

        job = long_job.enqueue()
        worker = self.worker(app, queue)
        returned = threading.Event()
        reasons: list[ExitReason] = []

        def run() -> None:
            reasons.append(worker.run())
            returned.set()

        thread = threading.Thread(target=run)
        thread.start()
        try:
            assert started.wait(10)
            worker.stop()
            assert not returned.wait(0.3), "run() returned while its job was still running"
            proceed.set()
            assert returned.wait(10)
        finally:
            proceed.set()
            worker.stop()
            thread.join(10)
        assert reasons == [ExitReason.STOPPED]
        assert app.broker.job_state(job.id) is None, "acked before run() returned"
        assert job.result(timeout=0) == "finished"

    def test_a_second_stop_puts_the_unfinished_job_back_with_its_attempt_counted(
        self, app: Worq, queue: str
    ) -> None:
        started, proceed = threading.Event(), threading.Event()
        attempts: list[int] = []

        @app.task(queue=queue)
        def stuck() -> None:
            attempts.append(current_job().attempt)
            started.set()
            proceed.wait(30)

        job = stuck.enqueue()
        worker = self.worker(app, queue)
        try:
            with running(worker):
                assert started.wait(10)
                worker.stop()
                worker.stop()
            assert worker.exit_reason is ExitReason.ABORTED
            assert job.status() in (JobStatus.QUEUED, JobStatus.RETRYING)
        finally:
            proceed.set()
        [delivery] = app.broker.fetch([queue], 1, lease=30, wait=5)
        assert (delivery.id, delivery.attempts) == (job.id, 2)

    def test_a_sync_timeout_fires_at_its_deadline_not_at_the_next_heartbeat(
        self, app: Worq, queue: str
    ) -> None:
        release = threading.Event()

        @app.task(queue=queue, timeout=0.2, max_retries=0)
        def stuck() -> None:
            release.wait(30)

        job = stuck.enqueue()
        worker = self.worker(app, queue, lease=60.0)  # heartbeats every 20 s
        try:
            with running(worker), pytest.raises(JobFailed):
                job.result(timeout=5)
        finally:
            release.set()

    def test_a_stuck_sync_task_retires_a_worker_that_asks_for_replacement(
        self, app: Worq, queue: str
    ) -> None:
        release = threading.Event()

        @app.task(queue=queue, timeout=0.1, max_retries=0)
        def stuck() -> None:
            release.wait(30)

        stuck.enqueue()
        worker = self.worker(app, queue, recycle_when_stuck=True)
        try:
            assert worker.run() is ExitReason.STUCK
        finally:
            release.set()

    def test_a_worker_with_max_jobs_does_that_many_then_retires(
        self, app: Worq, queue: str
    ) -> None:
        @app.task(queue=queue)
        def noop() -> None: ...

        noop.enqueue_many([() for _ in range(10)])
        worker = self.worker(app, queue, max_jobs=4, concurrency=3)
        assert worker.run() is ExitReason.MAX_JOBS
        assert worker.counters.succeeded == 4
        [stats] = app.broker.stats([queue])
        assert (stats.ready, stats.running) == (6, 0)

    def test_a_task_can_see_its_job_id_and_attempt(self, app: Worq, queue: str) -> None:
        seen: list[JobContext] = []

        @app.task(queue=queue, max_retries=1, retry=FAST_RETRY)
        def introspect() -> str:
            seen.append(current_job())
            if len(seen) == 1:
                raise RuntimeError("again")
            return current_job().id

        @app.task(queue=queue)
        async def introspect_async() -> int:
            return current_job().attempt

        job = introspect.enqueue()
        other = introspect_async.enqueue()
        self.worker(app, queue).run(burst=True)
        assert job.result(timeout=RESULT_WAIT) == job.id
        assert [(c.id, c.attempt, c.queue, c.task) for c in seen] == [
            (job.id, 1, queue, introspect.name),
            (job.id, 2, queue, introspect.name),
        ]
        assert other.result(timeout=RESULT_WAIT) == 1

    @requires(Capability.WORKER_REGISTRY)
    def test_a_running_worker_registers_itself_and_leaves_when_it_stops(
        self, app: Worq, queue: str
    ) -> None:
        worker = self.worker(app, queue, heartbeat=0.05)
        with running(worker):
            eventually(
                lambda: worker.id in {w.id for w in app.broker.workers()},
                what="the worker to register",
            )
            [info] = [w for w in app.broker.workers() if w.id == worker.id]
            assert (info.pid, info.queues, info.concurrency) == (os.getpid(), (queue,), 4)
        assert worker.id not in {w.id for w in app.broker.workers()}

    @requires(Capability.DEAD_LETTER)
    def test_a_requeued_dead_job_reports_its_new_run_not_its_old_failure(
        self, app: Worq, queue: str
    ) -> None:
        fixed = threading.Event()

        @app.task(queue=queue, max_retries=0)
        def needs_a_fix() -> str:
            if not fixed.is_set():
                raise RuntimeError("broken")
            return "fixed"

        job = needs_a_fix.enqueue()
        self.worker(app, queue).run(burst=True)
        assert job.status() is JobStatus.DEAD
        fixed.set()
        assert app.requeue_dead(queue) == 1
        assert job.status() is JobStatus.QUEUED
        with pytest.raises(TimeoutError):
            job.result(timeout=0.1)  # the old failure is no answer any more
        self.worker(app, queue).run(burst=True)
        assert job.result(timeout=RESULT_WAIT) == "fixed"

    def test_a_job_id_used_again_after_it_finished_runs_again(self, app: Worq, queue: str) -> None:
        @app.task(queue=queue)
        def echo(value: int) -> int:
            return value

        first = echo.options(job_id="nightly-report").enqueue(1)
        self.worker(app, queue).run(burst=True)
        assert first.result(timeout=RESULT_WAIT) == 1
        again = echo.options(job_id="nightly-report").enqueue(2)
        assert again.status() is JobStatus.QUEUED
        self.worker(app, queue).run(burst=True)
        assert again.result(timeout=RESULT_WAIT) == 2

    @requires(Capability.DEAD_LETTER)
    def test_a_job_id_still_dead_is_not_added_again_and_keeps_its_failure(
        self, app: Worq, queue: str
    ) -> None:
        @app.task(queue=queue, max_retries=0)
        def fails() -> None:
            raise KeyError("gone")

        job = fails.options(job_id="doomed").enqueue()
        self.worker(app, queue).run(burst=True)
        again = fails.options(job_id="doomed").enqueue()
        assert again.status() is JobStatus.DEAD
        with pytest.raises(JobFailed):
            again.result(timeout=RESULT_WAIT)
        assert app.requeue_dead(queue, [job.id, "not-dead"]) == 1

    # -- headers, ids and per-job options --------------------------------------------------

    def test_headers_reach_the_task_unchanged(self, app: Worq, queue: str) -> None:
        seen: list[dict[str, str]] = []
        headers = {"trace-id": "abc-123", "tenant": "ünïcode ✓", "empty": ""}

        @app.task(queue=queue)
        def read_headers() -> None:
            seen.append(dict(current_job().headers))

        job = read_headers.options(headers=headers).enqueue()
        read_headers.enqueue()
        self.worker(app, queue).run(burst=True)
        job.result(timeout=RESULT_WAIT)
        assert sorted(seen, key=len) == [{}, headers]

    def test_an_envelope_from_before_headers_still_runs(self, app: Worq, queue: str) -> None:
        @app.task(queue=queue)
        def old(x: int) -> int:
            return x + 1

        body = app.serializer.dumps(
            {"v": 1, "id": "old-1", "task": old.name, "args": [41], "kwargs": {}, "at": 0.0}
        )
        assert app.broker.enqueue([Message("old-1", queue, body)]) == [True]
        self.worker(app, queue).run(burst=True)
        assert app.job("old-1").result(timeout=RESULT_WAIT) == 42

    def test_a_job_id_is_unique_across_the_queues_of_an_app(self, app: Worq, queue: str) -> None:
        other = unique("contract-other")
        runs: list[str] = []

        @app.task(queue=queue)
        def once(where: str) -> str:
            runs.append(where)
            return where

        first = once.options(job_id="the-one").enqueue("first")
        second = once.options(job_id="the-one", queue=other).enqueue("second")
        assert second.id == first.id
        self.worker(app, queue).run(burst=True)
        self.worker(app, other).run(burst=True)
        assert runs == ["first"]
        assert second.result(timeout=RESULT_WAIT) == "first"

    @requires(Capability.DEAD_LETTER)
    def test_per_enqueue_options_override_the_tasks_own(self, app: Worq, queue: str) -> None:
        attempts: list[int] = []

        @app.task(queue=queue, max_retries=5, retry=FAST_RETRY)
        def flaky() -> None:
            attempts.append(current_job().attempt)
            raise RuntimeError("always")

        job = flaky.options(max_retries=1).enqueue()
        self.worker(app, queue).run(burst=True)
        assert job.status() is JobStatus.DEAD
        assert attempts == [1, 2]

    def test_a_timeout_given_at_enqueue_fails_a_slow_run(self, app: Worq, queue: str) -> None:
        @app.task(queue=queue, max_retries=0)
        async def slow() -> None:
            await asyncio.sleep(30)

        job = slow.options(timeout=0.1).enqueue()
        self.worker(app, queue).run(burst=True)
        with pytest.raises(JobFailed) as failed:
            job.result(timeout=RESULT_WAIT)
        assert failed.value.error_type == "worq_core.errors.TaskTimeoutError"

    # -- retry control by exception ----------------------------------------------------------

    @requires(Capability.DEAD_LETTER)
    def test_reject_dead_letters_at_once_with_retries_left(self, app: Worq, queue: str) -> None:
        runs: list[int] = []

        @app.task(queue=queue, max_retries=5, retry=FAST_RETRY)
        def picky() -> None:
            runs.append(1)
            raise Reject("bad input")

        job = picky.enqueue()
        self.worker(app, queue).run(burst=True)
        assert (job.status(), len(runs)) == (JobStatus.DEAD, 1)
        with pytest.raises(JobFailed) as failed:
            job.result(timeout=RESULT_WAIT)
        assert failed.value.message == "bad input"

    @requires(Capability.DELAYED)
    def test_retry_asks_for_a_retry_after_its_own_delay(self, app: Worq, queue: str) -> None:
        times: list[float] = []

        @app.task(queue=queue, max_retries=2, retry=RetryPolicy(base=60.0, jitter=False))
        def later() -> str:
            times.append(time.time())
            if len(times) == 1:
                raise Retry(delay=0.3)
            return "done"

        job = later.enqueue()
        self.worker(app, queue).run(burst=True)
        assert job.result(timeout=RESULT_WAIT) == "done"
        assert times[1] - times[0] >= 0.3 - CLOCK_SLACK

    @requires(Capability.DEAD_LETTER)
    def test_only_the_exceptions_named_in_retry_on_are_retried(self, app: Worq, queue: str) -> None:
        runs: dict[str, int] = {}

        @app.task(queue=queue, max_retries=3, retry=FAST_RETRY, retry_on=(OSError,))
        def io(kind: str) -> None:
            runs[kind] = runs.get(kind, 0) + 1
            raise (ConnectionError if kind == "io" else ValueError)(kind)

        @app.task(queue=queue, max_retries=3, retry=FAST_RETRY, dont_retry_on=(KeyError,))
        def lookup() -> None:
            runs["lookup"] = runs.get("lookup", 0) + 1
            raise KeyError("missing")

        jobs = [io.enqueue("io"), io.enqueue("value"), lookup.enqueue()]
        self.worker(app, queue).run(burst=True)
        assert [j.status() for j in jobs] == [JobStatus.DEAD] * 3
        assert runs == {"io": 4, "value": 1, "lookup": 1}

    # -- cancel and progress -----------------------------------------------------------------

    @requires(Capability.CANCEL)
    def test_a_cancelled_queued_job_never_runs_and_ends_cancelled(
        self, app: Worq, queue: str
    ) -> None:
        runs: list[int] = []

        @app.task(queue=queue)
        def work() -> None:
            runs.append(1)

        job = work.enqueue()
        assert job.cancel() is True
        assert job.status() is JobStatus.CANCELLED
        self.worker(app, queue).run(burst=True)
        assert runs == []
        with pytest.raises(JobCancelled):
            job.result(timeout=RESULT_WAIT)
        assert job.cancel() is False, "a cancelled job cannot be cancelled again"

    @requires(Capability.CANCEL, Capability.DELAYED)
    def test_a_scheduled_job_can_be_cancelled(self, app: Worq, queue: str) -> None:
        @app.task(queue=queue)
        def later() -> None:
            pass

        job = later.options(delay=60).enqueue()
        assert job.status() is JobStatus.SCHEDULED
        assert job.cancel() is True
        assert job.status() is JobStatus.CANCELLED

    @requires(Capability.CANCEL)
    def test_cancelling_a_finished_job_returns_false_and_keeps_its_result(
        self, app: Worq, queue: str
    ) -> None:
        @app.task(queue=queue)
        def done() -> int:
            return 7

        job = done.enqueue()
        self.worker(app, queue).run(burst=True)
        assert job.result(timeout=RESULT_WAIT) == 7
        assert job.cancel() is False
        assert (job.status(), job.result(timeout=0)) == (JobStatus.SUCCEEDED, 7)
        assert app.cancel("never-enqueued") is False

    @requires(Capability.CANCEL)
    def test_a_running_sync_job_sees_cancelled_and_is_never_retried(
        self, app: Worq, queue: str
    ) -> None:
        started = threading.Event()
        runs: list[int] = []

        @app.task(queue=queue, max_retries=3, retry=FAST_RETRY)
        def cooperative() -> None:
            runs.append(1)
            started.set()
            deadline = time.monotonic() + RESULT_WAIT
            while not current_job().cancelled and time.monotonic() < deadline:
                time.sleep(0.01)
            raise RuntimeError("stopped because I was cancelled")

        job = cooperative.enqueue()
        with running(self.worker(app, queue, heartbeat=0.05)):
            assert started.wait(RESULT_WAIT)
            assert job.cancel() is True
            with pytest.raises(JobCancelled):
                job.result(timeout=RESULT_WAIT)
        assert job.status() is JobStatus.CANCELLED
        assert runs == [1], "a cancelled job is never retried"

    @requires(Capability.CANCEL)
    def test_a_running_async_job_gets_cancelled_error_at_its_next_await(
        self, app: Worq, queue: str
    ) -> None:
        started, interrupted = threading.Event(), threading.Event()

        @app.task(queue=queue)
        async def waits() -> None:
            started.set()
            try:
                await asyncio.sleep(RESULT_WAIT)
            except asyncio.CancelledError:
                interrupted.set()
                raise

        job = waits.enqueue()
        with running(self.worker(app, queue, heartbeat=0.05)):
            assert started.wait(RESULT_WAIT)
            assert job.cancel() is True
            with pytest.raises(JobCancelled):
                job.result(timeout=RESULT_WAIT)
        assert interrupted.is_set()

    @requires(Capability.PROGRESS)
    def test_progress_is_visible_from_another_handle_while_the_job_runs(
        self, app: Worq, queue: str
    ) -> None:
        reported, finish = threading.Event(), threading.Event()

        @app.task(queue=queue)
        def long() -> str:
            current_job().progress(30, "copying", total=120)
            reported.set()
            finish.wait(RESULT_WAIT)
            return "done"

        job = long.enqueue()
        with running(self.worker(app, queue, heartbeat=0.05)):
            assert reported.wait(RESULT_WAIT)
            other = app.job(job.id)
            eventually(lambda: other.progress() is not None, what="progress to be published")
            progress = other.progress()
            assert progress is not None
            assert (progress.current, progress.total, progress.message) == (30, 120, "copying")
            assert progress.fraction == 0.25
            finish.set()
            assert job.result(timeout=RESULT_WAIT) == "done"
        assert job.progress() is None

    @requires(Capability.CANCEL)
    def test_a_job_cancelled_just_before_it_fails_ends_cancelled_not_retried(
        self, app: Worq, queue: str
    ) -> None:
        started, cancelled = threading.Event(), threading.Event()
        runs: list[int] = []

        @app.task(queue=queue, max_retries=3, retry=FAST_RETRY)
        def fails_soon() -> None:
            runs.append(1)
            started.set()
            assert cancelled.wait(RESULT_WAIT)
            raise RuntimeError("failed before the worker heard of the cancellation")

        job = fails_soon.enqueue()
        # The heartbeat is far away: the failure, not a renewal, is the first to settle.
        with running(self.worker(app, queue, heartbeat=30.0)):
            assert started.wait(RESULT_WAIT)
            assert job.cancel() is True
            cancelled.set()
            with pytest.raises(JobCancelled):
                job.result(timeout=RESULT_WAIT)
        assert runs == [1]

    @requires(Capability.CANCEL)
    def test_a_cancelled_job_put_back_at_shutdown_never_runs_again(
        self, app: Worq, queue: str
    ) -> None:
        started, release = threading.Event(), threading.Event()
        runs: list[int] = []

        @app.task(queue=queue, max_retries=3)
        def ignores_cancel() -> None:
            runs.append(1)
            started.set()
            release.wait(RESULT_WAIT)  # never looks at current_job().cancelled

        job = ignores_cancel.enqueue()
        worker = self.worker(app, queue, heartbeat=0.05, grace=0.2)
        try:
            with running(worker):
                assert started.wait(RESULT_WAIT)
                assert job.cancel() is True
        finally:
            release.set()
        assert worker.exit_reason is ExitReason.ABORTED, "the grace period ran out"
        self.worker(app, queue).run(burst=True)
        with pytest.raises(JobCancelled):
            job.result(timeout=RESULT_WAIT)
        assert runs == [1], "put back as a retry, it still ended cancelled without a second run"

    # -- limits, unique jobs and schedules, through real workers -----------------------------

    @requires(Capability.LIMITS)
    def test_a_limited_task_does_not_hold_up_the_unlimited_jobs_behind_it(
        self, app: Worq, queue: str
    ) -> None:
        release = threading.Event()
        lock = threading.Lock()
        running_now: list[int] = []
        most = [0]

        @app.task(queue=queue, concurrency=1)
        def limited(n: int) -> int:
            with lock:
                running_now.append(n)
                most[0] = max(most[0], len(running_now))
            release.wait(RESULT_WAIT)
            with lock:
                running_now.remove(n)
            return n

        @app.task(queue=queue)
        def unlimited(n: int) -> int:
            return n

        # Limited jobs at the head of the queue, unlimited ones behind them.
        held = limited.enqueue_many([(i,) for i in range(3)])
        free = unlimited.enqueue_many([(i,) for i in range(6)])
        with running(self.worker(app, queue, concurrency=3)):
            # One limited job runs; the other two are set aside without taking a slot, so the
            # two free slots run every unlimited job while the first limited one still runs.
            assert [job.result(timeout=RESULT_WAIT) for job in free] == list(range(6))
            assert not release.is_set()
            with lock:
                assert len(running_now) == 1
            release.set()
            assert sorted(job.result(timeout=RESULT_WAIT) for job in held) == [0, 1, 2]
        assert most[0] == 1

    @requires(Capability.LIMITS)
    def test_a_rate_limited_task_starts_no_faster_than_its_rate(
        self, app: Worq, queue: str
    ) -> None:
        started: list[float] = []

        @app.task(queue=queue, rate_limit="5/s", rate_burst=2)
        def call(n: int) -> None:
            started.append(time.time())

        jobs = call.enqueue_many([(i,) for i in range(5)])
        with running(self.worker(app, queue, concurrency=4)):
            for job in jobs:
                job.result(timeout=RESULT_WAIT)
        started.sort()
        # A burst of two at once, then one every 0.2 s: five jobs take at least 0.6 s.
        assert started[-1] - started[0] >= 0.6 - CLOCK_SLACK
        for n in range(2, 5):
            assert started[n] - started[0] >= (n - 1) * 0.2 - CLOCK_SLACK

    @requires(Capability.UNIQUE)
    def test_an_equal_job_sent_while_one_runs_gets_the_running_jobs_handle(
        self, app: Worq, queue: str
    ) -> None:
        started, release = threading.Event(), threading.Event()

        @app.task(queue=queue, unique=True)
        def rebuild(index: str) -> str:
            started.set()
            release.wait(RESULT_WAIT)
            return index

        first = rebuild.enqueue("users")
        with running(self.worker(app, queue)):
            assert started.wait(RESULT_WAIT)
            assert rebuild.enqueue("users").id == first.id
            release.set()
            assert first.result(timeout=RESULT_WAIT) == "users"
            eventually(lambda: rebuild.enqueue("users").id != first.id, what="the key to free")

    @requires(Capability.SCHEDULES)
    def test_two_workers_fire_each_tick_of_a_schedule_once(self, app: Worq, queue: str) -> None:
        fired: list[str] = []
        lock = threading.Lock()

        @app.periodic(every=0.2, queue=queue, name=unique("beat"))
        def beat() -> None:
            with lock:
                fired.append(current_job().headers["worq-tick"])

        with running(self.worker(app, queue)), running(self.worker(app, queue)):
            eventually(lambda: len(fired) >= 5, timeout=RESULT_WAIT, what="five ticks")
        ticks = [float(t) for t in fired]
        assert len(set(ticks)) == len(ticks), f"a tick fired twice: {sorted(ticks)}"
        assert all(round(t / 0.2, 6) == round(t / 0.2) for t in ticks)
