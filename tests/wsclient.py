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

``served`` runs a runtime behind a real listener (a ``Gateway`` the test can
reach, e.g. to stop accepting); ``http_get`` / ``http_exchange`` speak plain
HTTP to the same port.
"""

from __future__ import annotations

import json
import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import cache, partial
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

import attrs
import h11
import jsonschema
import jsonschema.protocols
import trio
import trio_websocket
from referencing import Registry
from referencing.jsonschema import DRAFT202012

from netra_actors import Config, Gateway, GatewayInfo, Runtime, issue_token, serve
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
        validate_server_frame(frame)
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


@cache
def _server_frame_branches() -> dict[str, str]:
    """``type`` -> schema name, for every branch of server_frame.json's ``oneOf``.

    Every branch pins ``type`` with a ``const``, so at most one branch can match a
    frame: validating against the branch its ``type`` names is the same check as
    validating against server_frame.json, about ten times faster (tests that count
    thousands of events stay quick).
    """
    schemas = _schemas()
    branches: dict[str, str] = {}
    for branch in schemas["server_frame"]["oneOf"]:
        name = branch["$ref"].removesuffix(".json")
        const = schemas[name]["properties"]["type"]["const"]
        assert const not in branches, f"two server_frame branches for type {const!r}"
        branches[const] = name
    return branches


def validate_server_frame(frame: Frame) -> None:
    """Check ``frame`` against docs/schemas/server_frame.json (raises ``ValidationError``)."""
    kind = frame.get("type")
    branch = _server_frame_branches().get(kind) if isinstance(kind, str) else None
    # A frame no branch takes fails the full schema, with its full explanation.
    load_validator(branch or "server_frame").validate(frame)


@asynccontextmanager
async def connect(
    url: str,
    *,
    headers: list[tuple[bytes, bytes]] | None = None,
    subprotocols: list[str] | None = None,
    ssl_context: ssl.SSLContext | None = None,
    message_queue_size: int = 1,
) -> AsyncIterator[WsClient]:
    """Open a WebSocket to ``url`` as a ``WsClient``; closed (1000) and its socket released on exit.

    ``ws://`` or ``wss://`` (TLS with ``ssl_context``, default: the system trust
    store). ``subprotocols`` are proposed in the handshake; the one the server
    selected is ``client.ws.subprotocol``.

    Raises ``trio_websocket.ConnectionRejected`` when the server refuses the handshake.
    """
    parts = urlsplit(url)
    assert parts.scheme in ("ws", "wss")
    assert parts.hostname is not None
    assert parts.port is not None
    resource = parts.path + (f"?{parts.query}" if parts.query else "")
    stream: trio.SocketStream | trio.SSLStream[trio.SocketStream]
    if parts.scheme == "wss":
        stream = await trio.open_ssl_over_tcp_stream(
            parts.hostname,
            parts.port,
            ssl_context=ssl_context or ssl.create_default_context(),
            https_compatible=True,
        )
    else:
        stream = await trio.open_tcp_stream(parts.hostname, parts.port)
    try:
        async with stream, trio.open_nursery() as nursery:
            try:
                ws = await trio_websocket.wrap_client_stream(
                    nursery,
                    stream,
                    parts.netloc,
                    resource,
                    subprotocols=subprotocols,
                    extra_headers=headers,
                    message_queue_size=message_queue_size,
                )
                try:
                    yield WsClient(ws)
                finally:
                    with trio.CancelScope(shield=True), trio.move_on_after(5):
                        await ws.aclose()
            finally:
                # Ends the reader task too, whatever state the WebSocket is in.
                await trio.aclose_forcefully(stream)
    except BaseExceptionGroup as group:
        # Only one exception can matter here (the test's, or the reader task's); show it bare.
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise


# --- servers (real sockets on 127.0.0.1) -------------------------------------------------------


@attrs.frozen
class Served:
    """A runtime served by ``served``: its ``Gateway`` and where it listens."""

    runtime: Runtime
    config: Config
    gateway: Gateway
    info: GatewayInfo

    @property
    def port(self) -> int:
        return self.info.port

    def token(self, user_id: str, ttl: float = 600.0, now: float | None = None) -> str:
        """A token the server accepts for ``user_id``."""
        assert self.config.secret is not None
        return issue_token(user_id, self.config.secret.encode(), ttl=ttl, now=now)

    def url(self, path: str = "/ws", /, **query: str | int) -> str:
        """``ws(s)://127.0.0.1:PORT`` + ``path`` + ``query`` (in the order given)."""
        scheme = "wss" if self.info.tls else "ws"
        tail = f"?{urlencode(query)}" if query else ""
        return f"{scheme}://127.0.0.1:{self.port}{path}{tail}"

    def url_for(self, user_id: str, **query: str | int) -> str:
        """The ``/ws`` URL with a token for ``user_id`` (``?token=``), then ``query``."""
        return self.url(token=self.token(user_id), **query)


@asynccontextmanager
async def served(
    config: Config, *, ssl_context: ssl.SSLContext | None = None, **runtime_options: Any
) -> AsyncIterator[Served]:
    """``Runtime(config, **runtime_options)`` served on ``config.host:config.port``.

    On exit, like ``netra-actors serve`` on a signal: new handshakes are refused,
    the runtime shuts down (open connections get their runs' last events and
    1001), then the listener stops. If the body raised, everything is cancelled.
    """
    async with Runtime(config, **runtime_options) as runtime, trio.open_nursery() as nursery:
        gateway = Gateway(runtime, config)
        info = await nursery.start(
            partial(serve, runtime, config, ssl_context=ssl_context, gateway=gateway)
        )
        yield Served(runtime, config, gateway, info)
        gateway.accepting = False
        await runtime.aclose()
        nursery.cancel_scope.cancel()


@attrs.frozen
class HttpAnswer:
    """A plain-HTTP response read to its end."""

    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        assert self.headers.get("content-type") == "application/json", self.headers
        return json.loads(self.body)


async def http_exchange(
    port: int, request: bytes, *, ssl_context: ssl.SSLContext | None = None
) -> HttpAnswer:
    """Send raw ``request`` bytes to 127.0.0.1:``port``; the response, parsed with h11.

    The server answers ``connection: close``, so the response is read to EOF.
    """
    stream: trio.SocketStream | trio.SSLStream[trio.SocketStream]
    if ssl_context is not None:
        stream = await trio.open_ssl_over_tcp_stream(
            "127.0.0.1", port, ssl_context=ssl_context, https_compatible=True
        )
    else:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
    try:
        await stream.send_all(request)
        parser = h11.Connection(h11.CLIENT)
        # h11 parses a response only after it has "sent" a request; nothing is sent here.
        parser.send(h11.Request(method="GET", target="/", headers=[("host", "x")]))
        parser.send(h11.EndOfMessage())
        response: h11.Response | None = None
        body = bytearray()
        while True:
            event = parser.next_event()
            if event is h11.NEED_DATA:
                parser.receive_data(bytes(await stream.receive_some()))
            elif isinstance(event, h11.Response):
                response = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                break
        assert response is not None, "the connection closed before a response"
        headers = {k.decode().lower(): v.decode() for k, v in response.headers}
        return HttpAnswer(response.status_code, headers, bytes(body))
    finally:
        await trio.aclose_forcefully(stream)


async def http_get(
    port: int, path: str, *, ssl_context: ssl.SSLContext | None = None
) -> HttpAnswer:
    """``GET path`` over plain HTTP (or HTTPS with ``ssl_context``)."""
    request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()
    return await http_exchange(port, request, ssl_context=ssl_context)
