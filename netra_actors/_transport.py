"""The transport interface connection actors speak, and its implementations.

A transport carries one client's frames: send text, receive a message, close
with a code. ``TrioWebSocketTransport`` wraps a trio-websocket connection;
``memory_transport_pair`` gives an in-memory pair for tests (no sockets,
virtual time works); another transport (an ASGI WebSocket) can carry the same
protocol by implementing these three methods.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import trio
import trio_websocket
from wsproto.events import TextMessage

from ._exceptions import TransportClosed


class Transport(Protocol):
    """One client connection, message-oriented."""

    async def send_text(self, text: str) -> None:
        """Send one text frame. Raises ``TransportClosed``.

        Cancelling a send may leave a frame half-written: after a cancelled
        send, close the transport instead of sending again.
        """

    async def receive(self) -> str | bytes:
        """The next message (text, or bytes for a binary frame). Raises ``TransportClosed``.

        Must be cancel-safe: a cancelled call loses no message (the connection cancels
        it after every quiet ``heartbeat_interval``, to ping the peer).
        """
        ...

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Close with a WebSocket close code; idempotent."""

    async def ping(self) -> None:
        """Send a transport-level ping and wait for its pong. Raises ``TransportClosed``."""

    async def abort(self) -> None:
        """Drop the connection at once, without a close handshake (the peer sees 1006).

        For a peer that stopped reading, or after a cancelled send that may have
        left a frame half-written.
        """


@runtime_checkable
class CoalescingTransport(Transport, Protocol):
    """A transport that can write several text frames at once (optional)."""

    async def send_texts(self, texts: Sequence[str]) -> None:
        """Send ``texts`` as consecutive text frames in one write. Raises ``TransportClosed``.

        Cancelling it may leave a frame half-written, as with ``send_text``.
        """


#: Close code reported for an aborted connection (no close frame was exchanged).
CLOSE_ABNORMAL = 1006


class TrioWebSocketTransport:
    """A transport over a ``trio_websocket.WebSocketConnection``.

    ``raw_stream`` is the byte stream under the WebSocket; ``abort`` closes it
    directly, since a close handshake cannot get through to a stalled peer.
    """

    def __init__(
        self,
        ws: trio_websocket.WebSocketConnection,
        raw_stream: trio.abc.AsyncResource | None = None,
    ) -> None:
        self.ws = ws
        self._raw = raw_stream

    async def send_text(self, text: str) -> None:
        await self.send_texts((text,))

    async def send_texts(self, texts: Sequence[str]) -> None:
        """The frames of ``texts`` encoded together and written with one ``send_all``.

        Uses trio-websocket's connection state (its wsproto connection and stream
        lock) as its own ``send_message`` does, taking the lock without a
        checkpoint when it is free (the write is one); falls back to one message
        at a time if those are not there.
        """
        ws = self.ws
        proto = getattr(ws, "_wsproto", None)
        lock = getattr(ws, "_stream_lock", None)
        stream = getattr(ws, "_stream", None)
        if proto is None or lock is None or stream is None:
            for text in texts:
                try:
                    await ws.send_message(text)
                except trio_websocket.ConnectionClosed as exc:
                    raise TransportClosed(exc.reason.code if exc.reason else None) from None
            return
        reason = ws.closed
        if reason is not None:
            raise TransportClosed(reason.code)
        if len(texts) == 1:
            data = proto.send(TextMessage(data=texts[0]))
        else:
            data = b"".join(proto.send(TextMessage(data=text)) for text in texts)
        try:
            lock.acquire_nowait()
        except trio.WouldBlock:
            await lock.acquire()
        try:
            await stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise TransportClosed(CLOSE_ABNORMAL) from None
        finally:
            lock.release()

    async def receive(self) -> str | bytes:
        try:
            return await self.ws.get_message()
        except trio_websocket.ConnectionClosed as exc:
            raise TransportClosed(exc.reason.code if exc.reason else None) from None

    async def close(self, code: int = 1000, reason: str = "") -> None:
        await self.ws.aclose(code, reason or None)

    async def ping(self) -> None:
        try:
            await self.ws.ping()
        except trio_websocket.ConnectionClosed as exc:
            raise TransportClosed(exc.reason.code if exc.reason else None) from None

    async def abort(self) -> None:
        if self._raw is not None:
            await trio.aclose_forcefully(self._raw)
        else:
            await trio.aclose_forcefully(self.ws._stream)


class _Pipe:
    """One direction of an in-memory transport pair."""

    def __init__(self, capacity: int) -> None:
        self.send, self.recv = trio.open_memory_channel[str | bytes](capacity)
        self.close_code: int | None = None
        self.close_reason = ""


class MemoryTransport:
    """One end of an in-memory transport pair (see ``memory_transport_pair``)."""

    def __init__(self, outgoing: _Pipe, incoming: _Pipe) -> None:
        self._out = outgoing
        self._in = incoming
        #: Whether this end answers the other end's pings (tests set it False to
        #: play a peer that went silent).
        self.answers_pings = True
        self.peer: MemoryTransport | None = None

    @property
    def close_code(self) -> int | None:
        """The close code, once either end closed."""
        return self._out.close_code if self._out.close_code is not None else self._in.close_code

    @property
    def closed(self) -> bool:
        return self.close_code is not None

    async def send_text(self, text: str) -> None:
        await self.send_message(text)

    async def send_message(self, message: str | bytes) -> None:
        """Send text or bytes (tests use bytes to send a binary frame)."""
        if self.closed:
            raise TransportClosed(self.close_code)
        try:
            await self._out.send.send(message)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise TransportClosed(self.close_code) from None

    async def receive(self) -> str | bytes:
        try:
            return await self._in.recv.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise TransportClosed(self._in.close_code, self._in.close_reason) from None

    async def close(self, code: int = 1000, reason: str = "") -> None:
        for pipe in (self._out, self._in):
            if pipe.close_code is None:
                pipe.close_code, pipe.close_reason = code, reason
        await self._out.send.aclose()
        await self._in.recv.aclose()

    async def ping(self) -> None:
        if self.closed:
            raise TransportClosed(self.close_code)
        if self.peer is not None and not self.peer.answers_pings:
            await trio.sleep_forever()
        await trio.lowlevel.checkpoint()

    async def abort(self) -> None:
        await self.close(CLOSE_ABNORMAL, "aborted")


def memory_transport_pair(capacity: int = 256) -> tuple[MemoryTransport, MemoryTransport]:
    """``(server_end, client_end)``: what one end sends, the other receives, in order.

    Closing either end ends the other's ``receive`` (after it drained what was
    already sent) with ``TransportClosed`` carrying the close code.
    """
    to_client, to_server = _Pipe(capacity), _Pipe(capacity)
    server, client = MemoryTransport(to_client, to_server), MemoryTransport(to_server, to_client)
    server.peer, client.peer = client, server
    return server, client
