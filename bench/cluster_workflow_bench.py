"""What workflow steps cost on Redis Cluster, against plain acknowledgements, in one run.

    python bench/cluster_workflow_bench.py               # 2,000 jobs per figure, two rounds
    python bench/cluster_workflow_bench.py --jobs 500 --json out.json

Starts its own cluster of three masters without replicas on loopback ports 17064-17066 (in a
temporary directory, stopped by pid). One ``RedisClusterBroker`` settles jobs of one queue one at
a time, each settlement its own call: plain acknowledgements; acknowledgements whose ``then``
message goes to the same queue (added by the settle script itself); to a queue on another master
(through the queue's outbox: applied, then deleted); and chord members whose group and callback
are on other masters. Each figure is the rate of those settlements as a ratio to the plain ones
of the same round, with the broker calls each took (counted on the broker's connection lane; a
pipelined call over several nodes counts once).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "redis"))
from ha_support import HOST, ClusterSet

from worq_core.models import Delivery, GroupMember, GroupSpec, Message, Outcome, Settlement
from worq_redis import RedisClusterBroker

BASE = 17064


class Counted:
    """The broker's lane with its outermost calls counted (one per broker call to Redis)."""

    def __init__(self, broker: RedisClusterBroker) -> None:
        self.calls = 0
        self._depth = 0
        lane = broker._lane
        for name in ("script", "scripts", "pipeline", "command"):
            setattr(lane, name, self._wrap(getattr(lane, name)))

    def _wrap(self, call: Callable[..., Any]) -> Callable[..., Any]:
        def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls += self._depth == 0
            self._depth += 1
            try:
                return call(*args, **kwargs)
            finally:
                self._depth -= 1

        return counted


def settle_all(
    broker: RedisClusterBroker,
    counter: Counted,
    deliveries: list[Delivery],
    make: Callable[[Delivery], Settlement],
) -> tuple[float, float]:
    """Settlements per second, and broker calls per settlement."""
    counter.calls = 0
    begin = time.perf_counter()
    for delivery in deliveries:
        broker.settle([make(delivery)])
    elapsed = time.perf_counter() - begin
    return len(deliveries) / elapsed, counter.calls / len(deliveries)


def chained(queue: str) -> Callable[[Delivery], Settlement]:
    """An acknowledgement whose ``then`` message goes to ``queue``."""

    def make(delivery: Delivery) -> Settlement:
        step = Message(f"n-{delivery.id}", queue, b"next")
        return Settlement(delivery, Outcome.ACK, then=(step,))

    return make


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", type=Path)
    options = parser.parse_args()
    jobs = options.jobs
    results: list[dict[str, tuple[float, float]]] = []
    with tempfile.TemporaryDirectory() as folder:
        servers = ClusterSet(Path(folder), BASE, masters=3, replicas=0)
        try:
            client = redis.RedisCluster(HOST, servers.ports[0])
            masters: dict[str, str] = {}
            for n in range(100):
                masters.setdefault(client.get_node_from_key(f"bench:{{q{n}}}:x").name, f"q{n}")
            client.close()
            src, dst, third = list(masters.values())[:3]
            broker = RedisClusterBroker(f"{servers.url}?prefix=bench")
            counter = Counted(broker)

            def leased(messages: list[Message]) -> list[Delivery]:
                got: list[Delivery] = []
                while len(got) < len(messages):
                    got += broker.fetch([src], 1000, lease=600, wait=0)
                return got

            def drained() -> None:
                while broker.fetch([src, dst, third], 1000, lease=600, wait=0):
                    pass

            for r in range(options.rounds):
                row: dict[str, tuple[float, float]] = {}
                plain = [Message(f"p{r}-{i}", src, b"x") for i in range(jobs)]
                broker.enqueue(plain)
                row["plain ack"] = settle_all(
                    broker, counter, leased(plain), lambda d: Settlement(d, Outcome.ACK)
                )
                for label, target in (("then, same queue", src), ("then, other master", dst)):
                    sent = [Message(f"{label[6]}{r}-{i}", src, b"x") for i in range(jobs)]
                    broker.enqueue(sent)
                    row[label] = settle_all(broker, counter, leased(sent), chained(target))
                    drained()
                gid = f"g{r}"
                members = [
                    Message(f"{gid}-{i}", src, b"x", member=GroupMember(gid, i))
                    for i in range(jobs)
                ]
                broker.open_group(GroupSpec(gid, jobs, Message(f"cb{r}", third, b"cb")), members)
                row["chord member"] = settle_all(
                    broker,
                    counter,
                    leased(members),
                    lambda d: Settlement(d, Outcome.ACK, output=b"out"),
                )
                drained()
                results.append(row)
            broker.close()
        finally:
            servers.stop()
    print(f"{'settlement':20} {'round':>5} {'per s':>8} {'/plain':>7} {'calls':>6}")
    for r, row in enumerate(results):
        base = row["plain ack"][0]
        for label, (rate, calls) in row.items():
            print(f"{label:20} {r:5} {rate:8.0f} {rate / base:7.2f} {calls:6.2f}")
    if options.json:
        options.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
