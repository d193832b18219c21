"""The raw floor of a drain in several processes: ``python -m peers.raw_drain ITEMS KEY N P``.

P processes (forked once each has its own connection, released together) pop ``ITEMS`` with
one RPOP each and run the jobs' body, :func:`peers.count`, for each item, until the list is
empty. No library is involved: this is how far the same Redis work scales from one process to
two on the machine, beside the Redis server, which shares its cores.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.synchronize
import sys

import redis

from peers import URL, count


def drain(items: str, key: str, total: int, start: multiprocessing.synchronize.Barrier) -> None:
    client = redis.Redis.from_url(URL)
    client.ping()
    start.wait()
    while client.rpop(items) is not None:
        count(key, total)


def main() -> None:
    items, key, total, processes = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    context = multiprocessing.get_context("fork")  # this process has no threads
    start = context.Barrier(processes)
    workers = [
        context.Process(target=drain, args=(items, key, total, start)) for _ in range(processes)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()


if __name__ == "__main__":
    main()
