"""Crash recovery (issue #5): a ``netra-actors serve`` process killed with SIGKILL mid-run,
restarted on the same data directory, and clients resuming with ``after_seq``.

What a client saw before the kill is still there byte for byte, nothing is
duplicated, ``seq`` continues without a gap, the interrupted run is closed
(its open tool call ``tool_completed`` cancelled, then one ``agent_error``
``interrupted``), a new run continues the stream, and the thread's conversation
history survives, both across the kill and across a clean restart in process.

Real processes and sockets on 127.0.0.1, real clock. Nothing waits for time:
every step waits for process output or for specific frames, bounded by
``trio.fail_after``. An in-process "crash" (cancelling the runtime's scope) is
not tested here: cancellation still lets runs emit ``agent_cancelled``, so it
would not leave a run open the way a SIGKILL does.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import attrs
import trio
import trio_websocket
from wsclient import Frame, WsClient, connect, http_get, is_terminal

from netra_actors import (
    ChatMessage,
    ChatRequest,
    Config,
    Runtime,
    ScriptedLLMProvider,
    ScriptedTurn,
    ToolCall,
    ToolRegistry,
    issue_token,
    tool_calling_agent,
)
from netra_actors.testing import LifecycleChecker, check_lifecycle

#: Upper bound for each server process's part of a test (each part takes one to three seconds).
TIMEOUT = 25
TEST_SECRET = "netra-actors-test-secret-0123456789abcdef"
URL = re.compile(r"ws://127\.0\.0\.1:(\d+)/ws")
CALC = "what is 2+3*4?"
CALC_AFTER = "what is 6*7?"
SLEEP = "sleep 30"


# --- the server process -------------------------------------------------------------------------


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


@attrs.frozen
class ServerProcess:
    """A running ``netra-actors serve`` and where it listens."""

    process: trio.Process
    output: Output
    port: int

    def url(self, user_id: str, **query: str | int) -> str:
        token = issue_token(user_id, TEST_SECRET.encode(), ttl=600)
        return f"ws://127.0.0.1:{self.port}/ws?{urlencode({'token': token, **query})}"


@asynccontextmanager
async def server_process(
    data_dir: Path, stderr_path: Path, *flags: str
) -> AsyncIterator[ServerProcess]:
    """``netra-actors serve`` on a free port over ``data_dir`` (SQLite store), once it listens.

    The banner is printed after the runtime has started (and recovered the runs
    a previous process left open) and the listener is bound. A process still
    running when the block ends is killed.
    """
    env = {**os.environ, "NETRA_ACTORS_SECRET": TEST_SECRET, "PYTHONUNBUFFERED": "1"}
    command = [
        *(sys.executable, "-m", "netra_actors", "serve"),
        *("--host", "127.0.0.1", "--port", "0"),
        *("--data-dir", str(data_dir), "--store", "sqlite"),
        *flags,
    ]
    output = Output()
    with stderr_path.open("ab") as stderr:
        process = await trio.lowlevel.open_process(
            command, stdout=subprocess.PIPE, stderr=stderr, env=env
        )
        async with trio.open_nursery() as nursery:
            assert process.stdout is not None
            nursery.start_soon(output.collect, process.stdout)
            try:
                port = int((await output.wait_for(URL)).group(1))
                yield ServerProcess(process, output, port)
            finally:
                if process.returncode is None:
                    process.kill()
                    with trio.CancelScope(shield=True):
                        await process.wait()


async def until_closed(client: WsClient) -> int | None:
    """Receive (and record) frames until the connection ends; its close code."""
    try:
        while True:
            await client.receive()
    except trio_websocket.ConnectionClosed as exc:
        return exc.reason.code if exc.reason else None


async def until_seq(client: WsClient, seq: int) -> None:
    """Receive until the event with ``seq`` (the stream is in order, so all before it too)."""
    if not any(f.get("seq") == seq for f in client.frames):
        await client.receive_until(lambda f: f.get("seq", 0) >= seq)
    assert client.events()[-1]["seq"] == seq


def event_text(client: WsClient) -> dict[int, str]:
    """``seq`` -> the exact text of that event frame, as the client received it."""
    return {json.loads(raw)["seq"]: raw for raw in client.raw_events()}


# --- SIGKILL mid-run, restart, resume ------------------------------------------------------------


async def test_sigkill_mid_run_restart_and_resume(tmp_path: Path) -> None:
    """Kill -9 during a tool call; after a restart on the same data dir the stream is whole."""
    data_dir = tmp_path / "data"
    stderr_path = tmp_path / "stderr.txt"
    with trio.fail_after(TIMEOUT):
        # -- first process: one finished run, one killed inside its tool --------------------
        async with (
            server_process(data_dir, stderr_path) as server,
            connect(server.url("alice")) as before,
        ):
            ready = await before.ready()
            session_id = ready["session_id"]
            assert ready["last_seq"] == 0
            _, calc_events = await before.run(CALC)
            assert calc_events[-1]["type"] == "agent_completed"
            calc_run = calc_events[0]["run_id"]
            sleep_run = (await before.start(SLEEP))["run_id"]
            await before.until_event(sleep_run, lambda f: f["type"] == "tool_executing")

            server.process.kill()
            assert await server.process.wait() == -signal.SIGKILL
            assert await until_closed(before) == 1006  # no close frame: the process died
    seen = event_text(before)
    last_seen = max(seen)
    assert sorted(seen) == list(range(1, last_seen + 1))
    (executing,) = [e for e in before.events(sleep_run) if e["type"] == "tool_executing"]
    assert executing["data"]["tool_name"] == "sleep"
    assert executing["seq"] == last_seen  # nothing else happened while the tool slept
    check_lifecycle(before.frames, require_terminal=False)

    with trio.fail_after(TIMEOUT):
        # -- second process on the same data dir --------------------------------------------
        async with server_process(data_dir, stderr_path) as server:
            health = await http_get(server.port, "/healthz")
            assert health.status == 200
            assert (health.json()["active_runs"], health.json()["queued_runs"]) == (0, 0)
            async with (
                connect(server.url("alice", after_seq=last_seen, session_id=session_id)) as resumed,
                connect(server.url("alice", after_seq=0, session_id=session_id)) as whole,
            ):
                resumed_ready = await resumed.ready()
                whole_ready = await whole.ready()
                recovered_last = last_seen + 2  # tool_completed + agent_error
                for frame, after in ((resumed_ready, last_seen), (whole_ready, 0)):
                    assert frame["session_id"] == session_id
                    assert frame["user_id"] == "alice"
                    assert frame["last_seq"] == recovered_last
                    assert frame["after_seq"] == after
                await until_seq(resumed, recovered_last)
                await until_seq(whole, recovered_last)

                # A new run on the same thread continues the stream, on both connections.
                accepted, after_events = await resumed.run(CALC_AFTER)
                new_run = accepted["run_id"]
                assert accepted["thread_id"] == "main"
                await whole.until_terminal(new_run)
                await resumed.ping()
                await whole.ping()
            server.process.send_signal(signal.SIGTERM)
            assert await server.process.wait() == 0

    errors = stderr_path.read_text(errors="replace")
    assert "Traceback" not in errors, errors

    # -- the whole stream (after_seq=0): gap-free, no repeats, what was seen is intact -------
    assert not [f for f in whole.frames + resumed.frames if f["type"] == "resume_gap"]
    whole_text = event_text(whole)
    whole_events = whole.events()
    seqs = [e["seq"] for e in whole_events]
    assert seqs == list(range(1, len(seqs) + 1)), seqs
    for seq, raw in seen.items():
        assert whole_text[seq] == raw, f"event {seq} changed across the restart"
    report = check_lifecycle(whole.frames)
    assert list(report.runs) == [calc_run, sleep_run, new_run]
    assert report.runs[calc_run].terminal == "agent_completed"
    assert report.runs[new_run].terminal == "agent_completed"
    assert report.runs[new_run].thread_id == "main"
    assert report.runs[new_run].first_seq == recovered_last + 1
    tool_keys = [
        (e["run_id"], e["type"], e["data"]["call_id"])
        for e in whole_events
        if e["type"] in ("tool_executing", "tool_completed")
    ]
    assert len(tool_keys) == len(set(tool_keys)) == 6  # one call per run, each opened and closed
    assert sum(is_terminal(e) for e in whole_events) == 3

    # -- the interrupted run: its open call cancelled, then one agent_error interrupted -------
    sleep_events = whole.events(sleep_run)
    assert [e["type"] for e in sleep_events] == [
        "agent_started",
        "agent_thinking",
        "tool_executing",
        "tool_completed",
        "agent_error",
    ]
    assert [e["seq"] for e in sleep_events[-2:]] == [last_seen + 1, last_seen + 2]
    completed, error = sleep_events[-2:]
    assert completed["data"]["call_id"] == executing["data"]["call_id"]
    assert completed["data"]["tool_name"] == "sleep"
    assert completed["data"]["status"] == "cancelled"
    assert completed["data"]["error"]["type"] == "cancelled"
    assert error["data"]["error"]["type"] == "interrupted"
    for event in sleep_events[-2:]:
        assert (event["thread_id"], event["trace_id"]) == (
            executing["thread_id"],
            executing["trace_id"],
        )
    assert report.runs[sleep_run].terminal == "agent_error"
    assert report.runs[sleep_run].last_seq == last_seen + 2

    # -- the resumed connection got exactly the events after its after_seq -------------------
    assert resumed.raw_events() == [whole_text[s] for s in range(last_seen + 1, max(seqs) + 1)]
    assert [e["seq"] for e in after_events] == list(range(recovered_last + 1, max(seqs) + 1))
    # The client's view across the kill (before, then resumed) is one valid stream.
    checker = LifecycleChecker()
    for frame in before.frames + resumed.frames:
        checker.feed(frame)
    assert checker.finish().runs.keys() == report.runs.keys()

    # -- the thread's conversation history survived the kill ---------------------------------
    config = Config(host="127.0.0.1", port=0, data_dir=data_dir, secret=TEST_SECRET, store="sqlite")
    with trio.fail_after(TIMEOUT):
        async with Runtime(config) as runtime:
            assert runtime.store is not None
            # A third start finds nothing left to recover and appends nothing.
            assert await runtime.store.open_runs() == []
            stored = await runtime.store.session_for("alice")
            history = await runtime.store.conversations.load("alice", "main")
    assert stored is not None
    assert (stored.session_id, stored.first_seq, stored.last_seq) == (session_id, 1, max(seqs))
    users = [m.content for m in history if m.role == "user"]
    # The killed run never finished its turn (it is saved when the agent returns), so
    # only the two complete turns are there, in order, each ending with its answer.
    assert users == [CALC, CALC_AFTER]
    answers = [m.content for m in history if m.role == "assistant" and not m.tool_calls]
    assert answers == [e["data"]["final_response"] for e in (calc_events[-1], after_events[-1])]
    assert_well_formed(history)


async def test_sigkill_while_streaming_loses_nothing_sent(tmp_path: Path) -> None:
    """Kill -9 while a run streams as fast as it can: every event sent was stored first.

    The store may hold events the client had not received yet (committed, not
    yet delivered); the interrupted run then ends right after the last stored one.
    A small window bounds how far the run gets ahead of the client, and makes the
    restarted server serve most of the stream from the store rather than its window.
    """
    window = ("--window-events", "64")
    data_dir = tmp_path / "data"
    stderr_path = tmp_path / "stderr.txt"
    with trio.fail_after(TIMEOUT):
        async with (
            server_process(data_dir, stderr_path, *window) as server,
            connect(server.url("alice")) as before,
        ):
            session_id = (await before.ready())["session_id"]
            run_id = (await before.start("stream 100000"))["run_id"]
            await before.until_event(run_id, lambda f: f["seq"] >= 100)
            server.process.kill()
            assert await server.process.wait() == -signal.SIGKILL
            assert await until_closed(before) == 1006
    seen = event_text(before)
    last_seen = max(seen)
    assert last_seen >= 100
    assert not any(is_terminal(e) for e in before.events())

    with trio.fail_after(TIMEOUT):
        async with (
            server_process(data_dir, stderr_path, *window) as server,
            connect(server.url("alice", after_seq=last_seen, session_id=session_id)) as resumed,
            connect(server.url("alice", after_seq=0, session_id=session_id)) as whole,
        ):
            ready = await resumed.ready()
            assert (await whole.ready())["last_seq"] == ready["last_seq"]
            assert ready["session_id"] == session_id
            recovered_last = ready["last_seq"]
            assert recovered_last > last_seen
            await until_seq(resumed, recovered_last)
            await until_seq(whole, recovered_last)

    whole_text = event_text(whole)
    assert sorted(whole_text) == list(range(1, recovered_last + 1))
    assert len(whole.raw_events()) == recovered_last  # each seq exactly once
    for seq, raw in seen.items():
        assert whole_text[seq] == raw, f"event {seq} changed across the restart"
    report = check_lifecycle(whole.frames)
    assert list(report.runs) == [run_id]
    events = whole.events(run_id)
    assert [e["type"] for e in events[-2:]] == ["partial_result", "agent_error"]
    assert events[-1]["data"]["error"]["type"] == "interrupted"
    assert events[-1]["seq"] == recovered_last
    assert resumed.raw_events() == [whole_text[s] for s in range(last_seen + 1, recovered_last + 1)]
    checker = LifecycleChecker()
    for frame in before.frames + resumed.frames:
        checker.feed(frame)
    assert checker.finish().runs[run_id].terminal == "agent_error"


# --- conversation history across a clean restart, in process ------------------------------------

REAL_ARGS = {"query": "weather", "api_key": "sk-real-secret"}


def assert_well_formed(messages: list[ChatMessage]) -> None:
    """Every assistant tool call is answered by a tool message, and nothing else."""
    open_calls: set[str | None] = set()
    for message in messages:
        if message.role == "tool":
            assert message.tool_call_id in open_calls, (message, messages)
            open_calls.discard(message.tool_call_id)
            continue
        assert not open_calls, f"unanswered tool calls {open_calls} before {message}"
        if message.role == "assistant" and message.tool_calls:
            open_calls = {c.call_id for c in message.tool_calls}
    assert not open_calls, f"unanswered tool calls {open_calls} at the end"


def _tools() -> ToolRegistry:
    registry = ToolRegistry()

    @registry.tool()
    async def lookup(query: str, api_key: str) -> dict[str, str]:
        """Look something up with a key."""
        await trio.lowlevel.checkpoint()
        return {"query": query, "answer": "sunny"}

    return registry


def _last_user(request: ChatRequest) -> int:
    return max(i for i, m in enumerate(request.messages) if m.role == "user")


def _script(seen: list[ChatRequest]) -> Callable[[ChatRequest], ScriptedTurn]:
    """``lookup``: call the tool, then answer; anything else: answer ``ok``."""

    def script(request: ChatRequest) -> ScriptedTurn:
        seen.append(request)
        last = _last_user(request)
        done = [m for m in request.messages[last:] if m.role == "tool"]
        if request.messages[last].content == "lookup" and not done:
            return ScriptedTurn(tool_calls=(ToolCall("call-look", "lookup", REAL_ARGS),))
        if request.messages[last].content == "lookup":
            return ScriptedTurn(answer=("It ", "is ", "sunny."))
        return ScriptedTurn(answer=("ok",))

    return script


def _runtime(config: Config, seen: list[ChatRequest]) -> Runtime:
    return Runtime(
        config,
        agents={"loop": tool_calling_agent(max_steps=4)},
        tools=_tools(),
        llm=ScriptedLLMProvider(_script(seen)),
    )


async def _run(runtime: Runtime, user: str, text: str, thread_id: str) -> list[dict[str, Any]]:
    handle = await runtime.start_run(user, text, thread_id=thread_id)
    frames: list[Frame] = [json.loads(e.frame) for e in await handle.collect()]
    check_lifecycle(frames)
    assert frames[-1]["type"] == "agent_completed"
    return frames


async def test_conversation_history_survives_a_restart(tmp_path: Path) -> None:
    """The model sees a thread's earlier turn (real tool arguments) after a restart; others don't."""
    config = Config(host="127.0.0.1", port=0, data_dir=tmp_path, secret=TEST_SECRET, store="sqlite")
    first: list[ChatRequest] = []
    second: list[ChatRequest] = []
    with trio.fail_after(TIMEOUT):
        async with _runtime(config, first) as runtime:
            await _run(runtime, "alice", "lookup", "t1")
        async with _runtime(config, second) as runtime:
            await _run(runtime, "alice", "again", "t1")
            await _run(runtime, "alice", "again", "t2")
            await _run(runtime, "bob", "again", "t1")

    expected = [
        ChatMessage("user", "lookup"),
        ChatMessage("assistant", "", tool_calls=(ToolCall("call-look", "lookup", REAL_ARGS),)),
        ChatMessage(
            "tool",
            json.dumps({"query": "weather", "answer": "sunny"}, separators=(",", ":")),
            tool_call_id="call-look",
            name="lookup",
        ),
        ChatMessage("assistant", "It is sunny."),
    ]
    assert [list(r.messages[1 : _last_user(r)]) for r in first] == [[], []]  # no history yet
    alice_t1, alice_t2, bob_t1 = second
    assert list(alice_t1.messages[1 : _last_user(alice_t1)]) == expected
    assert list(alice_t2.messages[1 : _last_user(alice_t2)]) == []
    assert list(bob_t1.messages[1 : _last_user(bob_t1)]) == []
