"""Chains, groups and chords on the in-memory broker, in one process.

    python examples/workflows/app.py

The same code runs on Redis (``Worq("redis://...")``) with ``worq worker`` processes: every
link between steps is made by the broker in the step that settles a job, so a worker killed
at any moment neither loses the next step nor runs a chord's callback twice.
"""

from __future__ import annotations

from worq_core import WorkerSettings, Worq, chain, chord, group

app = Worq()


@app.task
def fetch(url: str) -> str:
    return f"<html>{url}</html>"


@app.task
def parse(html: str) -> int:
    return len(html)


@app.task
def store(size: int) -> str:
    return f"stored {size} bytes"


@app.task
def square(x: int) -> int:
    return x * x


@app.task
def summarize(values: list[int], label: str) -> str:
    return f"{label}: {sum(values)}"


def main() -> None:
    pipeline = chain(fetch.s("example.org"), parse.s(), store.s()).enqueue()
    squares = group(square.s(i) for i in range(5)).enqueue()
    report = chord((square.s(i) for i in range(10)), summarize.s(label="sum of squares")).enqueue()

    settings = WorkerSettings(concurrency=4, handle_signals=False)
    app.worker(settings=settings).run(burst=True)  # runs every step, including those sent later

    print("chain:", pipeline.result(timeout=5))
    print("group:", squares.result(timeout=5))
    print("chord:", report.result(timeout=5))
    print("chord status:", report.status().status.value)


if __name__ == "__main__":
    main()
