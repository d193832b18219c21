"""A Hypothesis state machine drives the Lua scripts on real Redis next to the memory reference.

Both brokers share a hand-driven clock (the scripts' test-only time override). Every step is
applied to both and their answers must match; after every step the Redis keys are checked
directly: each job in exactly one state, attempts never go backwards, only the current token
can settle, and no job disappears unless it was acknowledged, purged or trimmed.
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
from redis_support import Backend, delete_prefix, new_prefix

from worq_core.models import Delivery, Message, Outcome, Settlement
from worq_memory import MemoryBroker
from worq_redis import RedisBroker, RedisSettings

QUEUES = ("a", "b")
DEAD_MAX_COUNT = 3
DEAD_MAX_AGE = 8.0
STATE_SETS = {"q": "ready", "s": "delayed", "r": "delayed", "l": "leased", "d": "dead"}


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


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
        self.memory = MemoryBroker(
            clock=self.clock, dead_max_count=DEAD_MAX_COUNT, dead_max_age=DEAD_MAX_AGE
        )
        self.redis = RedisBroker(
            Machine.client,
            RedisSettings(
                prefix=self.prefix, dead_max_count=DEAD_MAX_COUNT, dead_max_age=DEAD_MAX_AGE
            ),
            clock=self.clock,
        )
        self.queue_of: dict[str, str] = {}  # every id ever used, and its queue
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
    )
    def enqueue(
        self, queue: str, priority: int, delay: float | None, count: int, reuse: bool
    ) -> None:
        messages = []
        for _ in range(count):
            if reuse and self.queue_of:
                # An id is reused within its own queue: Redis keeps ids per queue, where the
                # reference keeps them across queues (see docs/redis.md).
                job_id = sorted(self.queue_of)[len(messages) % len(self.queue_of)]
                target = self.queue_of[job_id]
            else:
                job_id = f"j{len(self.queue_of)}-{len(messages)}"
                target = queue
            self.queue_of.setdefault(job_id, target)
            eta = None if delay is None else self.clock.now + delay
            messages.append(Message(job_id, target, job_id.encode(), priority, eta))
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
        assert [(d.id, d.queue, d.body, d.attempts) for d in got_redis] == [
            (d.id, d.queue, d.body, d.attempts) for d in got_memory
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
    )
    def settle(self, data: st.DataObject, outcome: Outcome, delay: float) -> None:
        pair = data.draw(st.sampled_from(self.leases))
        expected = self.memory.settle([Settlement(pair.memory, outcome, delay, "why")])
        assert self.redis.settle([Settlement(pair.redis, outcome, delay, "why")]) == expected

    @precondition(lambda self: self.leases)
    @rule(data=st.data(), lease=st.sampled_from([1.0, 3.0]))
    def extend(self, data: st.DataObject, lease: float) -> None:
        pairs = data.draw(st.lists(st.sampled_from(self.leases), min_size=1, max_size=3))
        expected = self.memory.extend([p.memory for p in pairs], lease)
        assert self.redis.extend([p.redis for p in pairs], lease) == expected

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
    def same_view_as_the_reference(self) -> None:
        assert self.redis.stats(list(QUEUES)) == self.memory.stats(list(QUEUES))
        for queue in QUEUES:
            assert self.redis.dead_jobs(queue) == self.memory.dead_jobs(queue)
        for job_id, queue in self.queue_of.items():
            assert self.redis.job_state(queue, job_id) == self.memory.job_state(queue, job_id)

    @invariant()
    def each_job_in_exactly_one_state_with_the_reference_attempts(self) -> None:
        client = Machine.client
        assert client is not None
        for queue in QUEUES:
            base = f"{self.prefix}:{{{queue}}}:"
            meta = {k.decode(): v.decode() for k, v in client.hgetall(base + "meta").items()}
            bodies = {k.decode() for k in client.hkeys(base + "jobs")}
            members = {
                "ready": {m[16:].decode() for m in client.zrange(base + "ready", 0, -1)},
                "delayed": {m.decode() for m in client.zrange(base + "delayed", 0, -1)},
                "leased": {m.decode() for m in client.zrange(base + "leased", 0, -1)},
                "dead": {m.decode() for m in client.zrange(base + "dead", 0, -1)},
            }
            assert bodies == set(meta)
            for job_id, packed in meta.items():
                state, attempts = packed.split("|")[0], int(packed.split("|")[1])
                holders = [name for name, ids in members.items() if job_id in ids]
                assert holders == [STATE_SETS[state]], (job_id, packed, holders)
                assert attempts == self.memory._jobs[job_id].attempts
            for ids in members.values():
                assert ids <= set(meta), "a sorted set names a job with no state"

    @invariant()
    def nothing_disappears(self) -> None:
        for job_id, queue in self.queue_of.items():
            held = self.memory.job_state(queue, job_id) is not None
            assert (self.redis.job_state(queue, job_id) is not None) == held, job_id

    @invariant()
    def only_the_current_token_holds_a_lease(self) -> None:
        client = Machine.client
        assert client is not None
        now = self.clock.now
        for pair in self.leases:
            job = self.memory._jobs.get(pair.memory.id)
            expected = job is not None and job.token == pair.memory.token and job.lease_until > now
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
