"""A small trio client for protocol v1 that survives dropped connections.

::

    async with netra_actors.client.connect("ws://127.0.0.1:8765/ws", token) as client:
        run = await client.run("what is 2+3*4?")      # every event of that run, in order
        async for frame in client.frames():            # or: everything, as it arrives
            ...

The client authenticates with a bearer token, keeps one connection open, and
when it drops (network, server restart, close 4008 for a lagging reader, 1001
on shutdown) reconnects with ``after_seq`` = the last ``seq`` it received, so
the stream resumes exactly where it stopped. It de-duplicates events by
``seq``, so its consumers see every event of the session once, in order.
A ``resume_gap`` (the server could not serve the resume exactly) is passed on
as a frame, never hidden.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import ssl
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing, asynccontextmanager
from typing import Any
from urllib.parse import urlencode, urlsplit

import trio
import trio_websocket
from wsproto.utilities import LocalProtocolError

from ._exceptions import AuthError, NetraError, TransportClosed
from ._messages import TERMINAL_EVENTS
from ._protocol import SUBPROTOCOL

Frame = dict[str, Any]

#: Handshake statuses that no retry will fix.
_PERMANENT = {400, 401, 403, 404}
#: Close codes after which the client does not reconnect (it closed, or was told to stop).
_FINAL_CLOSE = {1000}


class ConnectionLost(NetraError):
    """The frame could not be sent: the connection is down (and may be coming back)."""


class ClientClosed(NetraError):
    """The client was closed, or gave up reconnecting."""


class NetraClient:
    """One user's resilient connection. Create with ``connect``.

    ``frames()`` yields every frame received, once: ``session_ready`` of every
    (re)connection, replies, ``resume_gap``, and events de-duplicated by
    ``seq``. It can be iterated by one task at a time.
    """

    def __init__(
        self,
        url: str,
        token: str,
        *,
        ssl_context: ssl.SSLContext | None = None,
        after_seq: int | None = None,
        session_id: str | None = None,
        reconnect: bool = True,
        max_backoff: float = 5.0,
        give_up_after: float = 60.0,
        connect_timeout: float = 10.0,
        batch: int = 1,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("ws", "wss") or parts.hostname is None:
            raise ValueError(f"not a ws:// or wss:// URL: {url!r}")
        self.url = url
        self._parts = parts
        self._token = token
        self._ssl = ssl_context
        self.reconnect = reconnect
        self.max_backoff = max_backoff
        self.give_up_after = give_up_after
        self.connect_timeout = connect_timeout
        #: Most events per frame the server may send (multi-event frames, unwrapped
        #: here: ``frames()`` always yields single events).
        self.batch = batch
        #: The newest ``seq`` received (``None`` before any event).
        self.last_seq: int | None = after_seq
        #: The id of the event stream this client follows.
        self.session_id: str | None = session_id
        self.user_id: str | None = None
        self.connections = 0
        self._ws: trio_websocket.WebSocketConnection | None = None
        self._connected = trio.Event()
        self._settled = trio.Event()  # first connection made, or given up
        self._closed = False
        self._error: BaseException | None = None
        self._frames_send, self._frames_recv = trio.open_memory_channel[Frame](1_000_000)
        self._ids = itertools.count(1)

    # -- connection management ---------------------------------------------------------------

    def _resource(self) -> str:
        query = dict(p.split("=", 1) for p in self._parts.query.split("&") if "=" in p)
        if self.batch > 1:
            query["batch"] = str(self.batch)
        if self.last_seq is not None:
            query["after_seq"] = str(self.last_seq)
            if self.session_id is not None:
                query["session_id"] = self.session_id
        path = self._parts.path or "/"
        return path + (f"?{urlencode(query)}" if query else "")

    async def _open(self, nursery: trio.Nursery) -> tuple[trio.abc.Stream, Any]:
        host, port = self._parts.hostname, self._parts.port
        assert host is not None
        stream: trio.abc.Stream
        if self._parts.scheme == "wss":
            stream = await trio.open_ssl_over_tcp_stream(
                host, port or 443, ssl_context=self._ssl or ssl.create_default_context()
            )
        else:
            stream = await trio.open_tcp_stream(host, port or 80)
        try:
            ws = await trio_websocket.wrap_client_stream(
                nursery,
                stream,
                self._parts.netloc,
                self._resource(),
                subprotocols=[SUBPROTOCOL],
                extra_headers=[(b"authorization", f"Bearer {self._token}".encode())],
            )
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
        return stream, ws

    async def _serve_one(self) -> int | None:
        """One connection, from handshake to close; its close code (``None``: never opened)."""
        try:
            return await self._serve_one_inner()
        except BaseExceptionGroup as group:
            # trio-websocket raises handshake failures from its reader task, so they
            # arrive grouped (sometimes nested); callers handle the single error inside.
            leaves = _leaves(group)
            if len(leaves) == 1:
                raise leaves[0] from None
            raise

    async def _serve_one_inner(self) -> int | None:
        code: int | None = None
        async with trio.open_nursery() as nursery:
            with trio.fail_after(self.connect_timeout):
                stream, ws = await self._open(nursery)
            self.connections += 1
            self._ws = ws
            self._connected.set()
            self._settled.set()
            try:
                while True:
                    message = await ws.get_message()
                    if isinstance(message, str):
                        self._receive(json.loads(message))
            except trio_websocket.ConnectionClosed as exc:
                code = exc.reason.code if exc.reason else None
            finally:
                self._ws = None
                self._connected = trio.Event()
                await trio.aclose_forcefully(stream)
                nursery.cancel_scope.cancel()
        return code

    def _receive(self, frame: Frame) -> None:
        if frame.get("type") == "events" and isinstance(frame.get("events"), list):
            for event in frame["events"]:
                self._receive(event)
            return
        seq = frame.get("seq")
        if frame.get("type") == "session_ready":
            if frame.get("session_id") != self.session_id:
                # Another stream (the session was torn down, or the server lost it):
                # its seq starts over, so de-duplication starts over too.
                self.session_id = frame.get("session_id")
                self.last_seq = None
            self.user_id = frame.get("user_id")
        elif isinstance(seq, int):
            if self.last_seq is not None and seq <= self.last_seq:
                return  # already delivered (a resume overlaps what was sent before)
            self.last_seq = seq
        self._frames_send.send_nowait(frame)

    async def _maintain(self) -> None:
        """Keep a connection open until ``aclose``; reconnect with backoff, resume by seq."""
        backoff = 0.05
        down_since: float | None = None
        try:
            while not self._closed:
                try:
                    code = await self._serve_one()
                    down_since = None
                    backoff = 0.05
                    if self._closed:
                        return
                    if code in _FINAL_CLOSE or not self.reconnect:
                        raise ClientClosed(f"connection closed (code {code})")
                except trio_websocket.ConnectionRejected as exc:
                    if exc.status_code in _PERMANENT:
                        body = (exc.body or b"").decode(errors="replace")
                        if exc.status_code == 401:
                            raise AuthError(
                                "invalid", f"server refused the token: {body}"
                            ) from None
                        raise ClientClosed(f"server refused: {exc.status_code} {body}") from None
                except LocalProtocolError:
                    # trio-websocket answers a ping that arrives while the connection is
                    # closing, which wsproto refuses (trio-websocket issue #184): the
                    # connection is over either way.
                    if self._closed:
                        return
                    if not self.reconnect:
                        raise
                except (
                    OSError,
                    trio.TooSlowError,
                    trio.BrokenResourceError,
                    trio_websocket.HandshakeError,
                ):
                    if not self.reconnect:
                        raise
                now = trio.current_time()
                down_since = down_since if down_since is not None else now
                if now - down_since > self.give_up_after:
                    raise ClientClosed(f"could not reconnect for {self.give_up_after} s")
                await trio.sleep(backoff)
                backoff = min(backoff * 2, self.max_backoff)
        except BaseException as exc:
            if not self._closed and not isinstance(exc, trio.Cancelled):
                self._error = exc
            raise
        finally:
            self._settled.set()
            self._frames_send.close()

    # -- sending -----------------------------------------------------------------------------

    async def send(self, frame: Frame, *, wait: float = 10.0) -> None:
        """Send one frame, waiting up to ``wait`` seconds for a connection.

        Raises:
            ConnectionLost: no connection came up in time, or it dropped during
                the send (the frame may or may not have arrived).
        """
        with trio.move_on_after(wait):
            await self._connected.wait()
        ws = self._ws
        if ws is None:
            raise ConnectionLost("not connected")
        try:
            await ws.send_message(json.dumps(frame))
        except trio_websocket.ConnectionClosed:
            raise ConnectionLost("the connection dropped while sending") from None

    async def send_message(
        self,
        text: str,
        *,
        thread_id: str | None = None,
        client_msg_id: str | None = None,
        policy: str | None = None,
    ) -> str:
        """Send a ``user_message``; returns its ``client_msg_id`` (generated if not given)."""
        client_msg_id = client_msg_id or f"m{next(self._ids)}"
        frame: Frame = {"type": "user_message", "text": text, "client_msg_id": client_msg_id}
        if thread_id is not None:
            frame["thread_id"] = thread_id
        if policy is not None:
            frame["policy"] = policy
        await self.send(frame)
        return client_msg_id

    async def cancel(self, run_id: str) -> None:
        """Ask the server to cancel a run (its events say how it ended)."""
        await self.send({"type": "cancel", "run_id": run_id})

    async def resume(self, after_seq: int) -> None:
        """Ask the server to resend everything after ``after_seq``.

        Events this client already delivered are dropped as duplicates, so this
        only fills gaps; ``frames()`` still yields each event once.
        """
        await self.send({"type": "resume", "after_seq": after_seq, "session_id": self.session_id})

    # -- receiving ---------------------------------------------------------------------------

    async def frames(self) -> AsyncGenerator[Frame, None]:
        """Every frame, once, in order; ends when the client closes.

        Raises:
            AuthError: the server refused the token.
            ClientClosed: the client gave up reconnecting, or was refused.
        """
        async for frame in self._frames_recv:
            yield frame
        if self._error is not None:
            raise self._error

    async def run(
        self, text: str, *, thread_id: str | None = None, policy: str | None = None
    ) -> list[Frame]:
        """Send a message and return its run's events, up to and including the terminal one.

        Frames of other runs received meanwhile are consumed (use ``frames()``
        directly to watch several runs).

        Raises:
            RuntimeError: the server refused the message (its ``error`` frame).
        """
        client_msg_id = await self.send_message(text, thread_id=thread_id, policy=policy)
        run_id: str | None = None
        early: list[Frame] = []
        events: list[Frame] = []
        async with aclosing(self.frames()) as frames:
            async for frame in frames:
                kind = frame.get("type")
                if run_id is None:
                    if kind == "run_accepted" and frame.get("client_msg_id") == client_msg_id:
                        run_id = frame["run_id"]
                        events = [f for f in early if f.get("run_id") == run_id]
                        if events and events[-1]["type"] in TERMINAL_EVENTS:
                            return events
                    elif kind == "error" and frame.get("client_msg_id") == client_msg_id:
                        raise RuntimeError(f"message refused: {frame['code']}: {frame['message']}")
                    elif "seq" in frame:
                        early.append(frame)
                    continue
                if frame.get("run_id") == run_id:
                    events.append(frame)
                    if kind in TERMINAL_EVENTS:
                        return events
        raise ClientClosed("the client closed before the run ended")

    # -- closing -----------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Close the connection (1000) and stop reconnecting."""
        self._closed = True
        ws = self._ws
        if ws is not None:
            # The connection task may close the stream meanwhile.
            with (
                trio.move_on_after(2),
                contextlib.suppress(trio.ClosedResourceError, trio.BrokenResourceError),
            ):
                await ws.aclose()


@asynccontextmanager
async def connect(url: str, token: str, **options: Any) -> AsyncIterator[NetraClient]:
    """Open a ``NetraClient`` (see its options); waits for the first connection.

    Raises:
        AuthError: the server refused the token.
        ClientClosed: the server refused the connection for another reason, or
            the client gave up reconnecting while in use.
        TransportClosed: no connection could be made within ``connect_timeout``.
    """
    client = NetraClient(url, token, **options)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client._maintain)
            with trio.move_on_after(client.connect_timeout) as timer:
                await client._settled.wait()
            if client._error is not None:
                await trio.sleep_forever()  # _maintain's error is about to end the nursery
            if timer.cancelled_caught:
                raise TransportClosed(
                    None, f"could not connect to {url} in {client.connect_timeout} s"
                )
            try:
                yield client
            finally:
                await client.aclose()
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # One error that matters (the caller's, or the client's): raise it bare.
        leaves = _leaves(group)
        if len(leaves) == 1:
            raise leaves[0] from None
        raise


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    """The non-cancellation exceptions inside a (possibly nested) group."""
    found: list[BaseException] = []
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            found.extend(_leaves(exc))
        elif not isinstance(exc, trio.Cancelled):
            found.append(exc)
    return found
