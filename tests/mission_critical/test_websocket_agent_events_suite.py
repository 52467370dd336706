"""Mission-critical suite: agent run events reach chat clients ordered, complete, isolated, fault-proof.

What it proves, and how:

* It drives the real server (``netra_actors.serve`` on 127.0.0.1, port 0) over
  real TCP WebSocket connections, on the real clock. No memory transport, no
  in-process run handles: every event a test looks at went through the
  gateway, the connection actor and the socket.
* Every frame received is decoded and validated against the JSON Schemas in
  docs/schemas (``wsclient.WsClient.receive`` does it; frames yielded by
  ``netra_actors.client`` are validated here explicitly).
* Every received stream goes through the public lifecycle checker
  (``netra_actors.testing.check_lifecycle``, strict ``seq``): each run starts
  with ``agent_started``, has exactly one terminal event and nothing after it,
  tool calls are matched, and ``seq`` is gap-free across the whole connection.
* On top of the checker, each test counts exactly what it expects: event types
  and data field types, per-user ownership of every event (150 concurrent
  users), exact delivery counts under load (50 x 123 events), the exact
  missing suffix after an abrupt disconnect (raw reconnect with ``after_seq``
  and the automatic resume of ``netra_actors.client``), a single terminal per
  failed run with the connection still usable, and byte-identical streams on
  several tabs of one user.

Every test is bounded by ``trio.fail_after`` (60 s; 120 s for the two
many-connection tests) and waits for frames, never for time. The last test
guards the client library's close against a racing server heartbeat.
"""

from __future__ import annotations

import contextlib
import math
import re
import socket
import struct
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing, asynccontextmanager
from typing import Any
from urllib.parse import urlencode, urlsplit

import pytest
import trio
import trio_websocket
from wsclient import Frame, WsClient, connect, is_terminal, served, validate_server_frame
from wsproto.utilities import LocalProtocolError

from netra_actors import Config
from netra_actors.client import connect as client_connect
from netra_actors.testing import TERMINAL_EVENTS, check_lifecycle

pytestmark = pytest.mark.network

#: Upper bound for each test (a loaded 2-core machine; each takes a few seconds at most).
BOUND = 60
#: Upper bound for the two many-connection tests (about 5-15 s on a loaded 2-core machine).
HEAVY_BOUND = 120

#: Server heartbeat for the many-connection tests: longer than HEAVY_BOUND, so no WebSocket ping
#: can race a client's close handshake. trio-websocket 0.12.2 answers a ping that arrives
#: while it is closing and crashes (wsproto LocalProtocolError; trio-websocket issue #184).
#: Heartbeats are a liveness feature, not part of event delivery.
QUIET_HEARTBEAT = 2.0 * HEAVY_BOUND

CALC = "what is 2+3*4?"
CRITICAL_EVENTS = (
    "agent_started",
    "agent_thinking",
    "tool_executing",
    "tool_completed",
    "agent_completed",
)
HEX32 = re.compile(r"[0-9a-f]{32}")
HEX16 = re.compile(r"[0-9a-f]{16}")


# --- helpers ---------------------------------------------------------------------------------


def events_of(frames: list[Frame], run_id: str | None = None) -> list[Frame]:
    """Event frames (they carry ``seq``), of ``run_id`` when given."""
    return [f for f in frames if "seq" in f and run_id in (None, f["run_id"])]


def of_type(frames: list[Frame], event_type: str) -> list[Frame]:
    """Frames of one ``type``."""
    return [f for f in frames if f["type"] == event_type]


def seqs(frames: list[Frame]) -> list[int]:
    """The ``seq`` of every event frame, in arrival order."""
    return [f["seq"] for f in events_of(frames)]


def is_int(value: object) -> bool:
    """A JSON integer (not a bool)."""
    return isinstance(value, int) and not isinstance(value, bool)


def assert_envelope(event: Frame, run_id: str, thread_id: str) -> None:
    """Type-check an event's envelope fields one by one."""
    assert isinstance(event["type"], str)
    assert is_int(event["seq"]), event
    assert event["seq"] >= 1, event
    assert event["run_id"] == run_id
    assert event["thread_id"] == thread_id
    ts = event["ts"]
    assert isinstance(ts, float | int), event
    assert not isinstance(ts, bool), event
    assert math.isfinite(ts), event
    assert ts > 1_600_000_000, event
    assert isinstance(event["trace_id"], str), event
    assert HEX32.fullmatch(event["trace_id"]), event
    assert isinstance(event["span_id"], str), event
    assert HEX16.fullmatch(event["span_id"]), event
    assert isinstance(event["data"], dict), event


def assert_gap_free(frames: list[Frame]) -> list[int]:
    """Events continue exactly from ``session_ready.last_seq`` (or ``after_seq``), +1 each time."""
    ready = frames[0]
    assert ready["type"] == "session_ready"
    after_seq = ready.get("after_seq")
    start: int = (ready["last_seq"] if after_seq is None else after_seq) + 1
    got = seqs(frames)
    assert got == list(range(start, start + len(got))), f"seq not gap-free: {got[:20]}..."
    return got


def abort(stream: trio.SocketStream) -> None:
    """Arm an abortive close: the next close sends a TCP RST instead of a FIN."""
    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


@asynccontextmanager
async def connect_abortable(url: str) -> AsyncIterator[tuple[WsClient, trio.SocketStream]]:
    """Like ``wsclient.connect`` (ws:// only) but also hands out the TCP stream, to abort it."""
    parts = urlsplit(url)
    assert parts.scheme == "ws"
    assert parts.hostname
    assert parts.port
    stream = await trio.open_tcp_stream(parts.hostname, parts.port)
    try:
        async with stream, trio.open_nursery() as nursery:
            try:
                ws = await trio_websocket.wrap_client_stream(
                    nursery,
                    stream,
                    parts.netloc,
                    f"{parts.path}?{parts.query}",
                    message_queue_size=1,
                )
                try:
                    yield WsClient(ws), stream
                finally:
                    with trio.CancelScope(shield=True), trio.move_on_after(5):
                        await ws.aclose()
            finally:
                await trio.aclose_forcefully(stream)
                # The socket is gone: trio-websocket's reader may still be parked on its
                # full message queue (size 1), which closing does not wake.
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise


class Relay:
    """A TCP relay in front of the server, playing the network: it can cut every connection.

    The first connection relays only ``first_budget`` bytes from the server to the
    client, then holds the rest back (``budget_spent`` is set), so a test knows the
    client cannot have seen the end of the stream when it cuts the line. Later
    connections relay everything.
    """

    def __init__(self, target_port: int, first_budget: int) -> None:
        self.target_port = target_port
        self.first_budget = first_budget
        self.port = 0
        self.connections = 0
        self.budget_spent = trio.Event()
        self._scopes: list[trio.CancelScope] = []

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        try:
            self.port = listeners[0].socket.getsockname()[1]
            task_status.started()
            await trio.serve_listeners(self._relay, listeners)
        finally:
            with trio.CancelScope(shield=True):
                for listener in listeners:
                    await trio.aclose_forcefully(listener)

    def sever(self) -> None:
        """Cut every open relayed connection at once (TCP RST to both ends)."""
        for scope in self._scopes:
            scope.cancel()

    async def _relay(self, client_side: trio.SocketStream) -> None:
        budget = self.first_budget if self.connections == 0 else None
        self.connections += 1
        scope = trio.CancelScope()
        self._scopes.append(scope)
        server_side: trio.SocketStream | None = None
        try:
            with scope:
                server_side = await trio.open_tcp_stream("127.0.0.1", self.target_port)
                async with trio.open_nursery() as pumps:
                    pumps.start_soon(self._pump, client_side, server_side, None, pumps.cancel_scope)
                    pumps.start_soon(
                        self._pump, server_side, client_side, budget, pumps.cancel_scope
                    )
        finally:
            # Shielded: an outer cancellation must not leave the second socket open.
            with trio.CancelScope(shield=True):
                for stream in (client_side, server_side):
                    if stream is not None:
                        with contextlib.suppress(OSError):
                            abort(stream)
                        await trio.aclose_forcefully(stream)

    async def _pump(
        self,
        source: trio.SocketStream,
        sink: trio.SocketStream,
        budget: int | None,
        both: trio.CancelScope,
    ) -> None:
        try:
            while data := await source.receive_some(65536):
                if budget is not None:
                    data = data[:budget]
                    budget -= len(data)
                await sink.send_all(data)
                if budget == 0:
                    self.budget_spent.set()
                    await trio.sleep_forever()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        both.cancel()


async def receive_until_terminals(client: WsClient, run_ids: list[str]) -> None:
    """Receive until every run of ``run_ids`` has had its terminal event."""
    for run_id in run_ids:
        await client.until_terminal(run_id)


async def receive_until_pong(client: WsClient) -> list[Frame]:
    """Send ``ping``; the frames received up to and including its ``pong``."""
    await client.send({"type": "ping"})
    return await client.receive_until(lambda f: f["type"] == "pong")


class Barrier:
    """All ``parties`` tasks wait until each has arrived (the real clock is never consulted)."""

    def __init__(self, parties: int) -> None:
        self.parties = parties
        self.arrived = 0
        self.event = trio.Event()

    async def wait(self) -> None:
        self.arrived += 1
        if self.arrived == self.parties:
            self.event.set()
        await self.event.wait()


# --- 1. every critical event, with its fields, in order -------------------------------------


async def test_tool_run_delivers_every_critical_event_with_its_fields_in_order(
    live_server: Any,
) -> None:
    """A tool-using run delivers all five critical events, typed fields, legal order, gap-free seq."""
    with trio.fail_after(BOUND):
        async with connect(live_server.url_for("alice")) as client:
            ready = await client.ready()
            accepted, events = await client.run(CALC, client_msg_id="m-1", thread_id="main")
            await receive_until_pong(client)

    report = check_lifecycle(client.raw)
    assert_gap_free(client.frames)
    assert ready["user_id"] == "alice"
    assert isinstance(ready["session_id"], str)
    run_id = accepted["run_id"]
    assert isinstance(run_id, str)
    assert run_id
    assert accepted["thread_id"] == "main"
    assert accepted["client_msg_id"] == "m-1"
    assert list(report.runs) == [run_id]
    assert report.runs[run_id].terminal == "agent_completed"
    assert events == events_of(client.frames), "an event of another run arrived"

    types = [e["type"] for e in events]
    for kind in CRITICAL_EVENTS:
        assert kind in types, f"{kind} missing from {types}"
    # The legal order, explicitly: started first, reasoning before the tool, the tool's
    # executing before its completion, completion last and once.
    assert types[0] == "agent_started"
    assert types[-1] == "agent_completed"
    assert types.count("agent_started") == 1
    assert types.count("agent_completed") == 1
    assert (
        types.index("agent_thinking")
        < types.index("tool_executing")
        < types.index("tool_completed")
    )
    assert not set(types) - {
        "agent_started",
        "agent_thinking",
        "tool_executing",
        "tool_completed",
        "partial_result",
        "agent_completed",
    }

    for event in events:
        assert_envelope(event, run_id, "main")
    assert len({e["trace_id"] for e in events}) == 1

    started = of_type(events, "agent_started")[0]["data"]
    assert isinstance(started["agent_name"], str)
    assert started["agent_name"]
    assert isinstance(started["user_id"], str)
    assert started["user_id"] == "alice"
    assert isinstance(started["text"], str)
    assert started["text"] == CALC
    assert isinstance(started["client_msg_id"], str)
    assert started["client_msg_id"] == "m-1"

    for thinking in of_type(events, "agent_thinking"):
        assert isinstance(thinking["data"]["reasoning"], str)
        assert thinking["data"]["reasoning"]
        assert is_int(thinking["data"]["step"])
        assert thinking["data"]["step"] >= 0

    (executing,) = of_type(events, "tool_executing")
    (completed,) = of_type(events, "tool_completed")
    call_id = executing["data"]["call_id"]
    assert isinstance(call_id, str)
    assert call_id
    assert isinstance(executing["data"]["tool_name"], str)
    assert executing["data"]["tool_name"] == "calculator"
    assert isinstance(executing["data"]["parameters"], dict)
    assert executing["data"]["parameters"] == {"expression": "2+3*4"}
    assert isinstance(completed["data"]["call_id"], str)
    assert completed["data"]["call_id"] == call_id
    assert isinstance(completed["data"]["tool_name"], str)
    assert completed["data"]["tool_name"] == "calculator"
    assert isinstance(completed["data"]["status"], str)
    assert completed["data"]["status"] == "ok"
    assert is_int(completed["data"]["results"])
    assert completed["data"]["results"] == 14
    duration = completed["data"]["duration_ms"]
    assert isinstance(duration, int | float)
    assert not isinstance(duration, bool)
    assert math.isfinite(duration)
    assert duration >= 0
    assert "error" not in completed["data"]
    # Tool events carry the tool call's own span, a child of the run's.
    assert executing["span_id"] == completed["span_id"] != started_span(events)

    for partial in of_type(events, "partial_result"):
        assert isinstance(partial["data"]["text"], str)

    done = events[-1]["data"]
    assert isinstance(done["status"], str)
    assert done["status"] == "ok"
    assert isinstance(done["final_response"], str)
    assert "14" in done["final_response"]
    assert done["final_response"] == "".join(
        p["data"]["text"] for p in of_type(events, "partial_result")
    )


def started_span(events: list[Frame]) -> str:
    """The run's own span id (that of its ``agent_started``)."""
    span: str = of_type(events, "agent_started")[0]["span_id"]
    return span


# --- 2. isolation: 150 users at once ---------------------------------------------------------

USERS = 150
MIX = ("stream 20", CALC, "fail")


async def test_150_concurrent_users_each_receive_only_their_own_complete_streams(
    make_config: Callable[..., Config],
) -> None:
    """150 users on 150 sockets start runs at once; no event reaches another user, every stream is complete."""
    config = make_config(
        max_connections=2 * USERS + 10,
        rate_limit=1000.0,
        rate_burst=1000,
        heartbeat_interval=QUIET_HEARTBEAT,
    )
    clients: dict[str, WsClient] = {}
    accepted: dict[str, list[Frame]] = {}
    texts: dict[str, tuple[str, ...]] = {}
    all_ready, all_done = Barrier(USERS), Barrier(USERS)

    async def user(index: int) -> None:
        name = f"user-{index:03d}"
        texts[name] = (MIX[index % 3], MIX[(index + 1) % 3])
        async with connect(server.url_for(name)) as client:
            clients[name] = client
            await client.ready()
            await all_ready.wait()  # every user is connected: start all runs at once
            accepted[name] = [
                await client.start(text, thread_id=f"t{k}") for k, text in enumerate(texts[name])
            ]
            await receive_until_terminals(client, [a["run_id"] for a in accepted[name]])
            await all_done.wait()  # keep listening until every user's runs have ended
            await receive_until_pong(client)

    with trio.fail_after(HEAVY_BOUND):
        async with served(config) as server, trio.open_nursery() as nursery:
            for index in range(USERS):
                nursery.start_soon(user, index)

    assert len(clients) == USERS
    owner = {a["run_id"]: name for name, runs in accepted.items() for a in runs}
    assert len(owner) == 2 * USERS, "run ids are not unique across users"
    sessions = {c.frames[0]["session_id"] for c in clients.values()}
    assert len(sessions) == USERS, "two users share a session"
    traces: dict[str, str] = {}
    delivered = 0
    for name, client in clients.items():
        report = check_lifecycle(client.raw)
        assert_gap_free(client.frames)
        assert client.frames[0]["user_id"] == name
        mine = {a["run_id"] for a in accepted[name]}
        events = events_of(client.frames)
        strangers = [e for e in events if e["run_id"] not in mine]
        assert not strangers, (
            f"{name} received events of {[owner.get(e['run_id']) for e in strangers]}"
        )
        assert set(report.runs) == mine
        for started in of_type(events, "agent_started"):
            assert started["data"]["user_id"] == name
        for run in accepted[name]:
            run_events = events_of(client.frames, run["run_id"])
            text = texts[name][int(run["thread_id"][1:])]
            assert run_events[0]["data"]["text"] == text
            assert [e["type"] for e in run_events].count("agent_completed") == 1
            assert is_terminal(run_events[-1])
            if text == "stream 20":
                assert len(of_type(run_events, "partial_result")) == 20
            elif text == CALC:
                assert "14" in run_events[-1]["data"]["final_response"]
            else:
                assert of_type(run_events, "tool_completed")[0]["data"]["status"] == "error"
        for event in events:
            assert traces.setdefault(event["trace_id"], name) == name, "a trace spans two users"
        assert [f["type"] for f in client.frames if "seq" not in f].count("run_accepted") == 2
        delivered += len(events)
    assert delivered > USERS * 20


# --- 3. load: 50 connections x 123 events ----------------------------------------------------

LOAD_CONNECTIONS = 50
PIECES = 120
#: agent_started, one agent_thinking, 120 partial_result, agent_completed.
EXPECTED_TYPES = [
    "agent_started",
    "agent_thinking",
    *["partial_result"] * PIECES,
    "agent_completed",
]


async def test_50_connections_each_receive_all_123_events_exactly_once(
    make_config: Callable[..., Config],
) -> None:
    """50 concurrent sockets each get every event of their 'stream 120' run: exact count, no loss, no duplicate."""
    config = make_config(
        max_connections=LOAD_CONNECTIONS + 10,
        rate_limit=1000.0,
        rate_burst=1000,
        heartbeat_interval=QUIET_HEARTBEAT,
    )
    clients: dict[str, WsClient] = {}
    run_ids: dict[str, str] = {}
    all_ready = Barrier(LOAD_CONNECTIONS)

    async def reader(index: int) -> None:
        name = f"load-{index:02d}"
        async with connect(server.url_for(name)) as client:
            clients[name] = client
            await client.ready()
            await all_ready.wait()
            accepted = await client.start(f"stream {PIECES}")
            run_ids[name] = accepted["run_id"]
            await client.until_terminal(accepted["run_id"])
            await receive_until_pong(client)

    with trio.fail_after(HEAVY_BOUND):
        async with served(config) as server:
            # One run first, to see its shape rather than trust a hard-coded count.
            async with connect(server.url_for("probe")) as probe:
                await probe.ready()
                _, probe_events = await probe.run(f"stream {PIECES}")
            check_lifecycle(probe.raw)
            assert [e["type"] for e in probe_events] == EXPECTED_TYPES
            async with trio.open_nursery() as nursery:
                for index in range(LOAD_CONNECTIONS):
                    nursery.start_soon(reader, index)

    assert len(clients) == LOAD_CONNECTIONS
    total = 0
    for name, client in clients.items():
        report = check_lifecycle(client.raw)
        events = events_of(client.frames)
        assert report.events == len(events) == len(EXPECTED_TYPES)
        assert assert_gap_free(client.frames) == list(range(1, len(EXPECTED_TYPES) + 1))
        assert len({e["seq"] for e in events}) == len(events), "duplicate seq"
        assert [e["type"] for e in events] == EXPECTED_TYPES
        assert {e["run_id"] for e in events} == {run_ids[name]}
        assert [e["data"]["text"] for e in of_type(events, "partial_result")] == [
            f"t{i} " for i in range(PIECES)
        ]
        total += len(events)
    assert total == LOAD_CONNECTIONS * len(EXPECTED_TYPES)


# --- 4. reconnect: exact missing suffix after an abrupt drop ---------------------------------

STREAMED = 2000
SEEN_BEFORE_DROP = 300


async def test_abrupt_drop_then_after_seq_reconnect_gets_exactly_the_missing_suffix(
    live_server: Any,
) -> None:
    """A client that resets its TCP socket mid 'stream 2000' reconnects with after_seq and gets exactly the rest."""
    with trio.fail_after(BOUND):
        async with connect_abortable(live_server.url_for("alice")) as (first, stream):
            ready = await first.ready()
            session_id = ready["session_id"]
            streaming = (await first.start(f"stream {STREAMED}", thread_id="a"))["run_id"]
            # A second run that is certainly still active after the reconnect: its end is live.
            sleeping = (await first.start("sleep 30", thread_id="b"))["run_id"]
            await first.until_event(sleeping, lambda f: f["type"] == "tool_executing")
            await first.receive_until(lambda f: len(first.events(streaming)) >= SEEN_BEFORE_DROP)
            last = first.events()[-1]["seq"]
            abort(stream)
            await trio.aclose_forcefully(stream)  # TCP RST: no close frame, nothing more read

        query = urlencode({"after_seq": last, "session_id": session_id})
        async with connect(f"{live_server.url_for('alice')}&{query}") as second:
            resumed = await second.ready()
            await second.until_terminal(streaming)
            await second.send({"type": "cancel", "run_id": sleeping})
            await second.until_terminal(sleeping)
            await receive_until_pong(second)

    assert not is_terminal(first.events()[-1]), "the drop was not in the middle of the run"
    assert resumed["session_id"] == session_id
    assert resumed["after_seq"] == last
    joined_at = resumed["last_seq"]
    assert joined_at > last, "nothing was emitted while the client was away"
    assert not of_type(second.frames, "resume_gap")
    assert not of_type(second.frames, "error")
    # One logical stream: the checker sees the first connection, then the resumed one.
    report = check_lifecycle([*first.raw, *second.raw])
    before, after = seqs(first.frames), seqs(second.frames)
    final = after[-1]
    assert before == list(range(1, last + 1))
    assert after == list(range(last + 1, final + 1)), "the resumed stream is not exactly the suffix"
    assert after[-1] > joined_at, "no live event after the replayed suffix"
    everything = events_of(first.frames) + events_of(second.frames)
    streamed = [e for e in everything if e["run_id"] == streaming]
    assert [e["type"] for e in streamed] == [
        "agent_started",
        "agent_thinking",
        *["partial_result"] * STREAMED,
        "agent_completed",
    ]
    assert [e["data"]["text"] for e in of_type(streamed, "partial_result")] == [
        f"t{i} " for i in range(STREAMED)
    ]
    assert report.runs[streaming].terminal == "agent_completed"
    assert report.runs[sleeping].terminal == "agent_cancelled"
    assert [e["type"] for e in everything].count("agent_cancelled") == 1


async def test_client_library_resumes_automatically_after_the_line_is_cut(live_server: Any) -> None:
    """netra_actors.client, cut off mid 'stream 2000', reconnects by itself and yields every event exactly once."""
    relay = Relay(live_server.port, first_budget=64 * 1024)  # far less than the run's ~500 KB
    frames: list[Frame] = []
    with trio.fail_after(BOUND):
        async with trio.open_nursery() as nursery:
            await nursery.start(relay.run)
            url = f"ws://127.0.0.1:{relay.port}/ws"
            async with client_connect(url, live_server.token("alice"), max_backoff=0.2) as client:
                message_id = await client.send_message(f"stream {STREAMED}")
                run_id: str | None = None
                cut = False
                async with aclosing(client.frames()) as stream:
                    async for frame in stream:
                        validate_server_frame(frame)
                        frames.append(frame)
                        if frame["type"] == "run_accepted" and frame["client_msg_id"] == message_id:
                            run_id = frame["run_id"]
                        if not cut and len(events_of(frames)) >= 1:
                            # The relay has held back the rest of the stream: cut the line.
                            await relay.budget_spent.wait()
                            relay.sever()
                            cut = True
                        if run_id is not None and is_terminal(frame, run_id):
                            break
                after = await client.run(CALC)
                connections = client.connections
            nursery.cancel_scope.cancel()

    assert run_id is not None
    assert connections == 2
    assert relay.connections == 2
    readies = of_type(frames, "session_ready")
    assert len(readies) == 2, "expected exactly one reconnection"
    assert readies[1]["session_id"] == readies[0]["session_id"]
    resumed_after = readies[1]["after_seq"]
    assert frames.index(readies[1]) < len(frames) - 1, "the run ended before the line was cut"
    assert not of_type(frames, "resume_gap")
    report = check_lifecycle(frames)
    events = events_of(frames)
    assert seqs(frames) == list(range(1, len(events) + 1)), "lost or duplicated events"
    assert 1 <= resumed_after < events[-1]["seq"]
    assert [e["type"] for e in events] == [
        "agent_started",
        "agent_thinking",
        *["partial_result"] * STREAMED,
        "agent_completed",
    ]
    assert [e["data"]["text"] for e in of_type(events, "partial_result")] == [
        f"t{i} " for i in range(STREAMED)
    ]
    assert report.runs[run_id].terminal == "agent_completed"
    # The resumed connection keeps working: the next run continues the same stream.
    check_lifecycle([*frames, *after], first_seq=None)
    assert after[0]["seq"] == events[-1]["seq"] + 1
    assert after[-1]["type"] == "agent_completed"
    for frame in after:
        validate_server_frame(frame)


# --- 5. faults: one terminal, nothing after, the connection stays usable ---------------------


def _tool_failure(events: list[Frame]) -> None:
    (completed,) = of_type(events, "tool_completed")
    assert completed["data"]["status"] == "error"
    assert completed["data"]["error"]["type"] == "tool_error"
    assert isinstance(completed["data"]["error"]["message"], str)
    assert events[-1]["type"] == "agent_completed"


def _agent_crash(events: list[Frame]) -> None:
    assert events[-1]["type"] == "agent_error"
    assert events[-1]["data"]["error"]["type"] == "agent_error"
    assert isinstance(events[-1]["data"]["error"]["message"], str)


def _llm_failure(events: list[Frame]) -> None:
    assert events[-1]["type"] == "agent_error"
    assert events[-1]["data"]["error"]["type"] == "llm_error"
    assert isinstance(events[-1]["data"]["error"]["message"], str)


def _cancelled(events: list[Frame]) -> None:
    (completed,) = of_type(events, "tool_completed")
    assert completed["data"]["status"] == "cancelled"
    assert completed["data"]["error"]["type"] == "cancelled"
    assert events.index(completed) == len(events) - 2
    assert events[-1]["type"] == "agent_cancelled"
    assert events[-1]["data"]["reason"] == "client"


@pytest.mark.parametrize(
    ("text", "cancel", "expect"),
    [
        pytest.param("fail", False, _tool_failure, id="tool_failure"),
        pytest.param("crash", False, _agent_crash, id="agent_crash"),
        pytest.param("llm fail", False, _llm_failure, id="llm_failure"),
        pytest.param("sleep 30", True, _cancelled, id="cancellation"),
    ],
)
async def test_fault_gives_exactly_one_terminal_and_the_connection_survives(
    live_server: Any, text: str, cancel: bool, expect: Callable[[list[Frame]], None]
) -> None:
    """A failing or cancelled run ends with exactly one terminal event, nothing follows it, the socket keeps working."""
    with trio.fail_after(BOUND):
        async with connect(live_server.url_for("alice")) as client:
            await client.ready()
            run_id = (await client.start(text))["run_id"]
            if cancel:
                await client.until_event(run_id, lambda f: f["type"] == "tool_executing")
                await client.send({"type": "cancel", "run_id": run_id})
            events = await client.until_terminal(run_id)
            terminal_at = len(client.frames)
            between = await receive_until_pong(client)
            _, later = await client.run(CALC)
            await receive_until_pong(client)

    assert not events_of(between, run_id), f"events after the terminal: {between}"
    check_lifecycle(client.raw)
    assert_gap_free(client.frames)
    expect(events)
    assert events[0]["type"] == "agent_started"
    terminals = [e for e in events_of(client.frames, run_id) if e["type"] in TERMINAL_EVENTS]
    assert terminals == [events[-1]]
    assert not events_of(client.frames[terminal_at:], run_id)
    assert not of_type(client.frames, "error"), "a valid cancel must get no reply"
    assert later[-1]["type"] == "agent_completed"
    assert "14" in later[-1]["data"]["final_response"]


# --- 6. several tabs of one user -------------------------------------------------------------

TABS = 3
TAB_RUNS = (CALC, "stream 20", "fail")


async def test_three_tabs_of_one_user_receive_byte_identical_streams(live_server: Any) -> None:
    """Three connections of one user each get the same event frames, byte for byte, of runs started from any tab."""
    tabs: list[WsClient] = []
    run_ids: list[str] = []
    accepted: list[list[Frame]] = [[] for _ in range(TABS)]
    all_ready, all_started = Barrier(TABS), Barrier(TABS)

    async def tab(index: int, client: WsClient) -> None:
        await client.ready()
        await all_ready.wait()
        run = await client.start(TAB_RUNS[index], thread_id=f"tab{index}")
        accepted[index].append(run)
        run_ids.append(run["run_id"])
        await all_started.wait()
        await receive_until_terminals(client, run_ids)
        await receive_until_pong(client)

    with trio.fail_after(BOUND):
        async with (
            connect(live_server.url_for("alice")) as tab0,
            connect(live_server.url_for("alice")) as tab1,
            connect(live_server.url_for("alice")) as tab2,
            trio.open_nursery() as nursery,
        ):
            tabs.extend((tab0, tab1, tab2))
            for index, client in enumerate(tabs):
                nursery.start_soon(tab, index, client)

    assert len(set(run_ids)) == TABS
    reference = tabs[0].raw_events()
    assert len(reference) > 20 + 2 * 5
    for index, client in enumerate(tabs):
        report = check_lifecycle(client.raw)
        assert_gap_free(client.frames)
        assert set(report.runs) == set(run_ids)
        assert all(run.terminal is not None for run in report.runs.values())
        assert client.raw_events() == reference, f"tab {index} differs from tab 0"
        # Replies go to the sending tab only.
        assert of_type(client.frames, "run_accepted") == accepted[index]
    assert len({c.frames[0]["session_id"] for c in tabs}) == 1
    assert {c.frames[0]["last_seq"] for c in tabs} == {0}


# --- 7. the client library's clean close survives a racing server heartbeat ------------------
# (trio-websocket 0.12.2 answers pings while closing, upstream issue #184; the client guards.)


async def test_client_library_close_survives_a_racing_heartbeat_ping(
    make_config: Callable[..., Config],
) -> None:
    """netra_actors.client leaves cleanly even when a server heartbeat ping races its close."""
    # A 1 ms heartbeat makes the race (ping in flight while the client closes) likely at once.
    config = make_config(heartbeat_interval=0.001, heartbeat_timeout=BOUND)
    failure: LocalProtocolError | None = None
    with trio.fail_after(BOUND):
        async with served(config) as server:
            for _ in range(30):
                try:
                    async with client_connect(server.url(), server.token("alice")) as client:
                        events = await client.run("hello")
                except LocalProtocolError as exc:
                    failure = exc
                    break
                for frame in events:
                    validate_server_frame(frame)
                check_lifecycle(events)
                assert events[-1]["type"] == "agent_completed"
    assert failure is None, f"close raised {failure!r}"
