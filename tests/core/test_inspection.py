"""The Inspector: job listings by state and task with cursors, and one job's whole story."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from worq_core import JobStatus, Message, WorkerSettings, Worq
from worq_core.errors import Retry
from worq_core.inspection import UNDECODABLE, BadCursor, Inspector
from worq_memory import MemoryBroker


def drain(app: Worq, max_jobs: int | None = None) -> None:
    """Run what is due; with ``max_jobs``, stop after that many runs (a retry is not due)."""
    app.worker(
        settings=WorkerSettings(
            queues=tuple(app.default_queues()),
            idle_wait=0.05,
            handle_signals=False,
            max_jobs=max_jobs,
        )
    ).run(burst=max_jobs is None)


@pytest.fixture
def app() -> Worq:
    app = Worq(MemoryBroker())

    @app.task(name="resize")
    def resize(n: int) -> int:
        return n

    @app.task(name="mail", queue="mail")
    def mail(to: str) -> str:
        return to

    return app


def every_page(inspector: Inspector, status: JobStatus, **options: object) -> list[list[str]]:
    pages, cursor = [], ""
    while True:
        page = inspector.jobs(status, cursor=cursor, **options)  # type: ignore[arg-type]
        pages.append([job.id for job in page.jobs])
        if not page.cursor:
            return pages
        cursor = page.cursor


def test_queued_jobs_of_every_queue_come_a_page_at_a_time_in_order(app: Worq) -> None:
    resize, mail = app.tasks["resize"], app.tasks["mail"]
    mails = [mail.enqueue(f"u{n}@example.org").id for n in range(3)]
    sizes = [resize.enqueue(n).id for n in range(4)]

    pages = every_page(Inspector(app), JobStatus.QUEUED, limit=3)

    assert [i for page in pages for i in page] == sizes + mails, "queues by name, each in order"
    assert [len(page) for page in pages[:2]] == [3, 3]


def test_a_task_filter_reads_a_bounded_number_of_entries_per_page(app: Worq) -> None:
    resize, mail = app.tasks["resize"], app.tasks["mail"]
    noise = [resize.enqueue(n) for n in range(30)]
    wanted = [mail.enqueue("a@example.org").id, resize.enqueue(99).id]
    inspector = Inspector(app)

    first = inspector.jobs(JobStatus.QUEUED, task="resize", limit=100, scan=10)
    assert [j.id for j in first.jobs] == [j.id for j in noise[:10]]
    assert first.cursor, "stopped at the scan bound, not the end"

    pages = every_page(inspector, JobStatus.QUEUED, task="resize", limit=100, scan=10)
    found = [i for page in pages for i in page]
    assert found == [j.id for j in noise] + [wanted[1]]
    assert wanted[0] not in found


def test_retrying_jobs_are_kept_apart_from_scheduled_ones(app: Worq) -> None:
    @app.task(name="flaky", max_retries=2)
    def flaky() -> None:
        raise Retry(delay=600, reason="later")

    later = app.tasks["resize"].options(delay=600).enqueue(1)
    failing = flaky.enqueue()
    drain(app, max_jobs=1)
    inspector = Inspector(app)

    [retrying] = inspector.jobs(JobStatus.RETRYING).jobs
    [scheduled] = inspector.jobs(JobStatus.SCHEDULED).jobs
    assert (retrying.id, retrying.task, retrying.attempts) == (failing.id, "flaky", 1)
    assert "later" in retrying.reason
    assert scheduled.id == later.id
    assert scheduled.args == [1]


def test_a_job_detail_tells_its_story_held_or_finished(app: Worq) -> None:
    @app.task(name="boom", max_retries=0)
    def boom(x: str) -> None:
        raise ValueError(f"<script>{x}</script>")

    queued = app.tasks["resize"].options(headers={"tenant": "acme"}).enqueue(7)
    inspector = Inspector(app)
    detail = inspector.job(queued.id)
    assert detail is not None
    assert detail.status is JobStatus.QUEUED
    assert detail.held is not None
    assert (detail.held.task, detail.held.args, detail.held.headers) == (
        "resize",
        [7],
        {"tenant": "acme"},
    )

    dead = boom.enqueue("x")
    drain(app)
    done = inspector.job(queued.id)
    assert done is not None
    assert (done.status, done.result, done.held) == (JobStatus.SUCCEEDED, 7, None)
    failed = inspector.job(dead.id)
    assert failed is not None
    assert failed.status is JobStatus.DEAD
    assert failed.held is not None, "the dead-letter queue keeps its body"
    assert failed.held.args == ["x"]
    assert failed.error_type == "ValueError"
    assert failed.error == "<script>x</script>"
    assert "Traceback" in failed.traceback
    assert inspector.job("no-such-job") is None


def test_an_undecodable_job_is_listed_not_hidden(app: Worq) -> None:
    app.broker.enqueue([Message("junk", "default", b"\xc1 not msgpack")])
    [job] = Inspector(app).jobs(JobStatus.QUEUED).jobs
    assert (job.id, job.task) == ("junk", UNDECODABLE)


def test_a_cursor_from_elsewhere_is_a_typed_error(app: Worq) -> None:
    with pytest.raises(BadCursor):
        Inspector(app).jobs(JobStatus.QUEUED, cursor="not-a-cursor")


@settings(max_examples=25, deadline=None)
@given(
    counts=st.lists(st.integers(0, 12), min_size=1, max_size=4),
    limit=st.integers(1, 7),
    scan=st.integers(1, 9),
)
def test_paging_with_any_limit_and_scan_lists_each_matching_job_once(
    counts: list[int], limit: int, scan: int
) -> None:
    app = Worq(MemoryBroker())

    @app.task(name="a")
    def a(n: int) -> int:
        return n

    @app.task(name="b")
    def b(n: int) -> int:
        return n

    expected = []
    for q, count in enumerate(counts):
        for n in range(count):
            task = a if n % 3 else b
            job = task.options(queue=f"q{q}").enqueue(n)
            if task is a:
                expected.append(job.id)

    pages = every_page(Inspector(app), JobStatus.QUEUED, task="a", limit=limit, scan=scan)

    assert [i for page in pages for i in page] == expected
    assert all(len(page) <= limit for page in pages)
