"""worq's side: ``worq worker peers.worq_app:app -Q peers``; configured as a user would."""

from __future__ import annotations

from peers import PREFIX, URL
from peers import count as count_body
from worq_core import Worq

app = Worq(f"{URL}?prefix={PREFIX}")


@app.task(queue="peers")
def count(key: str, total: int) -> None:
    """The drains' and start-up's job."""
    count_body(key, total)


@app.task(queue="stash")
def stash(key: str, total: int) -> None:
    """The same job on a queue no worker reads: ``enqueue_many`` and the ASGI producer send it."""
    count_body(key, total)
