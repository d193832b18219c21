"""The shop's tasks, run through a real worker on the in-memory broker."""

from __future__ import annotations

import pytest
from app import OUTBOX, charge, place_order, refund

from worq_core import JobFailed, JobStatus
from worq_core.testing import Drainer


def test_an_order_is_totalled_and_its_receipt_sent(worker: Drainer) -> None:
    job = place_order.enqueue("A-1", [300, 150])
    assert OUTBOX == []  # nothing runs until the queues are drained
    assert worker.drain() == 2  # the order, then the receipt job it enqueued
    assert job.result(timeout=0) == 450
    assert OUTBOX == ["A-1: 450"]


def test_a_refused_charge_is_retried(worker: Drainer) -> None:
    job = charge.enqueue("A-2")
    assert worker.drain() == 2  # one failed attempt, one success
    assert job.result(timeout=0) == 2


def test_a_refund_that_cannot_work_is_dead_lettered(worker: Drainer) -> None:
    job = refund.enqueue("A-3")
    worker.drain()
    assert job.status() is JobStatus.DEAD
    with pytest.raises(JobFailed, match="never charged"):
        job.result(timeout=0)


def test_only_the_queues_asked_for_are_drained(worker: Drainer) -> None:
    place_order.enqueue("A-4", [100])
    assert worker.drain(["default"]) == 1
    assert OUTBOX == []  # the receipt waits in the "mail" queue
    assert worker.drain(["mail"]) == 1
    assert OUTBOX == ["A-4: 100"]
