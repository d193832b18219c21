from __future__ import annotations

import sys
import textwrap
from pathlib import Path

from worq_core.supervisor import REPLACE_ME, Supervisor


def script(tmp_path: Path, body: str) -> list[str]:
    path = tmp_path / "child.py"
    path.write_text(textwrap.dedent(body))
    return [sys.executable, str(path)]


def test_a_retired_worker_is_replaced_and_a_finished_one_is_not(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    command = script(
        tmp_path,
        f"""
        import pathlib, sys
        runs = pathlib.Path({str(runs)!r})
        count = len(runs.read_text()) if runs.exists() else 0
        runs.write_text("x" * (count + 1))
        sys.exit({REPLACE_ME} if count < 2 else 0)  # retire twice, then finish
        """,
    )
    supervisor = Supervisor(command, processes=1, grace=5)
    assert supervisor.run() == 0
    assert runs.read_text() == "xxx"
    assert supervisor.restarts == 2


def test_workers_that_die_at_start_make_the_supervisor_give_up(tmp_path: Path) -> None:
    command = script(tmp_path, "import sys; sys.exit(3)  # say, a broken import\n")
    supervisor = Supervisor(command, processes=2, grace=5, max_crashes=2)
    assert supervisor.run() == 1
    assert supervisor.pids() == [], "no child is left behind"


def test_workers_killed_by_a_signal_are_restarted_not_given_up_on(
    tmp_path: Path,
) -> None:
    runs = tmp_path / "runs"
    command = script(
        tmp_path,
        f"""
        import os, pathlib, signal
        runs = pathlib.Path({str(runs)!r})
        count = len(runs.read_text()) if runs.exists() else 0
        runs.write_text("x" * (count + 1))
        if count < 4:
            os.kill(os.getpid(), signal.SIGKILL)  # the OOM killer, say
        """,
    )
    supervisor = Supervisor(command, processes=1, grace=5, max_crashes=2)
    assert supervisor.run() == 0
    assert runs.read_text() == "xxxxx"
