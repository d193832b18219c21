"""What producers and workers import: only what they use (issue 13, "fast start").

Each case runs in a fresh interpreter (this test process has imported everything), and counts
only what was loaded after the interpreter's own start-up, so a site hook does not count:

- a worker of sync tasks on a broker the lease keeper cannot share needs neither asyncio nor
  multiprocessing (tens of milliseconds each);
- a producer that only enqueues needs neither the worker, nor workflows, nor click;
- an app without schedules needs no time zones;
- ``worq worker`` needs neither the modules of the CLI's other commands nor, for an app on
  ``memory://``, the other installed backends (worq-redis brings redis-py);
- a process the ``worq`` script spawns (the lease keeper) does not import the CLI again;
- the lazy ``worq_core`` namespace lists each public name the same way three times.
"""

from __future__ import annotations

import ast
import importlib.metadata
import json
import os
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

import pytest

APP = """
import json, sys
before = set(sys.modules)
from worq_core import Worq
from worq_core.registry import Registry
from worq_core.serializers import MsgpackSerializer
from worq_memory import MemoryBroker, MemoryStorage

# Built by hand, as an embedded app may be: no entry point, no plugin but the memory broker.
app = Worq(MemoryBroker(), storage=MemoryStorage(), serializer=MsgpackSerializer(),
           registry=Registry())

@app.task
def add(x: int, y: int) -> int:
    return x + y

{extra}
jobs = [add.enqueue(1, 2)] + [{more}]
{then}
print(json.dumps({{"results": results, "loaded": sorted(set(sys.modules) - before)}}))
"""
WORK = """
app.worker().run(burst=True)
results = [job.result(timeout=10) for job in jobs]
"""
ONLY_SEND = 'results = [stats.ready for stats in app.broker.stats(["default"])]'


def run_app(extra: str = "", more: str = "", then: str = WORK) -> dict[str, list[object]]:
    """Run the app in a fresh interpreter: its results, and the modules it loaded."""
    code = APP.format(extra=extra, more=more, then=then)
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    answer: dict[str, list[object]] = json.loads(done.stdout)
    return answer


def within(loaded: Iterable[object], names: tuple[str, ...]) -> list[str]:
    """The ``names`` of which ``loaded`` holds the module or one of its submodules."""
    modules = [str(m) for m in loaded]
    return sorted(n for n in names if any(m == n or m.startswith(f"{n}.") for m in modules))


SPAWNED = ("asyncio", "multiprocessing")
WORKER_ONLY = ("worq_core.worker", "worq_core.lease_keeper", "worq_core.supervisor")
OTHER_BACKENDS = ("worq_redis", "worq_postgres", "redis", "psycopg")
OTHER_COMMANDS = ("worq_core.canvas", "worq_core.inspection", "worq_core.supervisor", "rich")
SCHEDULES_ONLY = ("zoneinfo", "croniter")  # zoneinfo reads sysconfig to find the zone files


def test_a_worker_of_sync_tasks_on_the_memory_broker_imports_neither() -> None:
    answer = run_app()
    assert answer["results"] == [3]
    assert within(answer["loaded"], SPAWNED) == []


def test_an_async_task_brings_asyncio_in_and_runs() -> None:
    extra = "@app.task\nasync def twice(x: int) -> int:\n    return 2 * x\n"
    answer = run_app(extra, "twice.enqueue(21)")
    assert answer["results"] == [3, 42]
    assert within(answer["loaded"], SPAWNED) == ["asyncio"]


def test_a_producer_loads_neither_the_worker_nor_workflows_nor_click() -> None:
    answer = run_app(then=ONLY_SEND)
    assert answer["results"] == [1]  # the job is queued
    assert "worq_core.app" in answer["loaded"]  # the check sees what the producer did load
    unwanted = (*WORKER_ONLY, *OTHER_COMMANDS, "click", *SPAWNED, *SCHEDULES_ONLY)
    assert within(answer["loaded"], unwanted) == []


CLI_APP = """
import json, os, sys
from worq_core import Worq

app = Worq("memory://")

@app.task
def report() -> None:
    with open(os.environ["REPORT_TO"], "w") as f:
        json.dump(sorted(sys.modules), f)

report.enqueue()
"""


def test_worq_worker_on_memory_loads_no_other_backend_nor_other_commands_modules(
    tmp_path: Path,
) -> None:
    (tmp_path / "startup_app.py").write_text(CLI_APP)
    report = tmp_path / "modules.json"
    env = {**os.environ, "REPORT_TO": str(report), "PYTHONPATH": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-m", "worq_core.cli", "worker", "startup_app:app", "--burst"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    loaded = set(json.loads(report.read_text()))
    assert "worq_core.worker.core" in loaded
    assert within(loaded, (*OTHER_COMMANDS, *SCHEDULES_ONLY)) == []
    # An app on memory:// loads worq-memory's plugin only, whatever else is installed.
    assert "worq_memory.plugin" in loaded
    assert within(loaded, OTHER_BACKENDS) == []


SPAWNING_SCRIPT = """
import json, multiprocessing, sys
from {module} import {attr}  # what the installed console script does

def report(queue):
    queue.put(sorted(sys.modules))

if __name__ == "__main__":
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    child = context.Process(target=report, args=(queue,))
    child.start()
    print(json.dumps(queue.get(timeout=60)))
    child.join()
"""


def test_a_process_the_worq_script_spawns_does_not_import_the_cli(tmp_path: Path) -> None:
    # multiprocessing runs the parent's script again, as __mp_main__, in every process it
    # spawns: the lease keeper of a `worq worker` would import click and the whole CLI.
    [script] = importlib.metadata.entry_points(group="console_scripts", name="worq")
    (tmp_path / "worq_script.py").write_text(
        SPAWNING_SCRIPT.format(module=script.module, attr=script.attr)
    )
    done = subprocess.run(
        [sys.executable, "worq_script.py"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    in_child = json.loads(done.stdout)
    assert "multiprocessing.spawn" in in_child  # the report came from a spawned process
    assert within(in_child, ("click", "worq_core.cli")) == []


def test_every_public_name_is_listed_once_and_resolves_to_its_module() -> None:
    import importlib

    import worq_core

    source = Path(worq_core.__file__).read_text()
    checked = next(
        node
        for node in ast.parse(source).body
        if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING"
    )
    for_type_checkers = {
        alias.name: node.module
        for node in checked.body
        if isinstance(node, ast.ImportFrom)
        for alias in node.names
    }
    lazy = worq_core._LAZY
    assert for_type_checkers == lazy
    assert sorted(worq_core.__all__) == sorted([*lazy, "__version__"])
    for name, module in lazy.items():
        assert getattr(worq_core, name) is getattr(importlib.import_module(module), name)
    assert set(worq_core.__all__) <= set(dir(worq_core))
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        _ = worq_core.Nope


def test_submodules_are_attributes_of_the_package_as_before() -> None:
    code = (
        "import worq_core\n"
        "assert worq_core.models.JobStatus.QUEUED.value == 'queued'\n"
        "assert worq_core.worker.Worker.__name__ == 'Worker'\n"
        "try:\n"
        "    worq_core.nosuch\n"
        "except AttributeError as exc:\n"
        "    print(exc)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "module 'worq_core' has no attribute 'nosuch'"
