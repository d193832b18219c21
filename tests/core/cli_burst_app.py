"""Enqueues jobs at import time, so `worq worker cli_burst_app:app --burst` has work to do.

The memory broker lives in one process: the worker subprocess imports this module and so
enqueues its own jobs.
"""

from __future__ import annotations

from worq_core import Worq

JOBS = 25

app = Worq()


@app.task(name="double")
def double(n: int) -> int:
    return 2 * n


@app.task(name="fail", max_retries=0)
def fail() -> None:
    raise ValueError("on purpose")


double.enqueue_many([(n,) for n in range(JOBS)])
fail.enqueue()
