"""The network front: plain HTTP and WebSocket (protocol v1 at ``/ws``) on one port.

``trio_websocket.serve_websocket`` answers every request that is not an
upgrade with 400, so the gateway listens itself: it reads the request head
(bounded in size and time), parses it with h11, answers plain HTTP routes
(``/healthz``, and whatever routes are registered) directly, and hands upgrade
requests to ``trio_websocket.wrap_server_stream`` over a stream that replays
the bytes already read.

Every refusal happens at the handshake, before a session exists: 401 bad
token, 403 ``Origin`` not allowed, 429 too many connections for this user,
503 server-wide connection cap, 404 unknown path.

``GET /metrics`` serves the runtime's Prometheus metrics (behind a bearer
token when ``config.metrics_token`` is set). ``GET /`` serves the web page
(``netra_actors/web``: static HTML, CSS and JavaScript, no build step).
"""

from __future__ import annotations

import functools
import hmac
import importlib.resources
import logging
import ssl
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from typing import Any
from urllib.parse import parse_qs, urlsplit

import attrs
import h11
import orjson
import trio
import trio_websocket
from wsproto.utilities import LocalProtocolError

from ._auth import load_secret, verify_token
from ._config import Config
from ._connection import Connection
from ._exceptions import AuthError, RuntimeClosed
from ._metrics import CONTENT_TYPE_LATEST, metrics_for
from ._protocol import MAX_BATCH, SUBPROTOCOL
from ._runtime import Runtime
from ._transport import TrioWebSocketTransport

logger = logging.getLogger("netra_actors.gateway")

WS_PATH = "/ws"
MAX_HEAD_BYTES = 16 * 1024
BEARER_PREFIX = "bearer."


@attrs.frozen
class HttpResponse:
    """A complete plain-HTTP response."""

    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()

    @classmethod
    def json(cls, status: int, payload: Any) -> HttpResponse:
        return cls(status, orjson.dumps(payload))


@attrs.frozen
class HttpRequest:
    """A parsed plain-HTTP request head (bodies are not read)."""

    method: str
    target: str
    headers: Mapping[str, str]

    @property
    def path(self) -> str:
        return _split(self.target)[2]

    @property
    def query(self) -> dict[str, list[str]]:
        return parse_qs(_split(self.target)[3])


def _split(url: str) -> tuple[str, str, str, str, str]:
    """``urlsplit``, except that a URL it cannot split (an unbalanced ``[``, legal in an
    HTTP target) has an empty netloc and the whole URL as its path: it then matches no
    route and no origin, instead of raising."""
    try:
        return tuple(urlsplit(url))  # type: ignore[return-value]
    except ValueError:
        return ("", "", url, "", "")


def upgrade_problem(request: HttpRequest) -> HttpResponse | None:
    """Why ``request`` is not a WebSocket opening handshake (RFC 6455, 4.2.1), as the
    documented JSON refusal, or None. Checked before wsproto sees the head, so every
    refusal carries a body, and header values wsproto cannot decode get 400, not a fault."""

    def refuse(message: str, status: int = 400, **headers: str) -> HttpResponse:
        body = orjson.dumps({"error": "bad_request", "message": message})
        return HttpResponse(status, body, headers=tuple(headers.items()))

    headers = request.headers
    if request.method != "GET":
        return refuse("a WebSocket handshake must be a GET request")
    if not request.target.isascii():
        return refuse("the request target is not ASCII")
    for name in ("connection", "sec-websocket-protocol", "sec-websocket-extensions"):
        if not headers.get(name, "").isascii():
            return refuse(f"header {name!r} is not ASCII")
    try:
        headers.get("host", "").encode("latin-1").decode("idna")
    except UnicodeError:
        return refuse("header 'host' is not a valid host name")
    tokens = {token.strip().lower() for token in headers.get("connection", "").split(",")}
    if "upgrade" not in tokens:
        return refuse("missing header 'Connection: Upgrade'")
    version = headers.get("sec-websocket-version")
    if version != "13":
        return refuse(
            "unsupported WebSocket version (this server speaks 13)",
            426 if version else 400,
            **{"sec-websocket-version": "13"},
        )
    if not headers.get("sec-websocket-key"):
        return refuse("missing header 'Sec-WebSocket-Key'")
    if "host" not in headers:
        return refuse("missing header 'Host'")
    return None


HttpRoute = Callable[[HttpRequest], Awaitable[HttpResponse]]

#: The web page's files (folder ``netra_actors/web``, package data) by path, with content type.
WEB_FILES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/static/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/static/style.css": ("style.css", "text/css; charset=utf-8"),
}
#: Headers of every web page response (the page has its own Content-Security-Policy).
WEB_HEADERS = (
    ("x-content-type-options", "nosniff"),
    ("referrer-policy", "no-referrer"),
    ("x-frame-options", "DENY"),
)


@functools.cache
def web_file(name: str) -> bytes:
    """A file of the web page, read once from the installed package."""
    return importlib.resources.files("netra_actors").joinpath("web", name).read_bytes()


def _web_route(name: str, content_type: str) -> HttpRoute:
    async def route(request: HttpRequest) -> HttpResponse:
        await trio.lowlevel.checkpoint()
        return HttpResponse(200, web_file(name), content_type, WEB_HEADERS)

    return route


@attrs.frozen
class GatewayInfo:
    """What ``serve`` reports once it listens."""

    host: str
    port: int
    tls: bool

    @property
    def url(self) -> str:
        return f"{'wss' if self.tls else 'ws'}://{self.host}:{self.port}{WS_PATH}"


class _ReplayStream(trio.abc.Stream):
    """A stream that first returns ``prefix`` (bytes already read), then reads ``stream``."""

    def __init__(self, prefix: bytes, stream: trio.abc.Stream) -> None:
        self._prefix: bytes
        self._prefix = prefix
        self.stream = stream

    def receive_some(self, max_bytes: int | None = None) -> Coroutine[Any, Any, bytes | bytearray]:
        """Once the prefix is consumed, the wrapped stream's own ``receive_some`` (not a
        coroutine of ours around it: a connection waits here for its whole life, and
        each frame in that chain is memory per connection)."""
        if self._prefix:
            return self._replay(max_bytes)
        return self.stream.receive_some(max_bytes)

    async def _replay(self, max_bytes: int | None) -> bytes:
        size = len(self._prefix) if max_bytes is None else max_bytes
        data, self._prefix = self._prefix[:size], self._prefix[size:]
        await trio.lowlevel.checkpoint()
        return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self.stream.aclose()


class _BadRequest(Exception):
    pass


async def _read_head(stream: trio.abc.Stream) -> tuple[HttpRequest, bytes]:
    """The request head and every byte read so far (to replay). Raises ``_BadRequest``."""
    parser = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
    raw = bytearray()
    while True:
        try:
            event = parser.next_event()
        except h11.RemoteProtocolError as exc:
            raise _BadRequest(f"malformed request: {exc}") from None
        if isinstance(event, h11.Request):
            if event.http_version not in (b"1.0", b"1.1"):
                # h11 takes any HTTP/d.d; nothing here speaks another version.
                raise _BadRequest(f"unsupported HTTP version {event.http_version.decode()!r}")
            headers: dict[str, str] = {}
            for name, value in event.headers:  # repeated headers join as one list (RFC 9110)
                key, text = name.decode("latin-1").lower(), value.decode("latin-1")
                headers[key] = f"{headers[key]}, {text}" if key in headers else text
            if len(raw) - len(parser.trailing_data[0]) > MAX_HEAD_BYTES:
                raise _BadRequest("request head too large")
            return (
                HttpRequest(event.method.decode(), event.target.decode("latin-1"), headers),
                bytes(raw),
            )
        if event is h11.NEED_DATA:
            data = bytes(await stream.receive_some(4096))
            if not data:
                raise _BadRequest("connection closed before the request head")
            raw += data
            parser.receive_data(data)
            continue
        raise _BadRequest(f"unexpected {type(event).__name__}")


async def _send_http(stream: trio.abc.Stream, response: HttpResponse) -> None:
    conn = h11.Connection(h11.SERVER)
    # h11 needs to have seen a request before it writes a response.
    conn.receive_data(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
    conn.next_event()
    headers = [
        ("content-type", response.content_type),
        ("content-length", str(len(response.body))),
        ("connection", "close"),
        ("cache-control", "no-store"),
        *response.headers,
    ]
    out = conn.send(h11.Response(status_code=response.status, headers=headers))
    out += conn.send(h11.Data(data=response.body)) or b""
    out += conn.send(h11.EndOfMessage()) or b""
    await stream.send_all(out or b"")


def bearer_token(request: HttpRequest, subprotocols: list[str]) -> str | None:
    """The token of a handshake: ``Authorization: Bearer``, a ``bearer.<token>``
    subprotocol (browsers cannot set headers), or the ``token`` query parameter."""
    auth = request.headers.get("authorization")
    if auth is not None:
        scheme, _, value = auth.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    for proposed in subprotocols:
        if proposed.startswith(BEARER_PREFIX) and len(proposed) > len(BEARER_PREFIX):
            return proposed[len(BEARER_PREFIX) :]
    tokens = request.query.get("token")
    return tokens[0] if tokens else None


def _origin_allowed(origin: str | None, request: HttpRequest, allowed: tuple[str, ...]) -> bool:
    if origin is None or "*" in allowed:
        return True
    host = request.headers.get("host", "")
    # The server's own page connects from its own origin.
    if _split(origin)[1] == host:
        return True
    return origin.rstrip("/") in allowed


class Gateway:
    """Accepts connections for a ``Runtime``: HTTP routes and protocol v1 WebSockets."""

    def __init__(self, runtime: Runtime, config: Config | None = None) -> None:
        self.runtime = runtime
        self.config = config or runtime.config
        self._secret = load_secret(self.config)
        self.metrics = metrics_for(runtime)
        self.routes: dict[tuple[str, str], HttpRoute] = {
            ("GET", "/healthz"): self._healthz,
            ("GET", "/metrics"): self._metrics,
        }
        for path, (name, content_type) in WEB_FILES.items():
            self.routes[("GET", path)] = _web_route(name, content_type)
        self._started = time.monotonic()
        self.accepting = True
        # Connections admitted by this gateway (counted from the handshake checks on,
        # so concurrent handshakes cannot all pass a limit).
        self._admitted_total = 0
        self._admitted: dict[str, int] = {}

    def add_route(self, method: str, path: str, route: HttpRoute) -> None:
        """Serve ``route`` for ``method path`` (plain HTTP, same port as ``/ws``)."""
        self.routes[(method.upper(), path)] = route

    async def _healthz(self, request: HttpRequest) -> HttpResponse:
        stats = self.runtime.statistics()
        ready = self.accepting and not self.runtime.closing
        return HttpResponse.json(
            200 if ready else 503,
            {
                "status": "ok" if ready else "shutting_down",
                "live": True,
                "ready": ready,
                "sessions": stats.sessions,
                "connections": stats.connections,
                "active_runs": stats.active_runs,
                "queued_runs": stats.queued_runs,
                "uptime_s": round(time.monotonic() - self._started, 3),
            },
        )

    async def _metrics(self, request: HttpRequest) -> HttpResponse:
        """The Prometheus text format; 401 without the configured bearer token."""
        await trio.lowlevel.checkpoint()
        expected = self.config.metrics_token
        if expected is not None:
            scheme, _, given = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                given.strip().encode(), expected.encode()
            ):
                body = orjson.dumps(
                    {"error": "unauthorized", "message": "GET /metrics needs the bearer token"}
                )
                return HttpResponse(401, body, headers=(("www-authenticate", "Bearer"),))
        return HttpResponse(200, self.metrics.render(), CONTENT_TYPE_LATEST)

    async def handle(self, stream: trio.abc.Stream) -> None:
        """Serve one accepted TCP (or TLS) stream; closes it when done.

        Never raises (except cancellation): one connection's fault must never
        reach ``serve_listeners``, which would stop the whole server.
        """
        try:
            upgrade = await self._handle(stream)
            if upgrade is not None:
                # Served in this frame, not below _handle: one frame less kept alive
                # for each open connection.
                await self._websocket(*upgrade)
        except* (
            trio.BrokenResourceError,
            trio.ClosedResourceError,
            ssl.SSLError,
            OSError,
            # trio-websocket answers a ping that crosses our close frame, which wsproto
            # refuses (trio-websocket issue #184): the connection was closing anyway.
            LocalProtocolError,
        ):
            pass  # the peer went away (or TLS failed): nothing to answer
        except* Exception:
            logger.exception("connection handler failed")
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                await trio.aclose_forcefully(stream)

    async def _handle(self, stream: trio.abc.Stream) -> tuple[_ReplayStream, HttpRequest] | None:
        """Read the request head and answer it, except a valid WebSocket upgrade: that is
        returned (a stream replaying the bytes read, and the head) for ``handle`` to serve."""
        try:
            with trio.move_on_after(self.config.handshake_timeout) as timer:
                request, raw = await _read_head(stream)
            if timer.cancelled_caught:
                return None
        except _BadRequest as exc:
            await self._send_http(
                stream, HttpResponse.json(400, {"error": "bad_request", "message": str(exc)})
            )
            return None
        if request.headers.get("upgrade", "").lower() == "websocket":
            problem = upgrade_problem(request)
            if problem is None:
                return _ReplayStream(raw, stream), request
            await self._send_http(stream, problem)
            return None
        route = self.routes.get((request.method, request.path))
        if route is None:
            response = HttpResponse.json(
                404, {"error": "not_found", "message": f"no route {request.path!r}"}
            )
        else:
            response = await route(request)
        await self._send_http(stream, response)
        return None

    async def _send_http(self, stream: trio.abc.Stream, response: HttpResponse) -> None:
        # Client errors only: a 503 from /healthz while shutting down is an answer.
        if 400 <= response.status < 500:
            self.metrics.refused(response.status, _error_code(response))
        await _send_http(stream, response)

    async def _refuse(
        self, request: trio_websocket.WebSocketRequest, status: int, error: str, message: str
    ) -> None:
        self.metrics.refused(status, error)
        body = orjson.dumps({"error": error, "message": message})
        await request.reject(
            status, extra_headers=[(b"content-type", b"application/json")], body=body
        )

    async def _websocket(self, stream: _ReplayStream, head: HttpRequest) -> None:
        """Handshake, admit, accept, then wait here (the frame that holds trio-websocket's
        nursery) while the connection actor serves the client in its session: an idle
        connection's handler task keeps as few frames alive as it can."""
        config = self.config
        async with trio.open_nursery() as nursery:
            with trio.move_on_after(config.handshake_timeout) as timer:
                request = await trio_websocket.wrap_server_stream(
                    nursery,
                    stream,
                    message_queue_size=config.receive_queue,
                    max_message_size=config.max_frame_bytes,
                    receive_buffer_size=64 * 1024,
                )
            if timer.cancelled_caught:
                nursery.cancel_scope.cancel()
                return
            user_id = None
            try:
                user_id = await self._admit(request, head)
                if user_id is not None:
                    connection = await self._accept(request, stream, head, user_id)
                    if connection is not None:
                        await connection.done.wait()
            finally:
                if user_id is not None:
                    # Counted until the connection ends, so the limits stay race-free.
                    self._admitted_total -= 1
                    self._admitted[user_id] -= 1
                    if not self._admitted[user_id]:
                        del self._admitted[user_id]
                nursery.cancel_scope.cancel()

    async def _admit(
        self, request: trio_websocket.WebSocketRequest, head: HttpRequest
    ) -> str | None:
        """The user a WebSocket request may be served for, counted in the limits; ``None``
        once it was refused (with its HTTP status)."""
        config = self.config
        manager = self.runtime.manager
        if head.path != WS_PATH:
            await self._refuse(request, 404, "not_found", f"no WebSocket endpoint at {head.path!r}")
            return None
        proposed = list(request.proposed_subprotocols)
        try:
            user_id = verify_token(bearer_token(head, proposed), self._secret)
        except AuthError as exc:
            await self._refuse(request, 401, "unauthorized", str(exc))
            return None
        if not _origin_allowed(head.headers.get("origin"), head, config.allowed_origins):
            await self._refuse(request, 403, "forbidden", "origin not allowed")
            return None
        if not self.accepting or self.runtime.closing:
            await self._refuse(request, 503, "unavailable", "server is shutting down")
            return None
        total = max(self._admitted_total, manager.connection_count())
        if total >= config.max_connections:
            await self._refuse(request, 503, "unavailable", "server connection limit reached")
            return None
        mine = max(self._admitted.get(user_id, 0), len(manager.connections(user_id)))
        if mine >= config.max_connections_per_user:
            await self._refuse(
                request, 429, "too_many_connections", "connection limit for this user"
            )
            return None
        # Counted before any await from here on, so the checks above are race-free; the
        # caller uncounts it once the connection ended.
        self._admitted_total += 1
        self._admitted[user_id] = self._admitted.get(user_id, 0) + 1
        return user_id

    async def _accept(
        self,
        request: trio_websocket.WebSocketRequest,
        stream: _ReplayStream,
        head: HttpRequest,
        user_id: str,
    ) -> Connection | None:
        """Accept the handshake and start the connection actor; ``None`` if refused."""
        proposed = list(request.proposed_subprotocols)
        try:
            after_seq = _int_param(head.query.get("after_seq"))
            batch = _int_param(head.query.get("batch"), "batch")
            if batch is not None and not 1 <= batch <= MAX_BATCH:
                raise ValueError(f"batch must be 1 to {MAX_BATCH}, got {batch}")
        except ValueError as exc:
            await self._refuse(request, 400, "bad_request", str(exc))
            return None
        ws = await request.accept(subprotocol=SUBPROTOCOL if SUBPROTOCOL in proposed else None)
        traceparent = head.headers.get("traceparent")
        session_hint = next(iter(head.query.get("session_id", [])), None)
        if isinstance(head.headers, dict):
            head.headers.clear()  # read: not kept for the connection's lifetime
        try:
            return await self.runtime._start_connection(
                user_id,
                TrioWebSocketTransport(ws, stream.stream),
                traceparent=traceparent,
                after_seq=after_seq,
                session_hint=session_hint,
                batch=batch or 1,
            )
        except RuntimeClosed:
            await ws.aclose(1001, "server shutting down")
            return None


def _error_code(response: HttpResponse) -> str:
    """The ``error`` of a JSON refusal body (a metric label: only short ASCII codes)."""
    try:
        error = orjson.loads(response.body).get("error")
    except (orjson.JSONDecodeError, AttributeError):
        return "unknown"
    return error if isinstance(error, str) and error.isascii() and len(error) <= 32 else "unknown"


def _int_param(values: list[str] | None, name: str = "after_seq") -> int | None:
    """A non-negative integer query parameter. Raises ``ValueError`` for anything else."""
    if not values:
        return None
    if not (values[0].isascii() and values[0].isdigit()):
        raise ValueError(f"{name} must be a non-negative integer, got {values[0][:32]!r}")
    return int(values[0])


def make_ssl_context(certfile: str, keyfile: str) -> ssl.SSLContext:
    """A server TLS context for ``wss://``."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certfile, keyfile)
    return context


async def serve(
    runtime: Runtime,
    config: Config | None = None,
    *,
    ssl_context: ssl.SSLContext | None = None,
    gateway: Gateway | None = None,
    task_status: trio.TaskStatus[GatewayInfo] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve HTTP and protocol v1 for ``runtime`` on ``config.host:config.port`` until cancelled.

    ``task_status.started`` receives a ``GatewayInfo`` (its ``port`` is the real
    port when ``config.port`` is 0). TLS is used when ``ssl_context`` is given,
    or when ``config.tls_cert`` and ``config.tls_key`` are set.
    """
    config = config or runtime.config
    gateway = gateway or Gateway(runtime, config)
    if ssl_context is None and config.tls_cert and config.tls_key:
        ssl_context = make_ssl_context(str(config.tls_cert), str(config.tls_key))
    listeners: list[Any]
    if ssl_context is not None:
        listeners = await trio.open_ssl_over_tcp_listeners(
            config.port, ssl_context, host=config.host, https_compatible=True
        )
    else:
        listeners = await trio.open_tcp_listeners(config.port, host=config.host)
    first = listeners[0]
    raw = first.transport_listener if isinstance(first, trio.SSLListener) else first
    assert isinstance(raw, trio.SocketListener)
    info = GatewayInfo(config.host, raw.socket.getsockname()[1], ssl_context is not None)
    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, gateway.handle, listeners)
        task_status.started(info)
