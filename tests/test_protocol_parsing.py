"""Wire protocol v1 without I/O: parsing client frames, encoding server frames, vocabularies."""

from __future__ import annotations

import ast
import json
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

import netra_actors
from netra_actors._exceptions import ProtocolError
from netra_actors._messages import CancelRequest, ClientMessage, Ping, UserMessage
from netra_actors._protocol import (
    ERROR_CODES,
    MAX_ID_LENGTH,
    PONG_FRAME,
    PROTOCOL_VERSION,
    encode,
    error_frame,
    parse_client_frame,
    run_accepted_frame,
    session_ready_frame,
)

SCHEMAS = Path(__file__).resolve().parent.parent / "docs" / "schemas"
LONGEST_ID = "i" * MAX_ID_LENGTH
TOO_LONG_ID = "i" * (MAX_ID_LENGTH + 1)

# --- strategies ----------------------------------------------------------------------------

#: JSON scalars orjson can encode (integers within 64 bits, finite floats).
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text()
)
#: Any JSON value.
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
#: Values for id fields: mostly strings around the length limits, sometimes not strings.
id_values = st.one_of(
    st.text(max_size=4),
    st.text(min_size=MAX_ID_LENGTH - 1, max_size=MAX_ID_LENGTH + 2),
    st.none(),
    json_scalars,
)
#: Objects that look like client frames, with fields of the right and of the wrong types.
frame_objects = st.fixed_dictionaries(
    {"type": st.sampled_from(["user_message", "cancel", "ping", "nope"]) | json_scalars},
    optional={
        "text": st.text() | json_values,
        "thread_id": id_values,
        "client_msg_id": id_values,
        "run_id": id_values,
        "traceparent": st.text(max_size=60) | json_scalars,
        "extra": json_values,
    },
)


def _refusal(message: str | bytes) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        parse_client_frame(message)
    return info.value


def _outcome(message: str | bytes) -> ClientMessage | ProtocolError:
    """The parsed message, or the ``ProtocolError`` parsing raised (anything else propagates)."""
    try:
        return parse_client_frame(message)
    except ProtocolError as exc:
        return exc


def _frame(**fields: Any) -> str:
    return json.dumps(fields)


def _expected_echo(obj: dict[str, Any]) -> str | None:
    raw = obj.get("client_msg_id")
    return raw if isinstance(raw, str) and len(raw) <= MAX_ID_LENGTH else None


def _schema(name: str) -> Draft202012Validator:
    return Draft202012Validator(json.loads((SCHEMAS / f"{name}.json").read_text()))


# --- each client frame type ------------------------------------------------------------------


def test_user_message_with_every_field() -> None:
    """A full ``user_message`` becomes a ``UserMessage`` carrying each of its fields."""
    tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    msg = parse_client_frame(
        _frame(type="user_message", text="hi", thread_id="t1", client_msg_id="m1", traceparent=tp)
    )
    assert msg == UserMessage(text="hi", thread_id="t1", client_msg_id="m1", traceparent=tp)


def test_user_message_defaults() -> None:
    """A ``user_message`` with only ``text`` gets thread ``main`` and no id or traceparent."""
    assert parse_client_frame(_frame(type="user_message", text="")) == UserMessage(
        text="", thread_id="main", client_msg_id=None, traceparent=None
    )


def test_null_optional_fields_count_as_absent() -> None:
    """Optional fields given as ``null`` are treated as absent (thread_id falls back to main)."""
    msg = parse_client_frame(
        _frame(type="user_message", text="x", thread_id=None, client_msg_id=None, traceparent=None)
    )
    assert msg == UserMessage(text="x")


def test_cancel_frame() -> None:
    """A ``cancel`` frame becomes a ``CancelRequest`` for its ``run_id``."""
    assert parse_client_frame(_frame(type="cancel", run_id="r-1")) == CancelRequest(run_id="r-1")


def test_ping_frame() -> None:
    """A ``ping`` frame becomes ``Ping``."""
    assert parse_client_frame('{"type":"ping"}') == Ping()


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"type": "user_message", "text": "a"}, UserMessage(text="a")),
        ({"type": "cancel", "run_id": "r"}, CancelRequest(run_id="r")),
        ({"type": "ping"}, Ping()),
    ],
)
def test_unknown_fields_are_ignored(fields: dict[str, Any], expected: object) -> None:
    """Fields the protocol does not define, of any JSON type, do not change the parsed message."""
    extra = {"future": {"nested": [1, 2.5, None, True]}, "v": 2, "seq": "x", "data": None}
    assert parse_client_frame(json.dumps({**extra, **fields})) == expected


@pytest.mark.parametrize(
    "fields",
    [
        {"type": "user_message", "text": "a", "thread_id": LONGEST_ID},
        {"type": "user_message", "text": "a", "client_msg_id": LONGEST_ID},
        {"type": "cancel", "run_id": LONGEST_ID},
        {"type": "user_message", "text": "a", "thread_id": "t", "client_msg_id": "m"},
    ],
)
def test_ids_of_1_to_128_characters_are_accepted(fields: dict[str, Any]) -> None:
    """Ids of 1 and of exactly ``MAX_ID_LENGTH`` characters are accepted."""
    parse_client_frame(json.dumps(fields))


def test_frame_text_may_be_non_ascii() -> None:
    """Non-ASCII text (raw or escaped in JSON) arrives unchanged."""
    text = "caf\u00e9 \u2603 \U0001f600"
    assert parse_client_frame(_frame(type="user_message", text=text)) == UserMessage(text=text)
    raw = json.dumps({"type": "user_message", "text": text}, ensure_ascii=False)
    assert parse_client_frame(raw) == UserMessage(text=text)


# --- refusals ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "message",
    [
        b'{"type":"ping"}',
        b"",
        b"\x00\xff",
    ],
)
def test_binary_frames_are_bad_frame(message: bytes) -> None:
    """Binary frames are refused with ``bad_frame``, even when they hold valid JSON."""
    exc = _refusal(message)
    assert exc.code == "bad_frame"
    assert exc.client_msg_id is None


@pytest.mark.parametrize(
    "message",
    [
        "",
        "   ",
        "{",
        '{"type":"ping"',
        "not json",
        "{'type': 'ping'}",
        '{"type":"ping",}',
        '{"type":"ping"} {"type":"ping"}',
        "NaN",
        '{"type":"ping","x":Infinity}',
        '{"type":"user_message","text":"\ud800"}',
        '{"type":"user_message","text":"\\ud800"}',
        '"\udfff"',
        "[" * 2000 + "]" * 2000,
    ],
)
def test_invalid_json_is_bad_json(message: str) -> None:
    """Text that is not JSON (incl. lone surrogates, raw or escaped, and over-deep nesting) is ``bad_json``."""
    exc = _refusal(message)
    assert exc.code == "bad_json"
    assert exc.client_msg_id is None


@pytest.mark.parametrize(
    "message", ["[]", '[{"type":"ping"}]', "1", "2.5", '"ping"', "null", "true"]
)
def test_non_objects_are_bad_frame(message: str) -> None:
    """Valid JSON that is not an object is ``bad_frame``."""
    exc = _refusal(message)
    assert exc.code == "bad_frame"
    assert exc.client_msg_id is None


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"type": None},
        {"type": 1},
        {"type": ["ping"]},
        {"type": {"name": "ping"}},
        {"type": True},
        {"kind": "ping"},
    ],
)
def test_missing_or_mistyped_type_is_bad_frame(fields: dict[str, Any]) -> None:
    """An object without a string ``type`` is ``bad_frame`` and echoes its ``client_msg_id``."""
    exc = _refusal(json.dumps({**fields, "client_msg_id": "m7"}))
    assert exc.code == "bad_frame"
    assert exc.client_msg_id == "m7"


@pytest.mark.parametrize("kind", ["", "PING", "user-message", "subscribe", "x" * 500, "pong"])
def test_unknown_type(kind: str) -> None:
    """A string ``type`` that is not a client frame type is ``unknown_type``, echoing the id."""
    exc = _refusal(_frame(type=kind, client_msg_id="m8"))
    assert exc.code == "unknown_type"
    assert exc.client_msg_id == "m8"
    assert len(str(exc)) < 200


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"text": None},
        {"text": 5},
        {"text": ["a"]},
        {"text": {"value": "a"}},
        {"text": "a", "thread_id": 5},
        {"text": "a", "thread_id": ""},
        {"text": "a", "thread_id": TOO_LONG_ID},
        {"text": "a", "thread_id": ["t"]},
        {"text": "a", "traceparent": 7},
        {"text": "a", "traceparent": {}},
    ],
)
def test_bad_user_message_fields_are_bad_frame(fields: dict[str, Any]) -> None:
    """A ``user_message`` with a missing or mistyped field, or an over-long id, is ``bad_frame``."""
    exc = _refusal(json.dumps({"type": "user_message", "client_msg_id": "m9", **fields}))
    assert exc.code == "bad_frame"
    assert exc.client_msg_id == "m9"


@pytest.mark.parametrize("client_msg_id", [5, 1.5, True, [], {}])
def test_mistyped_client_msg_id_is_bad_frame_without_echo(client_msg_id: object) -> None:
    """A non-string ``client_msg_id`` on a ``user_message`` is ``bad_frame`` and is not echoed."""
    exc = _refusal(
        json.dumps({"type": "user_message", "text": "a", "client_msg_id": client_msg_id})
    )
    assert exc.code == "bad_frame"
    assert exc.client_msg_id is None


def test_overlong_client_msg_id_is_bad_frame_without_echo() -> None:
    """A ``client_msg_id`` over ``MAX_ID_LENGTH`` characters is ``bad_frame`` and is not echoed back."""
    exc = _refusal(_frame(type="user_message", text="a", client_msg_id=TOO_LONG_ID))
    assert exc.code == "bad_frame"
    assert exc.client_msg_id is None


def test_empty_client_msg_id_is_bad_frame() -> None:
    """An empty ``client_msg_id`` is ``bad_frame`` (ids have 1 to 128 characters)."""
    assert _refusal(_frame(type="user_message", text="a", client_msg_id="")).code == "bad_frame"


@pytest.mark.parametrize("run_id", ["<absent>", None, 5, "", TOO_LONG_ID, ["r"]])
def test_bad_cancel_run_id_is_bad_frame(run_id: object) -> None:
    """A ``cancel`` whose ``run_id`` is missing, null, not a string, empty or too long is ``bad_frame``."""
    fields: dict[str, Any] = {"type": "cancel", "client_msg_id": "m10"}
    if run_id != "<absent>":
        fields["run_id"] = run_id
    exc = _refusal(json.dumps(fields))
    assert exc.code == "bad_frame"
    assert exc.client_msg_id == "m10"


def test_unknown_type_with_mistyped_client_msg_id_does_not_echo_it() -> None:
    """An error echoes ``client_msg_id`` only when the frame had it as a string."""
    exc = _refusal(json.dumps({"type": "nope", "client_msg_id": 12}))
    assert exc.code == "unknown_type"
    assert exc.client_msg_id is None


# --- properties -------------------------------------------------------------------------------


@given(st.text(st.characters(exclude_categories=())) | st.binary())
def test_arbitrary_input_raises_only_protocol_errors(message: str | bytes) -> None:
    """Any text or bytes either parses to a client message or raises ``ProtocolError`` with a known code."""
    outcome = _outcome(message)
    if isinstance(outcome, ProtocolError):
        assert outcome.code in ERROR_CODES
    else:
        assert isinstance(outcome, UserMessage | CancelRequest | Ping)


@given(json_values)
def test_arbitrary_json_raises_only_protocol_errors(value: Any) -> None:
    """Any JSON value either parses or raises ``ProtocolError``; only objects get past ``bad_frame``."""
    outcome = _outcome(json.dumps(value))
    if isinstance(outcome, ProtocolError):
        assert outcome.code in ERROR_CODES - {"bad_json"}
        if not isinstance(value, dict):
            assert outcome.code == "bad_frame"
    else:
        assert isinstance(value, dict)
        assert isinstance(outcome, UserMessage | CancelRequest | Ping)


@given(frame_objects)
def test_frame_like_objects_parse_faithfully_or_echo_the_id(obj: dict[str, Any]) -> None:
    """A parsed frame carries the object's own field values; a refusal echoes exactly its string id."""
    msg = _outcome(json.dumps(obj))
    match msg:
        case ProtocolError():
            assert msg.code in {"bad_frame", "unknown_type"}
            assert msg.client_msg_id == _expected_echo(obj)
        case UserMessage():
            assert obj["type"] == "user_message"
            assert msg.text == obj["text"]
            assert msg.thread_id == (obj.get("thread_id") or "main")
            assert msg.client_msg_id == obj.get("client_msg_id")
            assert msg.traceparent == obj.get("traceparent")
            assert 0 < len(msg.thread_id) <= MAX_ID_LENGTH
        case CancelRequest():
            assert obj["type"] == "cancel"
            assert msg.run_id == obj["run_id"]
            assert 0 < len(msg.run_id) <= MAX_ID_LENGTH
        case Ping():
            assert obj["type"] == "ping"


_CLIENT_SCHEMAS = {
    "user_message": _schema("user_message"),
    "cancel": _schema("cancel"),
    "ping": _schema("ping"),
}


@given(frame_objects)
def test_parser_agrees_with_the_published_client_schemas(obj: dict[str, Any]) -> None:
    """A frame of a known type parses exactly when it is valid against its JSON Schema in docs/schemas."""
    kind = obj["type"]
    if not isinstance(kind, str) or kind not in _CLIENT_SCHEMAS:
        return
    valid = _CLIENT_SCHEMAS[kind].is_valid(obj)
    parsed = not isinstance(_outcome(json.dumps(obj)), ProtocolError)
    assert parsed == valid


# --- encoders ---------------------------------------------------------------------------------


def test_session_ready_frame_round_trips() -> None:
    """``session_ready`` carries its fields and the protocol version, as one JSON object."""
    frame = session_ready_frame("s-1", "alice", 42)
    assert isinstance(frame, str)
    assert json.loads(frame) == {
        "type": "session_ready",
        "session_id": "s-1",
        "user_id": "alice",
        "last_seq": 42,
        "protocol": PROTOCOL_VERSION,
    }


@pytest.mark.parametrize("client_msg_id", ["m1", None])
def test_run_accepted_frame_round_trips(client_msg_id: str | None) -> None:
    """``run_accepted`` always has ``client_msg_id``, as a string or ``null``."""
    assert json.loads(run_accepted_frame("r-1", "main", client_msg_id)) == {
        "type": "run_accepted",
        "run_id": "r-1",
        "thread_id": "main",
        "client_msg_id": client_msg_id,
    }


def test_pong_frame() -> None:
    """``PONG_FRAME`` is the JSON object ``{"type": "pong"}``."""
    assert json.loads(PONG_FRAME) == {"type": "pong"}


def test_error_frame_without_client_msg_id() -> None:
    """``error_frame`` without an id has no ``client_msg_id`` key at all (not ``null``)."""
    assert json.loads(error_frame("bad_json", "nope")) == {
        "type": "error",
        "code": "bad_json",
        "message": "nope",
    }


@pytest.mark.parametrize("client_msg_id", ["m1", ""])
def test_error_frame_with_client_msg_id(client_msg_id: str) -> None:
    """``error_frame`` includes ``client_msg_id`` whenever one is given."""
    assert json.loads(error_frame("not_found", "gone", client_msg_id)) == {
        "type": "error",
        "code": "not_found",
        "message": "gone",
        "client_msg_id": client_msg_id,
    }


@given(
    st.sampled_from(sorted(ERROR_CODES)),
    st.text(),
    st.none() | st.text(max_size=MAX_ID_LENGTH),
)
def test_error_frames_are_valid_against_the_schema(
    code: str, message: str, client_msg_id: str | None
) -> None:
    """Every ``error_frame`` round-trips and is valid against docs/schemas/error.json."""
    frame = json.loads(error_frame(code, message, client_msg_id))
    assert frame["message"] == message
    assert ("client_msg_id" in frame) == (client_msg_id is not None)
    assert _schema("error").is_valid(frame)


@given(st.dictionaries(st.text(), json_values, max_size=6))
def test_encode_round_trips(frame: dict[str, Any]) -> None:
    """``encode`` produces JSON text that decodes to the same mapping (stdlib and orjson)."""
    text = encode(frame)
    assert isinstance(text, str)
    assert json.loads(text) == frame
    assert orjson.loads(text) == frame


def test_error_frame_for_a_refusal_echoes_its_id() -> None:
    """A parse refusal turned into an ``error`` frame names its code and echoes the frame's id."""
    exc = _refusal(_frame(type="cancel", client_msg_id="m11"))
    assert json.loads(error_frame(exc.code, str(exc), exc.client_msg_id)) == {
        "type": "error",
        "code": "bad_frame",
        "message": str(exc),
        "client_msg_id": "m11",
    }


# --- vocabularies -----------------------------------------------------------------------------


def _codes_used_in_package() -> set[str]:
    """String literals passed as the code to ``ProtocolError(...)`` or ``error_frame(...)``."""
    codes: set[str] = set()
    for path in Path(netra_actors.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if not (isinstance(node, ast.Call) and node.args):
                continue
            func = node.func
            name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
            first = node.args[0]
            if name in {"ProtocolError", "error_frame"} and isinstance(first, ast.Constant):
                codes.add(first.value)
    return codes


def test_error_codes_used_by_the_package_are_in_the_vocabulary() -> None:
    """Every literal error code the package raises or sends is one of ``ERROR_CODES``."""
    used = _codes_used_in_package()
    assert {"bad_json", "bad_frame", "unknown_type", "not_found"} <= used
    assert used <= ERROR_CODES


def test_error_codes_match_the_published_schema() -> None:
    """``ERROR_CODES`` is exactly the ``code`` enum of docs/schemas/error.json."""
    schema = json.loads((SCHEMAS / "error.json").read_text())
    assert set(schema["properties"]["code"]["enum"]) == ERROR_CODES
