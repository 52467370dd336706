"""The transport interface connection actors speak, and its implementations.

A transport carries one client's frames: send text, receive a message, close
with a code. ``TrioWebSocketTransport`` wraps a trio-websocket connection;
``memory_transport_pair`` gives an in-memory pair for tests (no sockets,
virtual time works); another transport (an ASGI WebSocket) can carry the same
protocol by implementing these methods. Two capabilities are optional, found by
``isinstance`` once per connection: writing several frames at once
(``CoalescingTransport``), and telling how much of what was sent the peer has
taken (``DeliveryReportingTransport``: the heartbeat then spares a peer that is
slowly reading a backlog its pong is queued behind).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import trio
import trio_websocket
import wsproto.connection
from wsproto.connection import ConnectionState
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


@runtime_checkable
class DeliveryReportingTransport(Transport, Protocol):
    """A transport that can tell whether the peer is taking delivery of what it sent
    (optional). The heartbeat uses it: a pong queued behind a long backlog cannot
    come before the peer has read the backlog, and a peer that is reading it is there.
    """

    def delivered(self) -> int | None:
        """How much of what this end sent the peer has taken so far: a count that only
        grows (bytes its TCP acknowledged; frames read, for the memory pair), or
        ``None`` when it cannot be told now."""


#: Close code reported for an aborted connection (no close frame was exchanged).
CLOSE_ABNORMAL = 1006


if sys.platform == "linux":
    import fcntl
    import termios

    def _unacknowledged(sock: trio.socket.SocketType) -> int | None:
        """Bytes a TCP socket holds that its peer has not acknowledged yet."""
        try:
            held = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
        except (OSError, ValueError):  # closed, or not a TCP socket
            return None
        return int.from_bytes(held, sys.byteorder, signed=True)

else:  # pragma: no cover - the heartbeat then relies on pongs alone

    def _unacknowledged(sock: trio.socket.SocketType) -> int | None:
        return None


def _text_frame(text: str) -> bytes:
    """``text`` as one final, unmasked WebSocket text frame (a server's, no extension)."""
    payload = text.encode()
    size = len(payload)
    if size < 126:
        return bytes((0x81, size)) + payload
    if size < 65536:
        return b"\x81\x7e" + size.to_bytes(2, "big") + payload
    return b"\x81\x7f" + size.to_bytes(8, "big") + payload


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
        #: Bytes of our frames handed to the kernel (``send_texts``).
        self._sent = 0
        #: wsproto's connection, when our frames may be written without it (see
        #: ``send_texts``): a server end that negotiated no extension.
        self._plain: wsproto.connection.Connection | None = None
        proto = getattr(ws, "_wsproto", None)
        connection = getattr(proto, "connection", None)
        extensions = getattr(getattr(connection, "_proto", None), "extensions", None)
        server = getattr(proto, "client", True) is False
        if server and isinstance(connection, wsproto.connection.Connection) and extensions == []:
            self._plain = connection

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
        plain = self._plain
        if plain is not None and plain.state is ConnectionState.OPEN:
            # What wsproto would write (RFC 6455 5.2: a final text frame, unmasked from a
            # server, no extension), at a sixteenth of its cost per frame.
            data = _text_frame(texts[0]) if len(texts) == 1 else b"".join(map(_text_frame, texts))
        elif len(texts) == 1:
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
        self._sent += len(data)

    def delivered(self) -> int | None:
        """Bytes of our frames the peer's TCP acknowledged: those handed to the kernel
        minus those it still holds (``SIOCOUTQ``; Linux). ``None`` where the socket
        cannot be asked. Frames trio-websocket writes itself (pings, pongs, the close)
        are not counted, so the figure can only be too low, never too high."""
        sock = getattr(self._raw if self._raw is not None else self.ws._stream, "socket", None)
        held = None if sock is None else _unacknowledged(sock)
        return None if held is None else max(0, self._sent - held)

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
        #: Messages sent into the pipe, and taken out of it by the receiving end.
        self.sent = self.received = 0
        #: Set (and dropped) when ``received`` grows, if a ping waits for it.
        self.read_more: trio.Event | None = None

    def taken(self) -> None:
        self.received += 1
        if self.read_more is not None:
            self.read_more.set()
            self.read_more = None


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
        self._out.sent += 1

    async def receive(self) -> str | bytes:
        try:
            message = await self._in.recv.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise TransportClosed(self._in.close_code, self._in.close_reason) from None
        self._in.taken()
        return message

    def delivered(self) -> int:
        """Messages of this end's the other end has received so far."""
        return self._out.received

    async def close(self, code: int = 1000, reason: str = "") -> None:
        for pipe in (self._out, self._in):
            if pipe.close_code is None:
                pipe.close_code, pipe.close_reason = code, reason
            if pipe.read_more is not None:  # a ping waiting for the peer to read: closed
                pipe.read_more.set()
                pipe.read_more = None
        await self._out.send.aclose()
        await self._in.recv.aclose()

    async def ping(self) -> None:
        """Answered, as over TCP, once the other end has received everything this end
        sent before the ping (a pong cannot overtake the frames queued ahead of it);
        never if it does not answer pings."""
        if self.closed:
            raise TransportClosed(self.close_code)
        if self.peer is not None and not self.peer.answers_pings:
            await trio.sleep_forever()
        ahead = self._out.sent
        while self._out.received < ahead and not self.closed:
            if self._out.read_more is None:
                self._out.read_more = trio.Event()
            await self._out.read_more.wait()
        if self.closed:
            raise TransportClosed(self.close_code)
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
