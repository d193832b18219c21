"""Where the CPU goes while ``worq worker`` drains a deep queue, and how far --processes scales.

    python bench/cpu_bench.py                       # -p 1 -c 8 and -p 2 -c 8, 3 turns each
    python bench/cpu_bench.py --cases 1x1,1x8,2x8 --jobs 60000 --turns 5

Each case queues ``--jobs`` jobs of the peer bench's body (:func:`peers.count`, one INCR on a
client of its own), starts ``worq worker peers.worq_app:app -c C -p P`` and reads, over the
steady part of the drain only (from the first tenth of the jobs done to the last tenth left),
the jobs/s, how many of the machine's cores were busy, and the CPU time per job of every
process the command started (worker processes, their lease keepers, the supervisor) and of the
Redis server (``INFO cpu``). The cases take turns; each figure is the median of its turns.

The peer bench times a drain from its first job to its last, which on a slow 2-core machine
also counts a second process and the lease keepers still starting (a fresh interpreter that
imports redis-py is 150-250 ms of CPU there); this bench leaves the start out, so the two show
together how much of a ``--processes 2`` ratio is start-up and how much is the machine's cores.

Linux only (it reads ``/proc``). Keys live under a fresh prefix, deleted at the end.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from worq_core.lease_keeper import cpu_time

if TYPE_CHECKING:
    import redis

HERE = Path(__file__).resolve().parent
TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of ``pid`` (0 once it is gone)."""
    measured = cpu_time(pid)  # what the lease keeper reads to tell a stuck worker
    return 0.0 if measured is None else measured[1]


def busy_seconds() -> float:
    """CPU time the whole machine spent busy (not idle, not waiting on I/O) since boot."""
    ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(ticks) - ticks[3] - ticks[4]) / TICK


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it."""
    found = [pid]
    try:
        for thread in os.listdir(f"/proc/{pid}/task"):
            children = Path(f"/proc/{pid}/task/{thread}/children").read_text().split()
            for child in children:
                found += descendants(int(child))
    except FileNotFoundError:
        pass
    return found


def role(pid: int, top: int, supervised: bool) -> str:
    """What a process of the worker command is: worker, lease keeper or supervisor."""
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except FileNotFoundError:
        return "gone"
    if "multiprocessing" in command:
        return "lease keepers" if "spawn" in command else "multiprocessing helpers"
    return "supervisor" if pid == top and supervised else "worker processes"


@dataclass
class Sample:
    rate: float  # jobs/s
    cores: float  # of the machine's, busy
    per_job: dict[str, float]  # role -> µs of CPU a job


def redis_cpu(client: redis.Redis) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


def drain(url: str, prefix: str, processes: int, concurrency: int, jobs: int) -> Sample:
    """One drain of ``jobs`` jobs by one worker command, measured over its steady part."""
    import redis

    env = {
        **os.environ,
        "PEER_BENCH_URL": url,
        "PEER_BENCH_PREFIX": prefix,
        "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
    }
    key = f"{prefix}:count:{uuid.uuid4().hex[:8]}"
    fill = (
        "from peers import worq_app\n"
        f"for start in range(0, {jobs}, 1000):\n"
        f"    worq_app.count.enqueue_many([({key!r}, {jobs})] * min(1000, {jobs} - start))\n"
    )
    subprocess.run([sys.executable, "-c", fill], env=env, check=True)
    client = redis.Redis.from_url(url)
    command = [sys.executable, "-m", "worq_core", "worker", "peers.worq_app:app", "-Q", "peers"]
    command += ["-c", str(concurrency), "-p", str(processes), "--log-level", "warning"]
    worker = subprocess.Popen(command, env=env, start_new_session=True)

    def done() -> int:
        if worker.poll() is not None:
            raise RuntimeError(f"the worker exited {worker.returncode}")
        return int(client.get(key) or 0)

    try:
        while done() < jobs // 10:
            time.sleep(0.005)
        pids = descendants(worker.pid)
        before = {pid: cpu_seconds(pid) for pid in pids}
        redis_before, busy_before, t0, n0 = redis_cpu(client), busy_seconds(), time.time(), done()
        while done() < jobs - jobs // 10:
            time.sleep(0.005)
        after = {pid: cpu_seconds(pid) for pid in descendants(worker.pid)}
        redis_after, busy_after, t1, n1 = redis_cpu(client), busy_seconds(), time.time(), done()
        roles = {pid: role(pid, worker.pid, processes > 1) for pid in after}
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        worker.wait(timeout=60)
        client.close()
    counted = n1 - n0
    per_job: dict[str, float] = defaultdict(float)
    for pid, spent in after.items():
        per_job[roles[pid]] += (spent - before.get(pid, 0.0)) / counted * 1e6
    per_job["Redis server"] = (redis_after - redis_before) / counted * 1e6
    elapsed = t1 - t0
    return Sample(counted / elapsed, (busy_after - busy_before) / elapsed, dict(per_job))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--url", default=os.environ.get("WORQ_BENCH_URL", "redis://127.0.0.1:6379/10")
    )
    parser.add_argument("--cases", default="1x8,2x8", help="PROCESSESxCONCURRENCY, comma-separated")
    parser.add_argument("--jobs", type=int, default=30_000)
    parser.add_argument("--turns", type=int, default=3)
    args = parser.parse_args()
    cases = [tuple(int(v) for v in case.split("x")) for case in args.cases.split(",")]
    prefix = f"cpu-bench-{uuid.uuid4().hex[:8]}"
    samples: dict[tuple[int, ...], list[Sample]] = {case: [] for case in cases}
    import redis

    client = redis.Redis.from_url(args.url)
    try:
        for _ in range(args.turns):
            for case in cases:
                samples[case].append(drain(args.url, prefix, case[0], case[1], args.jobs))
    finally:
        for key in client.scan_iter(match=f"{prefix}*", count=1000):
            client.delete(key)
        client.close()
    print(
        f"worq worker draining {args.jobs:,} INCR jobs, steady part only (10%-90%); "
        f"medians of {args.turns} turns; {os.cpu_count()} cores\n"
    )
    first = statistics.median(s.rate for s in samples[cases[0]])
    for (processes, concurrency), runs in samples.items():
        rate = statistics.median(s.rate for s in runs)
        cores = statistics.median(s.cores for s in runs)
        print(
            f"-p {processes} -c {concurrency}: {rate:,.0f} jobs/s "
            f"({rate / first:.2f}x -p {cases[0][0]} -c {cases[0][1]}), "
            f"{cores:.2f} cores busy; runs: " + ", ".join(f"{s.rate:,.0f}" for s in runs)
        )
        for name in sorted({name for s in runs for name in s.per_job}):
            spent = statistics.median(s.per_job.get(name, 0.0) for s in runs)
            if spent >= 0.5:
                print(f"    {spent:6.0f} µs of CPU a job: {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
