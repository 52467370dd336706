"""The wire-protocol JSON Schemas in docs/schemas are well formed and mean what docs/protocol.md says."""

from __future__ import annotations

import copy
import json
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import jsonschema.protocols
import pytest
from referencing import Registry
from referencing.jsonschema import DRAFT202012

ROOT = Path(__file__).resolve().parent.parent
SCHEMA_DIR = ROOT / "docs" / "schemas"
PROTOCOL_MD = ROOT / "docs" / "protocol.md"
ID_PREFIX = "https://netra-actors.dev/schemas/v1/"


@cache
def _schemas() -> dict[str, dict[str, Any]]:
    """Load every schema file, keyed by file stem."""
    return {p.stem: json.loads(p.read_text("utf-8")) for p in sorted(SCHEMA_DIR.glob("*.json"))}


@cache
def _registry() -> Registry[Any]:
    """Registry holding every schema under its $id, so relative $refs resolve offline."""
    resources = [
        (schema["$id"], DRAFT202012.create_resource(schema)) for schema in _schemas().values()
    ]
    return Registry().with_resources(resources)


def load_validator(name: str) -> jsonschema.protocols.Validator:
    """Return a Draft 2020-12 validator for docs/schemas/<name>.json with all $refs resolvable."""
    return jsonschema.Draft202012Validator(_schemas()[name], registry=_registry())


def _event(type_: str, data: dict[str, Any], seq: int = 1) -> dict[str, Any]:
    return {
        "type": type_,
        "seq": seq,
        "run_id": "r-1",
        "thread_id": "main",
        "ts": 1767225600.25,
        "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736",
        "span_id": "00f067aa0ba902b7",
        "data": data,
    }


OK_TOOL_COMPLETED = _event(
    "tool_completed",
    {"call_id": "c1", "tool_name": "calculator", "status": "ok", "results": 14, "duration_ms": 1.5},
)

SERVER_EXAMPLES: list[dict[str, Any]] = [
    {
        "type": "session_ready",
        "session_id": "s-1",
        "user_id": "alice",
        "last_seq": 0,
        "protocol": 1,
    },
    {"type": "run_accepted", "run_id": "r-1", "thread_id": "main", "client_msg_id": "m1"},
    {"type": "run_accepted", "run_id": "r-1", "thread_id": "main", "client_msg_id": None},
    {"type": "pong"},
    {"type": "error", "code": "bad_json", "message": "not JSON"},
    {"type": "error", "code": "not_found", "message": "no such run", "client_msg_id": "m1"},
    _event("agent_started", {"agent_name": "assistant", "user_id": "alice", "text": "hi"}),
    _event(
        "agent_started", {"agent_name": "a", "user_id": "u", "text": "hi", "client_msg_id": "m1"}
    ),
    _event("agent_thinking", {"reasoning": "hmm", "step": 0}),
    _event(
        "tool_executing",
        {"call_id": "c1", "tool_name": "calculator", "parameters": {"expression": "2+3*4"}},
    ),
    OK_TOOL_COMPLETED,
    _event(
        "tool_completed",
        {
            "call_id": "c1",
            "tool_name": "calculator",
            "status": "ok",
            "results": None,
            "duration_ms": 0,
        },
    ),
    _event(
        "tool_completed",
        {
            "call_id": "c1",
            "tool_name": "calc",
            "status": "error",
            "error": {"type": "tool_error", "message": "boom"},
            "duration_ms": 3,
        },
    ),
    _event(
        "tool_completed",
        {
            "call_id": "c1",
            "tool_name": "calc",
            "status": "cancelled",
            "error": {"type": "cancelled", "message": "run cancelled"},
            "duration_ms": 3,
        },
    ),
    _event("partial_result", {"text": "2+3*4 is "}),
    _event("agent_completed", {"status": "ok", "final_response": "14"}),
    _event("agent_error", {"error": {"type": "step_limit", "message": "too many steps"}}),
    _event("agent_cancelled", {"reason": "client"}),
    # Forward compatibility: unknown extra fields are allowed everywhere.
    {"type": "pong", "server_time": 1.0},
    _event("partial_result", {"text": "x", "lang": "en"}) | {"parent_span_id": "ab"},
]

CLIENT_EXAMPLES: list[dict[str, Any]] = [
    {"type": "user_message", "text": "what is 2+3*4?"},
    {"type": "user_message", "text": "hi", "thread_id": "t2", "client_msg_id": "m1"},
    {"type": "cancel", "run_id": "r-1"},
    {"type": "ping"},
    {"type": "ping", "nonce": 7},
]


def _ok_tool_completed() -> dict[str, Any]:
    return copy.deepcopy(OK_TOOL_COMPLETED)


def _without_results() -> dict[str, Any]:
    frame = _ok_tool_completed()
    del frame["data"]["results"]
    return frame


def _without_data() -> dict[str, Any]:
    frame = _event("partial_result", {"text": "x"})
    del frame["data"]
    return frame


INVALID_SERVER_EXAMPLES: dict[str, dict[str, Any]] = {
    "tool_completed_ok_without_results": _without_results(),
    "tool_completed_error_without_error": _event(
        "tool_completed", {"call_id": "c", "tool_name": "t", "status": "timeout", "duration_ms": 1}
    ),
    "tool_completed_bad_status": _ok_tool_completed()
    | {"data": _ok_tool_completed()["data"] | {"status": "done"}},
    "seq_zero": _event("partial_result", {"text": "x"}, seq=0),
    "seq_float": _event("partial_result", {"text": "x"}) | {"seq": 1.5},
    "trace_id_uppercase": _event("partial_result", {"text": "x"})
    | {"trace_id": "4BF92F3577B34DA6A3CE929D0E0E4736"},
    "span_id_short": _event("partial_result", {"text": "x"}) | {"span_id": "00f067aa"},
    "unknown_error_code": {"type": "error", "code": "teapot", "message": "?"},
    "event_without_data": _without_data(),
    "agent_error_unknown_type": _event("agent_error", {"error": {"type": "oops", "message": "?"}}),
    "agent_cancelled_unknown_reason": _event("agent_cancelled", {"reason": "bored"}),
    "agent_completed_not_ok": _event("agent_completed", {"status": "error", "final_response": ""}),
    "session_ready_protocol_2": {
        "type": "session_ready",
        "session_id": "s",
        "user_id": "u",
        "last_seq": 0,
        "protocol": 2,
    },
    "run_accepted_missing_client_msg_id": {
        "type": "run_accepted",
        "run_id": "r",
        "thread_id": "main",
    },
    "unknown_type": {"type": "agent_dancing"},
}

INVALID_CLIENT_EXAMPLES: dict[str, dict[str, Any]] = {
    "user_message_without_text": {"type": "user_message"},
    "user_message_text_not_string": {"type": "user_message", "text": 3},
    "cancel_without_run_id": {"type": "cancel"},
    "unknown_type": {"type": "shout"},
    "no_type": {"text": "hi"},
}


def _example_transcript() -> list[tuple[str, dict[str, Any]]]:
    """Frames of the example session in docs/protocol.md, as (direction, frame)."""
    text = PROTOCOL_MD.read_text("utf-8").split("## Example session", 1)[1]
    block = text.split("```text\n", 1)[1].split("```", 1)[0]
    return [
        (line[0], json.loads(line[2:])) for line in block.splitlines() if line[:2] in ("< ", "> ")
    ]


@pytest.mark.parametrize("path", sorted(SCHEMA_DIR.glob("*.json")), ids=lambda p: p.name)
def test_schema_file_is_valid_draft_2020_12(path: Path) -> None:
    """Each schema file is JSON, a valid 2020-12 schema, and carries $schema/$id/title/description."""
    schema = json.loads(path.read_text("utf-8"))
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["$id"] == f"{ID_PREFIX}{path.name}"
    assert schema["title"]
    assert schema["description"]


def test_schema_set_is_complete() -> None:
    """docs/schemas holds exactly one schema per v1 frame type plus the envelope and unions."""
    frame_types = {f["type"] for f in SERVER_EXAMPLES + CLIENT_EXAMPLES}
    assert set(_schemas()) == frame_types | {"event", "server_frame", "client_frame"}


def test_protocol_md_lists_every_schema() -> None:
    """The JSON Schemas section of docs/protocol.md names every schema file."""
    section = PROTOCOL_MD.read_text("utf-8").split("## JSON Schemas", 1)[1]
    for name in _schemas():
        assert f"`{name}.json`" in section


@pytest.mark.parametrize("frame", SERVER_EXAMPLES, ids=lambda f: f["type"])
def test_valid_server_frame(frame: dict[str, Any]) -> None:
    """A valid server frame passes server_frame.json and its own schema."""
    load_validator("server_frame").validate(frame)
    load_validator(frame["type"]).validate(frame)
    if "seq" in frame:
        load_validator("event").validate(frame)


@pytest.mark.parametrize("frame", CLIENT_EXAMPLES, ids=lambda f: f["type"])
def test_valid_client_frame(frame: dict[str, Any]) -> None:
    """A valid client frame passes client_frame.json and its own schema."""
    load_validator("client_frame").validate(frame)
    load_validator(frame["type"]).validate(frame)


@pytest.mark.parametrize("frame", CLIENT_EXAMPLES, ids=lambda f: f["type"])
def test_client_frame_is_not_a_server_frame(frame: dict[str, Any]) -> None:
    """The two unions do not overlap."""
    assert not load_validator("server_frame").is_valid(frame)


@pytest.mark.parametrize(
    "frame", INVALID_SERVER_EXAMPLES.values(), ids=INVALID_SERVER_EXAMPLES.keys()
)
def test_invalid_server_frame_rejected(frame: dict[str, Any]) -> None:
    """An invalid server frame fails server_frame.json (and its own schema, if its type is known)."""
    assert not load_validator("server_frame").is_valid(frame)
    if frame["type"] in _schemas():
        assert not load_validator(frame["type"]).is_valid(frame)


@pytest.mark.parametrize(
    "frame", INVALID_CLIENT_EXAMPLES.values(), ids=INVALID_CLIENT_EXAMPLES.keys()
)
def test_invalid_client_frame_rejected(frame: dict[str, Any]) -> None:
    """An invalid client frame fails client_frame.json."""
    assert not load_validator("client_frame").is_valid(frame)


def test_protocol_md_example_session_is_valid() -> None:
    """Every frame of the example session in docs/protocol.md validates, and seqs are gap-free from 1."""
    transcript = _example_transcript()
    assert transcript
    for direction, frame in transcript:
        load_validator("server_frame" if direction == "<" else "client_frame").validate(frame)
    seqs = [frame["seq"] for _, frame in transcript if "seq" in frame]
    assert seqs == list(range(1, len(seqs) + 1))
