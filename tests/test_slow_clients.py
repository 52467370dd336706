"""Slow, stalled and silent clients: a connection that does not keep up never slows another
connection or another user; it is closed (4008) or aborted (1006) as documented, while a
single slow reader paces the producer and loses nothing.

A stalled client is played on the memory transport with ``memory_transport_pair(capacity=1)``
and a client end nobody reads; a silent peer with ``client_end.answers_pings = False``.
Virtual time throughout (``autojump_clock``); the only time assertions are virtual-time bounds.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
from collections.abc import Callable, Iterable, Mapping
from functools import partial
from typing import Any

import attrs
import pytest
import trio
import trio.testing
import trio_websocket
from strategies import Frame, MemoryClient, is_event, is_terminal, of_type

from netra_actors import (
    Config,
    MemoryTransport,
    Runtime,
    TransportClosed,
    TrioWebSocketTransport,
    memory_transport_pair,
)
from netra_actors._connection import Connection
from netra_actors.testing import check_lifecycle

#: Virtual seconds; every test here needs far less.
BOUND = 600


@attrs.define
class Served:
    """The server side of one connection: how and when ``serve_connection`` returned."""

    connection: Connection | None = None
    ended_at: float | None = None
    done: trio.Event = attrs.field(factory=trio.Event)

    @property
    def close_code(self) -> int | None:
        return self.connection.close_code if self.connection is not None else None


async def _serve(
    runtime: Runtime, user_id: str, server_end: MemoryTransport, served: Served
) -> None:
    served.connection = await runtime.serve_connection(user_id, server_end)
    served.ended_at = trio.current_time()
    served.done.set()


def raw_connection(
    nursery: trio.Nursery, runtime: Runtime, user_id: str, *, capacity: int = 256
) -> tuple[MemoryTransport, Served]:
    """A connection whose client end the test drives by hand (it may never read it)."""
    server_end, client_end = memory_transport_pair(capacity)
    served = Served()
    nursery.start_soon(_serve, runtime, user_id, server_end, served)
    return client_end, served


async def open_client(
    nursery: trio.Nursery, runtime: Runtime, user_id: str, *, capacity: int = 256
) -> tuple[MemoryClient, Served]:
    """A reading client (``MemoryClient``) and its server side, after ``session_ready``."""
    client_end, served = raw_connection(nursery, runtime, user_id, capacity=capacity)
    client = MemoryClient(client_end, user_id)
    nursery.start_soon(client.read_forever)
    await client.wait_for(lambda f: True)
    assert client.session_ready["user_id"] == user_id
    return client, served


async def drain(transport: MemoryTransport) -> tuple[list[Frame], int | None]:
    """Everything still buffered for the client, then the close code."""
    frames: list[Frame] = []
    while True:
        try:
            frames.append(json.loads(await transport.receive()))
        except TransportClosed as exc:
            return frames, exc.code


async def send(transport: MemoryTransport, **frame: Any) -> None:
    await transport.send_text(json.dumps(frame))


def seqs(frames: Iterable[Mapping[str, Any]]) -> list[int]:
    return [f["seq"] for f in frames if is_event(f)]


def pieces(frames: Iterable[Mapping[str, Any]], run_id: str) -> list[str]:
    return [
        f["data"]["text"]
        for f in frames
        if f.get("type") == "partial_result" and f["run_id"] == run_id
    ]


def stream_texts(count: int) -> list[str]:
    """The pieces the demo's "stream N" sends."""
    return [f"t{i} " for i in range(count)]


# --- a stalled tab -------------------------------------------------------------------------------


async def test_stalled_tab_does_not_slow_another_tab_or_another_user(
    make_config: Callable[..., Config], autojump_clock: trio.testing.MockClock
) -> None:
    """A never-read tab: the other tab gets all of "stream 2000" at once, bob is untouched, the stalled tab is aborted (1006) after send_timeout."""
    config = make_config(window_events=50, send_timeout=30)
    with trio.fail_after(BOUND):
        async with trio.open_nursery() as nursery, Runtime(config) as runtime:
            start = trio.current_time()
            stalled, stalled_served = raw_connection(nursery, runtime, "alice", capacity=1)
            tab, _ = await open_client(nursery, runtime, "alice")
            bob, _ = await open_client(nursery, runtime, "bob")
            alice_run = await tab.user_message("stream 2000")
            bob_run = await bob.user_message("stream 300")
            await tab.wait_terminal(alice_run)
            await bob.wait_terminal(bob_run)
            finished = trio.current_time()
            # The stalled tab is still open: nothing waited for it.
            assert not stalled_served.done.is_set()
            stats = runtime.session_statistics("alice")
            assert stats is not None
            assert stats.window_events <= 50
            await stalled_served.done.wait()
            stalled_frames, stalled_code = await drain(stalled)
            await tab.close()
            await bob.close()

    assert finished - start < config.send_timeout
    # Never read: its writer is stuck in a send, so it never gets to notice it lags (4008);
    # the send makes no progress for send_timeout and the connection is aborted.
    assert stalled_served.close_code == 1006
    assert stalled_code == 1006
    assert stalled_served.ended_at is not None
    assert stalled_served.ended_at - start == pytest.approx(config.send_timeout, abs=0.01)
    assert [f["type"] for f in stalled_frames] == ["session_ready"]

    report = check_lifecycle(tab.frames)
    assert report.runs[alice_run].terminal == "agent_completed"
    assert len(tab.events) == 2003
    assert pieces(tab.frames, alice_run) == stream_texts(2000)
    bob_report = check_lifecycle(bob.frames)
    assert bob_report.runs.keys() == {bob_run}
    assert pieces(bob.frames, bob_run) == stream_texts(300)
    assert seqs(bob.frames) == list(range(1, 304))


async def test_slowly_reading_tab_falls_out_of_the_window_and_gets_4008(
    make_config: Callable[..., Config], autojump_clock: trio.testing.MockClock
) -> None:
    """A tab reading one frame a second while another tab reads fast: closed 4008 once its next event left the window; resume then gets resume_gap."""
    config = make_config(window_events=50, send_timeout=30)
    with trio.fail_after(BOUND):
        async with trio.open_nursery() as nursery, Runtime(config) as runtime:
            slow, slow_served = raw_connection(nursery, runtime, "alice", capacity=1)
            tab, _ = await open_client(nursery, runtime, "alice")
            run_id = await tab.user_message("stream 2000")
            await tab.wait_terminal(run_id)
            slow_frames: list[Frame] = []
            while True:
                try:
                    slow_frames.append(json.loads(await slow.receive()))
                except TransportClosed as exc:
                    slow_code = exc.code
                    break
                await trio.sleep(1)
            closed_at = trio.current_time()
            await slow_served.done.wait()
            last = max(seqs(slow_frames), default=0)
            again = await open_client_resuming(nursery, runtime, last, slow_frames[0]["session_id"])
            await trio.testing.wait_all_tasks_blocked()
            await again.close()
            await tab.close()

    assert slow_code == 4008
    assert slow_served.close_code == 4008
    # Closed by the lag check as soon as its writer looked again (after the frames it
    # already had in hand, one a second), not aborted by send_timeout (1006).
    assert closed_at <= len(slow_frames) + 1
    got = seqs(slow_frames)
    assert got == list(range(1, len(got) + 1))
    assert 0 < len(got) < 2003
    check_lifecycle(slow_frames, require_terminal=False)
    check_lifecycle(tab.frames)
    assert pieces(tab.frames, run_id) == stream_texts(2000)
    # Its reconnection is told what was lost, then gets what is still kept.
    assert again.session_ready["after_seq"] == 1953  # oldest_seq - 1
    assert again.frames[1] == {
        "type": "resume_gap",
        "session_id": slow_frames[0]["session_id"],
        "oldest_seq": 2003 - 50 + 1,
        "last_seq": 2003,
    }
    assert seqs(again.frames) == list(range(1954, 2004))
    assert again.events == tab.events[-50:]


async def open_client_resuming(
    nursery: trio.Nursery, runtime: Runtime, after_seq: int, session_id: str
) -> MemoryClient:
    """A reading connection of alice that resumes after ``after_seq`` of stream ``session_id``."""
    server_end, client_end = memory_transport_pair()
    client = MemoryClient(client_end, "alice")
    nursery.start_soon(
        partial(
            runtime.serve_connection,
            "alice",
            server_end,
            after_seq=after_seq,
            session_hint=session_id,
        )
    )
    nursery.start_soon(client.read_forever)
    await client.wait_for(lambda f: True)
    return client


# --- pacing --------------------------------------------------------------------------------------


async def test_a_single_slow_reader_paces_the_producer_and_loses_nothing(
    make_config: Callable[..., Config], autojump_clock: trio.testing.MockClock
) -> None:
    """One connection reading a frame per 10 ms: all 1000 pieces arrive, the producer waited, the window never exceeds window_events."""
    config = make_config(window_events=50)
    frames: list[Frame] = []
    window_sizes: list[int] = []
    with trio.fail_after(BOUND):
        async with trio.open_nursery() as nursery, Runtime(config) as runtime:
            client, served = raw_connection(nursery, runtime, "alice", capacity=1)
            frames.append(json.loads(await client.receive()))
            await send(client, type="user_message", text="stream 1000", client_msg_id="m1")
            while not (frames and is_terminal(frames[-1])):
                frames.append(json.loads(await client.receive()))
                stats = runtime.session_statistics("alice")
                assert stats is not None
                window_sizes.append(stats.window_events)
                await trio.sleep(0.01)
            stats = runtime.session_statistics("alice")
            assert stats is not None
            assert not served.done.is_set()
            await client.close()

    assert stats.paced_waits > 0
    assert max(window_sizes) <= 50
    accepted = of_type(frames, "run_accepted")
    assert len(accepted) == 1
    run_id = accepted[0]["run_id"]
    assert pieces(frames, run_id) == stream_texts(1000)
    assert seqs(frames) == list(range(1, 1004))
    assert check_lifecycle(frames).runs[run_id].terminal == "agent_completed"


async def test_with_no_connection_open_runs_are_not_paced(
    make_config: Callable[..., Config], autojump_clock: trio.testing.MockClock
) -> None:
    """The only connection closes right after run_accepted: "stream 1000" still completes at once, unpaced; a resume then gets resume_gap and the tail."""
    config = make_config(window_events=50)
    with trio.fail_after(BOUND):
        async with trio.open_nursery() as nursery, Runtime(config) as runtime:
            client, served = await open_client(nursery, runtime, "alice")
            run_id = await client.user_message("stream 1000")
            await client.close()
            await served.done.wait()
            closed_at = trio.current_time()
            at_close = runtime.session_statistics("alice")
            assert at_close is not None
            await trio.testing.wait_all_tasks_blocked()
            done = runtime.session_statistics("alice")
            assert done is not None
            assert trio.current_time() == closed_at  # no virtual time passed
            last_seen = max(seqs(client.frames), default=0)
            again = await open_client_resuming(
                nursery, runtime, last_seen, client.session_ready["session_id"]
            )
            await again.wait_terminal(run_id)
            await again.close()

    assert at_close.connections == 0
    assert at_close.last_seq < 1003, "the run had already finished when the connection closed"
    assert (done.active_runs, done.queued_runs, done.last_seq) == (0, 0, 1003)
    assert done.paced_waits == at_close.paced_waits
    assert done.window_events == 50
    check_lifecycle(client.frames, require_terminal=False)
    assert again.frames[1] == {
        "type": "resume_gap",
        "session_id": client.session_ready["session_id"],
        "oldest_seq": 954,
        "last_seq": 1003,
    }
    assert seqs(again.frames) == list(range(954, 1004))
    terminal = again.events[-1]
    assert terminal["type"] == "agent_completed"
    assert terminal["data"]["final_response"] == "".join(stream_texts(1000))
    assert pieces(again.frames, run_id) == stream_texts(1000)[-49:]


# --- heartbeat -----------------------------------------------------------------------------------


async def test_a_peer_that_stops_answering_pings_is_aborted(
    make_config: Callable[..., Config],
    autojump_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A peer that does not answer pings is aborted (client sees 1006) heartbeat_interval + heartbeat_timeout s after connecting; the server says why (connection attribute and an INFO log line)."""
    caplog.set_level(logging.INFO, logger="netra_actors.connection")
    config = make_config(heartbeat_interval=5, heartbeat_timeout=3)
    with trio.fail_after(BOUND):
        async with trio.open_nursery() as nursery, Runtime(config) as runtime:
            start = trio.current_time()
            server_end, client_end = memory_transport_pair()
            client_end.answers_pings = False
            client = MemoryClient(client_end, "alice")
            served = Served()
            nursery.start_soon(_serve, runtime, "alice", server_end, served)
            nursery.start_soon(client.read_forever)
            await client.closed.wait()
            closed_at = trio.current_time()
            await served.done.wait()

    assert client.close_code == 1006
    assert served.close_code == 1006
    assert closed_at - start == pytest.approx(5 + 3, abs=0.01)
    assert [f["type"] for f in client.frames] == ["session_ready"]
    assert served.connection is not None
    assert served.connection.close_reason == "no pong within 3 s"
    assert [r.getMessage() for r in caplog.records if "aborted (1006)" in r.getMessage()] == [
        f"connection {served.connection.connection_id} of user alice aborted (1006): "
        "no pong within 3 s"
    ]


async def test_a_responsive_peer_stays_connected_across_many_heartbeats(
    make_config: Callable[..., Config],
    autojump_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A peer that answers pings stays connected for 20 heartbeat intervals and is still served; its own close is not logged as the server's decision."""
    caplog.set_level(logging.INFO, logger="netra_actors.connection")
    config = make_config(heartbeat_interval=5, heartbeat_timeout=3)
    with trio.fail_after(BOUND):
        async with trio.open_nursery() as nursery, Runtime(config) as runtime:
            client, served = await open_client(nursery, runtime, "alice")
            await trio.sleep(100)
            assert not client.closed.is_set()
            assert not served.done.is_set()
            await client.send(type="ping")
            await client.wait_for(lambda f: f["type"] == "pong")
            run_id = await client.user_message("stream 20")
            await client.wait_terminal(run_id)
            stats = runtime.statistics()
            await client.close()

    assert stats.connections == 1
    assert check_lifecycle(client.frames).runs[run_id].terminal == "agent_completed"
    assert served.connection is not None
    assert served.connection.close_reason == ""
    assert not [r for r in caplog.records if r.name == "netra_actors.connection"]


async def test_a_client_reading_a_long_backlog_slowly_is_not_aborted_by_the_heartbeat(
    make_config: Callable[..., Config], autojump_clock: trio.testing.MockClock
) -> None:
    """A client that sends nothing while it reads a 1,000-event stream at 20 frames/s: each ping waits behind up to 256 queued frames (12.8 s of reading) against a 3 s pong timeout, but the peer keeps taking delivery, so it stays connected and gets every event in order."""
    config = make_config(heartbeat_interval=5, heartbeat_timeout=3, send_timeout=30)
    with trio.fail_after(BOUND):
        async with trio.open_nursery() as nursery, Runtime(config) as runtime:
            start = trio.current_time()
            client, served = raw_connection(nursery, runtime, "alice")
            await send(client, type="user_message", text="stream 1000")
            frames: list[Frame] = []
            while not (frames and is_terminal(frames[-1])):
                frames.append(json.loads(await client.receive()))
                await trio.sleep(0.05)
            read_for = trio.current_time() - start
            still_open = not served.done.is_set()
            await client.close()

    assert read_for > 5 * (5 + 3)  # several heartbeats came due while it read
    assert still_open
    assert served.connection is not None
    assert served.connection.close_reason == ""
    run_id = frames[-1]["run_id"]
    assert frames[-1]["type"] == "agent_completed"
    assert check_lifecycle(frames).runs[run_id].terminal == "agent_completed"
    assert pieces(frames, run_id) == stream_texts(1000)


async def test_a_peer_that_stops_reading_is_aborted_by_the_heartbeat_before_send_timeout(
    make_config: Callable[..., Config], autojump_clock: trio.testing.MockClock
) -> None:
    """A client that starts a long stream and never reads: its pipe fills, nothing more is delivered, so the ping queued behind it goes unanswered and the heartbeat aborts it (1006) at heartbeat_interval + heartbeat_timeout, well before send_timeout; the run completes."""
    config = make_config(heartbeat_interval=5, heartbeat_timeout=3, send_timeout=60)
    with trio.fail_after(BOUND):
        async with trio.open_nursery() as nursery, Runtime(config) as runtime:
            start = trio.current_time()
            client, served = raw_connection(nursery, runtime, "alice", capacity=16)
            await send(client, type="user_message", text="stream 1000")
            await served.done.wait()
            ended_at = served.ended_at
            frames, code = await drain(client)

    assert (served.close_code, code) == (1006, 1006)
    assert ended_at is not None
    assert ended_at - start == pytest.approx(5 + 3, abs=0.01)
    assert served.connection is not None
    assert served.connection.close_reason == "no pong within 3 s"
    assert len(frames) == 16
    assert [f["type"] for f in frames[:2]] == ["session_ready", "run_accepted"]


async def test_delivered_counts_the_bytes_the_peer_tcp_acknowledged() -> None:
    """``TrioWebSocketTransport.delivered`` over a real socket (127.0.0.1, small buffers): while the client reads nothing and the server's write is blocked, it stays below what was written; once the client has read every frame (and said so: its frame carries the TCP acknowledgement of all it read) it is the exact byte count of the frames sent."""
    frame, count = "x" * 65_536, 64
    wire_bytes = count * (10 + 65_536)  # an unmasked server frame: 10-byte header, payload
    served: list[TrioWebSocketTransport] = []
    after_reply: list[int | None] = []
    replied = trio.Event()

    async def handler(request: trio_websocket.WebSocketRequest) -> None:
        ws = await request.accept()
        ws._stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65_536)
        transport = TrioWebSocketTransport(ws)
        served.append(transport)
        for _ in range(count):
            await transport.send_text(frame)
        assert await ws.get_message() == "read them all"
        after_reply.append(transport.delivered())
        replied.set()
        with contextlib.suppress(trio_websocket.ConnectionClosed):
            await ws.get_message()

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            server = await nursery.start(
                partial(trio_websocket.serve_websocket, handler, "127.0.0.1", 0, ssl_context=None)
            )
            sock = trio.socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65_536)
            await sock.connect(("127.0.0.1", server.port))
            stream = trio.SocketStream(sock)
            try:
                ws = await trio_websocket.wrap_client_stream(
                    nursery, stream, "127.0.0.1", "/", message_queue_size=1
                )
                await trio.testing.wait_all_tasks_blocked()
                (transport,) = served
                stalled = transport.delivered()
                for _ in range(count):
                    assert await ws.get_message() == frame
                await ws.send_message("read them all")
                await replied.wait()
                await ws.aclose()
            finally:
                await stream.aclose()
            nursery.cancel_scope.cancel()

    assert stalled is not None
    assert 0 <= stalled < wire_bytes // 2
    assert after_reply == [wire_bytes]


# --- send stalls ---------------------------------------------------------------------------------


async def test_a_send_that_stalls_for_send_timeout_aborts_the_connection(
    make_config: Callable[..., Config], autojump_clock: trio.testing.MockClock
) -> None:
    """A client that never reads (capacity-1 pipe, big window so 4008 cannot come first) is aborted (1006) send_timeout s into the stall; its run completes."""
    config = make_config(send_timeout=7, heartbeat_interval=100)
    with trio.fail_after(BOUND):
        async with trio.open_nursery() as nursery, Runtime(config) as runtime:
            start = trio.current_time()
            client, served = raw_connection(nursery, runtime, "alice", capacity=1)
            await send(client, type="user_message", text="stream 100")
            await served.done.wait()
            stats = runtime.session_statistics("alice")
            frames, code = await drain(client)

    assert served.close_code == 1006
    assert code == 1006
    assert served.ended_at is not None
    assert served.ended_at - start == pytest.approx(7, abs=0.01)
    assert [f["type"] for f in frames] == ["session_ready"]
    assert served.connection is not None
    assert served.connection.close_reason == "a write made no progress for 7 s"
    assert stats is not None
    assert (stats.active_runs, stats.last_seq) == (0, 103)


# --- too many pending replies ----------------------------------------------------------------


PING_CONFIG = {"rate_limit": 100_000.0, "rate_burst": 100_000, "send_timeout": 30.0}


async def test_replies_a_client_reads_late_are_all_delivered_below_the_limit(
    make_config: Callable[..., Config], autojump_clock: trio.testing.MockClock
) -> None:
    """250 pings sent without reading: read later, all 250 pongs arrive and the connection stays open."""
    with trio.fail_after(BOUND):
        async with trio.open_nursery() as nursery, Runtime(make_config(**PING_CONFIG)) as runtime:
            client, served = raw_connection(nursery, runtime, "alice", capacity=1)
            for _ in range(250):
                await send(client, type="ping")
            await trio.testing.wait_all_tasks_blocked()
            frames = [json.loads(await client.receive()) for _ in range(251)]
            await send(client, type="ping")
            frames.append(json.loads(await client.receive()))
            assert not served.done.is_set()
            await client.close()

    assert [f["type"] for f in frames] == ["session_ready"] + ["pong"] * 251


async def test_more_than_256_pending_replies_end_the_connection_at_once(
    make_config: Callable[..., Config], autojump_clock: trio.testing.MockClock
) -> None:
    """300 pings from a client that never reads: the connection ends at once (aborted, its writer being stuck), not after send_timeout."""
    with trio.fail_after(BOUND):
        async with trio.open_nursery() as nursery, Runtime(make_config(**PING_CONFIG)) as runtime:
            start = trio.current_time()
            client, served = raw_connection(nursery, runtime, "alice", capacity=1)
            sent = 0
            with contextlib.suppress(TransportClosed):  # the server drops us mid-way
                for _ in range(300):
                    await send(client, type="ping")
                    sent += 1
            await served.done.wait()
    # The writer is stuck sending to a peer that reads nothing, so no close frame can
    # get through: the connection is aborted (1006) as soon as the overflow is seen.
    assert served.close_code == 1006
    assert served.ended_at is not None
    assert served.ended_at - start < 1.0
    assert sent > 256


# --- the reader always drains ------------------------------------------------------------------


async def test_a_blocked_writer_does_not_stop_the_reader_cancel_still_works(
    make_config: Callable[..., Config], autojump_clock: trio.testing.MockClock
) -> None:
    """While a connection's writer is blocked (client not reading), its cancel frame is still read and cancels the run."""
    config = make_config(send_timeout=60)
    with trio.fail_after(BOUND):
        async with trio.open_nursery() as nursery, Runtime(config) as runtime:
            observer, _ = await open_client(nursery, runtime, "alice")
            client, served = raw_connection(nursery, runtime, "alice", capacity=1)
            assert json.loads(await client.receive())["type"] == "session_ready"
            await send(client, type="user_message", text="sleep 30", client_msg_id="m1")
            accepted = json.loads(await client.receive())
            assert accepted["type"] == "run_accepted"
            run_id = accepted["run_id"]
            # From here on the client reads nothing: its writer blocks on the run's events.
            await observer.wait_event(run_id, "tool_executing")
            await trio.testing.wait_all_tasks_blocked()
            cancelled_at = trio.current_time()
            await send(client, type="cancel", run_id=run_id)
            await observer.wait_terminal(run_id)
            assert not served.done.is_set()
            await client.close()
            await observer.close()

    run = observer.run_events(run_id)
    times = observer.run_event_times(run_id)
    assert [f["type"] for f in run] == [
        "agent_started",
        "agent_thinking",
        "tool_executing",
        "tool_completed",
        "agent_cancelled",
    ]
    assert run[3]["data"]["status"] == "cancelled"
    assert run[-1]["data"]["reason"] == "client"
    assert times[-1] == cancelled_at < 30
    check_lifecycle(observer.frames)
