"""The job envelope: the array producers write now, and the map of version 1 that still decodes."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from worq_core import Worq
from worq_core.errors import DeserializationError
from worq_core.job import Envelope, envelope_body
from worq_core.serializer import Serializer
from worq_core.serializers import JsonSerializer, MsgpackSerializer
from worq_core.task import _new_job_ids

SERIALIZERS = [MsgpackSerializer(), JsonSerializer()]
ID = "5f0c8e3a9b2d4c1e8f7a6b5c4d3e2f10"

# Bytes a producer of version 1 wrote (worq before the array format), kept verbatim: a queue
# may still hold such jobs when its workers are upgraded.
OLD_MSGPACK_FULL = (
    b"\x89\xa1v\x01\xa2id\xd9 5f0c8e3a9b2d4c1e8f7a6b5c4d3e2f10\xa4task\xabemails.send\xa4args"
    b"\x93\x01\xa3two\xc4\x013\xa6kwargs\x81\xa2to\xa5a@b.c\xa2at\xcbA\xdaL\xf0\xd0\x10\x00\x00"
    b"\xa1h\x81\xa8trace-id\xa3t-1\xa1o\x82\xa7timeout\xcb@\x14\x00\x00\x00\x00\x00\x00"
    b"\xabmax_retries\x01\xa1w\x81\xa4next\x91\x81\xa2id\xa1x"
)
OLD_JSON_FULL = (
    b'{"v":1,"id":"5f0c8e3a9b2d4c1e8f7a6b5c4d3e2f10","task":"emails.send","args":[1,"two",'
    b'{"$bytes":"Mw=="}],"kwargs":{"to":"a@b.c"},"at":1765000000.25,"h":{"trace-id":"t-1"},'
    b'"o":{"timeout":5.0,"max_retries":1},"w":{"next":[{"id":"x"}]}}'
)
OLD_MSGPACK_PLAIN = (
    b"\x86\xa1v\x01\xa2id\xd9 5f0c8e3a9b2d4c1e8f7a6b5c4d3e2f10\xa4task\xa4noop\xa4args\x90"
    b"\xa6kwargs\x80\xa2at\xcbA\xdaL\xf0\xd0\x10\x00\x00"
)


@pytest.mark.parametrize(
    ("serializer", "data"),
    [(MsgpackSerializer(), OLD_MSGPACK_FULL), (JsonSerializer(), OLD_JSON_FULL)],
    ids=["msgpack", "json"],
)
def test_an_envelope_of_version_1_decodes_with_everything_it_carried(
    serializer: Serializer, data: bytes
) -> None:
    envelope = Envelope.decode(data, serializer)
    assert envelope == Envelope(
        ID,
        "emails.send",
        [1, "two", b"3"],
        {"to": "a@b.c"},
        1765000000.25,
        {"trace-id": "t-1"},
        {"timeout": 5.0, "max_retries": 1},
        {"next": [{"id": "x"}]},
    )


def test_a_plain_envelope_of_version_1_decodes_with_no_headers_options_or_links() -> None:
    envelope = Envelope.decode(OLD_MSGPACK_PLAIN, MsgpackSerializer())
    assert (envelope.id, envelope.task, envelope.args, envelope.kwargs) == (ID, "noop", [], {})
    assert (dict(envelope.headers), dict(envelope.options), dict(envelope.workflow)) == ({}, {}, {})


def test_the_new_format_is_an_array_without_key_names_and_smaller() -> None:
    serializer = MsgpackSerializer()
    body = Envelope(ID, "noop", [], {}, 1765000000.25).encode(serializer)
    assert serializer.loads(body) == [2, ID, "noop", [], {}, 1765000000.25]
    assert len(body) < len(OLD_MSGPACK_PLAIN) - 20


def test_an_empty_part_before_a_given_one_is_written_empty_and_reads_as_none() -> None:
    serializer = MsgpackSerializer()
    body = envelope_body(serializer, ID, "t", [], {}, 1.0, workflow={"next": []})
    assert serializer.loads(body)[6:] == [{}, {}, {"next": []}]
    decoded = Envelope.decode(body, serializer)
    assert (dict(decoded.headers), dict(decoded.options)) == ({}, {})
    assert dict(decoded.workflow) == {"next": []}


plain_data = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)
options = st.fixed_dictionaries(
    {},
    optional={
        "timeout": st.floats(min_value=0.001, max_value=1e6),
        "max_retries": st.integers(0, 100),
        "retry": st.tuples(
            st.floats(0, 100), st.floats(1, 10), st.floats(100, 1000), st.booleans()
        ).map(list),
    },
)


@pytest.mark.parametrize("serializer", SERIALIZERS, ids=["msgpack", "json"])
@given(
    job_id=st.text(min_size=1, max_size=40),
    task=st.text(max_size=40),
    args=st.lists(plain_data, max_size=4),
    kwargs=st.dictionaries(st.text(max_size=10), plain_data, max_size=4),
    at=st.floats(min_value=0, max_value=4e9),
    headers=st.dictionaries(st.text(max_size=12), st.text(max_size=20), max_size=4),
    options=options,
    workflow=st.dictionaries(st.text(max_size=8), plain_data, max_size=3),
)
def test_every_envelope_decodes_to_what_was_encoded(
    serializer: Serializer,
    job_id: str,
    task: str,
    args: list[Any],
    kwargs: dict[str, Any],
    at: float,
    headers: dict[str, str],
    options: dict[str, Any],
    workflow: dict[str, Any],
) -> None:
    envelope = Envelope(job_id, task, args, kwargs, at, headers, options, workflow)
    decoded = Envelope.decode(envelope.encode(serializer), serializer)
    # Tuples come back as lists (the serializers' contract), so compare through one encoding.
    again = Envelope.decode(decoded.encode(serializer), serializer)
    assert decoded == again
    assert (decoded.id, decoded.task, decoded.enqueued_at) == (job_id, task, at)
    assert (dict(decoded.headers), dict(decoded.options)) == (headers, options)
    assert len(decoded.args) == len(args)
    assert decoded.kwargs.keys() == kwargs.keys()
    assert dict(decoded.workflow).keys() == workflow.keys()


@pytest.mark.parametrize(
    "value",
    [
        [2, ID, "t", [], {}],  # too short
        [2, ID, "t", [], {}, 1.0, {}, {}, {}, {}],  # too long
        [3, ID, "t", [], {}, 1.0],  # a version this code does not know
        [2, 7, "t", [], {}, 1.0],  # an id that is no string
        [2, ID, "t", {}, {}, 1.0],  # args that are no list
        [2, ID, "t", [], [], 1.0],  # kwargs that are no map
        [2, ID, "t", [], {}, "soon"],  # an enqueue time that is no number
        [2, ID, "t", [], {}, 1.0, {"h": 1}],  # a header that is no string
        [2, ID, "t", [], {}, 1.0, {}, {"timeout": -1}],  # a bad override
        [2, ID, "t", [], {}, 1.0, {}, {}, ["links"]],  # links that are no map
        {"v": 2, "id": ID},  # a map of another version
        "a string",
    ],
)
def test_a_malformed_envelope_raises_a_deserialization_error(value: Any) -> None:
    serializer = MsgpackSerializer()
    with pytest.raises(DeserializationError, match="not a worq job"):
        Envelope.decode(serializer.dumps(value), serializer)


def test_ids_made_in_bulk_are_distinct_uuid4_hex() -> None:
    ids = _new_job_ids(2000)
    assert len(set(ids)) == 2000
    for text in ids:
        parsed = uuid.UUID(hex=text)
        assert (parsed.hex, parsed.version, parsed.variant) == (text, 4, uuid.RFC_4122)


def test_a_batch_without_middleware_writes_the_envelopes_a_single_enqueue_writes() -> None:
    app = Worq("memory://")

    @app.task(queue="q", priority=3)
    def add(x: int, y: int = 0) -> int:
        return x + y

    add.options(headers={"tenant": "a"}, timeout=2.0).enqueue_many([(1,), {"x": 2, "y": 3}])
    add.options(headers={"tenant": "a"}, timeout=2.0).enqueue(4)
    deliveries = app.broker.fetch(["q"], 3, lease=30, wait=0)
    envelopes = [Envelope.decode(d.body, app.serializer) for d in deliveries]
    assert [(e.args, e.kwargs) for e in envelopes] == [([1], {}), ([], {"x": 2, "y": 3}), ([4], {})]
    assert {(e.task, tuple(e.headers.items()), tuple(e.options.items())) for e in envelopes} == {
        (add.name, (("tenant", "a"),), (("timeout", 2.0),))
    }
    assert [e.id for e in envelopes] == [d.id for d in deliveries]
    app.close()
