"""Job control in one process: headers from a middleware, progress, cancel, Retry and Reject.

    python examples/control/app.py

It uses the in-memory broker (``pip install worq-core worq-memory``), which can cancel jobs and
keeps their progress, as the Redis broker does. A worker runs on a background thread, as a
separate worker process would, and the main thread plays the producer and the observer.
"""

from __future__ import annotations

import contextvars
import threading
import time
from collections.abc import Callable
from typing import Any

from worq_core import (
    EnqueueRequest,
    JobCancelled,
    JobContext,
    JobFailed,
    Middleware,
    Reject,
    Retry,
    Worq,
    current_job,
)

#: The request the producer is serving; the middleware copies it into every job it enqueues.
request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="none")


class RequestIds(Middleware):
    """Sends the current request id along with each job, and restores it while the job runs."""

    def before_enqueue(self, request: EnqueueRequest) -> None:
        request.headers.setdefault("request-id", request_id.get())

    def wrap_run(self, job: JobContext, call: Callable[[], Any]) -> Any:
        token = request_id.set(job.headers.get("request-id", "none"))
        try:
            return call()
        finally:
            request_id.reset(token)


app = Worq(middleware=[RequestIds()])  # memory:// by default


@app.task
def greet(name: str) -> str:
    headers = current_job().headers
    return f"hello {name} (request {request_id.get()}, tenant {headers.get('tenant')})"


@app.task
def resize(image: str) -> str:
    return f"resized {image}"


@app.task
def import_rows(rows: int) -> int:
    job = current_job()
    for done in range(rows):
        if job.cancelled:
            return done  # discarded: once the cancellation reached the run, the job is cancelled
        job.progress(done, "importing", total=rows)
        time.sleep(0.01)
    return rows


@app.task(max_retries=3)
def poll_export(export_id: str) -> str:
    attempt = current_job().attempt
    if attempt < 2:
        raise Retry(delay=0.05, reason="the export is not ready yet")
    return f"{export_id} ready on attempt {attempt}"


@app.task(max_retries=3)
def parse(text: str) -> int:
    if not text.isdigit():
        raise Reject(f"not a number: {text!r}")
    return int(text)


def main() -> None:
    request_id.set("req-42")  # say, the web request that enqueues these jobs
    hello = greet.options(headers={"tenant": "acme"}).enqueue("ada")
    waiting = resize.enqueue("cat.png")
    retried = poll_export.enqueue("export-7")
    rejected = parse.enqueue("seven")

    # Cancel a job that is still queued: it is removed at once and never runs.
    print("cancel queued job:", waiting.cancel(), waiting.status())
    try:
        waiting.result(timeout=1)
    except JobCancelled:
        print("queued job result: JobCancelled")
    print("cancel it again:", waiting.cancel())

    worker = app.worker(concurrency=4)
    thread = threading.Thread(target=worker.run, name="worker")
    thread.start()
    try:
        print("headers:", hello.result(timeout=5))
        print("retry:", retried.result(timeout=5))
        try:
            rejected.result(timeout=5)
        except JobFailed as failure:
            print("reject:", failure.error_type, "-", failure.message)

        # A running job reports progress; cancel it, and it stops at its next check.
        running = import_rows.enqueue(100_000)
        while (progress := running.progress()) is None:
            time.sleep(0.05)
        print(f"progress: {progress.current:g} of {progress.total:g} rows ({progress.message})")
        print("cancel running job:", running.cancel(), running.status())
        try:
            running.result(timeout=10)
        except JobCancelled:
            print("running job result: JobCancelled", running.status(), running.progress())
    finally:
        worker.stop()
        thread.join()
    counters = worker.counters
    print(f"worker: succeeded={counters.succeeded} retried={counters.retried}", end=" ")
    print(f"dead={counters.dead} cancelled={counters.cancelled}")


if __name__ == "__main__":
    main()
