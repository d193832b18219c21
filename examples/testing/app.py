"""A small shop whose tasks are tested, with no Redis running, by ``test_app.py`` beside it.

    cd examples/testing && python -m pytest

In production the app talks to Redis; the tests point it at a fresh in-memory broker with
``worq_core.testing.in_memory`` (see ``conftest.py``) and drain the queues themselves.
"""

from __future__ import annotations

from worq_core import RetryPolicy, Worq, current_job

app = Worq("redis://127.0.0.1:6379/0")  # never reached by the tests

#: Receipts "sent" by send_receipt; a real app would call its mail service.
OUTBOX: list[str] = []


@app.task
def place_order(order_id: str, prices: list[int]) -> int:
    """Total the order and send its receipt as a job of its own."""
    total = sum(prices)
    send_receipt.enqueue(order_id, total)
    return total


@app.task(queue="mail")
def send_receipt(order_id: str, total: int) -> None:
    OUTBOX.append(f"{order_id}: {total}")


@app.task(max_retries=3, retry=RetryPolicy(base=0.01))
def charge(order_id: str) -> int:
    """A payment gateway that refuses the first attempt; returns the attempt that succeeded."""
    attempt = current_job().attempt
    if attempt == 1:
        raise ConnectionError("gateway busy")
    return attempt


@app.task(max_retries=0)
def refund(order_id: str) -> None:
    raise ValueError(f"order {order_id} was never charged")
