"""The app the multi-process scheduling tests run with ``worq worker scheduling_app:app``.

WORQ_RUNTIME_URL is the broker URL with its ``?prefix=``; every run reports to the test through
Redis lists under WORQ_RUNTIME_LOG: the ledger of ticks fired and of rate-limited starts.
"""

from __future__ import annotations

import os
import time

import redis

from worq_core import Worq, current_job

URL = os.environ["WORQ_RUNTIME_URL"]
LOG = os.environ["WORQ_RUNTIME_LOG"]

app = Worq(URL)
_report = redis.Redis.from_url(URL.partition("?")[0])


@app.periodic(every=1.0, name="beat", queue="sched")
def beat() -> None:
    """Fires every second; the ledger gets the tick it was fired for and who ran it."""
    _report.rpush(f"{LOG}:ticks", f"{current_job().headers['worq-tick']} {os.getpid()}")


@app.task(name="limited", queue="mixed", rate_limit="20/s")
def limited(n: int) -> None:
    _report.rpush(f"{LOG}:limited", repr(time.time()))


@app.task(name="unlimited", queue="mixed")
def unlimited(n: int) -> None:
    _report.incr(f"{LOG}:unlimited")


@app.task(name="unique_job", queue="unique", unique=True)
def unique_job(key: int) -> None:
    pass
