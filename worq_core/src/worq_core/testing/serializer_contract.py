"""The serializer contract: plain data round-trips; bad input raises worq's typed errors."""

from __future__ import annotations

import contextlib
import math
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from worq_core.errors import DeserializationError, SerializationError
from worq_core.job import Envelope
from worq_core.serializer import Serializer

_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text()
    | st.binary()
)

#: Plain data as the :class:`~worq_core.Serializer` contract defines it.
plain_data = st.recursive(
    _scalars,
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(), children, max_size=5)
    ),
    max_leaves=25,
)

_fixture_ok = settings(
    # the serializer fixture is stateless; one case runs once per subclass (executor)
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.differing_executors],
    deadline=None,
)


def _same(a: Any, b: Any) -> bool:
    """Equality that also tells 0.0 from -0.0 and True from 1."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return a == b and math.copysign(1, a) == math.copysign(1, b)
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return bool(a == b)


class SerializerContract:
    """Subclass and provide a ``serializer`` fixture."""

    @_fixture_ok
    @given(value=plain_data)
    def test_plain_data_round_trips_exactly(self, serializer: Serializer, value: Any) -> None:
        data = serializer.dumps(value)
        assert isinstance(data, bytes)
        assert _same(serializer.loads(data), value)

    def test_tuples_come_back_as_lists(self, serializer: Serializer) -> None:
        assert serializer.loads(serializer.dumps({"t": (1, (2, 3))})) == {"t": [1, [2, 3]]}

    @pytest.mark.parametrize(
        "value",
        [object(), {1, 2}, {"f": print}, {("tuple", "key"): 1}],
        ids=["object", "set", "function", "tuple-key"],
    )
    def test_values_that_are_not_plain_data_raise_serialization_error(
        self, serializer: Serializer, value: Any
    ) -> None:
        with pytest.raises(SerializationError):
            serializer.dumps(value)

    @_fixture_ok
    @given(data=st.binary(max_size=64))
    def test_arbitrary_bytes_decode_or_raise_deserialization_error(
        self, serializer: Serializer, data: bytes
    ) -> None:
        with contextlib.suppress(DeserializationError):
            serializer.loads(data)

    def test_truncated_payloads_raise_deserialization_error(self, serializer: Serializer) -> None:
        data = serializer.dumps({"key": "value" * 10, "list": list(range(20))})
        with pytest.raises(DeserializationError):
            serializer.loads(data[: len(data) // 2])

    @_fixture_ok
    @given(
        headers=st.dictionaries(st.text(max_size=20), st.text(max_size=40), max_size=6),
        args=st.lists(plain_data, max_size=3),
    )
    def test_a_job_envelope_keeps_its_headers_unchanged(
        self, serializer: Serializer, headers: dict[str, str], args: list[Any]
    ) -> None:
        envelope = Envelope("id-1", "app.task", args, {"k": 1}, 1.5, headers, {"timeout": 2.0})
        decoded = Envelope.decode(envelope.encode(serializer), serializer)
        assert dict(decoded.headers) == headers
        assert dict(decoded.options) == {"timeout": 2.0}
        assert _same(decoded.args, args)

    def test_an_envelope_without_headers_decodes_with_none(self, serializer: Serializer) -> None:
        old = {"v": 1, "id": "i", "task": "t", "args": [1], "kwargs": {}, "at": 0.0}
        decoded = Envelope.decode(serializer.dumps(old), serializer)
        assert (decoded.args, dict(decoded.headers)) == ([1], {})
