"""Prometheus metrics for worq (the ``worq-core[prometheus]`` extra).

``Worq(middleware=["prometheus"])`` (or a :class:`PrometheusMiddleware` instance) counts jobs
by task, queue and outcome, times runs and queue waits, and tracks jobs in flight; while a
worker runs, a :class:`BrokerCollector` on the same registry reads queue depths and the live
workers from the broker at scrape time. ``worq worker --metrics-port N`` serves it all, one
scrape for every process of ``--processes N`` (see :class:`MultiprocessExporter`).

This module is imported when the plugin registry is built, so it must not import
``prometheus_client`` at import time: only building a middleware or an exporter does.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from worq_core.errors import PluginError
from worq_core.hookspecs import hookimpl
from worq_core.middleware import Decision, EnqueueRequest, Middleware
from worq_core.models import Capability

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
    from prometheus_client.metrics_core import Metric

    from worq_core.app import Worq
    from worq_core.broker import Broker
    from worq_core.context import JobContext
    from worq_core.worker import Worker

log = logging.getLogger("worq.prometheus")

#: Histogram buckets in seconds, for both run time and queue wait: jobs run from milliseconds
#: to an hour, and wait as long when workers fall behind.
BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
    600.0, 1800.0, 3600.0,
)  # fmt: skip

#: How long a broker reading serves scrapes (seconds): a burst of scrapers, or several
#: Prometheus servers, cost the broker one ``stats()`` and one ``workers()`` call.
CACHE_SECONDS = 1.0

_INSTALL_HINT = (
    "the prometheus middleware needs prometheus-client: pip install 'worq-core[prometheus]'"
)


def require() -> None:
    """Import prometheus_client, or say which extra brings it."""
    try:
        import prometheus_client  # noqa: F401
    except ImportError as exc:
        raise PluginError(_INSTALL_HINT) from exc


class _Metrics:
    """The metric objects of one registry, shared by every middleware that records into it.

    prometheus_client refuses a second metric of the same name in a registry, so two apps in
    one process (or two middlewares) meet here instead. Label children are cached per
    (task, queue): ``labels()`` takes a lock and hashes every call, a dict lookup does not.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        labels = ("task", "queue")
        self.enqueued = Counter(
            "worq_jobs_enqueued",
            "Jobs sent by enqueue calls that succeeded, from this process.",
            labels,
            registry=registry,
        )
        self.enqueue_errors = Counter(
            "worq_enqueue_errors",
            "Jobs whose enqueue call raised (they may not exist).",
            labels,
            registry=registry,
        )
        self.settled = Counter(
            "worq_jobs_settled",
            "Settlements the broker applied, one per attempt: outcome is succeeded, retrying "
            "(failed, to run again), dead or cancelled.",
            (*labels, "outcome"),
            registry=registry,
        )
        self.run_time = Histogram(
            "worq_job_run_seconds",
            "Time a run spent in the task (and in the middlewares inside this one).",
            labels,
            registry=registry,
            buckets=BUCKETS,
        )
        self.queue_wait = Histogram(
            "worq_job_queue_wait_seconds",
            "Time from the enqueue call to the first run's start (first attempts only; "
            "includes a delay or eta the job was sent with).",
            labels,
            registry=registry,
            buckets=BUCKETS,
        )
        self.in_flight = Gauge(
            "worq_jobs_in_flight",
            "Runs in progress.",
            labels,
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.registry = registry
        self._runs: dict[tuple[str, str], tuple[Histogram, Histogram, Gauge]] = {}
        self._settled: dict[tuple[str, str, str], Counter] = {}
        self._enqueued: dict[tuple[str, str, bool], Counter] = {}
        self._lock = threading.Lock()
        self._broker: BrokerCollector | None = None
        self._broker_users = 0

    def for_run(self, task: str, queue: str) -> tuple[Histogram, Histogram, Gauge]:
        children = self._runs.get((task, queue))
        if children is None:  # a race builds the same children twice: labels() is idempotent
            children = (
                self.run_time.labels(task, queue),
                self.queue_wait.labels(task, queue),
                self.in_flight.labels(task, queue),
            )
            self._runs[task, queue] = children
        return children

    def for_enqueue(self, task: str, queue: str, failed: bool) -> Counter:
        child = self._enqueued.get((task, queue, failed))
        if child is None:
            counter = self.enqueue_errors if failed else self.enqueued
            child = self._enqueued[task, queue, failed] = counter.labels(task, queue)
        return child

    def for_settled(self, task: str, queue: str, outcome: str) -> Counter:
        child = self._settled.get((task, queue, outcome))
        if child is None:
            child = self._settled[task, queue, outcome] = self.settled.labels(task, queue, outcome)
        return child

    def attach(self, broker: Broker, cache_seconds: float) -> bool:
        """Read ``broker`` at this registry's scrapes; one broker per registry at a time."""
        with self._lock:
            if self._broker is None:
                self._broker = BrokerCollector(broker, cache_seconds=cache_seconds)
                self.registry.register(self._broker)
            elif self._broker.broker is not broker:
                log.warning(
                    "the prometheus registry already reads broker %r; %r is not read too",
                    self._broker.broker,
                    broker,
                )
                return False
            self._broker_users += 1
            return True

    def detach(self) -> None:
        with self._lock:
            self._broker_users -= 1
            if self._broker_users == 0 and self._broker is not None:
                self.registry.unregister(self._broker)
                self._broker = None


_shared: weakref.WeakKeyDictionary[CollectorRegistry, _Metrics] = weakref.WeakKeyDictionary()
_shared_lock = threading.Lock()


def _metrics_of(registry: CollectorRegistry) -> _Metrics:
    with _shared_lock:
        metrics = _shared.get(registry)
        if metrics is None:
            metrics = _shared[registry] = _Metrics(registry)
        return metrics


class PrometheusMiddleware(Middleware):
    """Records worq's job metrics into a prometheus_client registry.

    ``registry`` defaults to prometheus_client's global one, so a process that already serves
    it (a web app's ``/metrics``) shows worq's metrics with no more setup. With
    ``broker_metrics`` (the default) a worker of this app also reads queue depths and live
    workers from its broker at each scrape of that registry (cached ``cache_seconds``); turn
    it off where another process serves them, as each worker under ``--processes`` does.
    """

    name: ClassVar[str] = "prometheus"

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        broker_metrics: bool = True,
        cache_seconds: float = CACHE_SECONDS,
    ) -> None:
        require()
        if registry is None:
            from prometheus_client import REGISTRY

            registry = REGISTRY
        self.registry = registry
        self.broker_metrics = broker_metrics
        self.cache_seconds = cache_seconds
        self._metrics = _metrics_of(registry)
        self._attached: set[str] = set()  # ids of workers whose broker this reads

    def __repr__(self) -> str:
        return f"<PrometheusMiddleware broker_metrics={self.broker_metrics}>"

    def after_enqueue(
        self, requests: Sequence[EnqueueRequest], error: BaseException | None
    ) -> None:
        """Count the jobs sent (or not) by one enqueue call."""
        for_enqueue = self._metrics.for_enqueue
        failed = error is not None
        for request in requests:
            for_enqueue(request.task, request.queue, failed).inc()

    def wrap_run(self, job: JobContext, call: Callable[[], Any]) -> Any:
        """Time the run and count it in flight while it lasts."""
        run_time, queue_wait, in_flight = self._metrics.for_run(job.task, job.queue)
        if job.attempt == 1 and job.enqueued_at is not None:
            queue_wait.observe(max(0.0, time.time() - job.enqueued_at))  # clocks may differ
        in_flight.inc()
        began = time.perf_counter()
        try:
            return call()
        finally:
            run_time.observe(time.perf_counter() - began)
            in_flight.dec()

    async def wrap_run_async(self, job: JobContext, call: Callable[[], Awaitable[Any]]) -> Any:
        """:meth:`wrap_run` for ``async def`` tasks."""
        run_time, queue_wait, in_flight = self._metrics.for_run(job.task, job.queue)
        if job.attempt == 1 and job.enqueued_at is not None:
            queue_wait.observe(max(0.0, time.time() - job.enqueued_at))
        in_flight.inc()
        began = time.perf_counter()
        try:
            return await call()
        finally:
            run_time.observe(time.perf_counter() - began)
            in_flight.dec()

    def after_settle(self, job: JobContext, decision: Decision) -> None:
        """Count the settlement by its outcome."""
        self._metrics.for_settled(job.task, job.queue, decision.status.value).inc()

    def worker_start(self, worker: Worker) -> None:
        """Read the worker's broker at scrapes, unless turned off."""
        if self.broker_metrics and self._metrics.attach(worker.app.broker, self.cache_seconds):
            self._attached.add(worker.id)

    def worker_stop(self, worker: Worker) -> None:
        """Stop reading the broker once its last worker here stops."""
        if worker.id in self._attached:
            self._attached.discard(worker.id)
            self._metrics.detach()


class BrokerCollector:
    """Queue depths and live workers, read from a broker when Prometheus scrapes.

    Gauges, one sample each however many processes run workers: ``worq_queue_jobs`` by queue
    and state (ready, delayed, running, dead), ``worq_workers`` and ``worq_worker_slots``
    (their summed concurrency; brokers with a worker registry only), and ``worq_broker_up``,
    0 when the last reading failed (the other gauges are then left out rather than stale).
    A reading serves every scrape for ``cache_seconds``; scrapes that arrive while one is
    being taken wait for it instead of asking the broker again.
    """

    def __init__(
        self,
        broker: Broker,
        *,
        queues: Sequence[str] | None = None,
        cache_seconds: float = CACHE_SECONDS,
    ) -> None:
        require()
        self.broker = broker
        self.queues = None if queues is None else list(queues)
        self.cache_seconds = cache_seconds
        self._lock = threading.Lock()
        self._read_at = -float("inf")
        self._families: list[Metric] = []

    def describe(self) -> list[Metric]:
        """The metric names, without reading the broker (the registry asks at register)."""
        return self._families_of(None, None, up=False)

    def collect(self) -> Iterable[Metric]:
        """The latest reading, taken now if the cached one is older than ``cache_seconds``."""
        with self._lock:
            now = time.monotonic()
            if now - self._read_at >= self.cache_seconds:
                self._families = self._read()
                self._read_at = time.monotonic()
            return list(self._families)

    def _read(self) -> list[Metric]:
        broker = self.broker
        try:
            stats = broker.stats(self.queues)
            workers = (
                broker.workers() if Capability.WORKER_REGISTRY in broker.capabilities else None
            )
        except Exception as exc:  # noqa: BLE001 - a scrape must answer even when the broker does not
            log.warning("metrics: cannot read the broker %s: %s", broker.name, exc)
            return self._families_of(None, None, up=False)
        depths = [
            (s.queue, state, getattr(s, state))
            for s in stats
            for state in ("ready", "delayed", "running", "dead")
        ]
        totals = None if workers is None else (len(workers), sum(w.concurrency for w in workers))
        return self._families_of(depths, totals, up=True)

    @staticmethod
    def _families_of(
        depths: list[tuple[str, str, int]] | None, workers: tuple[int, int] | None, *, up: bool
    ) -> list[Metric]:
        from prometheus_client.core import GaugeMetricFamily

        queue_jobs = GaugeMetricFamily(
            "worq_queue_jobs", "Jobs in the broker by queue and state.", labels=("queue", "state")
        )
        for queue, state, count in depths or ():
            queue_jobs.add_metric((queue, state), count)
        live = GaugeMetricFamily("worq_workers", "Live workers registered with the broker.")
        slots = GaugeMetricFamily("worq_worker_slots", "Summed concurrency of the live workers.")
        if workers is not None:
            live.add_metric((), workers[0])
            slots.add_metric((), workers[1])
        broker_up = GaugeMetricFamily("worq_broker_up", "1 if the last broker reading worked.")
        broker_up.add_metric((), 1.0 if up else 0.0)
        return [queue_jobs, live, slots, broker_up]


# -- serving -----------------------------------------------------------------------------------


class MetricsServer:
    """prometheus_client's threaded HTTP server for one registry, on ``host:port``.

    ``port`` 0 picks a free port (see :attr:`port`). Raises ``OSError`` when it cannot bind.
    """

    def __init__(self, registry: Any, host: str = "127.0.0.1", port: int = 0) -> None:
        require()
        from prometheus_client import start_http_server

        self._server: WSGIServer
        self._server, self._thread = start_http_server(port, host, registry)
        self.host = host
        self.port: int = self._server.server_port

    @property
    def url(self) -> str:
        """Where the metrics are."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        """Stop serving and release the port."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


class MultiprocessExporter:
    """Metrics of every worker process a supervisor runs, served by the supervisor.

    It makes a fresh directory for prometheus_client's multiprocess mode and gives it to the
    children (:meth:`child_env`); each child's middleware writes its samples there (counters
    and histograms kept after the child exits, so totals survive restarts; a dead child's
    in-flight gauge is dropped by :meth:`process_exited`). The supervisor serves their sum,
    plus one :class:`BrokerCollector` reading of the broker, on ``host:port``. :meth:`close`
    stops the server and deletes the directory.
    """

    def __init__(
        self,
        broker: Broker,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        cache_seconds: float = CACHE_SECONDS,
    ) -> None:
        require()
        from prometheus_client import CollectorRegistry
        from prometheus_client.multiprocess import MultiProcessCollector

        self.directory = tempfile.mkdtemp(prefix="worq-prometheus-")
        try:
            self.registry = CollectorRegistry()
            MultiProcessCollector(self.registry, path=self.directory)  # type: ignore[no-untyped-call]
            self.registry.register(BrokerCollector(broker, cache_seconds=cache_seconds))
            self.server = MetricsServer(self.registry, host, port)
        except BaseException:
            shutil.rmtree(self.directory, ignore_errors=True)
            raise

    def child_env(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """The environment of a child: ``base`` (default ``os.environ``) and the directory."""
        return {
            **(os.environ if base is None else base),
            "PROMETHEUS_MULTIPROC_DIR": self.directory,
        }

    def process_exited(self, pid: int) -> None:
        """Forget a dead child's live gauges (its jobs are no longer in flight)."""
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid, self.directory)  # type: ignore[no-untyped-call]

    def close(self) -> None:
        """Stop serving and delete the directory."""
        try:
            self.server.close()
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)


def enable(app: Worq, *, broker_metrics: bool = True) -> PrometheusMiddleware:
    """The app's :class:`PrometheusMiddleware`, added (outermost) if it has none.

    An existing one keeps its registry; ``broker_metrics`` is set on it either way.
    """
    for middleware in app.middleware.middlewares:
        if isinstance(middleware, PrometheusMiddleware):
            middleware.broker_metrics = broker_metrics
            return middleware
    middleware = PrometheusMiddleware(broker_metrics=broker_metrics)
    app.add_middleware(middleware, outermost=True)
    return middleware


@hookimpl
def worq_register_middleware() -> Iterable[type[Middleware]]:
    """worq-core's built-in ``"prometheus"`` middleware (needs the prometheus extra to build)."""
    return [PrometheusMiddleware]
