"""Developer tasks. `nox` runs tests, lint, types and docs; `nox -s demo` runs the demo."""

from __future__ import annotations

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


@nox.session
def bench(session: nox.Session) -> None:
    """Benchmarks against the local Redis; figures are ratios to a raw redis-py floor."""
    install_worq(session)
    session.run("python", "bench/redis_bench.py", *session.posargs)


@nox.session(name="bench-seam")
def bench_seam(session: nox.Session) -> None:
    """What middleware stacks cost per job; --baseline-python PATH compares an older tree."""
    install_worq(session)
    session.run("python", "bench/seam_bench.py", *session.posargs)


@nox.session(name="bench-limits")
def bench_limits(session: nox.Session) -> None:
    """Unlimited jobs' throughput with rate- and concurrency-limited jobs in the same queue."""
    install_worq(session)
    session.run("python", "bench/limits_bench.py", *session.posargs)


@nox.session(name="bench-workflows")
def bench_workflows(session: nox.Session) -> None:
    """What groups, chords and their counting cost against plain jobs, on the local Redis."""
    install_worq(session)
    session.run("python", "bench/workflow_bench.py", *session.posargs)


@nox.session(name="bench-metrics")
def bench_metrics(session: nox.Session) -> None:
    """What the Prometheus middleware adds per job, in-process and in multiprocess mode."""
    install_worq(session)
    session.run("python", "bench/metrics_bench.py", *session.posargs)


@nox.session(name="bench-tracing")
def bench_tracing(session: nox.Session) -> None:
    """What the otel middleware costs per job on the memory broker, with the SDK exporting."""
    install_worq(session, "opentelemetry-sdk>=1.27")
    session.run("python", "bench/tracing_bench.py", *session.posargs)


@nox.session(name="bench-postgres")
def bench_postgres(session: nox.Session) -> None:
    """worq-postgres against procrastinate and pgqueuer on the local PostgreSQL, as ratios."""
    install_worq(session, "procrastinate>=3", "pgqueuer>=0.20")
    session.run("python", "bench/postgres_bench.py", *session.posargs)


@nox.session(name="bench-postgres-soak")
def bench_postgres_soak(session: nox.Session) -> None:
    """worq-postgres' table size through a long churn, and fetch beside millions of old rows."""
    install_worq(session)
    session.run("python", "bench/postgres_soak.py", *session.posargs)


@nox.session(name="bench-dashboard")
def bench_dashboard(session: nox.Session) -> None:
    """The dashboard's page times with 100,000 jobs queued against 1,000, on the local Redis."""
    install_worq(session)
    session.run("python", "bench/dashboard_bench.py", *session.posargs)


@nox.session(name="bench-sentinel")
def bench_sentinel(session: nox.Session) -> None:
    """What wait_replicas costs per job through Sentinel (own servers on ports 17040-17044)."""
    install_worq(session)
    session.run("python", "bench/sentinel_bench.py", *session.posargs)


@nox.session(name="bench-cluster")
def bench_cluster(session: nox.Session) -> None:
    """One Redis Cluster master against three (own servers on ports 17060-17063); a ratio."""
    install_worq(session)
    session.run("python", "bench/cluster_bench.py", *session.posargs)
