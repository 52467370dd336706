"""Protocol fuzzing through the gateway: ``Gateway.handle`` over in-memory byte streams.

Hypothesis drives the whole network path -- the HTTP request head (h11), the WebSocket
handshake and framing (trio-websocket over wsproto), then the connection actor -- with
client frames that are valid, near-valid or garbage (the probes and the docs-based oracle
of test_limits_and_fuzz), WebSocket frames that bend or break RFC 6455, and request heads
that are well-formed, mutated or random bytes. No sockets: every connection is a
``trio.testing.memory_stream_pair`` whose server end is served by ``gateway.handle``,
under virtual time (``MockClock(autojump_threshold=0)``).

Checked in every example: ``Gateway.handle`` never raises and nothing logs a server
fault (an ERROR record from ``netra_actors``); each frame gets the answer
docs/protocol.md allows (a typed, schema-valid error echoing a string client_msg_id, the
reply of a valid frame, close 1009 over ``max_frame_bytes``, error ``rate_limited`` then
close 4029 over the rate, or -- for frames that break RFC 6455 -- the connection failed);
the server releases every connection it ends; other streams are untouched (bob's runs,
concurrent with alice's fuzzed frames, and alice's other tab get lawful, complete streams:
``check_lifecycle``); afterwards ``/healthz`` answers 200 and a new connection runs to
completion.

The fuzzing peer (``RawClient``) writes raw bytes -- its own request head and masked
frames -- and reads the server with wsproto's frame parser; the well-behaved peers (bob,
alice's watching tab, the final check) are trio-websocket clients.

Bugs the fuzzers found are kept at the end of the file as regression examples.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import itertools
import json
import logging
import re
import string
import struct
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from functools import partial
from typing import Any
from urllib.parse import urlencode, urlsplit

import attrs
import hypothesis
import pytest
import trio
import trio.testing
import trio_websocket
from conftest import TEST_SECRET
from hypothesis import given
from hypothesis import strategies as st
from strategies import Frame, MemoryClient, is_event
from test_limits_and_fuzz import (
    FUZZ_LIMIT,
    VALID_FIELDS,
    Probe,
    huge_frames,
    merged_events,
    near_valid_probes,
    probe_for_text,
    probes,
)
from wsclient import validate_server_frame
from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Ping, Pong, TextMessage

from netra_actors import Config, Gateway, Runtime, TransportClosed, issue_token
from netra_actors._gateway import WEB_FILES
from netra_actors._protocol import ERROR_CODES
from netra_actors.testing import TERMINAL_EVENTS, check_lifecycle

#: Virtual seconds; an example needs a few minutes at most (queued "sleep 8" runs).
BOUND = 3600
SECRET = TEST_SECRET.encode()
#: Another HS256 key (32+ bytes, or PyJWT warns): tokens signed with it are forged.
OTHER_SECRET = b"not-the-server-secret-0123456789abcdef"
HOST = "127.0.0.1:8765"
ALLOWED_ORIGIN = "https://good.example"
CALC = "what is 2+3*4?"
BASE_CONFIG: dict[str, Any] = {
    "store": "memory",
    # The harness reads "nothing more is coming" from quiescence (wait_all_tasks_blocked).
    "write_linger": 0.0,
    "secret": TEST_SECRET,
    "shutdown_grace": 2.0,
    "max_frame_bytes": FUZZ_LIMIT,
    "allowed_origins": (ALLOWED_ORIGIN,),
}

# --- WebSocket framing (RFC 6455), client side ---------------------------------------------

CONT, TEXT, BINARY, CLOSE, PING, PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
MASK = b"\x37\xfa\x21\x3d"
KEY = base64.b64encode(b"netra-fuzz-key16").decode()
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def _masked(payload: bytes) -> bytes:
    n = len(payload)
    key = (MASK * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")).to_bytes(n, "big")


def ws_frame(
    opcode: int,
    payload: bytes = b"",
    *,
    fin: bool = True,
    rsv: int = 0,
    masked: bool = True,
    length_bytes: int | None = None,
) -> bytes:
    """One client frame. ``length_bytes`` 2 or 8 forces a length form longer than needed."""
    n = len(payload)
    first = (0x80 if fin else 0) | (rsv << 4) | opcode
    mask_bit = 0x80 if masked else 0
    if length_bytes is None:
        length_bytes = 0 if n < 126 else 2 if n < 1 << 16 else 8
    if length_bytes == 0:
        head = bytes([first, mask_bit | n])
    elif length_bytes == 2:
        head = bytes([first, mask_bit | 126]) + struct.pack("!H", n)
    else:
        head = bytes([first, mask_bit | 127]) + struct.pack("!Q", n)
    return head + MASK + _masked(payload) if masked else head + payload


def close_payload(code: int, reason: bytes = b"") -> bytes:
    return struct.pack("!H", code) + reason


def handshake_head(target: str, *extra: str, host: str = HOST) -> bytes:
    """A valid WebSocket upgrade request for ``target``, plus the header lines ``extra``."""
    lines = [
        f"GET {target} HTTP/1.1",
        f"Host: {host}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {KEY}",
        "Sec-WebSocket-Version: 13",
        *extra,
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def accept_token(key: str) -> str:
    return base64.b64encode(hashlib.sha1(key.encode() + WS_GUID).digest()).decode()


def parse_response_head(head: bytes) -> tuple[int, dict[str, str]]:
    lines = head.split(b"\r\n")
    version, status, *_ = lines[0].split(b" ", 2)
    assert version == b"HTTP/1.1", lines[0]
    assert status.isdigit(), lines[0]
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        assert colon, f"malformed response header line {line!r}"
        headers[name.decode("ascii").strip().lower()] = value.strip().decode("latin-1")
    return int(status), headers


#: Server frames already checked against docs/schemas (the same events reach several
#: connections, and again on every resume).
_checked: set[str] = set()


def schema_check(frame: Frame, text: str) -> None:
    """``frame`` (received as ``text``) is valid against docs/schemas/server_frame.json."""
    if text not in _checked:
        validate_server_frame(frame)
        _checked.add(text)


def pieces(data: bytes, cuts: Sequence[int]) -> list[bytes]:
    """``data`` cut at the offsets ``cuts`` (empty pieces dropped)."""
    bounds = [0, *sorted(c for c in cuts if 0 < c < len(data)), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds) if b > a] or [data]


# --- the peers -----------------------------------------------------------------------------


class RawClient:
    """The fuzzing peer: writes raw bytes; reads the HTTP answer, then the server's frames.

    Every text frame the server sends is decoded, checked against docs/schemas and kept in
    ``frames``; ``pongs`` holds the payloads of WebSocket pongs; ``close_code`` is the code
    of the server's close frame. ``ended`` is set when the server has closed the stream.
    """

    def __init__(self, stream: trio.abc.HalfCloseableStream, key: str | None = KEY) -> None:
        self.stream = stream
        self.key = key
        self.status: int | None = None
        self.headers: dict[str, str] = {}
        self.body = b""
        self.frames: list[Frame] = []
        self.pongs: list[bytes] = []
        self.close_code: int | None = None
        self.sent_close = False
        self.answered = trio.Event()
        self.ended = trio.Event()
        self._ws: Connection | None = None
        self._parts: list[str] = []
        self._lock = trio.Lock()
        self._arrived = trio.Event()

    # -- reading --------------------------------------------------------------------------

    async def _receive(self) -> bytes:
        try:
            return bytes(await self.stream.receive_some())
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return b""

    async def read_forever(self) -> None:
        buffer = b""
        try:
            while b"\r\n\r\n" not in buffer:
                data = await self._receive()
                if not data:
                    assert not buffer, f"the server sent a truncated answer: {buffer!r}"
                    return  # closed without an answer
                buffer += data
            head, _, rest = buffer.partition(b"\r\n\r\n")
            self.status, self.headers = parse_response_head(head)
            if self.status != 101:
                while data := await self._receive():
                    rest += data
                assert len(rest) == int(self.headers["content-length"]), (self.headers, rest)
                self.body = rest
                return
            if self.key is not None:  # None: the head may have been mutated
                assert self.headers["sec-websocket-accept"] == accept_token(self.key)
            self._ws = Connection(ConnectionType.CLIENT, trailing_data=rest)
            self.answered.set()
            await self._read_frames(self._ws)
        finally:
            self.answered.set()
            self.ended.set()
            self._wake()

    async def _read_frames(self, ws: Connection) -> None:
        while True:
            for event in ws.events():
                await self._on(ws, event)
            data = await self._receive()
            if not data:
                return
            assert ws.state is not ConnectionState.CLOSED, f"data after the close: {data!r}"
            ws.receive_data(data)

    async def _on(self, ws: Connection, event: object) -> None:
        if isinstance(event, TextMessage):
            self._parts.append(event.data)
            if event.message_finished:
                text = "".join(self._parts)
                self._parts = []
                frame = json.loads(text)
                assert isinstance(frame, dict), frame
                schema_check(frame, text)
                self.frames.append(frame)
        elif isinstance(event, BytesMessage):
            raise AssertionError(f"the server sent a binary frame: {event.data!r}")
        elif isinstance(event, Ping):
            await self.send_raw(ws.send(event.response()))
        elif isinstance(event, Pong):
            self.pongs.append(bytes(event.payload))
        elif isinstance(event, CloseConnection):
            # wsproto reports a frame it cannot parse as a close while still OPEN.
            assert ws.state is not ConnectionState.OPEN, f"malformed server frame: {event}"
            self.close_code = event.code
            if ws.state is ConnectionState.REMOTE_CLOSING and not self.sent_close:
                await self.send_raw(ws.send(event.response()))
        self._wake()

    def _wake(self) -> None:
        self._arrived.set()
        self._arrived = trio.Event()

    async def wait_for(self, predicate: Callable[[Frame], bool]) -> Frame:
        """The first frame that matches, waiting for it if needed."""
        index = 0
        while True:
            for frame in self.frames[index:]:
                if predicate(frame):
                    return frame
            index = len(self.frames)
            assert not self.ended.is_set(), f"ended ({self.close_code}) before the frame came"
            await self._arrived.wait()

    @property
    def events(self) -> list[Frame]:
        return [f for f in self.frames if is_event(f)]

    @property
    def session_ready(self) -> Frame:
        assert self.frames, "no frame yet"
        assert self.frames[0]["type"] == "session_ready", self.frames[0]
        return self.frames[0]

    # -- writing --------------------------------------------------------------------------

    async def send_raw(self, data: bytes) -> None:
        """Write ``data`` as it is (a peer that has gone away is not an error here)."""
        async with self._lock:
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await self.stream.send_all(data)

    async def send_eof(self) -> None:
        async with self._lock:
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await self.stream.send_eof()

    async def close(self) -> None:
        """Close the WebSocket (1000) if it is open, wait for the server to end the stream."""
        if self.status == 101 and not self.ended.is_set() and not self.sent_close:
            self.sent_close = True
            await self.send_raw(ws_frame(CLOSE, close_payload(1000)))
        await self.ended.wait()
        await self.stream.aclose()


class _WsTransport:
    """MemoryClient's transport interface over a trio-websocket client connection."""

    def __init__(self, ws: trio_websocket.WebSocketConnection) -> None:
        self.ws = ws

    async def receive(self) -> str | bytes:
        try:
            return await self.ws.get_message()
        except trio_websocket.ConnectionClosed as exc:
            raise TransportClosed(exc.reason.code if exc.reason else None) from None

    async def send_text(self, text: str) -> None:
        try:
            await self.ws.send_message(text)
        except trio_websocket.ConnectionClosed as exc:
            raise TransportClosed(exc.reason.code if exc.reason else None) from None

    async def close(self, code: int = 1000) -> None:
        await self.ws.aclose(code)


# --- the harness ---------------------------------------------------------------------------


class _Faults(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def captured_faults() -> Iterator[list[logging.LogRecord]]:
    """ERROR records of ``netra_actors`` (server faults: a handler or actor failed)."""
    handler = _Faults()
    logger = logging.getLogger("netra_actors")
    logger.addHandler(handler)
    try:
        yield handler.records
    finally:
        logger.removeHandler(handler)


@attrs.define
class Harness:
    """A runtime and its gateway; ``connect`` hands a new stream to ``gateway.handle``."""

    runtime: Runtime
    gateway: Gateway
    nursery: trio.Nursery
    faults: list[logging.LogRecord]
    #: ``gateway.handle`` calls still running.
    live: int = 0
    _changed: trio.Event = attrs.field(factory=trio.Event)

    def connect(self) -> trio.StapledStream[Any, Any]:
        server, client = trio.testing.memory_stream_pair()
        self.nursery.start_soon(self._handle, server)
        return client

    async def _handle(self, stream: trio.abc.Stream) -> None:
        self.live += 1
        try:
            await self.gateway.handle(stream)  # documented never to raise (it would fail here)
        finally:
            self.live -= 1
            self._changed.set()
            self._changed = trio.Event()

    async def released(self) -> None:
        """Wait until every ``gateway.handle`` call has returned (within handshake_timeout)."""
        with trio.fail_after(self.gateway.config.handshake_timeout + 2):
            while self.live:
                await self._changed.wait()


@asynccontextmanager
async def gateway_harness(**overrides: Any) -> AsyncIterator[Harness]:
    config = Config(**{**BASE_CONFIG, **overrides})
    _checked.clear()
    with captured_faults() as faults:
        async with Runtime(config) as runtime, trio.open_nursery() as nursery:
            yield Harness(runtime, Gateway(runtime, config), nursery, faults)
            nursery.cancel_scope.cancel()


def token(user: str) -> str:
    return issue_token(user, SECRET)


async def raw_request(
    h: Harness,
    data: bytes,
    *,
    cuts: Sequence[int] = (),
    eof: bool = False,
    key: str | None = KEY,
) -> RawClient:
    """Write ``data`` to a new connection (in pieces, the server reading between them)."""
    client = RawClient(h.connect(), key)
    h.nursery.start_soon(client.read_forever)
    for piece in pieces(data, cuts):
        await client.send_raw(piece)
        await trio.testing.wait_all_tasks_blocked()
    if eof:
        await client.send_eof()
    await client.answered.wait()
    return client


async def open_alice(h: Harness, **query: str | int) -> RawClient:
    """A fuzzing connection of alice, past its session_ready."""
    target = "/ws?" + urlencode({"token": token("alice"), **query})
    client = await raw_request(h, handshake_head(target))
    assert client.status == 101, (client.status, client.body)
    await client.wait_for(lambda f: True)
    assert client.session_ready["user_id"] == "alice"
    return client


async def open_peer(h: Harness, user: str) -> MemoryClient:
    """A well-behaved trio-websocket client of ``user``, past its session_ready."""
    ws = await trio_websocket.wrap_client_stream(
        h.nursery, h.connect(), "127.0.0.1", f"/ws?token={token(user)}"
    )
    client = MemoryClient(_WsTransport(ws), user)
    h.nursery.start_soon(client.read_forever)
    await client.wait_for(lambda f: True)
    assert client.session_ready["user_id"] == user
    return client


def check_peer_frames(client: MemoryClient) -> None:
    for frame in client.frames:
        schema_check(frame, json.dumps(frame, sort_keys=True))


async def assert_healthy(h: Harness, **counts: int) -> None:
    """/healthz answers 200 (with ``counts``), every connection is released, no fault logged."""
    answer = await raw_request(h, b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
    assert answer.status == 200, (answer.status, answer.body)
    body = json.loads(answer.body)
    assert (body["status"], body["ready"]) == ("ok", True)
    for name, value in counts.items():
        assert body[name] == value, (name, body)
    await h.released()
    formatter = logging.Formatter()
    assert not h.faults, "\n".join(formatter.format(r) for r in h.faults)


# --- one fuzzed session: alice's hostile connection, her watching tab, bob ------------------


#: What RFC 6455 makes of a frame that breaks it: the server fails the connection (wsproto
#: drops it without a close frame; a close 1002/1007 would be as lawful).
WS_FAILURE = frozenset({"drop", "close:1002", "close:1007"})
#: A text frame that is not UTF-8 (docs/protocol.md, bad_json: clients see 1006 or 1007).
NOT_UTF8 = frozenset({"drop", "close:1007"})
RATE_LIMITED = frozenset({"error:rate_limited+close:4029"})


@attrs.frozen
class Shot:
    """Bytes sent on alice's fuzzed connection, and the answers the protocol allows."""

    wire: bytes = attrs.field(
        repr=lambda b: repr(b) if len(b) < 200 else f"{b[:120]!r}...({len(b)} bytes)"
    )
    allowed: frozenset[str]
    label: str
    #: A whole message within max_frame_bytes: the connection actor reads it (rate limit).
    reaches: bool = True
    echo: str | None = None
    raw_id: str | None = None
    #: Payloads of the WebSocket pings in ``wire`` (each must be answered with a pong).
    pings: tuple[bytes, ...] = ()
    closes: bool = False
    eof: bool = False
    #: Offsets at which ``wire`` is cut into separately written pieces.
    cuts: tuple[int, ...] = ()

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(repr(self))  # hypothesis prints falsifying examples with this


def shot_for_probe(probe: Probe) -> Shot:
    """A probe of test_limits_and_fuzz as one unfragmented WebSocket message."""
    message = probe.message
    if isinstance(message, bytes):
        payload, opcode, allowed = message, BINARY, probe.allowed
    else:
        try:
            payload, opcode, allowed = message.encode(), TEXT, probe.allowed
        except UnicodeEncodeError:
            # A lone surrogate: the frame is not UTF-8, a WebSocket protocol error.
            payload = message.encode("utf-8", "surrogatepass")
            return Shot(ws_frame(TEXT, payload), NOT_UTF8, "not utf-8", reaches=False)
    return Shot(
        ws_frame(opcode, payload),
        allowed,
        probe.label,
        reaches=len(payload) <= FUZZ_LIMIT,
        echo=probe.echo,
        raw_id=probe.raw_id,
    )


@attrs.frozen
class CancelKnown:
    """A cancel of one of the runs alice started (chosen when it is sent)."""

    pick: int
    client_msg_id: str | None

    def shot(self, accepted: Sequence[str], events: Sequence[Frame]) -> Shot:
        ended = {f["run_id"] for f in events if f["type"] in TERMINAL_EVENTS}
        run_id = accepted[self.pick % len(accepted)] if accepted else "run_never_started"
        frame: dict[str, Any] = {"type": "cancel", "run_id": run_id}
        if self.client_msg_id is not None:
            frame["client_msg_id"] = self.client_msg_id
        # docs: no reply when the run is cancelled, not_found when it is unknown or over.
        allowed = frozenset({"error:not_found" if run_id in ended or not accepted else "none"})
        probe = probe_for_text(json.dumps(frame), "cancel known")
        return attrs.evolve(shot_for_probe(probe), allowed=allowed)


class TokenBucket:
    """The rate limit of docs/protocol.md: ``rate`` frames/s sustained, ``burst`` at once."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.tokens = float(burst)
        self.at: float | None = None

    def take(self, now: float) -> bool:
        if self.at is not None:
            self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


def reply_kind(frame: Frame) -> str:
    if frame["type"] == "error":
        assert frame["code"] in ERROR_CODES, frame
        return f"error:{frame['code']}"
    return {"run_accepted": "accepted"}.get(frame["type"], frame["type"])


async def fire(client: RawClient, shot: Shot) -> tuple[str, list[Frame]]:
    """Send ``shot``; what the server did: its replies, then how the connection ended."""
    mark, pongs = len(client.frames), len(client.pongs)
    client.sent_close |= shot.closes
    for piece in pieces(shot.wire, shot.cuts) if shot.wire else []:
        await client.send_raw(piece)
        await trio.testing.wait_all_tasks_blocked()
    if shot.eof:
        await client.send_eof()
    await trio.testing.wait_all_tasks_blocked()
    replies = [f for f in client.frames[mark:] if not is_event(f)]
    parts = [reply_kind(f) for f in replies]
    if client.close_code is not None:
        assert client.ended.is_set(), "the server sent a close frame but kept the connection"
    if client.ended.is_set():
        parts.append("drop" if client.close_code is None else f"close:{client.close_code}")
    else:
        assert client.pongs[pongs:] == list(shot.pings), (shot, client.pongs[pongs:])
    return "+".join(parts) or "none", replies


def check_echoes(shot: Shot, replies: Sequence[Frame]) -> None:
    """Error frames echo the frame's string client_msg_id (docs: not on rate_limited)."""
    for reply in replies:
        if reply["type"] == "run_accepted":
            assert reply["client_msg_id"] == shot.echo, (shot, reply)
        if reply["type"] != "error":
            continue
        if reply["code"] == "rate_limited":
            assert "client_msg_id" not in reply, reply
            continue
        if shot.echo is not None:
            assert reply.get("client_msg_id") == shot.echo, (shot, reply)
        if "client_msg_id" in reply:
            assert reply["client_msg_id"] == shot.raw_id, (shot, reply)


async def _fuzz_session(
    steps: Sequence[tuple[float, Shot | CancelKnown]], **overrides: Any
) -> None:
    with trio.fail_after(BOUND):
        async with gateway_harness(**overrides) as h:
            config = h.gateway.config
            bob = await open_peer(h, "bob")
            bob_runs = [
                await bob.user_message("stream 20"),
                await bob.user_message("sleep 3", thread_id="slow"),
            ]
            tab = await open_peer(h, "alice")  # alice's other tab: only reads
            session_id = tab.session_ready["session_id"]
            connections = [await open_alice(h)]
            bucket = TokenBucket(config.rate_limit, config.rate_burst)
            accepted: list[str] = []

            for gap, step in steps:
                if gap:
                    await trio.sleep(gap)
                client = connections[-1]
                if isinstance(step, CancelKnown):
                    step = step.shot(accepted, merged_events(*connections))
                allowed = step.allowed
                if step.reaches and not bucket.take(trio.current_time()):
                    allowed = RATE_LIMITED
                got, replies = await fire(client, step)
                assert got in allowed, (step, got, replies)
                hypothesis.event(f"{step.label}: {got}")
                check_echoes(step, replies)
                accepted += [f["run_id"] for f in replies if f["type"] == "run_accepted"]
                if client.ended.is_set():
                    # The session outlives the connection: resume where it stopped.
                    last = max((f["seq"] for f in merged_events(*connections)), default=0)
                    again = await open_alice(h, after_seq=last, session_id=session_id)
                    assert again.session_ready["session_id"] == session_id
                    connections.append(again)

            # Every run alice started ends; her tab saw the whole session, lawfully.
            for run_id in accepted:
                await tab.wait_terminal(run_id)
            await trio.testing.wait_all_tasks_blocked()
            report = check_lifecycle(tab.frames)
            assert set(report.runs) == set(accepted)
            assert merged_events(*connections) == tab.events
            # The budget refills; a new connection runs to completion.
            await trio.sleep(config.rate_burst / config.rate_limit)
            final = await open_peer(h, "alice")
            run_id = await final.user_message(CALC, thread_id="final-check")
            done = await final.wait_terminal(run_id)
            assert done["type"] == "agent_completed"
            assert "14" in done["data"]["final_response"]
            # bob's runs, concurrent with all of it, are untouched.
            for bob_run in bob_runs:
                await bob.wait_terminal(bob_run)
            bob_report = check_lifecycle(bob.frames)
            assert set(bob_report.runs) == set(bob_runs)
            assert {r.terminal for r in bob_report.runs.values()} == {"agent_completed"}
            assert [e["type"] for e in bob.run_events(bob_runs[0])].count("partial_result") == 20
            assert not bob.replies("error")
            for peer in (bob, tab, final):
                check_peer_frames(peer)
                await peer.close()
            await connections[-1].close()
            await assert_healthy(h, sessions=2, connections=0, active_runs=0, queued_runs=0)


# --- fuzz 1: client frames of every type through the gateway ---------------------------------

#: A small rate budget, so that batches run into the limit (and gaps refill it); a short
#: queue per thread, so that enqueue runs into limit_exceeded.
FRAME_CONFIG = {"rate_limit": 4.0, "rate_burst": 8, "max_queued_per_thread": 2}
gaps = st.sampled_from([0.0, 0.0, 0.0, 0.0, 0.3, 1.5])


def _user_message(
    text: str, thread: str, policy: str | None, msg_id: str | None, label: str
) -> Shot:
    frame = {"type": "user_message", "text": text, "thread_id": thread}
    frame |= ({"policy": policy} if policy else {}) | ({"client_msg_id": msg_id} if msg_id else {})
    return shot_for_probe(probe_for_text(json.dumps(frame), label))


#: Runs that stay active (so that cancels, reject and interrupt meet a busy thread).
sleepers = st.builds(
    _user_message,
    st.sampled_from(["sleep 8", "sleep 2"]),
    st.sampled_from(["main", "t1"]),
    st.sampled_from([None, "enqueue", "reject", "interrupt"]),
    st.none() | st.text(min_size=1, max_size=8),
    st.just("sleeper"),
)
cancel_known = st.builds(CancelKnown, st.integers(0, 20), st.none() | st.text(max_size=8))
#: Valid user_messages with any optional fields (near_valid_probes draws few of them).
user_messages = st.fixed_dictionaries(
    {"type": st.just("user_message"), "text": VALID_FIELDS["user_message"]["text"]},
    optional={
        **{k: v for k, v in VALID_FIELDS["user_message"].items() if k != "text"},
        "thread_id": st.sampled_from(["main", "t1"]) | VALID_FIELDS["user_message"]["thread_id"],
    },
).map(lambda frame: shot_for_probe(probe_for_text(json.dumps(frame), "user_message")))


@st.composite
def busy_threads(draw: st.DrawFn) -> list[tuple[float, Shot | CancelKnown]]:
    """A long run, more messages on its thread (enqueue, reject, interrupt), then a cancel of one of them."""
    thread = draw(st.sampled_from(["main", "t1"]))
    msg_id = draw(st.none() | st.text(min_size=1, max_size=8))
    policies = draw(
        st.lists(st.sampled_from(["enqueue", "reject", "interrupt"]), min_size=1, max_size=3)
    )
    return [
        (0.0, _user_message("sleep 8", thread, None, None, "sleeper")),
        *(
            (0.0, _user_message("hello", thread, p, msg_id, f"{p} on a busy thread"))
            for p in policies
        ),
        (0.0, CancelKnown(draw(st.integers(-4, -1)), msg_id)),
    ]


single_steps = st.tuples(
    gaps,
    st.one_of(
        near_valid_probes.map(shot_for_probe),  # the frames that reach the most server code
        user_messages,
        probes.map(shot_for_probe),
        huge_frames().map(shot_for_probe),  # UTF-8 bytes around max_frame_bytes
        sleepers,
        cancel_known,
    ),
).map(lambda step: [step])
frame_steps = st.one_of(single_steps, single_steps, busy_threads())


@given(
    steps=st.lists(frame_steps, min_size=1, max_size=6).map(
        lambda groups: [step for group in groups for step in group]
    )
)
def test_fuzzed_client_frames_through_the_gateway_get_documented_answers(
    steps: list[tuple[float, Shot | CancelKnown]],
) -> None:
    """Valid, near-valid and garbage frames of every type via HTTP upgrade + WebSocket: each answered as documented (typed error, reply, 1009, 4029); nobody else hurt."""
    trio.run(
        partial(_fuzz_session, steps, **FRAME_CONFIG),
        clock=trio.testing.MockClock(autojump_threshold=0),
    )


# --- fuzz 2: WebSocket framing ----------------------------------------------------------------

PING_JSON = b'{"type":"ping"}'
#: Close codes a peer may send (RFC 6455 7.4, as wsproto knows them; 3000-4999 are free).
CLOSE_CODES = [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013]
#: Close codes a peer must not send: reserved, local-only or out of range.
BAD_CLOSE_CODES = [0, 999, 1004, 1005, 1006, 1015, 1016, 2000, 2999, 5000, 65535]
BAD_UTF8 = [b"\xff", b"\xc0\xaf", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\x80", b"\xe2\x82"]


def _encodable(probe: Probe) -> bool:
    if isinstance(probe.message, bytes):
        return True
    try:
        probe.message.encode()
    except UnicodeEncodeError:
        return False
    return True


@st.composite
def fragmented_messages(draw: st.DrawFn) -> Shot:
    """A lawful message: a probe cut into fragments at any byte, with pings and pongs between them, written in pieces."""
    probe = draw(st.one_of(probes, huge_frames()).filter(_encodable))
    binary = isinstance(probe.message, bytes)
    payload = probe.message if isinstance(probe.message, bytes) else probe.message.encode()
    parts = pieces(payload, draw(st.lists(st.integers(0, len(payload)), max_size=3)))
    if draw(st.booleans()):
        parts.insert(draw(st.integers(1, len(parts))), b"")  # an empty fragment is lawful
    frames, pings = [], []
    for index, part in enumerate(parts):
        opcode = (BINARY if binary else TEXT) if index == 0 else CONT
        frames.append(ws_frame(opcode, part, fin=index == len(parts) - 1))
        if index < len(parts) - 1 and draw(st.booleans()):
            kind, data = draw(st.sampled_from([PING, PONG])), draw(st.binary(max_size=125))
            frames.append(ws_frame(kind, data))
            if kind == PING:
                pings.append(data)
    wire = b"".join(frames)
    return Shot(
        wire,
        probe.allowed,
        f"fragmented {probe.label}",
        reaches=len(payload) <= FUZZ_LIMIT,
        echo=probe.echo,
        raw_id=probe.raw_id,
        pings=tuple(pings),
        cuts=tuple(draw(st.lists(st.integers(1, max(1, len(wire) - 1)), max_size=3))),
    )


def _violation(label: str, wire: bytes) -> Shot:
    return Shot(wire, WS_FAILURE, label, reaches=False)


violations = st.one_of(
    st.integers(1, 7).map(lambda rsv: _violation("rsv bits", ws_frame(TEXT, PING_JSON, rsv=rsv))),
    st.sampled_from([3, 4, 5, 6, 7, 11, 12, 13, 14, 15]).map(
        lambda op: _violation("reserved opcode", ws_frame(op, b"x"))
    ),
    st.just(_violation("unmasked", ws_frame(TEXT, PING_JSON, masked=False))),
    st.just(_violation("continuation first", ws_frame(CONT, PING_JSON))),
    st.just(
        _violation(
            "message inside a message",
            ws_frame(TEXT, b'{"type":', fin=False) + ws_frame(TEXT, b'"ping"}'),
        )
    ),
    st.sampled_from([PING, PONG, CLOSE]).map(
        lambda op: _violation("fragmented control", ws_frame(op, b"", fin=False))
    ),
    st.sampled_from([PING, PONG]).map(
        lambda op: _violation("control over 125 bytes", ws_frame(op, b"x" * 126))
    ),
    st.just(_violation("close of 1 byte", ws_frame(CLOSE, b"\x03"))),
    st.sampled_from(BAD_CLOSE_CODES).map(
        lambda code: _violation("bad close code", ws_frame(CLOSE, close_payload(code)))
    ),
    st.just(_violation("close reason not utf-8", ws_frame(CLOSE, close_payload(1000, b"\xff")))),
    st.sampled_from(BAD_UTF8).map(
        lambda bad: attrs.evolve(
            _violation("text not utf-8", ws_frame(TEXT, b'{"type":"ping","x":"' + bad + b'"}')),
            allowed=NOT_UTF8,
        )
    ),
    st.tuples(st.sampled_from([2, 8]), st.binary(max_size=20)).map(
        lambda t: _violation("long length form", ws_frame(TEXT, t[1], length_bytes=t[0]))
    ),
    st.just(_violation("length msb", bytes([0x81, 0xFF]) + struct.pack("!Q", 1 << 63) + MASK)),
)
controls = st.one_of(
    st.binary(max_size=125).map(
        lambda d: Shot(ws_frame(PING, d), frozenset({"none"}), "ws ping", reaches=False, pings=(d,))
    ),
    st.binary(max_size=125).map(
        lambda d: Shot(ws_frame(PONG, d), frozenset({"none"}), "ws pong", reaches=False)
    ),
)
closes = st.one_of(
    st.tuples(st.sampled_from(CLOSE_CODES) | st.integers(3000, 4999), st.text(max_size=20)).map(
        lambda t: Shot(
            ws_frame(CLOSE, close_payload(t[0], t[1].encode())),
            frozenset({f"close:{t[0]}"}),  # the server echoes the code and closes
            "close",
            reaches=False,
            closes=True,
        )
    ),
    st.just(
        Shot(ws_frame(CLOSE), frozenset({"close:1005"}), "empty close", reaches=False, closes=True)
    ),
    st.just(Shot(b"", frozenset({"drop"}), "eof without close", reaches=False, eof=True)),
)
wire_steps = st.tuples(
    st.just(0.0),
    st.one_of(fragmented_messages(), fragmented_messages(), controls, closes, violations),
)


@given(steps=st.lists(wire_steps, min_size=1, max_size=8))
def test_fuzzed_websocket_framing_gets_lawful_answers(steps: list[tuple[float, Shot]]) -> None:
    """Fragmented messages cut anywhere, control frames, closes and RFC 6455 violations: lawful answers, a failed connection at worst; nobody else hurt."""
    trio.run(_fuzz_session, steps, clock=trio.testing.MockClock(autojump_threshold=0))


# --- fuzz 3: request heads -----------------------------------------------------------------

#: HTTP statuses of docs/protocol.md and the JSON body's error word for each refusal.
REFUSALS = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    429: "too_many_connections",
    426: "bad_request",
    503: "unavailable",
}
#: Everything a head can get (None: closed without an answer; 426: RFC 6455 version).
ANY_ANSWER = frozenset({None, 101, 200, 400, 401, 403, 404, 426})
JUNK = string.ascii_letters + string.digits + "-_."
#: Printable ASCII for header values (brackets included: urlsplit raises on an unbalanced one).
VALUE_CHARS = string.printable[:95]
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


@attrs.frozen
class Head:
    """A request head, and what docs/protocol.md (and RFC 6455) say the server answers."""

    data: bytes
    expect: frozenset[int | None]
    label: str
    cuts: tuple[int, ...] = ()
    eof: bool = False
    # On 101 (well-formed heads only):
    user: str | None = None
    proposes_v1: bool = False
    resumes: bool = False
    #: The multi-event frame size session_ready must confirm (None: single events).
    batch: int | None = None
    expect_gap: bool = False
    early_ping: bool = False
    #: Carries KEY as its Sec-WebSocket-Key (so a 101 must carry its accept token).
    keyed: bool = True


#: What can be wrong with a well-formed head (0, 1 or 2 of them per head).
DEFECTS = (
    "method",
    "connection",
    "version",
    "key",
    "upgrade",
    "host",
    "path",
    "token",
    "origin",
    "after_seq",
    "batch",
)


@st.composite
def well_formed_heads(draw: st.DrawFn) -> Head:
    """A well-formed HTTP/1.1 head: a WebSocket handshake with up to two defects (plain HTTP, wrong path, bad token, origin, after_seq, batch, RFC 6455 headers), tokens in any place, noise."""
    users: dict[str, str | None] = {}
    count = draw(st.sampled_from([0, 0, 0, 1, 1, 2]))
    defects = set(
        draw(st.lists(st.sampled_from(DEFECTS), min_size=count, max_size=count, unique=True))
    )

    def draw_token(valid: bool | None = None) -> str:
        kinds = ["valid"] if valid else ["expired", "forged", "junk"]
        kind = draw(st.sampled_from(kinds if valid is not None else ["valid", *kinds]))
        user = draw(st.sampled_from(["alice", "carol"]))
        if kind == "junk":
            value, user_of = draw(st.text(JUNK, min_size=1, max_size=40)), None
        elif kind == "valid":
            value, user_of = token(user), user
        elif kind == "expired":
            value, user_of = issue_token(user, SECRET, ttl=60, now=time.time() - 3600), None
        else:
            value, user_of = issue_token(user, OTHER_SECRET), None
        users[value] = user_of
        return value

    # The token that counts sits in one place (docs: Authorization, then a bearer.
    # subprotocol, then ?token=); places after it may hold any token, places before it
    # only forms that do not count.
    slots = ["auth", "subprotocol", "query"]
    counting = draw(st.sampled_from([*slots, None] if "token" in defects else slots))
    placed: dict[str, str | None] = {}
    for slot in slots:
        if counting is not None and slots.index(slot) < slots.index(counting):
            placed[slot] = None
        elif slot == counting:
            placed[slot] = draw_token(valid="token" not in defects)
        else:
            shadowed = draw(st.booleans())
            placed[slot] = draw_token(False if "token" in defects else None) if shadowed else None
    auth = (
        f"{draw(st.sampled_from(['Bearer', 'bearer']))} {placed['auth']}"
        if placed["auth"] is not None
        else draw(st.sampled_from([None, None, "Basic YWxpY2U6c2VjcmV0", "Bearer"]))
    )
    proposals = draw(
        st.lists(st.sampled_from(["netra.v1", "chat", "bearer."]), max_size=3, unique=True)
    )
    if placed["subprotocol"] is not None:
        proposals.insert(draw(st.integers(0, len(proposals))), f"bearer.{placed['subprotocol']}")
    query_token = placed["query"]

    method = draw(st.sampled_from(["POST", "HEAD", "DELETE"])) if "method" in defects else "GET"
    path = (
        draw(st.sampled_from(["/healthz", "/healthz", "/", "/nope", "/ws/", "/WS"]))
        if "path" in defects
        else "/ws"
    )
    host = None if "host" in defects else draw(st.sampled_from([HOST, HOST, "example.test"]))
    upgrade = (
        draw(st.sampled_from(["h2c", None]))
        if "upgrade" in defects
        else draw(st.sampled_from(["websocket", "websocket", "WebSocket"]))
    )
    connection = (
        draw(st.sampled_from(["keep-alive", None]))
        if "connection" in defects
        else draw(st.sampled_from(["Upgrade", "Upgrade", "keep-alive, Upgrade", "upgrade"]))
    )
    version = draw(st.sampled_from(["8", None])) if "version" in defects else "13"
    key = None if "key" in defects else KEY
    origin = draw(
        st.sampled_from(["https://evil.example", "null"])
        if "origin" in defects
        else st.sampled_from([None, None, ALLOWED_ORIGIN, "same"])
    )
    if origin == "same":
        origin = f"http://{host or 'elsewhere.test'}"
    after_seq = draw(
        st.sampled_from(["-1", "1.5", "x", "\u0663", " 1", "0x1"])
        if "after_seq" in defects
        else st.none() | st.integers(0, 3).map(str) | st.just("18446744073709551616")
    )
    batch = draw(
        st.sampled_from(["0", "1001", "x", "-1", "2.5", "\u0663"])
        if "batch" in defects
        else st.none() | st.sampled_from(["1", "2", "64", "1000"])
    )
    session_hint = draw(st.none() | st.text(JUNK, min_size=1, max_size=12))

    query: list[tuple[str, str]] = []
    if query_token is not None:
        query.append(("token", query_token))
    if after_seq is not None:
        query.append(("after_seq", after_seq))
    if session_hint is not None:
        query.append(("session_id", session_hint))
    if batch is not None:
        query.append(("batch", batch))
    query += draw(
        st.lists(st.tuples(st.sampled_from(["x", "q"]), st.text(JUNK, max_size=8)), max_size=2)
    )
    target = path + ("?" + urlencode(query) if query else "")
    traceparent = draw(
        st.none()
        | st.just(TRACEPARENT)
        | st.text(VALUE_CHARS, min_size=1, max_size=60).map(str.strip).filter(bool)
    )
    noise = draw(
        st.lists(
            st.tuples(
                st.text(string.ascii_letters, min_size=1, max_size=8),
                st.text(VALUE_CHARS, min_size=1, max_size=30).map(str.strip).filter(bool),
            ),
            max_size=2,
        )
    )

    headers = [
        ("Host", host),
        ("Upgrade", upgrade),
        ("Connection", connection),
        ("Sec-WebSocket-Key", key),
        ("Sec-WebSocket-Version", version),
        ("Authorization", auth),
        ("Sec-WebSocket-Protocol", ", ".join(proposals) or None),
        ("Origin", origin),
        ("traceparent", traceparent),
        *((f"X-Fuzz-{name}", value) for name, value in noise),
    ]
    lines = draw(st.permutations([f"{n}: {v}" for n, v in headers if v is not None]))
    early_ping = draw(st.sampled_from([False, False, False, True]))
    data = ("\r\n".join([f"{method} {target} HTTP/1.1", *lines]) + "\r\n\r\n").encode("latin-1")
    if early_ping:
        # Written before the 101, which RFC 6455 forbids: wsproto's server drops whatever it
        # read together with the head, so the rest of a frame cut there breaks the stream.
        # Any outcome is lawful, but not a fault.
        data += ws_frame(PING, b"early")
    cuts = tuple(draw(st.lists(st.integers(1, len(data) - 1), max_size=3)))

    # What docs/protocol.md says (its handshake order), after RFC 6455's own checks.
    def chosen_token() -> str | None:
        if auth is not None:
            scheme, _, value = auth.partition(" ")
            if scheme.lower() == "bearer" and value.strip():
                return value.strip()
        for proposed in proposals:
            if proposed.startswith("bearer.") and len(proposed) > len("bearer."):
                return proposed[len("bearer.") :]
        return query_token

    head = Head(data, frozenset(), "", cuts=cuts, early_ping=early_ping)
    if host is None:
        return attrs.evolve(head, expect=frozenset({400}), label="no host", eof=draw(st.booleans()))
    if upgrade is None or upgrade.lower() != "websocket":
        status = 200 if (method, path) in {("GET", "/healthz"), ("GET", "/")} else 404
        return attrs.evolve(
            head, expect=frozenset({status}), label=f"plain {status}", eof=draw(st.booleans())
        )
    connection_tokens = [t.strip().lower() for t in (connection or "").split(",")]
    rfc_refusal = (
        400
        if method != "GET" or "upgrade" not in connection_tokens
        else (426 if version else 400)
        if version != "13"
        else 400
        if key is None
        else None
    )
    if rfc_refusal is not None:
        return attrs.evolve(head, expect=frozenset({rfc_refusal}), label=f"rfc {rfc_refusal}")
    user = users.get(chosen_token() or "")
    origin_ok = origin is None or netloc(origin) == host or origin.rstrip("/") == ALLOWED_ORIGIN
    after_ok = after_seq is None or (after_seq.isascii() and after_seq.isdigit())
    # Multi-event frames: batch must be an integer 1-1000 (docs/protocol.md).
    after_ok = after_ok and (
        batch is None or (batch.isascii() and batch.isdigit() and 1 <= int(batch) <= 1000)
    )
    failures = [
        s
        for s, failed in ((404, path != "/ws"), (401, user is None), (403, not origin_ok))
        if failed
    ]
    # docs do not place the after_seq check among the others: either refusal is lawful.
    expect = {failures[0]} if failures else set() if after_ok else {400}
    if failures and not after_ok:
        expect.add(400)
    if expect:
        return attrs.evolve(head, expect=frozenset(expect), label=f"refused {sorted(expect)}")
    resumes = after_seq is not None
    return attrs.evolve(
        head,
        expect=frozenset({101}),
        label="accepted",
        user=user,
        proposes_v1="netra.v1" in proposals,
        resumes=resumes,
        batch=int(batch) if batch is not None and int(batch) > 1 else None,
        # Nothing ever happens in these sessions (last_seq 0): after_seq 0 of this very
        # session is exact, anything else (another session_id, a later seq) is a gap.
        expect_gap=resumes and (int(after_seq or 0) != 0 or session_hint is not None),
    )


def netloc(url: str) -> str | None:
    """The netloc of ``url``; None where urlsplit cannot split it (an unbalanced bracket)."""
    try:
        return urlsplit(url).netloc
    except ValueError:
        return None


@st.composite
def mutated_heads(draw: st.DrawFn) -> Head:
    """A well-formed head with bytes flipped, inserted, deleted or cut off."""
    data = bytearray(draw(well_formed_heads()).data)
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        at = draw(st.integers(0, max(0, len(data) - 1)))
        if kind == "flip" and data:
            data[at] = draw(st.integers(0, 255))
        elif kind == "insert":
            data[at:at] = draw(
                st.binary(min_size=1, max_size=8)
                | st.sampled_from([b"\r\n", b"\n", b":", b" ", b"\r\n\r\n"])
            )
        elif kind == "delete":
            del data[at : at + draw(st.integers(1, 8))]
        else:
            del data[at:]
    mutated = bytes(data)
    return Head(mutated, ANY_ANSWER, "mutated", eof=draw(st.booleans()), keyed=False)


#: A head that asks for a page the gateway serves (random bytes can be one: "GET / HTTP/1.0").
_SERVED_GET = re.compile(
    rb"GET (?:" + b"|".join(re.escape(p.encode()) for p in (*WEB_FILES, "/healthz")) + rb")"
    rb"(?:\?[^ \r\n]*)? HTTP/1\.[01]\r?\n"
)


def _garbage(data: bytes, eof: bool) -> Head:
    # h11 is lenient: some garbage parses as a request ("! ! HTTP/1.0\n\n": 404), and some
    # of that asks for a page the gateway serves (200).
    expect = {None, 400, 404} | ({200} if _SERVED_GET.match(data) else set())
    return Head(data, frozenset(expect), "garbage", eof=eof, keyed=False)


garbage_heads = st.one_of(
    st.builds(_garbage, st.binary(max_size=200), st.booleans()),
    st.builds(
        lambda tail, eof: Head(b"GET /" + tail, ANY_ANSWER, "GET garbage", eof=eof, keyed=False),
        st.binary(max_size=100),
        st.booleans(),
    ),
)


def check_body(client: RawClient) -> None:
    """A refusal's body is the documented JSON, whichever layer refused."""
    status = client.status
    if status == 200 and client.headers.get("content-type") != "application/json":
        # A page of the web client: one of the files, as served.
        types = {content_type for _, content_type in WEB_FILES.values()}
        assert client.headers.get("content-type") in types, client.headers
        assert client.body, "an empty page"
    elif status == 200:
        body = json.loads(client.body)
        assert body["status"] == "ok", body
    elif status in REFUSALS:
        assert client.headers.get("content-type") == "application/json", client.headers
        body = json.loads(client.body)
        assert set(body) == {"error", "message"}, body
        assert body["error"] == REFUSALS[status], (status, body)
        assert isinstance(body["message"], str)


async def check_accepted(client: RawClient, head: Head) -> None:
    """A 101 of a well-formed head: subprotocol, session_ready, resume, then a working ping."""
    assert client.headers.get("sec-websocket-protocol") == (
        "netra.v1" if head.proposes_v1 else None
    )
    ready = await client.wait_for(lambda f: True)
    assert ready["type"] == "session_ready", ready
    assert ready["user_id"] == head.user
    assert ready.get("after_seq") == (0 if head.resumes else None), ready
    assert ready.get("batch") == head.batch, ready
    await client.send_raw(ws_frame(TEXT, PING_JSON))
    await client.wait_for(lambda f: f["type"] == "pong")
    expected = ["session_ready", *(["resume_gap"] if head.expect_gap else []), "pong"]
    assert [f["type"] for f in client.frames] == expected, client.frames


async def _fuzz_heads(heads: Sequence[Head]) -> None:
    with trio.fail_after(BOUND):
        async with gateway_harness() as h:
            for head in heads:
                key = KEY if head.keyed else None
                client = await raw_request(h, head.data, cuts=head.cuts, eof=head.eof, key=key)
                assert client.status in head.expect, (head, client.status, client.body)
                hypothesis.event(f"{head.label}: {client.status}")
                check_body(client)
                if client.status == 101 and head.user is not None and not head.early_ping:
                    await check_accepted(client, head)
                await client.close()
            # The gateway goes on serving: a WebSocket run, then /healthz.
            bob = await open_peer(h, "bob")
            run_id = await bob.user_message(CALC)
            await bob.wait_terminal(run_id)
            assert check_lifecycle(bob.frames).runs[run_id].terminal == "agent_completed"
            check_peer_frames(bob)
            await bob.close()
            await assert_healthy(h, connections=0, active_runs=0, queued_runs=0)


@given(
    heads=st.lists(
        st.one_of(well_formed_heads(), well_formed_heads(), mutated_heads(), garbage_heads),
        min_size=1,
        max_size=4,
    )
)
def test_fuzzed_request_heads_get_a_documented_answer_or_a_silent_close(heads: list[Head]) -> None:
    """Well-formed, mutated and random request heads, written in pieces: the documented status (or a silent close), never a fault; the gateway keeps serving."""
    trio.run(_fuzz_heads, heads, clock=trio.testing.MockClock(autojump_threshold=0))


# --- bugs found by the fuzzers, fixed (regression examples) ----------------------------------


async def _answer(data: bytes) -> tuple[int | None, bytes, list[logging.LogRecord]]:
    with trio.fail_after(BOUND):
        async with gateway_harness() as h:
            client = await raw_request(h, data)
            await client.close()
            await trio.testing.wait_all_tasks_blocked()
            return client.status, client.body, list(h.faults)


def _with_token(path: str = "/ws") -> str:
    return f"{path}?token={token('alice')}"


@pytest.mark.parametrize(
    ("data", "statuses"),
    [
        pytest.param(b"GET //[ HTTP/1.1\r\nHost: x\r\n\r\n", {400, 404}, id="plain-target"),
        pytest.param(handshake_head("//["), {400, 404}, id="upgrade-target"),
        pytest.param(handshake_head(_with_token(), "Origin: http://["), {400, 403}, id="origin"),
    ],
)
def test_a_bracket_in_the_target_or_origin_gets_an_answer_not_a_fault(
    data: bytes, statuses: set[int]
) -> None:
    """A request head with an unbalanced '[' in the target or Origin gets 400 (or 404/403), and logs no server fault."""
    status, _, faults = trio.run(_answer, data, clock=trio.testing.MockClock(autojump_threshold=0))
    assert status in statuses
    assert not faults


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(handshake_head(_with_token(), host="xn--"), id="host-xn--"),
        pytest.param(handshake_head(_with_token(), host="\xff"), id="host-latin1"),
        pytest.param(handshake_head(_with_token(), "Connection: Upgrade\xff"), id="connection"),
        pytest.param(
            handshake_head(_with_token(), "Sec-WebSocket-Protocol: netra.v1\xe9"), id="subprotocol"
        ),
        pytest.param(
            handshake_head(_with_token(), "Sec-WebSocket-Extensions: \xe9"), id="extensions"
        ),
    ],
)
def test_a_handshake_header_wsproto_cannot_decode_gets_400(data: bytes) -> None:
    """An upgrade whose Host or Connection/Sec-WebSocket-* value is not ASCII (or not IDNA) gets 400, and logs no server fault."""
    status, _, faults = trio.run(_answer, data, clock=trio.testing.MockClock(autojump_threshold=0))
    assert status == 400
    assert not faults


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(handshake_head(_with_token()).replace(b"GET ", b"POST ", 1), id="post"),
        pytest.param(
            handshake_head(_with_token()).replace(b"Connection: Upgrade", b"Connection: close"),
            id="connection",
        ),
        pytest.param(
            handshake_head(_with_token()).replace(b"Version: 13", b"Version: 8"), id="version-8"
        ),
        pytest.param(
            handshake_head(_with_token()).replace(f"Sec-WebSocket-Key: {KEY}\r\n".encode(), b""),
            id="no-key",
        ),
    ],
)
def test_websocket_level_handshake_refusals_carry_the_documented_body(data: bytes) -> None:
    """A handshake refused by the WebSocket layer gets a documented status with the JSON {error, message} body."""
    status, body, faults = trio.run(
        _answer, data, clock=trio.testing.MockClock(autojump_threshold=0)
    )
    assert not faults
    assert status in REFUSALS, status
    assert body, "no JSON body"
    document = json.loads(body)
    assert set(document) == {"error", "message"}
    assert document["error"] == REFUSALS[status]


async def _ping_crossing_close(cause: str) -> list[logging.LogRecord]:
    with trio.fail_after(BOUND):
        async with gateway_harness(rate_limit=1.0, rate_burst=1) as h:
            client = await open_alice(h)
            if cause == "1009":
                # An oversize message and a ping, read together.
                oversize = ws_frame(BINARY, b"x" * (FUZZ_LIMIT + 1))
                await client.send_raw(oversize + ws_frame(PING, b"p"))
            else:
                # The second frame is over the rate: error rate_limited, close 4029; a ping
                # the client sent before it read that close frame arrives after it.
                client.sent_close = True  # do not answer the close (yet)
                await client.send_raw(ws_frame(TEXT, PING_JSON) * 2)
                await trio.testing.wait_all_tasks_blocked()
                assert client.close_code == 4029
                await client.send_raw(ws_frame(PING, b"p"))
            await trio.testing.wait_all_tasks_blocked()
            await client.close()
            await trio.testing.wait_all_tasks_blocked()
            return list(h.faults)


@pytest.mark.parametrize("cause", ["1009", "4029"])
def test_a_ping_crossing_the_servers_close_frame_logs_no_fault(cause: str) -> None:
    """A client ping that crosses the server's close frame (1009, 4029) is ignored, and no server fault is logged."""
    faults = trio.run(
        _ping_crossing_close, cause, clock=trio.testing.MockClock(autojump_threshold=0)
    )
    assert not [record.exc_info for record in faults]


async def _not_utf8_text(bad: bytes) -> tuple[str, str]:
    with trio.fail_after(BOUND):
        async with gateway_harness() as h:
            client = await open_alice(h)
            session_id = client.session_ready["session_id"]
            shot = Shot(ws_frame(TEXT, b'{"type":"ping","x":"' + bad + b'"}'), NOT_UTF8, "")
            got, _ = await fire(client, shot)
            await client.close()
            again = await open_alice(h)
            assert again.session_ready["session_id"] == session_id
            after, _ = await fire(again, Shot(ws_frame(TEXT, PING_JSON), frozenset(), "ping"))
            await again.close()
            await assert_healthy(h)
            return got, after


@pytest.mark.parametrize("bad", BAD_UTF8)
def test_a_text_frame_that_is_not_utf8_fails_only_its_connection(bad: bytes) -> None:
    """A text frame that is not UTF-8 fails the connection as documented (dropped, or close 1007); the session and the gateway go on."""
    got, after = trio.run(_not_utf8_text, bad, clock=trio.testing.MockClock(autojump_threshold=0))
    assert got in NOT_UTF8
    assert after == "pong"
