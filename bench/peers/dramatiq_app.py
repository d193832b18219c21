"""dramatiq's side: ``dramatiq peers.dramatiq_app:broker``; its defaults but the namespace."""

from __future__ import annotations

import dramatiq
from dramatiq.brokers.redis import RedisBroker

from peers import PREFIX, URL
from peers import count as count_body

broker = RedisBroker(url=URL, namespace=f"{PREFIX}:dramatiq")  # type: ignore[no-untyped-call]
dramatiq.set_broker(broker)


@dramatiq.actor(queue_name="peers")
def count(key: str, total: int) -> None:
    """The drains' and start-up's job."""
    count_body(key, total)
