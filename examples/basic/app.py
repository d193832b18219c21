"""The smallest worq program: tasks, jobs, a worker and results, all in one process.

    python examples/basic/app.py

It uses the in-memory broker (``pip install worq-core worq-memory``). For separate producer and
worker processes, see ``examples/redis/``.
"""

from __future__ import annotations

import asyncio

from worq_core import JobFailed, RetryPolicy, Worq, current_job

app = Worq()  # memory:// by default


@app.task
def add(x: int, y: int) -> int:
    return x + y


@app.task(queue="slow", priority=5)
async def shout(text: str) -> str:
    await asyncio.sleep(0.01)
    return text.upper()


@app.task(max_retries=2, retry=RetryPolicy(base=0.01))
def flaky() -> int:
    attempt = current_job().attempt
    if attempt < 3:
        raise ConnectionError(f"attempt {attempt} failed")
    return attempt


@app.task(max_retries=0)
def broken() -> None:
    raise ValueError("this one always fails")


def main() -> None:
    total = add.enqueue(2, 3)
    many = add.enqueue_many([(i, i) for i in range(5)])
    loud = shout.enqueue("hello")
    later = add.options(delay=0.2).enqueue(10, 20)
    third_time = flaky.enqueue()
    doomed = broken.enqueue()

    app.worker(queues=["default", "slow"], concurrency=4).run(burst=True)

    print("add:", total.result(timeout=5))
    print("enqueue_many:", [job.result(timeout=5) for job in many])
    print("async:", loud.result(timeout=5))
    print("delayed:", later.result(timeout=5))
    print("retried, succeeded on attempt", third_time.result(timeout=5))
    try:
        doomed.result(timeout=5)
    except JobFailed as failure:
        print("dead-lettered:", failure.error_type, failure.message, f"({doomed.status()})")


if __name__ == "__main__":
    main()
