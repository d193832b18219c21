"""The dashboard's ASGI application: pages, a small JSON API for live updates, and the actions."""

from __future__ import annotations

import contextlib
import datetime as dt
import hmac
import secrets
import socket
import threading
import time
import urllib.parse
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import TYPE_CHECKING, Any

import jinja2
from markupsafe import Markup
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import (
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
)
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from worq_core.errors import BrokerError, StorageError, WorqError
from worq_core.inspection import (
    BadCursor,
    Inspector,
    JobDetail,
    JobSummary,
    show_arguments,
    show_value,
    truncate,
)
from worq_core.models import Capability, JobStatus, QueueStats, WorkerInfo
from worq_core.scheduling import recorded_fires

if TYPE_CHECKING:
    from worq_core.app import Worq
    from worq_core.canvas import WorkflowNode

LIVE_HEADER = "x-worq-live"
"""Sent by the page's script with its live updates (which redraw only the live regions)."""

PAGE_SIZE = 50
"""Jobs per page of a listing."""

MAX_PAGE_SIZE = 500

LISTABLE = (
    JobStatus.QUEUED,
    JobStatus.SCHEDULED,
    JobStatus.RETRYING,
    JobStatus.RUNNING,
    JobStatus.DEAD,
)

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")

# No inline script or style anywhere: whatever a job's arguments or error contain, a browser
# runs only the dashboard's own files.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)

SECURITY_HEADERS = {
    "content-security-policy": CONTENT_SECURITY_POLICY,
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "same-origin",
    "cache-control": "no-store",
}


@dataclass(frozen=True)
class DashboardConfig:
    """How a dashboard behaves; the defaults are the safe ones."""

    read_only: bool = False
    """Show no actions, and refuse every POST."""
    token: str = field(default_factory=lambda: secrets.token_urlsafe(32), repr=False)
    """The secret every action must carry; a fresh random one per dashboard by default."""
    allowed_hosts: Sequence[str] = LOOPBACK_HOSTS
    """Host names the dashboard answers to (``"*"`` for any); others get 400."""
    refresh_seconds: float = 2.0
    """How often a page asks for fresh figures."""


def create_app(app: Worq, config: DashboardConfig | None = None) -> Starlette:
    """The dashboard of ``app`` as an ASGI application.

    The broker and storage are the app's own (``Worq("redis://...")`` is enough: no task code
    is needed). Broker calls run in Starlette's thread pool, one bounded read per request.
    """
    config = config or DashboardConfig()
    views = _Views(app, config)
    static = StaticFiles(directory=str(resources.files("worq_core.dashboard") / "static"))
    routes = [
        Route("/", views.overview),
        Route("/jobs", views.jobs),
        Route("/job/{job_id:path}", views.job),
        Route("/dead", views.dead),
        Route("/workers", views.workers),
        Route("/schedules", views.schedules),
        Route("/api/overview", views.api_overview),
        Route("/actions/{action}", views.action, methods=["POST"]),
        Mount("/static", static, name="static"),
    ]
    return Starlette(
        routes=routes,
        exception_handlers={WorqError: views.failed},
        middleware=[
            Middleware(_SecurityHeaders),
            Middleware(TrustedHostMiddleware, allowed_hosts=list(config.allowed_hosts)),
        ],
    )


def serve(
    app: Worq,
    host: str = "127.0.0.1",
    port: int = 8765,
    config: DashboardConfig | None = None,
    *,
    log_level: str = "warning",
) -> None:
    """Serve the dashboard with uvicorn until interrupted (what ``worq dashboard`` runs)."""
    import uvicorn

    uvicorn.run(create_app(app, config), host=host, port=port, log_level=log_level)


@contextlib.contextmanager
def running(
    app: Worq,
    config: DashboardConfig | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
) -> Iterator[str]:
    """Serve the dashboard from a background thread for the block; yields its base URL.

    ``port=0`` takes a free port. For tests and notebooks; ``worq dashboard`` uses :func:`serve`.
    """
    import uvicorn

    server = uvicorn.Server(
        uvicorn.Config(create_app(app, config), host=host, port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, name="worq-dashboard", daemon=True)
    thread.start()
    deadline = time.monotonic() + 10.0
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError(f"the dashboard did not start on {host}:{port}")
        time.sleep(0.01)
    bound = server.servers[0].sockets[0].getsockname()
    shown = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
    try:
        yield f"http://{shown}:{bound[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10.0)


def hosts_for(bind: str, extra: Sequence[str] = ()) -> tuple[str, ...]:
    """The host names to accept for a dashboard bound to ``bind``.

    Always the loopback names and ``bind`` itself, plus ``extra`` (the names a reverse proxy
    or the team uses). Bound to every interface (``0.0.0.0``, ``::``), the machine's own names
    are added too. ``"*"`` in ``extra`` accepts any name, and gives up the defence against DNS
    rebinding: only use it behind a proxy that checks the name itself.
    """
    names = [*LOOPBACK_HOSTS, bind, *extra]
    if bind in ("0.0.0.0", "::", ""):
        names += [socket.gethostname(), socket.getfqdn()]
    return tuple(dict.fromkeys(name for name in names if name))


class _SecurityHeaders:
    """Adds :data:`SECURITY_HEADERS` to every response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {name.lower() for name, _ in headers}
                for name, value in SECURITY_HEADERS.items():
                    if name.encode() not in present:
                        headers.append((name.encode(), value.encode()))
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, send_with_headers)


# -- presentation helpers -------------------------------------------------------------------------


def _time(timestamp: float | None, style: str = "when") -> Markup:
    """A ``<time>`` element: the moment in UTC, which the page's script words relative to now.

    ``style`` is ``when`` (the moment and how long ago or ahead), ``ago`` (only that) or
    ``since`` (the time elapsed since, as for an uptime). The server renders no relative text,
    so a page whose data did not change renders the same, and live updates leave it alone.
    """
    if not timestamp:
        return Markup("")
    moment = dt.datetime.fromtimestamp(timestamp, dt.UTC)
    shown = moment.strftime("%Y-%m-%d %H:%M:%S UTC")
    return Markup(
        '<time datetime="{}" data-ts="{:.3f}" data-style="{}" data-abs="{}">{}</time>'
    ).format(moment.isoformat(), timestamp, style, shown, shown)


def _call(summary: JobSummary, limit: int | None = 120) -> str:
    text = show_arguments(summary.args, summary.kwargs)
    return text if limit is None else truncate(text, limit)


def _queue_row(stats: QueueStats) -> dict[str, Any]:
    return {
        "queue": stats.queue,
        "ready": stats.ready,
        "scheduled": stats.delayed,
        "running": stats.running,
        "dead": stats.dead,
    }


def _worker_row(info: WorkerInfo) -> dict[str, Any]:
    return {
        "id": info.id,
        "host": info.host,
        "pid": info.pid,
        "queues": ", ".join(info.queues),
        "slots": info.concurrency,
        "running": info.running,
        "done": info.done,
        "current": list(info.current),
        "started": info.started,
        "seen": info.seen,
    }


def _tree(node: WorkflowNode, limit: int = 20) -> dict[str, Any]:
    children = list(node.children)
    hidden = 0
    if node.kind == "group" and len(children) > limit:
        unfinished = [c for c in children if c.status is not JobStatus.SUCCEEDED]
        hidden = len(children) - len(unfinished[:limit])
        children = unfinished[:limit]
    return {
        "kind": node.kind,
        "status": node.status.value,
        "id": node.id,
        "task": node.task,
        "children": [_tree(child, limit) for child in children],
        "hidden": hidden,
    }


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("worq_core.dashboard", "templates"),
        autoescape=True,  # every value from a job is user data
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["when"] = _time
    env.filters["show"] = show_value
    env.filters["call"] = _call
    env.filters["quote"] = lambda value: urllib.parse.quote(str(value), safe="")
    return env


# -- the views ------------------------------------------------------------------------------------


class _Views:
    def __init__(self, app: Worq, config: DashboardConfig) -> None:
        self.app = app
        self.config = config
        self.inspector = Inspector(app)
        self.env = _environment()
        self._rates: dict[str, tuple[float, int, float]] = {}  # worker -> (seen, done, rate)
        self._rates_lock = threading.Lock()

    # -- rendering --------------------------------------------------------------------------------

    def render(
        self, request: Request, template: str, status: int = 200, **context: Any
    ) -> Response:
        broker = self.app.broker
        base = {
            "broker": f"{broker.name} {broker.shown_url}",
            "read_only": self.config.read_only,
            "token": "" if self.config.read_only else self.config.token,
            "refresh_ms": int(self.config.refresh_seconds * 1000),
            "notice": request.query_params.get("notice", ""),
            "page": template.removesuffix(".html"),
            "capabilities": {c.value for c in broker.capabilities},
        }
        html = self.env.get_template(template).render(**base, **context)
        return HTMLResponse(html, status_code=status)

    def error(self, request: Request, message: str, status: int) -> Response:
        return self.render(request, "error.html", status=status, message=message)

    async def failed(self, request: Request, exc: Exception) -> Response:
        """A worq error no view handled: the broker or storage is unreachable, most likely."""
        unavailable = isinstance(exc, BrokerError | StorageError)
        status = 503 if unavailable else 400
        message = str(exc)
        if request.url.path.startswith("/api/"):
            return JSONResponse({"error": message}, status)
        try:
            return self.error(request, message, status)
        except WorqError:  # the page itself needs the broker (capabilities): plain text then
            return PlainTextResponse(message, status)

    # -- pages ------------------------------------------------------------------------------------

    async def overview(self, request: Request) -> Response:
        data = await run_in_threadpool(self._overview_data)
        return self.render(request, "overview.html", **data)

    async def jobs(self, request: Request) -> Response:
        params = request.query_params
        wanted = params.get("id", "").strip()
        if wanted:
            return RedirectResponse(f"/job/{urllib.parse.quote(wanted, safe='')}", 303)
        try:
            state = JobStatus(params.get("state", JobStatus.QUEUED.value))
            if state not in LISTABLE:
                raise ValueError(state)
            limit = min(MAX_PAGE_SIZE, max(1, int(params.get("limit", PAGE_SIZE))))
        except ValueError:
            return self.error(request, "unknown state or limit in the address", 400)
        queue = params.get("queue", "").strip()
        task = params.get("task", "").strip()
        cursor = params.get("cursor", "")
        try:
            page = await run_in_threadpool(
                self.inspector.jobs,
                state,
                queues=[queue] if queue else None,
                task=task or None,
                cursor=cursor,
                limit=limit,
            )
        except BadCursor:
            return self.error(request, "that page link is no longer valid", 400)
        query = {"state": state.value, "queue": queue, "task": task, "limit": str(limit)}
        following = ""
        if page.cursor:
            following = "/jobs?" + urllib.parse.urlencode({**query, "cursor": page.cursor})
        return self.render(
            request,
            "jobs.html",
            states=[s.value for s in LISTABLE],
            state=state.value,
            queue=queue,
            task=task,
            jobs=page.jobs,
            next_url=following,
            first_url="/jobs?" + urllib.parse.urlencode(query) if cursor else "",
        )

    async def job(self, request: Request) -> Response:
        job_id = request.path_params["job_id"]
        # A workflow's tree costs one read per job of the workflow: drawn when the page is
        # opened, not at each live update.
        live = request.headers.get(LIVE_HEADER) == "1"
        detail, tree = await run_in_threadpool(self._job_data, job_id, not live)
        if detail is None and tree is None:
            return self.error(
                request,
                f"job {job_id} is unknown: never enqueued, or its result expired",
                404,
            )
        return self.render(request, "job.html", job_id=job_id, job=detail, tree=tree)

    async def dead(self, request: Request) -> Response:
        queues = [q for q in await run_in_threadpool(self.inspector.queues) if q.dead]
        return self.render(request, "dead.html", queues=[_queue_row(q) for q in queues])

    async def workers(self, request: Request) -> Response:
        rows = await run_in_threadpool(self._workers_data)
        return self.render(request, "workers.html", workers=rows)

    async def schedules(self, request: Request) -> Response:
        rows = await run_in_threadpool(self._schedules_data)
        return self.render(request, "schedules.html", schedules=rows)

    # -- the JSON API -----------------------------------------------------------------------------

    async def api_overview(self, request: Request) -> Response:
        return JSONResponse(await run_in_threadpool(self._overview_data))

    # -- actions ----------------------------------------------------------------------------------

    async def action(self, request: Request) -> Response:
        if self.config.read_only:
            return self.error(request, "this dashboard is read-only", 403)
        if not _same_origin(request, self.config.allowed_hosts):
            return self.error(request, "refused: the request came from another site", 403)
        form = _form(await request.body())
        if not hmac.compare_digest(form.get("token", ""), self.config.token):
            return self.error(request, "refused: the form's token is missing or wrong", 403)
        action = request.path_params["action"]
        job_id = form.get("job_id", "")
        queue = form.get("queue", "")
        back = form.get("back", "/")
        if not back.startswith("/") or back.startswith("//"):
            back = "/"
        try:
            if action == "cancel" and job_id:
                found = await run_in_threadpool(self.app.cancel, job_id)
                notice = "cancellation requested" if found else "nothing to cancel"
            elif action == "requeue" and queue:
                ids = [job_id] if job_id else None
                moved = await run_in_threadpool(self.app.requeue_dead, queue, ids)
                notice = f"requeued {moved} job{'s' if moved != 1 else ''}"
            elif action == "purge" and queue:
                purged = await run_in_threadpool(self.inspector.purge_dead, queue)
                notice = f"purged {purged} dead job{'s' if purged != 1 else ''}"
            else:
                return self.error(request, "unknown action", 400)
        except (BrokerError, StorageError):
            raise
        except WorqError as exc:
            return self.error(request, str(exc), 400)
        joiner = "&" if "?" in back else "?"
        return RedirectResponse(f"{back}{joiner}notice={urllib.parse.quote(notice)}", 303)

    # -- data -------------------------------------------------------------------------------------

    def _overview_data(self) -> dict[str, Any]:
        now = time.time()
        queues = [_queue_row(q) for q in self.inspector.queues()]
        workers = self._workers_data()
        totals = {
            key: sum(int(row[key]) for row in queues)
            for key in ("ready", "scheduled", "running", "dead")
        }
        return {
            "at": now,
            "queues": queues,
            "totals": totals,
            "workers": len(workers),
            "slots": sum(int(w["slots"]) for w in workers),
            "processed": sum(int(w["done"]) for w in workers),
            "throughput": self._throughput(workers),
        }

    def _throughput(self, workers: list[dict[str, Any]]) -> float:
        """Jobs finished per second by the live workers, from their last two heartbeats.

        A worker reports its count of finished jobs with each heartbeat (every ``lease / 3``
        seconds), so its rate is the difference between two reports over the time between
        them, held until the next one; a worker seen once counts its average since it started.
        """
        rates = {}
        with self._rates_lock:
            for worker in workers:
                seen, done = float(worker["seen"]), int(worker["done"])
                previous = self._rates.get(worker["id"])
                if previous is None:
                    rate = done / max(1.0, seen - float(worker["started"]))
                elif seen > previous[0]:
                    rate = max(0, done - previous[1]) / (seen - previous[0])
                else:
                    seen, done, rate = previous
                rates[worker["id"]] = (seen, done, rate)
            self._rates = rates
        return round(sum(rate for _, _, rate in rates.values()), 3)

    def _workers_data(self) -> list[dict[str, Any]]:
        if Capability.WORKER_REGISTRY not in self.app.broker.capabilities:
            return []
        infos = sorted(self.app.broker.workers(), key=lambda w: (w.host, w.pid, w.id))
        return [_worker_row(info) for info in infos]

    def _job_data(
        self, job_id: str, with_tree: bool = True
    ) -> tuple[JobDetail | None, dict[str, Any] | None]:
        detail = self.inspector.job(job_id)
        tree = None
        if with_tree:
            workflow = self.inspector.workflow(job_id)
            if workflow is not None:
                tree = _tree(workflow.tree())
        return detail, tree

    def _schedules_data(self) -> list[dict[str, Any]]:
        broker = self.app.broker
        if Capability.SCHEDULES not in broker.capabilities:
            return []
        declared = list(self.app.schedules.values())
        now = time.time()
        if not declared:  # no app code: what the broker recorded, without the triggers
            fires = broker.schedule_fires(None)
            return [
                {"name": key, "task": "", "trigger": "", "last": at, "seen": None, "next": None}
                for key, at in sorted(fires.items())
            ]
        fires = recorded_fires(broker, declared)
        rows = []
        for item in declared:
            last = fires.get(item.key)
            upcoming = item.trigger.next_after(now if last is None else max(now, last))
            # The scheduler's first record is when it saw the schedule, not a tick.
            ticked = last is not None and item.trigger.last_at(last) == last
            rows.append(
                {
                    "name": item.name,
                    "task": item.task.name,
                    "trigger": item.trigger.describe(),
                    "last": last if ticked else None,
                    "seen": None if ticked else last,
                    "next": upcoming,
                }
            )
        return rows


def _form(body: bytes) -> Mapping[str, str]:
    """An ``application/x-www-form-urlencoded`` body (the dashboard's forms send nothing else)."""
    parsed = urllib.parse.parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
    return {key: values[-1] for key, values in parsed.items()}


def _same_origin(request: Request, allowed_hosts: Sequence[str]) -> bool:
    """Whether a POST comes from the dashboard's own pages, as far as the browser says.

    Browsers send ``Sec-Fetch-Site`` and ``Origin`` with every cross-site POST; a request with
    neither (a script, curl) still needs the token. The origin is the dashboard's own when it
    names the host the request was sent to, or one of the allowed names (a reverse proxy may
    pass the dashboard another ``Host`` than the one the browser used).
    """
    site = request.headers.get("sec-fetch-site")
    if site is not None and site not in ("same-origin", "none"):
        return False
    origin = request.headers.get("origin")
    if origin is None or origin == "null":
        return origin is None
    parsed = urllib.parse.urlsplit(origin)
    if parsed.netloc == request.headers.get("host", ""):
        return True
    # Loopback names are never enough alone: another port on this machine is another site.
    name = parsed.hostname
    return name is not None and name not in LOOPBACK_HOSTS and name in allowed_hosts
