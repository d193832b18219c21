"""A small worq app for the CLI tests; nothing touches its broker at import time."""

from __future__ import annotations

from worq_core import Worq

app = Worq()


@app.task(name="add")
def add(x: int, y: int) -> int:
    return x + y


@app.task(name="greet")
def greet(name: str, punctuation: str = "!") -> str:
    return f"hello {name}{punctuation}"


@app.task(name="boom", max_retries=0)
def boom() -> None:
    raise RuntimeError("kaboom")


@app.task(name="boom_after", max_retries=0)
def boom_after(previous: int) -> None:
    raise RuntimeError(f"kaboom after {previous}")


@app.task(name="total")
def total(results: list[int]) -> int:
    return sum(results)


@app.task(name="ping", queue="other")
def ping() -> str:
    return "pong"


not_an_app = 42
