"""Workflows across real `worq worker` processes on real Redis, with workers SIGKILLed.

A chord's callback runs exactly once with every result however often workers die, and a chain
goes on when its worker is killed right after each step settled (the moment between a step's
acknowledgement and its next step's start).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest
from redis_support import Runtime, children, stop

from worq_core import Worq, chain, chord

RUNTIME_APP = "workflow_app"
"""The app module the ``runtime`` fixture runs."""
MAX_KILLS = 45
"""SIGKILLs at most in the chord test: 15 per worker slot, half the supervisor's give-up bound."""


@pytest.mark.timeout(180)
def test_a_chords_callback_is_sent_once_with_every_result_while_workers_are_killed(
    runtime: Runtime,
) -> None:
    size = 1000
    app = runtime.app()
    flow = chord(
        (app.tasks["member"].s(i) for i in range(size)), app.tasks["collect"].s()
    ).enqueue()
    supervisor = runtime.worker(
        "--processes", "3", "--concurrency", "4", "--queues", "wf", "--lease", "2"
    )
    kills = 0
    deadline = time.monotonic() + 120
    while not runtime.ledger("callback"):
        if time.monotonic() >= deadline:
            pytest.fail(_stuck_chord(runtime, app, flow.id, supervisor, kills))
        assert supervisor.poll() is None, supervisor.communicate()[1][-3000:]
        time.sleep(0.5)  # one SIGKILL every half second, whatever the workers are doing
        workers = children(supervisor.pid)
        # At most MAX_KILLS: the supervisor rightly gives up on a slot that dies 30 times in a
        # minute, which one kill per 0.5 s over three slots reaches when a loaded machine makes
        # the chord take longer than 45 s.
        if workers and not runtime.ledger("callback") and kills < MAX_KILLS:
            os.kill(workers[kills % len(workers)], signal.SIGKILL)
            kills += 1
    assert flow.result(timeout=30) == size
    time.sleep(3.0)  # a duplicate callback would have its lease run out and run by now
    log = stop(supervisor)
    assert supervisor.returncode == 0, log[-3000:]
    callbacks = [json.loads(run) for run in runtime.ledger("callback")]
    runs = [(run["id"], run["attempt"]) for run in callbacks]
    # The promise (guarantees.md, "Workflow links"): the callback is sent once. Like any job it
    # then runs at least once: a kill between its run and its ack, or a lease that ran out on
    # a machine this loaded, runs the same job again, with a later attempt.
    assert len({job_id for job_id, _ in runs}) == 1, (
        f"the callback was sent more than once (job id, attempt): {runs}, after {kills}"
        f" SIGKILLs; workers' log:\n{log[-6000:]}"
    )
    assert len({attempt for _, attempt in runs}) == len(runs), f"one run per attempt: {runs}"
    assert all(run["values"] == list(range(size)) for run in callbacks), "every result, in order"
    members = [int(n) for n in runtime.ledger("member")]
    assert set(members) == set(range(size))
    assert app.broker.group_state(flow.id) is None, "the callback released the group"
    print(
        f"\nchord: {size} members, {kills} SIGKILLs, {len(members) - size} member re-runs,"
        f" callback runs (job id, attempt): {runs}"
    )
    assert kills >= 1


def _stuck_chord(
    runtime: Runtime, app: Worq, group_id: str, supervisor: subprocess.Popen[str], kills: int
) -> str:
    """What a chord that never called back left: its group, its queue and the workers' log."""
    members = {int(n) for n in runtime.ledger("member")}
    stats = app.broker.stats(["wf"])
    dead = app.broker.dead_jobs("wf", limit=5)
    for worker in children(supervisor.pid):
        os.kill(worker, signal.SIGKILL)
    log = stop(supervisor)
    return (
        f"the callback never ran after {kills} SIGKILLs: {len(members)} distinct members ran"
        f" (missing: {sorted(set(range(1000)) - members)[:20]});"
        f" group {app.broker.group_state(group_id)};"
        f" queue {stats}; dead {[(d.id, d.reason) for d in dead]}\nworkers' log:\n{log[-4000:]}"
    )


@pytest.mark.timeout(400)
def test_a_chain_goes_on_when_its_worker_is_killed_in_every_step(runtime: Runtime) -> None:
    steps = 50
    app = runtime.app()
    step = app.tasks["step"]
    flow = chain(step.s(0), *[step.s() for _ in range(steps - 1)]).enqueue()
    deadline = time.monotonic() + 300
    running = runtime.worker("--queues", "wf", "--lease", "1")
    for n in range(steps):
        # Step n has started in `running` (it waits for the test). A second worker is started,
        # `running` is SIGKILLed, and step n may finish: its lease runs out, the second worker
        # runs it again, and that run's ack sends step n + 1 in the same broker step.
        while str(n).encode() not in runtime.ledger("step"):
            assert time.monotonic() < deadline, f"step {n} never started"
            assert running.poll() is None, running.communicate()[1][-3000:]
            time.sleep(0.01)
        standby = runtime.worker("--queues", "wf", "--lease", "1")
        os.kill(running.pid, signal.SIGKILL)
        running.communicate(timeout=10)
        runtime.client.set(f"{runtime.log}:go:{n}", 1)
        running = standby
    assert flow.result(timeout=60) == steps
    log = stop(running)
    assert running.returncode == 0, log[-3000:]
    ran = [int(n) for n in runtime.ledger("step")]
    assert sorted(set(ran)) == list(range(steps)), "no step was skipped"
    assert all(ran.count(n) == 2 for n in range(steps)), "each step: the killed run, then one"
    print(f"\nchain: {steps} steps, {steps} SIGKILLs, every step run twice, result {steps}")
