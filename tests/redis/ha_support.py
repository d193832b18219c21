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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


@dataclass(frozen=True)
class Tls:
    """A test CA and a certificate for 127.0.0.1 that it signed (see ``make_tls``)."""

    ca: Path
    cert: Path
    key: Path

    def server_args(self, *, cluster: bool = False) -> list[str]:
        """redis-server options: TLS only (no plain port), replication (and the bus) over TLS."""
        args = ["--tls-cert-file", str(self.cert), "--tls-key-file", str(self.key)]
        args += ["--tls-ca-cert-file", str(self.ca), "--tls-auth-clients", "no"]
        args += ["--tls-replication", "yes"]
        return args + (["--tls-cluster", "yes"] if cluster else [])

    def client_kwargs(self) -> dict[str, Any]:
        """redis-py keywords that trust the test CA."""
        return {"ssl": True, "ssl_ca_certs": str(self.ca)}

    @property
    def query(self) -> str:
        """The URL query that makes worq-redis trust the test CA."""
        return f"ssl_ca_certs={self.ca}"


def make_tls(directory: Path) -> Tls:
    """A throwaway CA and a server certificate for ``127.0.0.1`` (SAN IP), valid one day."""
    openssl = shutil.which("openssl")
    if openssl is None:
        raise RuntimeError("openssl is not installed")
    tls = Tls(directory / "ca.crt", directory / "server.crt", directory / "server.key")
    ca_key, request = directory / "ca.key", directory / "server.csr"
    extensions = directory / "san.ext"
    extensions.write_text("subjectAltName = IP:127.0.0.1\n")
    ca = ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=worq-ca"]
    ca += ["-keyout", str(ca_key), "-out", str(tls.ca)]
    server = ["req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1"]
    server += ["-keyout", str(tls.key), "-out", str(request)]
    sign = ["x509", "-req", "-in", str(request), "-CA", str(tls.ca), "-CAkey", str(ca_key)]
    sign += ["-CAcreateserial", "-days", "1", "-extfile", str(extensions), "-out", str(tls.cert)]
    for command in (ca, server, sign):
        subprocess.run([openssl, *command], check=True, capture_output=True, timeout=60)
    return tls


def connect(port: int, tls: Tls | None = None, timeout: float = 1.0) -> redis.Redis:
    """A plain client of one of our servers (over TLS when they use it)."""
    extra = tls.client_kwargs() if tls else {}
    return redis.Redis(HOST, port, socket_timeout=timeout, socket_connect_timeout=timeout, **extra)


def _answers(port: int, tls: Tls | None = None) -> bool:
    client = connect(port, tls, 0.5)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


class Server:
    """One redis-server (or sentinel) process of ours."""

    def __init__(self, port: int, args: list[str], tls: Tls | None = None) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed")
        self.port = port
        self.args = args
        self.tls = tls
        self.process = subprocess.Popen(
            [binary, *args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        answers = lambda: self.process.poll() is not None or _answers(port, tls)  # noqa: E731
        wait_until(answers, 10, f"port {port}")
        if self.process.poll() is not None:
            raise RuntimeError(f"redis-server on port {port} exited: is the port taken?")

    def kill(self) -> None:
        """SIGKILL by pid, and reap."""
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(10)


def _data_args(port: int, directory: Path, tls: Tls | None = None) -> list[str]:
    # Under TLS the port is the TLS port and there is no plain one.
    ports = ["--port", "0", "--tls-port", str(port)] if tls else ["--port", str(port)]
    return [
        *ports,
        "--bind",
        HOST,
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        str(directory),
        "--logfile",
        str(directory / "redis.log"),  # read by a failing test's diagnostics
        "--daemonize",
        "no",
    ]


class SentinelSet:
    """A master, one replica and three sentinels watching them as service ``SERVICE``.

    Ports from ``base``: the master ``base``, the replica ``base + 1``, the sentinels
    ``base + 2`` .. ``base + 4``. The data servers allow ``DEBUG`` (to stall a replica).
    """

    def __init__(self, directory: Path, base: int, tls: Tls | None = None) -> None:
        self.directory = directory
        self.tls = tls
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
                listen = f"port {port}\n"
                if tls:  # the sentinel's own port is TLS, and it talks TLS to the data servers
                    listen = f"port 0\ntls-port {port}\n" + "".join(
                        f"{tls.server_args()[i][2:]} {tls.server_args()[i + 1]}\n"
                        for i in range(0, len(tls.server_args()), 2)
                    )
                conf.write_text(
                    f"{listen}bind {HOST}\ndir {directory}\n"
                    f"logfile {directory / f'sentinel-{port}.log'}\n"
                    f"sentinel monitor {SERVICE} {HOST} {self.master_port} 2\n"
                    f"sentinel down-after-milliseconds {SERVICE} 1000\n"
                    f"sentinel failover-timeout {SERVICE} 10000\n"
                    f"sentinel parallel-syncs {SERVICE} 1\n"
                )
                self.servers.append(Server(port, [str(conf), "--sentinel"], tls))
            wait_until(self._sentinels_agree, 15, "every sentinel seeing the replica")
        except BaseException:
            self.stop()
            raise

    def _start(self, port: int, extra: list[str]) -> Server:
        folder = self.directory / str(port)
        folder.mkdir(exist_ok=True)
        args = [*_data_args(port, folder, self.tls), "--enable-debug-command", "yes"]
        # A new replica's sync starts at once, not after the default 5 s wait for more replicas.
        args += ["--repl-diskless-sync-delay", "0", *extra]
        server = Server(port, args + (self.tls.server_args() if self.tls else []), self.tls)
        self.servers.append(server)
        return server

    def bring_back_old_master(self) -> None:
        """After a failover to the replica: start the killed master again as the new replica.

        Empty (no persistence), as a replaced machine would be; it syncs from the new master.
        Only once the promoted replica says it is a master: a sentinel may report the switch
        first, and a replica still following the old address would resync from the empty one.
        It joins with ``replica-priority 0`` until its first sync is done: sentinels promote a
        replica whose initial sync has not finished, and a second failover soon after the
        first (the new master missing the sentinels' pings for a second on a loaded machine)
        once made the empty server master, and the data went with the resync that followed.
        """
        wait_until(self._replica_promoted, 30, "the replica taking the master role")
        wait_until(self._sentinels_follow_replica, 30, "every sentinel naming the new master")
        self.master = self._start(
            self.master_port,
            ["--replicaof", HOST, str(self.replica_port), "--replica-priority", "0"],
        )
        wait_until(lambda: self._synced(self.master_port), 30, "the new replica's first sync")
        client = connect(self.master_port, self.tls)
        try:
            client.config_set("replica-priority", 100)
        finally:
            client.close()

    def _replica_promoted(self) -> bool:
        client = connect(self.replica_port, self.tls)
        try:
            return client.info("replication").get("role") == "master"
        finally:
            client.close()

    def _sentinels_follow_replica(self) -> bool:
        # A sentinel still configured with the old master would, once that address answers
        # again and looks like a master from its last INFO, turn the promoted replica back
        # into its replica (+convert-to-slave): a full resync from an empty server.
        return all(self.master_seen_by(port) == self.replica_port for port in self.sentinel_ports)

    def master_seen_by(self, sentinel_port: int) -> int | None:
        """The master's port as one sentinel names it (``None`` if it does not answer)."""
        client = connect(sentinel_port, self.tls)
        try:
            _, port = client.sentinel_get_master_addr_by_name(SERVICE)
            return int(port)
        except redis.RedisError:
            return None
        finally:
            client.close()

    def url(self, *, db: int = 0, query: str = "") -> str:
        hosts = ",".join(f"{HOST}:{port}" for port in self.sentinel_ports)
        if self.tls:
            query = "&".join(part for part in (self.tls.query, query) if part)
        scheme = "rediss+sentinel" if self.tls else "redis+sentinel"
        return f"{scheme}://{hosts}/{SERVICE}/{db}" + (f"?{query}" if query else "")

    def current_master(self) -> int | None:
        """The master's port as the first sentinel sees it now."""
        return self.master_seen_by(self.sentinel_ports[0])

    def _replica_synced(self) -> bool:
        return self._synced(self.replica_port)

    def _synced(self, port: int) -> bool:
        client = connect(port, self.tls)
        try:
            return client.info("replication").get("master_link_status") == "up"
        finally:
            client.close()

    def _sentinels_agree(self) -> bool:
        for port in self.sentinel_ports:
            client = connect(port, self.tls)
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

    def diagnostics(self) -> str:
        """What the servers' logs say of failovers and full resyncs: for a failing test's report."""
        lines = []
        for log in sorted(self.directory.glob("sentinel-*.log")):
            events = [ln for ln in log.read_text(errors="replace").splitlines() if "+" in ln]
            wanted = ("+switch-master", "+failover-end", "+promoted", "+sdown master", "+odown")
            wanted += ("+convert-to-slave", "+config-update-from", "+fix-slave-config", "+tilt")
            wanted += ("+slave-reconf", "-sdown", "+elected-leader", "+try-failover")
            lines += [f"{log.name}: {ln}" for ln in events if any(w in ln for w in wanted)]
        for log in sorted(self.directory.glob("*/redis.log")):
            words = ("MASTER MODE", "Full resync", "Loading", "Discarding", "REPLICAOF", "flush")
            lines += [
                f"{log.parent.name}: {ln}"
                for ln in log.read_text(errors="replace").splitlines()
                if any(w.lower() in ln.lower() for w in words)
            ]
        for server in self.servers:
            try:
                client = connect(server.port, self.tls)
                if server.port in self.sentinel_ports:
                    view = client.sentinel_master(SERVICE)
                    keys = ("ip", "port", "flags", "config-epoch", "num-slaves")
                else:
                    view = {**client.info("replication"), **client.info("stats")}
                    keys = ("role", "master_port", "master_link_status", "master_repl_offset")
                    keys += ("sync_full", "sync_partial_ok")
                client.close()
                lines.append(f"{server.port}: " + " ".join(f"{k}={view.get(k)}" for k in keys))
            except redis.RedisError as exc:
                lines.append(f"{server.port}: {exc}")
        return "\n".join(lines[-100:])

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

    def __init__(
        self,
        directory: Path,
        base: int,
        masters: int = 3,
        replicas: int = 1,
        tls: Tls | None = None,
    ) -> None:
        self.directory = directory
        self.tls = tls
        self.ports = tuple(range(base, base + masters * (1 + replicas)))
        self.servers: list[Server] = []
        try:
            for port in self.ports:
                folder = directory / str(port)
                folder.mkdir(exist_ok=True)
                args = [*_data_args(port, folder, tls), "--cluster-enabled", "yes"]
                args += ["--cluster-config-file", f"nodes-{port}.conf"]
                args += ["--cluster-node-timeout", "2000"]
                args += tls.server_args(cluster=True) if tls else []
                self.servers.append(Server(port, args, tls))
            cli = shutil.which("redis-cli")
            if cli is None:
                raise RuntimeError("redis-cli is not installed")
            nodes = [f"{HOST}:{port}" for port in self.ports]
            cli_tls = ["--tls", "--cacert", str(tls.ca)] if tls else []
            if masters == 1 and replicas == 0:
                command = [cli, *cli_tls, "-p", str(self.ports[0]), "CLUSTER", "ADDSLOTSRANGE"]
                command += ["0", "16383"]
            else:
                command = [cli, *cli_tls, "--cluster", "create", *nodes]
                command += ["--cluster-replicas", str(replicas), "--cluster-yes"]
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
        """The cluster's URL without a query (under TLS, add ``tls.query`` to it)."""
        return f"{'rediss' if self.tls else 'redis'}+cluster://{HOST}:{self.ports[0]}"

    def server(self, port: int) -> Server:
        return next(s for s in self.servers if s.port == port)

    def restart(self, port: int) -> None:
        """Start the (killed) node on ``port`` again; its nodes file makes it rejoin."""
        old = self.server(port)
        self.servers[self.servers.index(old)] = Server(port, old.args, self.tls)

    def _ready(self) -> bool:
        for port in self.ports:
            client = connect(port, self.tls)
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
