"""The app the runtime tests start with ``worq worker runtime_app:app`` (settings from the env).

WORQ_RUNTIME_URL is the broker URL with its ``?prefix=``; the tasks report to the test through
Redis lists under WORQ_RUNTIME_LOG (the ledger of executions).
"""

from __future__ import annotations

import ctypes
import os
import time

import redis

from worq_core import RetryPolicy, Worq

URL = os.environ["WORQ_RUNTIME_URL"]
LOG = os.environ["WORQ_RUNTIME_LOG"]

app = Worq(URL)
_report = redis.Redis.from_url(URL.partition("?")[0])


@app.task(name="chaos", queue="chaos", max_retries=100, retry=RetryPolicy(base=0.05))
def chaos(n: int) -> None:
    time.sleep(0.002)  # a little work, so that kills land mid-job
    _report.rpush(f"{LOG}:ledger", n)


@app.task(name="tally", queue="tally")
def tally(n: int) -> None:
    _report.rpush(f"{LOG}:tally", n)  # nothing else: jobs this short are prefetched


@app.task(name="whoami", queue="runtime")
def whoami(n: int) -> int:
    _report.rpush(f"{LOG}:pids", os.getpid())
    return os.getpid()


@app.task(name="long", queue="runtime")
def long(seconds: float) -> str:
    _report.rpush(f"{LOG}:events", f"started:{os.getpid()}")
    time.sleep(seconds)
    return "finished"


@app.task(name="segfault", queue="runtime", max_retries=1)
def segfault() -> None:
    _report.rpush(f"{LOG}:events", f"crashing:{os.getpid()}")
    ctypes.string_at(0)  # reads address 0: SIGSEGV, the process dies on the spot


@app.task(name="work", queue="runtime", max_retries=20, retry=RetryPolicy(base=0.05))
def work(n: int) -> int:
    time.sleep(0.005)
    return n
