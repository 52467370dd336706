"""Protocol v1 over an ASGI WebSocket (Starlette, FastAPI, any ASGI server).

The runtime runs as a Trio guest of the ASGI server's asyncio loop
(``netra_actors.aio.AsyncioRuntime``). ``websocket_route`` is a ready
endpoint: it authenticates the handshake with the application's own hook,
accepts, and hands the socket to the runtime as an ``AsgiTransport``; the
connection actor then runs in Trio exactly as behind the built-in gateway,
and each frame it sends or receives crosses to asyncio (``run_asyncio``)::

    rt = AsyncioRuntime(config)
    app = Starlette(
        routes=[WebSocketRoute("/ws", websocket_route(rt, token_authenticator(config)))],
        lifespan=rt.lifespan,
    )

What differs from the built-in gateway:

- Refused handshakes close with 1008 before accepting; ASGI servers answer
  that with HTTP 403 (unless they support the ``websocket.http.response``
  denial extension, which this endpoint does not use), so the gateway's
  401/403/429/503 distinctions and JSON refusal bodies are not available.
- Transport-level pings and their timeouts are the ASGI server's (uvicorn:
  ``--ws-ping-interval`` / ``--ws-ping-timeout``); ``AsgiTransport.ping`` only
  checks that the socket is still open. The protocol's own ``ping`` frame works.
- ``abort`` cannot drop the TCP connection (ASGI has no such message): the
  endpoint returns without a close handshake and the server closes the socket.
- uvicorn closes open WebSockets with 1012 when it shuts down, before the
  lifespan (and so the runtime) ends: clients see 1012, not the runs' last
  events. Its access log prints ``?token=`` query parameters: prefer the
  ``Authorization`` header or the ``bearer.<token>`` subprotocol.
- Origin checks and per-user connection limits are the application's (in its
  ``authenticate`` hook or middleware); frame size limits are the server's
  (uvicorn ``--ws-max-size``) as well as the runtime's (``max_frame_bytes``).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

import trio

from ._auth import load_secret, verify_token
from ._config import Config
from ._exceptions import AuthError, RuntimeClosed, TransportClosed
from ._gateway import HttpRequest, _int_param, bearer_token
from ._protocol import MAX_BATCH, SUBPROTOCOL
from ._transport import CLOSE_ABNORMAL
from .aio import AsyncioRuntime, run_asyncio

logger = logging.getLogger("netra_actors.asgi")

#: ASGI ``receive`` and ``send`` callables (``Message`` is a plain dict).
Receive = Callable[[], Awaitable[Mapping[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

#: Close code of a refused handshake (policy violation); ASGI servers send HTTP 403.
CLOSE_POLICY = 1008
#: Close code when the runtime is shutting down and takes no connection.
CLOSE_TRY_AGAIN = 1013
CLOSE_GOING_AWAY = 1001
#: RFC 6455 close reasons fit in a control frame: at most 123 bytes.
MAX_REASON_BYTES = 123


class AsgiWebSocket(Protocol):
    """What the endpoint uses of a WebSocket; ``starlette.websockets.WebSocket`` has it."""

    @property
    def scope(self) -> Mapping[str, Any]: ...

    async def receive(self) -> Mapping[str, Any]: ...

    async def send(self, message: Any) -> None: ...

    async def accept(self, subprotocol: str | None = None) -> None: ...

    async def close(self, code: int = 1000, reason: str | None = None) -> None: ...


#: The application's handshake check: the user id, or ``None`` to refuse (may be async).
Authenticator = Callable[[AsgiWebSocket], "str | Awaitable[str | None] | None"]


def _reason(text: str) -> str:
    return text.encode()[:MAX_REASON_BYTES].decode(errors="ignore")


class AsgiTransport:
    """A ``Transport`` over an accepted ASGI WebSocket, used from Trio code.

    Its methods are Trio coroutines that run the ASGI ``receive`` / ``send``
    callables as asyncio tasks on the host loop (the runtime must be a guest
    of that loop: ``AsyncioRuntime``). Failures of ``send`` / ``receive``
    (the server's ``OSError``, Starlette's ``WebSocketDisconnect``...) and a
    ``websocket.disconnect`` message raise ``TransportClosed``.
    """

    def __init__(self, receive: Receive, send: Send) -> None:
        self._receive = receive
        self._send = send
        #: The close code once either side closed (``None`` while open).
        self.close_code: int | None = None
        self.close_reason: str | None = None
        #: Whether the connection was aborted (no close frame was sent).
        self.aborted = False
        # The asyncio task of a ``receive`` whose Trio caller was cancelled: the next
        # ``receive`` takes its message (so a cancelled receive never loses one).
        self._pending: tuple[asyncio.Future[Mapping[str, Any]], trio.Event] | None = None

    @classmethod
    def from_websocket(cls, websocket: AsgiWebSocket) -> AsgiTransport:
        """A transport over an accepted ``starlette.websockets.WebSocket`` (or alike)."""
        return cls(websocket.receive, websocket.send)

    @property
    def closed(self) -> bool:
        return self.close_code is not None

    def _closed(self, code: int | None, reason: str | None = None) -> TransportClosed:
        if self.close_code is None:
            self.close_code, self.close_reason = code or CLOSE_ABNORMAL, reason
        return TransportClosed(self.close_code, self.close_reason)

    async def send_text(self, text: str) -> None:
        if self.close_code is not None:
            raise TransportClosed(self.close_code, self.close_reason)
        try:
            await run_asyncio(self._send, {"type": "websocket.send", "text": text})
        except Exception as exc:
            raise self._closed(getattr(exc, "code", None)) from None

    async def receive(self) -> str | bytes:
        """The next message. Cancel-safe: a cancelled call leaves the ASGI ``receive``
        running, and the next call returns its message."""
        if self.close_code is not None:
            raise TransportClosed(self.close_code, self.close_reason)
        if self._pending is None:
            started = asyncio.ensure_future(self._receive())
            ready = trio.Event()
            # asyncio calls this on the shared thread; setting a trio.Event there is allowed.
            started.add_done_callback(lambda _: ready.set())
            self._pending = (started, ready)
        task, done = self._pending
        await done.wait()
        self._pending = None
        if task.cancelled():
            raise self._closed(None)
        error = task.exception()
        if error is not None:
            raise self._closed(getattr(error, "code", None)) from None
        message = task.result()
        kind = message.get("type")
        if kind == "websocket.receive":
            text = message.get("text")
            if text is not None:
                return str(text)
            return bytes(message.get("bytes") or b"")
        if kind == "websocket.disconnect":
            raise self._closed(message.get("code", 1005), message.get("reason"))
        raise self._closed(CLOSE_ABNORMAL, f"unexpected ASGI message {kind!r}")

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Send ``websocket.close``; idempotent, and quiet if the peer is already gone."""
        if self.close_code is not None:
            self._drop_pending()
            return
        self.close_code, self.close_reason = code, reason
        self._drop_pending()
        message = {"type": "websocket.close", "code": code, "reason": _reason(reason)}
        try:
            await run_asyncio(self._send, message)
        except Exception:
            logger.debug("closing an ASGI WebSocket failed", exc_info=True)

    async def ping(self) -> None:
        """Check that the socket is open; the ASGI server pings the peer itself."""
        if self.close_code is not None:
            raise TransportClosed(self.close_code, self.close_reason)
        await trio.lowlevel.checkpoint()

    async def abort(self) -> None:
        """Stop using the socket without a close handshake; the endpoint then returns
        and the ASGI server drops the connection."""
        self.aborted = True
        self._closed(CLOSE_ABNORMAL, "aborted")
        self._drop_pending()
        await trio.lowlevel.checkpoint()

    def _drop_pending(self) -> None:
        if self._pending is not None:
            self._pending[0].cancel()
            self._pending = None


# -- authentication ----------------------------------------------------------------------------


def handshake_request(scope: Mapping[str, Any]) -> HttpRequest:
    """The ASGI connection ``scope`` as the gateway's ``HttpRequest`` (lower-case headers)."""
    headers: dict[str, str] = {}
    for raw_name, raw_value in scope.get("headers", ()):
        name, value = bytes(raw_name).decode("latin-1").lower(), bytes(raw_value).decode("latin-1")
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    query = bytes(scope.get("query_string", b"")).decode("latin-1")
    path = str(scope.get("path", "/"))
    return HttpRequest("GET", f"{path}?{query}" if query else path, headers)


def token_authenticator(config: Config) -> Callable[[AsgiWebSocket], str | None]:
    """An ``authenticate`` hook accepting the runtime's own tokens, as the gateway does.

    The token is taken from ``Authorization: Bearer``, a ``bearer.<token>``
    subprotocol (browsers cannot set headers) or the ``token`` query parameter,
    and verified with ``config``'s secret (``load_secret``).
    """
    secret = load_secret(config)

    def authenticate(websocket: AsgiWebSocket) -> str | None:
        scope = websocket.scope
        token = bearer_token(handshake_request(scope), list(scope.get("subprotocols", ())))
        try:
            return verify_token(token, secret)
        except AuthError as exc:
            logger.info("refused a WebSocket handshake: %s (%s)", exc, exc.reason)
            return None

    return authenticate


# -- the endpoint ------------------------------------------------------------------------------


def websocket_route(
    runtime: AsyncioRuntime, authenticate: Authenticator
) -> Callable[[AsgiWebSocket], Awaitable[None]]:
    """A Starlette ``WebSocketRoute`` endpoint serving protocol v1 for ``runtime``.

    ``authenticate(websocket)`` (sync or async) returns the user id, or ``None``
    to refuse the handshake (closed 1008 before accepting, which ASGI servers
    send as HTTP 403). Query parameters ``after_seq``, ``batch`` and
    ``session_id`` and the ``traceparent`` header mean what they mean at the
    gateway; the ``netra.v1`` subprotocol is selected when proposed. The
    runtime must be running (``lifespan=runtime.lifespan``); while it shuts
    down, handshakes are refused with 1013. With FastAPI, add it as a plain
    Starlette route, ``app.router.routes.append(WebSocketRoute(path, endpoint))``
    (FastAPI's parameter injection would take its argument for a query parameter).
    """

    async def endpoint(websocket: AsgiWebSocket) -> None:
        user = authenticate(websocket)
        user_id = await user if inspect.isawaitable(user) else user
        if not user_id:
            await websocket.close(code=CLOSE_POLICY, reason="unauthorized")
            return
        if runtime.closing:
            await websocket.close(code=CLOSE_TRY_AGAIN, reason="server shutting down")
            return
        request = handshake_request(websocket.scope)
        query = request.query
        try:
            after_seq = _int_param(query.get("after_seq"))
            batch = _int_param(query.get("batch"), "batch")
            if batch is not None and not 1 <= batch <= MAX_BATCH:
                raise ValueError(f"batch must be 1 to {MAX_BATCH}, got {batch}")
        except ValueError as exc:
            await websocket.close(code=CLOSE_POLICY, reason=_reason(str(exc)))
            return
        proposed = list(websocket.scope.get("subprotocols", ()))
        await websocket.accept(subprotocol=SUBPROTOCOL if SUBPROTOCOL in proposed else None)
        transport = AsgiTransport.from_websocket(websocket)
        try:
            await runtime.serve_connection(
                user_id,
                transport,
                traceparent=request.headers.get("traceparent"),
                after_seq=after_seq,
                session_hint=next(iter(query.get("session_id", [])), None),
                batch=batch or 1,
            )
        except RuntimeClosed:
            if not transport.closed:
                transport.close_code = CLOSE_GOING_AWAY
                await websocket.close(code=CLOSE_GOING_AWAY, reason="server shutting down")

    return endpoint
