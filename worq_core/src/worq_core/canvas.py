"""Workflows: signatures, chains, groups and chords, on the broker's WORKFLOWS capability.

``add.s(1, 2)`` is a :class:`Signature`: a task, its arguments and options, nothing sent.
:func:`chain` runs steps one after another, each receiving the previous step's result as its
first argument; :func:`group` runs its members in parallel; :func:`chord` is a group followed
by a callback that receives the list of the members' results. They nest.

Nothing here polls or holds state in a process. A workflow is compiled, when it is enqueued,
into messages whose envelopes carry their links (``Envelope.workflow``):

* ``next``: the steps to send when this job succeeds. The worker builds their messages (the
  result prepended to their arguments) and hands them to the broker in the settlement that
  acknowledges this job (:attr:`Settlement.then`): one atomic step, so a kill between the two
  can neither lose the next step nor send it twice.
* ``member``: the job ends a member of a group; its settlement carries its record as
  :attr:`Settlement.output`, and the broker counts it in the same step
  (:meth:`Broker.open_group`). The step that counts the last member enqueues the group's
  callback, which the group's record holds from the moment the workflow was enqueued.
* ``chord``: the job is a chord's callback; before it runs, the worker reads the members'
  outputs (:meth:`Broker.group_state`) and prepends their results as one list. The callback's
  message ``closes`` the group, so the outputs are kept exactly until the callback finished,
  whatever the result TTL, and then released.

Every group is recorded before any message is sent, so no member can settle into a group that
does not exist yet.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar, cast

from worq_core.errors import (
    DeserializationError,
    JobCancelled,
    PayloadTooLarge,
    ResultTimeout,
    TaskError,
    UnsupportedError,
    WorqError,
)
from worq_core.job import Envelope, Job, decode_record, encode_cancelled
from worq_core.models import (
    Capability,
    GroupMember,
    GroupSpec,
    JobStatus,
    Message,
    Outcome,
    Settlement,
)
from worq_core.task import tell_sent

if TYPE_CHECKING:
    from worq_core.app import Worq
    from worq_core.task import BoundTask

R = TypeVar("R")


CHORD_STATE_TTL = 7 * 86400.0
"""How long a chord's group state outlives its completion if its callback never settles."""


class WorkflowError(WorqError):
    """A workflow step cannot go on: for instance a chord's group state is gone."""


__all__ = [
    "Chain",
    "Chord",
    "Group",
    "Signature",
    "Workflow",
    "WorkflowError",
    "WorkflowNode",
    "WorkflowStatus",
    "chain",
    "chord",
    "group",
]


class _Composable:
    """What every workflow part can do: be sent, and be chained with ``|``."""

    def enqueue(self) -> Workflow:
        """Send it; see :func:`enqueue`."""
        return enqueue(cast("Node", self))

    def __or__(self, other: Node) -> Chain:
        return chain(cast("Node", self), other)


@dataclass(frozen=True)
class Signature(_Composable, Generic[R]):
    """A task call that has not been sent: made by ``task.s(...)``.

    In a chain, every step but the first receives the previous step's result as its first
    argument, before ``args``. ``enqueue()`` sends it as a one-step workflow.
    """

    bound: BoundTask[Any, R]
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """The task's name."""
        return self.bound.task.name

    def __repr__(self) -> str:
        arguments = [repr(a) for a in self.args] + [f"{k}={v!r}" for k, v in self.kwargs.items()]
        return f"{self.name}.s({', '.join(arguments)})"


@dataclass(frozen=True)
class Chain(_Composable):
    """Steps run one after another; each receives the previous one's result first."""

    steps: tuple[Node, ...]


@dataclass(frozen=True)
class Group(_Composable):
    """Members run in parallel; the group's result is the list of theirs, in order."""

    members: tuple[Node, ...]


@dataclass(frozen=True)
class Chord(_Composable):
    """A group, then a callback run once with the list of the members' results.

    With ``run_on_failure`` the callback also runs when a member ended dead or cancelled, and
    finds that member's error (:class:`~worq_core.JobFailed` or :class:`~worq_core.JobCancelled`)
    in its place in the list; without it (the default) the chord stops there and the workflow
    has failed with that member's error.
    """

    header: Group
    callback: Node
    run_on_failure: bool = False


Node = Signature[Any] | Chain | Group | Chord
"""Anything a workflow is made of."""


def chain(*steps: Node) -> Chain:
    """Run ``steps`` in order; each receives the previous step's result as its first argument.

    Nested chains are flattened. The chain's result is its last step's.
    """
    flat: list[Node] = []
    for step in steps:
        flat.extend(step.steps if isinstance(step, Chain) else [_check(step)])
    if not flat:
        raise TaskError("a chain needs at least one step")
    return Chain(tuple(flat))


def group(*members: Node | Iterable[Node]) -> Group:
    """Run ``members`` in parallel: ``group(a.s(1), a.s(2))`` or ``group(a.s(i) for i in ids)``.

    The group's result is the list of the members' results, in order.
    """
    flat: list[Node] = []
    for member in members:
        if isinstance(member, Signature | Chain | Group | Chord):
            flat.append(member)
        else:
            flat.extend(_check(m) for m in member)
    return Group(tuple(flat))


def chord(header: Group | Iterable[Node], callback: Node, *, run_on_failure: bool = False) -> Chord:
    """Run ``header``'s members, then ``callback`` once with the list of their results."""
    members = header if isinstance(header, Group) else group(header)
    return Chord(members, _check(callback), run_on_failure)


def _check(node: Any) -> Node:
    if not isinstance(node, Signature | Chain | Group | Chord):
        raise TaskError(f"a workflow is made of task.s(...) signatures, not {node!r}")
    return node


# -- handles -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkflowStatus:
    """Where a workflow stands: its status, and the step it is at (0-based, in chain order)."""

    status: JobStatus
    step: int
    task: str
    """The name of the task at that step (for a group, its members' tasks joined by ``|``)."""


@dataclass(frozen=True)
class _Shape:
    """What the handle knows of a compiled node: its jobs' ids, in the node's structure."""

    kind: str  # "task", "chain", "group"
    id: str = ""  # a task's job id, or a group's id
    name: str = ""
    parts: tuple[_Shape, ...] = ()
    callback: _Shape | None = None  # a chord's
    lenient: bool = False  # a chord with run_on_failure: a failed member fails nothing

    def failing(self) -> list[str]:
        """The ids whose failure fails the workflow at this step."""
        if self.kind == "group":
            return [] if self.lenient else _members(self)
        return self.last()

    def last(self) -> list[str]:
        """The ids whose results make this node's result (a group: one per member)."""
        if self.kind == "task":
            return [self.id]
        if self.kind == "chain":
            return self.parts[-1].last()
        if self.callback is not None:
            return self.callback.last()
        return [i for part in self.parts for i in part.last()[-1:]]

    def steps(self) -> list[_Shape]:
        if self.kind == "chain":
            return [s for part in self.parts for s in part.steps()]
        if self.kind == "group" and self.callback is not None:
            return [dataclasses.replace(self, callback=None), *self.callback.steps()]
        return [self]

    def ids(self) -> list[str]:
        own = [self.id] if self.kind == "task" else []
        inner = [i for part in self.parts for i in part.ids()]
        return own + inner + (self.callback.ids() if self.callback is not None else [])

    def names(self) -> set[str]:
        """Every id in the shape: its jobs' and its groups'."""
        own = {self.id} if self.id else set()
        inner = {i for part in self.parts for i in part.names()}
        return own | inner | (self.callback.names() if self.callback is not None else set())

    def to_data(self) -> dict[str, Any]:
        """The shape as plain data, for the workflow's record."""
        data: dict[str, Any] = {"k": self.kind}
        if self.id:
            data["i"] = self.id
        if self.name:
            data["n"] = self.name
        if self.parts:
            data["p"] = [part.to_data() for part in self.parts]
        if self.callback is not None:
            data["c"] = self.callback.to_data()
        if self.lenient:
            data["l"] = True
        return data

    @classmethod
    def from_data(cls, data: Mapping[str, Any]) -> _Shape:
        callback = data.get("c")
        return cls(
            str(data["k"]),
            str(data.get("i", "")),
            str(data.get("n", "")),
            tuple(cls.from_data(part) for part in data.get("p", ())),
            None if callback is None else cls.from_data(callback),
            bool(data.get("l", False)),
        )


_FAILED = frozenset({JobStatus.DEAD, JobStatus.CANCELLED})
_WAITING = frozenset({JobStatus.QUEUED, JobStatus.SCHEDULED, JobStatus.UNKNOWN})


def _overall(states: Sequence[JobStatus]) -> JobStatus:
    """The status of a part made of parts with ``states``.

    A failed part fails it; it succeeded when all parts did; it runs once any part started;
    ``UNKNOWN`` when nothing was sent yet.
    """
    failed = [s for s in states if s in _FAILED]
    if failed:
        return JobStatus.DEAD if JobStatus.DEAD in failed else JobStatus.CANCELLED
    if all(s is JobStatus.SUCCEEDED for s in states):
        return JobStatus.SUCCEEDED
    if any(s not in _WAITING for s in states):
        return JobStatus.RUNNING
    return JobStatus.QUEUED if JobStatus.QUEUED in states else states[0]


@dataclass(frozen=True)
class WorkflowNode:
    """One part of a workflow as :meth:`Workflow.tree` shows it, with where it stands.

    ``kind`` is ``"task"`` (a job: ``id`` and ``task`` set), ``"chain"``, ``"group"`` (``id``
    is the group's) or ``"chord"`` (children: the group, then the callback). A task whose
    status is ``UNKNOWN`` has not been sent yet (or its record expired).
    """

    kind: str
    status: JobStatus
    id: str = ""
    task: str = ""
    children: tuple[WorkflowNode, ...] = ()


class Workflow:
    """The handle of an enqueued workflow."""

    def __init__(self, app: Worq, shape: _Shape, root: str, wid: str) -> None:
        self.app = app
        self._shape = shape
        self._wid = wid
        self.id = root
        """The workflow's id (its first job's id, or its group's)."""

    def __repr__(self) -> str:
        return f"<Workflow {self.id}>"

    @property
    def job_ids(self) -> list[str]:
        """Every job of the workflow, sent or not yet, in order."""
        return self._shape.ids()

    def _jobs(self, ids: Sequence[str]) -> list[Job[Any]]:
        return [Job(self.app, job_id) for job_id in ids]

    def tree(self) -> WorkflowNode:
        """The workflow's parts with the status of each: one status read per job."""
        return self._node(self._shape)

    def _node(self, shape: _Shape) -> WorkflowNode:
        if shape.kind == "task":
            status = Job(self.app, shape.id).status()
            return WorkflowNode("task", status, shape.id, shape.name)
        parts = tuple(self._node(part) for part in shape.parts)
        states = [part.status for part in parts]
        if shape.kind == "chain":
            return WorkflowNode("chain", _overall(states), children=parts)
        if shape.lenient:
            # A failed member fails nothing: it only counts as finished.
            states = [JobStatus.SUCCEEDED if s in _FAILED else s for s in states]
        members = WorkflowNode("group", _overall(states), shape.id, children=parts)
        if shape.callback is None:
            return members
        callback = self._node(shape.callback)
        status = _overall([members.status, callback.status])
        return WorkflowNode("chord", status, shape.id, children=(members, callback))

    def result(self, timeout: float | None = None) -> Any:
        """Wait for the workflow's result: its last step's (a group's: the list of results).

        Raises the failing step's :class:`~worq_core.JobFailed` when a step ended dead.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        self._raise_failed()
        last = self._shape.steps()[-1]
        if last.kind == "group":
            return [self._wait_member(part, deadline, timeout) for part in last.parts]
        return self._wait_member(last, deadline, timeout)

    def _wait_member(self, shape: _Shape, deadline: float | None, timeout: float | None) -> Any:
        """The result of ``shape``'s last job, which may never be sent (an earlier one died).

        Waits in short rounds, and gives up with the error of an earlier step of the workflow,
        or of ``shape`` itself (a member chain), as soon as one has failed.
        """
        job: Job[Any] = Job(self.app, shape.last()[-1])
        earlier = self._jobs([i for i in shape.ids() if i != job.id])
        while True:
            left = _left(deadline)
            try:
                return job.result(0.5 if left is None else min(0.5, left))
            except TimeoutError:
                self._raise_failed()
                for step in earlier:
                    if step.status() in (JobStatus.DEAD, JobStatus.CANCELLED):
                        step.result(0)  # raises its error
                if left is not None and left <= 0.5:
                    raise ResultTimeout(job.id, timeout) from None

    def _raise_failed(self) -> None:
        """Raise the error of an earlier step that failed: it stopped the workflow."""
        for shape in self._shape.steps()[:-1]:
            for job in self._jobs(shape.failing()):
                if job.status() in (JobStatus.DEAD, JobStatus.CANCELLED):
                    job.result(0)  # raises its error

    def results(self, timeout: float | None = None) -> list[Any]:
        """A group's members' results in order, a failed member's error in its place."""
        if self._shape.kind != "group":
            raise TaskError("results() is for a group; use result()")
        deadline = None if timeout is None else time.monotonic() + timeout
        out: list[Any] = []
        for part in self._shape.parts:
            try:
                out.append(self._wait_member(part, deadline, timeout))
            except (TimeoutError, TaskError):
                raise
            except Exception as exc:  # noqa: BLE001 - JobFailed / JobCancelled, kept in place
                out.append(exc)
        return out

    def status(self) -> WorkflowStatus:
        """Which step the workflow is at, and how it stands."""
        steps = self._shape.steps()
        for index, shape in enumerate(steps):
            ids = _members(shape) if shape.kind == "group" else shape.last()
            states = [job.status() for job in self._jobs(ids)]
            name = shape.name
            failed = {JobStatus.DEAD, JobStatus.CANCELLED}
            if shape.kind == "group" and not shape.lenient:
                # A member chain that failed early never reaches the last step counted above.
                inner = [i for part in shape.parts for i in part.ids() if i not in ids]
                states += [s for s in (job.status() for job in self._jobs(inner)) if s in failed]
            if shape.lenient:
                states = [JobStatus.SUCCEEDED if s in failed else s for s in states]
            if any(s in failed for s in states):
                worst = JobStatus.DEAD if JobStatus.DEAD in states else JobStatus.CANCELLED
                return WorkflowStatus(worst, index, name)
            if not all(s is JobStatus.SUCCEEDED for s in states):
                running = JobStatus.RUNNING in states
                return WorkflowStatus(
                    JobStatus.RUNNING if running or index else JobStatus.QUEUED, index, name
                )
        return WorkflowStatus(JobStatus.SUCCEEDED, len(steps) - 1, steps[-1].name)

    def cancel(self) -> int:
        """Cancel the workflow; returns how many of its jobs were reached.

        The workflow is marked cancelled first, so a step already running sends nothing when
        it finishes; then what waits is removed, what runs is asked to stop, and the steps not
        sent are given a cancellation record (which their handles read).
        """
        reached = 0
        storage, serializer = self.app.storage, self.app.serializer
        storage.save({_cancel_key(self._wid): encode_cancelled(serializer)}, self.app.result_ttl)
        for job in self._jobs(self.job_ids):
            if job.cancel():
                reached += 1
            elif storage.load(job.id) is None:
                storage.save({job.id: encode_cancelled(serializer)}, self.app.result_ttl)
                reached += 1
        return reached


def _cancel_key(wid: str) -> str:
    return f"workflow-{wid}-cancelled"


def _record_key(wid: str) -> str:
    return f"workflow-{wid}"


def _index_key(job_id: str) -> str:
    return f"workflow-of-{job_id}"


def _save_record(app: Worq, plan: _Plan, shape: _Shape, root: str) -> None:
    """Store the workflow's shape, so that any process can find it by any of its ids.

    A step's id is the workflow's id, a dot and a number, so its id names the record; a step
    whose id the caller fixed gets an index record instead. They live as long as results do.
    """
    dumps = app.serializer.dumps
    records = {_record_key(plan.wid): dumps({"v": 1, "id": root, "shape": shape.to_data()})}
    records.update({_index_key(job_id): dumps(plan.wid) for job_id in plan.fixed})
    app.storage.save(records, app.result_ttl)


def find(app: Worq, some_id: str) -> Workflow | None:
    """The workflow that ``some_id`` (a workflow's, a step's or a group's id) belongs to.

    ``None`` when it belongs to none, or the workflow's record expired (with the results).
    """
    storage, loads = app.storage, app.serializer.loads
    wid = some_id.rpartition(".")[0]
    body = storage.load(_record_key(wid)) if wid else None
    try:
        if body is None:
            index = storage.load(_index_key(some_id))
            if index is None:
                return None
            wid = str(loads(index))
            body = storage.load(_record_key(wid))
            if body is None:
                return None
        data = loads(body)
        shape = _Shape.from_data(data["shape"])
        root = str(data["id"])
    except (DeserializationError, KeyError, TypeError, ValueError) as exc:
        raise WorkflowError(f"the record of workflow {wid} cannot be read: {exc}") from exc
    if some_id not in shape.names():
        return None
    return Workflow(app, shape, root, wid)


def cancelled(app: Worq, workflow: Mapping[str, Any]) -> bool:
    """Whether the workflow a step's links belong to was cancelled (one storage read)."""
    wid = workflow.get("wf")
    return wid is not None and app.storage.load(_cancel_key(wid)) is not None


def _members(shape: _Shape) -> list[str]:
    return [i for part in shape.parts for i in part.last()[-1:]]


def _left(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


# -- compiling and sending ---------------------------------------------------------------------


@dataclass
class _Plan:
    """What enqueueing a workflow does: groups to record, then messages to send."""

    app: Worq
    groups: list[GroupSpec] = field(default_factory=list)
    wid: str = field(default_factory=lambda: _new_id())
    """The workflow's own id, in every step's links: where its cancellation is recorded."""
    count: int = 0
    fixed: list[str] = field(default_factory=list)
    """The steps whose caller fixed their id: their ids do not name the workflow."""

    def new_id(self) -> str:
        """The next id of a step or group: the workflow's id, a dot and a number."""
        self.count += 1
        return f"{self.wid}.{self.count}"

    def step(
        self,
        node: Signature[Any],
        *,
        pass_result: bool,
        member: GroupMember | None,
        after: list[dict[str, Any]],
        owner: GroupMember | None = None,
    ) -> tuple[dict[str, Any], _Shape]:
        bound = node.bound
        spec = bound._step_spec(
            list(node.args), dict(node.kwargs), pass_result=pass_result, job_id=self.new_id()
        )
        if spec.get("fixed"):
            self.fixed.append(spec["id"])
        links: dict[str, Any] = {}
        if after:
            links["next"] = after
        if member is not None:
            links["member"] = [member.group, member.index]
        if owner is not None:
            # An earlier step of a group member's chain: should it fail, the member fails.
            links["owner"] = [owner.group, owner.index]
        links["wf"] = self.wid
        spec["w"] = links
        return spec, _Shape("task", spec["id"], node.name)

    def compile(
        self,
        node: Node,
        *,
        pass_result: bool,
        member: GroupMember | None,
        after: list[dict[str, Any]],
        owner: GroupMember | None = None,
    ) -> tuple[list[dict[str, Any]], _Shape]:
        """The specs that start ``node`` (sent together), and its shape.

        ``after`` is what runs when the node finished: a list of specs (for a group, at most
        one: its callback). ``member`` is the group place the node's end counts in; ``owner``
        the place of the member chain the node is an earlier part of.
        """
        if isinstance(node, Signature):
            spec, shape = self.step(
                node, pass_result=pass_result, member=member, after=after, owner=owner
            )
            return [spec], shape
        if isinstance(node, Chain):
            entries, shapes = after, []
            steps = node.steps
            for position in range(len(steps) - 1, -1, -1):
                last = position == len(steps) - 1
                entries, shape = self.compile(
                    steps[position],
                    pass_result=pass_result if position == 0 else True,
                    member=member if last else None,
                    after=entries,
                    owner=owner if last else (member or owner),
                )
                shapes.append(shape)
            return entries, _Shape("chain", parts=tuple(reversed(shapes)))
        if isinstance(node, Chord):
            return self.group(node.header, pass_result, member, after, node.callback, node, owner)
        return self.group(node, pass_result, member, after, None, None, owner)

    def group(
        self,
        node: Group,
        pass_result: bool,
        member: GroupMember | None,
        after: list[dict[str, Any]],
        callback: Node | None,
        chord_: Chord | None,
        owner: GroupMember | None = None,
    ) -> tuple[list[dict[str, Any]], _Shape]:
        if not node.members and pass_result:
            raise TaskError("an empty group cannot follow a step: it would finish before it")
        gid = self.new_id()
        callback_shape: _Shape | None = None
        tail = after
        if callback is not None:
            tail, callback_shape = self.compile(
                callback, pass_result=True, member=member, after=after, owner=owner
            )
        elif member is not None:
            raise TaskError(
                "a group that is a member of another group needs a callback: make it a chord"
            )
        if len(tail) > 1:
            raise TaskError("after a group comes one task (a chord's callback), not a group")
        callback_message = None
        if tail:
            [spec] = tail
            spec["w"]["chord"] = gid
            if chord_ is not None and chord_.run_on_failure:
                spec["w"]["all"] = True
            callback_message = self.message(spec, closes=gid)
        entries: list[dict[str, Any]] = []
        shapes = []
        for index, part in enumerate(node.members):
            specs, shape = self.compile(
                part, pass_result=pass_result, member=GroupMember(gid, index), after=[]
            )
            entries.extend(specs)
            shapes.append(shape)
        self.groups.append(
            GroupSpec(
                gid,
                len(node.members),
                callback_message,
                # The callback is always sent: a strict chord's callback, finding a failed
                # member, ends dead in the worker (chord_arguments) and so releases the
                # group and fails whatever it is a member of, instead of leaving them waiting.
                run_on_failure=True,
                # A callback's outputs stay until the callback releases them (closes); the TTL
                # only bounds a state whose callback never settles. A plain group's outputs
                # are read by nobody (its handle reads the members' records).
                ttl=CHORD_STATE_TTL if callback_message is not None else 0.0,
            )
        )
        name = "|".join(sorted({s.name for s in shapes if s.name})) or "group"
        lenient = chord_ is not None and chord_.run_on_failure
        shape = _Shape("group", gid, name, tuple(shapes), callback_shape, lenient)
        if callback_shape is not None:
            return entries, dataclasses.replace(shape, name=name)
        return entries, shape

    def message(self, spec: dict[str, Any], *, closes: str | None = None) -> Message:
        """The message of a step spec sent as it stands (its arguments complete).

        Checked against the app's ``max_payload`` here, where the producer can be told; the
        steps sent later carry their predecessor's result and are not checked again.
        """
        message = build_message(self.app, spec, None, prepend=False, closes=closes)
        if len(message.body) > self.app.max_payload:
            raise PayloadTooLarge(self.app.serializer.name, len(message.body), self.app.max_payload)
        return message


def build_message(
    app: Worq,
    spec: dict[str, Any],
    value: Any,
    *,
    prepend: bool,
    closes: str | None = None,
) -> Message:
    """A step's message: its spec's envelope, with ``value`` first in its arguments if asked.

    Called where a workflow is enqueued and, for later steps, in the worker that settles the
    step before (with that step's result).
    """
    args = list(spec["args"])
    if prepend and spec.get("pass"):
        args.insert(0, value)
    links = dict(spec.get("w") or {})
    member = links.get("member")
    envelope = Envelope(
        spec["id"],
        spec["task"],
        args,
        dict(spec["kwargs"]),
        time.time(),
        spec.get("h") or {},
        spec.get("o") or {},
        links,
    )
    return Message(
        spec["id"],
        spec["queue"],
        envelope.encode(app.serializer),
        spec.get("p", 0),
        member=GroupMember(member[0], member[1]) if member else None,
        closes=closes if closes is not None else spec.get("closes"),
        clear_record=bool(spec.get("fixed")),
    )


def links(
    app: Worq,
    envelope: Envelope,
    settlement: Settlement,
    record: bytes | None,
    value: Any,
    *,
    succeeded: bool,
) -> Settlement:
    """A workflow step's settlement with its links: what the worker hands the broker.

    A step that succeeded sends its next steps (``value`` first in their arguments) with its
    acknowledgement; any other verdict sends none, which stops a chain there. A group
    member's acknowledgement or dead-lettering carries its record as its output.
    """
    workflow, queue = envelope.workflow, settlement.delivery.queue
    then: tuple[Message, ...] = ()
    if succeeded and workflow.get("next"):
        # One read per step that sends steps (none per group member): a cancelled workflow
        # sends nothing further, only the markers that fail the group places it leaves open.
        if cancelled(app, workflow):
            places = [s["w"].get("member") or s["w"].get("owner") for s in workflow["next"]]
            then = tuple(
                failed_marker(app, envelope, queue, place, "the workflow was cancelled")
                for place in places
                if place
            )
        else:
            then = tuple(build_message(app, s, value, prepend=True) for s in workflow["next"])
    elif workflow.get("owner") and not succeeded and settlement.outcome is not Outcome.RETRY:
        # The chain this step is part of will not reach its last step, which is the one its
        # group counts: send that place a marker that ends dead, counting the member failed.
        why = settlement.reason or "cancelled"
        then = (failed_marker(app, envelope, queue, workflow["owner"], why),)
    output = record if workflow.get("member") and settlement.outcome is not Outcome.RETRY else None
    if not then and output is None:
        return settlement
    return dataclasses.replace(settlement, then=then, output=output)


FAILED_MARKER_TASK = "worq.workflow.member_failed"
"""The task name of the marker a failed step of a member chain sends; a worker dead-letters
it at once (any worker: one without this code would, as an unknown task), so its group counts
the member failed."""


def failed_marker(
    app: Worq, envelope: Envelope, queue: str, place: Sequence[Any], why: str
) -> Message:
    """The marker that fails group ``place`` (group id, index), left open by ``envelope``'s step.

    It goes to ``queue``, the step's own, where a worker is listening.
    """
    group_id, index = place
    marker_id = _new_id()
    body = Envelope(
        marker_id,
        FAILED_MARKER_TASK,
        [f"step {envelope.id} ({envelope.task}) of the member chain failed: {why}"],
        {},
        time.time(),
        {},
        {},
        {"member": [group_id, index]},
    ).encode(app.serializer)
    return Message(marker_id, queue, body, member=GroupMember(group_id, index))


def chord_arguments(app: Worq, envelope: Envelope) -> Envelope:
    """A chord callback's envelope with the list of its group's results first in its arguments.

    A failed member's place holds its error (:class:`~worq_core.JobFailed` or
    :class:`~worq_core.JobCancelled`); a callback of a chord without ``run_on_failure`` that
    finds one raises it (the broker only sends such a callback when no member failed, but a
    member cancelled while running acknowledges). Raises :class:`WorkflowError` when the
    group's state is gone.
    """
    gid = envelope.workflow["chord"]
    state = app.broker.group_state(gid)
    if state is None:
        raise WorkflowError(f"chord callback {envelope.id}: the state of group {gid} is gone")
    results: list[Any] = []
    for index, output in enumerate(state.outputs):
        if output is None:
            results.append(JobCancelled(f"{gid}[{index}]"))
            continue
        _, item = decode_record(f"{gid}[{index}]", output, app.serializer)
        results.append(item)
    if not envelope.workflow.get("all"):
        failed = [item for item in results if isinstance(item, Exception)]
        if failed:
            raise failed[0]
    return dataclasses.replace(envelope, args=[results, *envelope.args])


def enqueue(node: Node) -> Workflow:
    """Send a workflow: its groups are recorded first, then its first jobs in one batch.

    Needs a broker with :attr:`Capability.WORKFLOWS`; raises
    :class:`~worq_core.UnsupportedError` otherwise, before anything is sent.
    """
    app = _app_of(node)
    broker = app.broker
    if Capability.WORKFLOWS not in broker.capabilities:
        raise UnsupportedError(broker.name, Capability.WORKFLOWS.value, "a workflow")
    plan = _Plan(app)
    entries, shape = plan.compile(node, pass_result=False, member=None, after=[])
    messages = [plan.message(spec) for spec in entries]
    root = shape.id or _first_id(shape)
    _save_record(app, plan, shape, root)
    by_group: dict[str, list[Message]] = {}
    loose: list[Message] = []
    for message in messages:
        if message.member is not None:
            by_group.setdefault(message.member.group, []).append(message)
        else:
            loose.append(message)
    # Every group is recorded before a job that could settle into it is sent. plan.groups
    # lists a group after the groups inside it and after the groups of later chain steps, so
    # the reversed list records outer and later groups first; groups whose members are sent
    # now come last, each with its members in the same step.
    ordered = list(reversed(plan.groups))
    later = [g for g in ordered if g.id not in by_group]
    for spec in later + [g for g in ordered if g.id in by_group]:
        broker.open_group(spec, by_group.get(spec.id, []))
    if loose:
        broker.enqueue(loose)
    tell_sent(app, messages)
    return Workflow(app, shape, root, plan.wid)


def _first_id(shape: _Shape) -> str:
    ids = shape.ids()
    return ids[0] if ids else ""


def _app_of(node: Node) -> Worq:
    if isinstance(node, Signature):
        return node.bound.task.app
    if isinstance(node, Chain):
        return _app_of(node.steps[0])
    if isinstance(node, Chord):
        return _app_of(node.header)
    if not node.members:
        raise TaskError("an empty group has no app to send it with")
    return _app_of(node.members[0])


def _new_id() -> str:
    return uuid.uuid4().hex
