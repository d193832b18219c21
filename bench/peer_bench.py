"""worq against huey and dramatiq on the local Redis, in one run, as ratios to raw floors.

    nox -s bench-peers                      # full: 10,000-job drains, best of 3; about 6 minutes
    nox -s bench-peers -- --quick           # 3,000-job drains, once each; under 2 minutes
    nox -s bench-peers -- --json out.json   # also write the figures as JSON
    python bench/peer_bench.py --db 11      # in a venv with huey, dramatiq, starlette, uvicorn

Every job, whichever library runs it, has the same body (``bench/peers``): one Redis INCR on a
client of its own. Each library's jobs run in its real worker CLI: ``worq worker``,
``huey_consumer`` (worker threads) and ``dramatiq`` (one process, worker threads), each
with its defaults but for logging (warnings only: huey logs two lines per job at INFO). Rates
are the best of ``--rounds`` runs (contention only ever slows a run; every run is in the
notes and the JSON). The figures:

1. drain at concurrency 1: N jobs queued before the worker starts, timed from the first job
   starting to the N-th finishing (the jobs stamp both; never from a process's start); and
   worq on no-op jobs (``redis_bench.drain_processes``: worq's own figure);
2. drain at concurrency 8 (threads), and worq ``--processes 2`` against one process, beside
   the same Redis work without a library, 8 threads in one process and in two
   (``peers/raw_drain.py``): how far two processes can scale on the machine at all;
3. start-up: from spawning the worker command to the body of the one waiting job running
   (median of several, the libraries in turn); its floor is an interpreter that imports
   redis-py and runs the body;
4. enqueue one by one, each library and a raw LPUSH taking turns 500 jobs at a time; and
   worq's ``enqueue_many`` against a pipelined LPUSH of payloads the size of worq's (id and
   body), taking turns 1,000 jobs at a time;
5. an ASGI producer: Starlette on uvicorn (one process) under ``wrk -c 32 -t 2``, one route
   awaiting ``enqueue_async`` and one awaiting a raw ``redis.asyncio`` LPUSH, in turn (without
   wrk, or with ``--load asyncio``, a small asyncio load generator with 32 connections does
   it, and the table says so);
6. the raw redis-py floors: RPOP and LPUSH one round trip each, LPUSH pipelined by 1,000,
   measured before each round of drains and at the end (the drains' ratios use the best).

Each figure is given as a ratio to its floor and, where issue 13 sets a target, to the peer it
names. Everything lives under a fresh prefix (huey's keys under ``huey.*.<its name>``), deleted
at the end; no database is flushed. Worker processes run in sessions of their own and are
stopped by pid, whatever happens.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import importlib.metadata
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import redis

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

from redis_bench import delete_prefix, drain_processes, pipelined_lpush, raw_floor  # noqa: E402

SECTIONS = ("drain1", "drain8", "startup", "enqueue", "asgi")
# The measures worq is compared with its peers on (rows are found by system and measure).
DRAIN1 = "drain, concurrency 1"
DRAIN8 = "drain, concurrency 8"
DRAIN8_P2 = "drain, --processes 2, concurrency 8"
RAW_P1 = "RPOP and the body, 8 threads, one process"
RAW_P2 = "RPOP and the body, 8 threads, two processes"
STARTUP = "start-up to the first job (median)"
STARTUP_FLOOR = "interpreter + redis-py + the body (median)"
ENQUEUE = "enqueue one by one"
ENQUEUE_MANY = "enqueue_many, 1,000 per call"
ASGI_RAW = "handler awaits one redis.asyncio LPUSH"
ASGI_WORQ = "handler awaits task.enqueue_async"


@dataclass
class Row:
    section: str
    system: str  # worq, huey, dramatiq or raw
    name: str
    value: float
    unit: str  # jobs/s, req/s, or s (lower is better)
    floor: str = ""  # the raw figure it is divided by
    ratio: float | None = None  # value / floor value
    versus: str = ""  # against a peer or another row, with issue 13's target where it sets one
    note: str = ""


@dataclass
class Settings:
    url: str
    prefix: str
    drain_jobs: int
    rounds: int  # of every drain; the best counts
    floor_jobs: int
    enqueue_jobs: int
    bulk_jobs: int
    startups: int
    wrk_seconds: int
    asgi_rounds: int
    use_wrk: bool  # else the asyncio load generator
    logs: Path


# -- processes ---------------------------------------------------------------------------------


def script(name: str) -> str:
    """The console script ``name`` of this interpreter's environment."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        raise SystemExit(f"{name} is not installed: run through `nox -s bench-peers`")
    return found


def child_env(settings: Settings, **extra: str) -> dict[str, str]:
    env = dict(
        os.environ,
        PEER_BENCH_URL=settings.url,
        PEER_BENCH_PREFIX=settings.prefix,
        WORQ_BENCH_URL=settings.url,  # bench_app, for the no-op drain
        WORQ_BENCH_PREFIX=settings.prefix,
        **extra,
    )
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(BENCH_DIR), env.get("PYTHONPATH")]))
    return env


@contextlib.contextmanager
def running(
    settings: Settings, label: str, command: list[str], **env: str
) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``command`` in a session of its own, its output in a log; always stop it, by pid."""
    log_path = settings.logs / f"{label}.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            command,
            env=child_env(settings, **env),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield proc
    finally:
        stop(proc)


def stop(proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    """SIGTERM to ``proc``'s pid and reap it; then SIGKILL whatever is left of its session.

    The session's id is the child's pid, so the group signal reaches only the processes this
    run started (a supervisor's or dramatiq's worker processes).
    """
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)  # raises if no process of the group is left
        time.sleep(1.0)
        os.killpg(proc.pid, signal.SIGKILL)


def log_tail(settings: Settings, label: str) -> str:
    text = (settings.logs / f"{label}.log").read_text(errors="replace")
    return text[-3000:]


# -- the jobs' stamps --------------------------------------------------------------------------


def wait_stamps(
    settings: Settings,
    client: redis.Redis,
    key: str,
    total: int,
    proc: subprocess.Popen[bytes],
    label: str,
    timeout: float,
) -> tuple[float, float]:
    """Wait until ``total`` jobs counted on ``key``: (first started, last finished), wall clock."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        exited = proc.poll() is not None  # read before the stamps: a floor exits once done
        first, last = client.mget(f"{key}:first", f"{key}:last")
        if first is not None and last is not None:
            return float(first), float(last)
        if exited:
            raise RuntimeError(f"{label} exited {proc.returncode}:\n{log_tail(settings, label)}")
        time.sleep(0.005)
    done = client.get(key)
    raise RuntimeError(
        f"{label}: {done!r} of {total} jobs within {timeout:.0f}s:\n{log_tail(settings, label)}"
    )


def check_count(client: redis.Redis, key: str, total: int, label: str) -> None:
    """Each job ran once: a job run twice or lost is a bug in the bench, not a figure."""
    done = int(client.get(key) or 0)
    if done != total:
        raise RuntimeError(f"{label}: the jobs counted {done}, expected {total}")


# -- the libraries -----------------------------------------------------------------------------


class Library:
    """How the bench sends one library's job and starts its worker."""

    name: str

    def enqueue(self, key: str, total: int) -> None:
        raise NotImplementedError

    def enqueue_bulk(self, key: str, total: int) -> None:
        """Queue ``total`` jobs as fast as the library allows (untimed: a drain's set-up)."""
        for _ in range(total):
            self.enqueue(key, total)

    def worker(self, concurrency: int, processes: int = 1) -> list[str]:
        raise NotImplementedError


class WorqLibrary(Library):
    name = "worq"

    def __init__(self) -> None:
        from peers import worq_app

        self.app = worq_app.app
        self.task = worq_app.count
        self.stash = worq_app.stash

    def enqueue(self, key: str, total: int) -> None:
        self.task.enqueue(key, total)

    def enqueue_bulk(self, key: str, total: int) -> None:
        for start in range(0, total, 1000):
            self.task.enqueue_many([(key, total)] * min(1000, total - start))

    def worker(self, concurrency: int, processes: int = 1) -> list[str]:
        return [
            script("worq"),
            "worker",
            "peers.worq_app:app",
            "-Q",
            "peers",
            "-c",
            str(concurrency),
            "-p",
            str(processes),
            "--log-level",
            "warning",
        ]


class HueyLibrary(Library):
    name = "huey"

    def __init__(self) -> None:
        from peers import huey_app

        self.task = huey_app.count

    def enqueue(self, key: str, total: int) -> None:
        self.task(key, total)

    def worker(self, concurrency: int, processes: int = 1) -> list[str]:
        assert processes == 1
        return [script("huey_consumer"), "peers.huey_app.huey", "-w", str(concurrency), "-q"]


class DramatiqLibrary(Library):
    name = "dramatiq"

    def __init__(self) -> None:
        from peers import dramatiq_app

        self.actor = dramatiq_app.count

    def enqueue(self, key: str, total: int) -> None:
        self.actor.send(key, total)

    def worker(self, concurrency: int, processes: int = 1) -> list[str]:
        return [
            script("dramatiq"),
            "peers.dramatiq_app:broker",
            "--processes",
            str(processes),
            "--threads",
            str(concurrency),
        ]


def drain(
    settings: Settings,
    client: redis.Redis,
    library: Library,
    concurrency: int,
    processes: int,
    attempt: int,
) -> float:
    """Queue N jobs, start the worker, and time the jobs themselves: jobs/s."""
    n = settings.drain_jobs
    label = f"{library.name}-c{concurrency}-p{processes}"
    key = f"{settings.prefix}:count:{label}:{attempt}"
    library.enqueue(f"{key}:warm", 0)  # the worker's first job warms it, outside the window
    library.enqueue_bulk(key, n)
    return timed_drain(settings, client, label, key, library.worker(concurrency, processes))


def timed_drain(
    settings: Settings, client: redis.Redis, label: str, key: str, command: list[str]
) -> float:
    """Run ``command`` until its jobs counted ``drain_jobs`` on ``key``: their jobs/s."""
    n = settings.drain_jobs
    with running(settings, label, command) as proc:
        first, last = wait_stamps(settings, client, key, n, proc, label, timeout=60 + n / 100)
    check_count(client, key, n, label)
    return n / (last - first)


def raw_drain(
    settings: Settings, client: redis.Redis, processes: int, threads: int, attempt: int
) -> float:
    """The raw loop of ``peers.raw_drain`` in ``processes`` of ``threads`` threads: jobs/s."""
    n = settings.drain_jobs
    label = f"raw-p{processes}"
    key = f"{settings.prefix}:count:{label}:{attempt}"
    items = f"{key}:items"
    pipelined_lpush(client, items, b"x" * 100, n)
    command = [sys.executable, "-m", "peers.raw_drain", items, key]
    command += [str(n), str(processes), str(threads)]
    return timed_drain(settings, client, label, key, command)


@dataclass
class DrainCase:
    section: str
    name: str
    library: Library | None  # None: worq's no-op drain, redis_bench's; or the raw loop
    concurrency: int = 1
    processes: int = 1
    raw: bool = False


def drain_rows(
    settings: Settings,
    client: redis.Redis,
    libraries: dict[str, Library],
    sections: set[str],
    floor_runs: list[dict[str, float]],
) -> list[Row]:
    """Every drain once per round, a raw floor before each round; the best round counts."""
    cases = []
    if "drain1" in sections:
        cases += [DrainCase("drain1", DRAIN1, library) for library in libraries.values()]
        cases.append(DrainCase("drain1", "drain no-op jobs, concurrency 1", None))
    if "drain8" in sections:
        cases += [DrainCase("drain8", DRAIN8, library, 8) for library in libraries.values()]
        cases.append(DrainCase("drain8", DRAIN8_P2, libraries["worq"], 8, 2))
        cases.append(DrainCase("drain8", RAW_P1, None, 8, 1, raw=True))
        cases.append(DrainCase("drain8", RAW_P2, None, 8, 2, raw=True))
    rates: list[list[float]] = [[] for _ in cases]
    n = settings.drain_jobs
    for attempt in range(settings.rounds):
        floor_runs.append(floors(client, settings))
        for case, values in zip(cases, rates, strict=True):
            if case.raw:
                values.append(
                    raw_drain(settings, client, case.processes, case.concurrency, attempt)
                )
            elif case.library is None:
                values.append(n / drain_processes(settings.url, settings.prefix, n, 1, 1))
            else:
                values.append(
                    drain(settings, client, case.library, case.concurrency, case.processes, attempt)
                )
    rows = []
    for case, values in zip(cases, rates, strict=True):
        note = runs(values)
        if case.raw:
            note += "; redis-py alone (peers/raw_drain.py): how far two processes can scale here"
        elif case.library is None:
            note += "; bench_app's noop, timed by polling the queue; issue 13: >= 10k jobs/s"
        system = "raw" if case.raw else case.library.name if case.library else "worq"
        rows.append(Row(case.section, system, case.name, max(values), "jobs/s", "rpop", note=note))
    return rows


def startup(
    settings: Settings, client: redis.Redis, library: Library | None, attempt: int
) -> float:
    """Seconds from spawning the worker to the one waiting job's body starting.

    ``None`` is the floor: an interpreter that imports redis-py and runs the body itself.
    """
    name = library.name if library else "raw"
    label = f"startup-{name}"
    key = f"{settings.prefix}:startup:{name}:{attempt}"
    if library is None:
        code = f"from peers import count; count({key!r}, 1)"
        command = [sys.executable, "-c", code]
    else:
        library.enqueue(key, 1)
        command = library.worker(1)
    spawned = time.time()
    with running(settings, label, command) as proc:
        first, _ = wait_stamps(settings, client, key, 1, proc, label, timeout=60)
    return first - spawned


def startup_rows(
    settings: Settings, client: redis.Redis, libraries: dict[str, Library]
) -> list[Row]:
    """Each worker started ``startups`` times, the libraries in turn; the median counts."""
    samples: dict[str, list[float]] = {"raw": [], **{name: [] for name in libraries}}
    for attempt in range(settings.startups):
        for name, values in samples.items():
            values.append(startup(settings, client, libraries.get(name), attempt))
    rows = []
    for name, values in samples.items():
        note = "runs: " + ", ".join(f"{v:.2f}" for v in values)
        if name == "raw":
            rows.append(
                Row("startup", name, STARTUP_FLOOR, statistics.median(values), "s", note=note)
            )
        else:
            rows.append(
                Row(
                    "startup",
                    name,
                    STARTUP,
                    statistics.median(values),
                    "s",
                    "raw start-up",
                    note=note,
                )
            )
    return rows


# -- enqueue -----------------------------------------------------------------------------------


def enqueue_rows(
    settings: Settings, client: redis.Redis, libraries: dict[str, Library]
) -> list[Row]:
    """One by one, 500 jobs at a time from each library and a raw LPUSH in turn, so the
    machine's other load falls on all of them alike.

    The jobs stay queued (no worker runs after this section); the run's clean-up deletes them.
    """
    n, chunk = settings.enqueue_jobs, 500
    key = f"{settings.prefix}:count:parked"
    raw_key = f"{settings.prefix}:raw:one"
    payload = b"x" * 100
    senders: dict[str, Callable[[], object]] = {"raw": lambda: client.lpush(raw_key, payload)}
    for name, library in libraries.items():
        library.enqueue(key, 0)  # connections and scripts warmed up
        senders[name] = functools.partial(library.enqueue, key, 0)
    spent = dict.fromkeys(senders, 0.0)
    for start in range(0, n, chunk):
        for name, send in senders.items():
            begin = time.perf_counter()
            for _ in range(min(chunk, n - start)):
                send()
            spent[name] += time.perf_counter() - begin
    client.delete(raw_key)
    raw = n / spent["raw"]
    note = f"{n:,} each, in turns of {chunk}"
    rows = [Row("enqueue", "raw", "LPUSH of 100 B, one round trip each, in turn", raw, "jobs/s")]
    for name in libraries:
        rate = n / spent[name]
        rows.append(
            Row("enqueue", name, ENQUEUE, rate, "jobs/s", "LPUSH in turn", rate / raw, note=note)
        )
    return rows


def stash_payload(worq: WorqLibrary) -> int:
    """Bytes a stash job puts on the wire (id and body), as worq encodes it; warms up too."""
    from peers import STASH_KEY

    from worq_core import JobStatus

    worq.stash.enqueue_many([(STASH_KEY, 1)] * 100)
    sample = worq.app.broker.list_jobs("stash", JobStatus.QUEUED, 0, 100)
    return round(statistics.mean(len(job.id) + len(job.body) for job in sample))


def enqueue_many_rows(settings: Settings, client: redis.Redis, worq: WorqLibrary) -> list[Row]:
    """worq's ``enqueue_many`` (1,000 per call) and a pipeline of 1,000 LPUSHes of payloads as
    large, in turn."""
    from peers import STASH_KEY

    n = settings.bulk_jobs
    size = stash_payload(worq)
    payload = b"x" * size
    raw_key = f"{settings.prefix}:raw:bulk"
    worq_spent = raw_spent = 0.0
    for start in range(0, n, 1000):
        calls = [(STASH_KEY, 1)] * min(1000, n - start)
        begin = time.perf_counter()
        worq.stash.enqueue_many(calls)
        worq_spent += time.perf_counter() - begin
        raw_spent += pipelined_lpush(client, raw_key, payload, len(calls))
    client.delete(raw_key)
    raw, rate = n / raw_spent, n / worq_spent
    return [
        Row("enqueue", "raw", f"LPUSH of {size} B, pipelined by 1,000, in turn", raw, "jobs/s"),
        Row(
            "enqueue",
            "worq",
            ENQUEUE_MANY,
            rate,
            "jobs/s",
            "pipelined LPUSH",
            rate / raw,
            "issue 13 target: >= 0.7x the floor",
            f"{n:,} jobs of {size} B (id and body), in turns of 1,000",
        ),
    ]


# -- the ASGI producer -------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def get(url: str) -> int:
    with urllib.request.urlopen(url, timeout=5) as response:
        status: int = response.status
        return status


def wrk(url: str, seconds: int) -> float:
    """Requests/s that ``wrk -c 32 -t 2`` gets from ``url``; every answer must be a 204."""
    command = ["wrk", "-c", "32", "-t", "2", "-d", f"{seconds}s", url]
    out = subprocess.run(command, capture_output=True, text=True, check=True, timeout=seconds + 60)
    if "Non-2xx" in out.stdout or "Socket errors" in out.stdout:
        raise RuntimeError(f"wrk saw errors on {url}:\n{out.stdout}")
    found = re.search(r"Requests/sec:\s+([\d.]+)", out.stdout)
    if found is None:
        raise RuntimeError(f"no Requests/sec in wrk's output:\n{out.stdout}{out.stderr}")
    return float(found.group(1))


async def _load(host: str, port: int, path: str, seconds: float, connections: int) -> float:
    """What wrk does, roughly: ``connections`` keep-alive connections, one request at a time."""
    request = f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
    done = 0

    async def one() -> None:
        nonlocal done
        reader, writer = await asyncio.open_connection(host, port)
        try:
            while time.perf_counter() < deadline:
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                if not head.startswith(b"HTTP/1.1 204"):
                    raise RuntimeError(f"{path} answered {head[:40]!r}")
                done += 1
        finally:
            writer.close()

    begin = time.perf_counter()
    deadline = begin + seconds
    await asyncio.gather(*(one() for _ in range(connections)))
    return done / (time.perf_counter() - begin)


def asgi_rows(settings: Settings, payload: int) -> list[Row]:
    """Requests/s of the two routes, in turn, ``asgi_rounds`` times; the best counts."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    command = [
        sys.executable,
        "-m",
        "uvicorn",
        "peers.web_app:app",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-level",
        "warning",
        "--no-access-log",
    ]
    use_wrk = settings.use_wrk
    load = "wrk -c 32 -t 2" if use_wrk else "asyncio load generator, 32 connections, not wrk"
    rates: dict[str, list[float]] = {"/raw": [], "/worq": []}
    with running(settings, "uvicorn", command, PEER_BENCH_PAYLOAD=str(payload)) as proc:
        deadline = time.monotonic() + 30
        while True:
            try:
                get(f"{base}/raw")
                break
            except OSError as exc:
                if proc.poll() is not None or time.monotonic() > deadline:
                    tail = log_tail(settings, "uvicorn")
                    raise RuntimeError(f"uvicorn did not start:\n{tail}") from exc
                time.sleep(0.05)
        for path in ("/raw", "/worq"):
            for _ in range(50):  # connections, scripts and the thread pool warmed up
                assert get(base + path) == 204
        for _ in range(settings.asgi_rounds):
            for path, values in rates.items():
                if use_wrk:
                    values.append(wrk(base + path, settings.wrk_seconds))
                else:
                    values.append(
                        asyncio.run(_load("127.0.0.1", port, path, settings.wrk_seconds, 32))
                    )
    note = f"{load}, {settings.wrk_seconds} s; uvicorn, one process; {{}}"
    raw, worq = max(rates["/raw"]), max(rates["/worq"])
    return [
        Row("asgi", "raw", ASGI_RAW, raw, "req/s", note=note.format(runs(rates["/raw"]))),
        Row(
            "asgi",
            "worq",
            ASGI_WORQ,
            worq,
            "req/s",
            "raw asyncio LPUSH",
            worq / raw,
            "issue 13 target: >= 0.8x the floor",
            note.format(runs(rates["/worq"])),
        ),
    ]


# -- the run -----------------------------------------------------------------------------------


def floors(client: redis.Redis, settings: Settings) -> dict[str, float]:
    return raw_floor(client, f"{settings.prefix}:floor", settings.floor_jobs)


def runs(values: list[float]) -> str:
    return "runs: " + ", ".join(f"{v:,.0f}" for v in values)


def run(
    settings: Settings, client: redis.Redis, sections: set[str]
) -> tuple[list[Row], dict[str, Any]]:
    libraries: dict[str, Library] = {
        "worq": WorqLibrary(),
        "huey": HueyLibrary(),
        "dramatiq": DramatiqLibrary(),
    }
    worq = libraries["worq"]
    assert isinstance(worq, WorqLibrary)
    rows: list[Row] = []
    floor_runs: list[dict[str, float]] = []
    # In this order: the drains and start-ups need empty queues, the enqueues leave jobs queued.
    if sections & {"drain1", "drain8"}:
        rows += drain_rows(settings, client, libraries, sections, floor_runs)
    if "startup" in sections:
        rows += startup_rows(settings, client, libraries)
    if "enqueue" in sections:
        rows += enqueue_rows(settings, client, libraries)
        rows += enqueue_many_rows(settings, client, worq)
    if "asgi" in sections:
        rows += asgi_rows(settings, stash_payload(worq))
    floor_runs.append(floors(client, settings))
    floor = {key: max(run[key] for run in floor_runs) for key in floor_runs[0]}
    return finish(rows, floor), {"floor_runs": floor_runs, "floor": floor}


def finish(rows: list[Row], floor: dict[str, float]) -> list[Row]:
    """Add the floors as rows, the ratios to them, and worq against its peers."""
    startup_floor = next(
        (r.value for r in rows if r.section == "startup" and r.system == "raw"), None
    )
    for row in rows:
        if row.floor == "rpop":
            row.ratio = row.value / floor[row.floor]
        elif row.floor == "raw start-up" and startup_floor:
            row.ratio = row.value / startup_floor

    def find(system: str, name: str) -> Row | None:
        return next((r for r in rows if (r.system, r.name) == (system, name)), None)

    targets = [  # worq's row, the peer it is compared with, issue 13's target
        (DRAIN1, "huey", ">= 3x"),
        (DRAIN1, "dramatiq", ""),
        (DRAIN8, "dramatiq", ">= 3x"),
        (DRAIN8, "huey", ""),
        (ENQUEUE, "huey", ">= 1x"),
        (ENQUEUE, "dramatiq", ""),
    ]
    for name, peer, target in targets:
        ours, theirs = find("worq", name), find(peer, name)
        if ours and theirs:
            ours.versus += "; " if ours.versus else ""
            ours.versus += f"{ours.value / theirs.value:.2f}x {peer}"
            ours.versus += f" (target {target})" if target else ""
    one, two = find("worq", DRAIN8), find("worq", DRAIN8_P2)
    if one and two:
        two.versus = f"{two.value / one.value:.2f}x one process (target >= 1.7x)"
        raw_one, raw_two = find("raw", RAW_P1), find("raw", RAW_P2)
        if raw_one and raw_two:
            two.versus += f"; the raw loop: {raw_two.value / raw_one.value:.2f}x"
    ours, huey, dramatiq = (find(system, STARTUP) for system in ("worq", "huey", "dramatiq"))
    if ours and huey:
        ours.versus = f"{ours.value / huey.value:.2f}x huey's time (target <= 1x)"
    if ours and dramatiq:
        ours.versus += f"; {ours.value / dramatiq.value:.2f}x dramatiq's"

    floor_rows = [
        Row("floor", "raw", "RPOP, one round trip each", floor["rpop"], "jobs/s"),
        Row("floor", "raw", "LPUSH, one round trip each", floor["lpush"], "jobs/s"),
        Row(
            "floor", "raw", "LPUSH of 100 B, pipelined by 1,000", floor["pipelined_lpush"], "jobs/s"
        ),
    ]
    return floor_rows + rows


# -- output ------------------------------------------------------------------------------------


def render(rows: list[Row], header: str) -> None:
    columns = ("section", "system", "measure", "value", "vs floor", "vs peer (target)", "note")
    table_rows = []
    for row in rows:
        value = f"{row.value:.3f} s" if row.unit == "s" else f"{row.value:,.0f} {row.unit}"
        ratio = "" if row.ratio is None else f"{row.ratio:.2f}x {row.floor}"
        table_rows.append((row.section, row.system, row.name, value, ratio, row.versus, row.note))
    lines = ["| " + " | ".join(columns) + " |", "|---|---|---|---:|---:|---|---|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in table_rows]
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(header)
        print("\n".join(lines))
        return
    table = Table(title=header)
    for column in columns:
        table.add_column(column, justify="right" if column in ("value", "vs floor") else "left")
    for cells in table_rows:
        table.add_row(*cells)
    Console(width=200).print(table)
    print(f"\nMarkdown ({header}):\n" + "\n".join(lines))


def versions(client: redis.Redis) -> dict[str, str]:
    found = {"redis-server": str(client.info("server")["redis_version"])}
    for name in ("worq-core", "worq-redis", "huey", "dramatiq", "redis", "hiredis", "uvicorn"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            found[name] = importlib.metadata.version(name)
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--db",
        type=int,
        default=int(os.environ.get("WORQ_BENCH_REDIS_DB", "10")),
        help="Redis database on 127.0.0.1:6379 (default 10, or WORQ_BENCH_REDIS_DB)",
    )
    parser.add_argument("--url", help="a Redis URL instead of 127.0.0.1:6379/DB")
    parser.add_argument("--quick", action="store_true", help="smaller runs, under ~2 minutes")
    parser.add_argument("--jobs", type=int, help="jobs per drain (default 10,000; quick 3,000)")
    parser.add_argument("--rounds", type=int, help="runs of every drain (default 3; quick 1)")
    parser.add_argument(
        "--only",
        default=",".join(SECTIONS),
        help=f"comma-separated sections to run (default all: {','.join(SECTIONS)})",
    )
    parser.add_argument(
        "--load",
        choices=("auto", "wrk", "asyncio"),
        default="auto",
        help="what loads the ASGI app: wrk (apt-get install wrk), the script's own asyncio "
        "generator, or wrk when it is installed (default)",
    )
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    args = parser.parse_args()
    sections = set(args.only.split(","))
    if not sections <= set(SECTIONS):
        parser.error(f"--only takes {', '.join(SECTIONS)}")
    have_wrk = shutil.which("wrk") is not None
    if args.load == "wrk" and not have_wrk:
        parser.error("wrk is not installed (apt-get install -y wrk)")
    use_wrk = args.load == "wrk" or (args.load == "auto" and have_wrk)
    if not use_wrk and "asgi" in sections:
        print("The ASGI figures use the asyncio load generator: wrk is not used.", file=sys.stderr)

    url = args.url or f"redis://127.0.0.1:6379/{args.db}"
    prefix = f"peerbench-{uuid.uuid4().hex[:8]}"
    # The apps in bench/peers read these at import, in this process as in the workers.
    os.environ.update(
        PEER_BENCH_URL=url, PEER_BENCH_PREFIX=prefix, WORQ_BENCH_URL=url, WORQ_BENCH_PREFIX=prefix
    )
    client = redis.Redis.from_url(url)
    client.ping()
    begin = time.monotonic()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="peer-bench-") as logs:
        settings = Settings(
            url=url,
            prefix=prefix,
            drain_jobs=args.jobs or (3_000 if args.quick else 10_000),
            rounds=args.rounds or (1 if args.quick else 3),
            floor_jobs=5_000 if args.quick else 10_000,
            enqueue_jobs=5_000 if args.quick else 20_000,
            bulk_jobs=20_000 if args.quick else 100_000,
            startups=3 if args.quick else 7,
            wrk_seconds=3 if args.quick else 10,
            asgi_rounds=1 if args.quick else 2,
            use_wrk=use_wrk,
            logs=Path(logs),
        )
        try:
            rows, floor = run(settings, client, sections)
        finally:
            delete_prefix(client, prefix)
            delete_huey_keys(client, prefix.replace("-", "_"))
            client.close()
    load_after = os.getloadavg()[0]
    rpops = ", ".join(f"{run['rpop']:,.0f}" for run in floor["floor_runs"])
    header = (
        f"peer bench, {'quick' if args.quick else 'full'}: {settings.drain_jobs:,}-job drains, "
        f"best of {settings.rounds}; one run on {url}, {time.monotonic() - begin:.0f} s; "
        f"RPOP floor/s per round and at the end: {rpops}; load average {load_before:.1f} "
        f"before, {load_after:.1f} after"
    )
    render(rows, header)
    if args.json:
        with open(args.json, "w") as out:
            document: dict[str, Any] = {
                "command": sys.argv,
                "url": url,
                "quick": args.quick,
                "load_average": [load_before, load_after],
                "settings": {k: v for k, v in asdict(settings).items() if k != "logs"},
                "versions": versions(redis.Redis.from_url(url)),
                **floor,
                "rows": [asdict(row) for row in rows],
            }
            json.dump(document, out, indent=2)
    return 0


def delete_huey_keys(client: redis.Redis, name: str) -> None:
    """huey keeps its keys at ``huey.<kind>.<name>`` (and ``huey.notify.<name>.<id>``)."""
    keys = list(client.scan_iter(match=f"huey.*.{name}", count=1000))
    keys += client.scan_iter(match=f"huey.*.{name}.*", count=1000)
    for start in range(0, len(keys), 500):
        client.delete(*keys[start : start + 500])


if __name__ == "__main__":
    sys.exit(main())
