"""Benchmark worq-redis against the raw redis-py floor on the local Redis.

    python bench/redis_bench.py            # full run (20,000-job drains)
    python bench/redis_bench.py --quick    # under ~30 s
    python bench/redis_bench.py --json out.json

Every figure is measured in the same run as the raw redis-py floor (a plain LPUSH/RPOP loop,
one round trip per item, and a pipelined LPUSH) and reported as a ratio to it. All keys live
under a fresh prefix that is deleted at the end; no database is flushed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import redis

from worq_core import Worker, WorkerSettings, Worq
from worq_core.registry import Registry
from worq_core.serializers import MsgpackSerializer
from worq_redis import RedisBroker, RedisStorage


@dataclass
class Row:
    name: str
    jobs: int
    rate: float  # items per second
    floor: str  # which floor it is compared with
    ratio: float  # rate / floor rate (>1 is faster than the floor)
    note: str = ""


def timed(fn: Callable[[], Any]) -> float:
    begin = time.perf_counter()
    fn()
    return time.perf_counter() - begin


def delete_prefix(client: redis.Redis, prefix: str) -> None:
    batch = list(client.scan_iter(match=f"{prefix}:*", count=1000))
    for start in range(0, len(batch), 500):
        client.delete(*batch[start : start + 500])


def raw_floor(client: redis.Redis, prefix: str, n: int) -> dict[str, float]:
    """Plain redis-py: LPUSH and RPOP one round trip each, and LPUSH pipelined by 1,000."""
    key = f"{prefix}:raw"
    payload = b"x" * 100
    push = timed(lambda: [client.lpush(key, payload) for _ in range(n)])
    pop = timed(lambda: [client.rpop(key) for _ in range(n)])

    def pipelined() -> None:
        for start in range(0, n, 1000):
            pipe = client.pipeline(transaction=False)
            for _ in range(min(1000, n - start)):
                pipe.lpush(key, payload)
            pipe.execute()

    piped = timed(pipelined)
    client.delete(key)
    return {"lpush": n / push, "rpop": n / pop, "pipelined_lpush": n / piped}


def make_app(url: str, prefix: str) -> Worq:
    app = Worq(
        RedisBroker(url, prefix=prefix),
        storage=RedisStorage(url, prefix=prefix),
        serializer=MsgpackSerializer(),
        registry=Registry(),
    )

    @app.task(name="noop", queue="bench")
    def noop() -> None:
        return None

    return app


def drain(app: Worq, n: int, concurrency: int) -> float:
    """Enqueue ``n`` no-op jobs, then time a burst worker draining (and acking) them."""
    task = app.tasks["noop"]
    for start in range(0, n, 5000):
        task.enqueue_many([() for _ in range(min(5000, n - start))])
    settings = WorkerSettings(
        queues=("bench",), concurrency=concurrency, idle_wait=0.01, handle_signals=False
    )
    worker = Worker(app, settings)
    elapsed = timed(lambda: worker.run(burst=True))
    assert worker.counters.succeeded == n, worker.counters
    return elapsed


def pickup_latency(url: str, prefix: str, n: int, rate: float) -> list[float]:
    """Seconds from enqueue to the task starting, on an idle worker, at ``rate`` jobs/s."""
    app = Worq(
        RedisBroker(url, prefix=prefix),
        storage=RedisStorage(url, prefix=prefix),
        serializer=MsgpackSerializer(),
        registry=Registry(),
    )
    latencies: list[float] = []
    done = threading.Event()

    @app.task(name="stamp", queue="latency")
    def stamp(sent: float) -> None:
        latencies.append(time.perf_counter() - sent)
        if len(latencies) >= n:
            done.set()

    worker = Worker(
        app,
        WorkerSettings(queues=("latency",), concurrency=8, idle_wait=1.0, handle_signals=False),
    )
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    stamp.enqueue(time.perf_counter())  # warm up connections and scripts
    while not latencies:
        time.sleep(0.01)
    latencies.clear()
    interval = 1.0 / rate
    next_at = time.perf_counter()
    for _ in range(n):
        next_at += interval
        pause = next_at - time.perf_counter()
        if pause > 0:
            time.sleep(pause)
        stamp.enqueue(time.perf_counter())
    done.wait(30)
    worker.stop()
    thread.join(30)
    app.close()
    return latencies


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    db = os.environ.get("WORQ_BENCH_REDIS_DB", "10")
    parser.add_argument(
        "--url", default=os.environ.get("WORQ_BENCH_REDIS_URL", f"redis://127.0.0.1:6379/{db}")
    )
    parser.add_argument("--quick", action="store_true", help="smaller runs, under ~30 s")
    parser.add_argument("--jobs", type=int, default=None, help="jobs per drain (default 20,000)")
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    args = parser.parse_args()

    drain_jobs = args.jobs or (5_000 if args.quick else 20_000)
    one_by_one = 2_000 if args.quick else 10_000
    batch_jobs = 20_000 if args.quick else 100_000
    latency_jobs = 200 if args.quick else 1_000
    prefix = f"worqbench-{uuid.uuid4().hex[:8]}"
    client = redis.Redis.from_url(args.url)
    client.ping()
    rows: list[Row] = []
    try:
        floor = raw_floor(client, prefix, one_by_one)
        rtt = 1.0 / floor["lpush"]
        rows.append(Row("raw LPUSH, one round trip each", one_by_one, floor["lpush"], "lpush", 1.0))
        rows.append(Row("raw RPOP, one round trip each", one_by_one, floor["rpop"], "rpop", 1.0))
        rows.append(
            Row(
                "raw LPUSH pipelined by 1,000",
                one_by_one,
                floor["pipelined_lpush"],
                "pipelined",
                1.0,
            )
        )

        app = make_app(args.url, prefix)
        task = app.tasks["noop"]
        task.enqueue()  # warm up: connection, script cache, queue registry
        app.broker.purge_dead("bench")
        elapsed = timed(lambda: [task.enqueue() for _ in range(one_by_one)])
        rate = one_by_one / elapsed
        rows.append(Row("enqueue one by one", one_by_one, rate, "lpush", rate / floor["lpush"]))

        def batch() -> None:
            for _ in range(0, batch_jobs, 1000):
                task.enqueue_many([() for _ in range(1000)])

        elapsed = timed(batch)
        rate = batch_jobs / elapsed
        rows.append(
            Row(
                "enqueue_many (1,000 per call)",
                batch_jobs,
                rate,
                "pipelined",
                rate / floor["pipelined_lpush"],
            )
        )
        Worker(
            app,
            WorkerSettings(queues=("bench",), concurrency=8, idle_wait=0.01, handle_signals=False),
        ).run(burst=True)  # drain what the enqueue figures left

        for concurrency in (1, 8):
            elapsed = drain(app, drain_jobs, concurrency)
            rate = drain_jobs / elapsed
            rows.append(
                Row(
                    f"drain no-op jobs with acks, concurrency {concurrency}",
                    drain_jobs,
                    rate,
                    "rpop",
                    rate / floor["rpop"],
                    "one worker, results stored",
                )
            )
        app.close()

        latencies = pickup_latency(args.url, prefix, latency_jobs, 100.0)
        p50, p99 = percentile(latencies, 0.5), percentile(latencies, 0.99)
        for name, value in (("p50", p50), ("p99", p99)):
            rows.append(
                Row(
                    f"pickup latency {name} at 100 jobs/s (ms)",
                    len(latencies),
                    value * 1000,
                    "rtt",
                    value / rtt,
                    f"mean {statistics.mean(latencies) * 1000:.2f} ms",
                )
            )
    finally:
        delete_prefix(client, prefix)
        client.close()

    render(rows, rtt)
    if args.json:
        with open(args.json, "w") as out:
            json.dump(
                {"url": args.url, "rtt_ms": rtt * 1000, "rows": [asdict(r) for r in rows]},
                out,
                indent=2,
            )
    return 0


def render(rows: list[Row], rtt: float) -> None:
    header = f"raw round trip (one LPUSH): {rtt * 1e6:.0f} µs"
    lines = [
        "| measure | jobs | rate (/s) or ms | vs floor |",
        "|---|---:|---:|---:|",
    ]
    for row in rows:
        value = f"{row.rate:.2f}" if "latency" in row.name else f"{row.rate:,.0f}"
        ratio = f"{row.ratio:.2f}x rtt" if row.floor == "rtt" else f"{row.ratio:.2f}x {row.floor}"
        lines.append(f"| {row.name} | {row.jobs:,} | {value} | {ratio} |")
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(header)
        print("\n".join(lines))
        return
    table = Table(title=header)
    for column in ("measure", "jobs", "rate (/s) or ms", "vs floor"):
        table.add_column(column, justify="left" if column == "measure" else "right")
    for line in lines[2:]:
        table.add_row(*[cell.strip() for cell in line.strip("|").split("|")])
    Console().print(table)
    print("\nMarkdown:\n" + "\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
