"""Periodic schedules, unique jobs and global limits, in one process on the in-memory broker.

    python examples/scheduling/app.py

The same code runs unchanged on Redis (``Worq("redis://...")``), where the limits and the
once-per-tick guarantee hold across every worker process on every machine.
"""

from __future__ import annotations

import threading
import time
from datetime import timedelta

from worq_core import WorkerSettings, Worq, current_job

app = Worq()  # memory:// declares UNIQUE, LIMITS and SCHEDULES, like redis://
lock = threading.Lock()


# -- a periodic job: fires once per tick however many workers run ------------------------------

ticks: list[str] = []


@app.periodic(every=timedelta(seconds=0.2))
def beat() -> None:
    ticks.append(current_job().headers["worq-tick"])


@app.periodic(cron="0 9 * * mon-fri", tz="Europe/Berlin")
def morning_report() -> None:
    """Weekdays at 09:00 Berlin time, summer or winter."""


# -- a unique job: a second equal enqueue returns the first job's handle -----------------------


@app.task(unique=True)
def rebuild(index: str) -> str:
    return f"rebuilt {index}"


# -- limits, counted in the broker across every worker -----------------------------------------

running = 0
most = 0


@app.task(concurrency=2)
def crawl(page: int) -> None:
    global running, most
    with lock:
        running += 1
        most = max(most, running)
    time.sleep(0.02)
    with lock:
        running -= 1


@app.task(rate_limit="10/s", rate_burst=1)
def call_api(n: int) -> float:
    return time.time()


def main() -> None:
    first = rebuild.enqueue("users")
    again = rebuild.enqueue("users")
    print("unique:", "same job" if again.id == first.id else "two jobs")

    crawl.enqueue_many([(page,) for page in range(8)])
    calls = call_api.enqueue_many([(n,) for n in range(5)])

    two_workers = [app.worker(settings=WorkerSettings(concurrency=6)) for _ in range(2)]
    threads = [threading.Thread(target=w.run) for w in two_workers]
    for thread in threads:
        thread.start()
    print(first.result(timeout=5))
    times = sorted(job.result(timeout=5) for job in calls)
    time.sleep(1.0)  # let the schedule tick a few times
    for worker in two_workers:
        worker.stop()
    for thread in threads:
        thread.join()

    print("crawl: at most", most, "at once")
    print("call_api: 5 calls over", "0.4 s or more" if times[-1] - times[0] >= 0.39 else "less")
    print("beat:", "each tick fired once" if len(ticks) == len(set(ticks)) >= 3 else ticks)
    print("schedules:", ", ".join(sorted(app.schedules)))


if __name__ == "__main__":
    main()
