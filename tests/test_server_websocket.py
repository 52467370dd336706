"""Protocol v1 over real WebSockets on 127.0.0.1: auth, runs, cancel, bad input, fan-out, limits.

Every test uses the real clock, is bounded by ``trio.fail_after`` and waits for
frames, never for time. Every received frame is validated against
docs/schemas/server_frame.json (see ``wsclient``), and every stream of events
goes through ``check_lifecycle``.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import AsyncIterator, Callable
from typing import Protocol

import attrs
import pytest
import trio
import trio_websocket
from wsclient import connect, load_validator

from netra_actors import Config, Runtime, issue_token, serve
from netra_actors.testing import check_lifecycle

pytestmark = pytest.mark.network

#: Upper bound for every test; generous, each takes well under a second.
TIMEOUT = 20
TRACE_ID = re.compile(r"[0-9a-f]{32}")
CALC = "what is 2+3*4?"


# --- servers and connections ------------------------------------------------------------------


class Server(Protocol):
    """What these tests use of a served runtime (conftest's ``live_server`` or ``SmallFrameServer``)."""

    runtime: Runtime
    port: int

    def token(self, user_id: str, ttl: float = 600.0, now: float | None = None) -> str: ...

    def url_for(self, user_id: str) -> str: ...


def url(server: Server, token: str | None = None, path: str = "/ws") -> str:
    """The server's URL for ``path``, with ``?token=`` when a token is given."""
    query = f"?token={token}" if token is not None else ""
    return f"ws://127.0.0.1:{server.port}{path}{query}"


@attrs.frozen
class SmallFrameServer:
    """A demo server whose ``max_frame_bytes`` is 1024."""

    runtime: Runtime
    config: Config
    port: int

    def token(self, user_id: str, ttl: float = 600.0, now: float | None = None) -> str:
        assert self.config.secret is not None
        return issue_token(user_id, self.config.secret.encode(), ttl=ttl, now=now)

    def url_for(self, user_id: str) -> str:
        return url(self, self.token(user_id))


@pytest.fixture
async def small_frame_server(make_config: Callable[..., Config]) -> AsyncIterator[Server]:
    """The demo runtime served on 127.0.0.1, accepting client frames of at most 1024 bytes."""
    config = make_config(max_frame_bytes=1024)
    async with Runtime(config) as runtime, trio.open_nursery() as nursery:
        listener = await nursery.start(serve, runtime, config)
        yield SmallFrameServer(runtime, config, listener.port)
        nursery.cancel_scope.cancel()


def assert_calc_run(accepted: dict, events: list[dict], *, client_msg_id: str | None) -> None:
    """The demo's calculator run: shape, tool call, answer and envelope of every event."""
    run_id = accepted["run_id"]
    assert accepted["thread_id"] == "main"
    assert accepted["client_msg_id"] == client_msg_id
    types = [e["type"] for e in events]
    assert types[0] == "agent_started"
    assert types[-1] == "agent_completed"
    assert types.count("agent_thinking") >= 2
    assert types.count("tool_executing") == types.count("tool_completed") == 1
    assert types.count("partial_result") >= 1
    assert types.index("agent_thinking") < types.index("tool_executing")
    assert types.index("tool_executing") < types.index("tool_completed")
    assert types.index("tool_completed") < types.index("partial_result")

    started = events[0]["data"]
    assert started["user_id"] == "alice"
    assert started["text"] == CALC
    assert started.get("client_msg_id") == client_msg_id
    executing = events[types.index("tool_executing")]["data"]
    assert executing["tool_name"] == "calculator"
    assert executing["parameters"] == {"expression": "2+3*4"}
    completed = events[types.index("tool_completed")]["data"]
    assert completed["call_id"] == executing["call_id"]
    assert completed["tool_name"] == "calculator"
    assert completed["status"] == "ok"
    assert completed["results"] == 14
    final = events[-1]["data"]["final_response"]
    assert "14" in final
    assert "".join(e["data"]["text"] for e in events if e["type"] == "partial_result") == final

    seqs = [e["seq"] for e in events]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    for event in events:
        assert event["run_id"] == run_id
        assert event["thread_id"] == "main"
        assert isinstance(event["ts"], float)
        assert TRACE_ID.fullmatch(event["trace_id"])


# --- 1. handshake ---------------------------------------------------------------------------


def _other_secret_token(server: Server) -> str:
    return issue_token("alice", b"another-secret-of-at-least-32-bytes!!", ttl=600)


async def refused(url: str, headers: list[tuple[bytes, bytes]] | None = None) -> tuple[int, bytes]:
    """Connect to ``url``, which must refuse the handshake; its ``(HTTP status, body)``."""
    with pytest.raises(trio_websocket.ConnectionRejected) as info:
        async with connect(url, headers=headers):
            pytest.fail(f"the handshake on {url} was accepted")
    return info.value.status_code, info.value.body or b""


@pytest.mark.parametrize(
    "make_token",
    [
        pytest.param(lambda s: None, id="no-token"),
        pytest.param(lambda s: "not-a-jwt", id="garbage"),
        pytest.param(lambda s: s.token("alice")[:-4] + "AAAA", id="bad-signature"),
        pytest.param(_other_secret_token, id="other-secret"),
        pytest.param(lambda s: s.token("alice", ttl=60, now=time.time() - 3600), id="expired"),
    ],
)
async def test_handshake_without_valid_token_is_refused_with_401(
    live_server: Server, make_token: Callable[[Server], str | None]
) -> None:
    """A missing, malformed, badly signed or expired token gets HTTP 401 and creates no session."""
    with trio.fail_after(TIMEOUT):
        status, body = await refused(url(live_server, make_token(live_server)))
    assert status == 401
    answer = json.loads(body)
    assert answer["error"] == "unauthorized"
    assert isinstance(answer["message"], str)
    assert live_server.runtime.statistics().sessions == 0


async def test_bad_bearer_header_is_refused_with_401(live_server: Server) -> None:
    """A bad token in the Authorization header is refused with 401 and creates no session."""
    with trio.fail_after(TIMEOUT):
        status, body = await refused(url(live_server), [(b"authorization", b"Bearer xyz")])
    assert status == 401
    assert json.loads(body)["error"] == "unauthorized"
    assert live_server.runtime.statistics().sessions == 0


async def test_authorization_bearer_header_is_accepted(live_server: Server) -> None:
    """A valid token in ``Authorization: Bearer`` opens a session for the token's user."""
    with trio.fail_after(TIMEOUT):
        headers = [(b"Authorization", f"Bearer {live_server.token('alice')}".encode())]
        async with connect(url(live_server), headers=headers) as client:
            ready = await client.ready()
            assert ready["user_id"] == "alice"
            assert ready["last_seq"] == 0
            await client.ping()
        assert live_server.runtime.statistics().sessions == 1


async def test_path_other_than_ws_is_refused_with_404(live_server: Server) -> None:
    """Only /ws is a WebSocket endpoint: any other path gets 404 (even with a valid token)."""
    with trio.fail_after(TIMEOUT):
        for path in ("/", "/other", "/ws/extra"):
            status, _ = await refused(url(live_server, live_server.token("alice"), path=path))
            assert status == 404, path
    assert live_server.runtime.statistics().sessions == 0


# --- 2. a full run --------------------------------------------------------------------------


async def test_demo_calculator_run(live_server: Server) -> None:
    """A user_message gets run_accepted and a complete, ordered, schema-valid event stream."""
    with trio.fail_after(TIMEOUT):
        async with connect(live_server.url_for("alice")) as client:
            ready = await client.ready()
            assert ready["user_id"] == "alice"
            assert ready["last_seq"] == 0
            assert isinstance(ready["session_id"], str)
            assert ready["session_id"]

            accepted, events = await client.run(CALC, client_msg_id="m1")

        assert_calc_run(accepted, events, client_msg_id="m1")
        assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
        assert client.frames[0] is ready
        assert [f["type"] for f in client.frames].count("run_accepted") == 1
        report = check_lifecycle(client.frames)
        assert report.runs[accepted["run_id"]].terminal == "agent_completed"
        assert report.first_seq == 1
        assert report.last_seq == len(events)


# --- 3. cancel ------------------------------------------------------------------------------


async def test_cancel_over_the_wire(live_server: Server) -> None:
    """cancel ends the in-flight tool (cancelled) then the run (agent_cancelled, client), at once."""
    started_at = trio.current_time()
    with trio.fail_after(TIMEOUT):
        async with connect(live_server.url_for("alice")) as client:
            await client.ready()
            accepted = await client.start("sleep 30")
            run_id = accepted["run_id"]
            events = await client.until_event(run_id, lambda f: f["type"] == "tool_executing")
            executing = events[-1]
            assert executing["data"]["tool_name"] == "sleep"
            waiting = len(client.frames)

            await client.send({"type": "cancel", "run_id": run_id})
            await client.until_terminal(run_id)
            await client.ping()

        after = client.frames[waiting:]
        assert [f["type"] for f in after] == ["tool_completed", "agent_cancelled", "pong"]
        completed, cancelled = after[0], after[1]
        assert completed["run_id"] == cancelled["run_id"] == run_id
        assert completed["data"]["call_id"] == executing["data"]["call_id"]
        assert completed["data"]["tool_name"] == "sleep"
        assert completed["data"]["status"] == "cancelled"
        assert completed["data"]["error"]["type"] == "cancelled"
        assert cancelled["data"]["reason"] == "client"
        report = check_lifecycle(client.frames)
        assert report.runs[run_id].terminal == "agent_cancelled"
    assert trio.current_time() - started_at < 10


# --- 4. bad input ---------------------------------------------------------------------------


BAD_FRAMES: list[tuple[str | bytes, str, str | None]] = [
    ('{"type": "user_message", "text": ', "bad_json", None),
    ("not json at all", "bad_json", None),
    ('[{"type": "ping"}]', "bad_frame", None),
    ('"ping"', "bad_frame", None),
    ('{"text": "no type"}', "bad_frame", None),
    ('{"type": "nope"}', "unknown_type", None),
    ('{"type": "nope", "client_msg_id": "m0"}', "unknown_type", "m0"),
    ('{"type": "user_message"}', "bad_frame", None),
    ('{"type": "user_message", "text": 42, "client_msg_id": "m1"}', "bad_frame", "m1"),
    ('{"type": "cancel"}', "bad_frame", None),
    ('{"type": "cancel", "run_id": "run_does_not_exist"}', "not_found", None),
    (b'{"type": "ping"}', "bad_frame", None),
]


async def test_bad_input_gets_typed_errors_and_connection_stays_usable(live_server: Server) -> None:
    """Each bad frame gets its typed error (echoing client_msg_id); a run then works normally."""
    error_schema = load_validator("error")
    with trio.fail_after(TIMEOUT):
        async with connect(live_server.url_for("alice")) as client:
            await client.ready()
            for message, code, client_msg_id in BAD_FRAMES:
                await client.send_raw(message)
                error = await client.expect("error")
                error_schema.validate(error)
                assert error["code"] == code, (message, error)
                assert error.get("client_msg_id") == client_msg_id, (message, error)

            accepted, events = await client.run(CALC, client_msg_id="m2")

        assert_calc_run(accepted, events, client_msg_id="m2")
        assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
        check_lifecycle(client.frames)


async def test_cancel_of_finished_run_is_not_found(live_server: Server) -> None:
    """cancel of a run that already ended gets not_found and emits nothing for that run."""
    with trio.fail_after(TIMEOUT):
        async with connect(live_server.url_for("alice")) as client:
            await client.ready()
            accepted, events = await client.run(CALC)
            await client.send({"type": "cancel", "run_id": accepted["run_id"]})
            error = await client.expect("error")
            assert error["code"] == "not_found"
            await client.ping()
        assert client.events(accepted["run_id"]) == events
        check_lifecycle(client.frames)


# --- 5. fan-out and isolation ----------------------------------------------------------------


async def test_tabs_of_one_user_share_the_stream_and_other_users_see_nothing(
    live_server: Server,
) -> None:
    """Both tabs of a user get identical events; run_accepted goes to the sender; others see none."""
    with trio.fail_after(TIMEOUT):
        async with (
            connect(live_server.url_for("alice")) as tab_a,
            connect(live_server.url_for("alice")) as tab_b,
            connect(live_server.url_for("bob")) as bob,
        ):
            ready_a = await tab_a.ready()
            ready_b = await tab_b.ready()
            ready_bob = await bob.ready()
            accepted, events_a = await tab_a.run(CALC, client_msg_id="m1")
            run_id = accepted["run_id"]
            events_b = await tab_b.until_terminal(run_id)
            await tab_b.ping()
            await bob.ping()

        assert ready_a["session_id"] == ready_b["session_id"]
        assert ready_bob["session_id"] != ready_a["session_id"]
        assert ready_bob["user_id"] == "bob"

        assert_calc_run(accepted, events_a, client_msg_id="m1")
        assert events_b == events_a
        assert tab_b.raw_events() == tab_a.raw_events()

        assert [f["type"] for f in tab_a.frames].count("run_accepted") == 1
        assert [f["type"] for f in tab_b.frames] == [
            "session_ready",
            *(e["type"] for e in events_b),
            "pong",
        ]
        assert [f["type"] for f in bob.frames] == ["session_ready", "pong"]
        for tab in (tab_a, tab_b, bob):
            check_lifecycle(tab.frames)


# --- 6. sessions outlive connections ----------------------------------------------------------


async def test_session_outlives_its_connection(live_server: Server) -> None:
    """Closing the last connection keeps the session and its run; seq continues on reconnect."""
    with trio.fail_after(TIMEOUT):
        async with connect(live_server.url_for("alice")) as first:
            ready1 = await first.ready()
            stream_run = (await first.start("stream 50"))["run_id"]
        # The first connection is closed now, possibly in the middle of the run.
        check_lifecycle(first.frames, require_terminal=False)
        seen_before = first.events()

        async with connect(live_server.url_for("alice")) as second:
            ready2 = await second.ready()
            accepted, new_events = await second.run(CALC)

    assert ready2["session_id"] == ready1["session_id"]
    last_seq = ready2["last_seq"]
    assert last_seq >= (seen_before[-1]["seq"] if seen_before else 0)

    # The second connection gets every event after last_seq, gap-free: first the rest of
    # the stream run (if it was still going), then the new run, queued behind it on "main".
    events = second.events()
    assert [e["seq"] for e in events] == list(range(last_seq + 1, last_seq + 1 + len(events)))
    tail = events[: len(events) - len(new_events)]
    assert events[len(tail) :] == new_events
    assert all(e["run_id"] == stream_run for e in tail)
    if tail:
        assert tail[-1]["type"] == "agent_completed"
    # The stream run went to its end although its only connection closed: it emitted
    # agent_started, one agent_thinking, 50 partial_result and agent_completed (53 events).
    assert new_events[0]["seq"] == 54

    assert_calc_run(accepted, new_events, client_msg_id=None)
    report = check_lifecycle(new_events, first_seq=new_events[0]["seq"])
    assert report.runs[accepted["run_id"]].terminal == "agent_completed"


# --- 7. frame size limit ----------------------------------------------------------------------


async def test_frame_over_max_size_closes_with_1009(small_frame_server: Server) -> None:
    """A client frame over max_frame_bytes closes that connection (1009); other tabs keep working."""
    server = small_frame_server
    with trio.fail_after(TIMEOUT):
        async with (
            connect(server.url_for("alice")) as big,
            connect(server.url_for("alice")) as other,
        ):
            await big.ready()
            await other.ready()
            await big.send({"type": "user_message", "text": "x" * 2048})
            with pytest.raises(trio_websocket.ConnectionClosed) as info:
                await big.receive()
            assert info.value.reason.code == 1009
            assert [f["type"] for f in big.frames] == ["session_ready"]

            await other.ping()
            accepted, events = await other.run(CALC)

        assert_calc_run(accepted, events, client_msg_id=None)
        check_lifecycle(other.frames)
