"""Lease renewal from a separate process, where a task holding the GIL cannot starve it.

A thread heartbeat stops whenever a task runs long C code that never releases the GIL (a big
regex, a tight numeric loop in an extension): the leases of everything the worker holds then
expire and the jobs run a second time elsewhere. The :class:`LeaseKeeper` process has its own
interpreter and its own broker connection, so it keeps renewing.

With a broker that declares :attr:`~worq_core.Capability.WORKER_LEASES` the keeper renews *by
worker*: the worker fetches under its id, the broker keeps a record of the worker's leases
(fetches add to it, settling, releasing and expiry take from it), and the keeper renews the
whole record with one :meth:`~worq_core.Broker.extend_worker` call, so it needs nothing from the
worker per job, and a job that holds the GIL from its first instruction is renewed all the
same. With any other broker the worker hands the keeper every new set of leases before their
jobs start (the keeper renews them with :meth:`~worq_core.Broker.extend`).

Either way the worker tells it, at every heartbeat, the leases it holds and the progress of
their jobs; the keeper answers with the leases the broker no longer grants (lost) or wants
cancelled, so the worker never writes a stale run's result and learns of cancellations. By
worker, the leases it was told of that the record does not hold (fetched under an earlier owner
id, or lost) are extended one by one, so a lost one is answered as lost. A fetch that fails may
have leased jobs whose answer never reached the worker: the worker then fetches under a new
owner id, and those leases, which it never tells of, run out as they would without a keeper.
Fencing makes the loose coupling safe: renewing a job the worker has meanwhile settled is
simply refused by the broker. If the worker process dies, even by SIGKILL, the pipe closes,
the keeper exits at once, and the leases run out as they should. If the worker stops making
progress without dying (SIGSTOP, a deadlock: no heartbeat and no CPU time used), the keeper
stops renewing, so its jobs go to other workers after one lease.

Renewing by worker, the keeper starts with the worker's first jobs, before they start, and the
worker does not wait for it (its own thread renews until the keeper is ready): a worker that
gets no job never starts one, and starting a worker costs no more than starting the process.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from worq_core.models import Delivery, LeaseState

if TYPE_CHECKING:
    import multiprocessing.connection

    from worq_core.broker import Broker

log = logging.getLogger("worq.lease_keeper")

_Held = list[tuple[str, str, str, int]]  # (job id, queue, token, attempts)

#: What the keeper reports, in place of a :class:`LeaseState`, for a lease recorded under the
#: worker's owner id that the worker does not hold: the worker then fetches under a new id.
UNHELD = "unheld"


#: How long the keeper may take to say it is ready before the worker gives up on it.
START_TIMEOUT = 30.0


class LeaseKeeper:
    """A child process that extends the leases of a worker.

    ``broker_factory`` is a picklable callable that builds the app's broker in the child, the
    same way the app builds it (``worq worker`` passes the broker's
    :meth:`~worq_core.Broker.recipe`, or one that imports the app when it has none). With
    ``worker`` (the id the worker fetches under, for a broker with
    :attr:`~worq_core.Capability.WORKER_LEASES`) it renews every lease of that worker in
    ``queues``; without, the leases :meth:`hold` hands it.

    The process starts at once and the constructor does not wait for it: :meth:`ready` tells
    when it renews.
    """

    def __init__(
        self,
        broker_factory: Callable[[], Broker],
        lease: float,
        interval: float,
        worker: str | None = None,
        queues: Sequence[str] = (),
    ) -> None:
        import multiprocessing  # here: a worker whose broker cannot be shared never needs it

        context = multiprocessing.get_context("spawn")  # never fork a threaded worker
        self.worker = worker
        self._conn, child_end = context.Pipe()
        self._process = context.Process(
            target=_serve,
            args=(
                child_end,
                broker_factory,
                _Renewal(lease, interval, worker, tuple(queues)),
                os.getpid(),
                log.getEffectiveLevel(),
            ),
            name="worq-lease-keeper",
            daemon=True,
        )
        self._process.start()
        child_end.close()
        self._started = time.monotonic()
        self._ready = False
        self._failure: str | None = None
        self._unheld = 0
        self._reading = threading.Lock()  # the fetch loop and the service thread both read

    @property
    def by_worker(self) -> bool:
        """Whether it renews by worker (it needs not hear of each new lease)."""
        return self.worker is not None

    def ready(self, timeout: float = 0.0) -> bool:
        """Whether the keeper renews yet, waiting up to ``timeout`` seconds for it.

        Raises :class:`RuntimeError` if it failed to start (its broker could not be built, it
        died, or it said nothing for :data:`START_TIMEOUT` seconds).
        """
        with self._reading:
            if self._ready:
                return True
            if self._failure is None:
                try:
                    reply = self._conn.recv() if self._conn.poll(timeout) else None
                except (OSError, EOFError):
                    reply = "it exited"
                self._ready = reply == "ready"
                if self._ready:
                    return True
                if reply is None and time.monotonic() - self._started > START_TIMEOUT:
                    reply = f"no answer within {START_TIMEOUT:g}s"
                self._failure = reply
        if self._failure is None:
            return False
        raise RuntimeError(f"the lease keeper process did not start: {self._failure}")

    def hold(
        self,
        deliveries: Sequence[Delivery],
        progress: Mapping[str, bytes],
        owner: str | None = None,
    ) -> dict[str, LeaseState] | None:
        """Tell the keeper the leases held now; returns what the keeper reported since.

        By worker, ``owner`` is the id the worker fetches under now (it changes when a fetch
        fails, see :class:`~worq_core.worker.Worker`): the keeper renews what the broker
        recorded for it, and these leases one by one when they are not in that record (fetched
        under an earlier id). Otherwise this replaces the set of leases it renews. The report
        maps lease tokens to :attr:`LeaseState.LOST` or :attr:`LeaseState.CANCELLING`. ``None``
        if the keeper is gone, so the caller renews the leases itself. Only once :meth:`ready`.
        """
        held: _Held = [(d.id, d.queue, d.token, d.attempts) for d in deliveries]
        states: dict[str, LeaseState] = {}
        try:
            with self._reading:
                message = (held, dict(progress), owner or self.worker, time.monotonic())
                self._conn.send(message)
                while self._conn.poll(0):
                    report = self._conn.recv()
                    for token, state in report.items():
                        if state == UNHELD:
                            self._unheld += 1
                        else:
                            states[token] = LeaseState(state)
        except (OSError, EOFError):
            return None
        return states if self._process.is_alive() else None

    def unheld(self) -> int:
        """How many unheld leases the keeper reported since the last call (see :data:`UNHELD`).

        Leases recorded under the worker's owner id that the worker does not hold.
        """
        with self._reading:
            found, self._unheld = self._unheld, 0
        return found

    def is_alive(self) -> bool:
        """Whether the keeper process still runs."""
        return self._process.is_alive()

    def close(self) -> None:
        """Stop the keeper and wait for it (briefly).

        One that never said it was ready is killed: it renews nothing the worker counts on, and
        a short-lived worker need not wait for it to finish starting.
        """
        if not self._ready:
            self._process.kill()
        with contextlib.suppress(OSError):
            self._conn.send(None)
        self._process.join(5)
        if self._process.is_alive():
            self._process.terminate()
            self._process.join(5)
        self._conn.close()


@dataclass(frozen=True, slots=True)
class _Renewal:
    """What the keeper renews, and how: handed to the child process."""

    lease: float
    interval: float
    worker: str | None
    queues: tuple[str, ...]


def cpu_time(pid: int) -> tuple[bool, float] | None:
    """Whether process ``pid`` is stopped, and the CPU seconds it has used; ``None`` if unknown.

    Reads ``/proc`` (Linux); elsewhere the keeper relies on the worker's heartbeats alone.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            fields = stat.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    ticks = os.sysconf("SC_CLK_TCK")
    return fields[0] in (b"T", b"t"), (int(fields[11]) + int(fields[12])) / ticks


class _Liveness:
    """Tells a worker that is merely busy (a task holding the GIL) from one that is frozen."""

    def __init__(self, pid: int, silence: float) -> None:
        self.pid = pid
        self.silence = silence
        self.heard = time.monotonic()
        self.cpu = cpu_time(pid)
        self.frozen = False

    def heard_from(self) -> None:
        if self.frozen:
            log.warning("the worker (pid %d) answers again; renewing its leases", self.pid)
        self.heard = time.monotonic()
        self.cpu = cpu_time(self.pid)  # the baseline for the next silence
        self.frozen = False

    def making_progress(self) -> bool:
        """Whether to keep renewing: the worker spoke lately, or is running and using CPU."""
        if time.monotonic() - self.heard <= self.silence:
            return True
        before, self.cpu = self.cpu, cpu_time(self.pid)
        busy = (
            self.cpu is not None
            and before is not None
            and not self.cpu[0]
            and self.cpu[1] > before[1]
        )
        if not busy and not self.frozen:
            self.frozen = True
            log.error(
                "the worker (pid %d) has been silent for %.0fs and is %s: no longer renewing "
                "its leases, so its jobs go to other workers",
                self.pid,
                time.monotonic() - self.heard,
                "stopped" if self.cpu is not None and self.cpu[0] else "not using any CPU",
            )
        return busy


def _serve(
    conn: multiprocessing.connection.Connection,
    broker_factory: Callable[[], Broker],
    renewal: _Renewal,
    worker_pid: int,
    log_level: int,
) -> None:
    """The keeper's main loop; runs in the child process."""
    # The worker decides when the keeper stops (it closes the pipe, or dies): a SIGTERM sent to
    # the whole process group must not take the keeper down while the worker finishes its jobs.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    try:
        broker = broker_factory()
    except Exception as exc:  # noqa: BLE001 - reported to the worker, which renews by thread
        with contextlib.suppress(OSError):
            conn.send(f"{type(exc).__name__}: {exc}")
        return
    try:
        conn.send("ready")
    except OSError:  # the worker died (SIGKILL) while this started: nothing left to renew
        broker.close()
        return
    interval, owner = renewal.interval, renewal.worker
    held: list[Delivery] = []
    progress: dict[str, bytes] = {}
    told_at = -math.inf  # when the worker took the snapshot of ``held`` (monotonic)
    first_seen: dict[str, float] = {}  # when each lease of the owner's record was first renewed
    liveness = _Liveness(worker_pid, silence=2 * interval + 1.0)
    # By worker, renew at once: the worker may hold leases already (taken while this started).
    next_beat = time.monotonic() + (0.0 if owner is not None else interval)
    renewed_at = time.monotonic()
    try:
        while True:
            if conn.poll(max(0.0, next_beat - time.monotonic())):
                try:
                    message: tuple[_Held, dict[str, bytes], str | None, float] | None = conn.recv()
                except EOFError:
                    return  # the worker is gone: let its leases expire
                if message is None:
                    return
                liveness.heard_from()
                held = [Delivery(i, q, b"", t, a) for i, q, t, a in message[0]]
                progress.update(message[1])
                owner, told_at = message[2], message[3]
                if not message[1]:
                    continue  # a fresh lease runs a whole lease: the next beat renews it
                # Progress to publish: renew now rather than at the next beat.
            next_beat = time.monotonic() + interval
            if (not held and owner is None) or not liveness.making_progress():
                renewed_at = time.monotonic()
                continue
            try:
                report = _renew(broker, renewal, owner, held, progress, first_seen, told_at)
            except Exception as exc:  # noqa: BLE001 - keep renewing through outages
                silent = time.monotonic() - renewed_at
                level = logging.ERROR if silent > renewal.lease else logging.WARNING
                log.log(level, "renewing leases failed (%.0fs): %s", silent, exc)
                continue
            renewed_at = time.monotonic()
            progress.clear()
            if report:
                try:
                    conn.send(report)
                except OSError:
                    return  # the worker is gone: let its leases expire
                held = [d for d in held if report.get(d.token) != LeaseState.LOST.value]
    finally:
        broker.close()


def _renew(
    broker: Broker,
    renewal: _Renewal,
    owner: str | None,
    held: list[Delivery],
    progress: Mapping[str, bytes],
    first_seen: dict[str, float],
    told_at: float,
) -> dict[str, str]:
    """Renew once; the leases that are not simply held: token to state value, or :data:`UNHELD`.

    By worker: every lease the broker recorded for ``owner`` in one call, then the leases the
    worker told of that were not among them one by one (fetched under an earlier owner id; or
    settled or lost since the worker spoke, which this answers as lost: the worker ignores the
    settled ones). A recorded lease the worker did not tell of, though it took the snapshot it
    told at ``told_at`` a beat or more after this keeper first renewed that lease, is one the
    worker does not hold: a fetch whose answer never reached it (a connection cut after the
    script ran, a client that sent the script again), a run it gave up on. It is reported
    :data:`UNHELD`, so that the worker fetches under a new owner id and it runs out, as it would
    without the keeper. ``first_seen`` keeps, across calls, when each recorded lease was first
    renewed.
    """
    if owner is None:
        states = broker.extend(held, renewal.lease, progress)
        return {
            d.token: state.value
            for d, state in zip(held, states, strict=True)
            if state is not LeaseState.HELD
        }
    renewed = broker.extend_worker(owner, renewal.queues, renewal.lease, progress)
    now = time.monotonic()
    seen = {token: first_seen.get(token, now) for token in renewed}
    first_seen.clear()
    first_seen.update(seen)
    told = {d.token for d in held}
    report = {
        token: state.value for token, state in renewed.items() if state is not LeaseState.HELD
    }
    report.update(
        (token, UNHELD)
        for token, seen_at in seen.items()
        if token not in told and seen_at + renewal.interval <= told_at
    )
    rest = [d for d in held if d.token not in renewed]
    if rest:
        states = broker.extend(rest, renewal.lease, progress)
        report.update(
            (d.token, state.value)
            for d, state in zip(rest, states, strict=True)
            if state is not LeaseState.HELD
        )
    return report
