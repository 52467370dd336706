"""Protocol v1 over ASGI: a Starlette app hosting the runtime as a Trio guest of asyncio.

Most tests use Starlette's ``TestClient`` (the app runs on an asyncio loop in a portal
thread; no sockets). One end-to-end test serves the app with uvicorn in a subprocess on a
free port and talks to it with the repository's real WebSocket client.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from conftest import TEST_SECRET
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.testclient import TestClient, WebSocketTestSession
from starlette.websockets import WebSocket, WebSocketDisconnect
from wsclient import connect, http_exchange

from netra_actors import Config, TransportClosed, issue_token
from netra_actors.aio import AsyncioRuntime
from netra_actors.asgi import (
    AsgiTransport,
    AsgiWebSocket,
    handshake_request,
    token_authenticator,
    websocket_route,
)
from netra_actors.testing import TERMINAL_EVENTS, check_lifecycle

MakeConfig = Callable[..., Config]
Frame = dict[str, Any]


def token(user_id: str) -> str:
    return issue_token(user_id, TEST_SECRET.encode(), ttl=600)


def make_app(config: Config, **options: Any) -> tuple[Starlette, AsyncioRuntime]:
    runtime = AsyncioRuntime(config)
    authenticate = options.pop("authenticate", None) or token_authenticator(config)
    endpoint = websocket_route(runtime, authenticate)
    app = Starlette(routes=[WebSocketRoute("/ws", endpoint)], lifespan=runtime.lifespan)
    return app, runtime


@pytest.fixture
def served(make_config: MakeConfig) -> Iterator[tuple[TestClient, AsyncioRuntime]]:
    app, runtime = make_app(make_config())
    with TestClient(app) as client:
        yield client, runtime


def receive(ws: WebSocketTestSession) -> Frame:
    frame: Frame = json.loads(ws.receive_text())
    return frame


def until_terminal(ws: WebSocketTestSession, run_id: str, frames: list[Frame]) -> list[Frame]:
    """Receive into ``frames`` up to the terminal event of ``run_id``; that run's events."""
    while not any(f.get("run_id") == run_id and f["type"] in TERMINAL_EVENTS for f in frames):
        frames.append(receive(ws))
    return [f for f in frames if "seq" in f and f["run_id"] == run_id]


def start(ws: WebSocketTestSession, text: str, frames: list[Frame]) -> str:
    """Send a ``user_message``; its run id (frames before ``run_accepted`` are kept)."""
    ws.send_text(json.dumps({"type": "user_message", "text": text}))
    while True:
        frame = receive(ws)
        frames.append(frame)
        if frame["type"] == "run_accepted":
            return str(frame["run_id"])


def test_a_run_over_asgi(served: tuple[TestClient, AsyncioRuntime]) -> None:
    """A demo run over the ASGI endpoint: ``session_ready`` first, then the run's events in
    ``seq`` order, well formed, ending with ``agent_completed`` (2+3*4 = 14)."""
    client, _ = served
    with client.websocket_connect(f"/ws?token={token('alice')}") as ws:
        frames = [receive(ws)]
        assert frames[0]["type"] == "session_ready"
        assert frames[0]["user_id"] == "alice"
        run_id = start(ws, "what is 2+3*4?", frames)
        events = until_terminal(ws, run_id, frames)
    check_lifecycle(frames)
    assert events[-1]["type"] == "agent_completed"
    assert "14" in events[-1]["data"]["final_response"]


def test_cancel_over_asgi(served: tuple[TestClient, AsyncioRuntime]) -> None:
    """A ``cancel`` frame stops a long tool: ``tool_completed`` cancelled, then
    ``agent_cancelled``."""
    client, _ = served
    with client.websocket_connect(f"/ws?token={token('bob')}") as ws:
        frames = [receive(ws)]
        run_id = start(ws, "sleep 30", frames)
        while not any(f["type"] == "tool_executing" for f in frames):
            frames.append(receive(ws))
        ws.send_text(json.dumps({"type": "cancel", "run_id": run_id}))
        events = until_terminal(ws, run_id, frames)
    check_lifecycle(frames)
    assert events[-1]["type"] == "agent_cancelled"
    tool = next(f for f in events if f["type"] == "tool_completed")
    assert tool["data"]["status"] == "cancelled"


@pytest.mark.parametrize(
    "query", ["", "?token=not-a-token", f"?token={issue_token('x', b'another-secret-' * 3)}"]
)
def test_bad_tokens_are_refused(served: tuple[TestClient, AsyncioRuntime], query: str) -> None:
    """A missing, malformed or badly signed token is refused with 1008 before accepting."""
    client, runtime = served
    with pytest.raises(WebSocketDisconnect) as refused, client.websocket_connect(f"/ws{query}"):
        pass  # pragma: no cover
    assert refused.value.code == 1008
    assert runtime.statistics().sessions == 0


def test_token_in_header_and_subprotocol(served: tuple[TestClient, AsyncioRuntime]) -> None:
    """The token is also accepted as ``Authorization: Bearer`` and as a ``bearer.<token>``
    subprotocol; ``netra.v1`` is selected when proposed."""
    client, _ = served
    headers = {"authorization": f"Bearer {token('carol')}"}
    with client.websocket_connect("/ws", headers=headers) as ws:
        assert receive(ws)["user_id"] == "carol"
    protocols = ["netra.v1", f"bearer.{token('dave')}"]
    with client.websocket_connect("/ws", subprotocols=protocols) as ws:
        assert ws.accepted_subprotocol == "netra.v1"
        assert receive(ws)["user_id"] == "dave"


def test_bad_query_parameters_are_refused(served: tuple[TestClient, AsyncioRuntime]) -> None:
    """An invalid ``batch`` or ``after_seq`` is refused with 1008 before accepting."""
    client, _ = served
    for query in ("batch=0", "after_seq=-1"):
        url = f"/ws?token={token('erin')}&{query}"
        with pytest.raises(WebSocketDisconnect) as refused, client.websocket_connect(url):
            pass  # pragma: no cover
        assert refused.value.code == 1008


def test_an_async_authenticate_hook(make_config: MakeConfig) -> None:
    """The application's own hook decides, and may be async (here: a header names the user)."""

    async def authenticate(websocket: AsgiWebSocket) -> str | None:
        assert isinstance(websocket, WebSocket)
        return handshake_request(websocket.scope).headers.get("x-user")

    app, _ = make_app(make_config(), authenticate=authenticate)
    with TestClient(app) as client:
        with client.websocket_connect("/ws", headers={"x-user": "fay"}) as ws:
            assert receive(ws)["user_id"] == "fay"
        with pytest.raises(WebSocketDisconnect) as refused, client.websocket_connect("/ws"):
            pass  # pragma: no cover
        assert refused.value.code == 1008


def test_client_disconnect_ends_the_connection(make_config: MakeConfig) -> None:
    """When the client goes away the connection actor ends: the runtime counts no
    connection, and the idle session then closes (awaited on the Trio side, no polling)."""
    app, runtime = make_app(make_config(idle_session_grace=0.05))
    with TestClient(app) as client:
        with client.websocket_connect(f"/ws?token={token('gus')}") as ws:
            receive(ws)
            assert runtime.statistics().connections == 1
            session = runtime.runtime.manager.session_for("gus")
            assert session is not None

        async def closed() -> None:
            with trio.fail_after(10):  # the session closes only after its last connection
                await session.wait_closed()

        client.portal.call(runtime.call, closed)
        assert runtime.statistics().connections == 0
        assert runtime.statistics().sessions == 0


def test_shutdown_closes_connections_with_going_away(make_config: MakeConfig) -> None:
    """Leaving the app's lifespan shuts the runtime down: an open connection gets the run's
    ``agent_cancelled`` (reason ``shutdown``), then a 1001 close."""
    app, runtime = make_app(make_config())
    frames: list[Frame] = []
    with TestClient(app) as client, client.websocket_connect(f"/ws?token={token('hal')}") as ws:
        frames.append(receive(ws))
        run_id = start(ws, "sleep 30", frames)
        while not any(f["type"] == "tool_executing" for f in frames):
            frames.append(receive(ws))
        # Shut down from the app's loop, as the lifespan's end does.
        assert client.portal is not None
        client.portal.call(runtime.call, runtime.runtime.aclose)
        events = until_terminal(ws, run_id, frames)
        with pytest.raises(WebSocketDisconnect) as closed:
            ws.receive_text()
        assert closed.value.code == 1001
    assert events[-1]["data"]["reason"] == "shutdown"


# -- a real server: uvicorn in a subprocess ---------------------------------------------------------

SERVER = textwrap.dedent(
    """
    import socket, sys
    import uvicorn
    from starlette.applications import Starlette
    from starlette.routing import WebSocketRoute
    from netra_actors import Config
    from netra_actors.aio import AsyncioRuntime
    from netra_actors.asgi import token_authenticator, websocket_route

    config = Config(store="memory", secret=sys.argv[1], data_dir=sys.argv[2])
    runtime = AsyncioRuntime(config)
    route = WebSocketRoute("/ws", websocket_route(runtime, token_authenticator(config)))
    app = Starlette(routes=[route], lifespan=runtime.lifespan)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    print(sock.getsockname()[1], flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    server.run(sockets=[sock])
    """
)


@pytest.fixture
def uvicorn_port(tmp_path: Path) -> Iterator[int]:
    """The port of a uvicorn server (subprocess) serving the demo runtime over ASGI."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    log = tmp_path / "server.log"
    with log.open("w") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-c", SERVER, TEST_SECRET, str(tmp_path)],
            stdout=subprocess.PIPE,
            stderr=stderr,
            env=env,
            text=True,
        )
    try:
        assert process.stdout is not None
        ready, _, _ = select.select([process.stdout], [], [], 30)
        assert ready, "the server did not report its port within 30 s"
        yield int(process.stdout.readline())
    finally:
        process.terminate()
        try:
            # uvicorn shuts down gracefully on SIGTERM (the lifespan ends, so the runtime
            # closes), then re-raises the signal: -15 is a clean exit.
            assert process.wait(timeout=15) in (0, -signal.SIGTERM)
        finally:
            process.kill()
            if process.stdout is not None:
                process.stdout.close()
    output = log.read_text()
    assert "Traceback" not in output, output


@pytest.mark.network
async def test_end_to_end_over_uvicorn(uvicorn_port: int) -> None:
    """Over real sockets through uvicorn: a run's events arrive in order and well formed,
    a cancel works, and a bad token is refused (HTTP 403)."""
    url = f"ws://127.0.0.1:{uvicorn_port}/ws"
    with trio.fail_after(20):
        for _ in range(200):  # uvicorn starts listening shortly after printing the port
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", uvicorn_port)
            except OSError:
                await trio.sleep(0.05)
            else:
                await stream.aclose()
                break
        async with connect(f"{url}?token={token('ivy')}", subprotocols=["netra.v1"]) as client:
            assert client.ws.subprotocol == "netra.v1"
            await client.ready()
            _, events = await client.run("what is 2+3*4?")
            assert events[-1]["type"] == "agent_completed"
            accepted = await client.start("sleep 30")
            run_id = accepted["run_id"]
            await client.until_event(run_id, lambda f: f["type"] == "tool_executing")
            await client.send({"type": "cancel", "run_id": run_id})
            cancelled = await client.until_terminal(run_id)
            assert cancelled[-1]["type"] == "agent_cancelled"
            check_lifecycle(client.frames)
        with pytest.raises(Exception) as refused:  # noqa: PT011 - ConnectionRejected
            async with connect(f"{url}?token=bad"):
                pass  # pragma: no cover
        assert getattr(refused.value, "status_code", None) == 403


def test_doc_starlette_example_serves(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The Starlette app of docs/embedding.md serves a demo run to a token of its secret."""
    monkeypatch.chdir(tmp_path)
    doc = Path(__file__).resolve().parent.parent / "docs" / "embedding.md"
    blocks = re.findall(r"```python\n(.*?)```", doc.read_text(), flags=re.S)
    namespace: dict[str, Any] = {}
    exec(next(b for b in blocks if "lifespan=rt.lifespan" in b), namespace)
    secret = namespace["config"].secret.encode()
    user_token = issue_token("lee", secret, ttl=600)
    with TestClient(namespace["app"]) as client:
        with client.websocket_connect(f"/ws?token={user_token}") as ws:
            frames = [receive(ws)]
            run_id = start(ws, "what is 2+3*4?", frames)
            events = until_terminal(ws, run_id, frames)
        with pytest.raises(WebSocketDisconnect) as refused, client.websocket_connect("/ws"):
            pass  # pragma: no cover
    assert events[-1]["type"] == "agent_completed"
    assert refused.value.code == 1008


def test_fastapi_example(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """examples/fastapi_app.py: an HTTP handler runs a demo run in-process, /stats answers
    synchronously, and /ws serves protocol v1 whose runs the cancel route can cancel."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NETRA_ACTORS_SECRET", TEST_SECRET)
    path = Path(__file__).resolve().parent.parent / "examples" / "fastapi_app.py"
    spec = importlib.util.spec_from_file_location("fastapi_app_example", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with TestClient(module.app) as client:
        answer = client.post("/runs", json={"user_id": "max", "text": "what is 2+3*4?"})
        assert answer.status_code == 200
        types = [e["type"] for e in answer.json()["events"]]
        assert types[0] == "agent_started"
        assert types[-1] == "agent_completed"
        assert client.get("/stats").json()["sessions"] == 1
        with client.websocket_connect(f"/ws?token={token('max')}") as ws:
            frames = [receive(ws)]
            run_id = start(ws, "sleep 30", frames)
            while not any(f["type"] == "tool_executing" for f in frames):
                frames.append(receive(ws))
            cancelled = client.post(f"/runs/max/{run_id}/cancel").json()
            assert cancelled == {"run_id": run_id, "state": "active"}
            events = until_terminal(ws, run_id, frames)
        assert events[-1]["type"] == "agent_cancelled"
        check_lifecycle(frames)


def test_transport_over_raw_asgi_callables(make_config: MakeConfig) -> None:
    """``AsgiTransport`` over plain ASGI ``receive``/``send``: text and bytes frames, the
    peer's ``websocket.disconnect`` (its code), an idempotent close, and a failing ``send``
    all map onto the ``Transport`` contract."""
    sent: list[dict[str, Any]] = []

    async def main() -> None:
        inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        for message in (
            {"type": "websocket.receive", "text": "hello"},
            {"type": "websocket.receive", "bytes": b"\x00\x01"},
            {"type": "websocket.disconnect", "code": 4000, "reason": "bye"},
        ):
            inbox.put_nowait(message)

        async def send(message: dict[str, Any]) -> None:
            await asyncio.sleep(0)
            sent.append(message)

        async def broken_send(message: dict[str, Any]) -> None:
            raise OSError("connection reset")

        async def exercise() -> None:
            transport = AsgiTransport(inbox.get, send)
            await transport.send_text("frame")
            await transport.ping()
            assert await transport.receive() == "hello"
            assert await transport.receive() == b"\x00\x01"
            with pytest.raises(TransportClosed) as gone:
                await transport.receive()
            assert (gone.value.code, gone.value.reason) == (4000, "bye")
            with pytest.raises(TransportClosed):
                await transport.send_text("too late")
            await transport.close(1000)  # the peer already closed: nothing is sent
            fresh = AsgiTransport(inbox.get, send)
            await fresh.close(1001, "going away")
            await fresh.close(1000)
            broken = AsgiTransport(inbox.get, broken_send)
            with pytest.raises(TransportClosed) as failed:
                await broken.send_text("x")
            assert failed.value.code == 1006
            aborted = AsgiTransport(inbox.get, send)
            await aborted.abort()
            assert aborted.aborted
            with pytest.raises(TransportClosed):
                await aborted.ping()

        async with AsyncioRuntime(make_config()) as rt:
            await rt.call(exercise)

    asyncio.run(main())
    assert sent == [
        {"type": "websocket.send", "text": "frame"},
        {"type": "websocket.close", "code": 1001, "reason": "going away"},
    ]


def test_a_cancelled_receive_loses_no_message(make_config: MakeConfig) -> None:
    """The connection's reader cancels ``receive`` after a quiet heartbeat interval; a
    message that the ASGI server hands over just then is returned by the next
    ``receive``, never dropped."""
    got: list[str | bytes] = []
    calls: list[int] = []

    async def main() -> None:
        inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

        async def asgi_receive() -> dict[str, Any]:
            calls.append(1)
            return await inbox.get()

        async def send(message: dict[str, Any]) -> None:
            await asyncio.sleep(0)

        async def exercise() -> None:
            transport = AsgiTransport(asgi_receive, send)
            for text in ("first", "second"):
                with trio.move_on_after(0.01) as quiet:
                    await transport.receive()  # nothing comes: cancelled while waiting
                assert quiet.cancelled_caught
                inbox.put_nowait({"type": "websocket.receive", "text": text})
                got.append(await transport.receive())
            inbox.put_nowait({"type": "websocket.disconnect", "code": 1000})
            with pytest.raises(TransportClosed):
                await transport.receive()

        async with AsyncioRuntime(make_config()) as rt:
            await rt.call(exercise)

    asyncio.run(main())
    assert got == ["first", "second"]
    # One ASGI receive per message: a cancelled call never abandoned one (which, had a
    # message come at that moment, would have taken it with it).
    assert len(calls) == 3


# --- the protocol's behaviour does not depend on the transport ------------------------------


def test_resume_over_asgi_gets_exactly_the_missed_events(
    served: tuple[TestClient, AsyncioRuntime],
) -> None:
    """A connection that saw part of a stream, then a new one resuming after its last
    ``seq`` (with the ``session_id``): the events after it, in order, nothing before."""
    client, _ = served
    with client.websocket_connect(f"/ws?token={token('rita')}") as ws:
        frames = [receive(ws)]
        session_id = frames[0]["session_id"]
        run_id = start(ws, "stream 20", frames)
        events = until_terminal(ws, run_id, frames)
    cut = events[len(events) // 2]["seq"]
    query = f"/ws?token={token('rita')}&after_seq={cut}&session_id={session_id}"
    with client.websocket_connect(query) as ws:
        ready = receive(ws)
        assert ready["after_seq"] == cut
        resumed = [receive(ws) for _ in range(events[-1]["seq"] - cut)]
    assert resumed == [e for e in events if e["seq"] > cut]


def test_thread_policies_over_asgi(served: tuple[TestClient, AsyncioRuntime]) -> None:
    """``reject`` on a busy thread answers ``busy``; ``interrupt`` cancels the active run
    (``agent_cancelled`` reason ``interrupted``) and runs the new one."""
    client, _ = served
    with client.websocket_connect(f"/ws?token={token('tom')}") as ws:
        frames = [receive(ws)]
        first = start(ws, "sleep 30", frames)
        ws.send_text(json.dumps({"type": "user_message", "text": "hi", "policy": "reject"}))
        while not any(f["type"] == "error" for f in frames):
            frames.append(receive(ws))
        assert next(f for f in frames if f["type"] == "error")["code"] == "busy"
        ws.send_text(
            json.dumps({"type": "user_message", "text": "what is 2+3*4?", "policy": "interrupt"})
        )
        second = None
        while second is None:
            frame = receive(ws)
            frames.append(frame)
            if frame["type"] == "run_accepted" and frame["run_id"] != first:
                second = frame["run_id"]
        interrupted = until_terminal(ws, first, frames)
        answered = until_terminal(ws, second, frames)
    check_lifecycle(frames)
    assert interrupted[-1]["type"] == "agent_cancelled"
    assert interrupted[-1]["data"]["reason"] == "interrupted"
    assert answered[-1]["type"] == "agent_completed"


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ("{not json", "bad_json"),
        ('{"type": "teleport"}', "unknown_type"),
        ('{"type": "user_message"}', "bad_frame"),
        ('{"type": "cancel", "run_id": "run_nope"}', "not_found"),
    ],
)
def test_bad_frames_over_asgi_get_typed_errors_and_the_connection_goes_on(
    served: tuple[TestClient, AsyncioRuntime], frame: str, code: str
) -> None:
    """Each bad frame gets ``error`` with its code; the same connection then answers a ping."""
    client, _ = served
    with client.websocket_connect(f"/ws?token={token('eve')}") as ws:
        receive(ws)
        ws.send_text(frame)
        error = receive(ws)
        assert error["type"] == "error"
        assert error["code"] == code
        ws.send_text('{"type": "ping"}')
        assert receive(ws)["type"] == "pong"


FASTAPI_EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "fastapi_app.py"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_the_fastapi_example_as_documented(tmp_path: Path) -> None:
    """``python examples/fastapi_app.py --port PORT``: its own route answers beside /ws,
    where a real WebSocket client with a ``netra-actors token``-style token runs the demo."""
    port = _free_port()
    env = {**os.environ, "NETRA_ACTORS_SECRET": TEST_SECRET, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(  # noqa: ASYNC220 (started once, before the client)
        [sys.executable, str(FASTAPI_EXAMPLE), "--port", str(port)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        with trio.fail_after(30):
            while True:  # the server listens once uvicorn has started
                try:
                    stream = await trio.open_tcp_stream("127.0.0.1", port)
                except OSError:
                    assert process.poll() is None, "the example exited"
                    await trio.sleep(0.05)
                else:
                    await stream.aclose()
                    break
            stats = await http_exchange(port, b"GET /stats HTTP/1.1\r\nHost: x\r\n\r\n")
            assert stats.status == 200
            assert json.loads(stats.body)["sessions"] == 0
            async with connect(f"ws://127.0.0.1:{port}/ws?token={token('zoe')}") as client:
                await client.ready()
                _, events = await client.run("what is 2+3*4?")
            assert events[-1]["type"] == "agent_completed"
            check_lifecycle(client.frames)
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        finally:
            process.kill()
            assert process.stderr is not None
            errors = process.stderr.read()
            process.stderr.close()
    assert "Traceback" not in errors, errors
