from __future__ import annotations

import pytest

from worq_core import SerializationError
from worq_core.serializers import JsonSerializer, MsgpackSerializer
from worq_core.testing import SerializerContract


class TestMsgpack(SerializerContract):
    @pytest.fixture
    def serializer(self) -> MsgpackSerializer:
        return MsgpackSerializer()


class TestJson(SerializerContract):
    @pytest.fixture
    def serializer(self) -> JsonSerializer:
        return JsonSerializer()


def test_json_tags_bytes_without_confusing_them_with_user_dicts() -> None:
    serializer = JsonSerializer()
    value = {"$bytes": "aGk="}, {"$dict": {"x": b"hi"}}, b"hi"
    assert serializer.loads(serializer.dumps(list(value))) == list(value)


def test_json_output_is_readable_utf8() -> None:
    assert JsonSerializer().dumps({"a": [1, "é"]}) == b'{"a":[1,"\\u00e9"]}'


def test_msgpack_refuses_integers_wider_than_64_bits() -> None:
    with pytest.raises(SerializationError) as error:
        MsgpackSerializer().dumps(2**64)
    assert error.value.serializer == "msgpack"


def test_msgpack_packs_the_next_value_whole_after_one_it_refused() -> None:
    serializer = MsgpackSerializer()
    with pytest.raises(SerializationError):
        serializer.dumps([1, "two", object()])
    with pytest.raises(SerializationError):
        serializer.dumps([1, 2**70])
    value = {"after": [1, "two", b"3"]}
    assert serializer.loads(serializer.dumps(value)) == value
