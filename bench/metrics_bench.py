"""What the Prometheus middleware costs per job, against the same drain without it.

    python bench/metrics_bench.py                 # memory and Redis, 5 rounds of 10,000 jobs
    python bench/metrics_bench.py --quick
    python bench/metrics_bench.py --redis-url redis://127.0.0.1:6379/15

Like bench/seam_bench.py: each round runs every variant in a fresh subprocess, interleaved, so
the machine's drift hits them alike; a variant enqueues N no-op jobs with ``enqueue_many`` and
times a burst worker draining them, at concurrency 1 and 8, on the memory broker (the worker's
own cost) and on Redis (under a fresh key prefix, deleted afterwards). Figures are medians;
ratios are to ``none`` in the same run, and ``+us/job`` is the added time per job.

* ``none``: no middleware (the metrics extra is not even imported);
* ``pass-through``: a middleware overriding the same hooks and doing nothing: what the
  middleware seam costs (no fast settle path, a Decision per job), apart from the metrics;
* ``prometheus``: ``PrometheusMiddleware`` on a private registry, in-process values (one
  worker process, as ``worq worker --metrics-port``);
* ``multiprocess``: the same with ``PROMETHEUS_MULTIPROC_DIR`` set, so every sample is written
  to prometheus_client's mmap files (what each child of ``--processes N`` does).

The enqueue column includes ``after_enqueue`` counting one sample per job.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from typing import Any

VARIANTS = ("none", "pass-through", "prometheus", "multiprocess")


def measure(url: str, backend: str, concurrency: int, variant: str, jobs: int) -> dict[str, Any]:
    """Run in a subprocess: enqueue ``jobs`` no-op jobs, drain them; seconds for each step."""
    from worq_core import WorkerSettings, Worq

    middleware: list[Any] = []
    if variant == "pass-through":
        from worq_core import Middleware

        class PassThrough(Middleware):
            def after_enqueue(self, requests: Any, error: Any) -> None:
                return None

            def wrap_run(self, job: Any, call: Any) -> Any:
                return call()

            def after_settle(self, job: Any, decision: Any) -> None:
                return None

        middleware = [PassThrough()]
    elif variant != "none":
        from prometheus_client import CollectorRegistry

        from worq_core.contrib.prometheus import PrometheusMiddleware

        middleware = [PrometheusMiddleware(CollectorRegistry(), broker_metrics=False)]
    prefix = f"worqbench-{uuid.uuid4().hex[:10]}"
    if backend == "memory":
        app = Worq("memory://", middleware=middleware)
    else:
        from worq_redis import RedisBroker, RedisStorage

        app = Worq(
            RedisBroker(url, prefix=prefix),
            storage=RedisStorage(url, prefix=prefix),
            middleware=middleware,
        )

    @app.task(name="noop", queue="bench")
    def noop() -> None:
        return None

    begin = time.perf_counter()
    for start in range(0, jobs, 5000):
        noop.enqueue_many([() for _ in range(min(5000, jobs - start))])
    enqueued = time.perf_counter() - begin
    settings = WorkerSettings(
        queues=("bench",), concurrency=concurrency, idle_wait=0.01, handle_signals=False
    )
    worker = app.worker(settings=settings)
    begin = time.perf_counter()
    worker.run(burst=True)
    drained = time.perf_counter() - begin
    assert worker.counters.succeeded == jobs, worker.counters
    imported = "prometheus_client" in sys.modules
    enabled = variant in ("prometheus", "multiprocess")
    assert imported == enabled, "the library is imported only when enabled"
    if backend == "redis":
        import redis

        client = redis.Redis.from_url(url)
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        for start in range(0, len(keys), 500):
            client.delete(*keys[start : start + 500])
    app.close()
    return {"enqueue": enqueued, "drain": drained}


def run_variant(url: str, backend: str, concurrency: int, variant: str, jobs: int) -> Any:
    env = dict(os.environ)
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    directory = None
    if variant == "multiprocess":
        directory = env["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="worq-bench-")
    try:
        command = [sys.executable, __file__, "--redis-url", url, "--measure", backend]
        out = subprocess.run(
            [*command, str(concurrency), variant, str(jobs)],
            check=True,
            capture_output=True,
            text=True,
            env=env,
        ).stdout
    finally:
        if directory is not None:
            shutil.rmtree(directory, ignore_errors=True)
    return json.loads(out.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer jobs and rounds")
    parser.add_argument("--jobs", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/15")
    parser.add_argument("--backends", default="memory,redis", help="comma-separated")
    parser.add_argument("--measure", nargs=4, metavar=("BACKEND", "CONC", "VARIANT", "JOBS"))
    args = parser.parse_args()
    if args.measure:
        backend, concurrency, variant, jobs = args.measure
        result = measure(args.redis_url, backend, int(concurrency), variant, int(jobs))
        print(json.dumps(result))
        return 0
    jobs = args.jobs or (3000 if args.quick else 10000)
    rounds = args.rounds or (3 if args.quick else 5)
    print(f"{jobs} no-op jobs per drain, median of {rounds} rounds, variants interleaved")
    print(
        f"{'backend':8} {'conc':>4} {'variant':13} {'drain/s':>9} {'us/job':>7} {'ratio':>6} "
        f"{'+us/job':>8}  {'enqueue/s':>9} {'ratio':>6}"
    )
    for backend in args.backends.split(","):
        for concurrency in (1, 8):
            samples: dict[str, list[dict[str, float]]] = {v: [] for v in VARIANTS}
            for _ in range(rounds):
                for variant in VARIANTS:
                    samples[variant].append(
                        run_variant(args.redis_url, backend, concurrency, variant, jobs)
                    )
            drain = {v: statistics.median(s["drain"] for s in samples[v]) for v in VARIANTS}
            enq = {v: statistics.median(s["enqueue"] for s in samples[v]) for v in VARIANTS}
            for variant in VARIANTS:
                added = (drain[variant] - drain["none"]) / jobs * 1e6
                print(
                    f"{backend:8} {concurrency:>4} {variant:13} {jobs / drain[variant]:>9,.0f} "
                    f"{drain[variant] / jobs * 1e6:>7.1f} {drain['none'] / drain[variant]:>6.2f} "
                    f"{added:>+8.1f}  {jobs / enq[variant]:>9,.0f} "
                    f"{enq['none'] / enq[variant]:>6.2f}"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
