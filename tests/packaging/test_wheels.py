"""The four distributions build as wheels and work from a fresh virtualenv, away from the repo."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import zipfile
from email.parser import HeaderParser
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DISTRIBUTIONS = ["worq_core", "worq_memory", "worq_postgres", "worq_redis"]


def run(*args: str | Path, cwd: Path, timeout: float = 240) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["COLUMNS"] = "200"  # keep rich tables on one line per row
    done = subprocess.run(
        [str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, f"{args} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheels, built once for this module."""
    tmp_path = tmp_path_factory.mktemp("wheels")
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
    return wheels


def test_each_distribution_carries_the_root_licence() -> None:
    # PEP 639 licence files must sit inside the distribution's own folder: these are copies.
    licence = (ROOT / "LICENSE").read_text()
    assert licence.startswith("MIT License")
    for distribution in DISTRIBUTIONS:
        assert (ROOT / distribution / "LICENSE").read_text() == licence, distribution


@pytest.mark.timeout(600)
def test_each_wheel_ships_the_mit_licence(wheels: Path) -> None:
    licence = (ROOT / "LICENSE").read_bytes()
    for wheel in sorted(wheels.glob("*.whl")):
        with zipfile.ZipFile(wheel) as archive:
            (dist_info,) = {
                name.split("/")[0] for name in archive.namelist() if ".dist-info/" in name
            }
            assert archive.read(f"{dist_info}/licenses/LICENSE") == licence, wheel.name
            metadata = HeaderParser().parsestr(archive.read(f"{dist_info}/METADATA").decode())
        assert metadata["License-Expression"] == "MIT", wheel.name
        assert metadata.get_all("License-File") == ["LICENSE"], wheel.name


def test_the_postgres_wheel_ships_its_sql_migrations(wheels: Path) -> None:
    [wheel] = wheels.glob("worq_postgres-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        shipped = archive.read("worq_postgres/migrations/0001_initial.sql").decode()
    source = ROOT / "worq_postgres/src/worq_postgres/migrations/0001_initial.sql"
    assert shipped == source.read_text()


@pytest.mark.timeout(600)
def test_the_core_wheel_ships_every_dashboard_asset(wheels: Path) -> None:
    source = ROOT / "worq_core" / "src" / "worq_core" / "dashboard"
    assets = {
        f"worq_core/dashboard/{path.relative_to(source)}"
        for folder in ("templates", "static")
        for path in (source / folder).iterdir()
    }
    assert "worq_core/dashboard/static/dashboard.js" in assets
    (wheel,) = wheels.glob("worq_core-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        assert assets <= set(archive.namelist())


@pytest.mark.timeout(600)
def test_wheels_install_into_a_fresh_virtualenv_and_find_their_plugins(
    wheels: Path, tmp_path: Path
) -> None:
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", venv, cwd=tmp_path)
    python = venv / "bin" / "python"
    run(python, "-m", "pip", "install", "-q", *wheels.glob("*.whl"), cwd=tmp_path)

    plugins = run(venv / "bin" / "worq", "plugins", cwd=tmp_path)
    for registered in (
        "broker memory",
        "serializer msgpack",
        "serializer json",
        "broker redis",
        "broker postgres",
        "command worq postgres",
        "middleware otel",  # registered without its extra, which only naming it needs
    ):
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
        try:
            Worq(middleware=["otel"]).middleware
        except ImportError as exc:
            assert "worq-core[otel]" in str(exc), exc
        else:
            raise AssertionError("otel built without opentelemetry-api")
        """
    )
    assert run(python, "-c", script, cwd=tmp_path).strip() == "42"

    # Without its extra, the dashboard says how to get it in one line.
    done = subprocess.run(
        [venv / "bin" / "worq", "--broker", "memory://", "dashboard"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert "pip install 'worq-core[dashboard]'" in done.stderr, done.stderr
