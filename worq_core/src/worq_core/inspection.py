"""What operators' tools read and do: ``worq jobs``, ``worq job`` and the dashboard share it.

An :class:`Inspector` needs only an app, and an app needs only a broker URL
(``Worq("redis://...")``): job listings decode what the broker holds with the app's
serializer and show task names and arguments as they are stored, so no task code is needed.

Every request costs a bounded amount of broker work. Listing asks the broker for pages
(:meth:`~worq_core.Broker.list_jobs`, :attr:`~worq_core.Capability.LISTING`); a filter by task
or by the RETRYING state is applied to the entries read, and one request reads at most
``scan`` of them, returning a cursor where it stopped: a page may come back short before the
end, and the cursor goes on from there.
"""

from __future__ import annotations

import base64
import bisect
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from worq_core.errors import DeserializationError, UnsupportedError, WorqError
from worq_core.job import Envelope, Job, decode_record
from worq_core.models import (
    Capability,
    Event,
    JobStatus,
    ListedJob,
    QueueStats,
    WorkerInfo,
)

if TYPE_CHECKING:
    from worq_core.app import Worq
    from worq_core.canvas import Workflow

UNDECODABLE = "<undecodable>"
"""The task name shown for a job whose body cannot be decoded."""

_LISTED_AS = {JobStatus.RETRYING: JobStatus.SCHEDULED}


class BadCursor(WorqError, ValueError):
    """A listing cursor that this inspector did not hand out."""


@dataclass(frozen=True)
class JobSummary:
    """A job the broker holds, decoded as far as its body allows."""

    id: str
    queue: str
    status: JobStatus
    task: str
    args: list[Any] = field(default_factory=list)
    kwargs: dict[str, Any] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)
    enqueued_at: float | None = None
    attempts: int = 0
    at: float | None = None
    """Its due time (scheduled, retrying), lease deadline (running) or death (dead)."""
    reason: str = ""
    workflow: str = ""
    """The id of the workflow it is a step of (empty for a plain job)."""


@dataclass(frozen=True)
class JobPage:
    """One page of a listing; ``cursor`` asks for the next one (empty at the end)."""

    jobs: list[JobSummary]
    cursor: str


@dataclass(frozen=True)
class JobDetail:
    """Everything known of one job: what the broker holds, and its record once finished."""

    id: str
    status: JobStatus
    held: JobSummary | None
    """The job as the broker holds it (``None`` once it finished: its body is gone)."""
    result: Any = None
    error_type: str = ""
    error: str = ""
    traceback: str = ""
    progress: dict[str, Any] | None = None
    cancel_requested: bool = False


class Inspector:
    """Read (and, for the actions, change) what an app's broker holds, request by request."""

    def __init__(self, app: Worq) -> None:
        self.app = app
        self.broker = app.broker

    # -- reading -------------------------------------------------------------------------------

    def queues(self) -> list[QueueStats]:
        """Counts of every queue the broker knows of and the app declares, by name."""
        known = {s.queue: s for s in self.broker.stats()}
        declared = [q for q in self.app.default_queues() if q not in known]
        extra = self.broker.stats(declared) if declared else []
        return sorted([*known.values(), *extra], key=lambda s: s.queue)

    def workers(self) -> list[WorkerInfo]:
        """The live workers, as they registered at their latest heartbeat."""
        return self.broker.workers()

    def jobs(
        self,
        status: JobStatus,
        *,
        queues: Sequence[str] | None = None,
        task: str | None = None,
        cursor: str = "",
        limit: int = 50,
        scan: int = 1000,
    ) -> JobPage:
        """A page of jobs in ``status`` (QUEUED, SCHEDULED, RETRYING, RUNNING or DEAD).

        Queues are read one after another (``queues``, or every queue, by name). ``task``
        keeps only that task's jobs. At most ``scan`` entries are read per call.
        """
        self._require(Capability.LISTING, "listing jobs")
        listed = _LISTED_AS.get(status, status)
        if listed not in self.broker.LISTED_STATES:
            raise UnsupportedError(self.broker.name, Capability.LISTING.value, f"{status} jobs")
        names = sorted(queues) if queues is not None else [s.queue for s in self.queues()]
        index, offset = self._position(cursor, names)
        filtered = task is not None or listed is not status
        found: list[JobSummary] = []
        scanned = 0
        while index < len(names) and len(found) < limit and scanned < scan:
            want = min(200, scan - scanned) if filtered else limit - len(found)
            page = self.broker.list_jobs(names[index], listed, offset, want)
            read = 0
            for entry in page:
                read += 1
                summary = self.summary(entry)
                if summary.status is status and (task is None or summary.task == task):
                    found.append(summary)
                    if len(found) == limit:
                        break
            offset += read
            scanned += read
            if len(page) < want and read == len(page):
                index, offset = index + 1, 0  # this queue has no more
        more = index < len(names)
        return JobPage(found, _cursor(names[index], offset) if more else "")

    def job(self, job_id: str) -> JobDetail | None:
        """The job with this id, held or finished; ``None`` if neither broker nor storage has it."""
        app = self.app
        held = None
        if Capability.LISTING in self.broker.capabilities:
            entry = self.broker.find_job(job_id)
            held = None if entry is None else self.summary(entry)
        state, record = self.broker.job_status(job_id, app.storage)
        if state is None and record is None and held is None:
            return None
        status = state.status if state is not None else (held.status if held else None)
        detail: dict[str, Any] = {}
        if record is not None:
            # A dead job is both held (in the dead-letter queue) and recorded (its error).
            try:
                recorded, value = decode_record(job_id, record, app.serializer)
            except (DeserializationError, AttributeError, TypeError):
                recorded, value = JobStatus.UNKNOWN, None
            if state is None:
                status = recorded
            if recorded is JobStatus.SUCCEEDED:
                detail["result"] = value
            elif isinstance(value, Exception):
                detail["error_type"] = getattr(value, "error_type", type(value).__name__)
                detail["error"] = getattr(value, "message", str(value))
                detail["traceback"] = getattr(value, "traceback", None) or ""
        if held is not None and held.reason and "error" not in detail:
            detail["error"] = held.reason
        progress = None
        if state is not None and state.status is JobStatus.RUNNING:
            found = Job(app, job_id).progress()
            if found is not None:
                progress = {
                    "current": found.current,
                    "total": found.total,
                    "fraction": found.fraction,
                    "message": found.message,
                }
        return JobDetail(
            job_id,
            status or JobStatus.UNKNOWN,
            held,
            progress=progress,
            cancel_requested=bool(state and state.cancel_requested),
            **detail,
        )

    def workflow(self, job_id: str) -> Workflow | None:
        """The workflow the job belongs to, if any (see :meth:`Worq.workflow`)."""
        return self.app.workflow(job_id)

    def events(
        self, after: str | None = None, limit: int = 100, timeout: float = 0.0
    ) -> list[Event]:
        """Recent events (:meth:`~worq_core.Broker.read_events`); none without the capability."""
        if Capability.EVENTS not in self.broker.capabilities:
            return []
        return self.broker.read_events(after, limit, timeout)

    def summary(self, entry: ListedJob) -> JobSummary:
        """A listed job with its body decoded (task, arguments, headers), as far as it goes."""
        try:
            envelope = Envelope.decode(entry.body, self.app.serializer)
        except DeserializationError:
            return JobSummary(
                entry.id,
                entry.queue,
                entry.status,
                UNDECODABLE,
                attempts=entry.attempts,
                at=entry.at,
                reason=entry.reason,
            )
        return JobSummary(
            entry.id,
            entry.queue,
            entry.status,
            envelope.task,
            list(envelope.args),
            dict(envelope.kwargs),
            dict(envelope.headers),
            envelope.enqueued_at,
            entry.attempts,
            entry.at,
            entry.reason,
            str(envelope.workflow.get("wf", "")),
        )

    # -- actions -------------------------------------------------------------------------------

    def cancel(self, job_id: str) -> bool:
        """Cancel a job (see :meth:`Worq.cancel`); whether it was still there."""
        return self.app.cancel(job_id)

    def requeue_dead(self, queue: str, job_ids: Sequence[str] | None = None) -> int:
        """Move dead jobs of ``queue`` back (all when ``job_ids`` is ``None``)."""
        self._require(Capability.DEAD_LETTER, "requeueing dead jobs")
        return self.broker.requeue_dead(queue, job_ids)

    def purge_dead(self, queue: str) -> int:
        """Delete every dead job of ``queue``."""
        self._require(Capability.DEAD_LETTER, "purging dead jobs")
        return self.broker.purge_dead(queue)

    # -- internals -----------------------------------------------------------------------------

    def _require(self, capability: Capability, what: str) -> None:
        if capability not in self.broker.capabilities:
            raise UnsupportedError(self.broker.name, capability.value, what)

    @staticmethod
    def _position(cursor: str, names: Sequence[str]) -> tuple[int, int]:
        if not cursor:
            return 0, 0
        try:
            queue, offset = json.loads(base64.urlsafe_b64decode(cursor.encode()))
            index = bisect.bisect_left(names, str(queue))
            if index == len(names) or names[index] != queue:
                return index, 0  # that queue is gone: go on with the next one by name
            return index, max(0, int(offset))
        except (ValueError, TypeError, OverflowError) as exc:  # OverflowError: int(Infinity)
            raise BadCursor(f"not a listing cursor: {cursor!r}") from exc


def show_value(value: Any) -> str:
    """A value as JSON, as an operator reads it, else its ``repr``."""
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        return repr(value)


def show_arguments(args: Sequence[Any], kwargs: dict[str, Any]) -> str:
    """Arguments written as a call's, values as JSON: ``1, "a", flag=true``."""
    parts = [show_value(value) for value in args]
    parts += [f"{key}={show_value(value)}" for key, value in kwargs.items()]
    return ", ".join(parts)


def truncate(text: str, width: int) -> str:
    """``text`` cut to ``width`` characters, the last one an ellipsis when cut."""
    return text if len(text) <= width else text[: width - 1] + "\u2026"


def _cursor(queue: str, offset: int) -> str:
    return base64.urlsafe_b64encode(json.dumps([queue, offset]).encode()).decode()
