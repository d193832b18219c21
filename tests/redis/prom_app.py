"""The app the Prometheus process tests run with ``worq worker prom_app:app``.

WORQ_RUNTIME_URL is the broker URL with its ``?prefix=``; every run reports the pid that ran
it to the test through a Redis list under WORQ_RUNTIME_LOG, and ``slow`` announces its start.
The app lists no middleware: ``--metrics-port`` switches the metrics on.
"""

from __future__ import annotations

import os
import time

import redis

from worq_core import RetryPolicy, Worq, current_job

URL = os.environ["WORQ_RUNTIME_URL"]
LOG = os.environ["WORQ_RUNTIME_LOG"]

app = Worq(URL)
_report = redis.Redis.from_url(URL.partition("?")[0])
NOW = RetryPolicy(base=0.0, jitter=False)


def _ran() -> None:
    _report.rpush(f"{LOG}:pids", os.getpid())


@app.task(name="ok", queue="prom")
def ok(n: int) -> int:
    _ran()
    time.sleep(0.02)  # long enough that both processes take a share
    return n


@app.task(name="flaky", queue="prom", max_retries=1, retry=NOW)
def flaky(n: int) -> None:
    _ran()
    raise RuntimeError("fails every attempt: one retry, then dead")


@app.task(name="spawn", queue="prom")
def spawn(n: int) -> None:
    """Enqueues one ``ok`` job from inside the worker (counted as enqueued by that process)."""
    _ran()
    ok.enqueue(n)


@app.task(name="slow", queue="prom")
def slow() -> None:
    """Hangs on its first attempt (its process is SIGKILLed); the redelivery returns at once."""
    if current_job().attempt == 1:
        _report.rpush(f"{LOG}:slow", os.getpid())
        time.sleep(60)
