"""The job-control example keeps working: it runs as a user would run it."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_control_example_shows_headers_retry_reject_progress_and_cancel() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "control" / "app.py")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 10, done.stdout
    # How far the import got when the observer first saw its progress depends on timing.
    assert re.fullmatch(r"progress: \d+ of 100000 rows \(importing\)", lines[6]), lines[6]
    assert lines[:6] + lines[7:] == [
        "cancel queued job: True cancelled",
        "queued job result: JobCancelled",
        "cancel it again: False",
        "headers: hello ada (request req-42, tenant acme)",
        "retry: export-7 ready on attempt 2",
        "reject: worq_core.errors.Reject - not a number: 'seven'",
        "cancel running job: True running",
        "running job result: JobCancelled cancelled None",
        "worker: succeeded=2 retried=1 dead=1 cancelled=1",
    ]
