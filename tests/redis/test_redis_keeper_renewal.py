"""How the lease keeper renews on real Redis: by worker, started with the first jobs, or not at all.

Workers run in this process (on a thread) with the keeper as their child process, built from
``broker_factory``. A task that holds the GIL starves every thread of the worker, so only the
keeper can renew its lease; a broker whose own ``extend`` renews nothing plays the worker's
thread when a case needs it out of the way without holding the GIL.
"""

from __future__ import annotations

import functools
import multiprocessing
import threading
import time
from collections.abc import Callable, Mapping, Sequence

import pytest
from redis_support import Runtime
from test_redis_runtime import hold_the_gil

from worq_core import (
    BrokerConnectionError,
    Delivery,
    LeaseState,
    Settlement,
    StorageConnectionError,
    Task,
    Worker,
    WorkerSettings,
    Worq,
    current_job,
)
from worq_core.lease_keeper import LeaseKeeper
from worq_core.models import Capability
from worq_core.testing.support import running
from worq_redis import RedisBroker, RedisStorage


class HandOffBroker(RedisBroker):
    """worq-redis as a third-party broker written before WORKER_LEASES: the keeper is told each
    lease, and the worker never passes ``worker`` (its fetches do not take it)."""

    capabilities = RedisBroker.capabilities - {Capability.WORKER_LEASES}

    def settle_and_fetch(  # type: ignore[override]
        self,
        settlements: Sequence[Settlement],
        queues: Sequence[str],
        limit: int,
        *,
        lease: float,
        wait: float,
    ) -> tuple[list[bool], list[Delivery]]:
        return super().settle_and_fetch(settlements, queues, limit, lease=lease, wait=wait)


class IdleExtendBroker(RedisBroker):
    """A broker whose ``extend`` claims to renew and does nothing: the worker's thread renews
    nothing, so a lease that lives on was renewed by the keeper."""

    def extend(
        self,
        deliveries: Sequence[Delivery],
        lease: float,
        progress: Mapping[str, bytes] | None = None,
    ) -> list[LeaseState]:
        return [LeaseState.HELD for _ in deliveries]


def _unbuildable() -> RedisBroker:
    raise RuntimeError("no broker for the keeper")


def _logged(caplog: pytest.LogCaptureFixture, text: str, timeout: float = 30.0) -> None:
    """Wait until the worker logs a line containing ``text``."""
    deadline = time.monotonic() + timeout
    while not any(text in message for message in caplog.messages):
        assert time.monotonic() < deadline, f"{text!r} never logged: {caplog.messages}"
        time.sleep(0.02)


def _warm_task(app: Worq) -> Task[[], None]:
    """A no-op task on the keeper queue: its job makes a worker start its lease keeper."""

    @app.task(name="warm", queue="keeper")
    def warm() -> None:
        return None

    return warm


def _keeper_started(warm: Task[[], None], caplog: pytest.LogCaptureFixture, how: str = "") -> None:
    """Run one job (the keeper starts with a worker's first jobs) and wait until it renews."""
    assert warm.enqueue().result(timeout=30) is None
    _logged(caplog, f"leases renewed by a separate process{how}")


@pytest.fixture
def hand_offs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The job ids of the leases the worker hands its keeper as it fetches them.

    That is, ``LeaseKeeper.hold`` called from any thread but the services' (whose heartbeat
    tells the keeper what the worker holds, so that it can report lost leases).
    """
    told: list[str] = []
    hold = LeaseKeeper.hold

    def spy(
        keeper: LeaseKeeper,
        deliveries: Sequence[Delivery],
        progress: Mapping[str, bytes],
        owner: str | None = None,
    ) -> dict[str, LeaseState] | None:
        if threading.current_thread().name != "worq-services":
            told.extend(d.id for d in deliveries)
        return hold(keeper, deliveries, progress, owner)

    monkeypatch.setattr(LeaseKeeper, "hold", spy)
    return told


def _settings(runtime: Runtime, broker: type[RedisBroker], **options: object) -> WorkerSettings:
    base: dict[str, object] = {
        "queues": ("keeper",),
        "concurrency": 1,
        "lease": 0.8,
        "heartbeat": 0.2,
        "idle_wait": 0.1,
        "handle_signals": False,
        "isolated_heartbeat": True,
        "broker_factory": functools.partial(broker, runtime.url),
    }
    base.update(options)
    return WorkerSettings(**base)  # type: ignore[arg-type]


@pytest.mark.timeout(90)
@pytest.mark.parametrize("broker", [RedisBroker, HandOffBroker], ids=["by-worker", "hand-off"])
def test_a_job_holding_the_gil_from_its_start_keeps_its_lease_through_the_keeper(
    runtime: Runtime,
    broker: type[RedisBroker],
    caplog: pytest.LogCaptureFixture,
    hand_offs: list[str],
) -> None:
    caplog.set_level("INFO", logger="worq.worker")
    app = Worq(broker(runtime.url), storage=RedisStorage(runtime.url))
    runs: list[int] = []
    done = threading.Event()

    @app.task(name="hog", queue="keeper")
    def hog() -> str:
        runs.append(current_job().attempt)
        if current_job().attempt == 1:
            hold_the_gil(2.5)  # three leases long: no thread of the worker runs meanwhile
        done.set()
        return "done"

    warm = _warm_task(app)
    worker = Worker(app, _settings(runtime, broker))
    with running(worker):
        _keeper_started(warm, caplog)
        job = hog.enqueue()
        assert job.result(timeout=30) == "done"
        assert done.wait(10)
        handed_off = job.id in hand_offs
    assert runs == [1], "the job ran twice: nobody renewed its lease"
    assert worker.counters.refused == 0
    if broker is RedisBroker:
        assert not handed_off, "by worker, the keeper needs no word of a new lease"
    else:
        assert handed_off, "a keeper renewing what it is told must be told before the job runs"


def _keepers() -> list[str]:
    return [p.name for p in multiprocessing.active_children() if p.name == "worq-lease-keeper"]


@pytest.mark.timeout(90)
def test_the_keeper_starts_with_the_workers_first_jobs_not_with_the_worker(
    runtime: Runtime, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="worq.worker")
    app = Worq(RedisBroker(runtime.url), storage=RedisStorage(runtime.url))
    warm = _warm_task(app)
    worker = Worker(app, _settings(runtime, RedisBroker))
    with running(worker):
        time.sleep(1.0)  # five heartbeats and ten empty fetches
        assert not _keepers(), "a worker with no job to renew started a keeper"
        _keeper_started(warm, caplog, " (by worker)")
        assert _keepers() == ["worq-lease-keeper"]
    assert not _keepers(), "the keeper outlived its worker"


@pytest.mark.timeout(90)
def test_a_keeper_started_with_the_first_jobs_renews_them_once_it_is_ready(
    runtime: Runtime, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="worq.worker")
    app = Worq(IdleExtendBroker(runtime.url), storage=RedisStorage(runtime.url))
    runs: list[int] = []
    started: list[float] = []

    @app.task(name="slow", queue="keeper")
    def slow() -> str:
        runs.append(current_job().attempt)
        started.append(time.time())
        time.sleep(6.0)  # two leases long; the worker's own renewals do nothing
        return "done"

    job = slow.enqueue()  # there before the worker: its first fetch takes it at once
    worker = Worker(app, _settings(runtime, RedisBroker, lease=3.0, heartbeat=0.5))
    with running(worker):
        assert job.result(timeout=60) == "done"
    [ready] = [r.created for r in caplog.records if "by a separate process" in r.getMessage()]
    assert started[0] < ready, "the worker waited for its keeper before fetching"
    assert runs == [1], "the job fetched before the keeper was ready lost its lease"
    assert worker.counters.refused == 0


class FailsOnceIdleBroker(RedisBroker):
    """Once ``fail`` is set, the next fetch fails before it reaches Redis (nothing leased): the
    worker fetches under a new owner id from then on."""

    fail = threading.Event()
    failed = threading.Event()

    def settle_and_fetch(
        self,
        settlements: Sequence[Settlement],
        queues: Sequence[str],
        limit: int,
        *,
        lease: float,
        wait: float,
        worker: str | None = None,
    ) -> tuple[list[bool], list[Delivery]]:
        if self.fail.is_set() and not self.failed.is_set():
            self.failed.set()
            raise BrokerConnectionError(self.url, "simulated outage")
        # Short blocking fetches: the idle worker reaches the failing fetch soon after `fail`.
        return super().settle_and_fetch(
            settlements, queues, limit, lease=lease, wait=min(wait, 0.1), worker=worker
        )


@pytest.mark.timeout(90)
@pytest.mark.parametrize("idle_failure", [False, True], ids=["first-fetch", "after-a-failed-fetch"])
def test_a_first_job_holding_the_gil_keeps_its_lease_through_a_keeper_started_with_it(
    runtime: Runtime, idle_failure: bool
) -> None:
    # No warm-up: the keeper is spawned as the hog is fetched and must renew it, under the owner
    # id the fetch used (a fetch that failed while the worker idled moved it on), within a lease.
    FailsOnceIdleBroker.fail.clear()
    FailsOnceIdleBroker.failed.clear()
    app = Worq(FailsOnceIdleBroker(runtime.url), storage=RedisStorage(runtime.url))
    runs: list[int] = []

    @app.task(name="hog", queue="keeper")
    def hog() -> str:
        runs.append(current_job().attempt)
        if current_job().attempt == 1:
            hold_the_gil(7.0)  # over two leases: only the keeper can renew it
        return "done"

    worker = Worker(app, _settings(runtime, RedisBroker, lease=3.0, heartbeat=0.5))
    with running(worker):
        if idle_failure:
            FailsOnceIdleBroker.fail.set()
            assert FailsOnceIdleBroker.failed.wait(10)
        job = hog.enqueue()
        assert job.result(timeout=60) == "done"
    assert runs == [1], "the first job lost its lease: the keeper renewed another owner's record"
    assert worker.counters.refused == 0


def _unpicklable_factory(url: str) -> Callable[[], RedisBroker]:
    return lambda: RedisBroker(url)  # spawn cannot pickle it: starting the process fails


@pytest.mark.timeout(90)
@pytest.mark.parametrize("where", ["in-the-keeper", "at-spawn"])
def test_a_worker_whose_keeper_fails_to_start_renews_from_its_thread(
    runtime: Runtime, caplog: pytest.LogCaptureFixture, where: str
) -> None:
    caplog.set_level("INFO", logger="worq.worker")
    app = Worq(RedisBroker(runtime.url), storage=RedisStorage(runtime.url))
    runs: list[int] = []

    @app.task(name="sleeper", queue="keeper")
    def sleeper() -> str:
        runs.append(current_job().attempt)
        time.sleep(2.0)  # leases long, and the GIL free for the worker's thread
        return "done"

    if where == "in-the-keeper":
        factory, why = _unbuildable, "no broker for the keeper"
    else:
        factory, why = _unpicklable_factory(runtime.url), "the lease keeper failed to start"
    worker = Worker(app, _settings(runtime, RedisBroker, broker_factory=factory))
    with running(worker):
        job = sleeper.enqueue()  # the keeper starts (and fails) with it
        _logged(caplog, "leases renewed by a thread")
        assert job.result(timeout=30) == "done"
    assert any(why in m for m in caplog.messages)
    assert runs == [1]
    assert worker.counters.refused == 0


@pytest.mark.timeout(90)
def test_progress_and_cancellation_pass_through_a_keeper_renewing_by_worker(
    runtime: Runtime, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="worq.worker")
    app = Worq(IdleExtendBroker(runtime.url), storage=RedisStorage(runtime.url))
    reported, stopped = threading.Event(), threading.Event()

    @app.task(name="long", queue="keeper")
    def long() -> None:
        current_job().progress(0.5, "halfway")
        reported.set()
        while not current_job().cancelled:  # the keeper's renewal brings the cancellation
            time.sleep(0.05)
        stopped.set()

    # The worker's own extend renews and publishes nothing: only the keeper can.
    warm = _warm_task(app)
    worker = Worker(app, _settings(runtime, RedisBroker, lease=3.0, heartbeat=0.3))
    with running(worker):
        _keeper_started(warm, caplog, " (by worker)")
        job = long.enqueue()
        assert reported.wait(10)
        deadline = time.monotonic() + 10
        while (progress := job.progress()) is None:
            assert time.monotonic() < deadline, "the progress never reached the broker"
            time.sleep(0.05)
        assert (progress.current, progress.message) == (0.5, "halfway")
        job.cancel()
        assert stopped.wait(10), "the cancellation never reached the task"


class LostReplyBroker(RedisBroker):
    """Once ``lose_next`` is set, the next fetch that leases jobs loses its answer on the way
    back (as a connection cut after the script ran): the jobs are leased, the worker never
    hears of them."""

    lose_next = threading.Event()

    def settle_and_fetch(
        self,
        settlements: Sequence[Settlement],
        queues: Sequence[str],
        limit: int,
        *,
        lease: float,
        wait: float,
        worker: str | None = None,
    ) -> tuple[list[bool], list[Delivery]]:
        applied, deliveries = super().settle_and_fetch(
            settlements, queues, limit, lease=lease, wait=wait, worker=worker
        )
        if deliveries and self.lose_next.is_set():
            self.lose_next.clear()
            raise BrokerConnectionError(self.url, "the answer was lost (simulated)")
        return applied, deliveries


@pytest.mark.timeout(90)
def test_jobs_leased_by_a_fetch_whose_answer_was_lost_are_not_renewed_for_ever(
    runtime: Runtime, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="worq.worker")
    app = Worq(LostReplyBroker(runtime.url), storage=RedisStorage(runtime.url))

    @app.task(name="quick", queue="keeper")
    def quick() -> int:
        return current_job().attempt

    warm = _warm_task(app)
    worker = Worker(app, _settings(runtime, RedisBroker, lease=2.0, heartbeat=0.3))
    with running(worker):
        _keeper_started(warm, caplog, " (by worker)")
        LostReplyBroker.lose_next.set()
        job = quick.enqueue()
        # Its first lease is under the worker's id, but the worker never took the job: once
        # that lease runs out (the keeper must not renew it) the job runs, as its second attempt.
        assert job.result(timeout=30) == 2


class FailingOnceStorage(RedisStorage):
    """A separate storage whose first save once ``armed`` fails: the worker gives that run up."""

    armed = threading.Event()
    failed = threading.Event()

    def save(self, records: Mapping[str, bytes], ttl: float) -> None:
        if self.armed.is_set() and not self.failed.is_set():
            self.failed.set()
            raise StorageConnectionError(self.url, "simulated outage")
        super().save(records, ttl)


@pytest.mark.timeout(90)
def test_a_run_given_up_on_is_left_to_its_lease_by_a_keeper_renewing_by_worker(
    runtime: Runtime, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="worq.worker")
    app = Worq(RedisBroker(runtime.url), storage=FailingOnceStorage(f"{runtime.url}:results"))

    @app.task(name="stored", queue="keeper")
    def stored() -> int:
        return current_job().attempt

    warm = _warm_task(app)
    worker = Worker(app, _settings(runtime, RedisBroker, lease=2.0, heartbeat=0.3))
    with running(worker):
        _keeper_started(warm, caplog, " (by worker)")
        FailingOnceStorage.armed.set()
        job = stored.enqueue()
        # Its first result could not be stored: the run is given up on, and its lease must run
        # out (the keeper must not renew it) so that the job runs again.
        assert job.result(timeout=30) == 2
    assert FailingOnceStorage.failed.is_set()


class ScriptSentTwiceBroker(RedisBroker):
    """Once ``twice`` is set, the next fetch that leases jobs runs its script a second time and
    answers only that one (as a client that sends a script again after a connection cut): the
    jobs the first one leased are recorded under the worker, which never hears of them."""

    twice = threading.Event()

    def settle_and_fetch(
        self,
        settlements: Sequence[Settlement],
        queues: Sequence[str],
        limit: int,
        *,
        lease: float,
        wait: float,
        worker: str | None = None,
    ) -> tuple[list[bool], list[Delivery]]:
        applied, deliveries = super().settle_and_fetch(
            settlements, queues, limit, lease=lease, wait=wait, worker=worker
        )
        if deliveries and self.twice.is_set():
            self.twice.clear()
            _, deliveries = super().settle_and_fetch(
                [], queues, limit, lease=lease, wait=0.0, worker=worker
            )
        return applied, deliveries


@pytest.mark.timeout(90)
def test_jobs_leased_by_a_fetch_the_worker_never_heard_of_are_not_renewed_for_ever(
    runtime: Runtime, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="worq.worker")
    app = Worq(ScriptSentTwiceBroker(runtime.url), storage=RedisStorage(runtime.url))

    @app.task(name="quick", queue="keeper")
    def quick() -> int:
        return current_job().attempt

    warm = _warm_task(app)
    worker = Worker(app, _settings(runtime, RedisBroker, lease=2.0, heartbeat=0.3))
    with running(worker):
        _keeper_started(warm, caplog, " (by worker)")
        ScriptSentTwiceBroker.twice.set()
        job = quick.enqueue()
        # No error told the worker: the keeper finds the lease it does not hold in its record.
        assert job.result(timeout=30) == 2
    assert any("left to run out" in m for m in caplog.messages)
