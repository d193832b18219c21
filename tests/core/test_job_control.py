"""Inline runs, names and payloads users choose, and the run state machine."""

from __future__ import annotations

import asyncio
import unicodedata

import pytest
from hypothesis import given
from hypothesis import strategies as st

from worq_core import (
    InvalidNameError,
    JobStatus,
    PayloadTooLarge,
    Retry,
    TaskError,
    Worq,
    current_job,
)
from worq_core.job import Envelope, encode_success
from worq_core.models import Delivery
from worq_core.serializers import MsgpackSerializer
from worq_core.validation import MAX_NAME_LENGTH, check_job_id, check_queue
from worq_core.worker import InvalidTransition, Run, RunState


@pytest.fixture
def app() -> Worq:
    return Worq("memory://")


def test_an_inline_call_gets_a_real_job_context(app: Worq) -> None:
    @app.task(queue="reports", max_retries=2)
    def report() -> tuple[str, int, int]:
        job = current_job()
        job.progress(0.5, "half")
        assert job.last_progress is not None
        return job.queue, job.attempt, job.max_retries

    @app.task
    async def async_report() -> bool:
        return current_job().cancelled

    assert report() == ("reports", 1, 2)
    assert asyncio.run(async_report()) is False


@pytest.mark.parametrize(
    "name", ["", "   ", "a\nb", "tab\there", "nul\x00", "x" * (MAX_NAME_LENGTH + 1), " padded"]
)
def test_bad_queue_names_and_job_ids_are_refused_before_anything_is_sent(
    app: Worq, name: str
) -> None:
    @app.task
    def job() -> None:
        pass

    with pytest.raises(InvalidNameError):
        job.options(queue=name).enqueue()
    with pytest.raises(InvalidNameError):
        job.options(job_id=name).enqueue()
    with pytest.raises(InvalidNameError):
        app.task(queue=name, name=f"other-{len(name)}")(lambda: None)
    assert app.broker.stats() == []


@given(st.text(max_size=MAX_NAME_LENGTH + 5))
def test_a_name_is_accepted_exactly_when_it_has_no_control_characters_and_is_trimmed(
    name: str,
) -> None:
    control = any(unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp") for c in name)
    fine = bool(name.strip()) and name == name.strip() and not control
    fine = fine and len(name) <= MAX_NAME_LENGTH
    for check in (check_queue, check_job_id):
        if fine:
            assert check(name) == name
        else:
            with pytest.raises(InvalidNameError):
                check(name)


def test_a_payload_over_max_payload_is_refused_and_nothing_is_sent() -> None:
    app = Worq("memory://", max_payload=1024)

    @app.task
    def upload(data: bytes) -> int:
        return len(data)

    with pytest.raises(PayloadTooLarge) as error:
        upload.enqueue(b"x" * 2048)
    assert error.value.limit == 1024
    assert error.value.size > 2048
    with pytest.raises(PayloadTooLarge):
        upload.enqueue_many([(b"ok",), (b"x" * 4096,)])
    assert app.broker.stats() == []
    upload.enqueue(b"small")


def test_the_default_max_payload_is_16_mib() -> None:
    assert Worq().max_payload == 16 * 1024 * 1024
    with pytest.raises(ValueError, match="max_payload"):
        Worq(max_payload=0)


def test_headers_must_be_strings(app: Worq) -> None:
    @app.task
    def job() -> None:
        pass

    with pytest.raises(TaskError, match="strings"):
        job.options(headers={"n": 1}).enqueue()  # type: ignore[dict-item]


def test_envelopes_round_trip_headers_and_options_and_old_ones_decode() -> None:
    serializer = MsgpackSerializer()
    envelope = Envelope("i", "t", [1], {"k": 2}, 1.0, {"h": "v"}, {"timeout": 3.0})
    assert Envelope.decode(envelope.encode(serializer), serializer) == envelope
    old = serializer.dumps({"v": 1, "id": "i", "task": "t", "args": [], "kwargs": {}, "at": 0})
    decoded = Envelope.decode(old, serializer)
    assert (dict(decoded.headers), dict(decoded.options)) == ({}, {})


@pytest.mark.parametrize(
    "options", [{"timeout": -1}, {"max_retries": "3"}, {"retry": [1, 0.5]}, {"unknown": 1}]
)
def test_an_envelope_with_bad_options_is_undecodable(options: dict[str, object]) -> None:
    serializer = MsgpackSerializer()
    data = serializer.dumps(
        {"v": 1, "id": "i", "task": "t", "args": [], "kwargs": {}, "at": 0, "o": options}
    )
    with pytest.raises(ValueError, match="worq job"):
        Envelope.decode(data, serializer)


def test_a_fixed_id_that_ran_before_does_not_answer_with_its_old_record(app: Worq) -> None:
    @app.task
    def job() -> int:
        return 2

    app.storage.save({"report": encode_success(app.serializer, 1)}, 60)
    handle = job.options(job_id="report").enqueue()
    assert handle.status() is JobStatus.QUEUED
    with pytest.raises(TimeoutError):
        handle.result(timeout=0)


def test_retry_refuses_a_negative_delay() -> None:
    with pytest.raises(ValueError, match="negative"):
        Retry(delay=-1)


def test_a_run_moves_only_along_the_state_machine() -> None:
    run = Run(Delivery("i", "q", b"", "t", 1))
    with pytest.raises(InvalidTransition):
        run.move(RunState.DONE)
    for state in (RunState.RUNNING, RunState.DECIDED, RunState.SENT):
        run.move(state)
    run.move(RunState.DONE)
    with pytest.raises(InvalidTransition):
        run.move(RunState.SENT)
