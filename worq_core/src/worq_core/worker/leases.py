"""Lease renewal: one service, renewing either from a thread or through the lease keeper.

Every heartbeat the service hands the leases the worker holds (with the progress of their jobs)
to a :class:`Renewer`, and applies what comes back: a lost lease marks its run ``lost`` (its
result must not overwrite the run that now owns the job), a cancelled one tells the run. A
keeper renewing by worker (:attr:`~worq_core.Capability.WORKER_LEASES`) renews what the broker
recorded for the worker whatever it is told; others must also be told of each new lease before
its job starts (:meth:`LeaseService.jobs_fetched`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Protocol, TypedDict

from typing_extensions import override

from worq_core.errors import WorqError
from worq_core.lease_keeper import LeaseKeeper
from worq_core.models import Delivery, LeaseState
from worq_core.worker.run import HOLDING, Run
from worq_core.worker.services import Service

if TYPE_CHECKING:
    from worq_core.broker import Broker
    from worq_core.worker.core import Worker

log = logging.getLogger("worq.worker")

#: Shortest time between two renewals brought forward to publish progress.
PROGRESS_INTERVAL = 1.0


class FetchAs(TypedDict, total=False):
    """Keywords a worker's fetches pass the broker: its id, for a keeper renewing by worker.

    Empty for a broker without :attr:`~worq_core.Capability.WORKER_LEASES` (whose ``fetch``
    may not take ``worker``).
    """

    worker: str


class Renewer(Protocol):
    """Renews leases; returns the tokens whose lease is not simply held any more.

    ``None`` means the renewer can no longer work (the keeper process is gone).
    """

    def renew(
        self, deliveries: Sequence[Delivery], progress: Mapping[str, bytes]
    ) -> dict[str, LeaseState] | None:
        """Renew these leases, publishing ``progress`` (job id to encoded progress)."""

    def close(self) -> None:
        """Release what the renewer holds (the keeper process)."""


class ThreadRenewer:
    """Renews with the worker's own broker, on the service thread."""

    def __init__(self, broker: Broker, lease: float) -> None:
        self.broker = broker
        self.lease = lease

    def renew(
        self, deliveries: Sequence[Delivery], progress: Mapping[str, bytes]
    ) -> dict[str, LeaseState] | None:
        """One :meth:`Broker.extend` call for every lease."""
        if not deliveries:
            return {}
        states = self.broker.extend(deliveries, self.lease, progress or None)
        return {
            d.token: state
            for d, state in zip(deliveries, states, strict=True)
            if state is not LeaseState.HELD
        }

    def close(self) -> None:
        """Nothing to release."""


class KeeperRenewer:
    """Renews through the :class:`LeaseKeeper` process, and from a thread until it is ready.

    The keeper is started by :meth:`start`: by worker, when the worker's first jobs are fetched,
    before they start; otherwise at once, and waited for, when the worker starts. Until it says
    it is ready, ``thread`` renews, so there is no moment when a fetched job is renewed by
    nobody. A keeper that fails to start makes :meth:`renew` answer ``None``, and the service
    renews by thread from then on.
    """

    def __init__(
        self,
        start_keeper: Callable[[], LeaseKeeper],
        thread: ThreadRenewer,
        owner: Callable[[], str | None],
        new_owner: Callable[[], str | None] = lambda: None,
        *,
        by_worker: bool,
    ) -> None:
        self._start_keeper = start_keeper
        self.keeper: LeaseKeeper | None = None
        """The keeper process, once :meth:`start` started it."""
        self.thread = thread
        self.owner = owner
        """The id the worker fetches under now (by worker), told to the keeper each time."""
        self.new_owner = new_owner
        """Makes the worker fetch under a new owner id; returns it (by worker)."""
        self.by_worker = by_worker
        """Whether the keeper renews by worker (it needs not hear of each new lease)."""
        self.started = False
        self._ready = False
        self._failed = False
        self._checking = threading.Lock()  # the fetch loop and the service thread both ask

    def start(self) -> None:
        """Start the keeper process, once; it renews from when it is ready (see :meth:`ready`)."""
        with self._checking:
            if self.started:
                return
            self.started = True
            try:
                self.keeper = self._start_keeper()
            except Exception as exc:  # noqa: BLE001 - the thread still renews leases
                log.warning("leases renewed by a thread: the lease keeper failed to start: %s", exc)
                self._failed = True

    @property
    def hands_off(self) -> bool:
        """Whether each new set of leases must reach the keeper before its jobs start.

        Only a keeper that renews the leases it is told of (a broker without
        :attr:`~worq_core.Capability.WORKER_LEASES`), once it is ready.
        """
        return not self.by_worker and self._is_ready()

    @property
    def ready(self) -> bool:
        """Whether the keeper renews (and this renewer sends it the leases)."""
        return self._is_ready()

    def renew(
        self, deliveries: Sequence[Delivery], progress: Mapping[str, bytes]
    ) -> dict[str, LeaseState] | None:
        """Send the leases to the keeper (from a thread until it is ready); what it reported."""
        keeper = self.keeper
        if keeper is None or not self._is_ready():
            return None if self._failed else self.thread.renew(deliveries, progress)
        states = keeper.hold(deliveries, progress, self.owner())
        unheld = keeper.unheld() if states is not None else 0
        if states is not None and unheld and (owner := self.new_owner()) is not None:
            # Leases recorded under our owner id that we do not hold: fetch under a new one and
            # tell the keeper at once, which then renews only the leases we hold of the old.
            log.info(
                "%d leases of this worker's are not its own (a fetch whose answer was lost, a "
                "run given up on): left to run out",
                unheld,
            )
            more = keeper.hold(deliveries, {}, owner)
            states = None if more is None else states | more
        if states is None:
            log.error("the lease keeper process is gone; renewing leases from a thread")
        return states

    def _is_ready(self) -> bool:
        with self._checking:
            if self._ready or self._failed or self.keeper is None:
                return self._ready
            try:
                self._ready = self.keeper.ready()
            except RuntimeError as exc:
                log.warning("leases renewed by a thread: %s", exc)
                self._failed = True
                return False
            if self._ready:
                how = "by worker" if self.by_worker else "told of each new lease"
                log.info("leases renewed by a separate process (%s)", how)
            return self._ready

    def close(self) -> None:
        """Stop the keeper process, if it was started."""
        with self._checking:
            self.started = True  # none starts after this
            keeper = self.keeper
        if keeper is not None:
            keeper.close()


class LeaseService(Service):
    """Renews every held lease each heartbeat, and sooner when there is progress to publish."""

    name = "leases"

    def __init__(self, worker: Worker, renewer: Renewer) -> None:
        self.worker = worker
        self.renewer = renewer
        self.interval = self.retry_after = worker.settings.heartbeat_interval
        self.renewed_at = time.monotonic()
        self.last_tick = 0.0
        self._lock = threading.Lock()

    @override
    def start(self, now: float) -> float | None:
        self.renewed_at = now
        return now + self.interval

    @override
    def tick(self, now: float) -> float | None:
        self.last_tick = now
        self.renew()
        return time.monotonic() + self.interval

    def soon(self) -> None:
        """Publish progress with a renewal soon, at most once per :data:`PROGRESS_INTERVAL`."""
        runner = self.worker.services
        if runner is not None:
            runner.wake(self, max(time.monotonic(), self.last_tick + PROGRESS_INTERVAL))

    def jobs_fetched(self) -> None:
        """New jobs are about to start: called after each fetch that took some, before they run.

        The lease keeper starts with the first ones, so a worker that never gets a job never
        starts one (nor pays for it at start-up). A keeper that renews only the leases it is
        told of hears of these now: one holding the GIL from its start would starve the service
        thread before it passed them on.
        """
        renewer = self.renewer
        if isinstance(renewer, KeeperRenewer):
            if not renewer.started and not self.worker.stopping:  # else they go straight back
                renewer.start()
            if renewer.hands_off:
                self.renew()

    def owner_changed(self) -> None:
        """The worker fetches under a new owner id: a keeper renewing by worker hears it now.

        Before the worker fetches again, so that the keeper renews the new id's record even if
        a job of it holds the GIL from its first instruction.
        """
        renewer = self.renewer
        if isinstance(renewer, KeeperRenewer) and renewer.by_worker and renewer.ready:
            self.renew()

    def renew(self) -> None:
        """Renew now (also called by the fetch loop before new jobs start, for the keeper)."""
        with self._lock:  # the service thread and the fetch loop may both renew
            self._renew()

    def _renew(self) -> None:
        worker = self.worker
        serializer = worker.app.serializer
        with worker.lock:
            held = [r for r in worker.held.values() if r.state in HOLDING]
        progress: dict[str, bytes] = {}
        reports = []
        for run in held:
            report = run.context.last_progress if run.context is not None else None
            if report is not None and report is not run.progress_sent:
                reports.append((run, report))
                try:
                    progress[run.delivery.id] = serializer.dumps(report.to_data())
                except WorqError as exc:
                    log.warning("job %s: its progress cannot be encoded: %s", run.delivery.id, exc)
        try:
            states = self.renewer.renew([r.delivery for r in held], progress)
        except WorqError as exc:
            self._failed(held, exc)
            return
        for run, report in reports:
            run.progress_sent = report
        if states is None:  # the renewer said why
            self.renewer.close()
            self.renewer = ThreadRenewer(worker.app.broker, worker.settings.lease)
            self._renew()
            return
        self.renewed_at = time.monotonic()
        if states:
            self._apply(held, states)

    def _failed(self, held: list[Run], exc: WorqError) -> None:
        silent = time.monotonic() - self.renewed_at
        lease = self.worker.settings.lease
        if silent <= lease:
            log.warning("heartbeat failed, %d leases not renewed: %s", len(held), exc)
            return
        log.error(
            "heartbeats have failed for %.0fs, longer than the %gs lease: the %d jobs held are "
            "presumed lost and may run again elsewhere: %s",
            silent,
            lease,
            len(held),
            exc,
        )
        self._apply(held, {r.delivery.token: LeaseState.LOST for r in held})

    def _apply(self, held: list[Run], states: Mapping[str, LeaseState]) -> None:
        worker = self.worker
        for run in held:
            state = states.get(run.delivery.token)
            if state is LeaseState.LOST and not run.lost:
                run.lost = True
                worker.job_log(
                    logging.WARNING,
                    run,
                    "lease lost (it expired before its heartbeat); the job may run twice",
                )
            elif state is LeaseState.CANCELLING:
                worker.cancel_run(run)

    @override
    def stop(self) -> None:
        # Not while a late renewal (a slot thread's) talks to the keeper, but never waiting long
        # for one stuck on a keeper that stopped reading.
        locked = self._lock.acquire(timeout=5.0)
        try:
            self.renewer.close()
        finally:
            if locked:
                self._lock.release()
