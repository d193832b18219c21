"""`worq worker --processes 2 --metrics-port P` on real Redis: one scrape sums every child.

The supervisor serves the children's samples (prometheus_client's multiprocess mode) and reads
the broker once; the test scrapes it over HTTP and parses the text with prometheus_client's own
parser. Every process is the test's own (grand)child, stopped or SIGKILLed by its pid.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import time
import urllib.request
from collections import Counter
from collections.abc import Callable

import pytest
from prometheus_client.parser import text_string_to_metric_families
from redis_support import Runtime, stop

RUNTIME_APP = "prom_app"
"""The app module the ``runtime`` fixture runs."""

Sample = tuple[str, dict[str, str], float]


def metrics_port() -> int:
    """A free loopback port: from WORQ_TEST_PORTS (as 19100-19199) when set, else any."""
    spec = os.environ.get("WORQ_TEST_PORTS")
    candidates = [0]
    if spec:
        low, high = (int(part) for part in spec.split("-"))
        candidates = random.sample(range(low, high + 1), high - low + 1)
    for port in candidates:
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return int(sock.getsockname()[1])
    raise RuntimeError(f"no free port in {spec}")


def scrape(port: int) -> list[Sample]:
    """Every sample of one scrape, in order (duplicates kept, so a repeat would show)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return [
        (sample.name, dict(sample.labels), sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    ]


def total(samples: list[Sample], name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    return sum(
        v for n, got, v in samples if n == name and all(got.get(k) == x for k, x in labels.items())
    )


def wait_for(port: int, condition: Callable[[list[Sample]], bool], what: str) -> list[Sample]:
    """Scrape until ``condition`` holds for a scrape (a broker reading is cached 1 s)."""
    deadline = time.monotonic() + 40
    while True:
        try:
            samples = scrape(port)
        except OSError:
            samples = []  # not serving yet
        if samples and condition(samples):
            return samples
        assert time.monotonic() < deadline, f"timed out waiting for {what}: {samples}"
        time.sleep(0.1)


@pytest.mark.timeout(120)
def test_one_scrape_sums_the_counts_of_every_worker_process(runtime: Runtime) -> None:
    port = metrics_port()
    proc = runtime.worker(
        "--processes", "2", "--concurrency", "1", "--queues", "prom", "--metrics-port", str(port)
    )
    # Both children registered before the jobs arrive, so both take a share.
    wait_for(port, lambda s: total(s, "worq_workers") == 2, "two live workers")
    app = runtime.app()
    app.tasks["ok"].enqueue_many([(n,) for n in range(20)])
    app.tasks["flaky"].enqueue_many([(n,) for n in range(3)])
    app.tasks["spawn"].enqueue_many([(n,) for n in range(4)])  # each sends one more "ok"
    samples = wait_for(
        port,
        lambda s: (
            total(s, "worq_jobs_settled_total") == 34
            and total(s, "worq_queue_jobs", state="ready") == 0
            and total(s, "worq_queue_jobs", state="dead") == 3
        ),
        "34 settlements",
    )
    log = stop(proc)
    assert proc.returncode == 0, log[-3000:]
    assert f"metrics of 2 worker processes at http://127.0.0.1:{port}/metrics" in log

    pids = Counter(runtime.ledger("pids"))
    assert sum(pids.values()) == 34
    assert len(pids) == 2, f"both processes ran jobs: {pids}"

    def settled(task: str, outcome: str) -> float:
        return total(samples, "worq_jobs_settled_total", task=task, outcome=outcome, queue="prom")

    assert settled("ok", "succeeded") == 24
    assert settled("spawn", "succeeded") == 4
    assert settled("flaky", "retrying") == 3
    assert settled("flaky", "dead") == 3
    assert total(samples, "worq_jobs_enqueued_total", task="ok") == 4  # sent from the children
    assert total(samples, "worq_job_run_seconds_count") == 34
    assert total(samples, "worq_job_queue_wait_seconds_count") == 31  # first attempts only
    assert total(samples, "worq_jobs_in_flight") == 0
    # The broker's gauges come once, from the supervisor, not once per child.
    names = Counter((name, tuple(sorted(labels.items()))) for name, labels, _ in samples)
    repeated = {key for key, count in names.items() if count > 1}
    assert not repeated, repeated
    depths = [(labels["state"], v) for n, labels, v in samples if n == "worq_queue_jobs"]
    assert sorted(depths) == [("dead", 3), ("delayed", 0), ("ready", 0), ("running", 0)]
    assert total(samples, "worq_workers") == 2
    assert total(samples, "worq_worker_slots") == 2
    assert total(samples, "worq_broker_up") == 1


@pytest.mark.timeout(120)
def test_a_killed_child_keeps_its_counts_and_leaves_nothing_in_flight(runtime: Runtime) -> None:
    port = metrics_port()
    proc = runtime.worker(
        "--processes", "2", "--queues", "prom", "--lease", "2", "--metrics-port", str(port)
    )
    wait_for(port, lambda s: total(s, "worq_workers") == 2, "two live workers")
    app = runtime.app()
    app.tasks["slow"].enqueue()
    victim = int(runtime.wait_for("slow", timeout=30))
    wait_for(port, lambda s: total(s, "worq_jobs_in_flight", task="slow") == 1, "slow in flight")
    os.kill(victim, signal.SIGKILL)
    # Its lease runs out, the job's second attempt returns at once in the other process (or in
    # the successor the supervisor starts).
    samples = wait_for(
        port,
        lambda s: (
            total(s, "worq_jobs_settled_total", task="slow", outcome="succeeded") == 1
            and total(s, "worq_jobs_in_flight", task="slow") == 0
        ),
        "the redelivered job settled and nothing in flight",
    )
    log = stop(proc)
    assert proc.returncode == 0, log[-3000:]
    assert "died (signal 9)" in log
    # The first attempt's queue wait was recorded by the killed process only: it is still
    # counted. Its run never ended, so only the second attempt's run time is.
    assert total(samples, "worq_job_queue_wait_seconds_count", task="slow") == 1
    assert total(samples, "worq_job_run_seconds_count", task="slow") == 1
