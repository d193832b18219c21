"""huey's side: ``huey_consumer peers.huey_app.huey``; its defaults but for the name."""

from __future__ import annotations

from huey import RedisHuey  # type: ignore[import-untyped]

from peers import PREFIX, URL
from peers import count as count_body

# huey keeps its keys at huey.<kind>.<name>; the name is the run's prefix without its dash.
huey = RedisHuey(PREFIX.replace("-", "_"), url=URL)


@huey.task()  # type: ignore[untyped-decorator]
def count(key: str, total: int) -> None:
    """The drains' and start-up's job."""
    count_body(key, total)
