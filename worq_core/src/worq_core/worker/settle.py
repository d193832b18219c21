"""The settle path: a run's verdict, its storage record, and its settlement with the broker.

A job's record (result, final error, or cancellation) is saved before the broker hears of it,
so a crash in between means the job runs again, never that a result is lost. A broker that
stores the app's results itself gets the record inside the settlement instead, and writes both
in one atomic step. Settlements go to the broker with the next fetch (one round trip for
both), at once when the fetch loop is blocked waiting for new jobs, and never wait longer
than :data:`SETTLE_DELAY` for a fetch to carry them: the fetch loop then sends them itself.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import TYPE_CHECKING, Any

from worq_core.errors import Reject, Retry, SerializationError, WorqError
from worq_core.job import ErrorInfo, encode_cancelled, encode_failure, encode_success
from worq_core.middleware import Decision
from worq_core.models import Capability, JobStatus, Outcome, Settlement
from worq_core.task import tell_sent
from worq_core.worker.run import Run, RunState

if TYPE_CHECKING:
    from worq_core.worker.core import Worker

log = logging.getLogger("worq.worker")

_CANCELLED = ErrorInfo("worq.JobCancelled", "the job was cancelled")

#: Longest a finished job's settlement waits for a fetch to carry it before the fetch loop sends
#: it by itself. With a broker that stores results, its record is invisible until then.
SETTLE_DELAY = 0.005


def verdict(run: Run, value: Any, error: BaseException | None, info: ErrorInfo | None) -> Decision:
    """What the worker makes of a run that returned ``value`` or raised ``error``.

    A cancelled run ends CANCELLED whatever its code did after the cancellation reached it.
    :class:`~worq_core.errors.Reject`, ``dont_retry_on`` and exceptions outside ``retry_on``
    dead-letter at once; :class:`~worq_core.errors.Retry` picks its own delay. Otherwise a
    failure is retried after the retry policy's backoff while attempts remain.
    """
    if run.cancelled:
        return Decision(JobStatus.CANCELLED, error=_CANCELLED)
    if error is None:
        return Decision(JobStatus.SUCCEEDED, value)
    assert info is not None
    dead = Decision(JobStatus.DEAD, error=info)
    task, attempts = run.task, run.delivery.attempts
    if task is None or isinstance(error, Reject) or attempts > run.max_retries:
        return dead
    config = task.config
    if isinstance(error, Retry):
        delay = error.delay if error.delay is not None else run.retry.delay(attempts)
        return Decision(JobStatus.RETRYING, error=info, delay=delay)
    if (config.dont_retry_on and isinstance(error, config.dont_retry_on)) or (
        config.retry_on and not isinstance(error, config.retry_on)
    ):
        return dead
    return Decision(JobStatus.RETRYING, error=info, delay=run.retry.delay(attempts))


class SettlePath:
    """Decides runs, stores their records and hands their settlements to the broker.

    ``pending`` holds settlements for the next fetch, whichever thread makes it, queued since
    ``since``; ``direct`` is set while the fetch loop is blocked waiting for jobs, so a finishing
    job settles itself instead. All are guarded by the worker's lock.
    """

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        app = worker.app
        self.pending: list[Settlement] = []
        self.since = 0.0
        """When ``pending`` last went from empty to not (monotonic)."""
        self.direct = False
        self.broker_stores_results = app.broker_stores_results
        self.checks_cancel = Capability.CANCEL in app.broker.capabilities
        stack = app.middleware
        self.plain = not stack.decides and not stack.after_settles

    def decide(
        self,
        run: Run,
        *,
        value: Any = None,
        error: BaseException | None = None,
        info: ErrorInfo | None = None,
        dead: ErrorInfo | None = None,
        pull: bool = False,
        abandon: bool = False,
    ) -> bool:
        """Choose the outcome, store the record and settle; at most once per run.

        With ``abandon`` (a timeout) the run is also marked abandoned as it is decided. With
        ``pull`` the caller is the run's slot thread, which looks for its next run right after
        and sends the settlement with that fetch (or leaves it to the fetch loop's deadline).

        Returns whether this call decided (``False``: the watchdog or shutdown came first).
        Never raises: whatever goes wrong, the job is either settled or dropped so that its
        lease runs out and it runs again.
        """
        worker = self.worker
        with worker.lock:
            if run.state is not RunState.TAKEN and run.state is not RunState.RUNNING:
                return False
            run.move(RunState.DECIDED)
            run.abandoned = abandon
        try:
            if error is None and dead is None and self.plain and not run.cancelled:
                # The common case, kept lean: no middleware reads a Decision, so none is made.
                try:
                    result = encode_success(worker.app.serializer, value)
                except SerializationError as exc:
                    dead = ErrorInfo.from_exception(exc)
                else:
                    worker.count("succeeded")
                    if self.broker_stores_results:
                        ttl = worker.app.result_ttl
                        settlement = Settlement(run.delivery, Outcome.ACK, record=result, ttl=ttl)
                    else:
                        settlement = Settlement(run.delivery, Outcome.ACK)
                    self._send(run, settlement, result, pull, value, succeeded=True)
                    return True
            decision = (
                Decision(JobStatus.DEAD, error=dead)
                if dead is not None
                else verdict(run, value, error, info)
            )
            # A retry needs no check: the broker keeps a cancel request across it, so the next
            # delivery ends the job. Dead-lettering would drop the request, so ask first.
            if decision.status is JobStatus.DEAD and self.checks_cancel and not run.cancelled:
                decision = self._cancelled_meanwhile(run, decision)
            stack = worker.app.middleware
            if stack.decides and run.context is not None:
                try:
                    decision = stack.decide(run.context, decision)
                except Exception:
                    log.exception(
                        "job %s: a middleware's decide failed; the worker's verdict stands",
                        run.delivery.id,
                    )
            settlement, record = self._settlement(run, decision)
            succeeded = run.decision is not None and run.decision.status is JobStatus.SUCCEEDED
            value = run.decision.value if succeeded and run.decision is not None else None
            self._send(run, settlement, record, pull, value, succeeded=succeeded)
        except Exception:
            log.exception("job %s: settling failed; its lease will run out", run.delivery.id)
            with worker.lock:
                state: RunState = run.state  # moved on since the check above
            if (
                state is RunState.DECIDED
            ):  # once sent, the broker's answer (or the lease) settles it
                self.drop(run)
        return True

    def _cancelled_meanwhile(self, run: Run, decision: Decision) -> Decision:
        """A run about to be dead-lettered asks whether it was cancelled since its last renewal.

        One round trip, on that path only: a cancelled job must not be dead-lettered just
        because it failed before its worker heard of the cancellation.
        """
        try:
            state = self.worker.app.broker.job_state(run.delivery.id)
        except Exception as exc:  # noqa: BLE001 - the verdict stands; the settle will tell
            log.warning("job %s: cannot check for a cancellation: %s", run.delivery.id, exc)
            return decision
        if state is not None and state.cancel_requested:
            if run.context is not None:
                run.context._cancel()
            return Decision(JobStatus.CANCELLED, error=_CANCELLED)
        return decision

    def _settlement(self, run: Run, decision: Decision) -> tuple[Settlement, bytes | None]:
        """The settlement (and storage record) of a decision; logs and counts it."""
        delivery, worker = run.delivery, self.worker
        serializer = worker.app.serializer
        status = decision.status
        if status is JobStatus.SUCCEEDED:
            try:
                record = encode_success(serializer, decision.value)
            except SerializationError as exc:
                decision = Decision(JobStatus.DEAD, error=ErrorInfo.from_exception(exc))
            else:
                run.decision = decision
                worker.count("succeeded")
                return Settlement(delivery, Outcome.ACK), record
        run.decision = decision
        error = decision.error or ErrorInfo("worq.Error", "")
        if decision.status is JobStatus.RETRYING:
            worker.job_log(
                logging.WARNING,
                run,
                "attempt %d failed (%s); retrying in %.2fs",
                delivery.attempts,
                error.summary(),
                decision.delay,
            )
            worker.count("retried")
            return Settlement(delivery, Outcome.RETRY, decision.delay, error.summary()), None
        if decision.status is JobStatus.CANCELLED:
            worker.job_log(logging.INFO, run, "cancelled")
            worker.count("cancelled")
            return Settlement(delivery, Outcome.ACK), encode_cancelled(serializer)
        worker.job_log(
            logging.ERROR,
            run,
            "attempt %d failed (%s); dead-lettered",
            delivery.attempts,
            error.summary(),
        )
        worker.count("dead")
        return (
            Settlement(delivery, Outcome.DEAD, 0.0, error.summary()),
            encode_failure(serializer, error),
        )

    def drop(self, run: Run) -> None:
        """Give up on settling a run: forget it so its lease runs out and it runs again."""
        worker = self.worker
        with worker.lock:
            run.move(RunState.DROPPED)
            worker.held.pop(run.delivery.token, None)
            worker.lock.notify_all()
        worker.let_leases_lapse()  # a keeper renewing by worker must let this one run out

    def _send(
        self,
        run: Run,
        settlement: Settlement,
        record: bytes | None,
        pull: bool,
        value: Any = None,
        *,
        succeeded: bool = False,
    ) -> None:
        """Store the record, then settle with the next fetch.

        A workflow step's settlement carries its links (:func:`worq_core.canvas.links`): the
        next steps' messages when it ``succeeded`` with ``value``, and its record as its output
        in its group.

        The settlement goes with the next fetch, or right here if the fetch loop is blocked
        waiting for new jobs. Without ``pull`` the fetch loop is told, so that it sends the
        settlement itself should no fetch carry it within :data:`SETTLE_DELAY`.
        """
        worker = self.worker
        app = worker.app
        job_id = settlement.delivery.id
        if run.envelope is not None and run.envelope.workflow:
            from worq_core.canvas import links  # imported by the first workflow step

            settlement = links(app, run.envelope, settlement, record, value, succeeded=succeeded)
        if run.lost:
            # Another run owns the job now: its result, not ours, belongs in the storage.
            worker.job_log(
                logging.WARNING, run, "its lease was lost; the result of this run is discarded"
            )
            self.drop(run)
            return
        if record is not None and self.broker_stores_results:
            if settlement.record is not record:  # the fast path of decide built it with it
                settlement = dataclasses.replace(settlement, record=record, ttl=app.result_ttl)
        elif record is not None:
            try:
                app.storage.save({job_id: record}, app.result_ttl)
            except Exception as exc:  # a plugin's own exception type too: the job must not hang
                # Not settling lets the lease run out, so the job runs again: at-least-once.
                log.error(
                    "job %s: storing its result failed, it will run again: %s",
                    job_id,
                    exc,
                    exc_info=not isinstance(exc, WorqError),
                )
                self.drop(run)
                return
        with worker.lock:
            run.move(RunState.SENT)
            direct = self.direct
            if not direct:
                if not self.pending:
                    self.since = time.monotonic()
                self.pending.append(settlement)
                if not pull:
                    worker.nudge(self.since + SETTLE_DELAY)
        if direct:
            try:
                applied = app.broker.settle([settlement])
            except Exception as exc:  # a plugin's own exception type too
                log.warning(
                    "job %s: settling failed, the fetch loop will retry: %s",
                    job_id,
                    exc,
                    exc_info=not isinstance(exc, WorqError),
                )
                self.retry_later([settlement])
                return
            self.settled([settlement], applied)

    def retry_later(self, settlements: list[Settlement]) -> None:
        """Queue settlements again for the fetch loop (settling twice is refused, not doubled)."""
        worker = self.worker
        with worker.lock:
            if not self.pending:
                self.since = time.monotonic()
            self.pending[:0] = settlements
            worker.nudge(self.since + SETTLE_DELAY)

    def settled(self, settlements: list[Settlement], applied: list[bool]) -> None:
        """The broker answered: forget the runs, and tell middleware of applied verdicts."""
        worker = self.worker
        done: list[Run] = []
        with worker.lock:
            for settlement, ok in zip(settlements, applied, strict=True):
                run = worker.held.pop(settlement.delivery.token, None)
                if run is not None and run.state is RunState.SENT:
                    run.move(RunState.DONE)
                if not ok:
                    worker.counters.refused += 1
                    log.warning(
                        "job %s %s: the broker refused its %s: its lease had expired and it "
                        "may run again",
                        settlement.delivery.id,
                        run.task_name if run is not None else "?",
                        settlement.outcome.value,
                    )
                elif run is not None:
                    done.append(run)
            if not worker.held and worker.settings.max_jobs is not None:
                worker.lock.notify_all()  # a worker at its job limit retires once it holds none
        hooks = worker.app.middleware.after_settles
        if hooks:
            for run in done:
                if run.context is None or run.decision is None:
                    continue
                for hook in hooks:
                    try:
                        hook(run.context, run.decision)
                    except Exception:
                        log.exception("middleware after_settle failed for job %s", run.delivery.id)
        # Workflow steps the applied settlements sent: told after the verdicts that sent them.
        if worker.app.middleware.after_enqueues:
            sent = [m for s, ok in zip(settlements, applied, strict=True) if ok for m in s.then]
            tell_sent(worker.app, sent)
