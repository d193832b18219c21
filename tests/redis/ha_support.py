"""Redis servers of the tests' own for Sentinel: a master, a replica and three sentinels.

They listen on loopback ports set aside for these tests (17010-17029, no other test uses them;
shifted by ``WORQ_TEST_PORT_OFFSET``)
and run in a temporary directory without persistence; each is stopped by its own process id,
never by name.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import redis

SERVICE = "worqha"
HOST = "127.0.0.1"
# Added to every fixed port of these tests, so two test runs on one machine (a developer's and a
# helper's) can use disjoint ports: WORQ_TEST_PORT_OFFSET=1000 moves 17010 to 18010.
PORT_OFFSET = int(os.environ.get("WORQ_TEST_PORT_OFFSET", "0"))


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``check`` until it is true; fail after ``timeout`` seconds saying ``what``."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        time.sleep(0.02)  # polling a server's state: there is nothing to block on


def _answers(port: int) -> bool:
    client = redis.Redis(HOST, port, socket_timeout=0.5, socket_connect_timeout=0.5)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


class Server:
    """One redis-server (or sentinel) process of ours."""

    def __init__(self, port: int, args: list[str]) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed")
        self.port = port
        self.args = args
        self.process = subprocess.Popen(
            [binary, *args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_until(lambda: self.process.poll() is not None or _answers(port), 10, f"port {port}")
        if self.process.poll() is not None:
            raise RuntimeError(f"redis-server on port {port} exited: is the port taken?")

    def kill(self) -> None:
        """SIGKILL by pid, and reap."""
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(10)


def _data_args(port: int, directory: Path) -> list[str]:
    return [
        "--port",
        str(port),
        "--bind",
        HOST,
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        str(directory),
        "--daemonize",
        "no",
    ]


class SentinelSet:
    """A master, one replica and three sentinels watching them as service ``SERVICE``.

    Ports from ``base``: the master ``base``, the replica ``base + 1``, the sentinels
    ``base + 2`` .. ``base + 4``. The data servers allow ``DEBUG`` (to stall a replica).
    """

    def __init__(self, directory: Path, base: int) -> None:
        self.directory = directory
        self.servers: list[Server] = []
        self.master_port, self.replica_port = base, base + 1
        self.sentinel_ports = (base + 2, base + 3, base + 4)
        try:
            self.master = self._start(self.master_port, [])
            self.replica = self._start(
                self.replica_port, ["--replicaof", HOST, str(self.master_port)]
            )
            wait_until(self._replica_synced, 10, "the replica in sync with the master")
            for port in self.sentinel_ports:
                conf = directory / f"sentinel-{port}.conf"
                conf.write_text(
                    f"port {port}\nbind {HOST}\ndir {directory}\n"
                    f"sentinel monitor {SERVICE} {HOST} {self.master_port} 2\n"
                    f"sentinel down-after-milliseconds {SERVICE} 1000\n"
                    f"sentinel failover-timeout {SERVICE} 10000\n"
                    f"sentinel parallel-syncs {SERVICE} 1\n"
                )
                self.servers.append(Server(port, [str(conf), "--sentinel"]))
            wait_until(self._sentinels_agree, 15, "every sentinel seeing the replica")
        except BaseException:
            self.stop()
            raise

    def _start(self, port: int, extra: list[str]) -> Server:
        folder = self.directory / str(port)
        folder.mkdir(exist_ok=True)
        server = Server(port, [*_data_args(port, folder), "--enable-debug-command", "yes", *extra])
        self.servers.append(server)
        return server

    def bring_back_old_master(self) -> None:
        """After a failover to the replica: start the killed master again as the new replica.

        Empty (no persistence), as a replaced machine would be; it syncs from the new master.
        Only once the promoted replica says it is a master: a sentinel may report the switch
        first, and a replica still following the old address would resync from the empty one.
        """
        wait_until(self._replica_promoted, 30, "the replica taking the master role")
        self.master = self._start(self.master_port, ["--replicaof", HOST, str(self.replica_port)])

    def _replica_promoted(self) -> bool:
        client = redis.Redis(HOST, self.replica_port, socket_timeout=1)
        try:
            return client.info("replication").get("role") == "master"
        finally:
            client.close()

    def url(self, *, db: int = 0, query: str = "") -> str:
        hosts = ",".join(f"{HOST}:{port}" for port in self.sentinel_ports)
        return f"redis+sentinel://{hosts}/{SERVICE}/{db}" + (f"?{query}" if query else "")

    def current_master(self) -> int:
        """The master's port as the first sentinel sees it now."""
        client = redis.Redis(HOST, self.sentinel_ports[0], socket_timeout=1)
        try:
            _, port = client.sentinel_get_master_addr_by_name(SERVICE)
            return int(port)
        finally:
            client.close()

    def _replica_synced(self) -> bool:
        client = redis.Redis(HOST, self.replica_port, socket_timeout=1)
        try:
            return client.info("replication").get("master_link_status") == "up"
        finally:
            client.close()

    def _sentinels_agree(self) -> bool:
        for port in self.sentinel_ports:
            client = redis.Redis(HOST, port, socket_timeout=1)
            try:
                master = client.sentinel_master(SERVICE)
                if (
                    int(master.get("num-slaves", 0)) < 1
                    or int(master.get("num-other-sentinels", 0)) < 2
                ):
                    return False
            finally:
                client.close()
        return True

    def stop(self) -> None:
        for server in reversed(self.servers):
            server.kill()
        self.servers.clear()


class ClusterSet:
    """A Redis Cluster (``redis-cli --cluster create``) on ports from ``base``.

    Three masters and a replica for each by default: ports ``base`` .. ``base + 5`` and their
    cluster bus ports (``+ 10000``). One master (for benchmarks) gets every slot by
    ``CLUSTER ADDSLOTSRANGE``, since ``--cluster create`` wants three.
    """

    def __init__(self, directory: Path, base: int, masters: int = 3, replicas: int = 1) -> None:
        self.directory = directory
        self.ports = tuple(range(base, base + masters * (1 + replicas)))
        self.servers: list[Server] = []
        try:
            for port in self.ports:
                folder = directory / str(port)
                folder.mkdir(exist_ok=True)
                args = [*_data_args(port, folder), "--cluster-enabled", "yes"]
                args += ["--cluster-config-file", f"nodes-{port}.conf"]
                args += ["--cluster-node-timeout", "2000"]
                self.servers.append(Server(port, args))
            cli = shutil.which("redis-cli")
            if cli is None:
                raise RuntimeError("redis-cli is not installed")
            nodes = [f"{HOST}:{port}" for port in self.ports]
            if masters == 1 and replicas == 0:
                command = [cli, "-p", str(self.ports[0]), "CLUSTER", "ADDSLOTSRANGE", "0", "16383"]
            else:
                command = [cli, "--cluster", "create", *nodes, "--cluster-replicas", str(replicas)]
                command.append("--cluster-yes")
            subprocess.run(
                command,
                check=True,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                timeout=30,
            )
            wait_until(self._ready, 20, "the cluster reporting cluster_state:ok on every node")
        except BaseException:
            self.stop()
            raise

    @property
    def url(self) -> str:
        return f"redis+cluster://{HOST}:{self.ports[0]}"

    def server(self, port: int) -> Server:
        return next(s for s in self.servers if s.port == port)

    def restart(self, port: int) -> None:
        """Start the (killed) node on ``port`` again; its nodes file makes it rejoin."""
        old = self.server(port)
        self.servers[self.servers.index(old)] = Server(port, old.args)

    def _ready(self) -> bool:
        for port in self.ports:
            client = redis.Redis(HOST, port, socket_timeout=1)
            try:
                info = client.execute_command("CLUSTER INFO")
                state = info.get("cluster_state") if isinstance(info, dict) else None
                if state != "ok":
                    return False
                role = client.info("replication")
                if role.get("role") == "slave" and role.get("master_link_status") != "up":
                    return False  # a replica still syncing: WAIT would not count it yet
            finally:
                client.close()
        return True

    def stop(self) -> None:
        for server in reversed(self.servers):
            server.kill()
        self.servers.clear()
