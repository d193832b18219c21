"""The process supervisor behind ``worq worker --processes N``.

It starts N worker processes (each a ``worq worker ... --processes 1`` of its own), replaces one
that dies or retires, forwards SIGTERM/SIGINT, and exits non-zero only when it cannot keep
workers alive. Children run in their own process group, so a Ctrl-C in a terminal reaches them
once, through the supervisor, instead of twice (which would mean "stop at once").
"""

from __future__ import annotations

import contextlib
import logging
import signal
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from worq_core.signals import on_stop_signals

log = logging.getLogger("worq.supervisor")

#: Exit code of a worker that retired (max jobs, memory limit, stuck task) and wants a successor.
REPLACE_ME = 75


@dataclass
class _Slot:
    index: int
    process: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    restart_at: float = 0.0
    finished: bool = False
    crashes: deque[tuple[float, bool]] = field(default_factory=deque)


class Supervisor:
    """Keeps ``processes`` copies of ``command`` running until told to stop.

    A child that exits with :data:`REPLACE_ME` is replaced at once; one that crashes (any other
    non-zero code, or a signal) is replaced after a short backoff; one that exits 0 (a burst
    worker that ran out of jobs) is not replaced. A slot whose workers cannot be kept alive
    makes the supervisor stop the others and return 1: more than ``max_crashes`` failures
    (exits with an error code, as when the app fails to import or start) within
    ``crash_window`` seconds, or six times as many deaths of any kind. Deaths by a signal
    (SIGKILL from the OOM killer, a task that segfaults) are restarted after a short pause:
    the worker did start, and the poison job ends in the dead-letter queue by its attempts.

    Children get ``env`` (default: this process's environment); ``on_exit`` is told the pid of
    each child that exited, once, after it was reaped (metrics drop its live gauges).
    """

    def __init__(
        self,
        command: Sequence[str],
        processes: int,
        *,
        grace: float = 30.0,
        max_crashes: int = 5,
        crash_window: float = 60.0,
        env: Mapping[str, str] | None = None,
        on_exit: Callable[[int], None] | None = None,
    ) -> None:
        if processes < 1:
            raise ValueError("processes must be at least 1")
        self.command = list(command)
        self.grace = grace
        self.max_crashes = max_crashes
        self.crash_window = crash_window
        self.env = None if env is None else dict(env)
        self.on_exit = on_exit
        self.slots = [_Slot(i) for i in range(processes)]
        self.restarts = 0
        self._signals = 0
        self._wake = threading.Event()

    # -- public --------------------------------------------------------------------------------

    def run(self) -> int:
        """Supervise until every child is finished; returns the exit code for the command."""
        with on_stop_signals(self.stop, log):
            for slot in self.slots:
                self._start(slot)
            code = self._watch()
            self._stop_all()
        log.info("supervisor exiting with code %d (%d restarts)", code, self.restarts)
        return code

    def stop(self) -> None:
        """Forward a stop to every child: graceful the first time, immediate the second."""
        self._signals += 1
        log.info(
            "supervisor: %s stop, forwarding SIGTERM to %d workers",
            "graceful" if self._signals == 1 else "immediate",
            sum(1 for s in self.slots if self._alive(s)),
        )
        for slot in self.slots:
            if self._alive(slot):
                assert slot.process is not None
                with contextlib.suppress(ProcessLookupError):
                    slot.process.send_signal(signal.SIGTERM)
        self._wake.set()

    def pids(self) -> list[int]:
        """Process ids of the running children."""
        return [s.process.pid for s in self.slots if s.process is not None and self._alive(s)]

    # -- internals -----------------------------------------------------------------------------

    @staticmethod
    def _alive(slot: _Slot) -> bool:
        return slot.process is not None and slot.process.poll() is None

    def _start(self, slot: _Slot) -> None:
        slot.process = subprocess.Popen(self.command, process_group=0, env=self.env)
        slot.started = time.monotonic()
        log.info("supervisor: worker %d started, pid %d", slot.index, slot.process.pid)
        if self._signals:  # a stop arrived while it was being spawned
            with contextlib.suppress(ProcessLookupError):
                slot.process.send_signal(signal.SIGTERM)

    def _watch(self) -> int:
        stop_deadline: float | None = None
        while True:
            now = time.monotonic()
            if self._signals and stop_deadline is None:
                stop_deadline = now + self.grace + 5
            for slot in self.slots:
                if slot.finished:
                    continue
                if slot.process is None:  # waiting out a crash backoff
                    if self._signals:
                        slot.finished = True
                    elif now >= slot.restart_at:
                        self.restarts += 1
                        self._start(slot)
                    continue
                code = slot.process.poll()
                if code is None:
                    if stop_deadline is not None and now > stop_deadline:
                        log.warning(
                            "supervisor: worker pid %d outlived the grace period; killing it",
                            slot.process.pid,
                        )
                        slot.process.kill()
                    continue
                self._exited(slot.process.pid)
                if self._signals or code == 0:
                    slot.finished = True
                    log.info(
                        "supervisor: worker %d (pid %d) exited with %d",
                        slot.index,
                        slot.process.pid,
                        code,
                    )
                elif code == REPLACE_ME:
                    log.info(
                        "supervisor: worker %d (pid %d) retired; starting a successor",
                        slot.index,
                        slot.process.pid,
                    )
                    self.restarts += 1
                    self._start(slot)
                elif not self._crashed(slot, code, now):
                    return 1
            if all(slot.finished for slot in self.slots):
                return 0
            self._wake.wait(0.1)
            self._wake.clear()

    def _exited(self, pid: int) -> None:
        if self.on_exit is None:
            return
        try:
            self.on_exit(pid)
        except Exception:
            log.exception("supervisor: the exit hook failed for pid %d", pid)

    def _crashed(self, slot: _Slot, code: int, now: float) -> bool:
        """Schedule a restart; returns False when the slot crashes too often to keep alive."""
        assert slot.process is not None
        how = f"signal {-code}" if code < 0 else f"exit code {code}"
        slot.crashes.append((now, code > 0))  # (when, failed with an error code)
        while slot.crashes and slot.crashes[0][0] < now - self.crash_window:
            slot.crashes.popleft()
        failed = sum(1 for _, with_code in slot.crashes if with_code)
        if failed > self.max_crashes or len(slot.crashes) > 6 * self.max_crashes:
            log.error(
                "supervisor: worker %d died %d times within %gs (last: %s); giving up",
                slot.index,
                len(slot.crashes),
                self.crash_window,
                how,
            )
            return False
        backoff = min(0.1 * 2**failed, 5.0)
        log.warning(
            "supervisor: worker %d (pid %d) died (%s); restarting in %.1fs",
            slot.index,
            slot.process.pid,
            how,
            backoff,
        )
        slot.process = None
        slot.restart_at = now + backoff
        return True

    def _stop_all(self) -> None:
        """Make sure no child outlives the supervisor."""
        running = [s for s in self.slots if self._alive(s)]
        if not running:
            return
        if not self._signals:
            self.stop()
        deadline = time.monotonic() + self.grace + 5
        for slot in running:
            assert slot.process is not None
            try:
                slot.process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning(
                    "supervisor: worker pid %d ignored SIGTERM; killing it", slot.process.pid
                )
                slot.process.kill()
                slot.process.wait()
            self._exited(slot.process.pid)
