"""Run lifecycles end to end, in process: success, tool errors, agent crash, LLM failure,
thread ordering, parallel tools, the step limit and bad client input.

Each scenario runs both through the in-memory transport (a connection actor and a
chat client, as over a WebSocket) and through the in-process API (``RunHandle``),
under virtual time. Every received stream goes through ``check_lifecycle``.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing
from strategies import (
    Frame,
    MemoryClient,
    connect,
    decode_events,
    of_type,
    types_of,
)

from netra_actors import (
    ChatRequest,
    Config,
    Runtime,
    ScriptedLLMProvider,
    ScriptedTurn,
    ToolCall,
    ToolRegistry,
    tool_calling_agent,
)
from netra_actors.testing import check_lifecycle

#: Virtual seconds; every test here finishes far sooner.
BOUND = 600

VIAS = ("memory", "api")

DEMO_TOOL_RUN = [
    "agent_started",
    "agent_thinking",
    "agent_thinking",
    "tool_executing",
    "tool_completed",
    "agent_thinking",
    "partial_result",
    "partial_result",
    "partial_result",
    "agent_completed",
]


# --- one way of driving runs, over the memory transport or the in-process API -----------------


class Driver:
    """Starts runs of one user and returns each run's events as received frames."""

    via: str
    session_id: str

    async def run(self, text: str, **fields: Any) -> list[Frame]:
        """Start a run and wait for its terminal event; its events, in order."""
        run_id = await self.start(text, **fields)
        return await self.wait(run_id)

    async def start(self, text: str, **fields: Any) -> str:
        raise NotImplementedError

    async def wait(self, run_id: str) -> list[Frame]:
        raise NotImplementedError

    def stream(self) -> list[Frame]:
        """Every frame received so far, in arrival order (for ``check_lifecycle``)."""
        raise NotImplementedError


class MemoryDriver(Driver):
    via = "memory"

    def __init__(self, client: MemoryClient) -> None:
        self.client = client
        self.session_id = client.session_ready["session_id"]

    async def start(self, text: str, **fields: Any) -> str:
        return await self.client.user_message(text, **fields)

    async def wait(self, run_id: str) -> list[Frame]:
        await self.client.wait_terminal(run_id)
        return self.client.run_events(run_id)

    def stream(self) -> list[Frame]:
        return list(self.client.frames)


class ApiDriver(Driver):
    via = "api"

    def __init__(self, runtime: Runtime, user_id: str) -> None:
        self.runtime = runtime
        self.user_id = user_id
        self.handles: dict[str, Any] = {}
        self.received: dict[str, list[Frame]] = {}

    async def start(self, text: str, **fields: Any) -> str:
        handle = await self.runtime.start_run(self.user_id, text, **fields)
        self.session_id = handle.session.session_id
        self.handles[handle.run_id] = handle
        return str(handle.run_id)

    async def wait(self, run_id: str) -> list[Frame]:
        self.received[run_id] = decode_events(await self.handles[run_id].collect())
        return self.received[run_id]

    def stream(self) -> list[Frame]:
        # Every run of the session was collected, so together they are the whole stream.
        return sorted((f for run in self.received.values() for f in run), key=lambda f: f["seq"])


@asynccontextmanager
async def open_driver(via: str, runtime: Runtime, user_id: str = "alice") -> AsyncIterator[Driver]:
    if via == "api":
        yield ApiDriver(runtime, user_id)
        return
    async with trio.open_nursery() as nursery:
        client = await connect(nursery, runtime, user_id)
        yield MemoryDriver(client)
        await client.close()


def assert_same_run(run: list[Frame]) -> None:
    """Every event of one run carries its run_id, thread_id and trace_id."""
    assert len({(f["run_id"], f["thread_id"], f["trace_id"]) for f in run}) == 1, run


def assert_gap_free(frames: list[Frame]) -> None:
    seqs = [f["seq"] for f in frames if "seq" in f]
    assert seqs == list(range(1, len(seqs) + 1)), seqs


# --- the demo agent: success, tool error, agent crash, LLM failure -----------------------------


@pytest.mark.parametrize("via", VIAS)
async def test_tool_using_run_streams_its_lifecycle_in_order(
    via: str, make_config: Callable[..., Config], autojump_clock: trio.testing.MockClock
) -> None:
    """A calculator run: exact event order, paired tool events, answer 14, seq 1.., one trace."""
    with trio.fail_after(BOUND):
        async with Runtime(make_config()) as runtime, open_driver(via, runtime) as driver:
            run = await driver.run("what is 2+3*4?", client_msg_id="m1")
            stream = driver.stream()

    report = check_lifecycle(stream)
    assert types_of(run) == DEMO_TOOL_RUN
    assert_gap_free(run)
    assert_same_run(run)
    assert report.terminal_counts()["agent_completed"] == 1

    started = run[0]["data"]
    assert started["user_id"] == "alice"
    assert started["text"] == "what is 2+3*4?"
    assert started["client_msg_id"] == "m1"
    assert started["agent_name"] == "demo"

    (executing,) = of_type(run, "tool_executing")
    (completed,) = of_type(run, "tool_completed")
    assert executing["data"]["call_id"] == completed["data"]["call_id"]
    assert executing["data"]["tool_name"] == completed["data"]["tool_name"] == "calculator"
    assert executing["data"]["parameters"] == {"expression": "2+3*4"}
    assert completed["data"]["status"] == "ok"
    assert completed["data"]["results"] == 14
    assert "error" not in completed["data"]

    final = run[-1]["data"]["final_response"]
    assert "14" in final
    assert "".join(f["data"]["text"] for f in of_type(run, "partial_result")) == final
    assert [f["data"]["step"] for f in of_type(run, "agent_thinking")] == [0, 0, 1]

    if via == "memory":
        assert stream[0]["type"] == "session_ready"
        assert stream[0]["last_seq"] == 0
        assert stream[0]["user_id"] == "alice"
        (accepted,) = [f for f in stream if f["type"] == "run_accepted"]
        assert accepted["run_id"] == run[0]["run_id"]
        assert accepted["thread_id"] == "main"
        assert accepted["client_msg_id"] == "m1"


async def test_span_ids_follow_the_protocol(
    make_config: Callable[..., Config], autojump_clock: trio.testing.MockClock
) -> None:
    """Run events carry the run's span; a tool call's two events carry that call's own span."""
    with trio.fail_after(BOUND):
        async with Runtime(make_config()) as runtime:
            handle = await runtime.start_run(
                "alice",
                "what is 2+3*4?",
                traceparent="00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            )
            run = decode_events(await handle.collect())
    check_lifecycle(run)
    tool_events = [f for f in run if f["type"].startswith("tool_")]
    run_events = [f for f in run if not f["type"].startswith("tool_")]
    assert len({f["span_id"] for f in run_events}) == 1
    assert len({f["span_id"] for f in tool_events}) == 1
    assert tool_events[0]["span_id"] != run_events[0]["span_id"]
    # The client's traceparent is continued: same trace, a new span for the run.
    assert {f["trace_id"] for f in run} == {"4bf92f3577b34da6a3ce929d0e0e4736"}
    assert run_events[0]["span_id"] != "00f067aa0ba902b7"


@pytest.mark.parametrize("via", VIAS)
async def test_tool_error_is_reported_and_the_run_still_completes(
    via: str, make_config: Callable[..., Config], autojump_clock: trio.testing.MockClock
) -> None:
    """A raising tool ends with status error {tool_error, message}; the run ends agent_completed."""
    with trio.fail_after(BOUND):
        async with Runtime(make_config()) as runtime, open_driver(via, runtime) as driver:
            run = await driver.run("fail")
            stream = driver.stream()

    report = check_lifecycle(stream)
    assert report.terminal_counts() == {
        "agent_cancelled": 0,
        "agent_completed": 1,
        "agent_error": 0,
    }
    (completed,) = of_type(run, "tool_completed")
    data = completed["data"]
    assert data["tool_name"] == "fail"
    assert data["status"] == "error"
    assert data["error"]["type"] == "tool_error"
    assert data["error"]["message"] == "failure on request"
    assert "results" not in data
    assert run[-1]["type"] == "agent_completed"
    assert types_of(run).count("agent_completed") == 1


@pytest.mark.parametrize("via", VIAS)
async def test_agent_crash_is_one_agent_error_and_the_session_survives(
    via: str, make_config: Callable[..., Config], autojump_clock: trio.testing.MockClock
) -> None:
    """Agent code raising gives exactly one agent_error (agent_error); the next run completes."""
    with trio.fail_after(BOUND):
        async with Runtime(make_config()) as runtime, open_driver(via, runtime) as driver:
            crashed = await driver.run("crash")
            session_id = driver.session_id
            after = await driver.run("what is 2+3*4?")
            assert driver.session_id == session_id
            stream = driver.stream()

    check_lifecycle(stream)
    assert_gap_free([f for f in stream if "seq" in f])
    assert types_of(crashed) == ["agent_started", "agent_thinking", "agent_error"]
    error = crashed[-1]["data"]["error"]
    assert error["type"] == "agent_error"
    assert "RuntimeError" in error["message"]
    assert types_of(after) == DEMO_TOOL_RUN
    assert "14" in after[-1]["data"]["final_response"]


@pytest.mark.parametrize("via", VIAS)
async def test_llm_failure_is_agent_error_llm_error(
    via: str, make_config: Callable[..., Config], autojump_clock: trio.testing.MockClock
) -> None:
    """A failing model ends the run with one agent_error of type llm_error; the session goes on."""
    with trio.fail_after(BOUND):
        async with Runtime(make_config()) as runtime, open_driver(via, runtime) as driver:
            failed = await driver.run("llm fail")
            after = await driver.run("hello")
            stream = driver.stream()

    check_lifecycle(stream)
    assert types_of(failed) == ["agent_started", "agent_thinking", "agent_error"]
    assert failed[-1]["data"]["error"]["type"] == "llm_error"
    assert failed[-1]["data"]["error"]["message"]
    assert after[-1]["type"] == "agent_completed"
    assert after[-1]["data"]["final_response"].startswith("You said: hello")


# --- tool call problems: every one is a typed tool_completed, never a crash --------------------


def _problem_tools() -> ToolRegistry:
    registry = ToolRegistry()

    @registry.tool()
    async def add(a: int, b: int) -> int:
        """Add two numbers."""
        await trio.lowlevel.checkpoint()
        return a + b

    @registry.tool()
    async def make_set() -> set[int]:
        """Return a value JSON cannot carry (a set)."""
        await trio.lowlevel.checkpoint()
        return {1, 2}

    @registry.tool()
    async def make_object() -> object:
        """Return a value JSON cannot carry (an object)."""
        await trio.lowlevel.checkpoint()
        return object()

    @registry.tool(timeout=1)
    async def slow() -> str:
        """Take longer than its timeout."""
        await trio.sleep(10)
        return "too late"

    return registry


def _one_call_then_answer(call: ToolCall, seen: list[ChatRequest]) -> Callable[..., ScriptedTurn]:
    """A scripted model that asks for ``call`` once, then answers; records every request."""

    def script(request: ChatRequest) -> ScriptedTurn:
        seen.append(request)
        if not any(m.role == "tool" for m in request.messages):
            return ScriptedTurn(reasoning=("calling",), tool_calls=(call,))
        return ScriptedTurn(answer=("handled",))

    return script


@pytest.mark.parametrize(
    ("name", "arguments", "status", "error_type"),
    [
        pytest.param("add", {"a": 1, "b": 2}, "ok", None, id="ok"),
        pytest.param("add", {"a": 1}, "error", "invalid_arguments", id="missing-argument"),
        pytest.param(
            "add", {"a": 1, "b": 2, "c": 3}, "error", "invalid_arguments", id="unknown-argument"
        ),
        pytest.param("no_such_tool", {}, "error", "unknown_tool", id="unknown-tool"),
        pytest.param("make_set", {}, "error", "bad_result", id="set-result"),
        pytest.param("make_object", {}, "error", "bad_result", id="object-result"),
        pytest.param("slow", {}, "timeout", "timeout", id="timeout"),
    ],
)
async def test_tool_call_problems_are_typed_tool_completed_events(
    name: str,
    arguments: dict[str, Any],
    status: str,
    error_type: str | None,
    make_config: Callable[..., Config],
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Bad arguments, unknown tools, non-JSON results and timeouts end the call, never the run."""
    seen: list[ChatRequest] = []
    call = ToolCall("call-1", name, arguments)
    runtime = Runtime(
        make_config(),
        agents={"loop": tool_calling_agent(max_steps=3)},
        tools=_problem_tools(),
        llm=ScriptedLLMProvider(_one_call_then_answer(call, seen)),
    )
    with trio.fail_after(BOUND):
        async with runtime:
            start = trio.current_time()
            handle = await runtime.start_run("alice", "go")
            run = decode_events(await handle.collect())
            elapsed = trio.current_time() - start

    check_lifecycle(run)
    (executing,) = of_type(run, "tool_executing")
    (completed,) = of_type(run, "tool_completed")
    assert executing["data"] == {"call_id": "call-1", "tool_name": name, "parameters": arguments}
    data = completed["data"]
    assert (data["call_id"], data["tool_name"], data["status"]) == ("call-1", name, status)
    if status == "ok":
        assert data["results"] == 3
        assert "error" not in data
    else:
        assert data["error"]["type"] == error_type
        assert isinstance(data["error"]["message"], str)
        assert data["error"]["message"]
        assert "results" not in data
    assert run[-1]["type"] == "agent_completed"
    assert run[-1]["data"]["final_response"] == "handled"
    # The model's second turn saw the outcome as a tool message for that call.
    (tool_message,) = [m for m in seen[-1].messages if m.role == "tool"]
    assert tool_message.tool_call_id == "call-1"
    if status != "ok":
        assert json.loads(tool_message.content)["status"] == status
    # A timed-out tool is abandoned at its timeout (1 s), not awaited (10 s).
    assert elapsed == pytest.approx(1.0 if status == "timeout" else 0.0)


# --- threads: FIFO within one, concurrent across them -----------------------------------------


@pytest.mark.parametrize("via", VIAS)
async def test_runs_of_one_thread_run_one_after_another_in_arrival_order(
    via: str, make_config: Callable[..., Config], autojump_clock: trio.testing.MockClock
) -> None:
    """A second run on a busy thread starts only after the first one's terminal event."""
    with trio.fail_after(BOUND):
        async with Runtime(make_config()) as runtime, open_driver(via, runtime) as driver:
            start = trio.current_time()
            first = await driver.start("sleep 1")
            second = await driver.start("sleep 1")
            first_run = await driver.wait(first)
            second_run = await driver.wait(second)
            elapsed = trio.current_time() - start
            stream = driver.stream()

    check_lifecycle(stream)
    assert_gap_free([f for f in stream if "seq" in f])
    assert first_run[-1]["type"] == second_run[-1]["type"] == "agent_completed"
    assert second_run[0]["type"] == "agent_started"
    assert second_run[0]["seq"] > first_run[-1]["seq"]
    assert elapsed == pytest.approx(2.0)


@pytest.mark.parametrize("via", VIAS)
async def test_runs_of_different_threads_run_concurrently(
    via: str, make_config: Callable[..., Config], autojump_clock: trio.testing.MockClock
) -> None:
    """Runs on two threads interleave: both start before either ends, in one run's time."""
    with trio.fail_after(BOUND):
        async with Runtime(make_config()) as runtime, open_driver(via, runtime) as driver:
            start = trio.current_time()
            one = await driver.start("sleep 1", thread_id="t1")
            two = await driver.start("sleep 1", thread_id="t2")
            run_one = await driver.wait(one)
            run_two = await driver.wait(two)
            elapsed = trio.current_time() - start
            stream = driver.stream()

    check_lifecycle(stream)
    assert_gap_free([f for f in stream if "seq" in f])
    assert {f["thread_id"] for f in run_one} == {"t1"}
    assert {f["thread_id"] for f in run_two} == {"t2"}
    assert run_one[-1]["type"] == run_two[-1]["type"] == "agent_completed"
    assert max(run_one[0]["seq"], run_two[0]["seq"]) < min(run_one[-1]["seq"], run_two[-1]["seq"])
    assert elapsed == pytest.approx(1.0)


# --- parallel tool calls and the step limit ----------------------------------------------------


async def test_parallel_tool_calls_are_paired_and_run_together(
    make_config: Callable[..., Config],
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Three calls in one turn: three executing/completed pairs by call_id, run in parallel."""
    registry = ToolRegistry()

    @registry.tool()
    async def wait(seconds: float) -> float:
        """Sleep, then return the seconds."""
        await trio.sleep(seconds)
        return seconds

    seen: list[ChatRequest] = []
    calls = tuple(ToolCall(f"call-{s}", "wait", {"seconds": float(s)}) for s in (3, 1, 2))

    def script(request: ChatRequest) -> ScriptedTurn:
        seen.append(request)
        if not any(m.role == "tool" for m in request.messages):
            return ScriptedTurn(reasoning=("three at once",), tool_calls=calls)
        return ScriptedTurn(answer=("all", " done"))

    runtime = Runtime(
        make_config(),
        agents={"loop": tool_calling_agent(max_steps=3)},
        tools=registry,
        llm=ScriptedLLMProvider(script),
    )
    with trio.fail_after(BOUND):
        async with runtime, trio.open_nursery() as nursery:
            client = await connect(nursery, runtime, "alice")
            start = trio.current_time()
            run_id = await client.user_message("go")
            await client.wait_terminal(run_id)
            elapsed = trio.current_time() - start
            await client.close()

    check_lifecycle(client.frames)
    run = client.run_events(run_id)
    assert run[-1]["type"] == "agent_completed"
    assert run[-1]["data"]["final_response"] == "all done"
    executing = of_type(run, "tool_executing")
    completed = of_type(run, "tool_completed")
    assert sorted(f["data"]["call_id"] for f in executing) == ["call-1", "call-2", "call-3"]
    assert sorted(f["data"]["call_id"] for f in completed) == ["call-1", "call-2", "call-3"]
    # All three started before any finished, and they finished shortest first.
    assert max(f["seq"] for f in executing) < min(f["seq"] for f in completed)
    assert [f["data"]["call_id"] for f in completed] == ["call-1", "call-2", "call-3"]
    assert all(f["data"]["status"] == "ok" for f in completed)
    assert {f["data"]["call_id"]: f["data"]["results"] for f in completed} == {
        "call-1": 1.0,
        "call-2": 2.0,
        "call-3": 3.0,
    }
    assert elapsed == pytest.approx(3.0)
    # The model's next turn saw the three results as tool messages, in the order it asked.
    tool_messages = [m for m in seen[-1].messages if m.role == "tool"]
    assert [m.tool_call_id for m in tool_messages] == ["call-3", "call-1", "call-2"]
    assert [json.loads(m.content) for m in tool_messages] == [3.0, 1.0, 2.0]


def _always_a_tool(request: ChatRequest) -> ScriptedTurn:
    turn = sum(1 for m in request.messages if m.role == "assistant")
    return ScriptedTurn(
        reasoning=(f"step {turn}",),
        tool_calls=(ToolCall(f"call-{turn}", "calculator", {"expression": f"{turn}+1"}),),
    )


@pytest.mark.parametrize("via", ["config", "agent"])
async def test_step_limit_ends_the_run_with_agent_error_step_limit(
    via: str, make_config: Callable[..., Config], autojump_clock: trio.testing.MockClock
) -> None:
    """A model that never stops asking for tools gets max_steps tool turns, then step_limit."""
    llm = ScriptedLLMProvider(_always_a_tool)
    if via == "config":
        # The demo agent (and demo tools) with Config(max_steps=3) over this model.
        runtime = Runtime(make_config(max_steps=3), llm=llm)
    else:
        registry = ToolRegistry()

        @registry.tool()
        async def calculator(expression: str) -> int:
            """Evaluate 'N+1'."""
            await trio.lowlevel.checkpoint()
            left, right = expression.split("+")
            return int(left) + int(right)

        runtime = Runtime(
            make_config(),
            agents={"loop": tool_calling_agent(max_steps=3)},
            tools=registry,
            llm=llm,
        )
    with trio.fail_after(BOUND):
        async with runtime:
            handle = await runtime.start_run("alice", "count forever")
            run = decode_events(await handle.collect())

    check_lifecycle(run)
    assert run[-1]["type"] == "agent_error"
    assert run[-1]["data"]["error"]["type"] == "step_limit"
    completed = of_type(run, "tool_completed")
    assert [f["data"]["call_id"] for f in completed] == ["call-0", "call-1", "call-2"]
    assert [f["data"]["results"] for f in completed] == [1, 2, 3]
    assert [f["data"]["step"] for f in of_type(run, "agent_thinking")] == [0, 1, 2]


# --- bad client input over the memory transport ------------------------------------------------


@pytest.mark.parametrize(
    ("message", "code", "client_msg_id"),
    [
        pytest.param("{not json", "bad_json", None, id="bad-json"),
        pytest.param("[1, 2, 3]", "bad_frame", None, id="not-an-object"),
        pytest.param('{"text": "no type"}', "bad_frame", None, id="no-type"),
        pytest.param(
            '{"type": "user_message", "client_msg_id": "m7"}', "bad_frame", "m7", id="no-text"
        ),
        pytest.param('{"type": "user_message", "text": 42}', "bad_frame", None, id="text-not-str"),
        pytest.param('{"type": "cancel"}', "bad_frame", None, id="cancel-without-run-id"),
        pytest.param(
            '{"type": "user_message", "text": "hi", "thread_id": ""}',
            "bad_frame",
            None,
            id="empty-thread-id",
        ),
        pytest.param(
            '{"type": "subscribe", "client_msg_id": "m8"}', "unknown_type", "m8", id="unknown-type"
        ),
        pytest.param(
            '{"type": "cancel", "run_id": "run_does_not_exist"}',
            "not_found",
            None,
            id="cancel-unknown-run",
        ),
        pytest.param(b"\x00\x01binary", "bad_frame", None, id="binary-frame"),
    ],
)
async def test_bad_input_gets_a_typed_error_and_the_connection_stays_usable(
    message: str | bytes,
    code: str,
    client_msg_id: str | None,
    make_config: Callable[..., Config],
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Each bad frame gets one error frame with its code; ping and a new run still work."""
    with trio.fail_after(BOUND):
        async with Runtime(make_config()) as runtime, trio.open_nursery() as nursery:
            client = await connect(nursery, runtime, "alice")
            await client.send_raw(message)
            error = await client.wait_for(lambda f: f["type"] == "error")
            await client.send(type="ping")
            await client.wait_for(lambda f: f["type"] == "pong")
            run_id = await client.user_message("what is 2+3*4?")
            terminal = await client.wait_terminal(run_id)
            await trio.testing.wait_all_tasks_blocked()
            await client.close()

    check_lifecycle(client.frames)
    assert error["code"] == code
    assert isinstance(error["message"], str)
    assert error["message"]
    assert "seq" not in error
    assert error.get("client_msg_id") == client_msg_id
    assert len(client.replies("error")) == 1
    assert terminal["type"] == "agent_completed"
    assert "14" in terminal["data"]["final_response"]
    assert client.close_code == 1000
