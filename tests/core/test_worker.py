from __future__ import annotations

import random
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import pytest

from worq_core import (
    BrokerConnectionError,
    Delivery,
    ExitReason,
    Settlement,
    StorageConnectionError,
    WorkerSettings,
    Worq,
)
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

        def extend(self, deliveries: Sequence[Delivery], lease: float) -> list[bool]:
            BuggyExtend.calls += 1
            if BuggyExtend.calls == 1:
                raise OSError("plugin bug")
            return super().extend(deliveries, lease)

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
