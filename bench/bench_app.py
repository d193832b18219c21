"""The app that benchmark worker subprocesses run: ``python -m worq_core worker bench_app:app``.

The Redis URL and key prefix come from ``WORQ_BENCH_URL`` and ``WORQ_BENCH_PREFIX`` (set by
``redis_bench.py``), so the subprocesses meet the benchmark's own keys and nothing else.
"""

from __future__ import annotations

import os
import time

from worq_core import Worq
from worq_core.registry import Registry
from worq_core.serializers import MsgpackSerializer
from worq_redis import RedisBroker, RedisStorage

URL = os.environ.get("WORQ_BENCH_URL", "redis://127.0.0.1:6379/10")
PREFIX = os.environ.get("WORQ_BENCH_PREFIX", "worqbench")

app = Worq(
    RedisBroker(URL, prefix=PREFIX),
    storage=RedisStorage(URL, prefix=PREFIX),
    serializer=MsgpackSerializer(),
    registry=Registry(),
)


@app.task(name="noop", queue="procs")
def noop() -> None:
    """A no-op job (the drain and memory figures)."""


@app.task(name="timed", queue="mixed")
def timed(sent: float, sleep: float = 0.0) -> float:
    """Seconds from enqueue (``sent``, wall clock) to this job starting; sleeps ``sleep`` after."""
    started = time.time() - sent
    if sleep:
        time.sleep(sleep)
    return started
