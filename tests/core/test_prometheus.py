"""Prometheus metrics: the middleware, the broker collector and `worq worker --metrics-port`.

In-process cases record into a private registry and read it back through prometheus_client's
own text parser, as a scraper would; the `worq worker` cases run real subprocesses and scrape
them over HTTP. The multi-process sum is in tests/redis/test_prometheus_processes.py.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from worq_core import JobContext, PluginError, RetryPolicy, WorkerSettings, Worq
from worq_core.cli import main
from worq_core.contrib import prometheus
from worq_core.contrib.prometheus import (
    BrokerCollector,
    MetricsServer,
    PrometheusMiddleware,
)
from worq_core.testing.support import eventually, running

HERE = Path(__file__).resolve().parent
NOW = RetryPolicy(base=0.0, jitter=False)

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    """Every sample of an exposition, by (sample name, labels)."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def scrape(registry: CollectorRegistry) -> Samples:
    return parse(generate_latest(registry).decode())


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def named(samples: Samples, name: str) -> dict[frozenset[tuple[str, str]], float]:
    return {labels: v for (n, labels), v in samples.items() if n == name}


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


def http_scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return parse(response.read().decode())


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


def make_app(registry: CollectorRegistry, **options: Any) -> Worq:
    return Worq(middleware=[PrometheusMiddleware(registry, **options)])


def drain(app: Worq, concurrency: int = 2) -> None:
    settings = WorkerSettings(
        queues=tuple(app.default_queues()),
        concurrency=concurrency,
        idle_wait=0.01,
        handle_signals=False,
    )
    app.worker(settings=settings).run(burst=True)


# -- the middleware --------------------------------------------------------------------------------


def test_jobs_are_counted_by_task_queue_and_outcome(registry: CollectorRegistry) -> None:
    app = make_app(registry)

    @app.task(name="ok", queue="q1")
    def ok(n: int) -> int:
        return n

    @app.task(name="flaky", queue="q2", max_retries=1, retry=NOW)
    def flaky() -> None:
        raise RuntimeError("always")

    ok.enqueue_many([(n,) for n in range(3)])
    flaky.enqueue()
    flaky.enqueue()
    drain(app)
    samples = scrape(registry)

    settled = named(samples, "worq_jobs_settled_total")
    assert settled == {
        frozenset({"task": "ok", "queue": "q1", "outcome": "succeeded"}.items()): 3.0,
        frozenset({"task": "flaky", "queue": "q2", "outcome": "retrying"}.items()): 2.0,
        frozenset({"task": "flaky", "queue": "q2", "outcome": "dead"}.items()): 2.0,
    }
    assert value(samples, "worq_jobs_enqueued_total", task="ok", queue="q1") == 3.0
    assert value(samples, "worq_jobs_enqueued_total", task="flaky", queue="q2") == 2.0
    # Every run is timed; the queue wait is the first attempt's only.
    assert value(samples, "worq_job_run_seconds_count", task="ok", queue="q1") == 3.0
    assert value(samples, "worq_job_run_seconds_count", task="flaky", queue="q2") == 4.0
    assert value(samples, "worq_job_queue_wait_seconds_count", task="flaky", queue="q2") == 2.0
    assert value(samples, "worq_jobs_in_flight", task="ok", queue="q1") == 0.0
    app.close()


def test_a_running_job_is_in_flight_and_async_tasks_are_measured_too(
    registry: CollectorRegistry,
) -> None:
    app = make_app(registry)
    seen: list[float | None] = []

    def in_flight(task: str) -> float | None:
        return registry.get_sample_value("worq_jobs_in_flight", {"task": task, "queue": "default"})

    @app.task(name="sync")
    def sync_task() -> None:
        seen.append(in_flight("sync"))

    @app.task(name="coro")
    async def coro_task() -> None:
        await asyncio.sleep(0)
        seen.append(in_flight("coro"))

    sync_task.enqueue()
    coro_task.enqueue()
    drain(app, concurrency=1)
    assert seen == [1.0, 1.0]
    samples = scrape(registry)
    for task in ("sync", "coro"):
        assert value(samples, "worq_jobs_in_flight", task=task, queue="default") == 0.0
        assert value(samples, "worq_job_run_seconds_count", task=task, queue="default") == 1.0
        assert value(samples, "worq_job_queue_wait_seconds_count", task=task, queue="default") == 1
        assert (
            value(
                samples, "worq_jobs_settled_total", task=task, queue="default", outcome="succeeded"
            )
            == 1.0
        )
    app.close()


class FakeClock:
    """Wall time fixed at ``now``; perf_counter advancing by ``step`` at each read."""

    def __init__(self, now: float, step: float) -> None:
        self.now = now
        self.step = step
        self.counter = 0.0

    def time(self) -> float:
        return self.now

    def perf_counter(self) -> float:
        self.counter += self.step
        return self.counter


def test_queue_wait_runs_from_the_enqueue_time_and_run_time_around_the_call(
    registry: CollectorRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    middleware = PrometheusMiddleware(registry)
    monkeypatch.setattr(prometheus, "time", FakeClock(now=1002.5, step=0.75))

    def context(attempt: int, enqueued_at: float | None) -> JobContext:
        return JobContext("id", "t", "q", attempt, 3, enqueued_at=enqueued_at)

    assert middleware.wrap_run(context(1, 1000.0), lambda: "value") == "value"
    middleware.wrap_run(context(2, 1000.0), lambda: None)  # a retry: its wait is unknown
    middleware.wrap_run(context(1, 1010.0), lambda: None)  # the producer's clock is ahead
    middleware.wrap_run(context(1, None), lambda: None)  # no enqueue time: not observed
    with pytest.raises(ValueError, match="boom"):
        middleware.wrap_run(context(1, None), lambda: (_ for _ in ()).throw(ValueError("boom")))

    samples = scrape(registry)
    labels = {"task": "t", "queue": "q"}
    assert value(samples, "worq_job_queue_wait_seconds_count", **labels) == 2.0
    assert value(samples, "worq_job_queue_wait_seconds_sum", **labels) == 2.5  # 2.5 + 0 (clamped)
    assert value(samples, "worq_job_queue_wait_seconds_bucket", **labels, le="1.0") == 1.0
    assert value(samples, "worq_job_queue_wait_seconds_bucket", **labels, le="2.5") == 2.0
    assert value(samples, "worq_job_run_seconds_count", **labels) == 5.0  # the failed run too
    assert value(samples, "worq_job_run_seconds_sum", **labels) == 5 * 0.75
    assert value(samples, "worq_jobs_in_flight", **labels) == 0.0


def test_enqueue_calls_that_raise_are_counted_apart(registry: CollectorRegistry) -> None:
    middleware = PrometheusMiddleware(registry)
    from worq_core import EnqueueRequest

    requests = [EnqueueRequest("t", f"id{n}", "q", (), {}) for n in range(3)]
    middleware.after_enqueue(requests, None)
    middleware.after_enqueue(requests[:2], ConnectionError("down"))
    samples = scrape(registry)
    assert value(samples, "worq_jobs_enqueued_total", task="t", queue="q") == 3.0
    assert value(samples, "worq_enqueue_errors_total", task="t", queue="q") == 2.0


def test_apps_sharing_a_registry_share_its_metrics(registry: CollectorRegistry) -> None:
    first, second = make_app(registry), make_app(registry)  # no duplicate-metric error
    for app in (first, second):

        @app.task(name="same")
        def same() -> None:
            return None

        same.enqueue()
        drain(app)
        app.close()
    samples = scrape(registry)
    assert (
        value(samples, "worq_jobs_settled_total", task="same", queue="default", outcome="succeeded")
        == 2.0
    )


def test_the_builtin_name_prometheus_builds_the_middleware() -> None:
    from prometheus_client import REGISTRY

    app = Worq(middleware=["prometheus"])
    [middleware] = app.middleware.middlewares
    assert isinstance(middleware, PrometheusMiddleware)
    assert middleware.registry is REGISTRY
    assert middleware.broker_metrics
    listing = CliRunner().invoke(main, ["plugins"], terminal_width=200).stdout
    assert "middleware prometheus" in listing


def test_without_prometheus_client_the_middleware_says_which_extra_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # import raises ImportError
    with pytest.raises(PluginError, match=r"pip install 'worq-core\[prometheus\]'"):
        PrometheusMiddleware()
    monkeypatch.syspath_prepend(str(HERE))
    sys.modules.pop("cli_burst_app", None)
    result = CliRunner().invoke(
        main, ["worker", "cli_burst_app:app", "--burst", "--metrics-port", "9"]
    )
    sys.modules.pop("cli_burst_app", None)
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: --metrics-port: ")
    assert "worq-core[prometheus]" in lines[0]


def test_enable_adds_the_middleware_outermost_once_and_keeps_resolved_instances(
    registry: CollectorRegistry,
) -> None:
    from worq_core import Middleware

    class Other(Middleware):
        def wrap_run(self, job: JobContext, call: Any) -> Any:
            return call()

    other = Other()
    app = Worq(middleware=[other])
    app.middleware  # noqa: B018 - resolved before metrics are switched on, as after an enqueue
    added = prometheus.enable(app, broker_metrics=False)
    assert app.middleware.middlewares == (added, other)
    assert app.middleware.wraps == (added.wrap_run, other.wrap_run)
    assert not added.broker_metrics
    assert prometheus.enable(app) is added  # found, not added twice
    assert added.broker_metrics
    own = PrometheusMiddleware(registry)
    listed = Worq(middleware=[own])
    assert prometheus.enable(listed) is own  # the app's own keeps its registry
    assert listed.middleware.middlewares == (own,)


# -- the broker collector --------------------------------------------------------------------------


def test_the_broker_collector_reads_queue_depths_by_state(registry: CollectorRegistry) -> None:
    app = Worq()

    @app.task(name="a", queue="qa", max_retries=0)
    def a(fail: bool) -> None:
        if fail:
            raise RuntimeError("dead")

    a.enqueue(True)
    drain(app)  # one dead job in qa
    a.enqueue_many([(False,), (False,)])
    a.options(delay=3600).enqueue(False)
    registry.register(BrokerCollector(app.broker))
    samples = scrape(registry)
    assert named(samples, "worq_queue_jobs") == {
        frozenset({"queue": "qa", "state": "ready"}.items()): 2.0,
        frozenset({"queue": "qa", "state": "delayed"}.items()): 1.0,
        frozenset({"queue": "qa", "state": "running"}.items()): 0.0,
        frozenset({"queue": "qa", "state": "dead"}.items()): 1.0,
    }
    assert value(samples, "worq_broker_up") == 1.0
    assert value(samples, "worq_workers") == 0.0
    app.close()


def test_a_burst_of_scrapes_reads_the_broker_once_within_the_cache_time(
    registry: CollectorRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = Worq()
    broker = app.broker
    calls = []
    stats = broker.stats

    def counting(queues: Any = None) -> Any:
        calls.append(queues)
        return stats(queues)

    monkeypatch.setattr(broker, "stats", counting)
    cached = BrokerCollector(broker, cache_seconds=3600)
    registry.register(cached)  # registering reads nothing: describe() names the metrics
    assert calls == []
    threads = [threading.Thread(target=generate_latest, args=(registry,)) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1
    uncached = CollectorRegistry()
    uncached.register(BrokerCollector(broker, cache_seconds=0))
    for _ in range(3):
        generate_latest(uncached)
    assert len(calls) == 4
    app.close()


def test_a_broker_that_fails_reads_as_down_not_as_empty_queues(
    registry: CollectorRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = Worq()
    broker = app.broker

    def down(queues: Any = None) -> Any:
        raise ConnectionError("broker down")

    monkeypatch.setattr(broker, "stats", down)
    registry.register(BrokerCollector(broker, cache_seconds=0))
    samples = scrape(registry)
    assert value(samples, "worq_broker_up") == 0.0
    assert named(samples, "worq_queue_jobs") == {}
    assert named(samples, "worq_workers") == {}
    app.close()


def test_a_running_worker_adds_its_broker_to_the_registry_and_takes_it_away(
    registry: CollectorRegistry,
) -> None:
    app = make_app(registry)
    off = CollectorRegistry()
    quiet = Worq(middleware=[PrometheusMiddleware(off, broker_metrics=False)])
    settings = WorkerSettings(concurrency=3, handle_signals=False, idle_wait=0.01)
    with running(app.worker(settings=settings)), running(quiet.worker(settings=settings)):
        eventually(lambda: value(scrape(registry), "worq_workers") == 1.0, what="registration")
        samples = scrape(registry)
        assert value(samples, "worq_worker_slots") == 3.0
        assert value(samples, "worq_broker_up") == 1.0
        assert named(scrape(off), "worq_broker_up") == {}
    assert named(scrape(registry), "worq_broker_up") == {}
    app.close()
    quiet.close()


# -- serving ---------------------------------------------------------------------------------------


def test_the_metrics_server_serves_the_registry_over_http(registry: CollectorRegistry) -> None:
    app = make_app(registry)

    @app.task(name="t")
    def t() -> None:
        return None

    t.enqueue()
    drain(app)
    server = MetricsServer(registry, "127.0.0.1", metrics_port())
    try:
        assert server.url == f"http://127.0.0.1:{server.port}/metrics"
        samples = http_scrape(server.port)
    finally:
        server.close()
    assert (
        value(samples, "worq_jobs_settled_total", task="t", queue="default", outcome="succeeded")
        == 1.0
    )
    app.close()


def worq_process(*args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("WORQ_BROKER", None)
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    return subprocess.Popen(
        [sys.executable, "-m", "worq_core.cli", *args],
        cwd=HERE,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.fixture
def process() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=10)


@pytest.mark.timeout(60)
def test_worker_metrics_port_serves_one_process_metrics_and_its_broker(
    process: list[subprocess.Popen[str]],
) -> None:
    port = metrics_port()
    # cli_burst_app enqueues 25 jobs that succeed and one that fails, at import.
    proc = worq_process("worker", "cli_burst_app:app", "--metrics-port", str(port))
    process.append(proc)
    scraped: list[Samples] = []

    def finished() -> bool:  # every job settled, and a broker reading since (cached 1 s)
        try:
            scraped[:] = [http_scrape(port)]
        except OSError:
            return False  # not serving yet
        samples = scraped[0]
        return (
            sum(named(samples, "worq_jobs_settled_total").values()) == 26
            and value(samples, "worq_queue_jobs", queue="default", state="dead") == 1.0
        )

    eventually(finished, timeout=30, what="26 settlements and the dead job in the broker")
    [samples] = scraped
    os.kill(proc.pid, signal.SIGTERM)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0, stderr
    assert f"metrics at http://127.0.0.1:{port}/metrics" in stderr
    settled = {
        dict(labels)["outcome"]: v
        for labels, v in named(samples, "worq_jobs_settled_total").items()
    }
    assert settled == {"succeeded": 25.0, "dead": 1.0}
    assert value(samples, "worq_workers") == 1.0
    assert value(samples, "worq_job_run_seconds_count", task="double", queue="default") == 25.0


def test_a_worker_without_metrics_port_never_imports_prometheus_client() -> None:
    code = (
        "import atexit, sys\n"
        "atexit.register(lambda: print(sorted(m for m in sys.modules if 'prometheus' in m)))\n"
        "from worq_core.cli import main\n"
        "main(['worker', 'cli_burst_app:app', '--burst'])\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=HERE, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert "succeeded=25" in done.stderr
    # The built-in plugin module is registered (the registry was built), the library is not.
    assert done.stdout.strip() == "['worq_core.contrib.prometheus']"
