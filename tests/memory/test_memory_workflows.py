"""The memory broker's groups beyond the contract, on a hand clock.

These pin down the choices the spec leaves to the backend (exact ttl expiry, which member lists
``open_group`` refuses) and the bounds of the reference implementation: expired and released
groups leave nothing behind, and the expiry heap does not pile up stale entries.
"""

from __future__ import annotations

import pytest

from worq_core import CancelOutcome, JobState, JobStatus, Message, Outcome, Settlement
from worq_core.models import GroupMember, GroupSpec
from worq_memory import MemoryBroker
from worq_memory.broker import _SLACK


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def member(job_id: str, group: str, index: int, *, closes: str | None = None) -> Message:
    return Message(job_id, "q", b"", member=GroupMember(group, index), closes=closes)


def ack_all(broker: MemoryBroker, queue: str = "q", output: bytes | None = None) -> int:
    deliveries = broker.fetch([queue], 10_000, lease=10_000, wait=0)
    assert broker.settle([Settlement(d, Outcome.ACK, output=output) for d in deliveries]) == [
        True
    ] * len(deliveries)
    return len(deliveries)


def test_a_complete_group_expires_exactly_ttl_after_it_completed() -> None:
    clock = Clock()
    broker = MemoryBroker(clock=clock)
    broker.open_group(GroupSpec("g", 1, ttl=30), [member("m", "g", 0)])
    clock.now = 5_000.0  # incomplete: no ttl runs yet
    assert broker.group_state("g") is not None
    ack_all(broker, output=b"r")
    clock.now = 5_029.999
    state = broker.group_state("g")
    assert state is not None
    assert state.outputs == (b"r",)
    clock.now = 5_030.0
    assert broker.group_state("g") is None
    assert broker._groups == {}
    assert broker.open_group(GroupSpec("g", 0), []) == [], "its id is free again"


def test_expired_groups_are_dropped_without_anyone_reading_them() -> None:
    clock = Clock()
    broker = MemoryBroker(clock=clock)
    for i in range(1_000):
        broker.open_group(GroupSpec(f"g{i}", 0, ttl=10), [])
    assert len(broker._groups) == 1_000
    clock.now += 10
    broker.open_group(GroupSpec("later", 1), [member("m", "later", 0)])
    assert list(broker._groups) == ["later"]
    assert broker._expiring == []
    assert broker._complete == 0


def test_released_groups_leave_nothing_and_their_expiry_entries_do_not_pile_up() -> None:
    broker = MemoryBroker()
    for i in range(10_000):
        gid = f"g{i}"
        callback = Message(f"c{i}", "callbacks", b"", closes=gid)
        broker.open_group(
            GroupSpec(gid, 2, callback), [member(f"m{i}.{j}", gid, j) for j in (0, 1)]
        )
        assert ack_all(broker, output=b"x" * 100) == 2
        assert ack_all(broker, "callbacks") == 1
    assert broker._groups == {}
    assert broker._complete == 0
    assert len(broker._expiring) <= _SLACK + 1, "stale entries are swept"
    assert broker._jobs == {}


def test_a_reopened_group_is_not_expired_by_the_entry_of_the_released_one() -> None:
    clock = Clock()
    broker = MemoryBroker(clock=clock)
    broker.open_group(GroupSpec("g", 0, Message("c", "q", b"", closes="g"), ttl=10), [])
    ack_all(broker)  # the callback releases "g" before its ttl runs out
    assert broker.group_state("g") is None
    broker.open_group(GroupSpec("g", 1, ttl=10), [member("m", "g", 0)])
    clock.now += 10  # the released group's expiry comes: the reopened one is incomplete
    assert broker.group_state("g") is not None
    clock.now += 5
    ack_all(broker)
    clock.now += 9.999
    assert broker.group_state("g") is not None
    clock.now += 0.001
    assert broker.group_state("g") is None


@pytest.mark.parametrize(
    "members",
    [
        [Message("m", "q", b"")],
        [member("m", "other", 0)],
        [member("m", "g", 2)],
        [member("m", "g", -1)],
        [member("m", "g", 0), member("n", "g", 0)],
    ],
    ids=["not-a-member", "other-group", "index-too-large", "negative-index", "same-index"],
)
def test_open_group_refuses_bad_members_and_adds_nothing(members: list[Message]) -> None:
    broker = MemoryBroker()
    with pytest.raises(ValueError, match="'g'"):
        broker.open_group(GroupSpec("g", 2), members)
    assert broker.group_state("g") is None
    assert broker.job_state("m") is None


def test_a_negative_size_is_refused() -> None:
    with pytest.raises(ValueError, match="negative"):
        MemoryBroker().open_group(GroupSpec("g", -1), [])


def test_a_member_index_beyond_the_recorded_size_counts_nothing() -> None:
    broker = MemoryBroker()
    broker.open_group(GroupSpec("g", 1), [])
    broker.enqueue([member("stray", "g", 5)])
    ack_all(broker)
    state = broker.group_state("g")
    assert state is not None
    assert (state.finished, state.complete) == (frozenset(), False)


def test_cancelling_a_dead_member_finds_nothing_and_counts_nothing_again() -> None:
    broker = MemoryBroker()
    broker.open_group(GroupSpec("g", 2, run_on_failure=True), [member("m", "g", 0)])
    [delivery] = broker.fetch(["q"], 1, lease=60, wait=0)
    broker.settle([Settlement(delivery, Outcome.DEAD, reason="KeyError", output=b"err")])
    assert broker.cancel("m") is CancelOutcome.NOT_FOUND
    state = broker.group_state("g")
    assert state is not None
    assert (state.finished, state.failed, state.outputs) == (
        frozenset({0}),
        frozenset({0}),
        (b"err", None),
    )


def test_a_callback_whose_id_is_held_is_not_added_twice() -> None:
    broker = MemoryBroker()
    broker.enqueue([Message("c", "q", b"first")])
    broker.open_group(GroupSpec("g", 0, Message("c", "q", b"callback")), [])
    state = broker.group_state("g")
    assert state is not None
    assert state.callback_sent, "sent as enqueue would: the held id adds nothing"
    assert [d.body for d in broker.fetch(["q"], 10, lease=60, wait=0)] == [b"first"]
    assert broker.job_state("c") == JobState("q", JobStatus.RUNNING, attempts=1)
