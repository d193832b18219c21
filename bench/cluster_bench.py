"""One Redis Cluster master against three: jobs drained by worker processes over many queues.

    python bench/cluster_bench.py                  # 20,000 jobs over 12 queues, 4 processes
    python bench/cluster_bench.py --jobs 5000 --processes 2 --json out.json

Starts its own clusters on loopback ports 17060-17063 (three masters without replicas, then
one master holding every slot) in a temporary directory and stops them by pid. For each, the
jobs are enqueued first (``enqueue_many`` per queue), then ``worq worker`` processes
(``bench/cluster_bench_app.py``) drain every queue; the figure is jobs per second from their
start to an empty cluster. Each rate is also given as a ratio to the raw floor measured in the
same run (an ``LPUSH`` then an ``RPOP`` per item, one round trip each, on the one-master
cluster); the headline is three masters' rate over one master's. Worker processes share the
machine's cores with the servers, so the ratio says how far Redis was the bottleneck here.

Beside the rates it reads each master's CPU time (``INFO cpu``) over the drain. The busiest
master's share shows how evenly the queues spread, and one master's CPU time over the busiest
of three's is the headroom the layout gives where Redis *is* the bottleneck (masters on cores
or machines of their own): the rate three masters could reach before one of them saturates.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "redis"))
from ha_support import HOST, ClusterSet

from worq_redis import RedisClusterBroker

HERE = Path(__file__).resolve().parent
THREE_BASE, ONE_BASE = 17060, 17063


def server_cpu(ports: tuple[int, ...]) -> list[float]:
    """Each server's CPU seconds so far (user + system, its main thread and the rest)."""
    seconds = []
    for port in ports:
        client = redis.Redis(HOST, port)
        info = client.info("cpu")
        seconds.append(float(info["used_cpu_user"]) + float(info["used_cpu_sys"]))
        client.close()
    return seconds


def drain(
    url: str, jobs: int, queues: list[str], processes: int, ports: tuple[int, ...]
) -> tuple[float, list[float]]:
    """Jobs per second, ``jobs`` over ``queues`` drained by ``processes`` workers; and each
    master's CPU seconds during the drain."""
    broker = RedisClusterBroker(url)
    app_env = dict(os.environ, WORQ_BENCH_URL=url)
    sys.path.insert(0, str(HERE))
    os.environ["WORQ_BENCH_URL"] = url
    sys.modules.pop("cluster_bench_app", None)
    import cluster_bench_app

    per_queue = jobs // len(queues)
    for queue in queues:
        bound = cluster_bench_app.noop.options(queue=queue)
        for start in range(0, per_queue, 1000):
            bound.enqueue_many([()] * min(1000, per_queue - start))
    options = ["--processes", str(processes), "--concurrency", "8", "--queues", ",".join(queues)]
    cpu_before = server_cpu(ports)
    begin = time.perf_counter()
    worker = subprocess.Popen(
        [sys.executable, "-m", "worq_core", "worker", "cluster_bench_app:app", *options],
        cwd=HERE,
        env=app_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        while True:
            stats = broker.stats(queues)
            if all(s.ready + s.delayed + s.running == 0 for s in stats):
                break
            if worker.poll() is not None:
                raise RuntimeError("the workers exited")
            time.sleep(0.05)  # polling the queues' counts: the benchmark's clock, no event
        elapsed = time.perf_counter() - begin
        cpu = [after - before for after, before in zip(server_cpu(ports), cpu_before, strict=True)]
    finally:
        os.kill(worker.pid, signal.SIGTERM)
        worker.wait(60)
        cluster_bench_app.app.broker.close()
        broker.close()
    return per_queue * len(queues) / elapsed, cpu


def floor(port: int, items: int) -> float:
    client = redis.Redis(HOST, port)
    begin = time.perf_counter()
    for n in range(items):
        client.lpush("{floor}", n)
    for _ in range(items):
        client.rpop("{floor}")
    rate = items / (time.perf_counter() - begin)
    client.close()
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--queues", type=int, default=12)
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--json", type=Path)
    options = parser.parse_args()
    queues = [f"q{n}" for n in range(options.queues)]
    rates: dict[str, float] = {}
    cpu: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "one").mkdir()
        (Path(folder) / "three").mkdir()
        one = ClusterSet(Path(folder) / "one", ONE_BASE, masters=1, replicas=0)
        try:
            rates["floor: LPUSH + RPOP"] = floor(one.ports[0], options.jobs // 4)
            rates["one master"], cpu["one master"] = drain(
                f"{one.url}?prefix=bench1", options.jobs, queues, options.processes, one.ports
            )
        finally:
            one.stop()
        three = ClusterSet(Path(folder) / "three", THREE_BASE, masters=3, replicas=0)
        try:
            rates["three masters"], cpu["three masters"] = drain(
                f"{three.url}?prefix=bench3", options.jobs, queues, options.processes, three.ports
            )
        finally:
            three.stop()
    base = rates["floor: LPUSH + RPOP"]
    print(f"{'figure':24} {'jobs/s':>10} {'/floor':>8}")
    for name, value in rates.items():
        print(f"{name:24} {value:10.0f} {value / base:8.3f}")
    ratio = rates["three masters"] / rates["one master"]
    print(f"three masters / one master: {ratio:.3f} ({os.cpu_count()} cores)")
    spread = cpu["three masters"]
    busiest = max(spread)
    shares = ", ".join(f"{seconds / sum(spread):.2f}" for seconds in spread)
    headroom = cpu["one master"][0] / busiest
    print(f"server CPU s: one master {cpu['one master'][0]:.2f}; three masters {shares} of")
    print(f"  {sum(spread):.2f}; one master's CPU / the busiest of three: {headroom:.2f}")
    if options.json:
        result = {"rates": rates, "ratio": ratio, "server_cpu": cpu, "headroom": headroom}
        options.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
