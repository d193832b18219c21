"""What the lifecycle seam costs per job: middleware stacks, and this tree against an older one.

    python bench/seam_bench.py                                  # memory and Redis, 5 rounds
    python bench/seam_bench.py --quick
    python bench/seam_bench.py --baseline-python /path/to/old/venv/bin/python

Each figure is the median of several rounds; every round runs each variant in a fresh
subprocess, interleaved, so the machine's drift hits all variants alike. A variant enqueues N
no-op jobs with ``enqueue_many`` and times a burst worker draining them, at concurrency 1 and
8, on the memory broker (the worker's own cost, no network) and on the local Redis (under a
fresh key prefix, deleted afterwards). Ratios are to "none" of this tree in the same run:

* ``none``: no middleware;
* ``3 empty``: three middlewares that override no hook (composed away at start);
* ``3 pass-through``: three middlewares overriding every per-job hook, each doing nothing;
* ``baseline``: the same drain with ``--baseline-python``, an interpreter that has an older
  worq installed (the tree before the seam), for before/after figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
import uuid
from typing import Any

URL = "redis://127.0.0.1:6379/15"
VARIANTS = ("none", "3 empty", "3 pass-through")


def measure(backend: str, concurrency: int, variant: str, jobs: int) -> dict[str, float]:
    """Run in a subprocess: enqueue ``jobs`` no-op jobs, drain them; seconds for each step."""
    from worq_core import WorkerSettings, Worq

    middleware: list[Any] = []
    if variant != "none" and variant != "baseline":
        from worq_core import Middleware

        class Empty(Middleware):
            pass

        class PassThrough(Middleware):
            def before_enqueue(self, request: Any) -> None:
                return None

            def wrap_run(self, job: Any, call: Any) -> Any:
                return call()

            def decide(self, job: Any, decision: Any) -> Any:
                return decision

            def after_settle(self, job: Any, decision: Any) -> None:
                return None

        kind = Empty if variant == "3 empty" else PassThrough
        middleware = [kind(), kind(), kind()]
    prefix = f"worqbench-{uuid.uuid4().hex[:10]}"
    if backend == "memory":
        app = Worq("memory://", middleware=middleware) if middleware else Worq("memory://")
    else:
        from worq_redis import RedisBroker, RedisStorage

        options: dict[str, Any] = {"middleware": middleware} if middleware else {}
        app = Worq(
            RedisBroker(URL, prefix=prefix), storage=RedisStorage(URL, prefix=prefix), **options
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
    if backend == "redis":
        import redis

        client = redis.Redis.from_url(URL)
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        for start in range(0, len(keys), 500):
            client.delete(*keys[start : start + 500])
    return {"enqueue": enqueued, "drain": drained}


def run_variant(python: str, backend: str, concurrency: int, variant: str, jobs: int) -> Any:
    out = subprocess.run(
        [python, __file__, "--measure", backend, str(concurrency), variant, str(jobs)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer jobs and rounds")
    parser.add_argument("--jobs", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--baseline-python", help="an interpreter with an older worq installed")
    parser.add_argument("--measure", nargs=4, metavar=("BACKEND", "CONC", "VARIANT", "JOBS"))
    args = parser.parse_args()
    if args.measure:
        backend, concurrency, variant, jobs = args.measure
        print(json.dumps(measure(backend, int(concurrency), variant, int(jobs))))
        return 0
    jobs = args.jobs or (3000 if args.quick else 10000)
    rounds = args.rounds or (3 if args.quick else 5)
    variants = list(VARIANTS) + (["baseline"] if args.baseline_python else [])
    print(f"{jobs} no-op jobs per drain, median of {rounds} rounds, variants interleaved")
    print(
        f"{'backend':8} {'conc':>4} {'variant':16} {'drain/s':>9} {'us/job':>7} {'ratio':>6}  "
        f"{'enqueue/s':>9} {'ratio':>6}"
    )
    for backend in ("memory", "redis"):
        for concurrency in (1, 8):
            samples: dict[str, list[dict[str, float]]] = {v: [] for v in variants}
            for _ in range(rounds):
                for variant in variants:
                    python = args.baseline_python if variant == "baseline" else sys.executable
                    samples[variant].append(
                        run_variant(python, backend, concurrency, variant, jobs)
                    )
            drain = {v: statistics.median(s["drain"] for s in samples[v]) for v in variants}
            enq = {v: statistics.median(s["enqueue"] for s in samples[v]) for v in variants}
            for variant in variants:
                print(
                    f"{backend:8} {concurrency:>4} {variant:16} {jobs / drain[variant]:>9,.0f} "
                    f"{drain[variant] / jobs * 1e6:>7.1f} {drain['none'] / drain[variant]:>6.2f}"
                    f"  {jobs / enq[variant]:>9,.0f} {enq['none'] / enq[variant]:>6.2f}"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
