"""A Hypothesis state machine drives the Lua scripts on real Redis next to the memory reference.

Both brokers share a hand-driven clock (the scripts' test-only time override), and each writes
records into a storage of its own (``Capability.RESULTS``). Every step is applied to both and
their answers must match, job ids being reused across queues, with cancels, progress and records
mixed in. After every step the Redis keys are checked directly: each job in exactly one state of
exactly one queue, the id index naming exactly the jobs held, progress only for leased jobs,
attempts never going backwards, only the current token holding a lease, and no job disappearing
unless it was acknowledged, cancelled, purged or trimmed.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import redis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from redis_support import Backend, Clock, delete_prefix, new_prefix

from worq_core.models import Delivery, Message, Outcome, Settlement
from worq_memory import MemoryBroker, MemoryStorage
from worq_redis import RedisBroker, RedisSettings, RedisStorage

QUEUES = ("a", "b")
DEAD_MAX_COUNT = 3
DEAD_MAX_AGE = 8.0
RECORD_TTL = 3600.0  # records never expire during a run (Redis keeps real time for TTLs)
STATE_SETS = {"q": "ready", "s": "delayed", "r": "delayed", "l": "leased", "d": "dead"}
records = st.one_of(st.none(), st.binary(max_size=4))


@dataclass
class Pair:
    """The same lease as seen by both brokers."""

    memory: Delivery
    redis: Delivery


class Machine(RuleBasedStateMachine):
    client: redis.Redis | None = None  # set by the test before the machine runs

    def __init__(self) -> None:
        super().__init__()
        assert Machine.client is not None
        self.clock = Clock()
        self.prefix = new_prefix()
        self.memory_storage = MemoryStorage(clock=self.clock)
        self.memory = MemoryBroker(
            clock=self.clock,
            dead_max_count=DEAD_MAX_COUNT,
            dead_max_age=DEAD_MAX_AGE,
            storage=self.memory_storage,
        )
        self.redis = RedisBroker(
            Machine.client,
            RedisSettings(
                prefix=self.prefix, dead_max_count=DEAD_MAX_COUNT, dead_max_age=DEAD_MAX_AGE
            ),
            clock=self.clock,
        )
        self.redis_storage = RedisStorage(Machine.client, prefix=self.prefix)
        assert self.memory.stores_results_in(self.memory_storage)
        assert self.redis.stores_results_in(self.redis_storage)
        self.ids: list[str] = []  # every id ever used, in order
        self.leases: list[Pair] = []
        self.delivered: dict[str, int] = {}  # attempts of each job's latest delivery

    def teardown(self) -> None:
        assert Machine.client is not None
        delete_prefix(Machine.client, self.prefix)

    # -- rules -------------------------------------------------------------------------------

    @rule(
        queue=st.sampled_from(QUEUES),
        priority=st.integers(-2, 2),
        delay=st.sampled_from([None, None, -1.0, 0.5, 2.0]),
        count=st.integers(1, 3),
        reuse=st.booleans(),
        clear=st.booleans(),
        data=st.data(),
    )
    def enqueue(
        self,
        queue: str,
        priority: int,
        delay: float | None,
        count: int,
        reuse: bool,
        clear: bool,
        data: st.DataObject,
    ) -> None:
        messages = []
        for n in range(count):
            if reuse and self.ids:
                # An id comes back in either queue: ids are unique across queues.
                job_id = data.draw(st.sampled_from(self.ids))
                target = data.draw(st.sampled_from(QUEUES))
            else:
                job_id = f"j{len(self.ids)}-{n}"
                target = queue
                self.ids.append(job_id)
            eta = None if delay is None else self.clock.now + delay
            messages.append(Message(job_id, target, job_id.encode(), priority, eta, clear))
        added = self.redis.enqueue(messages)
        assert added == self.memory.enqueue(messages)
        for message, new in zip(messages, added, strict=True):
            if new:  # an id that comes back after an ack starts its attempts again
                self.delivered[message.id] = 0

    @rule(
        queues=st.permutations(QUEUES),
        limit=st.integers(1, 4),
        lease=st.sampled_from([1.0, 3.0]),
    )
    def fetch(self, queues: list[str], limit: int, lease: float) -> None:
        got_memory = self.memory.fetch(queues, limit, lease=lease, wait=0)
        got_redis = self.redis.fetch(queues, limit, lease=lease, wait=0)
        assert [(d.id, d.queue, d.body, d.attempts, d.cancel_requested) for d in got_redis] == [
            (d.id, d.queue, d.body, d.attempts, d.cancel_requested) for d in got_memory
        ]
        for m, r in zip(got_memory, got_redis, strict=True):
            assert r.attempts > self.delivered.get(r.id, 0), "attempts went backwards"
            self.delivered[r.id] = r.attempts
            self.leases.append(Pair(m, r))

    @precondition(lambda self: self.leases)
    @rule(
        data=st.data(),
        outcome=st.sampled_from(list(Outcome)),
        delay=st.sampled_from([0.0, 1.0]),
        record=records,
    )
    def settle(
        self, data: st.DataObject, outcome: Outcome, delay: float, record: bytes | None
    ) -> None:
        pair = data.draw(st.sampled_from(self.leases))
        ttl = RECORD_TTL if record is not None else 0.0
        expected = self.memory.settle([Settlement(pair.memory, outcome, delay, "why", record, ttl)])
        got = self.redis.settle([Settlement(pair.redis, outcome, delay, "why", record, ttl)])
        assert got == expected

    @precondition(lambda self: self.leases)
    @rule(data=st.data())
    def settle_many(self, data: st.DataObject) -> None:
        """Several settlements in one call, as a worker settling a batch sends them: mostly
        acks (the script applies plain acks together), with retries, deaths, stale tokens and
        the same lease twice mixed in, per queue in the order given."""
        settlement = st.tuples(
            st.sampled_from(self.leases),
            st.sampled_from([Outcome.ACK, Outcome.ACK, Outcome.ACK, Outcome.RETRY, Outcome.DEAD]),
            records,
        )
        chosen = data.draw(st.lists(settlement, min_size=2, max_size=6))
        made = []
        for pair, outcome, record in chosen:
            ttl = RECORD_TTL if record is not None else 0.0
            made.append(
                (
                    Settlement(pair.memory, outcome, 1.0, "why", record, ttl),
                    Settlement(pair.redis, outcome, 1.0, "why", record, ttl),
                )
            )
        expected = self.memory.settle([m for m, _ in made])
        assert self.redis.settle([r for _, r in made]) == expected

    @precondition(lambda self: self.leases)
    @rule(data=st.data(), lease=st.sampled_from([1.0, 3.0]))
    def extend(self, data: st.DataObject, lease: float) -> None:
        pairs = data.draw(st.lists(st.sampled_from(self.leases), min_size=1, max_size=3))
        progress = data.draw(
            st.dictionaries(st.sampled_from([p.redis.id for p in pairs]), st.binary(max_size=3))
        )
        expected = self.memory.extend([p.memory for p in pairs], lease, progress)
        assert self.redis.extend([p.redis for p in pairs], lease, progress) == expected

    @precondition(lambda self: self.leases)
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        pairs = data.draw(st.lists(st.sampled_from(self.leases), min_size=1, max_size=2))
        now = self.clock.now
        for pair in pairs:  # a release takes its fetch back: the next delivery repeats it
            job = self.memory._jobs.get(pair.memory.id)
            if job is not None and job.token == pair.memory.token and job.lease_until > now:
                self.delivered[pair.memory.id] = job.attempts - 1
        self.memory.release([p.memory for p in pairs])
        self.redis.release([p.redis for p in pairs])

    @precondition(lambda self: self.ids)
    @rule(data=st.data(), record=records)
    def cancel(self, data: st.DataObject, record: bytes | None) -> None:
        job_id = data.draw(st.sampled_from(self.ids))
        ttl = RECORD_TTL if record is not None else 0.0
        expected = self.memory.cancel(job_id, record, ttl)
        assert self.redis.cancel(job_id, record, ttl) is expected

    @rule(queue=st.sampled_from(QUEUES))
    def reap(self, queue: str) -> None:
        self.redis.reap(queue)  # the reference reaps on every call; this makes Redis catch up

    @rule(seconds=st.sampled_from([0.25, 0.5, 1.0, 3.0]))
    def advance_time(self, seconds: float) -> None:
        self.clock.now += seconds

    @rule(queue=st.sampled_from(QUEUES), only_some=st.booleans())
    def requeue_dead(self, queue: str, only_some: bool) -> None:
        dead = [d.id for d in self.memory.dead_jobs(queue)]
        ids = dead[:1] if only_some else None
        for job_id in dead if ids is None else ids:
            self.delivered[job_id] = 0  # attempts start again
        assert self.redis.requeue_dead(queue, ids) == self.memory.requeue_dead(queue, ids)

    @rule(queue=st.sampled_from(QUEUES))
    def purge_dead(self, queue: str) -> None:
        assert self.redis.purge_dead(queue) == self.memory.purge_dead(queue)

    # -- invariants --------------------------------------------------------------------------

    @invariant()
    def consistent_and_like_the_reference(self) -> None:
        """The checks, in this order: the Redis keys and leases first, as the step left them;
        then the brokers' views, starting with ``stats``, where both apply dead-letter retention
        (the reference also applies it lazily in ``job_state``, Redis only where it reads or
        settles dead jobs)."""
        self.each_job_in_exactly_one_state_of_one_queue_and_in_the_index()
        self.only_the_current_token_holds_a_lease()
        self.same_view_as_the_reference()

    def same_view_as_the_reference(self) -> None:
        assert self.redis.stats(list(QUEUES)) == self.memory.stats(list(QUEUES))
        for queue in QUEUES:
            assert self.redis.dead_jobs(queue) == self.memory.dead_jobs(queue)
        for job_id in self.ids:
            assert self.redis.job_state(job_id) == self.memory.job_state(job_id), job_id
            assert self.redis_storage.load(job_id) == self.memory_storage.load(job_id), job_id
            assert self.redis.job_status(job_id, self.redis_storage) == self.memory.job_status(
                job_id, self.memory_storage
            )
        # so no job disappears unless it was acknowledged, cancelled, purged or trimmed

    def each_job_in_exactly_one_state_of_one_queue_and_in_the_index(self) -> None:
        client = Machine.client
        assert client is not None
        index = {k.decode(): v.decode() for k, v in client.hgetall(f"{self.prefix}:ids").items()}
        seen: dict[str, str] = {}
        for queue in QUEUES:
            base = f"{self.prefix}:{{{queue}}}:"
            meta = {k.decode(): v.decode() for k, v in client.hgetall(base + "meta").items()}
            bodies = {k.decode() for k in client.hkeys(base + "jobs")}
            progress = {k.decode() for k in client.hkeys(base + "progress")}
            reasons = {k.decode() for k in client.hkeys(base + "reason")}
            members = {
                "ready": {m[16:].decode() for m in client.zrange(base + "ready", 0, -1)},
                "delayed": {m.decode() for m in client.zrange(base + "delayed", 0, -1)},
                "leased": {m.decode() for m in client.zrange(base + "leased", 0, -1)},
                "dead": {m.decode() for m in client.zrange(base + "dead", 0, -1)},
            }
            assert bodies == set(meta)
            for job_id, packed in meta.items():
                fields = packed.split("|")
                state, attempts = fields[0], int(fields[1])
                flags = fields[5] if len(fields) > 5 else ""
                assert len(fields) in (5, 6), packed
                assert len(fields) == 5 or flags, "flags are written only when there are some"
                holders = [name for name, ids in members.items() if job_id in ids]
                assert holders == [STATE_SETS[state]], (job_id, packed, holders)
                assert attempts == self.memory._jobs[job_id].attempts
                assert ("p" in flags) == (job_id in progress), (job_id, packed)
                assert "p" not in flags or state == "l", "progress only while leased"
                assert "c" not in flags or state in "lqr", "a cancel request ends unless retried"
                assert job_id not in seen, f"{job_id} in queues {seen.get(job_id)} and {queue}"
                seen[job_id] = queue
            for ids in members.values():
                assert ids <= set(meta), "a sorted set names a job with no state"
            assert progress <= set(meta)
            # an ack skips deleting the reason of a first attempt: it never has one
            assert reasons <= set(meta), "a reason outlived its job"
        assert index == seen, "the id index names exactly the jobs held, with their queue"

    def only_the_current_token_holds_a_lease(self) -> None:
        client = Machine.client
        assert client is not None
        now = self.clock.now
        for pair in self.leases:
            job = self.memory._jobs.get(pair.memory.id)
            expected = (
                job is not None
                and job.token == pair.memory.token
                and job.lease_until > now
                and job.queue.name == pair.memory.queue
            )
            base = f"{self.prefix}:{{{pair.redis.queue}}}:"
            packed = client.hget(base + "meta", pair.redis.id)
            deadline = client.zscore(base + "leased", pair.redis.id)
            fields = packed.decode().split("|") if packed else []
            holds = (
                bool(fields)
                and fields[0] == "l"
                and fields[4] == pair.redis.token
                and deadline is not None
                and deadline > now
            )
            assert holds == expected, (pair, packed, deadline)


def test_the_scripts_behave_like_the_reference_broker(real_backend: Backend) -> None:
    Machine.client = real_backend.client
    try:
        run_state_machine_as_test(
            Machine,
            settings=settings(
                max_examples=60,
                stateful_step_count=30,
                deadline=None,
                suppress_health_check=[HealthCheck.too_slow],
            ),
        )
    finally:
        Machine.client = None


@pytest.mark.parametrize("kind", ["fakeredis"])
def test_the_scripts_behave_like_the_reference_broker_on_fakeredis(kind: str) -> None:
    fakeredis = pytest.importorskip("fakeredis")
    Machine.client = fakeredis.FakeRedis(server=fakeredis.FakeServer())
    try:
        run_state_machine_as_test(
            Machine,
            settings=settings(max_examples=15, stateful_step_count=30, deadline=None),
        )
    finally:
        Machine.client = None
