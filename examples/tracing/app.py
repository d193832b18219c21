"""Tracing jobs with OpenTelemetry: one trace from the request that enqueued to every run.

    pip install 'worq-core[otel]' opentelemetry-sdk worq-memory
    python examples/tracing/app.py

The spans go to an in-memory exporter so the example can print the trace as a tree; a real
app hands them to a BatchSpanProcessor with an exporter (OTLP, Jaeger, the console).
"""

from __future__ import annotations

from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from worq_core import RetryPolicy, Worq, current_job

exporter = InMemorySpanExporter()
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(exporter))
trace.set_tracer_provider(provider)  # the producer and every worker process do this

app = Worq(middleware=["otel"])  # the built-in OpenTelemetry middleware, on the global provider
tracer = trace.get_tracer("shop")


@app.task(name="place_order")
def place_order(order: str) -> None:
    charge.enqueue(order)  # sent inside this run's span: the trace goes on


@app.task(name="charge", max_retries=1, retry=RetryPolicy(base=0.01))
def charge(order: str) -> str:
    if current_job().attempt == 1:
        raise ConnectionError("payment gateway timed out")
    with tracer.start_as_current_span("call payment gateway"):  # nests in the run's span
        return f"charged {order}"


with tracer.start_as_current_span("POST /orders"):  # say, the web request
    place_order.enqueue("o-1")
app.worker().run(burst=True)


def show(span: ReadableSpan, children: dict[int, list[ReadableSpan]], depth: int = 0) -> None:
    attributes = span.attributes or {}
    details = [span.kind.name]
    if "worq.task.name" in attributes:
        details.append(str(attributes["worq.task.name"]))
    if "worq.job.attempt" in attributes:
        details.append(f"attempt {attributes['worq.job.attempt']}")
    if "worq.job.outcome" in attributes:
        details.append(str(attributes["worq.job.outcome"]))
    print(f"{'  ' * depth}{span.name} ({', '.join(details)})")
    for child in children.get(span.context.span_id, []):
        show(child, children, depth + 1)


spans = sorted(exporter.get_finished_spans(), key=lambda s: s.start_time or 0)
children: dict[int, list[ReadableSpan]] = {}
for span in spans:
    if span.parent is not None:
        children.setdefault(span.parent.span_id, []).append(span)
print(f"{len({s.context.trace_id for s in spans})} trace, {len(spans)} spans")
for root in (s for s in spans if s.parent is None):
    show(root, children)
