"""The Lua scripts behind every state change of a worq-redis queue, and how they are loaded.

The scripts are files of this package (``worq_redis/lua/<name>.lua``), each run after the
shared ``helpers.lua`` (:func:`source`).

Every queue script is atomic and takes the keys it touches in ``KEYS``: the ten keys of one
queue, in the order of :data:`QUEUE_KEY_SUFFIXES`, then the prefix's job-id index (``KEYS[11]``,
shared by every queue, see :func:`worq_redis.connection.ids_key`), then per-job result keys where
it writes or deletes records (``enqueue`` and ``fire_schedule`` put the queue registry at
``KEYS[12]`` first, and ``fire_schedule`` the schedules hash at ``KEYS[13]``, sending its job
as workflow messages are sent, by name). The keys of
unique jobs and limits (:data:`DERIVED_KEY_SUFFIXES` and the per-key ``u:``, ``r:``, ``c:``,
``w:`` keys) are built by name from the queue's base, the name of ``KEYS[1]`` without
``ready`` (``qkey()``): their number depends on the jobs, and they share the queue's hash tag,
so a script still touches one slot besides the index. A plain job's script calls pass exactly
the keys they passed before those keys existed. Every script validates its arguments before its
first write, so a script that fails changes nothing. The one exception is ``job_state``, a
read-only lookup by job id alone: it takes the index and reads the keys of the queue it finds
there.

Under Redis Cluster, the scripts whose single-server form reaches other slots by name (a
settlement's ``then`` messages and group counts, a cancel's, a tick's job for another queue) run
as ``<name>@cluster`` (:data:`CLUSTER_VARIANTS`): the same file, with the helpers of
``cluster.lua`` in place of their namesakes, which append those effects to the queue's outbox
instead; the :data:`CLUSTER_SCRIPTS` apply them in their own slots (see ``docs/redis.md``).

``ARGV[1]`` of every script is the clock: empty for Redis ``TIME`` (the normal case), or a Unix
time in seconds that tests pass to drive time by hand.

A job's small state lives in the queue's ``meta`` hash as ``state|attempts|seq|score|extra``,
followed by ``|flags`` when it has any:

* ``state``: ``q`` queued, ``s`` scheduled (or waiting for its rate slot), ``r`` retrying, ``l``
  leased (running), ``d`` dead, ``w`` parked (waiting for a concurrency permit);
* ``attempts``: fetches so far (a release takes its fetch back);
* ``seq``: a 16-digit sequence number from enqueue (or requeue), so FIFO holds within a priority;
* ``score``: the job's ``ready`` score, minus its priority;
* ``extra``: the lease token when leased, the time it died when dead, else empty;
* ``flags``: ``c`` when a cancel was requested while it ran (until it is settled), ``p`` while
  the queue's ``progress`` hash holds its progress (only while leased), ``u`` / ``U`` while it
  holds a unique key until done / until started (its record is in the ``unique`` hash), ``L``
  when it has limits (its record is in the ``limits`` hash), ``g`` while the rate slot it
  reserved is granted (set aside until the slot, or handed back unstarted by ``release``;
  cleared at its lease), ``k`` when it was woken
  from parking and a permit is reserved for it in ``c:<key>`` (cleared at its lease, or when
  its rate sets it aside and the permit goes on; should it ever be parked again, it goes back
  to the front of the line).
  Jobs without flags keep the five-field form, so the hot path writes exactly what it wrote
  before flags existed, and takes exactly the code path it took before.

A queued job's member in ``ready`` is ``seq .. id``: equal scores sort by member, so the
sequence number keeps FIFO order within a priority level without limiting the priority range.

The index ``<prefix>:ids`` maps every job id the broker holds, in any state and any queue, to
its queue: enqueue adds an id only if the index lacks it (``HSETNX``, or ``HMGET`` for a batch),
and the scripts that drop a job for good (ack, cancel of a waiting job, purge and trim of dead
jobs) remove it, so an id is unique across the queues of a prefix.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from importlib import resources
from typing import Final

QUEUE_KEY_SUFFIXES: Final = (
    "ready",
    "delayed",
    "leased",
    "jobs",
    "meta",
    "dead",
    "signal",
    "seq",
    "reason",
    "progress",
)
"""The keys of one queue, as they are passed to every queue script (``KEYS[1]`` .. ``KEYS[10]``).

``KEYS[11]`` is the prefix's job-id index, and result keys (when a script takes any) follow it."""

DERIVED_KEY_SUFFIXES: Final = ("unique", "limits", "aside")
"""Further keys of one queue, which the scripts build by name from the queue's base (so they
share its hash tag) rather than take in ``KEYS``; they exist only while unique or limited jobs
use them:

* ``unique``: HASH job id -> ``mode|hold ms|key`` (mode ``s`` until started, ``d`` until done),
  for the unique jobs that have not let go of their key;
* ``limits``: HASH job id -> ``permits|interval|burst|bytes of ckey|ckey rkey``, for jobs with
  limits (``permits`` 0: no concurrency limit; ``interval`` empty: no rate limit);
* ``aside``: HASH parked job id -> its concurrency key.

With them, per key (the user's key after the colon): ``u:<key>`` STRING, the id of the job
holding a unique key (no TTL while it holds it; PX hold_for after it let go); ``r:<key>``
STRING, a rate key's theoretical arrival time, expiring when it falls behind the clock;
``c:<key>`` SET, the jobs holding a concurrency permit (counted while their lease is unexpired);
``w:<key>`` LIST, the jobs parked for a permit, oldest first."""

QUEUE_SCRIPTS: Final = (
    "enqueue",
    "fetch",
    "extend",
    "extend_worker",
    "settle",
    "settle_fetch",
    "release",
    "reap",
    "cancel",
    "stats",
    "dead_jobs",
    "list_jobs",
    "requeue_dead",
    "purge_dead",
    "fire_schedule",
    "open_group",
)
"""Scripts that take the ten keys of one queue and the id index (``enqueue``, ``settle``,
``settle_fetch`` and ``cancel`` may add result keys after them; ``enqueue`` and
``fire_schedule`` take the queue registry as ``KEYS[12]``, and ``fire_schedule`` the schedules
hash as ``KEYS[13]``)."""

ONE_JOB_SCRIPTS: Final = ("enqueue_one",)
"""The one-by-one enqueue of a plain job (no eta, unique key, limits, workflow record or record to
clear) into a registered queue: it takes that queue's ``ready``, ``jobs``, ``meta``, ``signal``
and ``seq`` and the id index alone, and makes exactly the calls ``enqueue`` makes for such a job,
with half the arguments to hand over."""

SCHEDULE_SCRIPTS: Final = ("schedule_cas",)
"""Scripts that take the prefix's schedules hash alone."""

LOOKUP_SCRIPTS: Final = ("job_state", "find_job")
"""Scripts that take the id index alone and find the job's queue in it."""

RESULT_SCRIPTS: Final = ("save_result", "arm_wait")
"""Scripts that take the three keys of one job's result."""

HELPERS: Final = "helpers"
"""The file every script starts with: the queue's key locals and the shared ``local function``s."""

CLUSTER: Final = "cluster"
"""The helpers of the Redis Cluster layout (``cluster.lua``): its head, the outbox, and helpers
that replace those of ``helpers.lua`` with the same name (see :func:`source`)."""

CLUSTER_VARIANTS: Final = ("settle", "settle_fetch", "cancel", "fire_schedule")
"""Scripts that run under Redis Cluster as ``<name>@cluster``: the same file with the helpers of
``cluster.lua`` in place of their namesakes (effects on other slots go to the queue's outbox),
answering ``{reply, outbox entries added}``."""

CLUSTER_SCRIPTS: Final = ("forward", "outbox_claim", "group_open", "group_count", "group_sent")
"""Scripts of the Redis Cluster layout alone: ``forward`` and ``outbox_claim`` take one queue's
keys (``outbox_claim`` its outbox alone), the ``group_*`` scripts one group's key."""

_SUFFIX: Final = "@cluster"


@functools.cache
def _file(name: str) -> str:
    """The text of ``lua/<name>.lua``, shipped as package data."""
    return resources.files(__package__).joinpath("lua", f"{name}.lua").read_text("utf-8")


@dataclass(frozen=True, slots=True)
class _Block:
    """Lines of a ``.lua`` file: the helper ``name`` defines (``""``: the head), from ``line``."""

    name: str
    line: int
    text: str
    file: str = HELPERS


_DEFINES = re.compile(r"local function (\w+)\(")
_CALLS = re.compile(r"\b(\w+)\(")  # the names a text calls, found in one pass


@functools.cache
def _helpers(file: str = HELPERS) -> tuple[_Block, ...]:
    """A helper file cut at its blank lines: the head, then one block per helper.

    The file's one convention: at the top level it holds, between blank lines, the head, then
    ``local function`` definitions (their comments above them), each ending with ``end`` alone
    on its line, a helper calling only helpers defined above it. Anything else is an error here.
    """
    lines = _file(file).split("\n")
    blocks: list[_Block] = []
    start = 0
    for number, line in enumerate([*lines, ""]):
        if line == "" and start < number:
            text = "\n".join(lines[start:number])
            found = _DEFINES.search(text)
            name = "" if not blocks else found[1] if found else "?"
            if blocks and (found is None or not text.endswith("\nend")):
                raise ValueError(f"{file}.lua:{start + 1}: not one local function ending in end")
            blocks.append(_Block(name, start + 1, text, file))
        if line == "":
            start = number + 1
    return tuple(blocks)


@functools.cache
def _layout(cluster: bool) -> tuple[tuple[_Block, ...], tuple[_Block, ...]]:
    """The heads and the helpers, in order, of the single-server or the Cluster scripts.

    Under Cluster, each helper of ``cluster.lua`` that has a namesake in ``helpers.lua`` takes
    its place, and the new ones before it in ``cluster.lua`` come just before it (so they may
    call every helper above the one replaced); new ones after the last replacement come last.
    """
    head, *shared = _helpers(HELPERS)
    if not cluster:
        return (head,), tuple(shared)
    cluster_head, *own = _helpers(CLUSTER)
    replaced = {block.name for block in shared} & {block.name for block in own}
    pending = list(own)
    merged: list[_Block] = []
    for block in shared:
        if block.name not in replaced:
            merged.append(block)
            continue
        while pending:
            ours = pending.pop(0)
            merged.append(ours)
            if ours.name == block.name:
                break
    return (head, cluster_head), (*merged, *pending)


@functools.cache
def _compose(name: str) -> tuple[str, tuple[tuple[int, str, int], ...]]:
    """The source of script ``name`` and its line map: (first line, file, its line there)."""
    base, variant = name.removesuffix(_SUFFIX), name.endswith(_SUFFIX)
    known = (
        *QUEUE_SCRIPTS,
        *ONE_JOB_SCRIPTS,
        *SCHEDULE_SCRIPTS,
        *LOOKUP_SCRIPTS,
        *RESULT_SCRIPTS,
        *CLUSTER_SCRIPTS,
    )
    if (variant and base not in CLUSTER_VARIANTS) or base not in known:
        raise KeyError(name)
    cluster = variant or base in CLUSTER_SCRIPTS
    body = _file(base).rstrip("\n")
    if variant:
        # The script's reply and the outbox entries it added. Its first line is prefixed and
        # one line follows its last, so every line of the file keeps its number.
        body = f"local function script_body() {body}\nend return cluster_reply(script_body())"
    heads, helpers = _layout(cluster)
    needed: set[str] = set()
    called = set(_CALLS.findall(body))
    for block in reversed(helpers):  # a helper only calls helpers defined above it
        if block.name in called:
            needed.add(block.name)
            called.update(_CALLS.findall(block.text))
    parts = [*heads, *(block for block in helpers if block.name in needed)]
    parts.append(_Block(base, 1, body, base))
    places: list[tuple[int, str, int]] = []
    at = 1
    for part in parts:
        places.append((at, f"{part.file}.lua", part.line))
        at += part.text.count("\n") + 2  # its lines, and the blank line joining the next
    return "\n\n".join(part.text for part in parts) + "\n", tuple(places)


def source(name: str) -> str:
    """The full source Redis runs for script ``name``.

    The head of ``helpers.lua`` (the queue's key locals), the helpers the script uses (directly
    or through other helpers), then ``<name>.lua``. ``<name>@cluster`` (for the
    :data:`CLUSTER_VARIANTS`) and the :data:`CLUSTER_SCRIPTS` take the helpers of
    ``cluster.lua`` in place of their namesakes (after its head); a variant's body runs as a
    function whose reply goes back with the outbox entries it added. Only the helpers it uses:
    Redis runs a script's whole chunk on every call, and each ``local function`` in it is a
    closure built on every call (all 41 in every script made ``extend`` cost twice its server
    time). Raises
    ``KeyError`` for a name that is no script.
    """
    return _compose(name)[0]


_LINE = re.compile(r"user_script:(\d+)")


def locate(name: str, message: str) -> str:
    """``message`` (a Redis error from script ``name``) with ``user_script:<n>`` made a file line.

    Redis numbers the lines of the whole source; this names the ``.lua`` file and the line in it
    (``helpers.lua:120`` or ``enqueue.lua:40``), so an error points at the line an editor shows.
    """
    places = _compose(name)[1]

    def where(match: re.Match[str]) -> str:
        line = int(match[1])
        first, file, there = next(place for place in reversed(places) if place[0] <= line)
        return f"{file}:{there + line - first}"

    return _LINE.sub(where, message)
