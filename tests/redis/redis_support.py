"""Helpers for the worq-redis tests (imported by conftest.py and the test modules)."""

from __future__ import annotations

import contextlib
import importlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pytest
import redis

from worq_core import Worq
from worq_redis import RedisBroker, RedisSettings, RedisStorage

DB = int(os.environ.get("WORQ_TEST_REDIS_DB", "9"))
URL = os.environ.get("WORQ_TEST_REDIS_URL", f"redis://127.0.0.1:6379/{DB}")
BACKENDS = ["redis", "fakeredis"]


def new_prefix() -> str:
    return f"worqtest-{uuid.uuid4().hex[:12]}"


def delete_prefix(client: redis.Redis, prefix: str) -> None:
    """Delete every key under ``prefix`` (and only those)."""
    batch = list(client.scan_iter(match=f"{prefix}:*", count=1000))
    for start in range(0, len(batch), 500):
        client.delete(*batch[start : start + 500])


@dataclass
class Backend:
    """One Redis (real or fake) with a key prefix of this test's own."""

    kind: str
    client: redis.Redis
    prefix: str

    def broker(self, settings: RedisSettings | None = None, **kwargs: object) -> RedisBroker:
        return RedisBroker(self.client, settings, prefix=self.prefix, **kwargs)  # type: ignore[arg-type]

    def storage(self, prefix: str | None = None) -> RedisStorage:
        return RedisStorage(self.client, prefix=prefix or self.prefix)

    def keys(self) -> list[str]:
        return sorted(k.decode() for k in self.client.scan_iter(match=f"{self.prefix}:*"))

    def snapshot(self) -> dict[str, bytes | None]:
        """Every key of this prefix with its ``DUMP``: equal snapshots mean nothing was written."""
        names = self.keys()
        return {name: self.client.dump(name) for name in names}  # type: ignore[misc]


# -- counting round trips ------------------------------------------------------------------------


class CountingConnection(redis.Connection):
    """A connection that counts writes to the socket (round trips) and records every command."""

    round_trips = 0
    commands: ClassVar[list[tuple[bytes, ...]]] = []

    @classmethod
    def reset(cls) -> None:
        cls.round_trips = 0
        cls.commands.clear()

    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        type(self).round_trips += 1
        data = command if isinstance(command, bytes) else b"".join(command)
        type(self).commands.extend(_commands(data))
        super().send_packed_command(command, check_health)


def _commands(data: bytes) -> list[tuple[bytes, ...]]:
    """The commands of a packed write (RESP arrays of bulk strings), however they were packed."""
    commands: list[tuple[bytes, ...]] = []
    at = 0
    while at < len(data):
        end = data.index(b"\r\n", at)
        assert data[at : at + 1] == b"*", data[at : at + 20]
        count, at = int(data[at + 1 : end]), end + 2
        args = []
        for _ in range(count):
            end = data.index(b"\r\n", at)
            assert data[at : at + 1] == b"$", data[at : at + 20]
            size, at = int(data[at + 1 : end]), end + 2
            args.append(data[at : at + size])
            at += size + 2
        commands.append(tuple(args))
    return commands


def counting_client(url: str) -> tuple[redis.Redis, type[CountingConnection]]:
    """A client whose connections count into a class of their own (so tests never share counts)."""
    counter = type("Counter", (CountingConnection,), {"round_trips": 0, "commands": []})
    pool = redis.ConnectionPool.from_url(url, connection_class=counter)
    return redis.Redis(connection_pool=pool), counter


# -- Redis Cluster slots ---------------------------------------------------------------------------


def _crc16(data: bytes) -> int:
    """CRC16/XMODEM, as Redis Cluster uses for key slots."""
    crc = 0
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
            crc &= 0xFFFF
    return crc


def keyslot(key: bytes) -> int:
    """The Cluster slot of ``key``: CRC16 of its hash tag (first non-empty ``{...}``) mod 16384."""
    start = key.find(b"{")
    if start != -1:
        end = key.find(b"}", start + 1)
        if end > start + 1:
            key = key[start + 1 : end]
    return _crc16(key) % 16384


# -- a private redis-server ------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """A redis-server of the test's own on a loopback port, with AOF in a temporary directory.

    Stopped only through its own process id, never by name.
    """

    def __init__(self, directory: Path, *, appendonly: bool = True) -> None:
        self.directory = directory
        self.port = free_port()
        self.appendonly = appendonly
        self.process: subprocess.Popen[str] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed")
        self.process = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "yes" if self.appendonly else "no",
                "--dir",
                str(self.directory),
                "--logfile",
                "",
                "--daemonize",
                "no",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        ready = threading.Event()
        lines: list[str] = []
        stdout = self.process.stdout
        assert stdout is not None

        def read() -> None:
            for line in stdout:
                lines.append(line)
                if "Ready to accept connections" in line:
                    ready.set()

        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(timeout):
            self.kill()
            raise RuntimeError("redis-server did not start:\n" + "".join(lines))

    def kill(self) -> None:
        """SIGKILL this server (by its pid) and reap it."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(10)
        self.process = None


IDLE_SUFFIXES = {"queues", "seq", "signal"}
"""Key suffixes a drained queue may keep: the registry, the sequence counter, a wake-up."""


def queue_base(backend: Backend, queue: str) -> str:
    """The common start of the names of ``queue``'s keys under the backend's prefix."""
    return f"{backend.prefix}:{{{queue}}}:"


def leftovers(backend: Backend) -> set[str]:
    """Keys of the backend's prefix other than the ones an idle queue keeps."""
    names = backend.keys()
    return {k for k in names if k.rsplit(":", 1)[-1] not in IDLE_SUFFIXES}


class Clock:
    """A hand-driven clock for the scripts' time override."""

    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def children(pid: int) -> list[int]:
    """Process ids whose parent is ``pid`` (from /proc; no process names involved)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(entry))
    return found


class Runtime:
    """One test's broker URL, ledger and `worq worker` processes of the app in ``module``.

    ``module`` (a file next to this one) reads ``WORQ_RUNTIME_URL`` (the broker URL with its
    ``?prefix=``) and reports to the test through Redis lists under ``WORQ_RUNTIME_LOG``.
    """

    def __init__(self, base_url: str, module: str = "runtime_app") -> None:
        self.module = module
        self.prefix = new_prefix()
        self.base_url = base_url
        self.url = f"{base_url}?prefix={self.prefix}"
        self.log = f"{self.prefix}:log"
        self.client = redis.Redis.from_url(base_url)
        self.procs: list[subprocess.Popen[str]] = []

    def app(self) -> Worq:
        """The producer's side of the app module (same URL and prefix)."""
        os.environ["WORQ_RUNTIME_URL"] = self.url
        os.environ["WORQ_RUNTIME_LOG"] = self.log
        sys.modules.pop(self.module, None)
        app: Worq = importlib.import_module(self.module).app
        return app

    def worker(self, *options: str) -> subprocess.Popen[str]:
        env = dict(
            os.environ,
            WORQ_RUNTIME_URL=self.url,
            WORQ_RUNTIME_LOG=self.log,
            PYTHONFAULTHANDLER="1",  # a process stop() finds stuck shows where (on SIGABRT)
        )
        proc = subprocess.Popen(
            [sys.executable, "-m", "worq_core", "worker", f"{self.module}:app", *options],
            cwd=Path(__file__).parent,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.procs.append(proc)
        return proc

    def ledger(self, name: str) -> list[bytes]:
        return list(self.client.lrange(f"{self.log}:{name}", 0, -1))

    def wait_for(self, name: str, timeout: float = 20.0) -> bytes:
        """The next entry of list ``name`` (blocking, with a deadline)."""
        got = self.client.blpop([f"{self.log}:{name}"], timeout=timeout)
        assert got is not None, f"nothing arrived on {name} within {timeout}s"
        return got[1]

    def cleanup(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                for child in children(proc.pid):
                    os.kill(child, signal.SIGKILL)
                os.kill(proc.pid, signal.SIGKILL)
            proc.communicate(timeout=15)
        delete_prefix(self.client, self.prefix)
        self.client.close()


def stop(proc: subprocess.Popen[str], timeout: float = 30.0) -> str:
    """SIGTERM a worker (or supervisor) by pid; returns its log once it exited.

    One that does not exit in time fails the test with what still runs beneath it and where
    each of those processes' threads stands (faulthandler's dump on SIGABRT: the processes are
    started with ``PYTHONFAULTHANDLER``), then its log.
    """
    os.kill(proc.pid, signal.SIGTERM)
    try:
        _, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stuck = [proc.pid, *descendants(proc.pid)]
        tree = "\n".join(describe(pid) for pid in stuck)
        for pid in reversed(stuck):  # each dumps its threads' stacks to its stderr, and dies
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGABRT)
        try:
            _, stderr = proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, stderr = proc.communicate()
        pytest.fail(f"pid {proc.pid} did not exit within {timeout}s of SIGTERM:\n{tree}\n{stderr}")
    return stderr


def descendants(pid: int) -> list[int]:
    """Every process beneath ``pid``, depth first."""
    found = []
    for child in children(pid):
        found += [child, *descendants(child)]
    return found


def describe(pid: int) -> str:
    """One line on process ``pid``: its parent, state, what it waits in, its command line."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        with open(f"/proc/{pid}/wchan") as wchan:
            waits = wchan.read()
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            command = cmdline.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return f"pid {pid}: gone"
    return f"pid {pid} (parent {fields[1]}): state {fields[0]}, waits in {waits}: {command}"
