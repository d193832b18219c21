"""Checked by mypy --strict (nox -s types), never run: the public API's types hold.

Each ``type: ignore[code]`` marks a line that must stay a type error; with
``warn_unused_ignores`` (part of --strict) mypy fails if the error ever goes away.
"""

from __future__ import annotations

from worq_core import AsyncTask, Job, JobStatus, Progress, RetryPolicy, Task, Worq, current_job

app = Worq("memory://")


@app.task
def add(x: int, y: int) -> int:
    return x + y


@app.task(queue="high", retry=RetryPolicy(base=0.5), max_retries=5)
async def fetch(url: str) -> bytes:
    return url.encode()


@app.task
async def double(x: int) -> int:
    return 2 * x


task: Task[[int, int], int] = add
async_task: AsyncTask[[str], bytes] = fetch
total: int = add(1, 2)
job: Job[int] = add.enqueue(1, 2)
later: Job[int] = add.options(delay=30, priority=5, headers={"k": "v"}).enqueue(1, y=2)
status: JobStatus = job.status()
value: int = job.result(timeout=1)
page: bytes = fetch.enqueue("u").result()
progress: Progress | None = job.progress()
cancelled: bool = job.cancel()


async def awaiting() -> None:
    doubled: int = await double(2)  # an inline run of an async task is awaited
    got: int = await double.enqueue(3).result_async()
    assert doubled + got
    current_job().progress(0.5, "half way")


wrong: str = job.result()  # type: ignore[assignment]

add.enqueue("x", 2)  # type: ignore[arg-type]
add.enqueue(1)  # type: ignore[call-arg]
add.options(queue="q").enqueue(1, z=3)  # type: ignore[call-arg]
fetch.enqueue(42)  # type: ignore[arg-type]
