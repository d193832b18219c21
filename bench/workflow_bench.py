"""What workflows cost against plain jobs, on the local Redis (or ``--url memory://``).

    python bench/workflow_bench.py            # 10,000 jobs per measure, median of 3 rounds
    python bench/workflow_bench.py --quick    # 2,000 jobs, 1 round

Measures, each as a ratio to the plain-job figure of the same round:

* ``enqueue``: a group of N no-op members in one ``group(...).enqueue()`` call, against
  ``enqueue_many`` of N plain jobs;
* ``settle``: the broker's settlement of N leased chord members (each counted in its group,
  the last one sending the callback), in batches of 100, against the same settlement of N
  plain jobs (the worker's own cost left out);
* ``drain``: one in-process worker (concurrency 8) running a chord of N members and its
  callback, against N plain jobs.

Every round runs under fresh key prefixes, deleted afterwards.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
import uuid
from typing import Any

URL = "redis://127.0.0.1:6379/15"


def make_app(url: str) -> tuple[Any, str]:
    from worq_core import Worq

    prefix = f"worqbench-{uuid.uuid4().hex[:10]}"
    if url.startswith("memory"):
        return Worq(url), prefix
    from worq_redis import RedisBroker, RedisStorage

    return Worq(RedisBroker(url, prefix=prefix), storage=RedisStorage(url, prefix=prefix)), prefix


def cleanup(url: str, prefix: str) -> None:
    if url.startswith("memory"):
        return
    import redis

    client = redis.Redis.from_url(url)
    keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
    for at in range(0, len(keys), 500):
        client.delete(*keys[at : at + 500])
    client.close()


def round_of(url: str, jobs: int) -> dict[str, float]:
    from worq_core import Worker, WorkerSettings, chord, group
    from worq_core.models import Outcome, Settlement

    figures: dict[str, float] = {}
    app, prefix = make_app(url)
    try:
        done = threading.Event()

        @app.task(name="noop", queue="bench")
        def noop(*_: Any) -> None:
            return None

        @app.task(name="last", queue="bench")
        def last(values: list[Any]) -> int:
            done.set()
            return len(values)

        # enqueue (after a warm-up, so neither pays for the first call's set-up)
        noop.enqueue_many([() for _ in range(100)])
        group(noop.s() for _ in range(100)).enqueue()
        drain_broker(app)
        begin = time.perf_counter()
        noop.enqueue_many([() for _ in range(jobs)])
        figures["enqueue plain"] = time.perf_counter() - begin
        drain_broker(app)
        begin = time.perf_counter()
        group(noop.s() for _ in range(jobs)).enqueue()
        figures["enqueue group"] = time.perf_counter() - begin
        drain_broker(app)

        # settle, at the broker
        broker = app.broker
        noop.enqueue_many([() for _ in range(jobs)])
        figures["settle plain"] = settle_all(broker, lambda d: Settlement(d, Outcome.ACK))
        chord((noop.s() for _ in range(jobs)), last.s()).enqueue()
        figures["settle members"] = settle_all(
            broker, lambda d: Settlement(d, Outcome.ACK, output=b"\x90"), keep_callback=True
        )
        drain_broker(app)

        # drain through a worker
        settings = WorkerSettings(queues=("bench",), concurrency=8, handle_signals=False)
        noop.enqueue_many([() for _ in range(jobs - 1)])
        last.enqueue([])
        figures["drain plain"] = run_until(Worker(app, settings), done)
        done.clear()
        chord((noop.s() for _ in range(jobs)), last.s()).enqueue()
        figures["drain chord"] = run_until(Worker(app, settings), done)
    finally:
        app.close()
        cleanup(url, prefix)
    return figures


def drain_broker(app: Any) -> None:
    """Acknowledge whatever waits in the bench queue, without running it."""
    from worq_core.models import Outcome, Settlement

    while True:
        batch = app.broker.fetch(["bench"], 500, lease=60, wait=0)
        if not batch:
            return
        app.broker.settle([Settlement(d, Outcome.ACK) for d in batch])


def settle_all(broker: Any, make: Any, *, keep_callback: bool = False) -> float:
    """Lease every job of the bench queue, then time settling them in batches of 100."""
    leased = []
    while True:
        batch = broker.fetch(["bench"], 500, lease=600, wait=0)
        if not batch:
            break
        leased.extend(batch)
    begin = time.perf_counter()
    for at in range(0, len(leased), 100):
        broker.settle([make(d) for d in leased[at : at + 100]])
    elapsed = time.perf_counter() - begin
    if keep_callback:
        assert broker.fetch(["bench"], 10, lease=60, wait=0), "the last member sent the callback"
    return elapsed


def run_until(worker: Any, done: threading.Event) -> float:
    thread = threading.Thread(target=worker.run, daemon=True)
    begin = time.perf_counter()
    thread.start()
    if not done.wait(300):
        raise SystemExit("the jobs did not finish")
    elapsed = time.perf_counter() - begin
    worker.stop()
    thread.join(60)
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=URL)
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="1 round of 2,000 jobs")
    options = parser.parse_args()
    jobs, rounds = (2000, 1) if options.quick else (options.jobs, options.rounds)
    rounds_ = [round_of(options.url, jobs) for _ in range(rounds)]
    median = {k: statistics.median(r[k] for r in rounds_) for k in rounds_[0]}
    print(f"{jobs} jobs per measure, median of {rounds} round(s), broker {options.url}")
    print(f"{'measure':<18}{'plain s':>10}{'workflow s':>12}{'ratio':>8}")
    for name, plain, flow in (
        ("enqueue", "enqueue plain", "enqueue group"),
        ("settle", "settle plain", "settle members"),
        ("drain", "drain plain", "drain chord"),
    ):
        p, f = median[plain], median[flow]
        print(f"{name:<18}{p:>10.3f}{f:>12.3f}{f / p:>8.2f}")


if __name__ == "__main__":
    main()
