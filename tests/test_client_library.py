"""``netra_actors.client`` against a real server on 127.0.0.1: runs, refusals, automatic
resume after a dropped connection or a 4008, TLS, and a session torn down while away.

Real clock; every test is bounded by ``trio.fail_after`` and waits for frames or
events (a server ``Connection``'s ``done``), never for time. Every frame the
client yields is validated against docs/schemas, and every event stream goes
through ``check_lifecycle``.
"""

from __future__ import annotations

import socket
import ssl
import types
from collections.abc import Callable
from contextlib import aclosing
from typing import Any

import pytest
import trio
import trio_websocket
import trustme
from wsclient import Frame, Served, connect, is_terminal, served, validate_server_frame

import netra_actors.client
from netra_actors import AuthError, Config
from netra_actors.client import ClientClosed, NetraClient
from netra_actors.client import connect as client_connect
from netra_actors.testing import check_lifecycle

pytestmark = pytest.mark.network

#: Upper bound for every test; generous for a loaded machine, each takes about a second.
TIMEOUT = 30
CALC = "what is 2+3*4?"


def open_client(server: Served, user_id: str = "alice", **options: Any) -> Any:
    """``netra_actors.client.connect`` to ``server``'s /ws with a token for ``user_id``."""
    options.setdefault("max_backoff", 0.2)
    return client_connect(server.url(), server.token(user_id), **options)


async def frames_until(client: NetraClient, done: Callable[[Frame], bool]) -> list[Frame]:
    """Frames from ``client.frames()`` up to and including the first one ``done`` accepts.

    Each is validated against docs/schemas/server_frame.json.
    """
    received: list[Frame] = []
    async with aclosing(client.frames()) as frames:
        async for frame in frames:
            validate_server_frame(frame)
            received.append(frame)
            if done(frame):
                return received
    raise AssertionError(f"frames() ended early after {received[-3:]}")


def assert_no_silent_loss(frames: list[Frame]) -> list[int]:
    """Each seq once and increasing; a jump only right after a resume_gap naming its oldest_seq.

    Returns the seqs.
    """
    seqs: list[int] = []
    last_other: Frame | None = None
    for frame in frames:
        if "seq" not in frame:
            if frame["type"] != "session_ready":
                last_other = frame
            continue
        seq = frame["seq"]
        if seqs and seq != seqs[-1] + 1:
            assert seq > seqs[-1], f"seq {seq} after {seqs[-1]}: duplicate or reordered"
            assert last_other is not None
            assert last_other["type"] == "resume_gap", f"silent gap {seqs[-1]} -> {seq}"
            assert last_other["oldest_seq"] == seq
        elif not seqs:
            assert seq == 1
        seqs.append(seq)
        last_other = frame
    return seqs


# --- basics ---------------------------------------------------------------------------------------


async def test_run_returns_the_runs_lawful_events(make_config: Callable[..., Config]) -> None:
    """connect + run("what is 2+3*4?") returns a lawful event list ending agent_completed with 14."""
    with trio.fail_after(TIMEOUT):
        async with served(make_config()) as server, open_client(server) as client:
            events = await client.run(CALC)
            assert client.connections == 1
            assert client.user_id == "alice"
            assert client.last_seq == events[-1]["seq"]
    for frame in events:
        validate_server_frame(frame)
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert events[-1]["type"] == "agent_completed"
    assert "14" in events[-1]["data"]["final_response"]
    assert [e["data"]["results"] for e in events if e["type"] == "tool_completed"] == [14]
    report = check_lifecycle(events, first_seq=1)
    assert len(report.runs) == 1


#: ``connect()`` re-raises ``client._error`` inside its nursery, where ``_maintain`` (a child
#: task) raised the same exception: trio groups the two.
REFUSAL_RAISED_TWICE = (
    "bug: client.connect() raises client._error inside the nursery whose child _maintain "
    "raised it too, so a refused handshake comes out as ExceptionGroup([AuthError, AuthError]) "
    "(or two ClientClosed), not as the documented bare exception"
)


async def test_bad_token_raises_auth_error(make_config: Callable[..., Config]) -> None:
    """A token the server refuses (401) raises AuthError from connect, with no retry."""
    with trio.fail_after(TIMEOUT):
        async with served(make_config()) as server:
            with pytest.raises(AuthError):
                async with client_connect(server.url(), "not-a-token"):
                    pytest.fail("connected with a bad token")
            assert server.runtime.statistics().sessions == 0


async def test_unknown_path_raises_client_closed(make_config: Callable[..., Config]) -> None:
    """A 404 handshake (path other than /ws) raises ClientClosed from connect."""
    with trio.fail_after(TIMEOUT):
        async with served(make_config()) as server:
            url = server.url("/nope")
            with pytest.raises(ClientClosed, match="404"):
                async with client_connect(url, server.token("alice")):
                    pytest.fail("connected to /nope")


def tls_pair() -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """``(server context, client context)`` for 127.0.0.1, from a fresh trustme CA."""
    ca = trustme.CA()
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_tls)
    client_tls = ssl.create_default_context()
    ca.configure_trust(client_tls)
    return server_tls, client_tls


async def test_wss_with_trusted_ca(make_config: Callable[..., Config]) -> None:
    """Over wss:// with ssl_context trusting the server's CA, a run completes."""
    server_tls, client_tls = tls_pair()
    events: list[Frame] = []
    with trio.fail_after(TIMEOUT):
        async with served(make_config(), ssl_context=server_tls) as server:
            try:
                async with open_client(server, ssl_context=client_tls) as client:
                    assert client.url.startswith("wss://")
                    events = await client.run(CALC)
            except* trio.ClosedResourceError:
                pass  # closing races; see test_wss_client_closes_cleanly
    assert events[-1]["type"] == "agent_completed"
    assert "14" in events[-1]["data"]["final_response"]
    check_lifecycle(events, first_seq=1)


async def test_wss_client_closes_cleanly(make_config: Callable[..., Config]) -> None:
    """Leaving ``async with connect(wss://...)`` after a run raises nothing (five times over)."""
    server_tls, client_tls = tls_pair()
    with trio.fail_after(TIMEOUT):
        async with served(make_config(), ssl_context=server_tls) as server:
            for _ in range(5):
                async with open_client(server, ssl_context=client_tls) as client:
                    await client.run(CALC)


async def test_run_refused_by_thread_policy_raises(make_config: Callable[..., Config]) -> None:
    """run() with policy reject on a busy thread raises RuntimeError naming the error code busy."""
    with trio.fail_after(TIMEOUT):
        async with served(make_config()) as server, open_client(server) as client:
            await client.send_message("sleep 30", client_msg_id="long")
            accepted = await frames_until(client, lambda f: f["type"] == "tool_executing")
            with pytest.raises(RuntimeError, match="busy"):
                await client.run(CALC, policy="reject")
            [run_id] = {f["run_id"] for f in accepted if "seq" in f}
            await client.cancel(run_id)
            events = await frames_until(client, is_terminal)
    assert events[-1]["type"] == "agent_cancelled"
    assert events[-1]["data"]["reason"] == "client"
    check_lifecycle(accepted + events)


# --- automatic resume -------------------------------------------------------------------------------


async def test_dropped_connection_resumes_without_loss_or_duplicates(
    make_config: Callable[..., Config],
) -> None:
    """The server drops the connection mid-run; the client reconnects and frames() yields every event once."""
    count = 1000
    with trio.fail_after(TIMEOUT):
        async with served(make_config()) as server, open_client(server) as client:
            ready = await frames_until(client, lambda f: f["type"] == "session_ready")
            [first] = server.runtime.manager.connections("alice")
            await client.send_message(f"stream {count}")
            before = await frames_until(client, lambda f: f.get("seq") == 100)
            await first.transport.abort()
            after = await frames_until(client, is_terminal)
            assert client.connections == 2
            await first.done.wait()
            assert first.close_code == 1006

    frames = ready + before + after
    assert [f["type"] for f in frames].count("session_ready") == 2
    assert "resume_gap" not in [f["type"] for f in frames]
    seqs = assert_no_silent_loss(frames)
    assert seqs == list(range(1, count + 4))
    report = check_lifecycle(frames)
    [run] = report.runs.values()
    assert run.terminal == "agent_completed"
    assert run.event_types.count("partial_result") == count


class Gate:
    """Open or closed; ``GatedStream`` receives only while it is open."""

    def __init__(self) -> None:
        self._open = trio.Event()
        self._open.set()

    def close(self) -> None:
        if self._open.is_set():
            self._open = trio.Event()

    def open(self) -> None:
        self._open.set()

    async def wait_open(self) -> None:
        await self._open.wait()


class GatedStream(trio.abc.Stream):
    """A stream that stops reading from the network while its gate is closed."""

    def __init__(self, stream: trio.SocketStream, gate: Gate) -> None:
        self.stream = stream
        self.gate = gate

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        await self.gate.wait_open()
        return bytes(await self.stream.receive_some(max_bytes))

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self.stream.aclose()


class Gates:
    """Gates on the sockets ``netra_actors.client`` opens: ``reading`` and ``handshakes``."""

    def __init__(self) -> None:
        #: Closed: the client reads nothing from the network (its server's sends back up).
        self.reading = Gate()
        #: Closed: a new connection waits (TCP connected) before its WebSocket handshake.
        self.handshakes = Gate()


@pytest.fixture
def gates(monkeypatch: pytest.MonkeyPatch) -> Gates:
    """Gates on every socket ``netra_actors.client`` opens (with tiny receive buffers)."""
    gates = Gates()
    original = trio_websocket.wrap_client_stream

    async def gated_wrap(
        nursery: trio.Nursery, stream: trio.SocketStream, *args: Any, **kwargs: Any
    ) -> trio_websocket.WebSocketConnection:
        stream.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        await gates.handshakes.wait_open()
        gated = GatedStream(stream, gates.reading)
        return await original(nursery, gated, *args, **kwargs)  # type: ignore[arg-type]

    patched = types.SimpleNamespace(**vars(trio_websocket))
    patched.wrap_client_stream = gated_wrap
    monkeypatch.setattr(netra_actors.client, "trio_websocket", patched)
    return gates


async def test_close_4008_reconnects_and_reports_the_gap(
    make_config: Callable[..., Config], gates: Gates
) -> None:
    """A client left behind (4008) reconnects, gets resume_gap and the kept events: no silent loss."""
    count, window = 1000, 50
    with trio.fail_after(TIMEOUT):
        async with (
            served(make_config(window_events=window)) as server,
            open_client(server) as client,
        ):
            ready = await frames_until(client, lambda f: f["type"] == "session_ready")
            [lagging] = server.runtime.manager.connections("alice")
            async with connect(server.url_for("alice")) as tab:
                await tab.ready()
                gates.reading.close()  # the client stops reading; another tab keeps the run going
                await client.send_message(f"stream {count}")
                await tab.receive_until(is_terminal)
                gates.reading.open()
                frames = ready + await frames_until(client, is_terminal)
            await lagging.done.wait()
            assert lagging.close_code == 4008
            assert client.connections == 2

    last = count + 3
    types_seen = [f["type"] for f in frames]
    assert types_seen.count("session_ready") == 2
    [gap] = [f for f in frames if f["type"] == "resume_gap"]
    assert gap["session_id"] == ready[0]["session_id"]
    assert gap["last_seq"] <= last
    seqs = assert_no_silent_loss(frames)
    assert seqs[-1] == last
    # Only what the window still held came after the gap.
    assert seqs[-1] - gap["oldest_seq"] < window
    report = check_lifecycle(frames)
    [run] = report.runs.values()
    assert run.terminal == "agent_completed"
    check_lifecycle(tab.frames)


# --- a session torn down while the client is away ---------------------------------------------------


async def test_new_session_after_idle_teardown_resets_dedupe(
    make_config: Callable[..., Config], gates: Gates
) -> None:
    """Kept away past idle_session_grace, the client reconnects to a new session (resume_gap) and keeps working."""
    config = make_config(idle_session_grace=0.2, handshake_timeout=TIMEOUT)
    with trio.fail_after(TIMEOUT):
        async with served(config) as server, open_client(server, max_backoff=0.05) as client:
            first_run = await client.run(CALC)
            old_session_id = client.session_id
            session = server.runtime.manager.session_for("alice")
            assert session is not None
            [connection] = server.runtime.manager.connections("alice")

            # Hold the client's reconnection before its handshake until the session,
            # left with no connection and no run, has been closed by its idle watch.
            gates.handshakes.close()
            await connection.transport.abort()
            await session._closed.wait()
            assert server.runtime.manager.session_for("alice") is None
            gates.handshakes.open()

            rejoined = await frames_until(client, lambda f: f["type"] == "resume_gap")
            assert client.connections == 2
            second_run = await client.run(CALC)

    ready, gap = rejoined[-2:]
    assert ready["type"] == "session_ready"
    assert ready["session_id"] != old_session_id
    assert ready["last_seq"] == 0
    assert gap == {
        "type": "resume_gap",
        "session_id": ready["session_id"],
        "oldest_seq": 1,
        "last_seq": 0,
    }
    assert client.session_id == ready["session_id"]
    # seq starts over in the new stream, and the client no longer drops it as duplicates.
    assert [e["seq"] for e in second_run] == list(range(1, len(second_run) + 1))
    assert [e["seq"] for e in first_run] == [e["seq"] for e in second_run]
    for events in (first_run, second_run):
        assert events[-1]["type"] == "agent_completed"
        check_lifecycle(events, first_seq=1)


async def test_503_while_reconnecting_is_retried(make_config: Callable[..., Config]) -> None:
    """A reconnection refused with 503 (server not accepting) is retried until it is accepted."""
    with trio.fail_after(TIMEOUT):
        async with served(make_config()) as server, open_client(server) as client:
            await client.run(CALC)
            refusals = trio.Event()
            refuse = server.gateway._refuse

            async def counting_refuse(*args: Any) -> None:
                await refuse(*args)
                refusals.set()

            setattr(server.gateway, "_refuse", counting_refuse)  # noqa: B010 (a method, for mypy)
            server.gateway.accepting = False
            [connection] = server.runtime.manager.connections("alice")
            await connection.transport.abort()
            await refusals.wait()
            server.gateway.accepting = True
            await frames_until(client, lambda f: f["type"] == "session_ready")
            assert client.connections == 2
            events = await client.run(CALC)
    assert events[-1]["type"] == "agent_completed"
    check_lifecycle(events)


async def test_server_restart_on_the_same_port(
    make_config: Callable[..., Config], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server restarts on its port: the client retries, joins the new session (resume_gap) and keeps working."""
    refused = trio.Event()
    original = trio.open_tcp_stream

    async def watched_open_tcp_stream(*args: Any, **kwargs: Any) -> trio.SocketStream:
        try:
            return await original(*args, **kwargs)
        except OSError:
            refused.set()
            raise

    patched_trio = types.SimpleNamespace(**vars(trio))
    patched_trio.open_tcp_stream = watched_open_tcp_stream
    monkeypatch.setattr(netra_actors.client, "trio", patched_trio)

    async def run_server(
        config: Config, stop: trio.Event, *, task_status: trio.TaskStatus[Served]
    ) -> None:
        async with served(config) as server:
            task_status.started(server)
            await stop.wait()

    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            stop_first, stop_second = trio.Event(), trio.Event()
            first: Served = await nursery.start(run_server, make_config(), stop_first)
            async with open_client(first) as client:
                before = await client.run(CALC)
                old_session_id = client.session_id
                stop_first.set()  # shutdown: the client gets 1001, reconnects, is refused
                await refused.wait()
                second: Served = await nursery.start(
                    run_server, make_config(port=first.port), stop_second
                )
                rejoined = await frames_until(client, lambda f: f["type"] == "resume_gap")
                after = await client.run(CALC)
                assert client.connections == 2
            stop_second.set()

    assert second.port == first.port
    ready = rejoined[-2]
    assert ready["type"] == "session_ready"
    assert ready["session_id"] != old_session_id
    assert [e["seq"] for e in after] == [e["seq"] for e in before]
    check_lifecycle(before, first_seq=1)
    check_lifecycle(after, first_seq=1)
