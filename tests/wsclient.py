"""A protocol-v1 test client over a real WebSocket: JSON frames, schema checks, run helpers.

Every frame the client receives is decoded, validated against
docs/schemas/server_frame.json and recorded (``frames``, ``raw``), so a test can
run ``netra_actors.testing.check_lifecycle`` over the whole stream afterwards.

``connect`` opens the TCP stream itself and hands it to
``trio_websocket.wrap_client_stream``, so the socket is closed on exit whatever
happened. ``open_websocket_url`` (trio-websocket 0.12.2) leaks the client socket
when the *server* ends the connection: when it refuses the handshake
(``ConnectionRejected`` is raised from the reader task, the stream is never
closed) and when it sends the close frame first (``aclose`` then returns early
without closing the stream). The ``ResourceWarning`` then fails the suite
(``filterwarnings = error``).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import jsonschema.protocols
import trio
import trio_websocket
from referencing import Registry
from referencing.jsonschema import DRAFT202012

from netra_actors.testing import EVENT_TYPES, TERMINAL_EVENTS

SCHEMA_DIR = Path(__file__).resolve().parent.parent / "docs" / "schemas"

Frame = dict[str, Any]


# --- JSON Schemas (same loader as tests/test_schemas_wellformed.py) -----------------------------


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


@cache
def load_validator(name: str) -> jsonschema.protocols.Validator:
    """A Draft 2020-12 validator for docs/schemas/<name>.json with all $refs resolvable."""
    return jsonschema.Draft202012Validator(_schemas()[name], registry=_registry())


# --- frames -----------------------------------------------------------------------------------


def decode(message: str | bytes) -> Frame:
    """Decode one server message: a text frame holding exactly one JSON object."""
    assert isinstance(message, str), f"server sent a binary frame: {message!r}"
    frame = json.loads(message)
    assert isinstance(frame, dict), f"server frame is not a JSON object: {message!r}"
    return frame


def is_terminal(frame: Frame, run_id: str | None = None) -> bool:
    """Whether ``frame`` is a terminal event (of ``run_id``, when given)."""
    return frame.get("type") in TERMINAL_EVENTS and run_id in (None, frame.get("run_id"))


class WsClient:
    """One client connection; ``frames`` / ``raw`` hold everything received, in order."""

    def __init__(self, ws: trio_websocket.WebSocketConnection) -> None:
        self.ws = ws
        self.raw: list[str] = []
        self.frames: list[Frame] = []

    # -- sending -------------------------------------------------------------------------------

    async def send(self, frame: Frame) -> None:
        """Send one frame as JSON text."""
        await self.ws.send_message(json.dumps(frame))

    async def send_raw(self, message: str | bytes) -> None:
        """Send a text (str) or binary (bytes) frame verbatim."""
        await self.ws.send_message(message)

    # -- receiving -----------------------------------------------------------------------------

    async def receive(self) -> Frame:
        """The next frame, schema-checked against server_frame.json and recorded."""
        message = await self.ws.get_message()
        frame = decode(message)
        load_validator("server_frame").validate(frame)
        assert isinstance(message, str)
        self.raw.append(message)
        self.frames.append(frame)
        return frame

    async def expect(self, frame_type: str) -> Frame:
        """The next frame, which must be of ``frame_type``."""
        frame = await self.receive()
        assert frame["type"] == frame_type, f"expected {frame_type}, got {frame}"
        return frame

    async def receive_until(self, done: Callable[[Frame], bool]) -> list[Frame]:
        """Receive frames up to and including the first one ``done`` accepts."""
        received: list[Frame] = []
        while True:
            frame = await self.receive()
            received.append(frame)
            if done(frame):
                return received

    async def ready(self) -> Frame:
        """The connection's first frame, which must be a valid ``session_ready``."""
        assert not self.frames, "session_ready must be the first frame"
        frame = await self.expect("session_ready")
        assert frame["protocol"] == 1
        return frame

    async def ping(self) -> None:
        """Send ``ping``; the next frame received must be ``pong``."""
        await self.send({"type": "ping"})
        await self.expect("pong")

    # -- runs ----------------------------------------------------------------------------------

    def events(self, run_id: str | None = None) -> list[Frame]:
        """Event frames received so far (of ``run_id``, when given)."""
        return [f for f in self.frames if "seq" in f and run_id in (None, f["run_id"])]

    def raw_events(self) -> list[str]:
        """Event frames received so far, as the exact text the server sent."""
        return [raw for raw, f in zip(self.raw, self.frames, strict=True) if "seq" in f]

    async def start(
        self, text: str, *, client_msg_id: str | None = None, thread_id: str | None = None
    ) -> Frame:
        """Send a ``user_message``; return its ``run_accepted`` (events may arrive before it)."""
        frame: Frame = {"type": "user_message", "text": text}
        if client_msg_id is not None:
            frame["client_msg_id"] = client_msg_id
        if thread_id is not None:
            frame["thread_id"] = thread_id
        await self.send(frame)
        received = await self.receive_until(lambda f: f["type"] == "run_accepted")
        unexpected = [f for f in received if f["type"] not in {"run_accepted", *EVENT_TYPES}]
        assert not unexpected, f"unexpected frames before run_accepted: {unexpected}"
        return received[-1]

    async def until_event(self, run_id: str, done: Callable[[Frame], bool]) -> list[Frame]:
        """Receive until an event of ``run_id`` that ``done`` accepts; return the run's events."""
        if not any(done(f) for f in self.events(run_id)):
            await self.receive_until(lambda f: f.get("run_id") == run_id and done(f))
        return self.events(run_id)

    async def until_terminal(self, run_id: str) -> list[Frame]:
        """Receive until the terminal event of ``run_id``; return all of that run's events."""
        return await self.until_event(run_id, is_terminal)

    async def run(
        self, text: str, *, client_msg_id: str | None = None, thread_id: str | None = None
    ) -> tuple[Frame, list[Frame]]:
        """Start a run and wait for its terminal event: ``(run_accepted, the run's events)``."""
        accepted = await self.start(text, client_msg_id=client_msg_id, thread_id=thread_id)
        return accepted, await self.until_terminal(accepted["run_id"])


@asynccontextmanager
async def connect(
    url: str, *, headers: list[tuple[bytes, bytes]] | None = None
) -> AsyncIterator[WsClient]:
    """Open a WebSocket to ``url`` as a ``WsClient``; closed (1000) and its socket released on exit.

    Raises ``trio_websocket.ConnectionRejected`` when the server refuses the handshake.
    """
    parts = urlsplit(url)
    assert parts.scheme == "ws"
    assert parts.hostname is not None
    assert parts.port is not None
    resource = parts.path + (f"?{parts.query}" if parts.query else "")
    try:
        async with (
            await trio.open_tcp_stream(parts.hostname, parts.port) as stream,
            trio.open_nursery() as nursery,
        ):
            try:
                ws = await trio_websocket.wrap_client_stream(
                    nursery, stream, parts.netloc, resource, extra_headers=headers
                )
                try:
                    yield WsClient(ws)
                finally:
                    with trio.CancelScope(shield=True), trio.move_on_after(5):
                        await ws.aclose()
            finally:
                # Ends the reader task too, whatever state the WebSocket is in.
                await stream.aclose()
    except BaseExceptionGroup as group:
        # Only one exception can matter here (the test's, or the reader task's); show it bare.
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise
