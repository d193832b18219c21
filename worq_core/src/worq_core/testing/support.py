"""Helpers shared by the contract classes."""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence

import pytest

from worq_core.broker import Broker
from worq_core.models import Capability, Delivery, JobStatus
from worq_core.worker import Worker

#: Slack for comparing the test's clock with the broker's (a server may keep its own time).
CLOCK_SLACK = 0.05
#: The lease of a delivery that no case lets run out.
LEASE = 30.0
#: A lease short enough for a case to wait out.
SHORT_LEASE = 0.3
#: How long a case waits for what must arrive.
WAIT = 5.0


def ids(deliveries: Sequence[Delivery]) -> list[str]:
    """The job ids of ``deliveries``, in order."""
    return [d.id for d in deliveries]


def status(broker: Broker, job_id: str) -> JobStatus | None:
    """The job's status in ``broker``, or ``None`` when the broker does not hold it."""
    state = broker.job_state(job_id)
    return None if state is None else state.status


def fetch_all(broker: Broker, queue: str, lease: float = LEASE) -> list[Delivery]:
    """Lease every job of ``queue`` that may be delivered now (up to 100)."""
    return broker.fetch([queue], 100, lease=lease, wait=0)


def requires(*capabilities: Capability) -> pytest.MarkDecorator:
    """Mark a contract case as needing broker capabilities; it is skipped without them."""
    return pytest.mark.worq_requires(*capabilities)


def skip_without_capabilities(request: pytest.FixtureRequest, broker: Broker) -> None:
    """Skip the running test if it needs a capability ``broker`` does not declare."""
    for mark in request.node.iter_markers("worq_requires"):
        missing = [c for c in mark.args if c not in broker.capabilities]
        if missing:
            pytest.skip(f"{type(broker).__name__} does not declare {', '.join(missing)}")


class BrokerCases:
    """What every contract that runs against a broker shares: capability skips, own queues."""

    @pytest.fixture(autouse=True)
    def _capabilities(self, request: pytest.FixtureRequest, broker: Broker) -> None:
        skip_without_capabilities(request, broker)

    @pytest.fixture
    def queue(self) -> str:
        """A queue name no other case uses."""
        return unique("contract")


def unique(prefix: str = "q") -> str:
    """A name no other test uses, so backends shared between tests never mix their jobs."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def eventually(condition: Callable[[], bool], timeout: float = 5.0, what: str = "") -> None:
    """Wait until ``condition()`` holds, failing after ``timeout`` seconds.

    Only for states with nothing to wait on (like a TTL running out); everything else waits on
    an event.
    """
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what or condition}")
        time.sleep(0.01)


@contextlib.contextmanager
def running(worker: Worker, timeout: float = 30.0) -> Iterator[Worker]:
    """Run ``worker`` on a thread for the duration of the block, then stop it and join."""
    failure: list[BaseException] = []

    def target() -> None:
        try:
            worker.run()
        except BaseException as exc:  # noqa: BLE001 - re-raised on the test's thread below
            failure.append(exc)

    thread = threading.Thread(target=target, name="worq-contract-worker", daemon=True)
    thread.start()
    try:
        yield worker
    finally:
        if not worker.stopping:
            worker.stop()
        thread.join(timeout)
        if thread.is_alive():
            worker.stop()
            thread.join(timeout)
        assert not thread.is_alive(), "the worker did not stop"
        if failure:
            raise failure[0]
