"""A worq app on Redis. Run its worker with ``worq worker tasks:app`` from this directory.

The broker URL comes from ``WORQ_REDIS_URL`` (default ``redis://127.0.0.1:6379/0``); the
example keeps its keys under the prefix ``example`` unless that URL names another one
(``?prefix=...``). The results live in the same Redis, written atomically with each job's
acknowledgement.
"""

from __future__ import annotations

import os
import time
import urllib.parse

from worq_core import RetryPolicy, Worq


def with_prefix(url: str, prefix: str) -> str:
    """``url`` with ``prefix=`` added to its query, unless it already names a prefix."""
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)
    if "prefix" in query:
        return url
    return f"{url}{'&' if '?' in url else '?'}prefix={urllib.parse.quote(prefix)}"


REDIS_URL = with_prefix(os.environ.get("WORQ_REDIS_URL", "redis://127.0.0.1:6379/0"), "example")

app = Worq(REDIS_URL)


@app.task
def add(x: int, y: int) -> int:
    """A plain function; the worker runs it on one of its slot threads."""
    return x + y


@app.task(queue="slow", max_retries=2, retry=RetryPolicy(base=0.5, max_delay=2.0))
def flaky(n: int) -> str:
    """Fails on its first attempt for odd numbers, then succeeds on a retry."""
    marker = f"/tmp/worq-example-flaky-{n}"
    if n % 2 and not os.path.exists(marker):
        open(marker, "w").close()
        raise RuntimeError(f"transient failure for {n}")
    return f"ok {n}"


@app.task(queue="slow")
async def sleepy(seconds: float) -> float:
    """An ``async def`` task runs on the worker's event loop."""
    import asyncio

    begin = time.monotonic()
    await asyncio.sleep(seconds)
    return time.monotonic() - begin
