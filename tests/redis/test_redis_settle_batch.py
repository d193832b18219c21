"""Several settlements in one call: the plain acks among them are applied together.

The settle scripts read the metas and leases of a call's plain acks with one HMGET and one
ZMSCORE and forget the held ones with one call per structure; everything else is applied one by
one in its place. What a batch leaves must be exactly what the same settlements leave when sent
one at a time, and it must cost far fewer ``redis.call``s.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable
from typing import Any

import pytest
from redis_support import Backend, Clock, new_prefix

from worq_core.models import Delivery, Message, Outcome, Settlement
from worq_redis import RedisBroker, RedisSettings, RedisStorage
from worq_redis.connection import SCRIPTS, Script

Scenario = Callable[[RedisBroker, RedisStorage, Clock], list[Settlement]]


def mixed_batch(broker: RedisBroker, storage: RedisStorage, clock: Clock) -> list[Settlement]:
    """Leases of every kind, and the settlements a worker could send for them in one call."""
    broker.enqueue([Message(f"j{n}", "q", b"body %d" % n) for n in range(9)])
    got = {d.id: d for d in broker.fetch(["q"], 9, lease=30, wait=0)}
    # j2 was retried once: on its second attempt it has a reason, which its ack must delete
    broker.settle([Settlement(got["j2"], Outcome.RETRY, 1.0, "flaky")])
    clock.now += 2
    [again] = broker.fetch(["q"], 1, lease=30, wait=0)
    assert (again.id, again.attempts) == ("j2", 2)
    # j4 reported progress (a flag: its ack goes the one-by-one way and drops the progress)
    broker.extend([got["j4"]], 30, {"j4": b"50%"})
    stale = Delivery("j5", "q", b"", "not-the-token", 1)
    return [
        Settlement(got["j0"], Outcome.ACK, record=b"r0", ttl=60),
        Settlement(got["j1"], Outcome.ACK),
        Settlement(again, Outcome.ACK, record=b"r2", ttl=60),
        Settlement(got["j3"], Outcome.RETRY, 5.0, "again"),
        Settlement(got["j4"], Outcome.ACK, record=b"r4", ttl=60),
        Settlement(stale, Outcome.ACK, record=b"never", ttl=60),
        Settlement(got["j0"], Outcome.ACK, record=b"twice", ttl=60),  # settled just before
        Settlement(got["j6"], Outcome.DEAD, reason="broken", record=b"dead", ttl=60),
        Settlement(got["j7"], Outcome.ACK, record=b"r7", ttl=0.0),
        Settlement(got["j5"], Outcome.ACK, record=b"r5", ttl=60),
    ]


def state(backend: Backend, prefix: str) -> dict[str, Any]:
    """Every key of ``prefix`` (named without it) with its value as Redis dumps it."""
    client = backend.client
    found = {}
    for key in client.scan_iter(match=f"{prefix}:*"):
        name = key.decode()[len(prefix) :]
        found[name] = client.dump(key)
    return found


def run(
    backend: Backend, scenario: Scenario, *, together: bool
) -> tuple[list[bool], dict[str, Any], RedisBroker]:
    prefix = new_prefix()
    clock = Clock()
    broker = RedisBroker(backend.client, RedisSettings(prefix=prefix), clock=clock)
    storage = RedisStorage(backend.client, prefix=prefix)
    settlements = scenario(broker, storage, clock)
    if together:
        applied = broker.settle(settlements)
    else:
        applied = [flag for s in settlements for flag in broker.settle([s])]
    return applied, state(backend, prefix), broker


def test_a_batch_leaves_what_the_same_settlements_leave_one_at_a_time(
    real_backend: Backend,
) -> None:
    applied, together, broker = run(real_backend, mixed_batch, together=True)
    one_by_one, alone, other = run(real_backend, mixed_batch, together=False)
    try:
        assert applied == one_by_one
        assert applied == [True, True, True, True, True, False, False, True, True, True]
        assert together == alone
        storage = RedisStorage(real_backend.client, prefix=broker.prefix)
        assert [storage.load(f"j{n}") for n in (0, 2, 4, 5, 6, 7)] == [
            b"r0",
            b"r2",
            b"r4",
            b"r5",
            b"dead",
            None,
        ]
        assert broker.job_state("j2") is None, "acked on its second attempt: forgotten"
        reasons = real_backend.client.hkeys(f"{broker.prefix}:{{q}}:reason")
        assert sorted(reasons) == [b"j3", b"j6"], "the retried and the dead job keep theirs"
    finally:
        for b in (broker, other):
            for key in real_backend.client.scan_iter(match=f"{b.prefix}:*"):
                real_backend.client.delete(key)
            b.close()


def test_a_waiter_for_a_record_is_woken_by_a_batched_ack(real_backend: Backend) -> None:
    prefix = new_prefix()
    broker = RedisBroker(real_backend.client, RedisSettings(prefix=prefix))
    storage = RedisStorage(real_backend.client, prefix=prefix)
    broker.enqueue([Message(f"w{n}", "q", b"") for n in range(3)])
    got = broker.fetch(["q"], 3, lease=30, wait=0)
    waited: list[bytes | None] = []
    armed = threading.Event()

    def wait() -> None:
        armed.set()
        waited.append(storage.wait("w1", timeout=10))

    thread = threading.Thread(target=wait)
    thread.start()
    armed.wait(5)
    marker = f"{prefix}:res:{{w1}}:waiting"
    for _ in range(500):  # the waiter's marker is written before it blocks
        if real_backend.client.exists(marker):
            break
        threading.Event().wait(0.01)
    broker.settle([Settlement(d, Outcome.ACK, record=d.id.encode(), ttl=60) for d in got])
    thread.join(10)
    assert waited == [b"w1"]
    for key in real_backend.client.scan_iter(match=f"{prefix}:*"):
        real_backend.client.delete(key)
    broker.close()


def _instrumented(name: str, counter: str) -> Script:
    """Script ``name`` with every ``redis.call`` counted into the key ``counter``."""
    wrapper = (
        f'local function __count(...)\n  redis.call("INCR", "{counter}")\n'
        "  return redis.call(...)\nend\n"
    )
    text = wrapper + SCRIPTS[name].source.replace("redis.call(", "__count(")
    return Script(name, text, hashlib.sha1(text.encode()).hexdigest())


def test_plain_acks_settled_together_cost_a_few_calls_and_one_per_record(
    real_backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ten acks with records: TIME, HMGET, ZMSCORE, ZREM, three HDELs, ten SETs and one EXISTS
    (one by one they cost nine calls each); settle_fetch adds them to its fetch's calls."""
    counter = f"{real_backend.prefix}:calls"
    monkeypatch.setattr(RedisBroker, "_settle_script", _instrumented("settle", counter))
    monkeypatch.setattr(RedisBroker, "_settle_fetch_script", _instrumented("settle_fetch", counter))
    client = real_backend.client
    broker = real_backend.broker()
    broker.enqueue([Message(f"c{n}", "p", b"") for n in range(23)])
    first = broker.fetch(["p"], 10, lease=30, wait=0)
    client.delete(counter)
    assert (
        broker.settle([Settlement(d, Outcome.ACK, record=b"r", ttl=60) for d in first])
        == [True] * 10
    )
    assert int(client.get(counter) or 0) == 1 + 6 + 10 + 1
    second = broker.fetch(["p"], 10, lease=30, wait=0)
    client.delete(counter)
    broker.settle_and_fetch([], ["p"], 1, lease=30, wait=0)  # the fetch alone, one job left
    fetch_alone = int(client.get(counter) or 0)
    client.delete(counter)
    acks = [Settlement(d, Outcome.ACK, record=b"r", ttl=60) for d in second]
    applied, [last] = broker.settle_and_fetch(acks, ["p"], 1, lease=30, wait=0)
    assert (applied, last.id) == ([True] * 10, "c21")
    assert int(client.get(counter) or 0) == fetch_alone + 6 + 10 + 1, "TIME is read once"
    client.delete(counter)
    broker.close()
