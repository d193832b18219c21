"""Benchmark worq-redis against the raw redis-py floor on the local Redis.

    python bench/redis_bench.py            # full run (20,000-job drains, 100,000-job memory)
    python bench/redis_bench.py --quick    # under ~60 s
    python bench/redis_bench.py --json out.json

Every figure is measured in the same run as the raw redis-py floor (a plain LPUSH/RPOP loop,
one round trip per item, and a pipelined LPUSH) and reported as a ratio to it. All keys live
under a fresh prefix that is deleted at the end; no database is flushed.

The producer rows alternate each figure with its floor, round after round (9 with ``--quick``,
15 otherwise), and report medians. The web handler rows serve ``bench/asgi_app.py`` (Starlette)
with uvicorn in a subprocess and load it with ``wrk`` (32 connections), a raw ``redis.asyncio``
LPUSH handler against one doing ``await task.enqueue_async()``, alternating. ``--producers``
runs only these rows (under a minute).

The worker-runtime figures (issue 4) run real ``python -m worq_core worker`` subprocesses on
``bench/bench_app.py``: a drain by one process and by ``--processes 2``; a mixed workload (10%
of the jobs sleep 50 ms) at a steady arrival rate, whose short jobs' pickup latency is compared
with an all-short run at the same rate; and a worker's resident memory after 10x more no-op
jobs.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import redis

from worq_core import Broker, Worker, WorkerSettings, Worq
from worq_core.models import Outcome, Settlement
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
    piped = pipelined_lpush(client, key, payload, n)
    client.delete(key)
    return {"lpush": n / push, "rpop": n / pop, "pipelined_lpush": n / piped}


def pipelined_lpush(client: redis.Redis, key: str, payload: bytes, n: int) -> float:
    """Seconds to LPUSH ``payload`` ``n`` times onto ``key``, 1,000 per pipeline."""

    def pipelined() -> None:
        for start in range(0, n, 1000):
            pipe = client.pipeline(transaction=False)
            for _ in range(min(1000, n - start)):
                pipe.lpush(key, payload)
            pipe.execute()

    return timed(pipelined)


def enqueue_rounds(
    client: redis.Redis, prefix: str, task: Any, rounds: int, single: int, batch: int
) -> dict[str, list[float]]:
    """Raw LPUSH, enqueue one by one, pipelined LPUSH and ``enqueue_many``, in alternation.

    Each round times ``single`` LPUSHes and as many ``task.enqueue()`` calls, then its share of
    ``batch`` LPUSHes pipelined by 1,000 and as many jobs by ``enqueue_many`` calls of 1,000, so
    every figure has its floor measured moments apart. Returns each measure's rate per round.
    """
    key = f"{prefix}:raw-rounds"
    payload = b"x" * 100
    per_round = batch // rounds

    def pushes() -> None:
        for _ in range(single):
            client.lpush(key, payload)

    def enqueues() -> None:
        for _ in range(single):
            task.enqueue()

    def pipelined() -> None:
        for start in range(0, per_round, 1000):
            pipe = client.pipeline(transaction=False)
            for _ in range(min(1000, per_round - start)):
                pipe.lpush(key, payload)
            pipe.execute()

    def many() -> None:
        for start in range(0, per_round, 1000):
            task.enqueue_many([() for _ in range(min(1000, per_round - start))])

    found: dict[str, list[float]] = {"lpush": [], "one": [], "pipelined": [], "many": []}
    for _ in range(rounds):
        found["lpush"].append(single / timed(pushes))
        found["one"].append(single / timed(enqueues))
        found["pipelined"].append(per_round / timed(pipelined))
        found["many"].append(per_round / timed(many))
        client.delete(key)
    return found


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


def broker_loop(app: Worq, n: int) -> float:
    """Seconds for ``settle_and_fetch`` alone (no worker threads) to take and ack ``n`` jobs.

    What the broker costs per job at concurrency 1; the rest of a worker's drain is its own.
    """
    task = app.tasks["noop"]
    for start in range(0, n, 5000):
        task.enqueue_many([() for _ in range(min(5000, n - start))])
    broker = app.broker
    assert broker.stores_results_in(app.storage)

    def loop() -> None:
        pending: list[Settlement] = []
        for _ in range(n):
            _, got = broker.settle_and_fetch(pending, ["bench"], 1, lease=30.0, wait=0.0)
            pending = [Settlement(d, Outcome.ACK, record=b"\x80", ttl=60.0) for d in got]
        broker.settle(pending)

    return timed(loop)


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


BENCH_DIR = Path(__file__).resolve().parent


def worker_process(url: str, prefix: str, *args: str) -> subprocess.Popen[bytes]:
    """``python -m worq_core worker bench_app:app ARGS`` on the benchmark's keys."""
    env = dict(os.environ, WORQ_BENCH_URL=url, WORQ_BENCH_PREFIX=prefix)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(BENCH_DIR), env.get("PYTHONPATH")]))
    command = [sys.executable, "-m", "worq_core", "worker", "bench_app:app", "--log-level"]
    return subprocess.Popen(
        [*command, "warning", *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    """SIGTERM (by its pid) and reap; SIGKILL if it does not stop in time."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate()


def wait_drained(broker: Broker, queue: str, total: int, timeout: float) -> tuple[float, float]:
    """Poll ``queue`` until it is empty: (first job taken, queue empty), as perf_counter times."""
    started: float | None = None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        [stats] = broker.stats([queue])
        now = time.perf_counter()
        if started is None and stats.ready < total:
            started = now
        if stats.ready == stats.delayed == stats.running == 0:
            return started if started is not None else now, now
        time.sleep(0.005)
    raise RuntimeError(f"{queue} not drained within {timeout}s: {broker.stats([queue])}")


def drain_processes(url: str, prefix: str, n: int, processes: int, concurrency: int) -> float:
    """Seconds for ``--processes N`` burst workers to drain ``n`` queued no-op jobs.

    Timed from the first job taken (interpreter start-up excluded) until the queue is empty.
    """
    import bench_app

    bench_app.app.tasks["noop"].enqueue_many([() for _ in range(n)])
    proc = worker_process(
        url, prefix, "-Q", "procs", "-p", str(processes), "-c", str(concurrency), "--burst"
    )
    try:
        begin, end = wait_drained(bench_app.app.broker, "procs", n, timeout=300)
        proc.wait(60)
    finally:
        stop_process(proc)
    assert proc.returncode == 0, proc.stderr
    return end - begin


def mixed_latency(
    url: str, prefix: str, n: int, rate: float, long_share: float
) -> tuple[list[float], float]:
    """Pickup latency (enqueue to start, seconds) of the short jobs of a steady stream.

    ``long_share`` of the jobs sleep 50 ms. One worker process, concurrency 4. Returns the
    short jobs' latencies and the wall time of the run.
    """
    import bench_app

    timed = bench_app.app.tasks["timed"]
    proc = worker_process(url, prefix, "-Q", "mixed", "-c", "4")
    try:
        timed.enqueue(time.time()).result(timeout=60)  # the worker is up and warm
        every = round(1 / long_share) if long_share else 0
        shorts, longs = [], []
        interval = 1.0 / rate
        begin = next_at = time.perf_counter()
        for i in range(n):
            next_at += interval
            pause = next_at - time.perf_counter()
            if pause > 0:
                time.sleep(pause)
            if every and i % every == every - 1:
                longs.append(timed.enqueue(time.time(), 0.05))
            else:
                shorts.append(timed.enqueue(time.time()))
        latencies = [float(job.result(timeout=60)) for job in shorts]
        for job in longs:
            job.result(timeout=60)
        elapsed = time.perf_counter() - begin
    finally:
        stop_process(proc)
    return latencies, elapsed


def rss_kib(pid: int) -> int:
    """Resident memory of process ``pid`` (Linux ``/proc``)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def memory_growth(url: str, prefix: str, first: int, total: int) -> tuple[int, int]:
    """A worker's RSS (KiB) after ``first`` no-op jobs and after ``total``, same process."""
    import bench_app

    noop = bench_app.app.tasks["noop"]
    broker = bench_app.app.broker
    proc = worker_process(url, prefix, "-Q", "procs", "-c", "8")
    try:
        readings = []
        done = 0
        for target in (first, total):
            for start in range(done, target, 5000):
                noop.enqueue_many([() for _ in range(min(5000, target - start))])
            wait_drained(broker, "procs", target - done, timeout=600)
            done = target
            time.sleep(0.2)  # settle the last acks
            readings.append(rss_kib(proc.pid))
    finally:
        stop_process(proc)
    return readings[0], readings[1]


def wrk(url: str, seconds: float, connections: int) -> tuple[float, int, int]:
    """``wrk`` on ``url`` for ``seconds`` with ``connections`` open.

    Returns (requests/s, requests, failed requests and socket errors).
    """
    out = subprocess.run(
        ["wrk", "-t", "1", "-c", str(connections), "-d", f"{seconds:g}s", url],
        capture_output=True,
        text=True,
        check=True,
        timeout=seconds + 30,
    ).stdout
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out)[1])  # type: ignore[index]
    requests = int(re.search(r"(\d+) requests in", out)[1])  # type: ignore[index]
    failed = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    failures = int(failed[1]) if failed else 0
    if errors:
        failures += sum(int(n) for n in errors.groups())
    return rate, requests, failures


def web_enqueue(
    url: str, prefix: str, rounds: int, seconds: float, connections: int
) -> dict[str, tuple[float, int]]:
    """Requests/s of a Starlette handler (uvicorn, ``bench/asgi_app.py``) under ``wrk``.

    One server process serves both handlers: one raw ``redis.asyncio`` LPUSH (the floor) and
    ``await noop.enqueue_async()``. They are measured in alternation, ``rounds`` times each,
    ``seconds`` a time with ``connections`` open, after a warm-up of each; the rate of a
    handler is its median. Returns, per handler, that rate and the requests sent. Any
    failed request fails the benchmark.
    """
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, WORQ_BENCH_URL=url, WORQ_BENCH_PREFIX=prefix)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(BENCH_DIR), env.get("PYTHONPATH")]))
    command = [sys.executable, "-m", "uvicorn", "asgi_app:app", "--host", "127.0.0.1"]
    server = subprocess.Popen(
        [*command, "--port", str(port), "--log-level", "warning", "--no-access-log"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the web app did not start") from None
                time.sleep(0.1)
        rates: dict[str, list[float]] = {"raw": [], "enqueue": []}
        sent = dict.fromkeys(rates, 0)
        for path in rates:
            wrk(f"{base}/{path}", 1, connections)  # warm up: connections, scripts, JIT caches
        for _ in range(rounds):
            for path, found in rates.items():
                rate, requests, failures = wrk(f"{base}/{path}", seconds, connections)
                if failures:
                    raise RuntimeError(f"{failures} requests to /{path} failed")
                found.append(rate)
                sent[path] += requests
    finally:
        stop_process(server)
    return {path: (statistics.median(found), sent[path]) for path, found in rates.items()}


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
    parser.add_argument(
        "--producers",
        action="store_true",
        help="only the producer rows: the floors, enqueues and the web handler",
    )
    args = parser.parse_args()

    drain_jobs = args.jobs or (5_000 if args.quick else 20_000)
    one_by_one = 5_000 if args.quick else 10_000
    batch_jobs = 20_000 if args.quick else 100_000
    latency_jobs = 200 if args.quick else 1_000
    mixed_jobs = 600 if args.quick else 3_000
    memory_jobs = (2_000, 20_000) if args.quick else (10_000, 100_000)
    prefix = f"worqbench-{uuid.uuid4().hex[:8]}"
    os.environ["WORQ_BENCH_URL"], os.environ["WORQ_BENCH_PREFIX"] = args.url, prefix
    sys.path.insert(0, str(BENCH_DIR))
    client = redis.Redis.from_url(args.url)
    client.ping()
    rows: list[Row] = []
    try:
        floor = raw_floor(client, prefix, one_by_one)
        rtt = 1.0 / floor["lpush"]
        app = make_app(args.url, prefix)
        task = app.tasks["noop"]
        task.enqueue()  # warm up: connection, script cache, queue registry
        task.enqueue_many([()])
        app.broker.purge_dead("bench")
        rounds = 9 if args.quick else 15
        found = enqueue_rounds(client, prefix, task, rounds, one_by_one // rounds, batch_jobs)
        note = f"median of {rounds} rounds, alternating with its floor"
        for name, measure, base, jobs in [
            ("raw LPUSH, one round trip each", "lpush", "lpush", one_by_one),
            ("enqueue one by one", "one", "lpush", one_by_one),
            ("raw LPUSH pipelined by 1,000", "pipelined", "pipelined", batch_jobs),
            ("enqueue_many (1,000 per call)", "many", "pipelined", batch_jobs),
        ]:
            ratios = [a / b for a, b in zip(found[measure], found[base], strict=True)]
            rate = statistics.median(found[measure])
            rows.append(Row(name, jobs, rate, base, statistics.median(ratios), note))
        rows.append(Row("raw RPOP, one round trip each", one_by_one, floor["rpop"], "rpop", 1.0))
        if shutil.which("wrk") is None:
            print("wrk is not installed (Debian: apt-get install wrk): no web handler rows")
        else:
            web_rounds, web_seconds = (2, 3.0) if args.quick else (3, 5.0)
            web = web_enqueue(args.url, prefix, web_rounds, web_seconds, connections=32)
            note = f"wrk -c 32, median of {web_rounds} x {web_seconds:g} s, alternating"
            (raw_rate, raw_sent), (enqueue_rate, enqueue_sent) = web["raw"], web["enqueue"]
            rows.append(
                Row("web handler: one redis.asyncio LPUSH", raw_sent, raw_rate, "web", 1.0, note)
            )
            rows.append(
                Row(
                    "web handler: await task.enqueue_async()",
                    enqueue_sent,
                    enqueue_rate,
                    "web",
                    enqueue_rate / raw_rate,
                    note,
                )
            )
        if args.producers:
            app.close()
            return finish(rows, rtt, args.json, args.url)
        Worker(
            app,
            WorkerSettings(queues=("bench",), concurrency=8, idle_wait=0.01, handle_signals=False),
        ).run(burst=True)  # drain what the enqueue figures left

        elapsed = broker_loop(app, drain_jobs)
        rate = drain_jobs / elapsed
        rows.append(
            Row(
                "broker settle_and_fetch loop, no worker",
                drain_jobs,
                rate,
                "rpop",
                rate / floor["rpop"],
                "the broker's share of a drain at concurrency 1",
            )
        )

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

        cli: dict[int, float] = {}
        for concurrency in (1, 8):
            elapsed = drain_processes(args.url, prefix, drain_jobs, 1, concurrency)
            rate = cli[concurrency] = drain_jobs / elapsed
            rows.append(
                Row(
                    f"drain, worq worker --concurrency {concurrency}",
                    drain_jobs,
                    rate,
                    "rpop",
                    rate / floor["rpop"],
                    "one process, lease keeper on",
                )
            )
        for concurrency in (1, 8):
            elapsed = drain_processes(args.url, prefix, drain_jobs, 2, concurrency)
            rate = drain_jobs / elapsed
            rows.append(
                Row(
                    f"drain, worker --processes 2 --concurrency {concurrency}",
                    drain_jobs,
                    rate,
                    "rpop",
                    rate / floor["rpop"],
                    f"{rate / cli[concurrency]:.2f}x one process",
                )
            )

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

        short_only, _ = mixed_latency(args.url, prefix, mixed_jobs, 200.0, 0.0)
        mixed, _ = mixed_latency(args.url, prefix, mixed_jobs, 200.0, 0.1)
        for name, q in (("p50", 0.5), ("p99", 0.99)):
            alone, among = percentile(short_only, q), percentile(mixed, q)
            rows.append(
                Row(
                    f"short-job pickup {name}, all short, 200 jobs/s, -c 4 (ms)",
                    len(short_only),
                    alone * 1000,
                    "rtt",
                    alone / rtt,
                )
            )
            rows.append(
                Row(
                    f"short-job pickup {name}, 10% sleep 50 ms, 200 jobs/s, -c 4 (ms)",
                    len(mixed),
                    among * 1000,
                    "rtt",
                    among / rtt,
                    f"{among / alone:.2f}x all short",
                )
            )

        low, high = memory_growth(args.url, prefix, *memory_jobs)
        rows.append(
            Row(
                f"worker RSS after {memory_jobs[0]:,} no-op jobs (MiB)",
                memory_jobs[0],
                low / 1024,
                "rss",
                1.0,
            )
        )
        rows.append(
            Row(
                f"worker RSS after {memory_jobs[1]:,} no-op jobs (MiB)",
                memory_jobs[1],
                high / 1024,
                "rss",
                high / low,
                "issue 4: within 10%",
            )
        )
    finally:
        delete_prefix(client, prefix)
        client.close()
    return finish(rows, rtt, args.json, args.url)


def finish(rows: list[Row], rtt: float, json_path: str | None, url: str) -> int:
    """Print the table, write the JSON if asked."""
    render(rows, rtt)
    if json_path:
        with open(json_path, "w") as out:
            json.dump(
                {"url": url, "rtt_ms": rtt * 1000, "rows": [asdict(r) for r in rows]},
                out,
                indent=2,
            )
    return 0


def render(rows: list[Row], rtt: float) -> None:
    header = f"raw round trip (one LPUSH): {rtt * 1e6:.0f} µs"
    lines = [
        "| measure | jobs | rate (/s), ms or MiB | vs floor | note |",
        "|---|---:|---:|---:|---|",
    ]
    for row in rows:
        value = f"{row.rate:,.0f}" if row.floor not in ("rtt", "rss") else f"{row.rate:.2f}"
        if row.floor == "rss":
            ratio = f"{row.ratio:.3f}x first" if row.note else "1.00x"
        else:
            ratio = f"{row.ratio:.2f}x {row.floor}"
        lines.append(f"| {row.name} | {row.jobs:,} | {value} | {ratio} | {row.note} |")
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(header)
        print("\n".join(lines))
        return
    table = Table(title=header)
    for column in ("measure", "jobs", "rate (/s), ms or MiB", "vs floor", "note"):
        table.add_column(column, justify="left" if column in ("measure", "note") else "right")
    for line in lines[2:]:
        table.add_row(*[cell.strip() for cell in line.strip("|").split("|")])
    Console().print(table)
    print("\nMarkdown:\n" + "\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
