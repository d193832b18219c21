"""A Hypothesis state machine checks the memory broker against a plain model of the contract.

Job ids come from a small pool spread over two queues, so ids collide across queues, are
cancelled, acked and reused; the broker writes records into its storage, which the model
follows too.
"""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    multiple,
    rule,
)

from worq_core import (
    CancelOutcome,
    Delivery,
    JobState,
    JobStatus,
    LeaseState,
    Message,
    Outcome,
    Settlement,
)
from worq_memory import MemoryBroker, MemoryStorage

QUEUES = ("a", "b")
IDS = tuple(f"job-{i}" for i in range(6))
ORDERS = (("a",), ("b",), ("a", "b"), ("b", "a"))


@dataclass
class Expected:
    queue: str
    priority: int
    state: JobStatus = JobStatus.QUEUED
    attempts: int = 0
    token: str = ""
    lease_until: float = 0.0
    due: float = 0.0
    progress: bytes | None = None
    cancel_requested: bool = False


class BrokerModel(RuleBasedStateMachine):
    deliveries = Bundle("deliveries")

    @initialize()
    def start(self) -> None:
        self.now = 1_000.0
        self.storage = MemoryStorage(clock=lambda: self.now)
        self.broker = MemoryBroker(clock=lambda: self.now, storage=self.storage)
        self.jobs: dict[str, Expected] = {}
        self.records: dict[str, tuple[bytes, float]] = {}  # id -> (record, expires)
        self.used: set[str] = set()  # queues that ever held a job
        self.serial = 0

    def effective(self, job: Expected) -> JobStatus:
        """The state a job is in at ``now``: expired leases and due delays count as queued."""
        if job.state is JobStatus.RUNNING and job.lease_until <= self.now:
            return JobStatus.QUEUED
        if job.state in (JobStatus.SCHEDULED, JobStatus.RETRYING) and job.due <= self.now:
            return JobStatus.QUEUED
        return job.state

    def holds(self, delivery: Delivery) -> bool:
        job = self.jobs.get(delivery.id)
        return (
            job is not None
            and self.effective(job) is JobStatus.RUNNING
            and job.token == delivery.token
        )

    def record(self, job_id: str, data: bytes, ttl: float) -> None:
        self.records[job_id] = (data, self.now + ttl)

    # -- rules ---------------------------------------------------------------------------------

    @rule(
        job_id=st.sampled_from(IDS),
        queue=st.sampled_from(QUEUES),
        priority=st.integers(0, 3),
        delay=st.sampled_from([0, 0, 5, 30]),
        clear_record=st.booleans(),
    )
    def enqueue(
        self, job_id: str, queue: str, priority: int, delay: float, clear_record: bool
    ) -> None:
        self.serial += 1
        body = f"{job_id}@{self.serial}".encode()
        eta = self.now + delay if delay else None
        msg = Message(job_id, queue, body, priority, eta, clear_record)
        added = job_id not in self.jobs
        assert self.broker.enqueue([msg]) == [added], "an id is unique across all queues"
        if not added:
            return
        state = JobStatus.SCHEDULED if delay else JobStatus.QUEUED
        self.jobs[job_id] = Expected(queue, priority, state, due=self.now + delay)
        self.used.add(queue)
        if clear_record:
            self.records.pop(job_id, None)

    @rule(
        target=deliveries,
        order=st.sampled_from(ORDERS),
        limit=st.integers(1, 4),
        lease=st.sampled_from([5, 20, 60]),
    )
    def fetch(self, order: tuple[str, ...], limit: int, lease: float) -> object:
        got = self.broker.fetch(list(order), limit, lease=lease, wait=0)
        expected_queues: list[str] = []
        for queue in order:
            due = [
                i
                for i, job in self.jobs.items()
                if job.queue == queue and self.effective(job) is JobStatus.QUEUED
            ]
            taken = [d for d in got if d.queue == queue]
            assert len(taken) == min(limit - len(expected_queues), len(due))
            assert {d.id for d in taken} <= set(due)
            left = [self.jobs[i].priority for i in due if i not in {d.id for d in taken}]
            assert all(self.jobs[d.id].priority >= max(left, default=0) for d in taken)
            expected_queues += [queue] * len(taken)
        assert [d.queue for d in got] == expected_queues, "queues in the order given"
        for delivery in got:
            job = self.jobs[delivery.id]
            job.attempts += 1
            assert delivery.attempts == job.attempts, "attempts are counted at every fetch"
            assert delivery.body.startswith(delivery.id.encode() + b"@")
            assert delivery.cancel_requested == job.cancel_requested
            job.state, job.token = JobStatus.RUNNING, delivery.token
            job.lease_until, job.progress = self.now + lease, None
        return multiple(*got)

    @rule(
        delivery=deliveries,
        outcome=st.sampled_from(list(Outcome)),
        delay=st.sampled_from([0, 10]),
        ttl=st.sampled_from([5, 100]),
    )
    def settle(self, delivery: Delivery, outcome: Outcome, delay: float, ttl: float) -> None:
        current = self.holds(delivery)
        data = f"{outcome}:{delivery.token}".encode()
        settlement = Settlement(delivery, outcome, delay, "reason", record=data, ttl=ttl)
        applied = self.broker.settle([settlement])
        assert applied == [current], "only the current, unexpired token may settle"
        if not current:
            return
        self.record(delivery.id, data, ttl)
        job = self.jobs[delivery.id]
        job.token, job.progress = "", None
        if outcome is not Outcome.RETRY:
            job.cancel_requested = False
        if outcome is Outcome.ACK:
            del self.jobs[delivery.id]
        elif outcome is Outcome.RETRY:
            job.state, job.due = JobStatus.RETRYING, self.now + delay
        else:
            job.state = JobStatus.DEAD

    @rule(
        delivery=deliveries,
        lease=st.sampled_from([5, 60]),
        progress=st.none() | st.binary(max_size=3),
    )
    def extend(self, delivery: Delivery, lease: float, progress: bytes | None) -> None:
        current = self.holds(delivery)
        reported = None if progress is None else {delivery.id: progress}
        [state] = self.broker.extend([delivery], lease, reported)
        if not current:
            assert state is LeaseState.LOST
            return
        job = self.jobs[delivery.id]
        assert state is (LeaseState.CANCELLING if job.cancel_requested else LeaseState.HELD)
        job.lease_until = self.now + lease
        if progress is not None:
            job.progress = progress

    @rule(delivery=consumes(deliveries))
    def release(self, delivery: Delivery) -> None:
        current = self.holds(delivery)
        self.broker.release([delivery])
        if current:
            job = self.jobs[delivery.id]
            job.state, job.token, job.progress = JobStatus.QUEUED, "", None
            job.attempts -= 1

    @rule(delivery=deliveries, with_record=st.booleans())
    def cancel_a_fetched_job(self, delivery: Delivery, with_record: bool) -> None:
        self.cancel(delivery.id, with_record)

    @rule(job_id=st.sampled_from(IDS), with_record=st.booleans())
    def cancel(self, job_id: str, with_record: bool) -> None:
        data = f"cancelled@{self.now}".encode() if with_record else None
        outcome = self.broker.cancel(job_id, data, ttl=50)
        job = self.jobs.get(job_id)
        state = None if job is None else self.effective(job)
        if job is None or state is JobStatus.DEAD:
            assert outcome is CancelOutcome.NOT_FOUND
        elif state is JobStatus.RUNNING:
            assert outcome is CancelOutcome.REQUESTED
            job.cancel_requested = True
        else:
            assert outcome is CancelOutcome.REMOVED
            del self.jobs[job_id]
            if data is not None:
                self.record(job_id, data, 50)

    @rule(seconds=st.sampled_from([1, 5, 15, 61]))
    def advance_time(self, seconds: float) -> None:
        self.now += seconds

    @rule(queue=st.sampled_from(QUEUES))
    def requeue_dead(self, queue: str) -> None:
        dead = [
            i for i, job in self.jobs.items() if job.queue == queue and job.state is JobStatus.DEAD
        ]
        assert self.broker.requeue_dead(queue) == len(dead)
        for job_id in dead:
            self.jobs[job_id].state, self.jobs[job_id].attempts = JobStatus.QUEUED, 0

    @rule(queue=st.sampled_from(QUEUES))
    def purge_dead(self, queue: str) -> None:
        dead = [
            i for i, job in self.jobs.items() if job.queue == queue and job.state is JobStatus.DEAD
        ]
        assert self.broker.purge_dead(queue) == len(dead)
        for job_id in dead:
            del self.jobs[job_id]

    # -- invariants ----------------------------------------------------------------------------

    @invariant()
    def every_job_is_in_exactly_the_state_the_model_says(self) -> None:
        if not hasattr(self, "broker"):
            return
        for job_id in IDS:
            job = self.jobs.get(job_id)
            expected = None
            if job is not None:
                state = self.effective(job)
                progress = job.progress if state is JobStatus.RUNNING else None
                expected = JobState(job.queue, state, job.attempts, progress, job.cancel_requested)
            assert self.broker.job_state(job_id) == expected, job_id

    @invariant()
    def the_broker_wrote_exactly_the_records_the_model_says(self) -> None:
        if not hasattr(self, "broker"):
            return
        for job_id in IDS:
            data, expires = self.records.get(job_id, (None, 0.0))
            expected = data if expires > self.now else None
            assert self.storage.load(job_id) == expected, job_id
            state, record = self.broker.job_status(job_id, self.storage)
            assert (state, record) == (self.broker.job_state(job_id), expected)

    @invariant()
    def the_counts_add_up_and_nothing_disappears(self) -> None:
        if not hasattr(self, "broker"):
            return
        for stats in self.broker.stats(QUEUES):
            states = [self.effective(j) for j in self.jobs.values() if j.queue == stats.queue]
            assert stats.ready == states.count(JobStatus.QUEUED)
            assert stats.delayed == states.count(JobStatus.SCHEDULED) + states.count(
                JobStatus.RETRYING
            )
            assert stats.running == states.count(JobStatus.RUNNING)
            assert stats.dead == states.count(JobStatus.DEAD)
        assert {s.queue for s in self.broker.stats()} == self.used, "only queues that held jobs"


BrokerModel.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
test_memory_broker_follows_the_model = BrokerModel.TestCase
