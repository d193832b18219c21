"""The raw floor of a drain: ``python -m peers.raw_drain ITEMS KEY N PROCESSES THREADS``.

PROCESSES processes of THREADS threads each (the processes forked and released together) pop
``ITEMS`` with one RPOP each and run the jobs' body, :func:`peers.count`, for each item, until
the list is empty. No library is involved: this is how far the same Redis work scales from one
process to two on the machine, beside the Redis server, which shares its cores.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.synchronize
import sys
import threading

import redis

from peers import URL, count


def drain(
    items: str, key: str, total: int, threads: int, start: multiprocessing.synchronize.Barrier
) -> None:
    client = redis.Redis.from_url(URL, max_connections=threads)
    client.ping()

    def pop() -> None:
        while client.rpop(items) is not None:
            count(key, total)

    workers = [threading.Thread(target=pop) for _ in range(threads)]
    start.wait()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()


def main() -> None:
    items, key = sys.argv[1], sys.argv[2]
    total, processes, threads = (int(arg) for arg in sys.argv[3:6])
    context = multiprocessing.get_context("fork")  # this process has no threads
    start = context.Barrier(processes)
    workers = [
        context.Process(target=drain, args=(items, key, total, threads, start))
        for _ in range(processes)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()


if __name__ == "__main__":
    main()
