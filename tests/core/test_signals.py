"""Stop signals reach the worker and the supervisor whatever their main thread holds."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from worq_core.signals import on_stop_signals

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")

log = logging.getLogger("test")


def test_a_stop_signal_that_lands_while_the_main_thread_holds_a_lock_is_handled_after_it() -> None:
    lock = threading.Lock()
    got_lock: list[bool] = []

    def handler() -> None:
        # Inside the signal handler itself this would wait for the main thread, which waits
        # for the handler: the timeout turns that deadlock into a failure.
        acquired = lock.acquire(timeout=2.0)
        got_lock.append(acquired)
        if acquired:
            lock.release()

    with on_stop_signals(handler, log):
        with lock:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.1)  # Python runs signal handlers between these instructions
            assert got_lock == []
        deadline = time.monotonic() + 5
        while not got_lock and time.monotonic() < deadline:
            time.sleep(0.01)
    assert got_lock == [True]


def test_the_supervisor_stops_when_sigterm_lands_while_its_loop_holds_its_wake_lock(
    tmp_path: Path,
) -> None:
    # Where CI once saw the supervisor hang after its worker exited: SIGTERM landed while the
    # watch loop was inside its wake event's lock, and the handler's set() waited for that lock.
    script = tmp_path / "supervise.py"
    script.write_text(
        textwrap.dedent(
            """
            import logging, os, signal, sys, threading, time
            from worq_core.supervisor import Supervisor

            logging.basicConfig(level=logging.INFO)

            class SignalledWhileHeld(threading.Event):
                sent = False

                def clear(self):
                    with self._cond:
                        if not self.sent and supervisor.pids():
                            self.sent = True
                            os.kill(os.getpid(), signal.SIGTERM)
                            time.sleep(0.1)  # the signal handler runs here, on this thread
                        self._flag = False

            child = [sys.executable, "-c", "import time; time.sleep(60)"]
            supervisor = Supervisor(child, processes=1, grace=5)
            supervisor._wake = SignalledWhileHeld()
            sys.exit(supervisor.run())
            """
        )
    )
    process = subprocess.Popen([sys.executable, str(script)], stderr=subprocess.PIPE, text=True)
    try:
        _, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, stderr
    assert "supervisor exiting with code 0" in stderr
