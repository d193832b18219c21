"""What OpenTelemetry tracing costs per job: enqueue and drain no-op jobs on the memory broker.

    python bench/tracing_bench.py            # 10,000 jobs, 5 rounds
    python bench/tracing_bench.py --quick

Each round runs every variant in a fresh subprocess, interleaved, so the machine's drift hits
them alike; figures are medians. A variant enqueues N no-op jobs one ``enqueue`` call each,
then times a burst worker draining them, at concurrency 1 and 8, on the memory broker (no
network, so the figures are the tracing's own cost at its most visible). Ratios are to
``none`` of the same run (throughput over none's: 1.00 means free):

* ``none``: no middleware;
* ``otel, SDK``: the otel middleware with the OpenTelemetry SDK, every span sampled and handed
  to a ``BatchSpanProcessor`` whose exporter drops them (the SDK's cost without any I/O);
* ``otel, unsampled``: the SDK with the ``ALWAYS_OFF`` sampler (tracing set up, sampled out);
* ``otel, API only``: the middleware over the API's no-op tracer provider (no SDK installed or
  configured).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

VARIANTS = ("none", "otel, SDK", "otel, unsampled", "otel, API only")


def measure(concurrency: int, variant: str, jobs: int) -> dict[str, float]:
    """Run in a subprocess: enqueue ``jobs`` no-op jobs, drain them; seconds for each step."""
    from worq_core import WorkerSettings, Worq

    middleware: list[Any] = []
    exported = [0]
    provider: Any = None
    if variant != "none":
        from opentelemetry import trace

        from worq_core.contrib.otel import OpenTelemetryMiddleware

        if variant == "otel, API only":
            provider = trace.NoOpTracerProvider()
        else:
            from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
            from opentelemetry.sdk.trace.export import (
                BatchSpanProcessor,
                SpanExporter,
                SpanExportResult,
            )
            from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON

            class Dropping(SpanExporter):
                def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
                    exported[0] += len(spans)
                    return SpanExportResult.SUCCESS

            sampler = ALWAYS_OFF if variant == "otel, unsampled" else ALWAYS_ON
            provider = TracerProvider(sampler=sampler)
            # A queue that holds every span of the run, so none is dropped uncounted.
            provider.add_span_processor(
                BatchSpanProcessor(Dropping(), max_queue_size=4 * jobs + 1000)
            )
        middleware = [OpenTelemetryMiddleware(provider)]
    app = Worq("memory://", middleware=middleware)

    @app.task(name="noop", queue="bench")
    def noop() -> None:
        return None

    begin = time.perf_counter()
    for _ in range(jobs):
        noop.enqueue()
    enqueued = time.perf_counter() - begin
    settings = WorkerSettings(
        queues=("bench",), concurrency=concurrency, idle_wait=0.01, handle_signals=False
    )
    worker = app.worker(settings=settings)
    begin = time.perf_counter()
    worker.run(burst=True)
    drained = time.perf_counter() - begin
    assert worker.counters.succeeded == jobs, worker.counters
    if provider is not None and hasattr(provider, "shutdown"):
        provider.shutdown()  # flushes: every sampled span reaches the exporter
        if variant == "otel, SDK":
            assert exported[0] == 2 * jobs, f"{exported[0]} spans exported for {jobs} jobs"
    return {"enqueue": enqueued, "drain": drained}


def run_variant(concurrency: int, variant: str, jobs: int) -> Any:
    out = subprocess.run(
        [sys.executable, __file__, "--measure", str(concurrency), variant, str(jobs)],
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
    parser.add_argument("--measure", nargs=3, metavar=("CONC", "VARIANT", "JOBS"))
    args = parser.parse_args()
    if args.measure:
        concurrency, variant, jobs = args.measure
        print(json.dumps(measure(int(concurrency), variant, int(jobs))))
        return 0
    jobs = args.jobs or (3000 if args.quick else 10000)
    rounds = args.rounds or (3 if args.quick else 5)
    print(f"{jobs} no-op jobs on the memory broker, median of {rounds} rounds, interleaved")
    print(
        f"{'conc':>4} {'variant':16} {'enqueue us/job':>14} {'ratio':>6}  "
        f"{'drain us/job':>12} {'ratio':>6}  {'added us/job':>12}"
    )
    for concurrency in (1, 8):
        samples: dict[str, list[dict[str, float]]] = {v: [] for v in VARIANTS}
        for _ in range(rounds):
            for variant in VARIANTS:
                samples[variant].append(run_variant(concurrency, variant, jobs))
        enq = {v: statistics.median(s["enqueue"] for s in samples[v]) for v in VARIANTS}
        drain = {v: statistics.median(s["drain"] for s in samples[v]) for v in VARIANTS}
        for variant in VARIANTS:
            added = (enq[variant] + drain[variant] - enq["none"] - drain["none"]) / jobs * 1e6
            print(
                f"{concurrency:>4} {variant:16} {enq[variant] / jobs * 1e6:>14.1f} "
                f"{enq['none'] / enq[variant]:>6.2f}  {drain[variant] / jobs * 1e6:>12.1f} "
                f"{drain['none'] / drain[variant]:>6.2f}  {added:>12.1f}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
