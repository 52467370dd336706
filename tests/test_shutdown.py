"""Graceful shutdown over real sockets: the ``netra-actors serve`` process on SIGTERM/SIGINT,
leaving ``async with Runtime`` in process, and refusing new connections meanwhile.

Real clock; every test is bounded by ``trio.fail_after`` and waits for frames,
process output or events, never for time. Every frame received is validated
against docs/schemas (``wsclient``); every event stream goes through
``check_lifecycle``.
"""

from __future__ import annotations

import json
import os
import re
import signal
import ssl
import subprocess
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path

import pytest
import trio
import trio_websocket
import trustme
from wsclient import Frame, WsClient, connect, http_get, served

from netra_actors import AgentWebSocketBridge, Config, Gateway, Runtime, issue_token, serve
from netra_actors.testing import check_lifecycle

pytestmark = pytest.mark.network

#: Upper bound for every test; generous for a loaded machine (each takes one to three seconds).
TIMEOUT = 30
TEST_SECRET = "netra-actors-test-secret-0123456789abcdef"
CALC = "what is 2+3*4?"
URL = re.compile(r"wss?://127\.0\.0\.1:\d+/ws")


async def close_code(client: WsClient) -> int | None:
    """Receive (and record) frames until the server closes the connection; its close code."""
    try:
        while True:
            await client.receive()
    except trio_websocket.ConnectionClosed as exc:
        return exc.reason.code if exc.reason else None


async def refused(url: str) -> tuple[int, dict[str, object]]:
    """Connect to ``url``, which must refuse the handshake; its ``(status, JSON body)``."""
    with pytest.raises(trio_websocket.ConnectionRejected) as info:
        async with connect(url):
            pytest.fail(f"the handshake on {url} was accepted")
    return info.value.status_code, json.loads(info.value.body or b"")


async def start_active_and_queued(client: WsClient) -> tuple[str, str]:
    """Start ``sleep 30`` (active, inside its tool) and a calculator run queued behind it."""
    await client.ready()
    active = (await client.start("sleep 30"))["run_id"]
    await client.until_event(active, lambda f: f["type"] == "tool_executing")
    queued = (await client.start(CALC))["run_id"]
    return active, queued


def assert_shutdown_events(client: WsClient, active: str, queued: str) -> None:
    """The active run ended its tool (cancelled) then agent_cancelled shutdown; the queued run got a lone one."""
    active_events = client.events(active)
    assert [e["type"] for e in active_events[-2:]] == ["tool_completed", "agent_cancelled"]
    assert active_events[-2]["data"]["status"] == "cancelled"
    assert active_events[-2]["data"]["tool_name"] == "sleep"
    assert active_events[-1]["data"]["reason"] == "shutdown"
    queued_events = client.events(queued)
    assert [e["type"] for e in queued_events] == ["agent_cancelled"]
    assert queued_events[0]["data"]["reason"] == "shutdown"
    report = check_lifecycle(client.frames)
    assert report.runs[active].terminal == report.runs[queued].terminal == "agent_cancelled"
    assert [f["type"] for f in client.frames if "seq" not in f] == [
        "session_ready",
        "run_accepted",
        "run_accepted",
    ]


# --- the CLI process --------------------------------------------------------------------------


class Output:
    """Collects a process's stdout; ``wait_for`` waits until some text has appeared."""

    def __init__(self) -> None:
        self.text = ""
        self._changed = trio.Event()
        self.closed = False

    async def collect(self, stream: trio.abc.ReceiveStream) -> None:
        async with stream:
            while data := await stream.receive_some():
                self.text += data.decode(errors="replace")
                self._changed.set()
                self._changed = trio.Event()
        self.closed = True
        self._changed.set()

    async def wait_for(self, pattern: re.Pattern[str]) -> re.Match[str]:
        while not (match := pattern.search(self.text)):
            assert not self.closed, f"stdout ended without {pattern.pattern!r}: {self.text!r}"
            await self._changed.wait()
        return match


@pytest.mark.parametrize(
    ("signum", "tls"),
    [(signal.SIGTERM, False), (signal.SIGINT, False), (signal.SIGTERM, True)],
    ids=["SIGTERM", "SIGINT", "SIGTERM-tls"],
)
async def test_cli_shuts_down_gracefully_on_signal(
    tmp_path: Path, signum: signal.Signals, tls: bool
) -> None:
    """On SIGTERM/SIGINT the server cancels runs (reason shutdown), closes 1001 and exits 0."""
    env = {**os.environ, "NETRA_ACTORS_SECRET": TEST_SECRET, "PYTHONUNBUFFERED": "1"}
    command = [
        sys.executable,
        "-m",
        "netra_actors",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--data-dir",
        str(tmp_path / "data"),
        "--shutdown-grace",
        "5",
    ]
    client_tls: ssl.SSLContext | None = None
    if tls:
        ca = trustme.CA()
        cert = ca.issue_cert("127.0.0.1")
        cert.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
        cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
        command += [
            "--tls-cert",
            str(tmp_path / "cert.pem"),
            "--tls-key",
            str(tmp_path / "key.pem"),
        ]
        client_tls = ssl.create_default_context()
        ca.configure_trust(client_tls)
    output = Output()
    with (tmp_path / "stderr.txt").open("wb") as stderr:
        process = await trio.lowlevel.open_process(
            command, stdout=subprocess.PIPE, stderr=stderr, env=env
        )
        try:
            with trio.fail_after(TIMEOUT):
                async with trio.open_nursery() as nursery:
                    assert process.stdout is not None
                    nursery.start_soon(output.collect, process.stdout)
                    url = (await output.wait_for(URL)).group(0)
                    assert url.startswith("wss://" if tls else "ws://")
                    token = issue_token("alice", TEST_SECRET.encode(), ttl=600)
                    async with connect(f"{url}?token={token}", ssl_context=client_tls) as client:
                        active, queued = await start_active_and_queued(client)
                        process.send_signal(signum)
                        code = await close_code(client)
                    returncode = await process.wait()
        finally:
            if process.returncode is None:
                process.kill()
                with trio.CancelScope(shield=True):
                    await process.wait()
    errors = (tmp_path / "stderr.txt").read_text(errors="replace")
    assert returncode == 0, errors
    assert code == 1001
    assert_shutdown_events(client, active, queued)
    assert f"{signum.name}, shutting down" in output.text
    assert output.text.rstrip().endswith("netra-actors: stopped"), output.text
    assert "Traceback" not in errors


# --- in process -------------------------------------------------------------------------------


async def test_leaving_runtime_cancels_runs_then_closes_1001(
    make_config: Callable[..., Config],
) -> None:
    """Leaving ``async with Runtime`` with a run active over a real connection: agent_cancelled shutdown, then 1001."""
    config = make_config()
    codes: list[int | None] = []

    async def user(url: str, *, task_status: trio.TaskStatus[tuple[WsClient, str, str]]) -> None:
        async with connect(url) as client:
            active, queued = await start_active_and_queued(client)
            task_status.started((client, active, queued))
            codes.append(await close_code(client))

    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as listener:
            # Leaving this block shuts the runtime down first (the listener still runs),
            # then waits for the user task, which reads until the server closes.
            async with trio.open_nursery() as users, Runtime(config) as runtime:
                info = await listener.start(serve, runtime, config)
                token = issue_token("alice", TEST_SECRET.encode(), ttl=600)
                client, active, queued = await users.start(user, f"{info.url}?token={token}")
            listener.cancel_scope.cancel()

    assert codes == [1001]
    assert_shutdown_events(client, active, queued)
    stats = runtime.statistics()
    assert (stats.sessions, stats.connections, stats.active_runs, stats.queued_runs) == (0, 0, 0, 0)


async def test_gateway_not_accepting_refuses_new_connections_with_503(
    make_config: Callable[..., Config],
) -> None:
    """With ``gateway.accepting`` off, handshakes get 503 and /healthz 503; open connections keep working."""
    with trio.fail_after(TIMEOUT):
        async with served(make_config()) as server, connect(server.url_for("alice")) as client:
            await client.ready()
            server.gateway.accepting = False
            status, body = await refused(server.url_for("bob"))
            assert (status, body["error"]) == (503, "unavailable")
            health = await http_get(server.port, "/healthz")
            assert health.status == 503
            payload = health.json()
            assert (payload["status"], payload["ready"], payload["live"]) == (
                "shutting_down",
                False,
                True,
            )
            assert server.runtime.manager.session_for("bob") is None

            _, events = await client.run(CALC)
            await client.ping()
    assert events[-1]["type"] == "agent_completed"
    check_lifecycle(client.frames)


async def test_runtime_closing_refuses_new_connections_and_messages(
    make_config: Callable[..., Config],
) -> None:
    """While runtime.aclose() is in progress: handshakes get 503, /healthz 503, user_message error unavailable."""
    cancelling = trio.Event()
    release = trio.Event()

    async def stubborn(bridge: AgentWebSocketBridge) -> str:
        """Holds its cancellation until the test releases it."""
        try:
            await trio.sleep_forever()
        finally:
            cancelling.set()
            with trio.CancelScope(shield=True):
                await release.wait()
        return "unreachable"

    config = make_config(agent="stubborn", shutdown_grace=TIMEOUT)
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as listener:
            async with Runtime(config, agents={"stubborn": stubborn}) as runtime:
                gateway = Gateway(runtime, config)
                info = await listener.start(partial(serve, runtime, config, gateway=gateway))
                token = issue_token("alice", TEST_SECRET.encode(), ttl=600)
                async with connect(f"{info.url}?token={token}") as client:
                    await client.ready()
                    run_id = (await client.start("hold"))["run_id"]
                    await client.until_event(run_id, lambda f: f["type"] == "agent_started")
                    async with trio.open_nursery() as closing:
                        closing.start_soon(runtime.aclose)
                        await cancelling.wait()
                        assert runtime.closing

                        bob = issue_token("bob", TEST_SECRET.encode(), ttl=600)
                        status, body = await refused(f"{info.url}?token={bob}")
                        assert (status, body["error"]) == (503, "unavailable")
                        health = await http_get(info.port, "/healthz")
                        assert (health.status, health.json()["status"]) == (503, "shutting_down")
                        await client.send(
                            {"type": "user_message", "text": CALC, "client_msg_id": "late"}
                        )
                        error: Frame = await client.expect("error")
                        release.set()
                    code = await close_code(client)
            listener.cancel_scope.cancel()

    assert (error["code"], error["client_msg_id"]) == ("unavailable", "late")
    assert code == 1001
    events = client.events(run_id)
    assert [e["type"] for e in events] == ["agent_started", "agent_cancelled"]
    assert events[-1]["data"]["reason"] == "shutdown"
    check_lifecycle(client.frames)
