"""Checked by mypy --strict (nox -s types), never run: the public API's types hold.

Each ``type: ignore[code]`` marks a line that must stay a type error; with
``warn_unused_ignores`` (part of --strict) mypy fails if the error ever goes away.
"""

from __future__ import annotations

from worq_core import Job, JobStatus, RetryPolicy, Task, Worq

app = Worq("memory://")


@app.task
def add(x: int, y: int) -> int:
    return x + y


@app.task(queue="high", retry=RetryPolicy(base=0.5), max_retries=5)
async def fetch(url: str) -> bytes:
    return url.encode()


task: Task[[int, int], int] = add
total: int = add(1, 2)
job: Job = add.enqueue(1, 2)
later: Job = add.options(delay=30, priority=5).enqueue(1, y=2)
status: JobStatus = job.status()

add.enqueue("x", 2)  # type: ignore[arg-type]
add.enqueue(1)  # type: ignore[call-arg]
add.options(queue="q").enqueue(1, z=3)  # type: ignore[call-arg]
fetch.enqueue(42)  # type: ignore[arg-type]
