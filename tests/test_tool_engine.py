"""The tool engine inside a runtime: typed failures, timeouts, worker threads for plain
tools, cancellation (prompt, with a grace for stubborn tools), concurrency limits,
the order of parallel calls, redaction of secret-looking parameters, the step limit.

Virtual time (``autojump_clock``) wherever only trio tasks are involved. Tests with
plain (sync) tools use the real clock: a worker thread is invisible to the autojump
clock, which would jump (and fire timeouts) while the thread runs. They use small
real durations and generous ``trio.fail_after`` bounds, and assert only bounds.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

import pytest
import trio
import trio.testing

from netra_actors import (
    Agent,
    AgentWebSocketBridge,
    ChatMessage,
    ChatRequest,
    Config,
    RunHandle,
    Runtime,
    ScriptedLLMProvider,
    ScriptedTurn,
    ToolCall,
    ToolError,
    ToolRegistry,
    ToolResult,
    UnifiedToolExecutionEngine,
    UnifiedTraceContext,
    tool_calling_agent,
)
from netra_actors._messages import CancelToolCall, EmitEvent, ExecuteTool, ToolInbox
from netra_actors._tools import run_tool_executor
from netra_actors.testing import check_lifecycle

Frame = dict[str, Any]
Script = Callable[[ChatRequest], ScriptedTurn]

#: Bound for virtual-time tests (virtual seconds; each finishes far sooner).
BOUND = 600
#: Bound for real-clock tests (real seconds).
REAL_BOUND = 20


# --- helpers -------------------------------------------------------------------------------------


def this_turn(request: ChatRequest) -> list[ChatMessage]:
    """The messages after the last user message (earlier turns of the thread are history)."""
    last_user = max(i for i, m in enumerate(request.messages) if m.role == "user")
    return list(request.messages[last_user + 1 :])


def tool_messages(request: ChatRequest) -> list[ChatMessage]:
    return [m for m in this_turn(request) if m.role == "tool"]


def calls_then_answer(*calls: ToolCall, seen: list[ChatRequest] | None = None) -> Script:
    """A scripted model: ask for ``calls`` (in parallel) once, then answer ``done``."""

    def script(request: ChatRequest) -> ScriptedTurn:
        if seen is not None:
            seen.append(request)
        if not tool_messages(request):
            return ScriptedTurn(reasoning=("calling tools",), tool_calls=calls)
        return ScriptedTurn(answer=("done",))

    return script


def make_runtime(
    config: Config,
    script: Script,
    registry: ToolRegistry,
    *,
    max_steps: int = 4,
    extra_agents: Mapping[str, Agent] | None = None,
) -> Runtime:
    return Runtime(
        config,
        agents={"loop": tool_calling_agent(max_steps=max_steps), **(extra_agents or {})},
        tools=registry,
        llm=ScriptedLLMProvider(script),
    )


def frames_of(events: Sequence[Any]) -> list[Frame]:
    return [json.loads(e.frame) for e in events]


async def run_once(runtime: Runtime, user: str = "alice", text: str = "go") -> list[Frame]:
    """Start a run, collect its events, check their lifecycle."""
    handle = await runtime.start_run(user, text)
    frames = frames_of(await handle.collect())
    check_lifecycle(frames)
    return frames


async def cancel_at_first(handle: RunHandle, kind: str) -> tuple[list[Frame], dict[str, float]]:
    """Read the run's events; cancel it when the first ``kind`` event arrives.

    Returns the frames and the (trio clock) arrival time of each event type's first
    occurrence, with ``"cancel"`` for the moment the cancel was sent.
    """
    frames: list[Frame] = []
    arrived: dict[str, float] = {}
    async for event in handle.events():
        frame = json.loads(event.frame)
        frames.append(frame)
        arrived.setdefault(frame["type"], trio.current_time())
        if frame["type"] == kind and "cancel" not in arrived:
            arrived["cancel"] = trio.current_time()
            outcome = await handle.cancel()
            assert outcome.state == "active"
    return frames, arrived


def types_of(frames: Sequence[Frame]) -> list[str]:
    return [f["type"] for f in frames]


def of_type(frames: Sequence[Frame], kind: str) -> list[Frame]:
    return [f for f in frames if f["type"] == kind]


def last_seq(runtime: Runtime, user: str = "alice") -> int:
    stats = runtime.session_statistics(user)
    assert stats is not None
    return stats.last_seq


# --- typed failures: the run goes on ------------------------------------------------------------


def _arith_tools(invoked: list[Mapping[str, Any]]) -> ToolRegistry:
    registry = ToolRegistry()

    @registry.tool()
    async def add(a: int, b: int, mode: str = "plain") -> int:
        """Add two numbers."""
        await trio.lowlevel.checkpoint()
        invoked.append({"a": a, "b": b, "mode": mode})
        return a + b

    return registry


@pytest.mark.parametrize(
    ("arguments", "invalid", "words"),
    [
        pytest.param({"a": "two", "b": 3}, None, ["a: 'two' is not of type 'integer'"], id="type"),
        pytest.param({"a": 1}, None, ["'b' is a required property"], id="missing"),
        pytest.param({"a": 1, "b": 2, "c": 3}, None, ["'c' was unexpected"], id="unknown"),
        pytest.param({"a": True, "b": 2}, None, ["a: True is not of type 'integer'"], id="bool"),
        pytest.param(
            {}, "arguments are not valid JSON", ["arguments are not valid JSON"], id="not-json"
        ),
    ],
)
async def test_invalid_arguments_from_the_model_are_reported_and_the_agent_goes_on(
    arguments: dict[str, Any],
    invalid: str | None,
    words: list[str],
    make_config: Callable[..., Config],
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Bad arguments: tool_completed error invalid_arguments naming the field; the model sees it."""
    seen: list[ChatRequest] = []
    invoked: list[Mapping[str, Any]] = []
    call = ToolCall("call-1", "add", arguments, invalid_arguments=invalid)
    runtime = make_runtime(make_config(), calls_then_answer(call, seen=seen), _arith_tools(invoked))
    with trio.fail_after(BOUND):
        async with runtime:
            run = await run_once(runtime)

    assert invoked == []  # the tool never ran
    (executing,) = of_type(run, "tool_executing")
    assert executing["data"]["parameters"] == arguments
    (completed,) = of_type(run, "tool_completed")
    data = completed["data"]
    assert data["status"] == "error"
    assert data["error"]["type"] == "invalid_arguments"
    message = data["error"]["message"]
    assert "'add'" in message
    for word in words:
        assert word in message
    # The agent went on: a second LLM turn saw the error as the call's tool message.
    assert len(seen) == 2
    (tool_message,) = tool_messages(seen[1])
    assert tool_message.tool_call_id == "call-1"
    assert tool_message.name == "add"
    assert json.loads(tool_message.content) == {
        "status": "error",
        "error": {"type": "invalid_arguments", "message": message},
    }
    assert run[-1]["type"] == "agent_completed"
    assert run[-1]["data"]["final_response"] == "done"


def _failing_tools() -> ToolRegistry:
    registry = ToolRegistry()

    @registry.tool()
    async def make_set() -> Any:
        """Return a set (not JSON)."""
        await trio.lowlevel.checkpoint()
        return {1, 2}

    @registry.tool()
    async def make_object() -> Any:
        """Return an object nested in a dict (not JSON)."""
        await trio.lowlevel.checkpoint()
        return {"ok": [1, object()]}

    @registry.tool()
    async def refuse(why: str) -> None:
        """Raise a ToolError with a chosen message."""
        await trio.lowlevel.checkpoint()
        raise ToolError(f"refused: {why}", error_type="tool_error")

    @registry.tool()
    async def explode() -> None:
        """Raise a plain exception."""
        await trio.lowlevel.checkpoint()
        raise KeyError("missing-key")

    @registry.tool()
    async def divide(a: float, b: float) -> float:
        """Divide (fails on zero)."""
        await trio.lowlevel.checkpoint()
        return a / b

    return registry


@pytest.mark.parametrize(
    ("name", "arguments", "error_type", "message"),
    [
        pytest.param("make_set", {}, "bad_result", "result is not JSON-serialisable", id="set"),
        pytest.param("make_object", {}, "bad_result", "not JSON-serialisable", id="object"),
        pytest.param("nowhere", {"x": 1}, "unknown_tool", "no tool named 'nowhere'", id="unknown"),
        pytest.param("refuse", {"why": "policy"}, "tool_error", "refused: policy", id="toolerror"),
        pytest.param("explode", {}, "tool_error", "KeyError: 'missing-key'", id="keyerror"),
        pytest.param(
            "divide", {"a": 1, "b": 0}, "tool_error", "ZeroDivisionError: ", id="zerodivision"
        ),
    ],
)
async def test_tool_failures_are_typed_and_the_run_completes(
    name: str,
    arguments: dict[str, Any],
    error_type: str,
    message: str,
    make_config: Callable[..., Config],
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Non-JSON results, unknown tools, ToolError and plain exceptions: typed errors, run completes."""
    seen: list[ChatRequest] = []
    call = ToolCall("call-1", name, arguments)
    runtime = make_runtime(make_config(), calls_then_answer(call, seen=seen), _failing_tools())
    with trio.fail_after(BOUND):
        async with runtime:
            run = await run_once(runtime)

    (completed,) = of_type(run, "tool_completed")
    data = completed["data"]
    assert data["tool_name"] == name
    assert data["status"] == "error"
    assert data["error"]["type"] == error_type
    assert data["error"]["message"].startswith(message) or message in data["error"]["message"]
    assert "results" not in data
    assert json.loads(tool_messages(seen[1])[0].content)["error"]["type"] == error_type
    assert run[-1]["type"] == "agent_completed"


# --- timeouts (virtual time) ----------------------------------------------------------------


def _slow_tools(finished: list[str]) -> ToolRegistry:
    registry = ToolRegistry()

    @registry.tool(timeout=2)
    async def short_fuse(seconds: float) -> str:
        """Has its own 2 s timeout."""
        await trio.sleep(seconds)
        finished.append("short_fuse")
        return "made it"

    @registry.tool(timeout=30)
    async def long_fuse(seconds: float) -> str:
        """Has its own 30 s timeout."""
        await trio.sleep(seconds)
        finished.append("long_fuse")
        return "made it"

    @registry.tool()
    async def default_fuse(seconds: float) -> str:
        """Uses the configured default timeout."""
        await trio.sleep(seconds)
        finished.append("default_fuse")
        return "made it"

    return registry


@pytest.mark.parametrize(
    ("name", "seconds", "status", "elapsed"),
    [
        pytest.param("short_fuse", 10, "timeout", 2, id="own-timeout-fires"),
        pytest.param("short_fuse", 1, "ok", 1, id="own-timeout-not-reached"),
        pytest.param("default_fuse", 100, "timeout", 5, id="config-default-fires"),
        pytest.param("default_fuse", 4, "ok", 4, id="config-default-not-reached"),
        pytest.param("long_fuse", 10, "ok", 10, id="own-timeout-beats-config-default"),
    ],
)
async def test_tool_timeouts(
    name: str,
    seconds: float,
    status: str,
    elapsed: float,
    make_config: Callable[..., Config],
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A tool's own timeout, else Config.tool_timeout (5 s here); a timed-out call is abandoned."""
    finished: list[str] = []
    call = ToolCall("call-1", name, {"seconds": seconds})
    runtime = make_runtime(
        make_config(tool_timeout=5), calls_then_answer(call), _slow_tools(finished)
    )
    with trio.fail_after(BOUND):
        async with runtime:
            start = trio.current_time()
            run = await run_once(runtime)
            took = trio.current_time() - start

    (completed,) = of_type(run, "tool_completed")
    data = completed["data"]
    assert data["status"] == status
    if status == "timeout":
        assert data["error"]["type"] == "timeout"
        assert f"within {elapsed}" in data["error"]["message"]
        assert finished == []
    else:
        assert data["results"] == "made it"
        assert finished == [name]
    assert took == pytest.approx(elapsed)
    assert run[-1]["type"] == "agent_completed"


# --- plain (sync) tools in worker threads (real clock) -------------------------------------------


async def test_a_sync_tool_runs_in_a_worker_thread_and_returns_its_value(
    make_config: Callable[..., Config],
) -> None:
    """A plain function tool returns its value; it ran on a thread other than trio's."""
    threads: list[int] = []
    registry = ToolRegistry()

    @registry.tool()
    def shout(text: str) -> dict[str, str]:
        """Upper-case the text."""
        threads.append(threading.get_ident())
        return {"text": text.upper()}

    call = ToolCall("call-1", "shout", {"text": "hi"})
    runtime = make_runtime(make_config(), calls_then_answer(call), registry)
    with trio.fail_after(REAL_BOUND):
        async with runtime:
            run = await run_once(runtime)

    (completed,) = of_type(run, "tool_completed")
    assert completed["data"]["status"] == "ok"
    assert completed["data"]["results"] == {"text": "HI"}
    assert threads
    assert threads != [threading.get_ident()]
    assert run[-1]["type"] == "agent_completed"


async def test_a_sync_tool_raising_is_a_tool_error(make_config: Callable[..., Config]) -> None:
    """An exception in a worker-thread tool becomes tool_error with its type in the message."""
    registry = ToolRegistry()

    @registry.tool()
    def broken() -> None:
        """Raise in the worker thread."""
        raise ValueError("thread trouble")

    runtime = make_runtime(make_config(), calls_then_answer(ToolCall("c", "broken", {})), registry)
    with trio.fail_after(REAL_BOUND):
        async with runtime:
            run = await run_once(runtime)

    (completed,) = of_type(run, "tool_completed")
    assert completed["data"]["status"] == "error"
    assert completed["data"]["error"] == {
        "type": "tool_error",
        "message": "ValueError: thread trouble",
    }
    assert run[-1]["type"] == "agent_completed"


async def test_a_sync_tool_does_not_block_other_sessions(
    make_config: Callable[..., Config],
) -> None:
    """While alice's sync tool sleeps 0.3 s in a thread, bob's run keeps streaming events."""
    entered = threading.Event()
    done = threading.Event()
    registry = ToolRegistry()

    @registry.tool()
    def block() -> str:
        """Sleep 0.3 s in the worker thread."""
        entered.set()
        time.sleep(0.3)
        done.set()
        return "woke"

    async def ticker(bridge: AgentWebSocketBridge) -> str:
        for _ in range(2000):
            if done.is_set():
                break
            await bridge.partial("tick")
            await trio.sleep(0.005)
        return "ticked"

    runtime = make_runtime(
        make_config(),
        calls_then_answer(ToolCall("c", "block", {})),
        registry,
        extra_agents={"ticker": ticker},
    )
    during: list[Frame] = []
    bob_frames: list[Frame] = []

    async def read_bob(handle: RunHandle) -> None:
        async for event in handle.events():
            frame = json.loads(event.frame)
            bob_frames.append(frame)
            if entered.is_set() and not done.is_set():
                during.append(frame)

    with trio.fail_after(REAL_BOUND):
        async with runtime, trio.open_nursery() as nursery:
            bob = await runtime.start_run("bob", "tick", agent="ticker")
            nursery.start_soon(read_bob, bob)
            alice = await run_once(runtime, "alice")

    check_lifecycle(bob_frames)
    assert entered.is_set()
    assert done.is_set()
    assert of_type(alice, "tool_completed")[0]["data"]["results"] == "woke"
    assert alice[-1]["type"] == "agent_completed"
    assert bob_frames[-1]["type"] == "agent_completed"
    # 0.3 s at one tick per ~5 ms: dozens if the loop runs; none if the thread blocked it.
    assert len(during) >= 5, len(during)


async def test_cancelling_a_run_during_a_sync_tool_is_prompt_and_the_late_result_is_dropped(
    make_config: Callable[..., Config],
) -> None:
    """Cancel in a sync tool: tool_completed cancelled at once, agent_cancelled; late result dropped."""
    entered = threading.Event()
    release = threading.Event()
    finished = threading.Event()
    registry = ToolRegistry()

    @registry.tool()
    def block() -> str:
        """Wait in the worker thread until released (up to 10 s)."""
        entered.set()
        release.wait(10)
        finished.set()
        return "late"

    runtime = make_runtime(make_config(), calls_then_answer(ToolCall("c", "block", {})), registry)
    with trio.fail_after(REAL_BOUND):
        async with runtime:
            handle = await runtime.start_run("alice", "go")
            frames: list[Frame] = []
            cancelled_at = 0.0
            async for event in handle.events():
                frame = json.loads(event.frame)
                frames.append(frame)
                if frame["type"] == "tool_executing":
                    await trio.to_thread.run_sync(entered.wait, 5)
                    cancelled_at = trio.current_time()
                    assert (await handle.cancel()).state == "active"
            ended_at = trio.current_time()
            assert not finished.is_set()  # the thread is still blocked
            seq_at_end = last_seq(runtime)

            release.set()
            assert await trio.to_thread.run_sync(finished.wait, 5)
            await trio.sleep(0.1)
            await trio.testing.wait_all_tasks_blocked()
            seq_after_thread = last_seq(runtime)

            # The session is still healthy: another run with the same tool completes.
            entered.clear()
            finished.clear()
            again = await run_once(runtime, "alice")

    check_lifecycle(frames)
    assert types_of(frames)[-2:] == ["tool_completed", "agent_cancelled"]
    (completed,) = of_type(frames, "tool_completed")
    assert completed["data"]["status"] == "cancelled"
    assert completed["data"]["error"]["type"] == "cancelled"
    assert frames[-1]["data"]["reason"] == "client"
    assert ended_at - cancelled_at < 2.0  # the thread would have held it for 10 s
    assert seq_after_thread == seq_at_end  # no second tool_completed, nothing at all
    assert of_type(again, "tool_completed")[0]["data"]["results"] == "late"


async def test_a_sync_tool_past_its_timeout_is_abandoned(
    make_config: Callable[..., Config],
) -> None:
    """A sync tool that overruns its timeout is reported timeout at once; its thread is left."""
    release = threading.Event()
    finished = threading.Event()
    registry = ToolRegistry()

    @registry.tool(timeout=0.2)
    def overrun() -> str:
        """Block until released (up to 10 s)."""
        release.wait(10)
        finished.set()
        return "late"

    runtime = make_runtime(make_config(), calls_then_answer(ToolCall("c", "overrun", {})), registry)
    with trio.fail_after(REAL_BOUND):
        async with runtime:
            start = trio.current_time()
            run = await run_once(runtime)
            took = trio.current_time() - start
            seq_at_end = last_seq(runtime)
            release.set()
            assert await trio.to_thread.run_sync(finished.wait, 5)
            await trio.sleep(0.1)
            await trio.testing.wait_all_tasks_blocked()
            assert last_seq(runtime) == seq_at_end

    (completed,) = of_type(run, "tool_completed")
    assert completed["data"]["status"] == "timeout"
    assert run[-1]["type"] == "agent_completed"
    assert 0.15 < took < 5.0


# --- async cancellation (virtual time) ------------------------------------------------------------


def _hanging_tools(finished: list[str]) -> ToolRegistry:
    registry = ToolRegistry()

    @registry.tool(timeout=3600)
    async def hang() -> str:
        """Sleep for an hour."""
        await trio.sleep(3600)
        finished.append("hang")
        return "never"

    @registry.tool(timeout=3600)
    async def stubborn(seconds: float) -> str:
        """Ignore cancellation for ``seconds``, then return."""
        with trio.CancelScope(shield=True):
            await trio.sleep(seconds)
        finished.append("stubborn")
        return "finished anyway"

    return registry


async def test_an_async_tool_is_cancelled_at_once(
    make_config: Callable[..., Config], autojump_clock: trio.testing.MockClock
) -> None:
    """Cancelling a run in a sleeping async tool: tool_completed cancelled, agent_cancelled, now."""
    finished: list[str] = []
    runtime = make_runtime(
        make_config(), calls_then_answer(ToolCall("c", "hang", {})), _hanging_tools(finished)
    )
    with trio.fail_after(BOUND):
        async with runtime:
            handle = await runtime.start_run("alice", "go")
            frames, arrived = await cancel_at_first(handle, "tool_executing")

    check_lifecycle(frames)
    assert types_of(frames)[-2:] == ["tool_completed", "agent_cancelled"]
    assert of_type(frames, "tool_completed")[0]["data"]["status"] == "cancelled"
    assert arrived["agent_cancelled"] - arrived["cancel"] == pytest.approx(0)
    assert finished == []


async def test_a_tool_ignoring_cancellation_is_abandoned_after_the_grace(
    make_config: Callable[..., Config], autojump_clock: trio.testing.MockClock
) -> None:
    """A shielded tool is reported cancelled after the grace, before agent_cancelled; then nothing."""
    finished: list[str] = []
    runtime = make_runtime(
        make_config(tool_cancel_grace=1.0),
        calls_then_answer(ToolCall("c", "stubborn", {"seconds": 10})),
        _hanging_tools(finished),
    )
    with trio.fail_after(BOUND):
        async with runtime:
            handle = await runtime.start_run("alice", "go")
            frames, arrived = await cancel_at_first(handle, "tool_executing")
            seq_at_end = last_seq(runtime)
            await trio.sleep(20)  # the tool finishes at +10 s
            assert finished == ["stubborn"]
            await trio.testing.wait_all_tasks_blocked()
            seq_after_tool = last_seq(runtime)

    check_lifecycle(frames)
    assert types_of(frames)[-2:] == ["tool_completed", "agent_cancelled"]
    (completed,) = of_type(frames, "tool_completed")
    assert completed["data"]["status"] == "cancelled"
    assert "did not stop in time" in completed["data"]["error"]["message"]
    assert arrived["tool_completed"] - arrived["cancel"] == pytest.approx(1.0)
    assert arrived["agent_cancelled"] - arrived["cancel"] == pytest.approx(1.0)
    assert seq_after_tool == seq_at_end


async def test_cancel_of_parallel_tools_reports_each_call_once(
    make_config: Callable[..., Config], autojump_clock: trio.testing.MockClock
) -> None:
    """Parallel calls (one stubborn, two hanging): each gets exactly one tool_completed cancelled."""
    finished: list[str] = []
    calls = (
        ToolCall("c1", "hang", {}),
        ToolCall("c2", "stubborn", {"seconds": 3}),
        ToolCall("c3", "hang", {}),
    )
    runtime = make_runtime(
        make_config(tool_cancel_grace=1.0), calls_then_answer(*calls), _hanging_tools(finished)
    )
    with trio.fail_after(BOUND):
        async with runtime:
            handle = await runtime.start_run("alice", "go")
            frames: list[Frame] = []
            cancelled = False
            async for event in handle.events():
                frames.append(json.loads(event.frame))
                if len(of_type(frames, "tool_executing")) == 3 and not cancelled:
                    cancelled = True
                    assert (await handle.cancel()).state == "active"
            seq_at_end = last_seq(runtime)
            await trio.sleep(10)
            seq_after = last_seq(runtime)

    check_lifecycle(frames)
    completed = of_type(frames, "tool_completed")
    assert sorted(f["data"]["call_id"] for f in completed) == ["c1", "c2", "c3"]
    assert {f["data"]["status"] for f in completed} == {"cancelled"}
    assert frames[-1]["type"] == "agent_cancelled"
    assert finished == ["stubborn"]
    assert seq_after == seq_at_end


# --- concurrency limits (virtual time) --------------------------------------------------------


class Gauge:
    """Counts tool calls running at once and remembers the peak."""

    def __init__(self) -> None:
        self.now = 0
        self.peak = 0
        self.done = 0

    async def hold(self, seconds: float) -> None:
        self.now += 1
        self.peak = max(self.peak, self.now)
        try:
            await trio.sleep(seconds)
        finally:
            self.now -= 1
        self.done += 1


def _gauged_tools(gauge: Gauge) -> ToolRegistry:
    registry = ToolRegistry()

    @registry.tool()
    async def work(n: int) -> int:
        """Work for one second."""
        await gauge.hold(1.0)
        return n

    return registry


async def test_parallel_calls_without_limits_all_run_at_once(
    make_config: Callable[..., Config], autojump_clock: trio.testing.MockClock
) -> None:
    """Baseline: five 1 s calls with the default limits run together and take 1 s."""
    gauge = Gauge()
    calls = tuple(ToolCall(f"c{i}", "work", {"n": i}) for i in range(5))
    runtime = make_runtime(make_config(), calls_then_answer(*calls), _gauged_tools(gauge))
    with trio.fail_after(BOUND):
        async with runtime:
            start = trio.current_time()
            run = await run_once(runtime)
            took = trio.current_time() - start

    assert gauge.peak == 5
    assert took == pytest.approx(1.0)
    assert sorted(f["data"]["results"] for f in of_type(run, "tool_completed")) == list(range(5))


async def test_max_session_tools_limits_one_sessions_parallel_calls(
    make_config: Callable[..., Config], autojump_clock: trio.testing.MockClock
) -> None:
    """max_session_tools=2: five 1 s calls run at most two at a time, all complete, in ~3 s."""
    gauge = Gauge()
    calls = tuple(ToolCall(f"c{i}", "work", {"n": i}) for i in range(5))
    runtime = make_runtime(
        make_config(max_session_tools=2), calls_then_answer(*calls), _gauged_tools(gauge)
    )
    with trio.fail_after(BOUND):
        async with runtime:
            start = trio.current_time()
            run = await run_once(runtime)
            took = trio.current_time() - start

    assert gauge.done == 5
    assert sorted(f["data"]["results"] for f in of_type(run, "tool_completed")) == list(range(5))
    assert run[-1]["type"] == "agent_completed"
    assert gauge.peak == 2
    assert took == pytest.approx(3.0)


async def test_max_concurrent_tools_limits_calls_across_sessions(
    make_config: Callable[..., Config], autojump_clock: trio.testing.MockClock
) -> None:
    """max_concurrent_tools=3: three sessions asking three 1 s calls each run 3 at a time."""
    gauge = Gauge()
    calls = tuple(ToolCall(f"c{i}", "work", {"n": i}) for i in range(3))
    runtime = make_runtime(
        make_config(max_concurrent_tools=3), calls_then_answer(*calls), _gauged_tools(gauge)
    )
    runs: dict[str, list[Frame]] = {}

    async def one(user: str) -> None:
        runs[user] = await run_once(runtime, user)

    with trio.fail_after(BOUND):
        async with runtime:
            start = trio.current_time()
            async with trio.open_nursery() as nursery:
                for user in ("alice", "bob", "carol"):
                    nursery.start_soon(one, user)
            took = trio.current_time() - start

    assert gauge.done == 9
    assert all(run[-1]["type"] == "agent_completed" for run in runs.values())
    assert gauge.peak == 3
    assert took == pytest.approx(3.0)


async def test_engine_global_limit_applies_when_wired(
    make_config: Callable[..., Config], autojump_clock: trio.testing.MockClock
) -> None:
    """The engine's own limiter works: with it set to 3, nine calls in three sessions peak at 3."""
    gauge = Gauge()
    calls = tuple(ToolCall(f"c{i}", "work", {"n": i}) for i in range(3))
    runtime = make_runtime(make_config(), calls_then_answer(*calls), _gauged_tools(gauge))
    runtime.engine.limiter.total_tokens = 3

    with trio.fail_after(BOUND):
        async with runtime:
            start = trio.current_time()
            async with trio.open_nursery() as nursery:
                for user in ("alice", "bob", "carol"):
                    nursery.start_soon(run_once, runtime, user)
            took = trio.current_time() - start

    assert gauge.done == 9
    assert gauge.peak == 3
    assert took == pytest.approx(3.0)


# --- order of parallel calls (virtual time) ------------------------------------------------------


async def test_parallel_calls_are_announced_in_listed_order_and_completed_as_they_finish(
    make_config: Callable[..., Config], autojump_clock: trio.testing.MockClock
) -> None:
    """tool_executing in the model's order; tool_completed by finish time; results back in order."""
    registry = ToolRegistry()

    @registry.tool()
    async def wait(seconds: float, label: str) -> str:
        """Sleep, then return the label."""
        await trio.sleep(seconds)
        return label

    calls = (
        ToolCall("first", "wait", {"seconds": 3, "label": "A"}),
        ToolCall("second", "wait", {"seconds": 1, "label": "B"}),
        ToolCall("third", "wait", {"seconds": 2, "label": "C"}),
        ToolCall("fourth", "nowhere", {}),
    )
    seen: list[ChatRequest] = []
    runtime = make_runtime(make_config(), calls_then_answer(*calls, seen=seen), registry)
    with trio.fail_after(BOUND):
        async with runtime:
            start = trio.current_time()
            run = await run_once(runtime)
            took = trio.current_time() - start

    executing = [f["data"]["call_id"] for f in of_type(run, "tool_executing")]
    completed = [f["data"]["call_id"] for f in of_type(run, "tool_completed")]
    assert executing == ["first", "second", "third", "fourth"]
    assert completed == ["fourth", "second", "third", "first"]
    # All four were announced before any completed.
    kinds = [f["type"] for f in run if f["type"].startswith("tool_")]
    assert kinds == ["tool_executing"] * 4 + ["tool_completed"] * 4
    assert took == pytest.approx(3.0)
    # The model's next turn: its assistant message lists the calls, then results in that order.
    turn = this_turn(seen[1])
    assert [c.call_id for c in turn[0].tool_calls] == ["first", "second", "third", "fourth"]
    results = tool_messages(seen[1])
    assert [m.tool_call_id for m in results] == ["first", "second", "third", "fourth"]
    assert [json.loads(m.content) for m in results[:3]] == ["A", "B", "C"]
    assert json.loads(results[3].content)["error"]["type"] == "unknown_tool"


# --- redaction --------------------------------------------------------------------------------


async def test_secret_looking_parameters_are_redacted_in_events_but_not_for_the_tool(
    make_config: Callable[..., Config], autojump_clock: trio.testing.MockClock
) -> None:
    """tool_executing hides secret-looking values at any depth; the tool gets the real ones."""
    received: list[dict[str, Any]] = []
    registry = ToolRegistry()

    @registry.tool()
    async def login(
        username: str,
        password: str,
        apiKey: str,
        access_token: str,
        author: str,
        max_tokens: int,
        options: dict[str, Any],
        accounts: list[dict[str, Any]],
    ) -> str:
        """Log in."""
        await trio.lowlevel.checkpoint()
        received.append(
            {
                "username": username,
                "password": password,
                "apiKey": apiKey,
                "access_token": access_token,
                "author": author,
                "max_tokens": max_tokens,
                "options": options,
                "accounts": accounts,
            }
        )
        return "welcome"

    arguments = {
        "username": "ann",
        "password": "hunter2",
        "apiKey": "sk-live-123",
        "access_token": "tok-abc",
        "author": "Ann Author",
        "max_tokens": 512,
        "options": {
            "client_secret": "cs-1",
            "region": "eu",
            "nested": {"privateKey": "pk-1", "passenger": "Bob", "API_KEY": "ak-2"},
        },
        "accounts": [
            {"name": "a", "pwd": "p1"},
            {"name": "b", "session_key": "sk-2", "tokens": 3},
        ],
    }
    seen: list[ChatRequest] = []
    runtime = make_runtime(
        make_config(), calls_then_answer(ToolCall("c", "login", arguments), seen=seen), registry
    )
    with trio.fail_after(BOUND):
        async with runtime:
            run = await run_once(runtime)

    (executing,) = of_type(run, "tool_executing")
    assert executing["data"]["parameters"] == {
        "username": "ann",
        "password": "[redacted]",
        "apiKey": "[redacted]",
        "access_token": "[redacted]",
        "author": "Ann Author",
        "max_tokens": 512,
        "options": {
            "client_secret": "[redacted]",
            "region": "eu",
            "nested": {"privateKey": "[redacted]", "passenger": "Bob", "API_KEY": "[redacted]"},
        },
        "accounts": [
            {"name": "a", "pwd": "[redacted]"},
            {"name": "b", "session_key": "[redacted]", "tokens": 3},
        ],
    }
    assert received == [arguments]
    # No secret value appears anywhere in the event stream.
    stream = json.dumps(run)
    for secret in ("hunter2", "sk-live-123", "tok-abc", "cs-1", "pk-1", "ak-2", "p1", "sk-2"):
        assert secret not in stream
    # The model still gets the real arguments in the conversation.
    assert this_turn(seen[1])[0].tool_calls[0].arguments == arguments
    assert run[-1]["type"] == "agent_completed"


# --- step limit ---------------------------------------------------------------------------------


def _always_calculate(request: ChatRequest) -> ScriptedTurn:
    step = len(tool_messages(request))
    return ScriptedTurn(
        reasoning=(f"step {step}",),
        tool_calls=(ToolCall(f"call-{step}", "calculator", {"expression": f"{step}+1"}),),
    )


async def test_step_limit_from_config_ends_the_run_with_agent_error_step_limit(
    make_config: Callable[..., Config], autojump_clock: trio.testing.MockClock
) -> None:
    """Config(max_steps=2) with the built-in agent: two tool rounds, then agent_error step_limit."""
    runtime = Runtime(make_config(max_steps=2), llm=ScriptedLLMProvider(_always_calculate))
    with trio.fail_after(BOUND):
        async with runtime:
            run = await run_once(runtime)
            after = await run_once(runtime, text="hello again")

    assert [f["data"]["call_id"] for f in of_type(run, "tool_completed")] == ["call-0", "call-1"]
    assert [f["data"]["results"] for f in of_type(run, "tool_completed")] == [1, 2]
    assert run[-1]["type"] == "agent_error"
    assert run[-1]["data"]["error"]["type"] == "step_limit"
    assert "2" in run[-1]["data"]["error"]["message"]
    # The session goes on.
    assert after[-1]["type"] == "agent_error"


async def test_step_limit_of_a_custom_tool_calling_agent(
    make_config: Callable[..., Config], autojump_clock: trio.testing.MockClock
) -> None:
    """tool_calling_agent(max_steps=3) stops after three tool rounds with step_limit."""
    registry = ToolRegistry()

    @registry.tool()
    async def calculator(expression: str) -> str:
        """Pretend to calculate."""
        await trio.lowlevel.checkpoint()
        return expression

    runtime = make_runtime(make_config(), _always_calculate, registry, max_steps=3)
    with trio.fail_after(BOUND):
        async with runtime:
            run = await run_once(runtime)

    assert len(of_type(run, "tool_executing")) == 3
    assert run[-1]["type"] == "agent_error"
    assert run[-1]["data"]["error"]["type"] == "step_limit"
    assert [f["data"]["step"] for f in of_type(run, "agent_thinking")] == [0, 1, 2]


# --- the tool-executor actor alone (virtual time) -----------------------------------------------


async def _drive_executor(
    engine: UnifiedToolExecutionEngine,
    calls: Sequence[ToolCall],
    *,
    max_concurrent: int,
    cancel: Sequence[str] = (),
) -> tuple[list[ToolResult], list[EmitEvent]]:
    """Feed ``calls`` to a session's executor (cancel the ids in ``cancel`` right after);
    the results in call order and every event the executor emitted."""
    inbox_send, inbox_recv = trio.open_memory_channel[ToolInbox](64)
    emit_send, emit_recv = trio.open_memory_channel[EmitEvent](1000)
    trace = UnifiedTraceContext.new_root()
    replies = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            partial(run_tool_executor, max_concurrent=max_concurrent, cancel_grace=1.0),
            engine,
            inbox_recv,
            emit_send,
        )
        for call in calls:
            reply_send, reply_recv = trio.open_memory_channel[ToolResult](1)
            await inbox_send.send(ExecuteTool("run-1", "main", call, trace, reply_send))
            replies.append(reply_recv)
        for call_id in cancel:
            await inbox_send.send(CancelToolCall("run-1", call_id))
        results = [await reply.receive() for reply in replies]
        await inbox_send.aclose()
    events = []
    async with emit_recv:
        async for event in emit_recv:
            events.append(event)
    return results, events


async def test_executor_limit_queues_calls_and_their_timeout_starts_with_the_slot(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """max_concurrent=2, five 1 s calls, 1.5 s timeout: at most two at once, none times out."""
    gauge = Gauge()
    engine = UnifiedToolExecutionEngine(_gauged_tools(gauge), default_timeout=1.5)
    calls = [ToolCall(f"c{i}", "work", {"n": i}) for i in range(5)]
    start = trio.current_time()
    results, events = await _drive_executor(engine, calls, max_concurrent=2)
    took = trio.current_time() - start

    assert [(r.call_id, r.status, r.results) for r in results] == [
        (f"c{i}", "ok", i) for i in range(5)
    ]
    assert gauge.peak == 2
    assert took == pytest.approx(3.0)
    # Each call is announced once, as it arrives, and completed once.
    assert [e.data["call_id"] for e in events if e.type == "tool_executing"] == [
        f"c{i}" for i in range(5)
    ]
    assert sorted(e.data["call_id"] for e in events if e.type == "tool_completed") == [
        f"c{i}" for i in range(5)
    ]


async def test_executor_cancels_a_call_still_waiting_for_a_slot_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A call queued behind the limit and then cancelled never runs and is reported at once."""
    gauge = Gauge()
    engine = UnifiedToolExecutionEngine(_gauged_tools(gauge))
    calls = [ToolCall("running", "work", {"n": 1}), ToolCall("queued", "work", {"n": 2})]
    results, events = await _drive_executor(engine, calls, max_concurrent=1, cancel=["queued"])

    assert [(r.call_id, r.status) for r in results] == [("running", "ok"), ("queued", "cancelled")]
    assert gauge.done == 1
    completed = [e.data["call_id"] for e in events if e.type == "tool_completed"]
    assert completed == ["queued", "running"]  # the cancelled one first, at once


# --- model-chosen call ids and tool-chosen error types (bugs) -------------------------------------


async def test_duplicate_call_ids_in_one_turn_still_give_a_valid_stream(
    make_config: Callable[..., Config], autojump_clock: trio.testing.MockClock
) -> None:
    """A model repeating a call id in one turn: both calls run and the stream stays valid."""
    gauge = Gauge()
    calls = (ToolCall("dup", "work", {"n": 1}), ToolCall("dup", "work", {"n": 2}))
    runtime = make_runtime(make_config(), calls_then_answer(*calls), _gauged_tools(gauge))
    with trio.fail_after(BOUND):
        async with runtime:
            handle = await runtime.start_run("alice", "go")
            frames = frames_of(await handle.collect())

    assert gauge.done == 2
    check_lifecycle(frames)  # fails today: [duplicate_call_id]


async def test_call_id_reused_in_a_later_step_still_gives_a_valid_stream(
    make_config: Callable[..., Config], autojump_clock: trio.testing.MockClock
) -> None:
    """A model that numbers its calls from 0 every turn: the run's stream stays valid."""
    gauge = Gauge()

    def script(request: ChatRequest) -> ScriptedTurn:
        if len(tool_messages(request)) < 2:
            return ScriptedTurn(tool_calls=(ToolCall("call_0", "work", {"n": 0}),))
        return ScriptedTurn(answer=("done",))

    runtime = make_runtime(make_config(), script, _gauged_tools(gauge))
    with trio.fail_after(BOUND):
        async with runtime:
            handle = await runtime.start_run("alice", "go")
            frames = frames_of(await handle.collect())

    assert gauge.done == 2
    check_lifecycle(frames)  # fails today: [duplicate_call_id]


async def test_cancel_with_a_repeated_call_id_is_prompt_and_closes_every_call(
    make_config: Callable[..., Config], autojump_clock: trio.testing.MockClock
) -> None:
    """Cancel during two hanging calls sharing an id: prompt, and both calls are closed."""
    finished: list[str] = []
    calls = (ToolCall("dup", "hang", {}), ToolCall("dup", "hang", {}))
    runtime = make_runtime(make_config(), calls_then_answer(*calls), _hanging_tools(finished))
    with trio.fail_after(BOUND):
        async with runtime:
            handle = await runtime.start_run("alice", "go")
            frames: list[Frame] = []
            cancelled_at = None
            async for event in handle.events():
                frames.append(json.loads(event.frame))
                if len(of_type(frames, "tool_executing")) == 2 and cancelled_at is None:
                    cancelled_at = trio.current_time()
                    await handle.cancel()
            assert cancelled_at is not None
            took = trio.current_time() - cancelled_at

    assert frames[-1]["type"] == "agent_cancelled"
    assert len(of_type(frames, "tool_completed")) == 2  # one today
    assert took == pytest.approx(0)  # 11 s today (the backstop)
    check_lifecycle(frames)


async def test_a_tool_chosen_error_type_outside_the_vocabulary_is_not_sent_as_is(
    make_config: Callable[..., Config], autojump_clock: trio.testing.MockClock
) -> None:
    """A tool raising ToolError(error_type='quota_exceeded') still yields a valid stream."""
    registry = ToolRegistry()

    @registry.tool()
    async def quota() -> None:
        """Fail with a custom error type."""
        await trio.lowlevel.checkpoint()
        raise ToolError("over quota", error_type="quota_exceeded")

    runtime = make_runtime(make_config(), calls_then_answer(ToolCall("c", "quota")), registry)
    with trio.fail_after(BOUND):
        async with runtime:
            handle = await runtime.start_run("alice", "go")
            frames = frames_of(await handle.collect())

    check_lifecycle(frames)  # fails today: [vocabulary] 'quota_exceeded'
    (completed,) = of_type(frames, "tool_completed")
    assert completed["data"]["error"]["message"] == "over quota"
