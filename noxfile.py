"""Developer tasks. `nox` runs tests, lint, types and docs; `nox -s demo` runs the demo."""

from __future__ import annotations

from collections.abc import Callable

import nox

nox.options.sessions = ["tests", "lint", "types", "docs"]
nox.options.reuse_venv = "yes"
nox.options.error_on_missing_interpreters = True

PACKAGES = [
    "./worq_core[testing,prometheus,otel,dashboard]",
    "./worq_memory",
    "./worq_redis",
    "./worq_postgres",
]
TEST_DEPS = [
    "pytest>=8",
    "pytest-timeout>=2.2",
    "hypothesis>=6.100",
    "fakeredis[lua]>=2.20",
    "opentelemetry-sdk>=1.27",
    # Drives Debian's chromium (never a downloaded browser) in the dashboard's browser test.
    "playwright>=1.40",
    # Runs docs/postgres.md's SQLAlchemy recipe for transactional enqueue; never a runtime need.
    "sqlalchemy>=2",
]


def install_worq(session: nox.Session, *extra: str) -> None:
    # Regular (not editable) installs, so the tests see what a wheel would ship.
    session.install("--force-reinstall", "--no-deps", *PACKAGES)
    session.install(*PACKAGES, *extra)


@nox.session
def tests(session: nox.Session) -> None:
    """The whole pytest suite; Redis and PostgreSQL tests need their servers (CI=1: must)."""
    install_worq(session, *TEST_DEPS)
    session.run("pytest", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff check and ruff format --check."""
    # Pinned: a newer ruff may format differently (0.17 began formatting code in Markdown).
    session.install("ruff==0.17.6")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def types(session: nox.Session) -> None:
    """mypy --strict over the four distributions (settings in pyproject.toml)."""
    install_worq(session, "mypy>=1.10", "types-croniter", *TEST_DEPS)
    session.run("mypy", "--strict")


@nox.session
def docs(session: nox.Session) -> None:
    """Build the documentation; any warning is an error."""
    session.install("mkdocs>=1.6")
    session.run("mkdocs", "build", "--strict", "--site-dir", f"{session.create_tmp()}/site")


@nox.session
def demo(session: nox.Session) -> None:
    """Enqueue and process thousands of jobs on the in-memory broker, with progress."""
    session.install("./worq_core", "./worq_memory")
    session.run("worq", "demo", *session.posargs)


# The benchmarks: session name -> (script, what it measures, extra packages). Figures are ratios
# measured in one run; see each script's docstring and README's list.
BENCHES: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "bench": (
        "bench/redis_bench.py",
        "Benchmarks against the local Redis; figures are ratios to a raw redis-py floor.",
        (),
    ),
    "bench-redis-server-time": (
        "bench/redis_server_time.py",
        "Server time per job in worq-redis' scripts (INFO commandstats): Lua against commands.",
        (),
    ),
    "bench-startup": (
        "bench/startup_bench.py",
        "A fresh producer's time to its first enqueue and the lease keeper's to ready, as ratios.",
        (),
    ),
    "bench-cpu": (
        "bench/cpu_bench.py",
        "CPU per job of each worker process, lease keeper and Redis in a steady drain; -p 2 vs 1.",
        (),
    ),
    "bench-seam": (
        "bench/seam_bench.py",
        "What middleware stacks cost per job; --baseline-python PATH compares an older tree.",
        (),
    ),
    "bench-limits": (
        "bench/limits_bench.py",
        "Unlimited jobs' throughput with rate- and concurrency-limited jobs in the same queue.",
        (),
    ),
    "bench-workflows": (
        "bench/workflow_bench.py",
        "What groups, chords and their counting cost against plain jobs, on the local Redis.",
        (),
    ),
    "bench-metrics": (
        "bench/metrics_bench.py",
        "What the Prometheus middleware adds per job, in-process and in multiprocess mode.",
        (),
    ),
    "bench-tracing": (
        "bench/tracing_bench.py",
        "What the otel middleware costs per job on the memory broker, with the SDK exporting.",
        ("opentelemetry-sdk>=1.27",),
    ),
    "bench-postgres": (
        "bench/postgres_bench.py",
        "worq-postgres against procrastinate and pgqueuer on the local PostgreSQL, as ratios.",
        ("procrastinate>=3", "pgqueuer>=0.20"),
    ),
    "bench-postgres-soak": (
        "bench/postgres_soak.py",
        "worq-postgres' table size through a long churn, and fetch beside millions of old rows.",
        (),
    ),
    "bench-postgres-batch-delete": (
        "bench/postgres_batch_delete.py",
        "Deleting each acknowledged job at once against marking it done and deleting in batches.",
        (),
    ),
    "bench-peers": (
        "bench/peer_bench.py",
        "worq against huey and dramatiq on the local Redis, in one run, as ratios to raw floors.",
        ("huey>=2.5", "dramatiq[redis]>=1.17", "starlette>=0.37", "uvicorn>=0.30"),
    ),
    "bench-dashboard": (
        "bench/dashboard_bench.py",
        "The dashboard's page times with 100,000 jobs queued against 1,000, on the local Redis.",
        (),
    ),
    "bench-sentinel": (
        "bench/sentinel_bench.py",
        "What wait_replicas costs per job through Sentinel (own servers on ports 17040-17044).",
        (),
    ),
    "bench-cluster": (
        "bench/cluster_bench.py",
        "One Redis Cluster master against three (own servers on ports 17060-17063); a ratio.",
        (),
    ),
    "bench-cluster-workflows": (
        "bench/cluster_workflow_bench.py",
        "Workflow steps against plain acks on Redis Cluster (own servers on ports 17064-17066).",
        (),
    ),
}


def _bench_session(script: str, doc: str, extras: tuple[str, ...]) -> Callable[[nox.Session], None]:
    def run(session: nox.Session) -> None:
        install_worq(session, *extras)
        session.run("python", script, *session.posargs)

    run.__doc__ = doc
    return run


for _name, (_script, _doc, _extras) in BENCHES.items():
    nox.session(name=_name)(_bench_session(_script, _doc, _extras))
