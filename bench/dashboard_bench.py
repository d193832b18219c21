"""How long the dashboard's pages take with 100,000 jobs queued, against the same pages empty.

    python bench/dashboard_bench.py              # 100,000 queued jobs, 20 requests per page
    python bench/dashboard_bench.py --jobs 20000 --requests 10

Two apps on the local Redis, each under a fresh key prefix (deleted afterwards): ``small``
holds ``--small`` queued jobs (1,000: enough to fill every page), 1% of that scheduled and 1%
dead; ``loaded`` holds ``--jobs`` queued jobs with the same shares. Each page is
fetched over HTTP from a dashboard served by uvicorn in this process (what ``worq dashboard``
runs), alternating between the two, and the median time per page is reported with the ratio
loaded/small: a page that scanned the queue would grow with it, a bounded one stays near 1.0.
"""

from __future__ import annotations

import argparse
import statistics
import time
import urllib.request
import uuid

import redis

URL = "redis://127.0.0.1:6379/15"


def build(prefix: str, jobs: int) -> tuple[object, dict[str, str]]:
    from worq_core import Worq
    from worq_redis import RedisBroker, RedisStorage

    app = Worq(RedisBroker(URL, prefix=prefix), storage=RedisStorage(URL, prefix=prefix))

    @app.task(name="work", max_retries=0)
    def work(n: int, payload: str) -> None:
        raise RuntimeError("this bench only fills queues")

    payload = "x" * 100
    ids: dict[str, str] = {}
    # The dead jobs first, through a worker, then everything else stays queued or scheduled.
    first_dead = work.enqueue(-1, payload)
    work.enqueue_many([(-i, payload) for i in range(2, jobs // 100 + 2)])
    app.worker(concurrency=8).run(burst=True)
    ids["dead"] = first_dead.id
    ids["scheduled"] = work.options(delay=86400).enqueue(0, payload).id
    work.options(delay=86400).enqueue_many([(i, payload) for i in range(jobs // 100)])
    ids["queued"] = work.enqueue(0, payload).id
    for start in range(0, jobs, 1000):
        work.enqueue_many([(i, payload) for i in range(start, min(jobs, start + 1000))])
    return app, ids


def pages(ids: dict[str, str]) -> dict[str, str]:
    return {
        "overview": "/",
        "overview JSON": "/api/overview",
        "queued, first page": "/jobs?state=queued",
        "dead, first page": "/jobs?state=dead",
        "scheduled, by task": "/jobs?state=scheduled&task=work",
        "a queued job": f"/job/{ids['queued']}",
        "a dead job": f"/job/{ids['dead']}",
        "dead letters": "/dead",
        "workers": "/workers",
    }


def fetch(url: str) -> float:
    start = time.perf_counter()
    with urllib.request.urlopen(url, timeout=30) as response:
        response.read()
        assert response.status == 200, url
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--small", type=int, default=1000)
    parser.add_argument("--requests", type=int, default=20)
    options = parser.parse_args()

    from worq_core.dashboard import running

    client = redis.Redis.from_url(URL)
    prefixes = {name: f"worqbench-{uuid.uuid4().hex[:10]}" for name in ("small", "loaded")}
    try:
        started = time.perf_counter()
        empty, empty_ids = build(prefixes["small"], options.small)
        loaded, loaded_ids = build(prefixes["loaded"], options.jobs)
        print(f"filled in {time.perf_counter() - started:.1f} s")
        for name, filled in (("small", empty), ("loaded", loaded)):
            for s in filled.broker.stats():  # type: ignore[attr-defined]
                print(
                    f"  {name}: {s.queue} ready {s.ready:,} delayed {s.delayed:,} dead {s.dead:,}"
                )
        with running(empty) as empty_url, running(loaded) as loaded_url:  # type: ignore[arg-type]
            empty_pages, loaded_pages = pages(empty_ids), pages(loaded_ids)
            times: dict[str, dict[str, list[float]]] = {name: {} for name in empty_pages}
            for _ in range(options.requests):
                for name in empty_pages:
                    for side, base, paths in (
                        ("empty", empty_url, empty_pages),
                        ("loaded", loaded_url, loaded_pages),
                    ):
                        times[name].setdefault(side, []).append(fetch(base + paths[name]))
        print(f"\nmedian of {options.requests} requests per page (ms), one run")
        print(f"{'page':<22}{'small':>10}{'loaded':>10}{'ratio':>8}")
        for name, sides in times.items():
            e, lo = statistics.median(sides["empty"]), statistics.median(sides["loaded"])
            print(f"{name:<22}{e * 1000:>10.1f}{lo * 1000:>10.1f}{lo / e:>8.2f}")
    finally:
        for prefix in prefixes.values():
            keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
            for start in range(0, len(keys), 500):
                client.delete(*keys[start : start + 500])
        client.close()


if __name__ == "__main__":
    main()
