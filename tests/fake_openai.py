"""A fake OpenAI-compatible chat-completions server on 127.0.0.1, for tests (trio + h11).

``async with open_fake_openai() as fake:`` listens on a free port and serves
``POST /v1/chat/completions`` (any path, in fact) until the block ends:

- ``fake.base_url`` is the API root (``http://127.0.0.1:PORT/v1``);
- ``fake.script(reply, ...)`` queues replies, one per request, in order; with
  the queue empty ``fake.responder(request)`` decides (when set), else the
  request gets a 501 (not retryable, so a test that sends one request too many
  fails fast and visibly);
- ``fake.requests`` records every request (``ReceivedRequest``: method, path,
  lower-cased headers, the JSON body, when it came, how its response ended).

Replies:

- ``Stream(events)``: ``200 text/event-stream``, each event sent as one SSE
  ``data:`` event (a dict as JSON, a ``str`` verbatim as the data field, a
  ``Raw`` exactly as given, a ``Pause`` waits), then ``data: [DONE]``. Framing
  is ``transfer-encoding: chunked`` (keep-alive) or ``connection: close``
  (``framing="close"``). ``done=False`` ends the body early (a truncated
  stream: the chunked body is cut off, or the close-framed one just ends).
  ``delay`` waits before every event, ``head_delay`` before the response head.
  While streaming, the server watches the socket: when the client goes away the
  writer stops and the request's ``outcome`` becomes ``"disconnected"`` (with
  ``ended_at``), so a test can assert the HTTP stream was closed at once.
- ``HttpError(status, message, retry_after=...)``: that status with an
  OpenAI-style JSON error body (keep-alive).
- ``Drop(reset=True)``: read the request, then drop the connection before
  sending any byte (an RST with ``reset``, else a plain FIN).

Builders for the chunks a real server sends: ``text``, ``reasoning``, ``role``,
``tool_fragment``, ``usage``, ``finish``, and whole turns: ``answer_stream``
and ``tool_call_stream`` (tool calls cut into fragments, interleaved by index).

Real sockets and the real clock: tests bound themselves with ``trio.fail_after``.
"""

from __future__ import annotations

import itertools
import json
import socket
import struct
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from functools import partial
from typing import Any, Literal

import attrs
import h11
import trio

MODEL = "fake-model"

# --- replies -------------------------------------------------------------------------------------


@attrs.frozen
class Pause:
    """Inside a ``Stream``'s events: wait this many seconds before the next event."""

    seconds: float


@attrs.frozen
class Raw:
    """Inside a ``Stream``'s events: bytes of the SSE body sent exactly as given."""

    text: str


SseEvent = dict[str, Any] | str | Raw | Pause


def _events(events: Iterable[SseEvent]) -> tuple[SseEvent, ...]:
    return tuple(events)


@attrs.frozen
class Stream:
    """A ``200 text/event-stream`` reply (see the module docstring)."""

    events: tuple[SseEvent, ...] = attrs.field(converter=_events)
    delay: float = 0.0
    head_delay: float = 0.0
    done: bool = True
    framing: Literal["chunked", "close"] = "chunked"


@attrs.frozen
class HttpError:
    """An HTTP error status with an OpenAI-style JSON error body."""

    status: int
    message: str = "fake error"
    retry_after: str | None = None
    body: bytes | None = None


@attrs.frozen
class Drop:
    """Read the request, then drop the connection without a byte (RST when ``reset``)."""

    reset: bool = True


Reply = Stream | HttpError | Drop


# --- chunk builders --------------------------------------------------------------------------


def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
    """A ``chat.completion.chunk`` with one choice carrying ``delta``."""
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": MODEL,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
    }


def role() -> dict[str, Any]:
    """The first chunk real servers send: the role, empty content."""
    return chunk({"role": "assistant", "content": ""})


def text(token: str) -> dict[str, Any]:
    """An answer token."""
    return chunk({"content": token})


def reasoning(token: str, key: str = "reasoning_content") -> dict[str, Any]:
    """A reasoning token (``reasoning_content`` as vLLM/DeepSeek, or ``reasoning``)."""
    return chunk({key: token})


def tool_fragment(
    index: int,
    *,
    call_id: str | None = None,
    name: str | None = None,
    arguments: str | None = None,
) -> dict[str, Any]:
    """One streamed tool-call fragment (only the pieces given are present)."""
    fragment: dict[str, Any] = {"index": index}
    if call_id is not None:
        fragment["id"] = call_id
        fragment["type"] = "function"
    function: dict[str, str] = {}
    if name is not None:
        function["name"] = name
    if arguments is not None:
        function["arguments"] = arguments
    if function:
        fragment["function"] = function
    return chunk({"tool_calls": [fragment]})


def finish(reason: str = "stop") -> dict[str, Any]:
    """The chunk with the finish reason and an empty delta."""
    return chunk({}, finish_reason=reason)


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    """The final usage chunk (``stream_options.include_usage``): no choices."""
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": MODEL,
        "choices": [],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


def split(value: str, pieces: int) -> list[str]:
    """``value`` cut into ``pieces`` consecutive non-empty parts (fewer if it is short)."""
    pieces = max(1, min(pieces, len(value)))
    size, extra = divmod(len(value), pieces)
    parts, start = [], 0
    for i in range(pieces):
        end = start + size + (1 if i < extra else 0)
        parts.append(value[start:end])
        start = end
    return parts


def answer_stream(
    *tokens: str,
    thinking: Sequence[str] = (),
    tokens_used: tuple[int, int] | None = (10, 5),
    **options: Any,
) -> Stream:
    """A turn that answers with ``tokens`` (after ``thinking`` reasoning tokens), then usage."""
    events: list[SseEvent] = [role()]
    events += [reasoning(t) for t in thinking]
    events += [text(t) for t in tokens]
    events.append(finish("stop"))
    if tokens_used is not None:
        events.append(usage(*tokens_used))
    return Stream(events, **options)


def tool_call_events(
    calls: Sequence[tuple[str, str, str]], pieces: int = 3
) -> list[dict[str, Any]]:
    """Fragments of ``calls`` (``(call_id, name, arguments JSON text)``), interleaved by index.

    Each call's first fragment has its id and name (no arguments), then its
    arguments come in ``pieces`` parts; the calls' fragments alternate.
    """
    per_call: list[list[dict[str, Any]]] = []
    for index, (call_id, name, arguments) in enumerate(calls):
        fragments = [tool_fragment(index, call_id=call_id, name=name, arguments="")]
        fragments += [tool_fragment(index, arguments=part) for part in split(arguments, pieces)]
        per_call.append(fragments)
    out: list[dict[str, Any]] = []
    for group in itertools.zip_longest(*per_call):
        out += [f for f in group if f is not None]
    return out


def tool_call_stream(
    *calls: tuple[str, str, str],
    thinking: Sequence[str] = (),
    pieces: int = 3,
    tokens_used: tuple[int, int] | None = (10, 5),
    **options: Any,
) -> Stream:
    """A turn that asks for ``calls`` (``(call_id, name, arguments JSON text)``), streamed."""
    events: list[SseEvent] = [role()]
    events += [reasoning(t) for t in thinking]
    events += tool_call_events(calls, pieces)
    events.append(finish("tool_calls"))
    if tokens_used is not None:
        events.append(usage(*tokens_used))
    return Stream(events, **options)


# --- the server ------------------------------------------------------------------------------


Outcome = Literal["complete", "error_status", "truncated", "dropped", "disconnected", "aborted"]


@attrs.define(eq=False)
class ReceivedRequest:
    """One request the fake received, and how its response ended.

    ``outcome`` (set once, with ``ended_at``, and ``ended`` set): ``complete`` (the
    whole reply was sent), ``error_status`` (an ``HttpError`` was sent),
    ``truncated`` (a ``Stream`` with ``done=False`` was cut off as scripted),
    ``dropped`` (a ``Drop``), ``disconnected`` (the client closed the connection
    while the reply was being sent), ``aborted`` (the fake itself was shut down).
    """

    index: int
    method: str
    target: str
    headers: dict[str, str]
    raw_body: bytes
    received_at: float
    outcome: Outcome | None = None
    ended_at: float | None = None
    ended: trio.Event = attrs.field(factory=trio.Event, repr=False)

    @property
    def body(self) -> Any:
        """The request body as JSON (``None`` when it is not JSON)."""
        try:
            return json.loads(self.raw_body)
        except ValueError:
            return None

    @property
    def messages(self) -> list[dict[str, Any]]:
        return list(self.body["messages"])

    @property
    def authorization(self) -> str | None:
        return self.headers.get("authorization")

    def end(self, outcome: Outcome) -> None:
        if self.outcome is None:
            self.outcome = outcome
            self.ended_at = trio.current_time()
            self.ended.set()


class FakeOpenAI:
    """The fake server's state; made by ``open_fake_openai``."""

    def __init__(self, responder: Callable[[ReceivedRequest], Reply] | None = None) -> None:
        self.port = 0
        self.requests: list[ReceivedRequest] = []
        self.responder = responder
        self.connections = 0
        self._queue: deque[Reply] = deque()
        self._changed = trio.Event()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def script(self, *replies: Reply) -> None:
        """Queue replies for the next requests, in order."""
        self._queue.extend(replies)

    @property
    def pending(self) -> int:
        """Scripted replies not used yet."""
        return len(self._queue)

    @property
    def disconnects(self) -> list[ReceivedRequest]:
        """Requests whose client went away while their stream was being sent."""
        return [r for r in self.requests if r.outcome == "disconnected"]

    async def wait_for_requests(self, count: int) -> list[ReceivedRequest]:
        """Wait until ``count`` requests have arrived (bound it with ``trio.fail_after``)."""
        while len(self.requests) < count:
            await self._changed.wait()
        return self.requests

    def _next_reply(self, request: ReceivedRequest) -> Reply:
        if self._queue:
            return self._queue.popleft()
        if self.responder is not None:
            return self.responder(request)
        return HttpError(501, "fake: no scripted reply left for this request")

    # -- connections --------------------------------------------------------------------------

    async def handle(self, stream: trio.SocketStream) -> None:
        """Serve one connection: requests one after another while it is kept alive."""
        self.connections += 1
        conn = h11.Connection(h11.SERVER)
        try:
            async with stream:
                while True:
                    request = await self._read_request(conn, stream)
                    if request is None:
                        return
                    reply = self._next_reply(request)
                    try:
                        keep_alive = await self._respond(conn, stream, request, reply)
                    finally:
                        request.end("aborted")
                    if not keep_alive or conn.our_state is not h11.DONE:
                        return
                    if conn.their_state is not h11.DONE:
                        return
                    conn.start_next_cycle()
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
            return

    async def _read_request(
        self, conn: h11.Connection, stream: trio.SocketStream
    ) -> ReceivedRequest | None:
        head: h11.Request | None = None
        body = bytearray()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(bytes(await stream.receive_some()))
            elif isinstance(event, h11.Request):
                head = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                break
            elif isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                return None
        assert head is not None
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in head.headers}
        request = ReceivedRequest(
            index=len(self.requests),
            method=head.method.decode(),
            target=head.target.decode(),
            headers=headers,
            raw_body=bytes(body),
            received_at=trio.current_time(),
        )
        self.requests.append(request)
        self._changed.set()
        self._changed = trio.Event()
        return request

    async def _respond(
        self,
        conn: h11.Connection,
        stream: trio.SocketStream,
        request: ReceivedRequest,
        reply: Reply,
    ) -> bool:
        """Send ``reply``; whether the connection may serve another request."""
        if isinstance(reply, HttpError):
            body = reply.body
            if body is None:
                error = {"message": reply.message, "type": "fake_error", "code": reply.status}
                body = json.dumps({"error": error}).encode()
            headers = [("content-type", "application/json"), ("content-length", str(len(body)))]
            if reply.retry_after is not None:
                headers.append(("retry-after", reply.retry_after))
            await stream.send_all(
                conn.send(h11.Response(status_code=reply.status, headers=headers))
            )
            await stream.send_all(conn.send(h11.Data(data=body)))
            await stream.send_all(conn.send(h11.EndOfMessage()))
            request.end("error_status")
            return True
        if isinstance(reply, Drop):
            if reply.reset:
                # SO_LINGER with a zero timeout: close() sends an RST instead of a FIN.
                stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            await stream.aclose()
            request.end("dropped")
            return False
        return await self._stream(conn, stream, request, reply)

    async def _stream(
        self,
        conn: h11.Connection,
        stream: trio.SocketStream,
        request: ReceivedRequest,
        reply: Stream,
    ) -> bool:
        """Send an SSE reply while watching for the client to go away."""
        async with trio.open_nursery() as nursery:

            async def watch() -> None:
                # The client sends nothing while it reads a response: EOF (or a reset)
                # means it closed the connection. Anything else is kept for h11.
                try:
                    while data := await stream.receive_some():
                        conn.receive_data(bytes(data))
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
                request.end("disconnected")
                nursery.cancel_scope.cancel()

            nursery.start_soon(watch)
            try:
                await self._write_stream(conn, stream, request, reply)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                request.end("disconnected")
            nursery.cancel_scope.cancel()
        return request.outcome == "complete" and reply.framing == "chunked"

    async def _write_stream(
        self,
        conn: h11.Connection,
        stream: trio.SocketStream,
        request: ReceivedRequest,
        reply: Stream,
    ) -> None:
        await trio.sleep(reply.head_delay)
        headers = [("content-type", "text/event-stream"), ("cache-control", "no-cache")]
        chunked = reply.framing == "chunked"
        if chunked:
            await stream.send_all(conn.send(h11.Response(status_code=200, headers=headers)))
        else:
            head = "HTTP/1.1 200 OK\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers)
            await stream.send_all((head + "connection: close\r\n\r\n").encode())

        async def send(data: bytes) -> None:
            await stream.send_all(conn.send(h11.Data(data=data)) if chunked else data)

        for event in _with_done(reply.events, reply.done):
            if isinstance(event, Pause):
                await trio.sleep(event.seconds)
                continue
            await trio.sleep(reply.delay)
            await send(_encode(event))
        if not reply.done:
            request.end("truncated")
            return
        if chunked:
            await stream.send_all(conn.send(h11.EndOfMessage()))
        request.end("complete")


def _with_done(events: Iterable[SseEvent], done: bool) -> Iterable[SseEvent]:
    yield from events
    if done:
        yield Raw("data: [DONE]\n\n")


def _encode(event: SseEvent) -> bytes:
    if isinstance(event, Raw):
        return event.text.encode()
    if isinstance(event, str):
        return f"data: {event}\n\n".encode()
    assert isinstance(event, dict)
    return f"data: {json.dumps(event)}\n\n".encode()


@asynccontextmanager
async def open_fake_openai(
    *replies: Reply, responder: Callable[[ReceivedRequest], Reply] | None = None
) -> AsyncIterator[FakeOpenAI]:
    """Serve a ``FakeOpenAI`` on 127.0.0.1 (free port) for the duration of the block."""
    fake = FakeOpenAI(responder)
    fake.script(*replies)
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, fake.handle, 0, host="127.0.0.1"))
        fake.port = listeners[0].socket.getsockname()[1]
        yield fake
        nursery.cancel_scope.cancel()


def unused_port() -> int:
    """A 127.0.0.1 port nothing listens on (connections to it are refused)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port
