"""Wire protocol v1 without I/O: parsing client frames, encoding server frames, vocabularies.

Everything here is a plain function over text and dicts, so the rules of the
protocol are testable without a socket. The vocabularies are frozen (see
docs/protocol.md): later versions add entries, never rename.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Final, cast

import orjson

from ._exceptions import ProtocolError
from ._messages import (
    THREAD_POLICIES,
    CancelRequest,
    ClientMessage,
    Ping,
    ResumeRequest,
    ThreadPolicy,
    UserMessage,
)

PROTOCOL_VERSION: Final = 1

#: ``error.code`` of an ``error`` frame.
ERROR_CODES: Final = frozenset(
    {
        "bad_json",
        "bad_frame",
        "unknown_type",
        "not_found",
        "internal",
        "unavailable",
        "busy",
        "limit_exceeded",
        "rate_limited",
    }
)
#: ``agent_error.error.type``.
AGENT_ERROR_TYPES: Final = frozenset(
    {"agent_error", "llm_error", "timeout", "step_limit", "interrupted", "internal"}
)
#: ``agent_cancelled.reason``.
CANCEL_REASONS: Final = frozenset({"client", "interrupted", "shutdown"})
#: ``tool_completed.status``.
TOOL_STATUSES: Final = frozenset({"ok", "error", "timeout", "cancelled"})
#: ``tool_completed.error.type``.
TOOL_ERROR_TYPES: Final = frozenset(
    {"tool_error", "invalid_arguments", "unknown_tool", "timeout", "cancelled", "bad_result"}
)
#: Event types, in no particular order.
EVENT_TYPES: Final = frozenset(
    {
        "agent_started",
        "agent_thinking",
        "tool_executing",
        "tool_completed",
        "partial_result",
        "agent_completed",
        "agent_error",
        "agent_cancelled",
    }
)

#: WebSocket close codes the server uses.
CLOSE_NORMAL: Final = 1000
CLOSE_GOING_AWAY: Final = 1001
CLOSE_TOO_BIG: Final = 1009
CLOSE_INTERNAL: Final = 1011
#: The connection's cursor fell out of the replay window; reconnect with ``after_seq``.
CLOSE_LAGGING: Final = 4008
#: The user sent frames faster than the configured rate.
CLOSE_RATE_LIMITED: Final = 4029

#: The WebSocket subprotocol of protocol v1 (selected when the client proposes it).
SUBPROTOCOL: Final = "netra.v1"

#: Longest accepted ``thread_id`` / ``client_msg_id`` / ``run_id``, in characters.
MAX_ID_LENGTH: Final = 128


def encode(frame: Mapping[str, Any]) -> str:
    """Encode one server frame as JSON text."""
    return orjson.dumps(frame).decode()


def _optional_str(obj: Mapping[str, Any], key: str, client_msg_id: str | None) -> str | None:
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ProtocolError("bad_frame", f"{key!r} must be a string", client_msg_id=client_msg_id)
    return value


def _identifier(obj: Mapping[str, Any], key: str, client_msg_id: str | None) -> str | None:
    value = _optional_str(obj, key, client_msg_id)
    if value is not None and not 0 < len(value) <= MAX_ID_LENGTH:
        raise ProtocolError(
            "bad_frame",
            f"{key!r} must have 1 to {MAX_ID_LENGTH} characters",
            client_msg_id=client_msg_id,
        )
    return value


def parse_client_frame(message: str | bytes) -> ClientMessage:
    """Validate one client frame and return it as a typed message.

    Unknown fields are ignored (forward compatibility).

    Raises:
        ProtocolError: with code ``bad_json`` (not JSON), ``bad_frame`` (binary
            frame, not an object, missing or mistyped field) or ``unknown_type``.
            When the frame carried a string ``client_msg_id`` the error carries it
            too, so the client can match the error to its message.
    """
    if isinstance(message, bytes):
        raise ProtocolError("bad_frame", "binary frames are not accepted; send JSON text")
    try:
        obj = orjson.loads(message)
    except orjson.JSONDecodeError as exc:
        raise ProtocolError("bad_json", f"frame is not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ProtocolError("bad_frame", "frame must be a JSON object")
    raw_id = obj.get("client_msg_id")
    client_msg_id = raw_id if isinstance(raw_id, str) and len(raw_id) <= MAX_ID_LENGTH else None
    kind = obj.get("type")
    if not isinstance(kind, str):
        raise ProtocolError(
            "bad_frame", "frame must have a string 'type'", client_msg_id=client_msg_id
        )
    match kind:
        case "user_message":
            text = obj.get("text")
            if not isinstance(text, str):
                raise ProtocolError(
                    "bad_frame", "'text' must be a string", client_msg_id=client_msg_id
                )
            thread_id = _identifier(obj, "thread_id", client_msg_id) or "main"
            _identifier(obj, "client_msg_id", client_msg_id)
            policy = _optional_str(obj, "policy", client_msg_id)
            if policy is not None and policy not in THREAD_POLICIES:
                raise ProtocolError(
                    "bad_frame",
                    f"'policy' must be one of {sorted(THREAD_POLICIES)}",
                    client_msg_id=client_msg_id,
                )
            return UserMessage(
                text=text,
                thread_id=thread_id,
                client_msg_id=client_msg_id,
                traceparent=_optional_str(obj, "traceparent", client_msg_id),
                policy=cast(ThreadPolicy | None, policy),
            )
        case "cancel":
            run_id = _identifier(obj, "run_id", client_msg_id)
            if run_id is None:
                raise ProtocolError(
                    "bad_frame", "'run_id' must be a string", client_msg_id=client_msg_id
                )
            return CancelRequest(run_id=run_id, client_msg_id=client_msg_id)
        case "resume":
            after_seq = obj.get("after_seq")
            if not isinstance(after_seq, int) or isinstance(after_seq, bool) or after_seq < 0:
                raise ProtocolError(
                    "bad_frame",
                    "'after_seq' must be a non-negative integer",
                    client_msg_id=client_msg_id,
                )
            return ResumeRequest(
                after_seq=after_seq,
                session_id=_identifier(obj, "session_id", client_msg_id),
                client_msg_id=client_msg_id,
            )
        case "ping":
            return Ping()
        case _:
            raise ProtocolError(
                "unknown_type",
                f"unknown frame type {kind[:64]!r}",
                client_msg_id=client_msg_id,
            )


#: Most events one multi-event frame carries (a client asks for at most this many).
MAX_BATCH = 1000
#: A multi-event frame stops growing past this many characters of events.
MAX_BATCH_CHARS = 256 * 1024


def events_frame(frames: Sequence[str]) -> str:
    """A multi-event frame: ``{"type": "events", "events": [E1, E2, ...]}`` where each
    ``E`` is an event frame exactly as it would be sent alone (encoded once, joined)."""
    return '{"type":"events","events":[' + ",".join(frames) + "]}"


def session_ready_frame(
    session_id: str,
    user_id: str,
    last_seq: int,
    *,
    after_seq: int | None = None,
    batch: int = 1,
) -> str:
    """The first frame of every accepted connection.

    ``after_seq`` is present when the connection resumes: its stream restarts
    with the event after it (after a ``resume_gap`` when the resume was not exact).
    """
    frame: dict[str, Any] = {
        "type": "session_ready",
        "session_id": session_id,
        "user_id": user_id,
        "last_seq": last_seq,
        "protocol": PROTOCOL_VERSION,
    }
    if after_seq is not None:
        frame["after_seq"] = after_seq
    if batch > 1:
        frame["batch"] = batch
    return encode(frame)


def run_accepted_frame(run_id: str, thread_id: str, client_msg_id: str | None) -> str:
    """The reply to an accepted ``user_message``."""
    return encode(
        {
            "type": "run_accepted",
            "run_id": run_id,
            "thread_id": thread_id,
            "client_msg_id": client_msg_id,
        }
    )


PONG_FRAME: Final = encode({"type": "pong"})


def resume_gap_frame(session_id: str, oldest_seq: int, last_seq: int) -> str:
    """Sent when a resume cannot be served exactly; the stream continues from ``oldest_seq``."""
    return encode(
        {
            "type": "resume_gap",
            "session_id": session_id,
            "oldest_seq": oldest_seq,
            "last_seq": last_seq,
        }
    )


def error_frame(code: str, message: str, client_msg_id: str | None = None) -> str:
    """A typed ``error`` frame; ``code`` must be one of ``ERROR_CODES``."""
    frame: dict[str, Any] = {"type": "error", "code": code, "message": message}
    if client_msg_id is not None:
        frame["client_msg_id"] = client_msg_id
    return encode(frame)
