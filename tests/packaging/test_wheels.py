"""The three distributions build as wheels and work from a fresh virtualenv, away from the repo."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DISTRIBUTIONS = ["worq_core", "worq_memory", "worq_redis"]


def run(*args: str | Path, cwd: Path, timeout: float = 240) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["COLUMNS"] = "200"  # keep rich tables on one line per row
    done = subprocess.run(
        [str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, f"{args} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.mark.timeout(600)
def test_wheels_install_into_a_fresh_virtualenv_and_find_their_plugins(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    run(
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "-q",
        "-w",
        wheels,
        *(ROOT / d for d in DISTRIBUTIONS),
        cwd=tmp_path,
    )
    built = sorted(p.name.split("-")[0] for p in wheels.glob("*.whl"))
    assert built == DISTRIBUTIONS

    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", venv, cwd=tmp_path)
    python = venv / "bin" / "python"
    run(python, "-m", "pip", "install", "-q", *wheels.glob("*.whl"), cwd=tmp_path)

    plugins = run(venv / "bin" / "worq", "plugins", cwd=tmp_path)
    for registered in ("broker memory", "serializer msgpack", "serializer json", "broker redis"):
        assert registered in plugins

    script = textwrap.dedent(
        """
        import worq_core
        from worq_core import Worq
        assert "site-packages" in worq_core.__file__, worq_core.__file__
        app = Worq()

        @app.task
        def add(x, y):
            return x + y

        job = add.enqueue(20, 22)
        app.worker().run(burst=True)
        print(job.result(timeout=5))
        """
    )
    assert run(python, "-c", script, cwd=tmp_path).strip() == "42"
