"""Enqueue jobs on Redis and wait for their results (the worker runs in another terminal)."""

from __future__ import annotations

import time

from tasks import add, app, flaky, sleepy

from worq_core import JobFailed


def main() -> None:
    one = add.enqueue(2, 3)
    many = add.enqueue_many([(i, i) for i in range(100)])
    later = add.options(delay=2.0).enqueue(40, 2)
    retried = [flaky.enqueue(n) for n in range(4)]
    nap = sleepy.enqueue(0.5)
    once = add.options(job_id="only-once").enqueue(1, 1)
    again = add.options(job_id="only-once").enqueue(1, 1)  # same id while queued: not added twice
    assert once.id == again.id

    print(f"enqueued {3 + len(many) + len(retried) + 1} jobs; status of the first: {one.status()}")
    begin = time.monotonic()
    print("2 + 3 =", one.result(timeout=30))
    print("sum of 100 doubled numbers =", sum(job.result(timeout=30) for job in many))
    print("delayed:", later.result(timeout=30), f"after {time.monotonic() - begin:.1f}s")
    for job in retried:
        try:
            print("flaky:", job.result(timeout=30))
        except JobFailed as exc:
            print("flaky failed for good:", exc)
    print(f"slept {nap.result(timeout=30):.2f}s on the worker's event loop")
    print("stats:", app.broker.stats())
    app.close()


if __name__ == "__main__":
    main()
