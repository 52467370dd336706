"""The gateway over real sockets on 127.0.0.1: HTTP, handshake refusals, tokens, TLS,
resume, stalled readers, thread policies and limits.

Every test uses the real clock, is bounded by ``trio.fail_after`` and waits for
frames or events (a ``Connection``'s ``done``), never for time. Every frame
received is validated against docs/schemas (``wsclient``), and every stream of
events goes through ``check_lifecycle``.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import socket
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio
import trio_websocket
import trustme
import wsproto
import wsproto.events
from wsclient import (
    Frame,
    Served,
    WsClient,
    connect,
    decode,
    http_exchange,
    http_get,
    is_terminal,
    load_validator,
    served,
    validate_server_frame,
)
from wsproto.connection import ConnectionState

from netra_actors import Config
from netra_actors.testing import check_lifecycle

pytestmark = pytest.mark.network

#: Upper bound for every test; generous for a loaded machine, each takes about a second.
TIMEOUT = int(__import__("os").environ.get("T", 30))
CALC = "what is 2+3*4?"
HEALTHZ_FIELDS = {
    "status",
    "live",
    "ready",
    "sessions",
    "connections",
    "active_runs",
    "queued_runs",
    "uptime_s",
}


def types_of(frames: list[Frame]) -> list[str]:
    return [f["type"] for f in frames]


def assert_calc_answer(events: list[Frame]) -> None:
    """The demo calculator run ended well and answered 14."""
    assert events[0]["type"] == "agent_started"
    assert events[-1]["type"] == "agent_completed"
    completed = [e for e in events if e["type"] == "tool_completed"]
    assert [e["data"]["results"] for e in completed] == [14]
    assert "14" in events[-1]["data"]["final_response"]


async def close_code(client: WsClient) -> int | None:
    """Receive (and record) frames until the server closes the connection; its close code."""
    try:
        while True:
            await client.receive()
    except trio_websocket.ConnectionClosed as exc:
        return exc.reason.code if exc.reason else None


async def refused(url: str, **options: Any) -> tuple[int, dict[str, Any]]:
    """Connect to ``url``, which must refuse the handshake; its ``(status, JSON body)``."""
    with pytest.raises(trio_websocket.ConnectionRejected) as info:
        async with connect(url, **options):
            pytest.fail(f"the handshake on {url} was accepted")
    headers = {k.decode().lower(): v.decode() for k, v in info.value.headers or []}
    assert headers.get("content-type") == "application/json"
    body = json.loads(info.value.body or b"")
    assert set(body) == {"error", "message"}
    assert isinstance(body["message"], str)
    return info.value.status_code, body


# --- plain HTTP on the WebSocket port ---------------------------------------------------------


async def test_healthz_reports_the_documented_fields(make_config: Callable[..., Config]) -> None:
    """GET /healthz answers 200 JSON with every documented field and live counts."""
    with trio.fail_after(TIMEOUT):
        async with served(make_config()) as server:
            idle = await http_get(server.port, "/healthz")
            assert idle.status == 200
            assert idle.headers["cache-control"] == "no-store"
            assert idle.headers["connection"] == "close"
            body = idle.json()
            assert set(body) == HEALTHZ_FIELDS
            assert body["status"] == "ok"
            assert body["live"] is True
            assert body["ready"] is True
            assert [body[k] for k in ("sessions", "connections", "active_runs", "queued_runs")] == [
                0,
                0,
                0,
                0,
            ]
            assert isinstance(body["uptime_s"], float | int)
            assert body["uptime_s"] >= 0

            async with connect(server.url_for("alice")) as client:
                await client.ready()
                active = await client.start("sleep 30")
                await client.until_event(active["run_id"], lambda f: f["type"] == "tool_executing")
                queued = await client.start(CALC)
                busy = (await http_get(server.port, "/healthz")).json()
                assert busy["status"] == "ok"
                assert [busy[k] for k in ("sessions", "connections", "active_runs")] == [1, 1, 1]
                assert busy["queued_runs"] == 1
                assert busy["uptime_s"] >= body["uptime_s"]

                for run in (queued, active):
                    await client.send({"type": "cancel", "run_id": run["run_id"]})
                await client.until_terminal(active["run_id"])
                await client.until_terminal(queued["run_id"])
        report = check_lifecycle(client.frames)
        assert report.runs[queued["run_id"]].event_types == ("agent_cancelled",)
        assert report.runs[active["run_id"]].terminal == "agent_cancelled"


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/nope"),
        ("GET", "/index.html"),
        ("POST", "/"),
        ("POST", "/healthz"),
        ("GET", "/ws"),
        ("GET", "/healthz/x"),
    ],
)
async def test_other_http_requests_get_404_json(
    make_config: Callable[..., Config], method: str, path: str
) -> None:
    """A plain request for anything but the served routes (GET /healthz, /metrics, the page)
    gets 404 JSON, /ws without an upgrade included."""
    with trio.fail_after(TIMEOUT):
        async with served(make_config()) as server:
            request = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n\r\n"
            answer = await http_exchange(server.port, request.encode())
            assert answer.status == 404
            body = answer.json()
            assert body["error"] == "not_found"
            assert isinstance(body["message"], str)
            assert (await http_get(server.port, "/healthz")).status == 200
            assert server.runtime.statistics().sessions == 0


#: Request heads the gateway must answer with 400 (docs/protocol.md, "Handshake refusals").
BAD_HEADS = {
    "garbage": b"NOT A VALID REQUEST\r\n\r\n",
    "no-host": b"GET /healthz HTTP/1.1\r\n\r\n",
    # 17 000 bytes in all: the server reads all of it before it answers (no reset).
    "head-over-16KiB": b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: "
    + b"a" * (17_000 - 42)
    + b"\r\n\r\n",
}


@pytest.mark.parametrize("head", list(BAD_HEADS.values()), ids=list(BAD_HEADS))
async def test_malformed_request_head_gets_400_and_server_keeps_serving(
    make_config: Callable[..., Config], head: bytes
) -> None:
    """A request head that does not parse (or is over 16 KiB) gets 400 JSON; the server lives on."""
    with trio.fail_after(TIMEOUT):
        async with served(make_config()) as server:
            answer = await http_exchange(server.port, head)
            assert answer.status == 400
            assert answer.json()["error"] == "bad_request"
            assert (await http_get(server.port, "/healthz")).status == 200


async def test_incomplete_request_head_is_dropped_after_handshake_timeout(
    make_config: Callable[..., Config],
) -> None:
    """A client that never finishes its request head is disconnected without an answer."""
    with trio.fail_after(TIMEOUT):
        async with served(make_config(handshake_timeout=0.3)) as server:
            slow = await trio.open_tcp_stream("127.0.0.1", server.port)
            async with slow:
                await slow.send_all(b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: web")
                assert await receive_all(slow) == b""
            assert (await http_get(server.port, "/healthz")).status == 200
            assert server.runtime.statistics().sessions == 0


# --- handshake refusals -----------------------------------------------------------------------


async def test_origin_not_allowed_is_refused_with_403(make_config: Callable[..., Config]) -> None:
    """An Origin outside allowed_origins gets 403; listed, same-host and absent Origins connect."""
    with trio.fail_after(TIMEOUT):
        async with served(make_config(allowed_origins="https://app.example")) as server:
            url = server.url_for("alice")
            for origin in ("https://evil.example", "http://127.0.0.1:1", "null"):
                status, body = await refused(url, headers=[(b"origin", origin.encode())])
                assert (status, body["error"]) == (403, "forbidden"), origin
            assert server.runtime.statistics().sessions == 0

            same_host = f"http://127.0.0.1:{server.port}"
            for allowed in ("https://app.example", same_host, None):
                headers = [(b"origin", allowed.encode())] if allowed else None
                async with connect(url, headers=headers) as client:
                    assert (await client.ready())["user_id"] == "alice"
                    await client.ping()
            assert server.runtime.statistics().sessions == 1


async def test_wildcard_origin_allows_any_origin(make_config: Callable[..., Config]) -> None:
    """With allowed_origins '*' a foreign Origin connects."""
    with trio.fail_after(TIMEOUT):
        async with (
            served(make_config(allowed_origins="*")) as server,
            connect(server.url_for("alice"), headers=[(b"origin", b"https://x.example")]) as client,
        ):
            await client.ready()
            await client.ping()


async def test_user_over_max_connections_per_user_gets_429(
    make_config: Callable[..., Config],
) -> None:
    """A user's connection beyond max_connections_per_user gets 429; other users still connect."""
    with trio.fail_after(TIMEOUT):
        async with (
            served(make_config(max_connections_per_user=2)) as server,
            connect(server.url_for("alice")) as tab1,
            connect(server.url_for("alice")) as tab2,
        ):
            await tab1.ready()
            await tab2.ready()
            status, body = await refused(server.url_for("alice"))
            assert (status, body["error"]) == (429, "too_many_connections")
            stats = server.runtime.statistics()
            assert (stats.sessions, stats.connections) == (1, 2)

            async with connect(server.url_for("bob")) as bob:
                assert (await bob.ready())["user_id"] == "bob"
                _, events = await bob.run(CALC)
            assert_calc_answer(events)
            check_lifecycle(bob.frames)
            await tab1.ping()
            await tab2.ping()
            assert types_of(tab1.frames) == types_of(tab2.frames) == ["session_ready", "pong"]


async def test_server_over_max_connections_gets_503(make_config: Callable[..., Config]) -> None:
    """A connection beyond the server-wide max_connections gets 503 and creates no session."""
    with trio.fail_after(TIMEOUT):
        async with (
            served(make_config(max_connections=2)) as server,
            connect(server.url_for("alice")) as alice,
            connect(server.url_for("bob")) as bob,
        ):
            await alice.ready()
            await bob.ready()
            status, body = await refused(server.url_for("carol"))
            assert (status, body["error"]) == (503, "unavailable")
            assert server.runtime.manager.session_for("carol") is None
            stats = server.runtime.statistics()
            assert (stats.sessions, stats.connections) == (2, 2)
            await alice.ping()
            await bob.ping()


@pytest.mark.parametrize("value", ["-5", "abc", "1.5", "+3", "0x10"])
async def test_bad_after_seq_query_is_refused_with_400(
    make_config: Callable[..., Config], value: str
) -> None:
    """An after_seq query value that is not a decimal integer >= 0 gets 400 bad_request, no session."""
    with trio.fail_after(TIMEOUT):
        async with served(make_config()) as server:
            status, body = await refused(server.url_for("alice", after_seq=value))
            assert (status, body["error"]) == (400, "bad_request")
            assert server.runtime.statistics().sessions == 0


@pytest.mark.parametrize("limit", ["per-user", "server"])
async def test_connection_limits_hold_for_concurrent_handshakes(
    make_config: Callable[..., Config], limit: str
) -> None:
    """Six handshakes at once against a limit of two: exactly two are accepted, the rest refused."""
    attempts, allowed = 6, 2
    if limit == "per-user":
        config = make_config(max_connections_per_user=allowed)
        expected = 429
    else:
        config = make_config(max_connections=allowed)
        expected = 503
    outcomes: list[int | str] = []
    settled = trio.Event()
    release = trio.Event()

    async def attempt(server: Served, user_id: str) -> None:
        try:
            async with connect(server.url_for(user_id)) as client:
                await client.ready()
                outcomes.append("accepted")
                if len(outcomes) == attempts:
                    settled.set()
                await release.wait()
        except trio_websocket.ConnectionRejected as exc:
            outcomes.append(exc.status_code)
            if len(outcomes) == attempts:
                settled.set()

    with trio.fail_after(TIMEOUT):
        async with served(config) as server, trio.open_nursery() as nursery:
            for index in range(attempts):
                user_id = "alice" if limit == "per-user" else f"user{index}"
                nursery.start_soon(attempt, server, user_id)
            await settled.wait()
            connections = server.runtime.statistics().connections
            release.set()

    assert sorted(map(str, outcomes)) == sorted(
        ["accepted"] * allowed + [str(expected)] * (attempts - allowed)
    )
    assert connections == allowed


# --- tokens as subprotocols ---------------------------------------------------------------------


async def test_token_in_subprotocol_is_accepted_and_netra_v1_selected(
    make_config: Callable[..., Config],
) -> None:
    """Proposing ["netra.v1", "bearer.<token>"] with no header or query authenticates; netra.v1 is selected."""
    with trio.fail_after(TIMEOUT):
        async with served(make_config()) as server:
            proposed = ["netra.v1", f"bearer.{server.token('alice')}"]
            async with connect(server.url(), subprotocols=proposed) as client:
                assert client.ws.subprotocol == "netra.v1"
                assert (await client.ready())["user_id"] == "alice"
                _, events = await client.run(CALC)
            assert_calc_answer(events)
            check_lifecycle(client.frames)

            # A bad token in the subprotocol is refused like any bad token.
            status, body = await refused(server.url(), subprotocols=["netra.v1", "bearer.nope"])
            assert (status, body["error"]) == (401, "unauthorized")

            # netra.v1 is selected whenever it is proposed; never a bearer.* protocol.
            async with connect(server.url_for("bob"), subprotocols=["netra.v1"]) as bob:
                assert bob.ws.subprotocol == "netra.v1"
                await bob.ready()
            async with connect(server.url_for("bob")) as plain:
                assert plain.ws.subprotocol is None
                await plain.ready()


# --- TLS ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_ca() -> trustme.CA:
    return trustme.CA()


async def receive_all(stream: trio.abc.Stream) -> bytes:
    """Everything ``stream`` receives until EOF (a reset counts as EOF)."""
    data = bytearray()
    try:
        while chunk := await stream.receive_some():
            data += chunk
    except trio.BrokenResourceError:
        pass
    return bytes(data)


def client_tls(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


@pytest.mark.parametrize("how", ["config-files", "ssl-context"])
async def test_tls_serves_wss_and_https(
    make_config: Callable[..., Config], tmp_path: Path, tls_ca: trustme.CA, how: str
) -> None:
    """With a certificate the port speaks TLS: a calculator run over wss://, healthz over https://."""
    cert = tls_ca.issue_cert("127.0.0.1")
    ssl_context: ssl.SSLContext | None = None
    if how == "config-files":
        cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
        cert.cert_chain_pems[0].write_to_path(str(cert_file))
        cert.private_key_pem.write_to_path(str(key_file))
        config = make_config(tls_cert=cert_file, tls_key=key_file)
    else:
        config = make_config()
        ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        cert.configure_cert(ssl_context)
    trust = client_tls(tls_ca)
    with trio.fail_after(TIMEOUT):
        async with served(config, ssl_context=ssl_context) as server:
            assert server.info.tls
            assert server.info.url == f"wss://127.0.0.1:{server.port}/ws"
            url = server.url_for("alice")
            assert url.startswith("wss://")
            async with connect(url, ssl_context=trust) as client:
                await client.ready()
                _, events = await client.run(CALC)
            assert_calc_answer(events)
            check_lifecycle(client.frames)

            health = await http_get(server.port, "/healthz", ssl_context=trust)
            assert health.status == 200
            assert health.json()["status"] == "ok"

            # A plain-text upgrade request on the TLS port is dropped without an answer.
            # (Raw TCP: trio-websocket's client waits forever when the server closes
            # before answering the handshake.)
            plain = await trio.open_tcp_stream("127.0.0.1", server.port)
            async with plain:
                head = f"GET /ws?token={server.token('alice')} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                head += "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                head += "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
                await plain.send_all(head.encode())
                assert await receive_all(plain) == b""
            assert server.runtime.statistics().sessions == 1
            assert server.runtime.statistics().connections == 0


async def test_failed_tls_handshakes_and_probes_do_not_stop_the_server(
    make_config: Callable[..., Config], tls_ca: trustme.CA
) -> None:
    """A client rejecting the certificate, and TCP probes closing at once, leave a TLS server serving."""
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls_ca.issue_cert("127.0.0.1").configure_cert(server_tls)
    trust = client_tls(tls_ca)
    with trio.fail_after(TIMEOUT):
        async with served(make_config(), ssl_context=server_tls) as server:
            with pytest.raises(trio.BrokenResourceError) as info:
                await http_get(server.port, "/healthz", ssl_context=ssl.create_default_context())
            assert isinstance(info.value.__cause__, ssl.SSLCertVerificationError)
            assert (await http_get(server.port, "/healthz", ssl_context=trust)).status == 200
            for _ in range(20):
                probe = await trio.open_tcp_stream("127.0.0.1", server.port)
                await probe.aclose()
                assert (await http_get(server.port, "/healthz", ssl_context=trust)).status == 200


# --- resuming over real sockets -------------------------------------------------------------------


async def test_reconnect_with_after_seq_gets_exactly_the_missing_suffix(
    make_config: Callable[..., Config],
) -> None:
    """A client that drops mid-run and reconnects with ?after_seq=N&session_id=S gets seq N+1.. then live."""
    with trio.fail_after(TIMEOUT):
        async with served(make_config()) as server:
            async with connect(server.url_for("alice")) as first:
                ready = await first.ready()
                run_id = (await first.start("stream 300"))["run_id"]
                await first.receive_until(lambda f: len(first.events()) >= 40)
            before = first.events()
            last = before[-1]["seq"]
            assert [e["seq"] for e in before] == list(range(1, last + 1))
            check_lifecycle(first.frames, require_terminal=False)

            resume_url = server.url_for("alice", after_seq=last, session_id=ready["session_id"])
            async with connect(resume_url) as second:
                again = await second.ready()
                resumed = await second.until_terminal(run_id)
                _, live = await second.run(CALC)

        assert again["session_id"] == ready["session_id"]
        assert again["last_seq"] >= last
        assert again["after_seq"] == last
        assert "resume_gap" not in types_of(second.frames)
        assert resumed[0]["seq"] == last + 1
        whole = before + resumed
        # 300 partial results, agent_started, agent_thinking and agent_completed.
        assert [e["seq"] for e in whole] == list(range(1, 304))
        assert types_of(whole).count("partial_result") == 300
        end = whole[-1]["seq"]
        assert [e["seq"] for e in live] == list(range(end + 1, end + 1 + len(live)))
        assert second.events() == resumed + live
        assert_calc_answer(live)
        check_lifecycle(before + second.events())


async def test_resume_frame_restarts_the_stream_after_n(make_config: Callable[..., Config]) -> None:
    """A resume frame on an open connection restarts its stream at N+1 (same frames again), then live."""
    with trio.fail_after(TIMEOUT):
        async with (
            served(make_config()) as server,
            connect(server.url_for("alice")) as client,
        ):
            ready = await client.ready()
            _, events = await client.run(CALC)
            last = events[-1]["seq"]
            original = dict(
                zip([e["seq"] for e in client.events()], client.raw_events(), strict=True)
            )

            replays: dict[int, list[str]] = {}
            for after in (0, last - 3, last):
                await client.send(
                    {"type": "resume", "after_seq": after, "session_id": ready["session_id"]}
                )
                mark = len(client.raw)
                if after < last:
                    await client.receive_until(lambda f: f.get("seq") == last)
                replays[after] = client.raw[mark:]
            _, live = await client.run(CALC)

        for after, replay in replays.items():
            frames = [decode(text) for text in replay]
            assert [f["seq"] for f in frames] == list(range(after + 1, last + 1)), after
            assert replay == [original[f["seq"]] for f in frames]
        assert "resume_gap" not in types_of(client.frames)
        assert [e["seq"] for e in live] == list(range(last + 1, last + 1 + len(live)))
        assert_calc_answer(live)
        # A client keeps each seq once: de-duplicated, the stream is lawful.
        unique = {f["seq"]: f for f in client.events()}
        check_lifecycle([unique[s] for s in sorted(unique)], first_seq=1)


@pytest.mark.parametrize("where", ["frame", "query"])
@pytest.mark.parametrize("why", ["other-session", "beyond-last"])
async def test_inexact_resume_gets_resume_gap_then_the_oldest_kept(
    make_config: Callable[..., Config], where: str, why: str
) -> None:
    """A resume that cannot be served exactly gets resume_gap, then every event from oldest_seq."""
    with trio.fail_after(TIMEOUT):
        async with served(make_config()) as server:
            async with connect(server.url_for("alice")) as first:
                ready = await first.ready()
                _, events = await first.run(CALC)
            last = events[-1]["seq"]
            resume: dict[str, str | int] = (
                {"after_seq": 2, "session_id": "sess_other"}
                if why == "other-session"
                else {"after_seq": last + 10, "session_id": ready["session_id"]}
            )
            query = resume if where == "query" else {}
            async with connect(server.url_for("alice", **query)) as client:
                again = await client.ready()
                if where == "frame":
                    await client.send({"type": "resume", **resume})
                gap = await client.expect("resume_gap")
                await client.receive_until(lambda f: f.get("seq") == last)

        load_validator("resume_gap").validate(gap)
        assert gap == {
            "type": "resume_gap",
            "session_id": ready["session_id"],
            "oldest_seq": 1,
            "last_seq": last,
        }
        # A resuming connection's session_ready says where its stream restarts.
        assert again.get("after_seq") == (0 if where == "query" else None)
        assert client.events() == events
        report = check_lifecycle(client.frames)
        assert report.first_seq == 1


# --- a stalled reader does not hold anyone back -------------------------------------------------------


class StalledClient:
    """A raw WebSocket client that completes the handshake, reads session_ready, then stops reading.

    Its receive buffer is made tiny, so the server's sends to it back up quickly.
    ``drain`` reads again, answering the server's close frame, until the TCP
    connection ends.
    """

    def __init__(self, stream: trio.SocketStream, ws: wsproto.WSConnection) -> None:
        self.stream = stream
        self.ws = ws
        self.messages: list[str] = []
        #: The close frame's code; 1006 when the connection ended without one.
        self.close_code: int | None = None
        self._partial = ""

    @classmethod
    async def open(cls, port: int, target: str) -> StalledClient:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        try:
            stream.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            ws = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
            await stream.send_all(ws.send(wsproto.events.Request(f"127.0.0.1:{port}", target)))
            client = cls(stream, ws)
            accepted = False
            while not client.messages:
                data = await stream.receive_some(4096)
                assert data, "the server closed during the handshake"
                ws.receive_data(data)
                for event in ws.events():
                    accepted = accepted or isinstance(event, wsproto.events.AcceptConnection)
                    await client._take(event)
            assert accepted
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
        return client

    async def _take(self, event: wsproto.events.Event) -> None:
        if isinstance(event, wsproto.events.TextMessage):
            self._partial += event.data
            if event.message_finished:
                self.messages.append(self._partial)
                self._partial = ""
        elif isinstance(event, wsproto.events.CloseConnection) and self.close_code is None:
            # The first one counts: at EOF wsproto adds a 1006 even after a close frame.
            self.close_code = event.code
            if self.ws.state is ConnectionState.REMOTE_CLOSING:
                with contextlib.suppress(trio.BrokenResourceError):
                    await self.stream.send_all(self.ws.send(event.response()))

    async def drain(self) -> None:
        """Read everything the server sent until the TCP connection ends."""
        while True:
            try:
                data = await self.stream.receive_some(65536)
            except trio.BrokenResourceError:
                data = b""  # reset
            self.ws.receive_data(data or None)
            for event in self.ws.events():
                await self._take(event)
            if not data:
                return

    def frames(self) -> list[Frame]:
        """The complete frames received, schema-checked."""
        frames = [decode(text) for text in self.messages]
        for frame in frames:
            validate_server_frame(frame)
        return frames

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)


async def read_until_terminal(client: WsClient, run_id: str | None = None) -> None:
    """Read frames until the terminal event (of ``run_id``, or of the first run to end)."""
    await client.receive_until(lambda f: is_terminal(f, run_id))


def assert_whole_stream_run(client: WsClient, count: int) -> None:
    """``client`` received one complete ``stream {count}`` run, gap-free."""
    report = check_lifecycle(client.frames)
    [run] = report.runs.values()
    assert run.terminal == "agent_completed"
    assert run.event_types.count("partial_result") == count
    assert len(run.event_types) == count + 3


async def test_stalled_tab_holds_back_neither_other_tab_nor_other_user(
    make_config: Callable[..., Config],
) -> None:
    """While a tab stops reading, another tab and another user get every event; the stalled tab then gets 4008."""
    count, window = 1200, 200
    # No send_timeout or heartbeat can end the stalled connection during the test:
    # only falling out of the window can.
    config = make_config(
        window_events=window, send_timeout=600, heartbeat_interval=600, heartbeat_timeout=600
    )
    with trio.fail_after(2 * TIMEOUT):  # about 3 s; 2 * 1200 frames checked on a loaded machine
        async with served(config) as server:
            stalled = await StalledClient.open(server.port, f"/ws?token={server.token('alice')}")
            try:
                [stalled_conn] = server.runtime.manager.connections("alice")
                async with (
                    connect(server.url_for("alice")) as tab,
                    connect(server.url_for("bob")) as bob,
                ):
                    await tab.ready()
                    await bob.ready()
                    mine = await tab.start(f"stream {count}")
                    await bob.send({"type": "user_message", "text": f"stream {count}"})
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(read_until_terminal, tab, mine["run_id"])
                        nursery.start_soon(read_until_terminal, bob)

                    # The whole run went by while the stalled tab was still connected,
                    # more than a window behind: it held nobody back.
                    assert not stalled_conn.done.is_set()
                    assert stalled_conn.subscription is not None
                    assert stalled_conn.subscription.cursor < count + 3 - window

                    # Reading again, it gets what was already on its way, then 4008.
                    await stalled.drain()
                    await stalled_conn.done.wait()
                    assert stalled_conn.close_code == 4008
                    stats = server.runtime.session_statistics("alice")
                    assert stats is not None
                    assert stats.connections == 1
                    assert server.runtime.statistics().connections == 2
                    await tab.ping()
                    await bob.ping()
            finally:
                await stalled.aclose()

    assert_whole_stream_run(tab, count)
    assert_whole_stream_run(bob, count)
    assert stalled.close_code == 4008
    frames = stalled.frames()
    assert frames[0]["type"] == "session_ready"
    assert frames[-1]["seq"] < count + 3 - window
    check_lifecycle(frames, require_terminal=False)


async def test_stalled_connection_is_aborted_after_send_timeout(
    make_config: Callable[..., Config],
) -> None:
    """A tab whose sends stall for send_timeout is aborted (no close frame); the other tab gets everything."""
    count = 1000
    config = make_config(window_events=200, send_timeout=0.3)
    with trio.fail_after(TIMEOUT):
        async with served(config) as server:
            stalled = await StalledClient.open(server.port, f"/ws?token={server.token('alice')}")
            try:
                [stalled_conn] = server.runtime.manager.connections("alice")
                async with connect(server.url_for("alice")) as tab:
                    await tab.ready()
                    mine = await tab.start(f"stream {count}")
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(read_until_terminal, tab, mine["run_id"])
                        await stalled_conn.done.wait()
                    assert stalled_conn.close_code == 1006
                    assert server.runtime.statistics().connections == 1
                    await tab.ping()
                await stalled.drain()
            finally:
                await stalled.aclose()

    assert_whole_stream_run(tab, count)
    assert stalled.close_code == 1006  # the TCP connection ended without a close frame
    frames = stalled.frames()
    assert frames[0]["type"] == "session_ready"
    assert len(frames) - 1 < count
    check_lifecycle(frames, require_terminal=False)


# --- thread policies over the wire ----------------------------------------------------------------


async def test_enqueue_runs_a_threads_runs_one_after_another(
    make_config: Callable[..., Config],
) -> None:
    """Messages for a busy thread (enqueue) run in arrival order, each after the previous one ended."""
    with trio.fail_after(TIMEOUT):
        async with (
            served(make_config()) as server,
            connect(server.url_for("alice")) as client,
        ):
            await client.ready()
            texts = ["stream 20", CALC, "stream 5"]
            for index, text in enumerate(texts):
                await client.send(
                    {"type": "user_message", "text": text, "client_msg_id": f"m{index}"}
                )
            accepted: dict[str, str] = {}
            while len(accepted) < 3:
                frame = await client.receive()
                if frame["type"] == "run_accepted":
                    accepted[frame["client_msg_id"]] = frame["run_id"]
            for index in range(3):
                await client.until_terminal(accepted[f"m{index}"])

    runs = [client.events(accepted[f"m{index}"]) for index in range(3)]
    for previous, following in itertools.pairwise(runs):
        assert following[0]["type"] == "agent_started"
        assert following[0]["seq"] == previous[-1]["seq"] + 1
    assert [run[0]["data"]["text"] for run in runs] == texts
    assert_calc_answer(runs[1])
    report = check_lifecycle(client.frames)
    assert {k: v for k, v in report.terminal_counts().items() if v} == {"agent_completed": 3}


async def test_enqueue_past_max_queued_per_thread_is_limit_exceeded(
    make_config: Callable[..., Config],
) -> None:
    """With max_queued_per_thread runs queued, another message gets error limit_exceeded with its client_msg_id."""
    with trio.fail_after(TIMEOUT):
        async with (
            served(make_config(max_queued_per_thread=1)) as server,
            connect(server.url_for("alice")) as client,
        ):
            await client.ready()
            active = await client.start("sleep 30")
            await client.until_event(active["run_id"], lambda f: f["type"] == "tool_executing")
            queued = await client.start(CALC)
            await client.send({"type": "user_message", "text": CALC, "client_msg_id": "m3"})
            error = await client.expect("error")
            await client.send({"type": "cancel", "run_id": active["run_id"]})
            await client.until_terminal(active["run_id"])
            events = await client.until_terminal(queued["run_id"])

    assert (error["code"], error["client_msg_id"]) == ("limit_exceeded", "m3")
    assert_calc_answer(events)
    report = check_lifecycle(client.frames)
    assert {k: v for k, v in report.terminal_counts().items() if v} == {
        "agent_cancelled": 1,
        "agent_completed": 1,
    }


@pytest.mark.parametrize("source", ["message", "config"])
async def test_reject_policy_answers_busy_and_leaves_the_active_run(
    make_config: Callable[..., Config], source: str
) -> None:
    """policy reject on a busy thread: error busy with the client_msg_id; the active run goes on."""
    config = make_config(thread_policy="reject" if source == "config" else "enqueue")
    with trio.fail_after(TIMEOUT):
        async with served(config) as server, connect(server.url_for("alice")) as client:
            await client.ready()
            active = await client.start("sleep 30", client_msg_id="m1")
            await client.until_event(active["run_id"], lambda f: f["type"] == "tool_executing")
            frame: Frame = {"type": "user_message", "text": CALC, "client_msg_id": "m2"}
            if source == "message":
                frame["policy"] = "reject"
            await client.send(frame)
            error = await client.expect("error")
            # Another thread is not busy: it runs at once, next to the sleeping run.
            _, side = await client.run(CALC, thread_id="side")
            await client.send({"type": "cancel", "run_id": active["run_id"]})
            sleeping = await client.until_terminal(active["run_id"])

    load_validator("error").validate(error)
    assert (error["code"], error["client_msg_id"]) == ("busy", "m2")
    assert_calc_answer(side)
    assert types_of(sleeping) == [
        "agent_started",
        "agent_thinking",
        "tool_executing",
        "tool_completed",
        "agent_cancelled",
    ]
    assert sleeping[-1]["data"]["reason"] == "client"
    assert types_of(client.frames).count("run_accepted") == 2
    check_lifecycle(client.frames)


@pytest.mark.parametrize("source", ["message", "config"])
async def test_interrupt_policy_cancels_the_active_run_before_the_new_one_starts(
    make_config: Callable[..., Config], source: str
) -> None:
    """policy interrupt: the active run ends agent_cancelled interrupted, queued ones too, before the new run's agent_started."""
    config = make_config(thread_policy="interrupt" if source == "config" else "enqueue")
    with trio.fail_after(TIMEOUT):
        async with served(config) as server, connect(server.url_for("alice")) as client:
            await client.ready()
            active = await client.start("sleep 30")
            await client.until_event(active["run_id"], lambda f: f["type"] == "tool_executing")
            await client.send({"type": "user_message", "text": "stream 3", "policy": "enqueue"})
            queued = await client.receive_until(lambda f: f["type"] == "run_accepted")
            frame: Frame = {"type": "user_message", "text": CALC, "client_msg_id": "new"}
            if source == "message":
                frame["policy"] = "interrupt"
            await client.send(frame)
            new = await client.receive_until(lambda f: f["type"] == "run_accepted")
            new_events = await client.until_terminal(new[-1]["run_id"])

    active_events = client.events(active["run_id"])
    queued_events = client.events(queued[-1]["run_id"])
    assert types_of(active_events)[-2:] == ["tool_completed", "agent_cancelled"]
    assert active_events[-2]["data"]["status"] == "cancelled"
    assert active_events[-1]["data"]["reason"] == "interrupted"
    assert types_of(queued_events) == ["agent_cancelled"]
    assert queued_events[0]["data"]["reason"] == "interrupted"
    started = new_events[0]
    assert started["type"] == "agent_started"
    assert started["seq"] > active_events[-1]["seq"]
    assert started["seq"] > queued_events[0]["seq"]
    assert_calc_answer(new_events)
    report = check_lifecycle(client.frames)
    assert {k: v for k, v in report.terminal_counts().items() if v} == {
        "agent_cancelled": 2,
        "agent_completed": 1,
    }


# --- limits ------------------------------------------------------------------------------------------


async def test_burst_over_rate_limit_closes_4029_for_that_user_only(
    make_config: Callable[..., Config],
) -> None:
    """Past rate_burst frames (per user, all tabs) the connection gets rate_limited then close 4029; others are unaffected."""
    burst = 5
    config = make_config(rate_limit=0.001, rate_burst=burst)
    with trio.fail_after(TIMEOUT):
        async with (
            served(config) as server,
            connect(server.url_for("alice")) as tab,
            connect(server.url_for("alice")) as other_tab,
            connect(server.url_for("bob")) as bob,
        ):
            for client in (tab, other_tab, bob):
                await client.ready()
            for _ in range(burst + 1):
                await tab.send({"type": "ping"})
            assert await close_code(tab) == 4029

            # The bucket is the user's: alice's other tab has no frame left either.
            await other_tab.send({"type": "ping"})
            assert await close_code(other_tab) == 4029

            for _ in range(burst):
                await bob.ping()

    # The replies already queued, then the rate_limited error, then 4029 (docs/protocol.md, "Limits").
    assert types_of(tab.frames) == ["session_ready", *["pong"] * burst, "error"]
    assert types_of(other_tab.frames) == ["session_ready", "error"]
    for error in (tab.frames[-1], other_tab.frames[-1]):
        load_validator("error").validate(error)
        assert error["code"] == "rate_limited"
        assert "client_msg_id" not in error
    check_lifecycle(bob.frames)


async def test_rate_limited_error_always_precedes_4029(make_config: Callable[..., Config]) -> None:
    """Every connection closed 4029 for a burst first receives the error frame rate_limited."""
    burst, users = 5, 8
    config = make_config(rate_limit=0.001, rate_burst=burst)
    with trio.fail_after(TIMEOUT):
        async with served(config) as server:
            for index in range(users):
                async with connect(server.url_for(f"user{index}")) as client:
                    await client.ready()
                    for _ in range(burst + 1):
                        await client.send({"type": "ping"})
                    assert await close_code(client) == 4029
                assert types_of(client.frames) == ["session_ready", *["pong"] * burst, "error"]
                assert client.frames[-1]["code"] == "rate_limited"


def user_message_of_bytes(size: int) -> str:
    """A user_message frame of exactly ``size`` UTF-8 bytes, mostly two-byte characters."""
    shell = '{"type":"user_message","text":""}'
    room = size - len(shell)
    text = "é" * (room // 2) + "x" * (room % 2)
    frame = shell.replace('""}', f'"{text}"}}')
    assert len(frame.encode()) == size
    assert len(frame) < size * 0.6
    return frame


async def test_frame_size_limit_counts_utf8_bytes(make_config: Callable[..., Config]) -> None:
    """A text frame over max_frame_bytes in UTF-8 bytes (under it in characters) closes 1009."""
    with trio.fail_after(TIMEOUT):
        async with (
            served(make_config(max_frame_bytes=1024)) as server,
            connect(server.url_for("alice")) as client,
            connect(server.url_for("alice")) as other,
        ):
            await client.ready()
            await other.ready()
            await client.send_raw(user_message_of_bytes(1024))
            accepted = (await client.receive_until(lambda f: f["type"] == "run_accepted"))[-1]
            events = await client.until_terminal(accepted["run_id"])
            assert events[-1]["type"] == "agent_completed"

            await client.send_raw(user_message_of_bytes(1025))
            assert await close_code(client) == 1009
            await other.until_terminal(accepted["run_id"])
            await other.ping()

    assert types_of(client.frames).count("run_accepted") == 1
    check_lifecycle(client.frames)
    check_lifecycle(other.frames)
