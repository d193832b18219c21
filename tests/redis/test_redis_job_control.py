"""Job control on Redis: ids unique across queues, cancel, progress, and records the scripts write.

Each case checks the keys as well as the answers: the id index holds exactly the ids the broker
holds, and a job that is gone leaves nothing behind (no progress, no meta flags, no index entry).
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
import redis
from redis_support import Backend, Clock, new_prefix

from worq_core import BrokerError, JobStatus, StorageError
from worq_core.models import (
    CancelOutcome,
    Capability,
    Delivery,
    JobState,
    LeaseState,
    Message,
    Outcome,
    QueueStats,
    Settlement,
)
from worq_redis import ClusterNotSupported, RedisBroker, RedisSettings
from worq_redis.connection import SCRIPTS, ids_key, queue_keys


def msg(queue: str, job_id: str, body: bytes = b"body", **kwargs: Any) -> Message:
    return Message(job_id, queue, body, **kwargs)


def index(backend: Backend) -> dict[str, str]:
    """The id index as it is in Redis: job id -> queue."""
    raw = backend.client.hgetall(ids_key(backend.prefix))
    return {k.decode(): v.decode() for k, v in raw.items()}


def meta(backend: Backend, queue: str, job_id: str) -> str | None:
    raw = backend.client.hget(f"{backend.prefix}:{{{queue}}}:meta", job_id)
    return None if raw is None else raw.decode()


def progress_hash(backend: Backend, queue: str) -> dict[bytes, bytes]:
    return dict(backend.client.hgetall(f"{backend.prefix}:{{{queue}}}:progress"))


def job_keys(backend: Backend) -> list[str]:
    """The keys that hold jobs or records: all but the counters, wake-up signals and registry."""
    names = backend.keys()
    return [k for k in names if not k.endswith((":seq", ":signal", ":queues"))]


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def broker(backend: Backend, clock: Clock) -> RedisBroker:
    return backend.broker(clock=clock)


def fetch_one(broker: RedisBroker, queue: str, lease: float = 30) -> Delivery:
    [delivery] = broker.fetch([queue], 1, lease=lease, wait=0)
    return delivery


def test_the_broker_declares_job_control() -> None:
    assert {Capability.CANCEL, Capability.PROGRESS, Capability.RESULTS} <= (
        RedisBroker.capabilities
    )


# -- job ids across queues -----------------------------------------------------------------------


def test_an_id_is_unique_across_queues_in_every_state(
    backend: Backend, broker: RedisBroker, clock: Clock
) -> None:
    """queued, scheduled, retrying, running (and expired), dead: each id refused elsewhere."""
    broker.enqueue(
        [
            msg("a", "queued"),
            msg("a", "scheduled", eta=clock.now + 60),
            msg("a", "retrying"),
            msg("a", "running"),
            msg("a", "expired"),
            msg("a", "dead"),
        ]
    )
    got = {d.id: d for d in broker.fetch(["a"], 5, lease=30, wait=0)}
    assert set(got) == {"queued", "retrying", "running", "expired", "dead"}
    broker.release([got["queued"]])
    broker.settle(
        [
            Settlement(got["retrying"], Outcome.RETRY, 60, "ValueError"),
            Settlement(got["dead"], Outcome.DEAD, reason="KeyError"),
        ]
    )
    broker.extend([got["running"]], 120)
    clock.now += 31  # "expired" is past its lease, not reaped yet
    states = {job_id: broker.job_state(job_id) for job_id in index(backend)}
    assert {k: (s.status if s else None) for k, s in states.items()} == {
        "queued": JobStatus.QUEUED,
        "scheduled": JobStatus.SCHEDULED,
        "retrying": JobStatus.RETRYING,
        "running": JobStatus.RUNNING,
        "expired": JobStatus.QUEUED,
        "dead": JobStatus.DEAD,
    }
    everywhere = [msg(q, job_id, b"again") for job_id in states for q in ("a", "b")]
    assert broker.enqueue(everywhere) == [False] * len(everywhere), "as a batch"
    for message in everywhere:
        assert broker.enqueue([message]) == [False], "one by one"
    assert broker.stats(["b"]) == [QueueStats("b", 0, 0, 0, 0)]
    assert set(index(backend).values()) == {"a"}
    assert "b" not in {s.queue for s in broker.stats()}, "a queue that never got a job"


def test_an_id_is_free_again_in_any_queue_after_ack_cancel_purge_or_trim(
    backend: Backend, clock: Clock
) -> None:
    settings = RedisSettings(prefix=backend.prefix, dead_max_count=1, dead_max_age=60)
    broker = RedisBroker(backend.client, settings, clock=clock)
    broker.enqueue([msg("a", j) for j in ("acked", "cancelled", "purged", "trimmed", "aged")])
    got = {d.id: d for d in broker.fetch(["a"], 5, lease=30, wait=0)}
    broker.release([got.pop("cancelled")])
    assert broker.cancel("cancelled") is CancelOutcome.REMOVED
    broker.settle([Settlement(got["acked"], Outcome.ACK)])
    broker.settle([Settlement(got["trimmed"], Outcome.DEAD, reason="r")])
    broker.settle([Settlement(got["purged"], Outcome.DEAD, reason="r")])  # trims "trimmed"
    assert [d.id for d in broker.dead_jobs("a")] == ["purged"]
    assert broker.purge_dead("a") == 1
    broker.settle([Settlement(got["aged"], Outcome.DEAD, reason="r")])
    clock.now += 61
    assert broker.stats(["a"])[0].dead == 0  # trimmed by age
    assert index(backend) == {}
    again = [msg("b", j) for j in ("acked", "cancelled", "purged", "trimmed", "aged")]
    assert broker.enqueue(again) == [True] * 5
    assert index(backend) == {m.id: "b" for m in again}


def test_a_batch_over_several_queues_and_chunks_keeps_the_first_of_each_id(
    backend: Backend,
) -> None:
    broker = RedisBroker(backend.client, RedisSettings(prefix=backend.prefix, enqueue_chunk=2))
    broker.enqueue([msg("c", "held")])
    batch = [
        msg("b", "x", b"first x"),
        msg("a", "y", b"first y"),
        msg("a", "x", b"second x"),  # same id, other queue, same batch
        msg("a", "z"),
        msg("b", "held"),
        msg("b", "y", b"second y"),
        msg("a", "w"),
    ]
    assert broker.enqueue(batch) == [True, True, False, True, False, False, True]
    assert index(backend) == {"held": "c", "x": "b", "y": "a", "z": "a", "w": "a"}
    got = broker.fetch(["a", "b"], 10, lease=30, wait=0)
    assert [(d.id, d.queue, d.body) for d in got] == [
        ("y", "a", b"first y"),
        ("z", "a", b"body"),
        ("w", "a", b"body"),
        ("x", "b", b"first x"),
    ]


def test_requeue_keeps_the_id_in_its_queue_and_the_index(
    backend: Backend, broker: RedisBroker
) -> None:
    broker.enqueue([msg("a", "j")])
    broker.settle([Settlement(fetch_one(broker, "a"), Outcome.DEAD, reason="r")])
    assert broker.requeue_dead("a") == 1
    assert index(backend) == {"j": "a"}
    assert broker.enqueue([msg("b", "j")]) == [False]


# -- cancel --------------------------------------------------------------------------------------


def test_cancelling_a_waiting_job_removes_every_trace_of_it(
    backend: Backend, broker: RedisBroker, clock: Clock
) -> None:
    broker.enqueue([msg("a", "q"), msg("a", "s", eta=clock.now + 60), msg("a", "r")])
    queued, retried = broker.fetch(["a"], 2, lease=30, wait=0)
    broker.settle([Settlement(retried, Outcome.RETRY, 60, "ValueError")])
    broker.release([queued])
    assert [broker.job_state(j).status for j in "qsr"] == ["queued", "scheduled", "retrying"]  # type: ignore[union-attr]
    for job_id in ("q", "s", "r"):
        assert broker.cancel(job_id) is CancelOutcome.REMOVED, job_id
        assert broker.job_state(job_id) is None
    assert job_keys(backend) == [], "no job, no meta, no reason, no index entry left"
    clock.now += 61
    assert broker.fetch(["a"], 10, lease=30, wait=0) == []


def test_cancelling_a_running_job_flags_it_until_it_is_settled(
    backend: Backend, broker: RedisBroker, clock: Clock
) -> None:
    broker.enqueue([msg("a", "j"), msg("a", "other")])
    first, other = broker.fetch(["a"], 2, lease=10, wait=0)
    before = meta(backend, "a", "j")
    assert before is not None
    assert before.count("|") == 4, "no flags: the five-field form"
    assert broker.cancel("j") is CancelOutcome.REQUESTED
    assert meta(backend, "a", "j") == before + "|c"
    assert broker.cancel("j") is CancelOutcome.REQUESTED
    assert meta(backend, "a", "j") == before + "|c", "flagged once"
    assert broker.extend([first, other], 10) == [LeaseState.CANCELLING, LeaseState.HELD]
    assert broker.job_state("j") == JobState("a", JobStatus.RUNNING, 1, cancel_requested=True)
    clock.now += 10  # the lease runs out: the next delivery carries the request
    [second] = broker.fetch(["a"], 1, lease=10, wait=0)
    assert (second.id, second.attempts, second.cancel_requested) == ("j", 2, True)
    applied, [third] = broker.settle_and_fetch(
        [Settlement(other, Outcome.ACK)], ["a"], 1, lease=10, wait=0
    )
    assert applied == [False]  # "other" expired too and was fetched again
    assert third.id == "other"
    assert not third.cancel_requested
    broker.release([second])
    [fourth] = broker.fetch(["a"], 1, lease=10, wait=0)
    assert fourth.cancel_requested, "a release is no settlement: the request stays"
    assert broker.settle([Settlement(fourth, Outcome.RETRY, 0, "stopped")]) == [True]
    assert broker.job_state("j").cancel_requested, "a retry keeps it"  # type: ignore[union-attr]
    [fifth] = broker.fetch(["a"], 1, lease=10, wait=0)
    assert fifth.cancel_requested
    assert broker.settle([Settlement(fifth, Outcome.DEAD, 0, "cancelled")]) == [True]
    assert not broker.job_state("j").cancel_requested  # type: ignore[union-attr]
    assert "|c" not in (meta(backend, "a", "j") or ""), "dead-lettering ends it"


def test_cancelling_a_job_whose_lease_expired_removes_it_before_it_is_reaped(
    backend: Backend, broker: RedisBroker, clock: Clock
) -> None:
    broker.enqueue([msg("a", "j")])
    delivery = fetch_one(broker, "a", lease=5)
    broker.extend([delivery], 5, {"j": b"half"})
    clock.now += 5
    assert backend.client.zscore(f"{backend.prefix}:{{a}}:leased", "j") is not None
    assert broker.cancel("j", b"cancelled", ttl=60) is CancelOutcome.REMOVED
    assert broker.job_state("j") is None
    assert progress_hash(backend, "a") == {}
    assert backend.storage().load("j") == b"cancelled"
    assert broker.settle([Settlement(delivery, Outcome.ACK)]) == [False]
    assert index(backend) == {}


def test_cancelling_a_dead_or_unknown_job_changes_nothing(
    backend: Backend, broker: RedisBroker
) -> None:
    broker.enqueue([msg("a", "dead")])
    broker.settle([Settlement(fetch_one(broker, "a"), Outcome.DEAD, reason="KeyError")])
    before = backend.snapshot()
    assert broker.cancel("dead", b"cancelled", ttl=60) is CancelOutcome.NOT_FOUND
    assert broker.cancel("unknown", b"cancelled", ttl=60) is CancelOutcome.NOT_FOUND
    assert backend.snapshot() == before


def test_cancel_looks_the_queue_up_again_when_the_job_moved_meanwhile(
    backend: Backend, broker: RedisBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between the lookup and the script the job is acked and enqueued into another queue."""
    broker.enqueue([msg("a", "j")])
    other = backend.broker()
    lane = broker._lane
    real = lane.command
    lookups: list[Any] = []

    def command(*args: Any) -> Any:
        reply = real(*args)
        lookups.append(reply)
        if len(lookups) == 1:
            other.settle([Settlement(fetch_one(other, "a"), Outcome.ACK)])
            other.enqueue([msg("b", "j")])
        return reply

    monkeypatch.setattr(lane, "command", command)
    assert broker.cancel("j") is CancelOutcome.REMOVED
    assert lookups == [b"a", b"b"]
    assert index(backend) == {}


def test_cancel_gives_up_with_a_broker_error_if_the_job_never_stops_moving(
    broker: RedisBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    broker.enqueue([msg("a", "j")])
    monkeypatch.setattr(broker._lane, "command", lambda *args: b"elsewhere")
    with pytest.raises(BrokerError, match="kept moving"):
        broker.cancel("j")


def test_a_cancel_record_wakes_a_waiter(backend: Backend, broker: RedisBroker) -> None:
    storage = backend.storage()
    broker.enqueue([msg("a", "j")])
    got: list[bytes | None] = []
    armed = threading.Event()

    def wait() -> None:
        armed.set()
        got.append(storage.wait("j", timeout=10))

    thread = threading.Thread(target=wait)
    thread.start()
    armed.wait(5)
    marker = f"{backend.prefix}:res:{{j}}:waiting"
    for _ in range(250):  # nothing to wait on: the waiter's first step marks the job
        if backend.client.exists(marker):
            break
        time.sleep(0.02)
    assert broker.cancel("j", b"cancelled", ttl=60) is CancelOutcome.REMOVED
    thread.join(10)
    assert got == [b"cancelled"]


# -- progress ------------------------------------------------------------------------------------


def test_progress_lives_in_the_queue_while_the_job_runs(
    backend: Backend, broker: RedisBroker, clock: Clock
) -> None:
    broker.enqueue([msg("a", j) for j in ("ack", "retry", "dead", "release", "reap")])
    got = {d.id: d for d in broker.fetch(["a"], 5, lease=10, wait=0)}
    states = broker.extend(list(got.values()), 10, {j: f"{j} 50%".encode() for j in got})
    assert states == [LeaseState.HELD] * 5
    assert progress_hash(backend, "a") == {j.encode(): f"{j} 50%".encode() for j in got}
    assert all((meta(backend, "a", j) or "").endswith("|p") for j in got)
    broker.extend([got["ack"]], 10, {"ack": b""})
    assert broker.job_state("ack") == JobState("a", JobStatus.RUNNING, 1, b""), "empty is kept"
    broker.extend([got["ack"]], 10, {"someone else": b"x"})
    assert broker.job_state("ack").progress == b""  # type: ignore[union-attr]
    broker.settle(
        [
            Settlement(got["ack"], Outcome.ACK),
            Settlement(got["retry"], Outcome.RETRY, 60, "ValueError"),
            Settlement(got["dead"], Outcome.DEAD, reason="KeyError"),
        ]
    )
    broker.release([got["release"]])
    assert progress_hash(backend, "a") == {b"reap": b"reap 50%"}
    clock.now += 10
    assert broker.job_state("reap") == JobState("a", JobStatus.QUEUED, 1), "expired: not shown"
    assert broker.reap("a") == 1
    assert progress_hash(backend, "a") == {}
    for job_id in ("retry", "dead", "release", "reap"):
        assert "|p" not in (meta(backend, "a", job_id) or ""), job_id
        state = broker.job_state(job_id)
        assert state is not None
        assert state.progress is None


def test_progress_is_kept_for_a_cancelling_lease_and_ignored_for_a_lost_one(
    backend: Backend, broker: RedisBroker, clock: Clock
) -> None:
    broker.enqueue([msg("a", "j")])
    stale = fetch_one(broker, "a", lease=5)
    clock.now += 5
    current = fetch_one(broker, "a", lease=5)
    assert broker.extend([stale], 5, {"j": b"stale"}) == [LeaseState.LOST]
    assert progress_hash(backend, "a") == {}
    broker.cancel("j")
    assert broker.extend([current], 5, {"j": b"stopping"}) == [LeaseState.CANCELLING]
    assert broker.job_state("j") == JobState("a", JobStatus.RUNNING, 2, b"stopping", True)
    assert meta(backend, "a", "j").endswith("|cp")  # type: ignore[union-attr]
    broker.settle([Settlement(current, Outcome.ACK, record=b"cancelled", ttl=60)])
    assert job_keys(backend) == [f"{backend.prefix}:res:{{j}}"]


@pytest.mark.parametrize(
    ("name", "values", "error"),
    [
        ("extend", ["", 60, "j", "TOKEN", 1, b"p", "j"], "bad progress flag"),
        ("cancel", ["", "j", "a", "soon", b"r"], "bad ttl"),
    ],
)
def test_scripts_check_their_arguments_before_any_write(
    backend: Backend, broker: RedisBroker, name: str, values: list[Any], error: str
) -> None:
    broker.enqueue([msg("a", "j")])
    delivery = fetch_one(broker, "a", lease=5)
    keys = queue_keys(backend.prefix, "a")
    before = backend.snapshot()
    values = [delivery.token if v == "TOKEN" else v for v in values]
    with pytest.raises(redis.ResponseError, match=error):
        broker._lane.script(SCRIPTS[name], (len(keys), *keys), values)
    assert backend.snapshot() == before


# -- records the scripts write -------------------------------------------------------------------


def test_stores_results_in_has_no_side_effects(backend: Backend, clock: Clock) -> None:
    """A broker writes the records it is handed, whether or not it was ever asked."""
    never_asked = backend.broker(clock=clock)
    asked = backend.broker(clock=clock)
    foreign = backend.storage(prefix=new_prefix())
    for _ in range(3):
        assert asked.stores_results_in(backend.storage())
        assert not asked.stores_results_in(foreign)
    storage = backend.storage()
    for broker, job_id in ((never_asked, "n"), (asked, "a")):
        broker.enqueue([msg("q", job_id)])
        [delivery] = broker.fetch(["q"], 1, lease=30, wait=0)
        assert broker.settle([Settlement(delivery, Outcome.ACK, record=b"r", ttl=60)]) == [True]
        assert storage.load(job_id) == b"r"
    asked.enqueue([msg("q", "plain")])
    asked.settle([Settlement(fetch_one(asked, "q"), Outcome.ACK)])
    assert storage.load("plain") is None, "no record handed, none written"
    assert foreign.load("n") is None


def test_a_record_is_written_whatever_the_outcome(backend: Backend, broker: RedisBroker) -> None:
    storage = backend.storage()
    broker.enqueue([msg("a", "r"), msg("a", "d")])
    retried, dead = broker.fetch(["a"], 2, lease=30, wait=0)
    assert broker.settle(
        [
            Settlement(retried, Outcome.RETRY, 60, "ValueError", record=b"retry", ttl=60),
            Settlement(dead, Outcome.DEAD, reason="KeyError", record=b"dead", ttl=60),
        ]
    ) == [True, True]
    assert (storage.load("r"), storage.load("d")) == (b"retry", b"dead")
    assert 0 < backend.client.pttl(f"{backend.prefix}:res:{{d}}") <= 60_000


@pytest.mark.parametrize("batch", [False, True], ids=["one", "batch"])
def test_clear_record_deletes_the_old_record_only_when_the_job_is_added(
    backend: Backend, broker: RedisBroker, batch: bool
) -> None:
    storage = backend.storage()
    storage.save({"j": b"old", "k": b"old k", "keep": b"kept"}, ttl=60)
    broker.enqueue([msg("a", "warm")])  # the queue is known: one-job enqueues take the fast path

    def enqueue(*messages: Message) -> list[bool]:
        if batch:
            return broker.enqueue([*messages, msg("a", f"filler-{len(messages)}")])[:-1]
        return [broker.enqueue([m])[0] for m in messages]

    assert enqueue(msg("a", "j", clear_record=True), msg("b", "keep")) == [True, True]
    assert (storage.load("j"), storage.load("keep")) == (None, b"kept")
    storage.save({"j": b"newer"}, ttl=60)
    assert enqueue(msg("c", "j", clear_record=True)) == [False]
    assert storage.load("j") == b"newer", "a refused enqueue clears nothing"
    assert enqueue(msg("a", "k", clear_record=True), msg("b", "k2", clear_record=True)) == [
        True,
        True,
    ]
    assert storage.load("k") is None


def test_job_status_reads_state_and_record_of_a_job_in_any_queue(
    backend: Backend, broker: RedisBroker
) -> None:
    storage = backend.storage()
    broker.enqueue([msg("b", "j")])
    delivery = fetch_one(broker, "b")
    broker.extend([delivery], 30, {"j": b"9/10"})
    assert broker.job_status("j", storage) == (JobState("b", JobStatus.RUNNING, 1, b"9/10"), None)
    broker.settle([Settlement(delivery, Outcome.ACK, record=b"done", ttl=60)])
    assert broker.job_status("j", storage) == (None, b"done")
    foreign = backend.storage(prefix=new_prefix())
    assert broker.job_status("j", foreign) == (None, None)


# -- Redis Cluster -------------------------------------------------------------------------------


def test_a_redis_cluster_client_gets_a_clear_typed_error_from_the_plain_broker() -> None:
    cluster = redis.RedisCluster.__new__(redis.RedisCluster)  # no server needed to be refused
    with pytest.raises(
        ClusterNotSupported, match="for Redis Cluster use RedisClusterBroker"
    ) as info:
        RedisBroker(cluster)
    assert isinstance(info.value, BrokerError)
    assert isinstance(info.value, StorageError)
    assert "Sentinel" in str(info.value)


def test_anything_else_than_a_url_or_a_client_is_a_type_error() -> None:
    with pytest.raises(TypeError, match=r"redis\.Redis client"):
        RedisBroker(42)  # type: ignore[arg-type]
