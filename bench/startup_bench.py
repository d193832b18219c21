"""What a fresh process pays before its first enqueue, and what the lease keeper pays to start.

    python bench/startup_bench.py              # 11 runs of each, taking turns
    python bench/startup_bench.py --runs 21

Each case spawns a fresh interpreter and times it from the spawn to a stamp the process writes
when it is done, so the interpreter's own start-up counts, as a user sees it. The cases take
turns, so a slower moment of the machine hits them all, and each figure is a median:

* the floor: an interpreter that imports redis-py and sends one LPUSH;
* a producer on Redis: ``from worq_core import Worq``, an app on the URL, one task, one enqueue;
* a producer on ``memory://``: the same on the in-memory broker. With worq-redis installed it
  shows whether the registry imports plugins the URL does not need;
* the lease keeper, from spawning it to its first "ready", built from the broker's recipe
  (``Broker.recipe()``, what ``worq worker`` uses) and, for comparison, by importing the app
  (the fallback for a broker without one).

The producers are reported as ratios to the floor, the keeper's fallback as a ratio to its
recipe, all measured in this run. Keys live under a fresh prefix, deleted at the end.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from pathlib import Path

FLOOR = """
import redis
redis.Redis.from_url({url!r}).lpush({key!r}, b"x" * 100)
"""

PRODUCER = """
from worq_core import Worq

app = Worq({url!r})

@app.task(queue={queue!r})
def add(x: int, y: int) -> int:
    return x + y

add.enqueue(1, 2)
"""

KEEPER_APP = """
from worq_core import Worq

app = Worq({url!r})
"""

KEEPER = """
import functools, sys, time

def main() -> None:
    from worq_core.cli import app_broker
    from worq_core.lease_keeper import LeaseKeeper
    import keeper_bench_app

    how = sys.argv[1]
    if how == "recipe":
        factory = keeper_bench_app.app.broker.recipe()
        assert factory is not None
    else:
        factory = functools.partial(app_broker, "keeper_bench_app:app", None)
    started = time.perf_counter()
    keeper = LeaseKeeper(factory, 30.0, 10.0, worker="startup-bench", queues=("startup",))
    while not keeper.ready(timeout=10.0):
        pass
    print(time.perf_counter() - started)
    keeper.close()

if __name__ == "__main__":  # spawn runs this module again in the keeper
    main()
"""


def spawned(code: str, stamp: Path, cwd: Path) -> float:
    """Seconds from spawning ``python -c code`` to the stamp it writes as its last act."""
    program = f"{code}\nimport time\nopen({str(stamp)!r}, 'w').write(repr(time.time()))\n"
    started = time.time()
    subprocess.run([sys.executable, "-c", program], cwd=cwd, check=True)
    return float(stamp.read_text()) - started


def keeper_start(how: str, cwd: Path) -> float:
    """Seconds from spawning the keeper to its "ready", as the worker sees it."""
    done = subprocess.run(
        [sys.executable, "keeper_bench.py", how],
        cwd=cwd,
        check=True,
        capture_output=True,
        text=True,
    )
    return float(done.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--url", default=os.environ.get("WORQ_BENCH_URL", "redis://127.0.0.1:6379/10")
    )
    parser.add_argument("--runs", type=int, default=11)
    args = parser.parse_args()
    prefix = f"startup-bench-{uuid.uuid4().hex[:8]}"
    url = f"{args.url}?prefix={prefix}"
    import redis

    client = redis.Redis.from_url(args.url)
    with tempfile.TemporaryDirectory() as tmp:
        here = Path(tmp)
        stamp = here / "stamp"
        (here / "keeper_bench_app.py").write_text(textwrap.dedent(KEEPER_APP.format(url=url)))
        (here / "keeper_bench.py").write_text(KEEPER)
        cases = {
            "floor": FLOOR.format(url=args.url, key=f"{prefix}:floor"),
            "producer, redis://": PRODUCER.format(url=url, queue="nobody"),
            "producer, memory://": PRODUCER.format(url="memory://", queue="default"),
        }
        times: dict[str, list[float]] = {name: [] for name in [*cases, "recipe", "app import"]}
        try:
            for _ in range(args.runs):
                for name, code in cases.items():
                    times[name].append(spawned(code, stamp, here))
                for how in ("recipe", "app import"):
                    times[how].append(keeper_start(how.split()[0], here))
        finally:
            for key in client.scan_iter(match=f"{prefix}*", count=1000):
                client.delete(key)
            client.close()
    median = {name: statistics.median(values) for name, values in times.items()}
    floor, recipe, fallback = median["floor"], median["recipe"], median["app import"]
    rows = [
        ("interpreter, redis-py, one LPUSH (the floor)", floor, ""),
        *(
            (f"{name}: spawn to its first enqueue", median[name], f"{median[name] / floor:.2f}x")
            for name in ("producer, redis://", "producer, memory://")
        ),
        ("lease keeper from the broker's recipe: spawn to ready", recipe, ""),
        ("lease keeper importing the app: spawn to ready", fallback, f"{fallback / recipe:.2f}x"),
    ]
    print(f"start-up, medians of {args.runs} runs taking turns (Python {sys.version.split()[0]})")
    print("| case | median | ratio (producers: to the floor; keeper: to its recipe) |")
    print("|---|---:|---:|")
    for name, value, ratio in rows:
        print(f"| {name} | {value * 1000:.0f} ms | {ratio} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
