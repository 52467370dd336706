"""The WebSocket server: protocol v1 at ``/ws`` on trio-websocket, over a ``Runtime``.

The handshake is authenticated before anything else: a missing, bad or
expired token is refused with HTTP 401 and no session is created. Accepted
connections are handed to the runtime, which runs their connection actors in
the user's session.
"""

from __future__ import annotations

import logging
import ssl
from urllib.parse import parse_qs, urlsplit

import orjson
import trio
import trio_websocket

from ._auth import load_secret, verify_token
from ._config import Config
from ._exceptions import AuthError, RuntimeClosed
from ._runtime import Runtime
from ._transport import TrioWebSocketTransport

logger = logging.getLogger("netra_actors.server")

WS_PATH = "/ws"


def _header(request: trio_websocket.WebSocketRequest, name: str) -> str | None:
    wanted = name.lower().encode()
    for key, value in request.headers:
        if key.lower() == wanted:
            return value.decode("latin-1")
    return None


def token_from_request(request: trio_websocket.WebSocketRequest) -> str | None:
    """The bearer token of a handshake: ``Authorization: Bearer`` header, else ``?token=``."""
    auth = _header(request, "authorization")
    if auth is not None:
        scheme, _, value = auth.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    tokens = parse_qs(urlsplit(request.path).query).get("token")
    return tokens[0] if tokens else None


async def _reject(
    request: trio_websocket.WebSocketRequest, status: int, error: str, message: str
) -> None:
    body = orjson.dumps({"error": error, "message": message})
    await request.reject(status, extra_headers=[(b"content-type", b"application/json")], body=body)


async def serve(
    runtime: Runtime,
    config: Config | None = None,
    *,
    ssl_context: ssl.SSLContext | None = None,
    task_status: trio.TaskStatus[trio_websocket.WebSocketServer] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve protocol v1 for ``runtime`` on ``config.host:config.port`` until cancelled.

    ``task_status.started`` receives the listening ``WebSocketServer`` (its
    ``port`` is the real port when ``config.port`` is 0).
    """
    config = config or runtime.config
    secret = load_secret(config)

    async def handler(request: trio_websocket.WebSocketRequest) -> None:
        path = urlsplit(request.path).path
        if path != WS_PATH:
            await _reject(request, 404, "not_found", f"no WebSocket endpoint at {path!r}")
            return
        try:
            user_id = verify_token(token_from_request(request), secret)
        except AuthError as exc:
            await _reject(request, 401, "unauthorized", str(exc))
            return
        ws = await request.accept()
        try:
            await runtime.serve_connection(
                user_id, TrioWebSocketTransport(ws), traceparent=_header(request, "traceparent")
            )
        except RuntimeClosed:
            await ws.aclose(1001, "server shutting down")

    await trio_websocket.serve_websocket(
        handler,
        config.host,
        config.port,
        ssl_context,
        max_message_size=config.max_frame_bytes,
        message_queue_size=16,
        task_status=task_status,
    )
