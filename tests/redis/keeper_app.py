"""The app the lease-keeper tests run with ``worq worker keeper_app:app``.

Its results live under a prefix of their own (a separate storage), so a stale run's result
would be visible there if the worker wrote it. WORQ_KEEPER_URL is the broker URL with its
``?prefix=``; WORQ_KEEPER_LOG the Redis list prefix the task reports through.
"""

from __future__ import annotations

import os

import redis

from worq_core import Worq
from worq_redis import RedisBroker, RedisStorage

URL = os.environ["WORQ_KEEPER_URL"]
LOG = os.environ["WORQ_KEEPER_LOG"]
_base, _, _query = URL.partition("?")

app = Worq(RedisBroker(URL), storage=RedisStorage(f"{_base}?prefix={LOG}:results"))
_report = redis.Redis.from_url(_base)
_report.rpush(f"{LOG}:imported", os.getpid())  # which processes import the app


@app.task(name="handoff", queue="keeper", max_retries=0)
def handoff() -> str:
    """Report that it started, then wait until the test says go."""
    _report.rpush(f"{LOG}:started", os.getpid())
    _report.blpop([f"{LOG}:go"], timeout=60)
    return "the stale run's result"
