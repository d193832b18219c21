"""A Hypothesis state machine checks the memory broker against a plain model of the contract."""

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

from worq_core import Delivery, JobStatus, Message, Outcome, Settlement
from worq_memory import MemoryBroker

QUEUE = "model"


@dataclass
class Expected:
    priority: int
    state: JobStatus = JobStatus.QUEUED
    attempts: int = 0
    token: str = ""
    lease_until: float = 0.0
    due: float = 0.0


class BrokerModel(RuleBasedStateMachine):
    deliveries = Bundle("deliveries")

    @initialize()
    def start(self) -> None:
        self.now = 1_000.0
        self.broker = MemoryBroker(clock=lambda: self.now)
        self.jobs: dict[str, Expected] = {}
        self.serial = 0

    def effective(self, job: Expected) -> JobStatus:
        """The state a job is in at ``now``: expired leases and due delays count as queued."""
        if job.state is JobStatus.RUNNING and job.lease_until <= self.now:
            return JobStatus.QUEUED
        if job.state in (JobStatus.SCHEDULED, JobStatus.RETRYING) and job.due <= self.now:
            return JobStatus.QUEUED
        return job.state

    # -- rules ---------------------------------------------------------------------------------

    @rule(priority=st.integers(0, 3), delay=st.sampled_from([0, 0, 5, 30]))
    def enqueue(self, priority: int, delay: float) -> None:
        self.serial += 1
        job_id = f"job-{self.serial}"
        eta = self.now + delay if delay else None
        assert self.broker.enqueue([Message(job_id, QUEUE, job_id.encode(), priority, eta)]) == [
            True
        ]
        state = JobStatus.SCHEDULED if delay else JobStatus.QUEUED
        self.jobs[job_id] = Expected(priority, state, due=self.now + delay)

    @rule(target=deliveries, limit=st.integers(1, 4), lease=st.sampled_from([5, 20, 60]))
    def fetch(self, limit: int, lease: float) -> object:
        due = [i for i, job in self.jobs.items() if self.effective(job) is JobStatus.QUEUED]
        got = self.broker.fetch([QUEUE], limit, lease=lease, wait=0)
        assert len(got) == min(limit, len(due))
        assert {d.id for d in got} <= set(due)
        left = [self.jobs[i].priority for i in due if i not in {d.id for d in got}]
        assert all(self.jobs[d.id].priority >= max(left, default=0) for d in got)
        for delivery in got:
            job = self.jobs[delivery.id]
            job.attempts += 1
            assert delivery.attempts == job.attempts, "attempts are counted at every fetch"
            assert delivery.body == delivery.id.encode()
            job.state, job.token, job.lease_until = (
                JobStatus.RUNNING,
                delivery.token,
                self.now + lease,
            )
        return multiple(*got)

    def holds(self, delivery: Delivery) -> bool:
        job = self.jobs.get(delivery.id)
        return (
            job is not None
            and self.effective(job) is JobStatus.RUNNING
            and job.token == delivery.token
        )

    @rule(
        delivery=deliveries, outcome=st.sampled_from(list(Outcome)), delay=st.sampled_from([0, 10])
    )
    def settle(self, delivery: Delivery, outcome: Outcome, delay: float) -> None:
        current = self.holds(delivery)
        applied = self.broker.settle([Settlement(delivery, outcome, delay, "reason")])
        assert applied == [current], "only the current, unexpired token may settle"
        if not current:
            return
        job = self.jobs[delivery.id]
        job.token = ""
        if outcome is Outcome.ACK:
            del self.jobs[delivery.id]
        elif outcome is Outcome.RETRY:
            job.state, job.due = JobStatus.RETRYING, self.now + delay
        else:
            job.state = JobStatus.DEAD

    @rule(delivery=deliveries, lease=st.sampled_from([5, 60]))
    def extend(self, delivery: Delivery, lease: float) -> None:
        current = self.holds(delivery)
        assert self.broker.extend([delivery], lease) == [current]
        if current:
            self.jobs[delivery.id].lease_until = self.now + lease

    @rule(delivery=consumes(deliveries))
    def release(self, delivery: Delivery) -> None:
        current = self.holds(delivery)
        self.broker.release([delivery])
        if current:
            job = self.jobs[delivery.id]
            job.state, job.token = JobStatus.QUEUED, ""
            job.attempts -= 1

    @rule(seconds=st.sampled_from([1, 5, 15, 61]))
    def advance_time(self, seconds: float) -> None:
        self.now += seconds

    @rule()
    def requeue_dead(self) -> None:
        dead = [i for i, job in self.jobs.items() if job.state is JobStatus.DEAD]
        assert self.broker.requeue_dead(QUEUE) == len(dead)
        for job_id in dead:
            self.jobs[job_id].state, self.jobs[job_id].attempts = JobStatus.QUEUED, 0

    # -- invariants ----------------------------------------------------------------------------

    @invariant()
    def every_job_is_in_exactly_the_state_the_model_says(self) -> None:
        for job_id, job in self.jobs.items():
            assert self.broker.job_state(QUEUE, job_id) is self.effective(job), job_id

    @invariant()
    def the_counts_add_up_and_nothing_disappears(self) -> None:
        if not hasattr(self, "broker"):
            return
        [stats] = self.broker.stats([QUEUE])
        states = [self.effective(job) for job in self.jobs.values()]
        assert stats.ready == states.count(JobStatus.QUEUED)
        assert stats.delayed == states.count(JobStatus.SCHEDULED) + states.count(JobStatus.RETRYING)
        assert stats.running == states.count(JobStatus.RUNNING)
        assert stats.dead == states.count(JobStatus.DEAD)


BrokerModel.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
test_memory_broker_follows_the_model = BrokerModel.TestCase
