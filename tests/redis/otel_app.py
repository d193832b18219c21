"""The app the OpenTelemetry process test runs with ``worq worker otel_app:app``.

WORQ_RUNTIME_URL is the broker URL with its ``?prefix=``. Every process that imports it (the
test as producer, each worker) exports its finished spans as JSON lines to a file of its own,
``<pid>.jsonl`` in the directory WORQ_OTEL_SPANS names.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Sequence
from pathlib import Path

from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

from worq_core import RetryPolicy, Worq, current_job
from worq_core.contrib.otel import OpenTelemetryMiddleware

URL = os.environ["WORQ_RUNTIME_URL"]
SPANS = Path(os.environ["WORQ_OTEL_SPANS"])


class JsonLinesExporter(SpanExporter):
    """One JSON object per finished span, appended to this process's file."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        lines = []
        for span in spans:
            context = span.get_span_context()
            assert context is not None
            lines.append(
                json.dumps(
                    {
                        "pid": os.getpid(),
                        "name": span.name,
                        "kind": span.kind.name,
                        "trace_id": f"{context.trace_id:032x}",
                        "span_id": f"{context.span_id:016x}",
                        "parent_id": f"{span.parent.span_id:016x}" if span.parent else None,
                        "attributes": dict(span.attributes or {}),
                        "events": [event.name for event in span.events],
                    }
                )
            )
        with self.lock, open(self.directory / f"{os.getpid()}.jsonl", "a") as out:
            out.write("".join(line + "\n" for line in lines))
        return SpanExportResult.SUCCESS


provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(JsonLinesExporter(SPANS)))
app = Worq(URL, middleware=[OpenTelemetryMiddleware(provider)])


@app.task(name="greet", queue="otel")
def greet(name: str) -> str:
    return f"hello {name}"


@app.task(name="flaky", queue="otel", max_retries=2, retry=RetryPolicy(base=0.05))
def flaky() -> int:
    attempt = current_job().attempt
    if attempt == 1:
        raise ConnectionError("the first attempt fails")
    return attempt


@app.task(name="fan_out", queue="otel")
def fan_out(count: int) -> list[str]:
    return [greet.enqueue(f"child {n}").id for n in range(count)]
