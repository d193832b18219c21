"""Workflows on Redis: what the broker contract cannot see.

The contract (``worq_core.testing.workflow_contract``) checks the answers; these cases check the
keys behind them: a group's hash vanishes when a job's ``closes`` releases it or, complete and
not released, after its ttl (an incomplete one never expires); thousands of chords leave only
the keys an idle queue keeps; ``then`` messages and callbacks land in other queues, whose keys
the scripts build by name; a dead member's workflow record goes at once; scripts check workflow
values before their first write; and plain jobs make exactly the ``redis.call``s they made
before workflows existed.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from redis_support import Backend, counting_client, leftovers, queue_base

from worq_core.models import (
    Delivery,
    GroupMember,
    GroupSpec,
    Message,
    Outcome,
    Settlement,
    UniqueKey,
)
from worq_redis import RedisBroker
from worq_redis import broker as broker_module
from worq_redis.connection import SCRIPTS, Script, group_key, registry_key, result_keys


def msg(queue: str, job_id: str, **kwargs: Any) -> Message:
    return Message(job_id, queue, b"body", **kwargs)


def member(queue: str, job_id: str, gid: str, index: int, **kwargs: Any) -> Message:
    return Message(job_id, queue, b"body", member=GroupMember(gid, index), **kwargs)


def drain(broker: RedisBroker, queue: str, output: bytes | None = None) -> int:
    """Fetch and acknowledge everything in ``queue`` (with ``output``); how many jobs."""
    done = 0
    while deliveries := broker.fetch([queue], 200, lease=30, wait=0):
        settled = broker.settle([Settlement(d, Outcome.ACK, output=output) for d in deliveries])
        assert all(settled)
        done += len(deliveries)
    return done


def fetch_one(broker: RedisBroker, queue: str) -> Delivery:
    (delivery,) = broker.fetch([queue], 1, lease=30, wait=0)
    return delivery


@pytest.fixture
def broker(backend: Backend) -> Iterator[RedisBroker]:
    broker = backend.broker()
    yield broker
    broker.close()


# -- nothing grows ---------------------------------------------------------------------------


def test_thousands_of_chords_leave_only_the_idle_keys(
    backend: Backend, broker: RedisBroker
) -> None:
    """10,000 chords (300 on fakeredis): members acked, callbacks (in another queue) close them."""
    count = 10_000 if backend.kind == "redis" else 300
    for n in range(count):
        gid = f"g{n}"
        callback = msg("sums", f"cb{n}", closes=gid)
        spec = GroupSpec(gid, 2, callback=callback)
        members = [member("parts", f"m{n}.{i}", gid, i) for i in range(2)]
        assert broker.open_group(spec, members) == [True, True]
    assert backend.client.exists(group_key(backend.prefix, "g0"))
    assert backend.client.hlen(queue_base(backend, "parts") + "wf") == 2 * count
    assert drain(broker, "parts", output=b"part") == 2 * count
    state = broker.group_state(f"g{count - 1}")
    assert state is not None
    assert state.complete
    assert state.callback_sent
    assert state.outputs == (b"part", b"part")
    assert not backend.client.exists(queue_base(backend, "parts") + "wf"), "acked: records gone"
    assert backend.client.hlen(queue_base(backend, "sums") + "wf") == count, "the callbacks' closes"
    assert drain(broker, "sums") == count
    assert broker.group_state("g0") is None
    assert leftovers(backend) == set(), "only the registry, the counters and the wake-ups"


def test_a_complete_group_nobody_releases_expires_and_an_incomplete_one_never(
    backend: Backend, broker: RedisBroker
) -> None:
    broker.open_group(GroupSpec("done", 1, ttl=0.3), [member("q", "a", "done", 0)])
    broker.open_group(GroupSpec("open", 2, ttl=0.3), [member("q", "b", "open", 0)])
    assert drain(broker, "q") == 2
    done, still_open = group_key(backend.prefix, "done"), group_key(backend.prefix, "open")
    assert 0 < backend.client.pttl(done) <= 300, "PEXPIRE when it completed"
    assert backend.client.pttl(still_open) == -1, "waiting for a member: no expiry"
    time.sleep(0.5)
    assert not backend.client.exists(done)
    assert broker.group_state("done") is None
    state = broker.group_state("open")
    assert state is not None
    assert state.finished == {0}
    assert not state.complete


def test_a_size_zero_group_is_complete_and_expiring_at_once(
    backend: Backend, broker: RedisBroker
) -> None:
    assert broker.open_group(GroupSpec("z", 0, callback=msg("cb", "c"), ttl=60), []) == []
    assert 0 < backend.client.pttl(group_key(backend.prefix, "z")) <= 60_000
    assert fetch_one(broker, "cb").id == "c"
    assert backend.client.sismember(registry_key(backend.prefix), "cb")


# -- other queues, built by name ---------------------------------------------------------------


def test_the_callback_goes_to_its_own_queue_and_counts_in_an_outer_group(
    backend: Backend, broker: RedisBroker
) -> None:
    outer = GroupSpec("outer", 2)
    inner_cb = member("sums", "inner-cb", "outer", 0, closes="inner")
    assert broker.open_group(outer, [member("other", "o1", "outer", 1)]) == [True]
    inner = GroupSpec("inner", 2, callback=inner_cb)
    assert broker.open_group(inner, [member("parts", f"p{i}", "inner", i) for i in range(2)])
    assert drain(broker, "parts", output=b"x") == 2
    sums = queue_base(backend, "sums")
    assert backend.client.hget(sums + "meta", "inner-cb").endswith(b"|W")
    assert backend.client.hget(sums + "wf", "inner-cb") == b"0|5|outerinner"
    assert backend.client.hget(f"{backend.prefix}:ids", "inner-cb") == b"sums"
    assert backend.client.sismember(registry_key(backend.prefix), "sums")
    assert not backend.client.exists(queue_base(backend, "parts") + "ready")
    delivery = fetch_one(broker, "sums")
    assert broker.settle([Settlement(delivery, Outcome.ACK, output=b"sum")]) == [True]
    assert broker.group_state("inner") is None, "released by the callback's closes"
    state = broker.group_state("outer")
    assert state is not None
    assert state.finished == {0}
    assert state.outputs == (b"sum", None)
    assert drain(broker, "other") == 1
    assert leftovers(backend) == {group_key(backend.prefix, "outer")}, "complete, expiring"


def test_then_messages_land_in_other_queues_with_their_records_and_keys(
    backend: Backend, broker: RedisBroker
) -> None:
    broker.enqueue([msg("a", "step1")])
    old = result_keys(backend.prefix, "step2")[0]
    backend.client.set(old, b"stale record")
    then = (
        msg("b", "step2", clear_record=True, priority=3),
        msg("c", "step3", unique=UniqueKey("k")),
        msg("c", "step4", member=GroupMember("nobody", 0)),
    )
    delivery = fetch_one(broker, "a")
    stale = Delivery(delivery.id, "a", delivery.body, "999999", delivery.attempts)
    assert broker.settle([Settlement(stale, Outcome.ACK, then=then)]) == [False]
    assert backend.client.get(old) == b"stale record", "a refused settlement sends nothing"
    applied, _ = broker.settle_and_fetch(
        [Settlement(delivery, Outcome.ACK, then=then)], ["a"], 1, lease=30, wait=0
    )
    assert applied == [True]
    assert not backend.client.exists(old), "clear_record: deleted by the same script"
    assert backend.client.zscore(queue_base(backend, "b") + "ready", b"0000000000000001step2") == -3
    assert backend.client.get(queue_base(backend, "c") + "u:k") == b"step3"
    assert backend.client.hget(queue_base(backend, "c") + "wf", "step4") == b"0|6|nobody"
    assert {b"b", b"c"} <= backend.client.smembers(registry_key(backend.prefix))
    assert drain(broker, "b") == 1
    assert drain(broker, "c") == 2
    assert leftovers(backend) == set()


def test_enqueue_keeps_workflow_records_one_by_one_and_in_batches(
    backend: Backend, broker: RedisBroker
) -> None:
    broker.open_group(GroupSpec("g", 3), [])
    assert broker.enqueue([member("q", "one", "g", 0)]) == [True]
    batch = [msg("q", "plain"), member("q", "two", "g", 1), msg("q", "u", unique=UniqueKey("k"))]
    assert broker.enqueue([*batch, msg("q", "closer", closes="g")]) == [True] * 4
    records = backend.client.hgetall(queue_base(backend, "q") + "wf")
    assert records == {b"one": b"0|1|g", b"two": b"1|1|g", b"closer": b"|0|g"}
    assert backend.client.hget(queue_base(backend, "q") + "meta", "plain").count(b"|") == 4
    assert drain(broker, "q", output=b"o") == 5
    assert broker.group_state("g") is None, "released by the closer"
    assert leftovers(backend) == set()


def test_a_dead_member_is_counted_once_and_keeps_no_record(
    backend: Backend, broker: RedisBroker
) -> None:
    broker.open_group(GroupSpec("g", 2), [member("q", "m0", "g", 0), member("q", "m1", "g", 1)])
    delivery = fetch_one(broker, "q")
    assert broker.settle([Settlement(delivery, Outcome.DEAD, reason="boom", output=b"e")])
    meta = backend.client.hget(queue_base(backend, "q") + "meta", delivery.id)
    assert meta is not None
    assert not meta.endswith(b"W"), "no W flag once dead"
    assert not backend.client.hexists(queue_base(backend, "q") + "wf", delivery.id)
    assert broker.requeue_dead("q") == 1
    assert drain(broker, "q", output=b"ok") == 2
    state = broker.group_state("g")
    assert state is not None
    assert state.failed == {0}
    assert state.outputs == (b"e", b"ok")
    assert not state.callback_sent
    assert leftovers(backend) == {group_key(backend.prefix, "g")}


# -- scripts check before they write -----------------------------------------------------------


@pytest.mark.parametrize("bad", ["score", "wspec", "count"])
def test_a_bad_workflow_block_changes_nothing(
    backend: Backend, broker: RedisBroker, bad: str
) -> None:
    broker.enqueue([msg("a", "j")])
    delivery = fetch_one(broker, "a")
    settlement = Settlement(delivery, Outcome.ACK, then=(msg("b", "next"),), output=b"o")
    calls, _ = broker._settle_calls([settlement], "")
    script, keys, args = calls[0]
    values = list(args)
    start = int(values[-1])  # ARGV index of the block; values[0] is ARGV[1]
    message = start + 3 - 1  # the first message's values
    if bad == "score":
        values[message + 4] = "high"
    elif bad == "wspec":
        values[message + 9] = "9|99|short"
    else:
        values[start + 2 - 1] = "many"
    before = backend.snapshot()
    with pytest.raises(redis.ResponseError, match=r"worq: (bad|missing)"):
        broker._lane.script(script, (len(keys), *keys), values)
    assert backend.snapshot() == before


def test_opening_a_recorded_group_writes_nothing(backend: Backend, broker: RedisBroker) -> None:
    broker.open_group(GroupSpec("g", 1), [])
    before = backend.snapshot()
    with pytest.raises(ValueError, match="already recorded"):
        broker.open_group(GroupSpec("g", 1), [member("q", "m", "g", 0)])
    assert backend.snapshot() == before


# -- the plain path stays as it was --------------------------------------------------------------


def _instrumented(name: str, counter: str) -> Script:
    """Script ``name`` with every ``redis.call`` counted into the key ``counter``."""
    wrapper = (
        f'local function __count(...)\n  redis.call("INCR", "{counter}")\n'
        "  return redis.call(...)\nend\n"
    )
    text = wrapper + SCRIPTS[name].source.replace("redis.call(", "__count(")
    return Script(name, text, hashlib.sha1(text.encode()).hexdigest())


def test_plain_jobs_make_the_calls_they_always_made(
    real_backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One-job enqueue 6, fetch 11, an ack with its record 9, settle_fetch 19 (docs/redis.md)."""
    counter = f"{real_backend.prefix}:calls"
    for attr, name in [
        ("_ENQUEUE", "enqueue"),
        ("_ENQUEUE_ONE", "enqueue_one"),
        ("_FETCH", "fetch"),
        ("_SETTLE", "settle"),
        ("_SETTLE_FETCH", "settle_fetch"),
    ]:
        monkeypatch.setattr(broker_module, attr, _instrumented(name, counter))
    # the settle scripts as the broker picks them (RedisClusterBroker picks other ones)
    monkeypatch.setattr(RedisBroker, "_settle_script", broker_module._SETTLE)
    monkeypatch.setattr(RedisBroker, "_settle_fetch_script", broker_module._SETTLE_FETCH)
    client = real_backend.client
    broker = real_backend.broker()

    def calls(action: Any) -> int:
        client.delete(counter)
        action()
        return int(client.get(counter) or 0)

    broker.enqueue([msg("p", "first")])  # registers the queue
    assert calls(lambda: broker.enqueue([msg("p", "j1")])) == 6
    assert calls(lambda: broker.enqueue([msg("p", "j2")])) == 6
    got: list[Delivery] = []
    assert calls(lambda: got.extend(broker.fetch(["p"], 1, lease=30, wait=0))) == 11
    ack = Settlement(got[0], Outcome.ACK, record=b"r", ttl=60)
    assert calls(lambda: broker.settle([ack])) == 9
    more = broker.fetch(["p"], 1, lease=30, wait=0)
    ack = Settlement(more[0], Outcome.ACK, record=b"r", ttl=60)
    assert calls(lambda: broker.settle_and_fetch([ack], ["p"], 1, lease=30, wait=0)) == 19
    client.delete(counter)
    broker.close()


@pytest.fixture
def counted(real_backend: Backend) -> Iterator[tuple[redis.Redis, Any]]:
    kw = real_backend.client.get_connection_kwargs()
    client, counter = counting_client(f"redis://{kw['host']}:{kw['port']}/{kw.get('db', 0)}")
    yield client, counter
    client.close()


def test_plain_settlements_send_the_arguments_they_always_sent(
    counted: tuple[redis.Redis, Any], real_backend: Backend
) -> None:
    client, counter = counted
    broker = RedisBroker(client, prefix=real_backend.prefix)
    broker.enqueue([msg("a", f"j{n}") for n in range(4)])
    deliveries = broker.fetch(["a"], 4, lease=30, wait=0)
    counter.reset()
    broker.settle([Settlement(deliveries[0], Outcome.ACK)])
    broker.settle(
        [Settlement(deliveries[1], Outcome.RETRY), Settlement(deliveries[2], Outcome.DEAD)]
    )
    broker.settle_and_fetch([Settlement(deliveries[3], Outcome.ACK)], ["a"], 1, lease=30, wait=0)
    scripts = [c for c in counter.commands if c[0] == b"EVALSHA"]
    argc = [len(c) - 3 - int(c[2]) for c in scripts]
    # clock and dead-letter retention, 8 per settlement; settle_fetch: a count and 4 fetch values
    assert argc == [3 + 8, 3 + 8 * 2, 4 + 8 + 4]
    argv = [c[3 + int(c[2]) :] for c in scripts[:2]]  # ARGV[1] first
    outcomes = [argv[0][5], argv[1][5], argv[1][13]]  # ARGV[4 + 2] of each settlement
    assert outcomes == [b"a", b"r", b"d"], "plain outcomes: no workflow blocks"
    assert all(int(c[2]) == 11 for c in scripts), "the queue's keys and the index"


def test_plain_jobs_keep_five_field_meta_and_make_no_workflow_keys(
    backend: Backend, broker: RedisBroker
) -> None:
    broker.enqueue([msg("p", "p1"), msg("p", "p2")])
    deliveries = broker.fetch(["p"], 2, lease=30, wait=0)
    broker.settle(
        [Settlement(deliveries[0], Outcome.RETRY), Settlement(deliveries[1], Outcome.DEAD)]
    )
    assert all(
        len(v.split(b"|")) == 5 for v in backend.client.hvals(queue_base(backend, "p") + "meta")
    )
    names = backend.keys()
    assert not any(k.endswith(":wf") or ":grp:" in k for k in names)
