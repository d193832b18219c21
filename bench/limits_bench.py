"""What limited jobs cost the unlimited jobs that share their queue, on the local Redis.

    python bench/limits_bench.py            # 3 rounds of 5,000 unlimited jobs per variant
    python bench/limits_bench.py --quick

A variant drains N no-op jobs of an unlimited task through one in-process worker (concurrency
8) and times how long the last of them takes to finish. The variants differ only in what else
waits in the same queue, interleaved with the unlimited jobs:

* ``alone``: nothing;
* ``rate-limited``: N/5 jobs of a task limited to 20/s (most of them are set aside, each with
  its own future slot);
* ``concurrency-limited``: N/5 jobs of a task limited to 2 at once, each sleeping 5 ms (most
  are parked until a permit comes back).

Every figure is the median over rounds, each round running the variants in turn under fresh
key prefixes (deleted afterwards), so drift hits them alike. The ratio is the variant's
unlimited throughput over ``alone``'s in the same run: 1.0 means no head-of-line cost at all.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
import uuid

import redis

URL = "redis://127.0.0.1:6379/15"
VARIANTS = ("alone", "rate-limited", "concurrency-limited")


def measure(variant: str, jobs: int) -> float:
    """Seconds until ``jobs`` unlimited jobs finished, with the variant's limited jobs mixed in."""
    from worq_core import Worker, WorkerSettings, Worq
    from worq_redis import RedisBroker, RedisStorage

    prefix = f"worqbench-{uuid.uuid4().hex[:10]}"
    app = Worq(RedisBroker(URL, prefix=prefix), storage=RedisStorage(URL, prefix=prefix))
    done = threading.Event()
    count = [0]
    lock = threading.Lock()

    @app.task(name="unlimited", queue="bench")
    def unlimited() -> None:
        with lock:
            count[0] += 1
            if count[0] == jobs:
                done.set()

    @app.task(name="rate", queue="bench", rate_limit="20/s")
    def rate() -> None:
        return None

    @app.task(name="permits", queue="bench", concurrency=2)
    def permits() -> None:
        time.sleep(0.005)

    limited = {"rate-limited": rate, "concurrency-limited": permits}.get(variant)
    for _ in range(jobs // 1000):  # limited jobs interleaved, a fifth of the unlimited count
        if limited is not None:
            limited.enqueue_many([() for _ in range(200)])
        unlimited.enqueue_many([() for _ in range(1000)])
    worker = Worker(app, WorkerSettings(queues=("bench",), concurrency=8, handle_signals=False))
    thread = threading.Thread(target=worker.run, daemon=True)
    begin = time.perf_counter()
    thread.start()
    finished = done.wait(300)
    elapsed = time.perf_counter() - begin
    worker.stop()
    worker.stop()  # the limited jobs left need not finish
    thread.join(60)
    app.close()
    client = redis.Redis.from_url(URL)
    keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
    for at in range(0, len(keys), 500):
        client.delete(*keys[at : at + 500])
    client.close()
    if not finished:
        raise SystemExit(f"{variant}: the unlimited jobs did not all finish")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="1 round of 2,000 jobs")
    options = parser.parse_args()
    jobs, rounds = (2000, 1) if options.quick else (options.jobs, options.rounds)
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for _ in range(rounds):
        for variant in VARIANTS:
            times[variant].append(measure(variant, jobs))
    alone = statistics.median(times["alone"])
    print(f"{jobs} unlimited no-op jobs, one worker at concurrency 8, Redis {URL}")
    print(f"{'variant':<22}{'seconds':>10}{'jobs/s':>10}{'ratio':>8}")
    for variant in VARIANTS:
        seconds = statistics.median(times[variant])
        print(f"{variant:<22}{seconds:>10.3f}{jobs / seconds:>10.0f}{alone / seconds:>8.2f}")


if __name__ == "__main__":
    main()
