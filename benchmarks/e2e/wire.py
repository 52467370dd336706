"""Sans-IO pieces of the harness: handshake, frame parsing, client frames, demo events.

Nothing here does I/O, so the clients and the baseline servers share it and it
can be tested on its own.

Why a hand-written client side: a client that decodes every frame with a
WebSocket library in Python saturates before the server on 2 cores. The
parser below only reads frame headers (server frames are unmasked) and hands
back each message's payload; the clients count and record them, and decode
them only after the measured window.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import time
import uuid
from collections.abc import Iterator, Sequence
from typing import Any, Final

import orjson

TEXT: Final = 0x1
BINARY: Final = 0x2
CLOSE: Final = 0x8
PING: Final = 0x9
PONG: Final = 0xA

_WS_GUID: Final = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

#: An event's terminal type, found in the raw bytes (JSON escapes every quote inside a
#: string, so this byte sequence only appears as a real ``"type"`` member).
TERMINAL_RE: Final = re.compile(rb'"type":"agent_(?:completed|error|cancelled)"')
#: Marks one event in a frame (a plain event frame has one, an ``events`` frame several).
SEQ_KEY: Final = b'"seq":'

#: Largest multi-event frame the baselines build, in characters of events (as netra).
MAX_BATCH_CHARS: Final = 256 * 1024


# --- the opening handshake -------------------------------------------------------------------


def handshake_request(host: str, port: int, target: str) -> tuple[bytes, bytes]:
    """An RFC 6455 upgrade request for ``target`` and the ``Sec-WebSocket-Accept`` it expects.

    No extensions are offered, so no server compresses.
    """
    key = base64.b64encode(os.urandom(16))
    request = (
        f"GET {target} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key.decode()}\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n"
    ).encode()
    accept = base64.b64encode(hashlib.sha1(key + _WS_GUID).digest())
    return request, accept


def check_handshake_response(head: bytes, accept: bytes) -> None:
    """Raise ``ConnectionError`` unless ``head`` (up to ``\\r\\n\\r\\n``) accepts the upgrade."""
    lines = head.split(b"\r\n")
    status = lines[0].split(b" ", 2)
    if len(status) < 2 or status[1] != b"101":
        raise ConnectionError(f"handshake refused: {lines[0].decode('latin-1')!r}")
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"sec-websocket-accept" and value.strip() == accept:
            return
    raise ConnectionError("handshake: missing or wrong Sec-WebSocket-Accept")


# --- frames ------------------------------------------------------------------------------------


def client_frame(opcode: int, payload: bytes) -> bytes:
    """A masked, unfragmented client frame (RFC 6455 5.3: clients must mask)."""
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | opcode, 0x80 | n))
    elif n < 1 << 16:
        head = bytes((0x80 | opcode, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, 0x80 | 127)) + n.to_bytes(8, "big")
    key = os.urandom(4)
    stream = (key * (n // 4 + 1))[:n]
    masked = (int.from_bytes(payload, "big") ^ int.from_bytes(stream, "big")).to_bytes(n, "big")
    return head + key + masked


def close_frame(code: int = 1000) -> bytes:
    """A client close frame with ``code``."""
    return client_frame(CLOSE, code.to_bytes(2, "big"))


class FrameParser:
    """Splits the server's byte stream into messages, reading frame headers only.

    ``feed(data)`` returns the complete messages it now holds as ``(opcode,
    payload)``; fragments are joined. Server frames are never masked (RFC 6455
    5.1); a masked one raises ``ValueError``.
    """

    def __init__(self) -> None:
        self._rest: list[bytes] = []
        self._rest_len = 0
        self._need = 0  # bytes the next frame needs (0: unknown, retry on any data)
        self._fragments: list[bytes] = []
        self._fragment_opcode = 0

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        if self._rest:
            self._rest.append(data)
            self._rest_len += len(data)
            if self._rest_len < self._need:
                return []
            data = b"".join(self._rest)
            self._rest = []
        out: list[tuple[int, bytes]] = []
        pos = 0
        n = len(data)
        need = 0
        while n - pos >= 2:
            b0 = data[pos]
            b1 = data[pos + 1]
            length = b1 & 0x7F
            if length < 126:
                header = 2
            elif length == 126:
                if n - pos < 4:
                    break
                length = (data[pos + 2] << 8) | data[pos + 3]
                header = 4
            else:
                if n - pos < 10:
                    break
                length = int.from_bytes(data[pos + 2 : pos + 10], "big")
                header = 10
            if b1 & 0x80:
                raise ValueError("the server sent a masked frame")
            end = pos + header + length
            if end > n:
                need = end - pos
                break
            payload = data[pos + header : end]
            pos = end
            opcode = b0 & 0x0F
            # The common case, a whole message in one frame; control frames are never
            # fragmented.
            if (b0 & 0x80 and opcode) or opcode >= CLOSE:
                out.append((opcode, payload))
            else:
                if opcode:
                    self._fragment_opcode = opcode
                self._fragments.append(payload)
                if b0 & 0x80:
                    out.append((self._fragment_opcode, b"".join(self._fragments)))
                    self._fragments = []
        if pos < n:
            self._rest = [data[pos:]]
            self._rest_len = n - pos
            self._need = need
        else:
            self._rest_len = 0
            self._need = 0
        return out


class LineParser:
    """The plain-TCP baseline's framing: one message per ``\\n``-terminated line."""

    def __init__(self) -> None:
        self._rest = b""

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        if self._rest:
            data = self._rest + data
        lines = data.split(b"\n")
        self._rest = lines.pop()
        return [(TEXT, line) for line in lines]


# --- the demo agent's events, as the baselines emit them ---------------------------------------

_STREAM = re.compile(r"^\s*stream\s+(\d+)\s*$", re.I)
CALC_TEXT: Final = "what is 2+3*4?"

EventSpec = tuple[str, dict[str, Any], str]  # (type, data, span id)


def random_hex(n: int) -> str:
    """``n`` random bytes as hex (trace, span and call ids)."""
    return os.urandom(n).hex()


def demo_events(text: str, user_id: str) -> Iterator[EventSpec]:
    """The events netra's demo agent emits for ``text`` (``stream N`` or the calculator
    question), with the same types, fields and sizes, for the baselines to send."""
    span = random_hex(8)
    yield "agent_started", {"agent_name": "demo", "user_id": user_id, "text": text}, span
    if m := _STREAM.match(text):
        count = int(m.group(1))
        yield "agent_thinking", {"reasoning": f"Streaming {count} pieces.", "step": 0}, span
        pieces = [f"t{i} " for i in range(count)]
        for piece in pieces:
            yield "partial_result", {"text": piece}, span
        usage = {"prompt_tokens": 13, "completion_tokens": count + 3}
        final = "".join(pieces)
    else:
        tool_span, call_id = random_hex(8), f"call_{random_hex(8)}"
        for reasoning in (
            "The user asks for an arithmetic result. ",
            "I will use the calculator on '2+3*4'.",
        ):
            yield "agent_thinking", {"reasoning": reasoning, "step": 0}, span
        tool = {"call_id": call_id, "tool_name": "calculator"}
        yield "tool_executing", {**tool, "parameters": {"expression": "2+3*4"}}, tool_span
        done = {**tool, "status": "ok", "duration_ms": 0.9, "results": 14}
        yield "tool_completed", done, tool_span
        yield "agent_thinking", {"reasoning": "The calculator answered.", "step": 1}, span
        for piece in ("2+3*4 ", "= ", "14"):
            yield "partial_result", {"text": piece}, span
        usage = {"prompt_tokens": 43, "completion_tokens": 20}
        final = "2+3*4 = 14"
    yield "agent_completed", {"status": "ok", "final_response": final, "usage": usage}, span


def new_run_id() -> str:
    return f"run_{uuid.uuid4().hex}"


def event_frame(
    event_type: str,
    seq: int,
    run_id: str,
    ts: float,
    trace_id: str,
    span_id: str,
    data: dict[str, Any],
) -> str:
    """One event frame, byte for byte in netra's shape (same keys, same order, orjson)."""
    return orjson.dumps(
        {
            "type": event_type,
            "seq": seq,
            "run_id": run_id,
            "thread_id": "main",
            "ts": ts,
            "trace_id": trace_id,
            "span_id": span_id,
            "data": data,
        }
    ).decode()


def encode_run(text: str, user_id: str, first_seq: int, run_id: str) -> list[str]:
    """Every event frame of one demo run, encoded up front (the baselines' pre-encoded frames;
    ``ts`` is the encoding time)."""
    trace_id = random_hex(16)
    now = time.time()
    return [
        event_frame(kind, first_seq + i, run_id, now, trace_id, span, data)
        for i, (kind, data, span) in enumerate(demo_events(text, user_id))
    ]


def session_ready(user_id: str, batch: int) -> str:
    frame: dict[str, Any] = {
        "type": "session_ready",
        "session_id": f"sess_{uuid.uuid4().hex}",
        "user_id": user_id,
        "last_seq": 0,
        "protocol": 1,
    }
    if batch > 1:
        frame["batch"] = batch
    return orjson.dumps(frame).decode()


def run_accepted(run_id: str) -> str:
    return orjson.dumps(
        {"type": "run_accepted", "run_id": run_id, "thread_id": "main", "client_msg_id": None}
    ).decode()


def batched(frames: Sequence[str], batch: int) -> Iterator[str]:
    """Frames joined into ``events`` frames of at most ``batch`` events (netra's rule)."""
    if batch <= 1:
        yield from frames
        return
    group: list[str] = []
    size = 0
    for frame in frames:
        if group and (len(group) >= batch or size + len(frame) > MAX_BATCH_CHARS):
            yield group[0] if len(group) == 1 else events_frame(group)
            group, size = [], 0
        group.append(frame)
        size += len(frame)
    if group:
        yield group[0] if len(group) == 1 else events_frame(group)


def events_frame(frames: Sequence[str]) -> str:
    return '{"type":"events","events":[' + ",".join(frames) + "]}"


def user_message(text: str) -> bytes:
    return orjson.dumps({"type": "user_message", "text": text})


def token_subject(token: str) -> str:
    """The ``sub`` claim of a JWT, unverified (the baselines only need the user's name)."""
    body = token.split(".")[1]
    claims = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    return str(claims["sub"])
