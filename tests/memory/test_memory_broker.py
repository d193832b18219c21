"""What the memory broker does beyond the shared contract: its storage, clock and bounds."""

from __future__ import annotations

import threading

import pytest

from worq_core import (
    BrokerError,
    CancelOutcome,
    Capability,
    JobState,
    JobStatus,
    LeaseState,
    Message,
    Outcome,
    Settlement,
)
from worq_memory import MemoryBroker, MemoryStorage


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def test_it_declares_the_whole_contract() -> None:
    assert MemoryBroker.capabilities == set(Capability) - {
        Capability.SHARED,
        Capability.TRANSACTIONAL,
    }, "all but SHARED (it lives in one process) and TRANSACTIONAL (it has no database)"


def test_it_stores_results_only_in_the_storage_it_was_given() -> None:
    storage = MemoryStorage()
    assert MemoryBroker(storage=storage).stores_results_in(storage)
    assert not MemoryBroker(storage=storage).stores_results_in(MemoryStorage())
    assert not MemoryBroker().stores_results_in(storage)
    assert MemoryBroker.from_url("memory://").storage is None


def test_without_a_storage_records_are_refused_rather_than_lost() -> None:
    broker = MemoryBroker()
    broker.enqueue([Message("a", "q", b""), Message("b", "q", b"")])
    a, b = broker.fetch(["q"], 2, lease=30, wait=0)
    with pytest.raises(BrokerError):
        broker.settle([Settlement(a, Outcome.ACK), Settlement(b, Outcome.ACK, record=b"r")])
    assert [broker.job_state(i) for i in "ab"] == [JobState("q", JobStatus.RUNNING, 1)] * 2
    broker.enqueue([Message("c", "q", b"")])
    with pytest.raises(BrokerError):
        broker.cancel("c", b"cancelled", ttl=60)
    assert broker.job_state("c") == JobState("q", JobStatus.QUEUED)
    assert broker.cancel("c") is CancelOutcome.REMOVED
    assert broker.enqueue([Message("c", "q", b"", clear_record=True)]) == [True]


def test_a_waiter_woken_by_the_record_sees_the_job_settled() -> None:
    storage = MemoryStorage()
    broker = MemoryBroker(storage=storage)
    seen: list[object] = []
    for n in range(50):
        job_id = f"job-{n}"
        broker.enqueue([Message(job_id, "q", b"")])
        [delivery] = broker.fetch(["q"], 1, lease=30, wait=0)
        waiting = threading.Event()

        def wait(job_id: str = job_id, waiting: threading.Event = waiting) -> None:
            waiting.set()
            record = storage.wait(job_id, timeout=10)
            seen.append((record, broker.job_state(job_id)))

        thread = threading.Thread(target=wait)
        thread.start()
        waiting.wait(5)
        broker.settle([Settlement(delivery, Outcome.ACK, record=b"done", ttl=60)])
        thread.join(10)
    assert seen == [(b"done", None)] * 50


def test_a_dead_job_past_its_age_frees_its_id() -> None:
    clock = Clock()
    broker = MemoryBroker(clock=clock, dead_max_age=100)
    broker.enqueue([Message("j", "q", b"")])
    [delivery] = broker.fetch(["q"], 1, lease=30, wait=0)
    broker.settle([Settlement(delivery, Outcome.DEAD, reason="r")])
    assert broker.enqueue([Message("j", "other", b"")]) == [False]
    clock.now += 101
    assert broker.job_state("j") is None
    assert broker.cancel("j") is CancelOutcome.NOT_FOUND
    assert broker.enqueue([Message("j", "other", b"")]) == [True]
    assert broker.job_state("j") == JobState("other", JobStatus.QUEUED)


def test_dead_jobs_beyond_the_count_free_their_ids() -> None:
    broker = MemoryBroker(dead_max_count=2)
    broker.enqueue([Message(f"j{i}", "q", b"") for i in range(3)])
    for delivery in broker.fetch(["q"], 3, lease=30, wait=0):
        broker.settle([Settlement(delivery, Outcome.DEAD, reason="r")])
    assert [d.id for d in broker.dead_jobs("q")] == ["j2", "j1"]
    assert broker.enqueue([Message("j0", "q", b""), Message("j1", "q", b"")]) == [True, False]


def test_a_cancelled_id_enqueued_again_follows_only_its_new_message() -> None:
    clock = Clock()
    broker = MemoryBroker(clock=clock)
    broker.enqueue([Message("j", "a", b"old", eta=clock.now + 10)])
    assert broker.cancel("j") is CancelOutcome.REMOVED
    broker.enqueue([Message("j", "a", b"new", eta=clock.now + 20)])
    clock.now += 15
    assert broker.fetch(["a"], 1, lease=30, wait=0) == [], "not at the cancelled message's eta"
    assert broker.cancel("j") is CancelOutcome.REMOVED
    broker.enqueue([Message("j", "b", b"moved")])
    clock.now += 10
    assert broker.fetch(["a"], 1, lease=30, wait=0) == []
    assert [d.body for d in broker.fetch(["b"], 1, lease=30, wait=0)] == [b"moved"]


def test_cancelled_jobs_do_not_pile_up_in_the_queue() -> None:
    clock = Clock()
    broker = MemoryBroker(clock=clock)
    broker.enqueue([Message(f"now-{i}", "q", b"") for i in range(1000)])
    broker.enqueue([Message(f"later-{i}", "q", b"", eta=clock.now + 1e6) for i in range(1000)])
    for i in range(1000):
        assert broker.cancel(f"now-{i}") is CancelOutcome.REMOVED
        assert broker.cancel(f"later-{i}") is CancelOutcome.REMOVED
    queue = broker._queues["q"]
    assert len(queue.ready) < 100
    assert len(queue.delayed) < 100
    [stats] = broker.stats(["q"])
    assert (stats.ready, stats.delayed) == (0, 0)


def test_a_released_job_keeps_its_cancel_request() -> None:
    broker = MemoryBroker()
    broker.enqueue([Message("j", "q", b"")])
    [delivery] = broker.fetch(["q"], 1, lease=30, wait=0)
    assert broker.cancel("j") is CancelOutcome.REQUESTED
    broker.release([delivery])
    assert broker.job_state("j") == JobState("q", JobStatus.QUEUED, cancel_requested=True)
    [again] = broker.fetch(["q"], 1, lease=30, wait=0)
    assert again.cancel_requested
    assert broker.extend([again], 30) == [LeaseState.CANCELLING]


def test_a_queued_job_flagged_before_its_release_can_still_be_removed() -> None:
    storage = MemoryStorage()
    broker = MemoryBroker(storage=storage)
    broker.enqueue([Message("j", "q", b"")])
    [delivery] = broker.fetch(["q"], 1, lease=30, wait=0)
    broker.cancel("j")
    broker.release([delivery])
    assert broker.cancel("j", b"cancelled", ttl=60) is CancelOutcome.REMOVED
    assert broker.job_status("j", storage) == (None, b"cancelled")


def test_looking_up_unknown_queues_creates_nothing() -> None:
    broker = MemoryBroker()
    broker.fetch(["x"], 1, lease=30, wait=0)
    broker.stats(["y"])
    broker.dead_jobs("z")
    assert broker.requeue_dead("w") == 0
    assert broker.purge_dead("v") == 0
    assert broker.job_state("j") is None
    assert broker.stats() == []
