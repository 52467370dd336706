"""The wire-protocol JSON Schemas in docs/schemas are well formed and mean what docs/protocol.md says."""

from __future__ import annotations

import copy
import json
import re
from functools import cache
from pathlib import Path
from typing import Any

import attrs
import jsonschema
import jsonschema.protocols
import pytest
from referencing import Registry
from referencing.jsonschema import DRAFT202012

from netra_actors import _protocol
from netra_actors._config import Config
from netra_actors._exceptions import ProtocolError
from netra_actors._messages import THREAD_POLICIES
from netra_actors._transport import CLOSE_ABNORMAL

ROOT = Path(__file__).resolve().parent.parent
SCHEMA_DIR = ROOT / "docs" / "schemas"
PROTOCOL_MD = ROOT / "docs" / "protocol.md"
GATEWAY_PY = ROOT / "netra_actors" / "_gateway.py"
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
        "type": "events",
        "events": [
            {
                "type": "partial_result",
                "seq": seq,
                "run_id": "r-1",
                "thread_id": "main",
                "ts": 1.5,
                "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736",
                "span_id": "00f067aa0ba902b7",
                "data": {"text": text},
            }
            for seq, text in ((7, "is "), (8, "14."))
        ],
    },
    {
        "type": "session_ready",
        "session_id": "s-1",
        "user_id": "alice",
        "last_seq": 0,
        "protocol": 1,
        "batch": 64,
    },
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
    {"type": "error", "code": "busy", "message": "thread busy", "client_msg_id": "m2"},
    {"type": "error", "code": "limit_exceeded", "message": "queue full", "client_msg_id": "m3"},
    {"type": "error", "code": "rate_limited", "message": "too many frames; slow down"},
    {"type": "error", "code": "unavailable", "message": "closing", "client_msg_id": "m4"},
    {"type": "resume_gap", "session_id": "s-1", "oldest_seq": 8, "last_seq": 9},
    # An empty window: nothing kept, the next event will be last_seq + 1.
    {"type": "resume_gap", "session_id": "s-1", "oldest_seq": 1, "last_seq": 0},
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
    _event("agent_cancelled", {"reason": "interrupted"}),
    _event("agent_cancelled", {"reason": "shutdown"}),
    _event(
        "tool_executing",
        {
            "call_id": "c2",
            "tool_name": "login",
            "parameters": {"user": "a", "password": "[redacted]"},
        },
    ),
    # Forward compatibility: unknown extra fields are allowed everywhere.
    {"type": "pong", "server_time": 1.0},
    _event("partial_result", {"text": "x", "lang": "en"}) | {"parent_span_id": "ab"},
]

CLIENT_EXAMPLES: list[dict[str, Any]] = [
    {"type": "user_message", "text": "what is 2+3*4?"},
    {"type": "user_message", "text": "hi", "thread_id": "t2", "client_msg_id": "m1"},
    {"type": "user_message", "text": "hi", "policy": "enqueue"},
    {"type": "user_message", "text": "hi", "thread_id": "t2", "policy": "reject"},
    {"type": "user_message", "text": "stop that", "policy": "interrupt", "client_msg_id": "m2"},
    {"type": "user_message", "text": "hi", "policy": None},
    {"type": "cancel", "run_id": "r-1"},
    {"type": "ping"},
    {"type": "ping", "nonce": 7},
    {"type": "resume", "after_seq": 0},
    {"type": "resume", "after_seq": 41, "session_id": "s-7f3a"},
    {"type": "resume", "after_seq": 41, "session_id": None, "client_msg_id": "m5"},
    {"type": "resume", "after_seq": 2**53},
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
    "resume_gap_without_oldest_seq": {"type": "resume_gap", "session_id": "s", "last_seq": 3},
    "resume_gap_oldest_seq_zero": {
        "type": "resume_gap",
        "session_id": "s",
        "oldest_seq": 0,
        "last_seq": 0,
    },
    "resume_gap_last_seq_negative": {
        "type": "resume_gap",
        "session_id": "s",
        "oldest_seq": 1,
        "last_seq": -1,
    },
    "resume_gap_without_session_id": {"type": "resume_gap", "oldest_seq": 1, "last_seq": 0},
    "resume_gap_seq_string": {
        "type": "resume_gap",
        "session_id": "s",
        "oldest_seq": "1",
        "last_seq": 0,
    },
}

INVALID_CLIENT_EXAMPLES: dict[str, dict[str, Any]] = {
    "user_message_without_text": {"type": "user_message"},
    "user_message_text_not_string": {"type": "user_message", "text": 3},
    "cancel_without_run_id": {"type": "cancel"},
    "unknown_type": {"type": "shout"},
    "no_type": {"text": "hi"},
    "user_message_unknown_policy": {"type": "user_message", "text": "hi", "policy": "queue"},
    "user_message_policy_not_string": {"type": "user_message", "text": "hi", "policy": 1},
    "user_message_policy_wrong_case": {"type": "user_message", "text": "hi", "policy": "Reject"},
    "resume_without_after_seq": {"type": "resume"},
    "resume_after_seq_null": {"type": "resume", "after_seq": None},
    "resume_after_seq_negative": {"type": "resume", "after_seq": -1},
    "resume_after_seq_string": {"type": "resume", "after_seq": "5"},
    "resume_after_seq_fraction": {"type": "resume", "after_seq": 5.5},
    "resume_after_seq_bool": {"type": "resume", "after_seq": True},
    "resume_session_id_empty": {"type": "resume", "after_seq": 1, "session_id": ""},
    "resume_session_id_too_long": {"type": "resume", "after_seq": 1, "session_id": "s" * 129},
    "resume_session_id_not_string": {"type": "resume", "after_seq": 1, "session_id": 7},
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


def _union_members(name: str) -> set[str]:
    """The file stems a union schema (server_frame / client_frame) refers to."""
    refs = [branch["$ref"] for branch in _schemas()[name]["oneOf"]]
    assert all(ref.endswith(".json") for ref in refs)
    assert len(refs) == len(set(refs))
    return {ref.removesuffix(".json") for ref in refs}


SERVER_TYPES = {f["type"] for f in SERVER_EXAMPLES}
CLIENT_TYPES = {f["type"] for f in CLIENT_EXAMPLES}


def test_schema_set_is_complete() -> None:
    """docs/schemas holds exactly one schema per v1 frame type plus the envelope and unions."""
    assert not SERVER_TYPES & CLIENT_TYPES
    assert set(_schemas()) == SERVER_TYPES | CLIENT_TYPES | {
        "event",
        "server_frame",
        "client_frame",
    }


def test_unions_list_every_frame_type() -> None:
    """server_frame.json and client_frame.json dispatch to exactly the frame schemas of their side."""
    assert _union_members("server_frame") == SERVER_TYPES
    assert _union_members("client_frame") == CLIENT_TYPES
    assert {"resume_gap"} <= SERVER_TYPES
    assert {"resume"} <= CLIENT_TYPES


def test_each_frame_schema_pins_its_type() -> None:
    """Every frame schema fixes `type` to its own file name, so the unions are unambiguous."""
    for name in SERVER_TYPES | CLIENT_TYPES:
        assert _schemas()[name]["properties"]["type"] == {"const": name}


def test_event_schemas_are_the_event_types() -> None:
    """The event schemas (those applying event.json) are exactly the package's EVENT_TYPES."""
    events = {name for name, schema in _schemas().items() if schema.get("$ref") == "event.json"}
    assert events == _protocol.EVENT_TYPES


def test_parser_knows_every_client_frame_type() -> None:
    """Each client frame type with a schema is one the server parses (not unknown_type)."""
    for frame in CLIENT_EXAMPLES:
        _protocol.parse_client_frame(json.dumps(frame))


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


# --- the new v1 frames agree with the parser -----------------------------------------------------


@pytest.mark.parametrize(
    "frame",
    [f for f in CLIENT_EXAMPLES if f["type"] == "resume" or "policy" in f],
    ids=lambda f: f["type"],
)
def test_parser_accepts_valid_resume_and_policy_frames(frame: dict[str, Any]) -> None:
    """Valid `resume` frames and `user_message.policy` values parse."""
    _protocol.parse_client_frame(json.dumps(frame))


@pytest.mark.parametrize(
    "name",
    [n for n in INVALID_CLIENT_EXAMPLES if n.startswith(("resume_", "user_message_"))],
)
def test_parser_refuses_invalid_resume_and_policy_frames(name: str) -> None:
    """A frame its schema rejects is refused by the parser with `bad_frame`, echoing its id."""
    frame = INVALID_CLIENT_EXAMPLES[name] | {"client_msg_id": "m9"}
    assert not load_validator(frame["type"]).is_valid(frame)
    with pytest.raises(ProtocolError) as info:
        _protocol.parse_client_frame(json.dumps(frame))
    assert info.value.code == "bad_frame"
    assert info.value.client_msg_id == "m9"


def test_resume_gap_encoder_matches_the_schema() -> None:
    """`resume_gap_frame` produces a frame valid against resume_gap.json and server_frame.json."""
    frame = json.loads(_protocol.resume_gap_frame("sess_1", 8, 9))
    assert frame == {"type": "resume_gap", "session_id": "sess_1", "oldest_seq": 8, "last_seq": 9}
    load_validator("resume_gap").validate(frame)
    load_validator("server_frame").validate(frame)


def test_policy_enum_is_the_thread_policies() -> None:
    """user_message.json's `policy` enum is the package's THREAD_POLICIES (plus null = absent)."""
    policy = _schemas()["user_message"]["properties"]["policy"]["enum"]
    assert set(policy) == THREAD_POLICIES | {None}


# --- docs/protocol.md says the same as the schemas and the code ----------------------------------


def _section(heading: str, text: str | None = None) -> str:
    """The text under a markdown heading (exact line), up to the next heading of its level or above."""
    text = PROTOCOL_MD.read_text("utf-8") if text is None else text
    level = len(heading) - len(heading.lstrip("#"))
    lines = text.splitlines()
    assert lines.count(heading) == 1, f"heading {heading!r} must occur exactly once"
    start = lines.index(heading) + 1
    out: list[str] = []
    in_code = False
    for line in lines[start:]:
        if line.startswith("```"):
            in_code = not in_code
        hashes = len(line) - len(line.lstrip("#"))
        if not in_code and 0 < hashes <= level and line[hashes : hashes + 1] == " ":
            break
        out.append(line)
    return "\n".join(out)


def _table_first_column(text: str) -> list[str]:
    """The first column (backticks stripped) of the first markdown table in ``text``."""
    rows: list[str] = []
    for line in text.splitlines():
        if line.startswith("|"):
            rows.append(line)
        elif rows:
            break
    assert len(rows) >= 3, "no table"
    return [row.split("|")[1].strip().strip("`") for row in rows[2:]]


def _first_column(heading: str, text: str | None = None) -> list[str]:
    """The first column (backticks stripped) of the first table under ``heading``."""
    return _table_first_column(_section(heading, text))


def _vocabulary(name: str) -> list[str]:
    return _first_column(f"### {name}", _section("## Vocabularies"))


def _enum(schema: str, *path: str) -> set[Any]:
    node: Any = _schemas()[schema]
    for key in path:
        node = node[key]
    return set(node["enum"])


@pytest.mark.parametrize(
    ("table", "schema", "path", "code"),
    [
        ("Error codes", "error", ("properties", "code"), _protocol.ERROR_CODES),
        (
            "Run error types",
            "agent_error",
            ("properties", "data", "properties", "error", "properties", "type"),
            _protocol.AGENT_ERROR_TYPES,
        ),
        (
            "Cancel reasons",
            "agent_cancelled",
            ("properties", "data", "properties", "reason"),
            _protocol.CANCEL_REASONS,
        ),
        (
            "Tool status",
            "tool_completed",
            ("properties", "data", "properties", "status"),
            _protocol.TOOL_STATUSES,
        ),
        (
            "Tool error types",
            "tool_completed",
            ("properties", "data", "properties", "error", "properties", "type"),
            _protocol.TOOL_ERROR_TYPES,
        ),
        ("Thread policies", "user_message", ("properties", "policy"), THREAD_POLICIES),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_protocol_md_vocabulary_matches_schema_and_code(
    table: str, schema: str, path: tuple[str, ...], code: frozenset[str]
) -> None:
    """Each vocabulary table of docs/protocol.md lists exactly its schema enum and package constant."""
    documented = _vocabulary(table)
    assert len(documented) == len(set(documented))
    assert set(documented) == _enum(schema, *path) - {None} == code


def test_protocol_md_frame_tables_list_every_frame_type() -> None:
    """The client-frame, reply and event tables of docs/protocol.md name every frame schema."""
    events = _protocol.EVENT_TYPES
    assert set(_first_column("## Client → server frames")) == CLIENT_TYPES
    assert set(_first_column("## Server → client replies")) == SERVER_TYPES - events - {"events"}
    assert '{"type":"events","events":[' in _section("## Multi-event frames")
    event_section = _section("## Event frames")
    event_table = event_section.split("| `type` | `data` fields |", 1)[1]
    documented = {
        row.split("|")[1].strip().strip("`")
        for row in event_table.splitlines()
        if row.startswith("| `")
    }
    assert documented == events


def test_protocol_md_close_codes_match_the_code() -> None:
    """Every close code the server uses (and 1006 for an abort) is in the close-code table."""
    used = {value for name, value in vars(_protocol).items() if name.startswith("CLOSE_")} | {
        CLOSE_ABNORMAL
    }
    documented = {int(code) for code in _vocabulary("WebSocket close codes")}
    assert used == documented
    assert {1000, 1001, 1006, 1009, 1011, 4008, 4029} <= documented


def _gateway_refusals() -> set[tuple[int, str]]:
    """(status, error) pairs the gateway answers with a JSON body."""
    source = GATEWAY_PY.read_text("utf-8")
    refusals = re.findall(r'_refuse\(\s*request,\s*(\d{3}),\s*"(\w+)"', source)
    responses = re.findall(r'HttpResponse\.json\(\s*(\d{3}),\s*\{"error":\s*"(\w+)"', source)
    return {(int(status), error) for status, error in refusals + responses}


def test_protocol_md_handshake_statuses_match_the_gateway() -> None:
    """Each status the gateway refuses with is documented, with its exact `error` word."""
    refusals = _gateway_refusals()
    assert {(401, "unauthorized"), (403, "forbidden"), (404, "not_found")} <= refusals
    assert {(429, "too_many_connections"), (503, "unavailable")} <= refusals
    rows = [
        line
        for line in _section(
            "### HTTP handshake statuses", _section("## Vocabularies")
        ).splitlines()
        if line.startswith("| `")
    ]
    table = {int(row.split("|")[1].strip().strip("`")): row for row in rows}
    for status, error in refusals:
        assert status in table, f"status {status} is not documented"
        assert f'`"{error}"`' in table[status], f"{status} does not name error {error!r}"
    # The ordered list of handshake checks names the same words.
    checks = _section("### Handshake refusals")
    for status, error in refusals - {(400, "bad_request")}:
        assert f"`{status}`, `{error}`" in checks


async def test_protocol_md_healthz_fields_match_the_gateway() -> None:
    """The /healthz table and example of docs/protocol.md have exactly the fields the gateway sends."""
    from netra_actors import Runtime
    from netra_actors._gateway import Gateway, HttpRequest

    config = Config(store="memory", secret="healthz-test-secret-0123456789abcdef")
    gateway = Gateway(Runtime(config), config)
    response = await gateway.routes[("GET", "/healthz")](HttpRequest("GET", "/healthz", {}))
    body = json.loads(response.body)
    assert response.status == 200
    section = _section("## HTTP endpoints")
    fields = section.split("`/healthz` body:", 1)[1]
    assert set(_table_first_column(fields)) == set(body)
    example = json.loads(fields.split("```json\n", 1)[1].split("```", 1)[0])
    assert set(example) == set(body)
    assert example["status"] == "ok"
    gateway.accepting = False
    response = await gateway.routes[("GET", "/healthz")](HttpRequest("GET", "/healthz", {}))
    assert response.status == 503
    assert json.loads(response.body)["status"] == "shutting_down"
    assert '"shutting_down"' in section


def _setting_default(cell: str) -> Any:
    cell = cell.strip().strip("`")
    if cell == "none":
        return None
    number = cell.removesuffix(" s").replace(" ", "")
    return float(number) if re.fullmatch(r"\d+(\.\d+)?", number) else cell


def test_protocol_md_server_settings_match_config() -> None:
    """Every setting in the server-settings table is a Config field, with its real default."""
    fields = {field.name: field for field in attrs.fields(Config)}
    rows = [
        line.split("|")[1:3]
        for line in _section("## Server settings").splitlines()
        if line.startswith("| `")
    ]
    assert rows
    for names, default in rows:
        for name in re.findall(r"`(\w+)`", names):
            assert name in fields, f"{name} is not a Config field"
            expected = fields[name].default
            documented = _setting_default(default)
            if documented is None:
                assert expected in (None, ()), name
            else:
                assert documented == expected, name


def test_protocol_md_mentions_every_config_name_it_uses() -> None:
    """Config names quoted in docs/protocol.md's prose exist (no stale setting names)."""
    fields = {field.name for field in attrs.fields(Config)}
    text = PROTOCOL_MD.read_text("utf-8")
    quoted = set(re.findall(r"`([a-z]+(?:_[a-z]+)+)`", text))
    settings = {
        name
        for name in quoted
        if name.startswith(("max_", "window_", "heartbeat_", "rate_", "send_", "handshake_"))
        or name.endswith(("_grace", "_policy", "_origins"))
    } - _protocol.ERROR_CODES
    assert settings
    assert settings <= fields, sorted(settings - fields)


# --- the resume example ---------------------------------------------------------------------------

_RESUME_LINE = re.compile(r"^([A-Z])([<>]) (\{.*\})$")


def _resume_block() -> str:
    return _section("## Resuming a stream").split("```text\n", 1)[1].split("```", 1)[0]


def _resume_transcript() -> list[tuple[str, str, dict[str, Any]]]:
    """Frames of the example in "Resuming a stream", as (connection, direction, frame)."""
    out = []
    for line in _resume_block().splitlines():
        if not line or line.startswith("#"):
            continue
        match = _RESUME_LINE.match(line)
        assert match, f"unexpected line in the resume example: {line[:60]!r}"
        out.append((match[1], match[2], json.loads(match[3])))
    return out


def test_protocol_md_resume_example_is_valid_and_exact() -> None:
    """The resume example validates, re-sends the example session's events unchanged, and obeys
    the resume rules: events restart at N+1 after `after_seq=N` or `resume`, at `oldest_seq`
    after `resume_gap`, and otherwise grow by one."""
    original = {f["seq"]: f for d, f in _example_transcript() if d == "<" and "seq" in f}
    # The URL comment (`?after_seq=N`) before a connection's first frame says where it resumes.
    resumed_after: dict[str, int] = {}
    pending_after: int | None = None
    for line in _resume_block().splitlines():
        found = re.search(r"after_seq=(\d+)", line)
        if line.startswith("#") and found:
            pending_after = int(found[1])
        match = _RESUME_LINE.match(line)
        if match and match[1] not in resumed_after:
            assert pending_after is not None, f"connection {match[1]} has no after_seq"
            resumed_after[match[1]], pending_after = pending_after, None
    transcript = _resume_transcript()
    assert {"resume", "resume_gap"} <= {frame["type"] for _, _, frame in transcript}
    next_seq: dict[str, int] = {}
    for conn, direction, frame in transcript:
        load_validator("server_frame" if direction == "<" else "client_frame").validate(frame)
        kind = frame["type"]
        if kind == "session_ready":
            assert conn not in next_seq, "session_ready must be a connection's first frame"
            assert frame["last_seq"] == max(original)
            next_seq[conn] = resumed_after[conn] + 1
        elif kind == "resume":
            next_seq[conn] = frame["after_seq"] + 1
        elif kind == "resume_gap":
            assert frame["oldest_seq"] > next_seq[conn], "resume_gap only when events are missing"
            assert frame["last_seq"] == max(original)
            next_seq[conn] = frame["oldest_seq"]
        elif "seq" in frame:
            assert frame["seq"] == next_seq[conn]
            assert frame == original[frame["seq"]], "a re-sent event is identical"
            next_seq[conn] += 1
