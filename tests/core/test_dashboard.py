"""The dashboard over HTTP (a real uvicorn server in a thread, the memory broker): what the pages
show, that user data is escaped, and that actions need the token, the POST and a writable mode."""

from __future__ import annotations

import base64
import html
import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

pytest.importorskip("starlette", reason="needs worq-core[dashboard]")
pytest.importorskip("uvicorn", reason="needs worq-core[dashboard]")

from worq_core import JobStatus, WorkerInfo, Worq, chain
from worq_core.dashboard import DashboardConfig, hosts_for, running
from worq_core.errors import BrokerConnectionError

TOKEN = "test-token"
XSS_ARG = "<script>document.title='pwned-arg'</script>"
XSS_ERROR = "<img src=x onerror=alert(1)> & <script>alert('err')</script>"


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


OPENER = urllib.request.build_opener(NoRedirect)


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    text: str


def request(
    url: str,
    data: dict[str, str] | None = None,
    headers: dict[str, str] | None = None,
) -> Reply:
    body = urllib.parse.urlencode(data).encode() if data is not None else None
    req = urllib.request.Request(url, data=body, headers=headers or {})
    try:
        with OPENER.open(req, timeout=10) as response:
            return Reply(response.status, dict(response.headers.items()), response.read().decode())
    except urllib.error.HTTPError as error:
        return Reply(error.code, dict(error.headers.items()), error.read().decode())


def make_app() -> Worq:
    app = Worq()

    @app.task(name="fragile", max_retries=0)
    def fragile(text: str) -> None:
        raise ValueError(XSS_ERROR)

    @app.task(name="add")
    def add(x: int, y: int) -> int:
        return x + y

    @app.task(name="report", queue="reports")
    def report(name: str) -> str:
        return name

    return app


@pytest.fixture
def app() -> Iterator[Worq]:
    app = make_app()
    yield app
    app.close()


@pytest.fixture
def url(app: Worq) -> Iterator[str]:
    with running(app, DashboardConfig(token=TOKEN)) as base:
        yield base


def dead_job(app: Worq) -> str:
    job = app.get_task("fragile").enqueue(XSS_ARG)
    app.worker().run(burst=True)
    assert job.status() is JobStatus.DEAD
    return job.id


def cells(page: str, attribute: str) -> dict[str, str]:
    return dict(re.findall(rf'data-{attribute}="([^"]+)">(\d+)<', page))


def test_the_overview_shows_each_queue_s_counts_as_the_broker_has_them(app: Worq, url: str) -> None:
    dead_job(app)
    add = app.get_task("add")
    add.enqueue_many([(i, i) for i in range(7)])
    add.options(delay=3600).enqueue(1, 1)
    app.get_task("report").enqueue("weekly")
    page = request(url + "/").text
    rows = {
        queue: dict(re.findall(r'data-count="(\w+)">(\d+)<', row))
        for queue, row in re.findall(r'<tr data-queue="([^"]+)">(.*?)</tr>', page, re.S)
    }
    expected = {
        s.queue: {
            "ready": str(s.ready),
            "scheduled": str(s.delayed),
            "running": str(s.running),
            "dead": str(s.dead),
        }
        for s in app.broker.stats()
    }
    assert rows == expected
    assert rows["default"] == {"ready": "7", "scheduled": "1", "running": "0", "dead": "1"}
    totals = {"ready": "8", "scheduled": "1", "running": "0", "dead": "1", "workers": "0"}
    assert cells(page, "total") == totals


def test_the_overview_api_gives_totals_and_workers_as_json(app: Worq, url: str) -> None:
    app.get_task("add").enqueue(1, 2)
    reply = request(url + "/api/overview")
    assert reply.status == 200
    assert reply.headers["content-type"] == "application/json"
    overview = json.loads(reply.text)
    assert overview["totals"] == {"ready": 1, "scheduled": 0, "running": 0, "dead": 0}
    assert overview["workers"] == 0


def test_arguments_errors_and_tracebacks_are_escaped_on_every_page(app: Worq, url: str) -> None:
    job_id = dead_job(app)
    for path in ("/jobs?state=dead", f"/job/{job_id}"):
        reply = request(url + path)
        assert reply.status == 200
        assert "<script>" not in reply.text
        assert "<img" not in reply.text
        assert html.escape("<script>document.title=", quote=False) in reply.text
    job_page = request(f"{url}/job/{job_id}").text
    assert html.escape("<img src=x onerror=alert(1)>") in job_page  # the error, escaped
    assert "Traceback (most recent call last)" in job_page


def test_every_response_forbids_inline_scripts_and_framing(url: str) -> None:
    headers = request(url + "/").headers
    assert "script-src 'self'" in headers["content-security-policy"]
    assert "unsafe-inline" not in headers["content-security-policy"]
    assert headers["x-frame-options"] == "DENY"
    assert headers["x-content-type-options"] == "nosniff"


def test_a_request_for_another_host_name_is_refused(url: str) -> None:
    # A DNS-rebinding page reaches the dashboard with its own host name in the Host header.
    assert request(url + "/", headers={"Host": "evil.example"}).status == 400
    assert request(url + "/", headers={"Host": "localhost"}).status == 200


def test_requeue_needs_the_token_and_then_moves_the_dead_job_back(app: Worq, url: str) -> None:
    job_id = dead_job(app)
    form = {"queue": "default", "job_id": job_id, "back": f"/job/{job_id}"}
    assert request(url + "/actions/requeue", form).status == 403
    assert request(url + "/actions/requeue", {**form, "token": "guess"}).status == 403
    assert app.job(job_id).status() is JobStatus.DEAD
    done = request(url + "/actions/requeue", {**form, "token": TOKEN})
    assert done.status == 303
    assert done.headers["location"].startswith(f"/job/{job_id}?notice=requeued")
    assert app.job(job_id).status() is JobStatus.QUEUED


def test_a_post_from_another_site_is_refused_even_with_the_token(app: Worq, url: str) -> None:
    job_id = dead_job(app)
    form = {"queue": "default", "job_id": job_id, "token": TOKEN}
    cross = {"Origin": "https://evil.example", "Sec-Fetch-Site": "cross-site"}
    assert request(url + "/actions/requeue", form, cross).status == 403
    assert request(url + "/actions/purge", form, {"Sec-Fetch-Site": "cross-site"}).status == 403
    assert app.job(job_id).status() is JobStatus.DEAD


def test_purge_deletes_the_queue_s_dead_jobs(app: Worq, url: str) -> None:
    dead_job(app)
    dead_job(app)
    reply = request(url + "/actions/purge", {"queue": "default", "token": TOKEN, "back": "/dead"})
    assert reply.status == 303
    assert "purged%202%20dead%20jobs" in reply.headers["location"]
    assert app.broker.stats(["default"])[0].dead == 0


def test_cancel_from_the_job_page_cancels_a_queued_job(app: Worq, url: str) -> None:
    job = app.get_task("add").enqueue(1, 2)
    page = request(f"{url}/job/{job.id}").text
    assert 'action="/actions/cancel"' in page
    reply = request(url + "/actions/cancel", {"job_id": job.id, "token": TOKEN})
    assert reply.status == 303
    assert job.status() is JobStatus.CANCELLED


def test_a_read_only_dashboard_shows_no_actions_and_refuses_them(app: Worq) -> None:
    job_id = dead_job(app)
    with running(app, DashboardConfig(read_only=True, token=TOKEN)) as base:
        for path in (f"/job/{job_id}", "/dead"):
            page = request(base + path).text
            assert "/actions/" not in page
            assert TOKEN not in page
        form = {"queue": "default", "job_id": job_id, "token": TOKEN}
        assert request(base + "/actions/requeue", form).status == 403
    assert app.job(job_id).status() is JobStatus.DEAD


def test_paging_through_a_listing_shows_every_job_once(app: Worq, url: str) -> None:
    jobs = app.get_task("add").enqueue_many([(i, 0) for i in range(120)])
    seen: list[str] = []
    next_url = "/jobs?state=queued&limit=50"
    pages = 0
    while next_url:
        page = request(url + html.unescape(next_url)).text
        seen += re.findall(r'<tr data-job="([^"]+)">', page)
        found = re.search(r'<a href="([^"]+)" rel="next">', page)
        next_url = found.group(1) if found else ""
        pages += 1
    assert pages == 3
    assert sorted(seen) == sorted(job.id for job in jobs)


def test_a_listing_filters_by_task_and_queue(app: Worq, url: str) -> None:
    app.get_task("add").enqueue(1, 2)
    report = app.get_task("report").enqueue("monthly")
    page = request(f"{url}/jobs?state=queued&task=report").text
    assert re.findall(r'<tr data-job="([^"]+)">', page) == [report.id]
    page = request(url + "/jobs?state=queued&queue=reports").text
    assert re.findall(r'<tr data-job="([^"]+)">', page) == [report.id]


def test_searching_an_id_opens_its_page_and_an_unknown_id_says_so(app: Worq, url: str) -> None:
    job = app.get_task("add").enqueue(2, 3)
    reply = request(f"{url}/jobs?id={job.id}")
    assert reply.status == 303
    assert reply.headers["location"] == f"/job/{job.id}"
    unknown = request(url + "/job/no-such-job")
    assert unknown.status == 404
    assert "is unknown" in unknown.text


def test_a_finished_job_shows_its_result(app: Worq, url: str) -> None:
    job = app.get_task("add").enqueue(20, 22)
    app.worker().run(burst=True)
    page = request(f"{url}/job/{job.id}").text
    assert re.search(r'id="job-result">42<', page)
    assert "status-succeeded" in page


def test_a_workflow_step_shows_the_workflow_tree(app: Worq, url: str) -> None:
    add = app.get_task("add")
    flow = chain(add.s(1, 2), add.s(10)).enqueue()
    app.worker().run(burst=True)
    assert flow.result(timeout=5) == 13
    page = request(f"{url}/job/{flow.job_ids[0]}").text
    assert '<ul class="tree">' in page
    assert page.count(">add</a>") == 2


def test_the_schedules_page_lists_each_schedule_with_its_next_tick(app: Worq) -> None:
    @app.periodic(every=3600, name="hourly-report")
    def hourly() -> None: ...

    with running(app, DashboardConfig(token=TOKEN)) as base:
        page = request(base + "/schedules").text
    assert "hourly-report" in page
    row = page[page.index("hourly-report") :]
    assert "never" in row.split("</td>")[3]  # no tick yet
    upcoming = float(re.findall(r'data-ts="([\d.]+)"', row)[0])
    assert time.time() < upcoming <= time.time() + 3600


def test_bad_addresses_get_a_clear_error_page(url: str) -> None:
    assert request(url + "/jobs?state=nonsense").status == 400
    reply = request(url + "/jobs?state=queued&cursor=not-a-cursor")
    assert reply.status == 400
    assert "no longer valid" in reply.text
    assert request(url + "/actions/explode", {"token": TOKEN}).status == 400


def test_the_workers_page_shows_each_worker_and_the_jobs_it_is_running(app: Worq, url: str) -> None:
    started, release = threading.Event(), threading.Event()

    @app.task(name="slow")
    def slow() -> None:
        started.set()
        release.wait(10)

    job = slow.enqueue()
    worker = app.worker(concurrency=2, lease=0.3)  # a heartbeat every 0.1 s
    thread = threading.Thread(target=worker.run, kwargs={"burst": True})
    thread.start()
    try:
        assert started.wait(10)
        deadline = time.monotonic() + 10
        page = ""
        while job.id not in page and time.monotonic() < deadline:
            page = request(url + "/workers").text
            time.sleep(0.05)
        assert f'<a href="/job/{job.id}">{job.id}</a>' in page
        assert re.search(r'<td class="num">1 / 2</td>', page)
        assert f"<td>{socket.gethostname()}</td>" in page
    finally:
        release.set()
        thread.join(10)


# -- worq dashboard ---------------------------------------------------------------------------


def run_cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "worq_core", *args], capture_output=True, text=True, timeout=timeout
    )


def test_worq_dashboard_without_an_app_or_a_broker_says_what_to_give() -> None:
    done = run_cli("dashboard")
    assert done.returncode == 1
    assert "no app and no broker" in done.stderr
    assert "--broker URL" in done.stderr


def test_worq_dashboard_on_a_taken_port_is_a_one_line_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = run_cli("--broker", "memory://", "dashboard", "--port", str(port))
    assert done.returncode == 1
    assert f"Error: cannot serve on 127.0.0.1:{port}" in done.stderr
    assert "Traceback" not in done.stderr


def test_worq_dashboard_serves_read_only_on_loopback_until_stopped() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = ["-m", "worq_core", "--broker", "memory://", "dashboard", "--read-only"]
    proc = subprocess.Popen(
        [sys.executable, *command, "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                page = request(base + "/dead")
                break
            except urllib.error.URLError:
                assert proc.poll() is None, proc.communicate()[1]
                assert time.monotonic() < deadline
                time.sleep(0.05)
        assert page.status == 200
        assert "read-only" in page.text
        assert request(base + "/actions/purge", {"queue": "default"}).status == 403
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    assert f"at http://127.0.0.1:{port}/ (read-only)" in out


def test_the_throughput_is_each_worker_s_rate_between_its_last_two_heartbeats(
    app: Worq, url: str
) -> None:
    def beat(worker_id: str, started: float, seen: float, done: int) -> None:
        info = WorkerInfo(worker_id, "host", 1, started, ("default",), 4, done, 0, seen)
        app.broker.register_worker(info, ttl=3600)

    def throughput() -> float:
        return float(json.loads(request(url + "/api/overview").text)["throughput"])

    now = time.time()
    beat("a", now - 100, now - 10, 500)  # seen once: its average since it started, 5.56/s
    assert throughput() == pytest.approx(500 / 90, abs=0.01)
    assert throughput() == pytest.approx(500 / 90, abs=0.01)  # no new heartbeat: held
    beat("a", now - 100, now, 800)  # 300 more in 10 s
    beat("b", now - 20, now, 0)
    assert throughput() == pytest.approx(30.0)
    beat("b", now - 20, now + 2, 10)
    assert throughput() == pytest.approx(35.0)


def test_a_broker_that_went_away_gives_an_error_page_not_a_crash(app: Worq) -> None:
    def down(*args: Any, **kwargs: Any) -> Any:
        raise BrokerConnectionError("redis://127.0.0.1:1/0", "Connection refused")

    job_id = dead_job(app)
    with running(app, DashboardConfig(token=TOKEN)) as base:
        for method in ("stats", "workers", "find_job", "job_status", "list_jobs"):
            setattr(app.broker, method, down)
        for path in ("/", "/jobs?state=dead", f"/job/{job_id}", "/dead", "/workers"):
            reply = request(base + path)
            assert reply.status == 503, path
            assert "Connection refused" in reply.text, path
            assert "Traceback" not in reply.text, path
        api = request(base + "/api/overview")
        assert api.status == 503
        assert "Connection refused" in json.loads(api.text)["error"]
        form = {"queue": "default", "job_id": job_id, "token": TOKEN}
        assert request(base + "/actions/requeue", form).status == 503


def test_the_broker_s_password_is_never_shown(app: Worq) -> None:
    app.broker.url = "redis://:s3cret@10.0.0.5:6379/0"
    with running(app, DashboardConfig(read_only=True, token=TOKEN)) as base:
        page = request(base + "/").text
    assert "s3cret" not in page
    assert "redis://:***@10.0.0.5:6379/0" in page


def test_an_origin_from_elsewhere_is_refused_without_fetch_metadata(app: Worq, url: str) -> None:
    job_id = dead_job(app)
    form = {"queue": "default", "job_id": job_id, "token": TOKEN}
    for headers in (
        {"Origin": "http://evil.example"},
        {"Origin": "http://localhost:9999"},  # another port is another site
        {"Sec-Fetch-Site": "same-site"},
        {"Origin": "null"},
    ):
        assert request(url + "/actions/requeue", form, headers).status == 403, headers
    assert app.job(job_id).status() is JobStatus.DEAD


def test_behind_a_proxy_an_allowed_name_in_the_origin_is_the_dashboard_s_own(app: Worq) -> None:
    job_id = dead_job(app)
    config = DashboardConfig(token=TOKEN, allowed_hosts=hosts_for("127.0.0.1", ["dash.example"]))
    with running(app, config) as base:
        form = {"queue": "default", "job_id": job_id, "token": TOKEN}
        # nginx's default passes Host: 127.0.0.1:PORT while the browser's origin is the proxy's.
        proxied = {"Origin": "https://dash.example", "Sec-Fetch-Site": "same-origin"}
        assert request(base + "/actions/requeue", form, proxied).status == 303
    assert app.job(job_id).status() is JobStatus.QUEUED


def test_bound_to_every_interface_only_the_machine_s_names_are_answered() -> None:
    hosts = hosts_for("0.0.0.0")
    assert "*" not in hosts
    assert socket.gethostname() in hosts
    assert "127.0.0.1" in hosts
    assert "*" in hosts_for("0.0.0.0", ["*"])


def test_a_crafted_cursor_is_a_bad_request(url: str) -> None:
    cursor = base64.urlsafe_b64encode(b'["default", Infinity]').decode()
    reply = request(f"{url}/jobs?state=queued&cursor={cursor}")
    assert reply.status == 400


def test_live_updates_of_a_workflow_step_skip_the_workflow_s_tree(app: Worq, url: str) -> None:
    add = app.get_task("add")
    flow = chain(add.s(1, 2), add.s(10)).enqueue()
    first = request(f"{url}/job/{flow.job_ids[0]}").text
    live = request(f"{url}/job/{flow.job_ids[0]}", headers={"x-worq-live": "1"}).text
    assert '<ul class="tree">' in first
    assert '<ul class="tree">' not in live
    assert 'id="job-status"' in live


def test_times_are_rendered_the_same_until_the_data_changes(app: Worq, url: str) -> None:
    job = app.get_task("add").options(delay=3600).enqueue(1, 2)
    first = request(f"{url}/job/{job.id}").text
    time.sleep(1.1)  # relative words ("in 59 min") would differ by now; the markup must not
    assert request(f"{url}/job/{job.id}").text == first
    assert re.search(r'<time datetime="[^"]+" data-ts="[\d.]+" data-style="when"', first)


def test_no_page_loads_anything_from_another_site(app: Worq, url: str) -> None:
    job_id = dead_job(app)
    for path in ("/", "/jobs?state=dead", f"/job/{job_id}", "/dead", "/workers", "/schedules"):
        page = request(url + path).text
        for reference in re.findall(r'\s(?:src|href|action)="([^"]*)"', page):
            assert reference.startswith("/"), (path, reference)
    for asset in ("/static/dashboard.js", "/static/dashboard.css"):
        text = request(url + asset).text
        assert "http://" not in text
        assert "https://" not in text
