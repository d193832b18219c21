from __future__ import annotations

import random
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import pytest

from worq_core import (
    BrokerConnectionError,
    BrokerError,
    Delivery,
    ExitReason,
    JobFailed,
    JobStatus,
    LeaseState,
    Settlement,
    StorageConnectionError,
    WorkerSettings,
    Worq,
)
from worq_core.serializers import MsgpackSerializer
from worq_core.testing.support import eventually, running
from worq_core.worker import resident_memory
from worq_memory import MemoryBroker, MemoryStorage


class OutageBroker(MemoryBroker):
    """A memory broker whose worker-side calls fail while ``down`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.down = threading.Event()
        self.failures = 0

    def _check(self) -> None:
        if self.down.is_set():
            self.failures += 1
            raise BrokerConnectionError(self.url, "connection refused (simulated)")

    def settle_and_fetch(
        self,
        settlements: Sequence[Settlement],
        queues: Sequence[str],
        limit: int,
        *,
        lease: float,
        wait: float,
    ) -> tuple[list[bool], list[Delivery]]:
        self._check()
        return super().settle_and_fetch(
            settlements, queues, limit, lease=lease, wait=min(wait, 0.05)
        )

    def settle(self, settlements: Sequence[Settlement]) -> list[bool]:
        self._check()
        return super().settle(settlements)


class FlakyStorage(MemoryStorage):
    """Fails the first ``failures`` saves."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures

    def save(self, records: Mapping[str, bytes], ttl: float) -> None:
        if self.failures:
            self.failures -= 1
            raise StorageConnectionError(self.url, "simulated outage")
        super().save(records, ttl)


def settings(**overrides: Any) -> WorkerSettings:
    return WorkerSettings(**({"idle_wait": 0.05, "handle_signals": False} | overrides))


def test_a_worker_rides_out_a_broker_outage_and_finishes_the_job() -> None:
    broker = OutageBroker()
    app = Worq(broker)
    started, proceed = threading.Event(), threading.Event()

    @app.task
    def job() -> str:
        started.set()
        proceed.wait(10)
        return "done"

    handle = job.enqueue()
    worker = app.worker(settings=settings())
    with running(worker):
        assert started.wait(10)
        broker.down.set()  # the job finishes while the broker is unreachable
        proceed.set()
        eventually(lambda: broker.failures >= 3, what="the worker to hit the outage")
        broker.down.clear()
        assert handle.result(timeout=10) == "done"
    assert broker.failures > 0
    assert broker.stats(["default"])[0].running == 0, "the settlement was retried and applied"


def test_a_result_that_cannot_be_stored_is_not_acked_so_the_job_runs_again() -> None:
    app = Worq(MemoryBroker(), storage=FlakyStorage(failures=1))
    runs: list[int] = []

    @app.task
    def job() -> int:
        runs.append(1)
        return len(runs)

    handle = job.enqueue()
    app.worker(settings=settings(lease=0.3)).run(burst=True)
    assert handle.result(timeout=5) == 2
    assert len(runs) == 2


class IncompatibleBroker(MemoryBroker):
    """A broker that can never work (say its database schema is too old)."""

    fetched = False

    def verify(self) -> None:
        raise BrokerError("schema too old: run the migration")

    def fetch(self, *args: Any, **kwargs: Any) -> list[Delivery]:
        self.fetched = True
        return super().fetch(*args, **kwargs)


def test_a_worker_refuses_to_start_on_a_broker_that_fails_its_check() -> None:
    broker = IncompatibleBroker()
    app = Worq(broker)

    @app.task
    def job() -> None: ...

    handle = job.enqueue()
    with pytest.raises(BrokerError, match="schema too old"):
        app.worker(settings=settings()).run(burst=True)
    assert not broker.fetched
    assert handle.status() is JobStatus.QUEUED, "the job waits for a worker that can run it"


def test_worker_settings_refuse_nonsense() -> None:
    with pytest.raises(ValueError, match="concurrency"):
        WorkerSettings(concurrency=0)
    with pytest.raises(ValueError, match="queue"):
        WorkerSettings(queues=())
    with pytest.raises(ValueError, match="lease"):
        WorkerSettings(lease=0)


def test_weights_order_queues_in_proportion() -> None:
    weighted = WorkerSettings(queues=("high", "low"), weights=(3, 1))
    rng = random.Random(1)
    firsts = [weighted.fetch_order(rng)[0] for _ in range(4000)]
    assert 0.7 < firsts.count("high") / len(firsts) < 0.8
    assert sorted(weighted.fetch_order(rng)) == ["high", "low"]
    assert WorkerSettings(queues=("a", "b")).fetch_order(rng) == ("a", "b")
    with pytest.raises(ValueError, match="weight"):
        WorkerSettings(queues=("a", "b"), weights=(1,))


def test_a_worker_over_its_memory_limit_retires() -> None:
    app = Worq("memory://")
    worker = app.worker(settings=settings(max_memory=1, heartbeat=0.05))
    assert worker.run() is ExitReason.MAX_MEMORY
    assert resident_memory() > 1


def test_an_unexpected_broker_bug_does_not_kill_the_heartbeat() -> None:
    class BuggyExtend(MemoryBroker):
        calls = 0

        def extend(
            self,
            deliveries: Sequence[Delivery],
            lease: float,
            progress: Mapping[str, bytes] | None = None,
        ) -> list[LeaseState]:
            BuggyExtend.calls += 1
            if BuggyExtend.calls == 1:
                raise OSError("plugin bug")
            return super().extend(deliveries, lease, progress)

    app = Worq(BuggyExtend())
    runs: list[int] = []

    @app.task
    def slow() -> str:
        runs.append(1)
        threading.Event().wait(0.6)  # the job's own work: several leases long
        return "ok"

    job = slow.enqueue()
    app.worker(settings=settings(lease=0.25, heartbeat=0.05)).run(burst=True)
    assert job.result(timeout=5) == "ok"
    assert runs == [1]
    assert BuggyExtend.calls > 2


def test_an_exception_that_cannot_even_print_itself_is_dead_lettered() -> None:
    class Unprintable(Exception):
        def __str__(self) -> str:
            raise RuntimeError("no")

    app = Worq("memory://")

    @app.task(max_retries=0)
    def bad() -> None:
        raise Unprintable

    job = bad.enqueue()
    app.worker(settings=settings(lease=0.5)).run(burst=True)
    with pytest.raises(JobFailed, match=r"<unprintable .*Unprintable>"):
        job.result(timeout=5)


def test_a_storage_failing_with_its_own_exception_type_does_not_strand_the_job() -> None:
    class OddStorage(MemoryStorage):
        failures = 1

        def save(self, records: Mapping[str, bytes], ttl: float) -> None:
            if OddStorage.failures:
                OddStorage.failures -= 1
                raise ConnectionResetError("plugin forgot to wrap this")
            super().save(records, ttl)

    app = Worq(MemoryBroker(), storage=OddStorage())
    runs: list[int] = []

    @app.task
    def job() -> int:
        runs.append(1)
        return len(runs)

    handle = job.enqueue()
    app.worker(settings=settings(lease=0.3, concurrency=1)).run(burst=True)
    assert handle.result(timeout=5) == 2


def test_an_abandoned_thread_retires_itself_and_the_others_keep_serving() -> None:
    app = Worq("memory://")
    release = threading.Event()

    @app.task(timeout=0.2, max_retries=0)
    def stuck() -> None:
        release.wait(30)

    @app.task(timeout=2.0)
    def quick(i: int) -> int:
        threading.Event().wait(0.05)  # a little work
        return i

    try:
        stuck.enqueue()
        jobs = quick.enqueue_many([(i,) for i in range(8)])
        app.worker(settings=settings(concurrency=2)).run(burst=True)
        assert [j.result(timeout=5) for j in jobs] == list(range(8)), "none timed out"
    finally:
        release.set()


def test_a_graceful_stop_waits_for_a_result_that_is_still_being_stored() -> None:
    saving = threading.Event()

    class SlowStorage(MemoryStorage):
        def save(self, records: Mapping[str, bytes], ttl: float) -> None:
            saving.set()
            threading.Event().wait(0.5)  # a slow network write
            super().save(records, ttl)

    app = Worq(MemoryBroker(), storage=SlowStorage())

    @app.task
    def answer() -> int:
        return 42

    job = answer.enqueue()
    worker = app.worker(settings=settings())
    with running(worker):
        assert saving.wait(5)
        worker.stop()
    assert worker.exit_reason is ExitReason.STOPPED
    assert app.broker.job_state(job.id) is None, "acked, not left to run again"
    assert job.result(timeout=0) == 42


def test_one_stop_during_a_retirement_is_still_graceful() -> None:
    app = Worq("memory://")
    started, proceed = threading.Event(), threading.Event()

    @app.task
    def long_job() -> str:
        started.set()
        proceed.wait(10)
        return "done"

    job = long_job.enqueue()
    worker = app.worker(settings=settings(max_memory=1, heartbeat=0.05))
    with running(worker):
        assert started.wait(5)
        eventually(lambda: worker.exit_reason is ExitReason.MAX_MEMORY, what="the retirement")
        worker.stop()  # e.g. the supervisor forwarding a SIGTERM
        proceed.set()
    assert worker.exit_reason is ExitReason.MAX_MEMORY
    assert job.result(timeout=5) == "done"


def test_a_worker_at_its_job_limit_waits_without_spinning() -> None:
    class Counting(MemoryBroker):
        calls = 0

        def settle_and_fetch(self, *args: Any, **kwargs: Any) -> tuple[list[bool], list[Delivery]]:
            Counting.calls += 1
            return super().settle_and_fetch(*args, **kwargs)

    app = Worq(Counting())

    @app.task
    def slow() -> None:
        threading.Event().wait(0.5)

    slow.enqueue_many([(), ()])
    worker = app.worker(settings=settings(max_jobs=1))
    assert worker.run() is ExitReason.MAX_JOBS
    assert Counting.calls < 20


def test_a_run_whose_lease_was_lost_does_not_store_its_result() -> None:
    class LosesTheFirstLease(MemoryBroker):
        lost = False

        def extend(
            self,
            deliveries: Sequence[Delivery],
            lease: float,
            progress: Mapping[str, bytes] | None = None,
        ) -> list[LeaseState]:
            if deliveries and not LosesTheFirstLease.lost:
                LosesTheFirstLease.lost = True
                return [LeaseState.LOST] * len(deliveries)
            return super().extend(deliveries, lease, progress)

    app = Worq(LosesTheFirstLease())
    runs: list[int] = []

    @app.task
    def job() -> str:
        runs.append(1)
        threading.Event().wait(0.3)  # a few heartbeats long
        return f"run {len(runs)}"

    handle = job.enqueue()
    app.worker(settings=settings(lease=1.0, heartbeat=0.05, concurrency=1)).run(burst=True)
    assert handle.result(timeout=5) == "run 2"
    assert len(runs) == 2


@pytest.mark.parametrize("concurrency", [1, 2])
def test_a_serializer_failing_with_its_own_error_type_dead_letters_the_job(
    concurrency: int,
) -> None:
    class Picky(MsgpackSerializer):
        def loads(self, data: bytes) -> Any:
            value = super().loads(data)
            if isinstance(value, list) and value[3:4] == [["poison"]]:  # an envelope's args
                raise RuntimeError("plugin bug")
            return value

    app = Worq(MemoryBroker(), storage=MemoryStorage(), serializer=Picky())

    @app.task
    def echo(text: str) -> str:
        return text

    before, poison, after = echo.enqueue("a"), echo.enqueue("poison"), echo.enqueue("b")
    app.worker(settings=settings(concurrency=concurrency)).run(burst=True)
    assert (before.result(timeout=5), after.result(timeout=5)) == ("a", "b")
    assert poison.status() is JobStatus.DEAD


def test_an_event_loop_runs_only_once_an_async_task_comes() -> None:
    app = Worq()
    threads: dict[str, bool] = {}

    def loop_running() -> bool:
        return any(t.name == "worq-asyncio" for t in threading.enumerate())

    @app.task
    def sync_job() -> None:
        threads["sync"] = loop_running()

    async def async_job() -> str:
        threads["async"] = loop_running()
        return "awaited"

    sync_job.enqueue()
    worker = app.worker(settings=settings())
    with running(worker):
        eventually(lambda: "sync" in threads, what="the sync job")
        registered_late = app.task(async_job)  # a worker of sync tasks meets an async one
        job = registered_late.enqueue()
        assert job.result(timeout=5) == "awaited"
    assert threads == {"sync": False, "async": True}
