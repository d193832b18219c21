"""The app the workflow chaos tests run with ``worq worker workflow_app:app``.

WORQ_RUNTIME_URL is the broker URL with its ``?prefix=``; every run reports to the test through
Redis lists under WORQ_RUNTIME_LOG: each member's and step's runs, and each callback run.
"""

from __future__ import annotations

import json
import os
import time

import redis

from worq_core import Worq, current_job

URL = os.environ["WORQ_RUNTIME_URL"]
LOG = os.environ["WORQ_RUNTIME_LOG"]

app = Worq(URL)
_report = redis.Redis.from_url(URL.partition("?")[0])


# A member fetched by a worker that is killed before it settles has an attempt counted, run or
# not; a worker restarted into a run of kills may take the same front-of-queue members again and
# again. Beyond max_retries + 1 deliveries a job counts as one that kills workers and is
# dead-lettered, which fails the chord: the chaos test is about the callback, so members may
# be delivered as often as the kills make them.
@app.task(name="member", queue="wf", max_retries=100)
def member(i: int) -> int:
    time.sleep(0.005)
    _report.rpush(f"{LOG}:member", i)
    return i


@app.task(name="collect", queue="wf")
def collect(values: list[int]) -> int:
    job = current_job()
    run = {"id": job.id, "attempt": job.attempt, "values": values}
    _report.rpush(f"{LOG}:callback", json.dumps(run))
    return len(values)


@app.task(name="step", queue="wf")
def step(n: int) -> int:
    """Reports its start, then waits until the test lets step ``n`` finish."""
    _report.rpush(f"{LOG}:step", n)
    while not _report.exists(f"{LOG}:go:{n}"):
        time.sleep(0.01)
    return n + 1
