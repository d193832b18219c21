"""The apps that ``peer_bench.py``'s subprocesses run: worq, huey, dramatiq and an ASGI app.

Every app reads where to go from the environment that ``peer_bench.py`` sets, so its worker
processes meet the run's own keys and nothing else:

* ``PEER_BENCH_URL``: the Redis URL (default ``redis://127.0.0.1:6379/10``);
* ``PEER_BENCH_PREFIX``: the run's key prefix (worq's prefix, dramatiq's namespace under it,
  the counters, the raw keys) and, without its dash, huey's name;
* ``PEER_BENCH_PAYLOAD``: the size in bytes of the ASGI app's raw LPUSH payload.

Every job has the same body, :func:`count`: one INCR on a separate client.
"""

from __future__ import annotations

import os
import time

import redis

URL = os.environ.get("PEER_BENCH_URL", "redis://127.0.0.1:6379/10")
PREFIX = os.environ.get("PEER_BENCH_PREFIX", "peerbench")
STASH_KEY = f"{PREFIX}:stash"
"""The argument of jobs sent to a queue nobody reads (bulk enqueue, the ASGI producer)."""

# The jobs' own client, apart from any library's: the body costs every library the same.
_counter = redis.Redis.from_url(URL)


def count(key: str, total: int) -> None:
    """The job body: one INCR of ``key``; the first and the ``total``-th stamp their time.

    ``key:first`` gets the (wall clock) time the first job started, ``key:last`` the time the
    ``total``-th finished: a drain is timed from the one to the other, in whatever processes
    ran them, and never from a process's start.
    """
    started = time.time()
    done = _counter.incr(key)
    if done == 1:
        _counter.set(f"{key}:first", repr(started))
    if done == total:
        _counter.set(f"{key}:last", repr(time.time()))
