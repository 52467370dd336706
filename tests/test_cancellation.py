"""Cancellation: of a run in a tool, in the model's stream, with parallel tools, while
queued, at shutdown; and a cancel is never reported as a success.

Virtual time throughout: a run "sleeping 30 s" that is cancelled must end at once,
which ``trio.current_time()`` shows without waiting for anything real.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
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
    ReasoningDelta,
    Runtime,
    ScriptedLLMProvider,
    ScriptedTurn,
    TextDelta,
    ToolCall,
    ToolRegistry,
    tool_calling_agent,
)
from netra_actors.testing import check_lifecycle

#: Virtual seconds; every test here finishes far sooner.
BOUND = 600


def assert_nothing_after_terminal(client: MemoryClient, run_id: str) -> None:
    """The run's terminal event is the last frame of that run the client received."""
    run = client.run_events(run_id)
    terminals = [
        f for f in run if f["type"] in ("agent_completed", "agent_error", "agent_cancelled")
    ]
    assert len(terminals) == 1, types_of(run)
    assert run[-1] is terminals[0], types_of(run)


def hanging_tools() -> ToolRegistry:
    registry = ToolRegistry()

    @registry.tool(timeout=3600)
    async def hang(label: str) -> str:
        """Wait until cancelled."""
        await trio.sleep_forever()
        return label  # pragma: no cover

    @registry.tool(timeout=3600)
    async def stubborn(seconds: float) -> str:
        """Ignore cancellation for ``seconds``, then return."""
        with trio.CancelScope(shield=True):
            await trio.sleep(seconds)
        return "finished anyway"

    return registry


def calls_then_answer(*calls: ToolCall) -> Callable[[ChatRequest], ScriptedTurn]:
    """A scripted model: ask for ``calls`` (in parallel) once, then answer."""

    def script(request: ChatRequest) -> ScriptedTurn:
        if not any(m.role == "tool" for m in request.messages):
            return ScriptedTurn(reasoning=("calling tools",), tool_calls=calls)
        return ScriptedTurn(answer=("done",))

    return script


def loop_runtime(config: Config, script: Callable[[ChatRequest], ScriptedTurn]) -> Runtime:
    return Runtime(
        config,
        agents={"loop": tool_calling_agent(max_steps=4)},
        tools=hanging_tools(),
        llm=ScriptedLLMProvider(script),
    )


# --- cancel during a tool --------------------------------------------------------------------


async def test_cancel_during_a_tool_over_the_memory_transport(
    make_config: Callable[..., Config], autojump_clock: trio.testing.MockClock
) -> None:
    """A cancel frame mid-tool: tool_completed cancelled (same call_id), agent_cancelled client, at once."""
    with trio.fail_after(BOUND):
        async with Runtime(make_config()) as runtime, trio.open_nursery() as nursery:
            client = await connect(nursery, runtime, "alice")
            start = trio.current_time()
            run_id = await client.user_message("sleep 30")
            await client.wait_event(run_id, "tool_executing")
            await client.send(type="cancel", run_id=run_id)
            await client.wait_terminal(run_id)
            elapsed = trio.current_time() - start
            await trio.testing.wait_all_tasks_blocked()
            frames_at_end = len(client.frames)
            await client.close()

    check_lifecycle(client.frames)
    assert len(client.frames) == frames_at_end  # nothing more arrived before the close
    assert_nothing_after_terminal(client, run_id)
    assert not client.replies("error")  # the cancel was accepted
    run = client.run_events(run_id)
    (executing,) = of_type(run, "tool_executing")
    (completed,) = of_type(run, "tool_completed")
    assert completed["data"]["call_id"] == executing["data"]["call_id"]
    assert completed["data"]["status"] == "cancelled"
    assert completed["data"]["error"]["type"] == "cancelled"
    assert types_of(run)[-2:] == ["tool_completed", "agent_cancelled"]
    assert run[-1]["data"] == {"reason": "client"}
    assert elapsed < 30
    assert elapsed == 0


async def test_cancel_during_a_tool_through_the_api(
    make_config: Callable[..., Config], autojump_clock: trio.testing.MockClock
) -> None:
    """RunHandle.cancel mid-tool: outcome active, tool cancelled, agent_cancelled, nothing after."""
    with trio.fail_after(BOUND):
        async with Runtime(make_config()) as runtime, trio.open_nursery() as nursery:
            observer = await connect(nursery, runtime, "alice")
            start = trio.current_time()
            handle = await runtime.start_run("alice", "sleep 30")
            run: list[Frame] = []
            outcome = None
            async for event in handle.events():
                run += decode_events([event])
                if event.type == "tool_executing":
                    outcome = await handle.cancel()
            elapsed = trio.current_time() - start
            await trio.testing.wait_all_tasks_blocked()
            await observer.close()

    assert outcome is not None
    assert outcome.state == "active"
    assert outcome.run_id == handle.run_id
    check_lifecycle(observer.frames)
    assert observer.run_events(handle.run_id) == run
    assert_nothing_after_terminal(observer, handle.run_id)
    (executing,) = of_type(run, "tool_executing")
    (completed,) = of_type(run, "tool_completed")
    assert completed["data"]["call_id"] == executing["data"]["call_id"]
    assert completed["data"]["status"] == "cancelled"
    assert run[-1]["type"] == "agent_cancelled"
    assert run[-1]["data"]["reason"] == "client"
    assert elapsed == 0


# --- cancel during the model's stream ------------------------------------------------------


class SlowThinker:
    """A provider whose reasoning chunks come 10 s apart; records how its stream ended."""

    name = "slow"

    def __init__(self) -> None:
        self.chunks_sent = 0
        self.closed = False

    async def stream_chat(self, request: ChatRequest) -> AsyncIterator[Any]:
        try:
            for i in range(3):
                self.chunks_sent += 1
                yield ReasoningDelta(f"thought {i} ")
                await trio.sleep(10)
            yield TextDelta("answer")
        finally:
            self.closed = True


async def test_cancel_during_thinking_stops_the_model_stream(
    make_config: Callable[..., Config], autojump_clock: trio.testing.MockClock
) -> None:
    """Cancel after the first agent_thinking: agent_cancelled at once, the stream closed, no more events."""
    provider = SlowThinker()
    runtime = Runtime(make_config(), agents={"loop": tool_calling_agent(max_steps=4)}, llm=provider)
    with trio.fail_after(BOUND):
        async with runtime, trio.open_nursery() as nursery:
            observer = await connect(nursery, runtime, "alice")
            start = trio.current_time()
            handle = await runtime.start_run("alice", "think slowly")
            run: list[Frame] = []
            async for event in handle.events():
                run += decode_events([event])
                if event.type == "agent_thinking":
                    assert (await handle.cancel()).state == "active"
            elapsed = trio.current_time() - start
            await trio.testing.wait_all_tasks_blocked()
            await observer.close()

    check_lifecycle(observer.frames)
    assert_nothing_after_terminal(observer, handle.run_id)
    assert types_of(run) == ["agent_started", "agent_thinking", "agent_cancelled"]
    assert run[-1]["data"]["reason"] == "client"
    assert provider.chunks_sent == 1
    assert provider.closed
    assert elapsed == 0


# --- cancel with parallel tools in flight --------------------------------------------------


@pytest.mark.parametrize("via", ["memory", "api"])
async def test_cancel_with_parallel_tools_in_flight(
    via: str, make_config: Callable[..., Config], autojump_clock: trio.testing.MockClock
) -> None:
    """Each in-flight tool ends with tool_completed cancelled (same call_id), all before agent_cancelled."""
    calls = tuple(ToolCall(f"call-{i}", "hang", {"label": str(i)}) for i in range(3))
    with trio.fail_after(BOUND):
        runtime = loop_runtime(make_config(), calls_then_answer(*calls))
        async with runtime, trio.open_nursery() as nursery:
            client = await connect(nursery, runtime, "alice")
            start = trio.current_time()
            if via == "memory":
                run_id = await client.user_message("three hangs")
                await client.wait_event(run_id, "tool_executing", count=3)
                await client.send(type="cancel", run_id=run_id)
            else:
                handle = await runtime.start_run("alice", "three hangs")
                run_id = handle.run_id
                await client.wait_event(run_id, "tool_executing", count=3)
                assert (await handle.cancel()).state == "active"
            await client.wait_terminal(run_id)
            elapsed = trio.current_time() - start
            await trio.testing.wait_all_tasks_blocked()
            await client.close()

    check_lifecycle(client.frames)
    assert_nothing_after_terminal(client, run_id)
    run = client.run_events(run_id)
    completed = of_type(run, "tool_completed")
    assert sorted(f["data"]["call_id"] for f in completed) == ["call-0", "call-1", "call-2"]
    assert {f["data"]["status"] for f in completed} == {"cancelled"}
    assert all(f["seq"] < run[-1]["seq"] for f in completed)
    assert run[-1]["type"] == "agent_cancelled"
    assert run[-1]["data"]["reason"] == "client"
    assert elapsed == 0


# --- cancel of a queued, unknown or finished run -------------------------------------------


async def test_cancel_of_a_queued_run_is_a_lone_agent_cancelled(
    make_config: Callable[..., Config], autojump_clock: trio.testing.MockClock
) -> None:
    """A queued run cancelled: outcome queued, its only event agent_cancelled; the active run is untouched."""
    with trio.fail_after(BOUND):
        async with Runtime(make_config()) as runtime, trio.open_nursery() as nursery:
            observer = await connect(nursery, runtime, "alice")
            first = await runtime.start_run("alice", "sleep 30")
            second = await runtime.start_run("alice", "sleep 30")
            await observer.wait_event(first.run_id, "tool_executing")
            stats = runtime.statistics()
            assert (stats.active_runs, stats.queued_runs) == (1, 1)
            outcome = await second.cancel()
            second_run = decode_events(await second.collect())
            stats = runtime.statistics()
            assert (stats.active_runs, stats.queued_runs) == (1, 0)
            first_run = decode_events(await first.collect())
            finished_at = trio.current_time()
            await trio.testing.wait_all_tasks_blocked()
            stats = runtime.statistics()
            await observer.close()

    assert outcome.state == "queued"
    check_lifecycle(observer.frames)
    assert types_of(second_run) == ["agent_cancelled"]
    assert second_run[0]["data"]["reason"] == "client"
    assert second_run[0]["thread_id"] == "main"
    assert observer.run_events(second.run_id) == second_run
    # The active run went on as if nothing happened, and ran its full 30 s.
    assert first_run[-1]["type"] == "agent_completed"
    assert of_type(first_run, "tool_completed")[0]["data"]["status"] == "ok"
    assert finished_at == 30
    assert (stats.active_runs, stats.queued_runs) == (0, 0)


async def test_cancel_of_a_queued_run_over_the_memory_transport(
    make_config: Callable[..., Config], autojump_clock: trio.testing.MockClock
) -> None:
    """A cancel frame for a queued run: no error, a lone agent_cancelled, then the next queued run starts."""
    with trio.fail_after(BOUND):
        async with Runtime(make_config()) as runtime, trio.open_nursery() as nursery:
            client = await connect(nursery, runtime, "alice")
            first = await client.user_message("sleep 30")
            queued = await client.user_message("sleep 30")
            third = await client.user_message("what is 2+3*4?")
            await client.send(type="cancel", run_id=queued)
            await client.wait_terminal(queued)
            await client.wait_terminal(third)
            await trio.testing.wait_all_tasks_blocked()
            await client.close()

    check_lifecycle(client.frames)
    assert not client.replies("error")
    assert types_of(client.run_events(queued)) == ["agent_cancelled"]
    assert client.run_events(first)[-1]["type"] == "agent_completed"
    assert client.run_events(third)[0]["seq"] > client.run_events(first)[-1]["seq"]
    assert client.run_events(third)[-1]["type"] == "agent_completed"


async def test_cancel_of_an_unknown_or_finished_run_is_not_found(
    make_config: Callable[..., Config], autojump_clock: trio.testing.MockClock
) -> None:
    """Cancelling a run that is unknown or already finished reports not_found and emits nothing."""
    with trio.fail_after(BOUND):
        async with Runtime(make_config()) as runtime, trio.open_nursery() as nursery:
            assert (await runtime.cancel_run("nobody", "run_x")).state == "not_found"
            client = await connect(nursery, runtime, "alice")
            assert (await runtime.cancel_run("alice", "run_x")).state == "not_found"
            handle = await runtime.start_run("alice", "what is 2+3*4?")
            run = decode_events(await handle.collect())
            outcome = await handle.cancel()  # right after the terminal event arrived
            await client.send(type="cancel", run_id=handle.run_id)
            error = await client.wait_for(lambda f: f["type"] == "error")
            await trio.testing.wait_all_tasks_blocked()
            await client.close()

    assert run[-1]["type"] == "agent_completed"
    assert outcome.state == "not_found"
    assert error["code"] == "not_found"
    assert handle.run_id in error["message"]
    check_lifecycle(client.frames)
    assert client.events == run  # the cancels emitted nothing


# --- shutdown ----------------------------------------------------------------------------------


async def test_shutdown_cancels_active_and_queued_runs(
    make_config: Callable[..., Config], autojump_clock: trio.testing.MockClock
) -> None:
    """Leaving the runtime: active run's tool cancelled + agent_cancelled shutdown; queued run a lone one; close 1001."""
    results: dict[str, list[Frame]] = {}

    async def collect(name: str, handle: Any) -> None:
        results[name] = decode_events(await handle.collect())

    with trio.fail_after(BOUND):
        async with trio.open_nursery() as outside:
            async with Runtime(make_config(shutdown_grace=2.0)) as runtime:
                client = await connect(outside, runtime, "alice")
                active = await runtime.start_run("alice", "sleep 30")
                queued = await runtime.start_run("alice", "sleep 30")
                wire_active = await client.user_message("sleep 30", thread_id="t2")
                outside.start_soon(collect, "active", active)
                outside.start_soon(collect, "queued", queued)
                await client.wait_event(active.run_id, "tool_executing")
                await client.wait_event(wire_active, "tool_executing")
                start = trio.current_time()
            shutdown_took = trio.current_time() - start
            await client.closed.wait()

    assert client.close_code == 1001
    check_lifecycle(client.frames)
    for run_id in (active.run_id, wire_active):
        run = client.run_events(run_id)
        assert types_of(run)[-2:] == ["tool_completed", "agent_cancelled"]
        assert run[-2]["data"]["status"] == "cancelled"
        assert run[-1]["data"]["reason"] == "shutdown"
    assert results["active"] == client.run_events(active.run_id)
    assert types_of(results["queued"]) == ["agent_cancelled"]
    assert results["queued"][0]["data"]["reason"] == "shutdown"
    assert results["queued"] == client.run_events(queued.run_id)
    assert shutdown_took < 2.0


# --- tools that ignore cancellation --------------------------------------------------------


async def _cancel_stubborn_tool(
    runtime: Runtime, seconds: float
) -> tuple[MemoryClient, str, float]:
    """Cancel a run while its tool ignores cancellation for ``seconds``; how long the run took to end."""
    async with trio.open_nursery() as nursery:
        client = await connect(nursery, runtime, "alice")
        handle = await runtime.start_run("alice", "be stubborn")
        await client.wait_event(handle.run_id, "tool_executing")
        cancelled_at = trio.current_time()
        assert (await handle.cancel()).state == "active"
        await client.wait_terminal(handle.run_id)
        took = trio.current_time() - cancelled_at
        await trio.sleep(2 * seconds)  # virtual: let the stubborn tool finish, whatever it does
        await trio.testing.wait_all_tasks_blocked()
        await client.close()
    return client, handle.run_id, took


async def test_tool_briefly_ignoring_cancellation_still_ends_once_before_the_terminal(
    make_config: Callable[..., Config], autojump_clock: trio.testing.MockClock
) -> None:
    """A tool shielding itself for 1 s: exactly one tool_completed, then exactly one terminal, agent_cancelled."""
    call = ToolCall("call-s", "stubborn", {"seconds": 1.0})
    with trio.fail_after(BOUND):
        async with loop_runtime(make_config(), calls_then_answer(call)) as runtime:
            client, run_id, took = await _cancel_stubborn_tool(runtime, 1.0)

    check_lifecycle(client.frames)
    assert_nothing_after_terminal(client, run_id)
    run = client.run_events(run_id)
    (completed,) = of_type(run, "tool_completed")
    assert completed["data"]["status"] in ("ok", "cancelled")
    assert types_of(run)[-1] == "agent_cancelled"
    assert took == 1.0  # the run waited for its tool to stop


async def test_tool_ignoring_cancellation_beyond_the_grace_is_abandoned_before_the_terminal(
    make_config: Callable[..., Config], autojump_clock: trio.testing.MockClock
) -> None:
    """A tool ignoring cancellation for 10 s is reported cancelled after tool_cancel_grace, before the terminal."""
    call = ToolCall("call-s", "stubborn", {"seconds": 10.0})
    config = make_config(tool_cancel_grace=2.0)
    with trio.fail_after(BOUND):
        async with loop_runtime(config, calls_then_answer(call)) as runtime:
            client, run_id, took = await _cancel_stubborn_tool(runtime, 10.0)

    check_lifecycle(client.frames)
    assert_nothing_after_terminal(client, run_id)
    run = client.run_events(run_id)
    (completed,) = of_type(run, "tool_completed")  # its late outcome was dropped
    assert completed["data"]["status"] == "cancelled"
    assert types_of(run)[-2:] == ["tool_completed", "agent_cancelled"]
    assert took == 2.0


# --- a cancel is never reported as a success -----------------------------------------------


@pytest.mark.parametrize("delay", [0.0, 0.5, 2.0, 2.999, 3.001, 3.5, 10.0])
async def test_cancel_is_never_reported_as_success(
    delay: float, make_config: Callable[..., Config], autojump_clock: trio.testing.MockClock
) -> None:
    """Cancel a 3 s run after ``delay``: active -> agent_cancelled; after it ended -> not_found, completed."""
    with trio.fail_after(BOUND):
        async with Runtime(make_config()) as runtime, trio.open_nursery() as nursery:
            client = await connect(nursery, runtime, "alice")
            handle = await runtime.start_run("alice", "sleep 3")
            await trio.sleep(delay)
            outcome = await handle.cancel()
            run = decode_events(await handle.collect())
            await trio.testing.wait_all_tasks_blocked()
            await client.close()

    check_lifecycle(client.frames)
    assert client.events == run
    if outcome.state == "active":
        assert run[-1]["type"] == "agent_cancelled"
    else:
        assert outcome.state == "not_found"
        assert run[-1]["type"] == "agent_completed"
    assert outcome.state == ("active" if delay < 3 else "not_found")


def _stream_script(request: ChatRequest) -> ScriptedTurn:
    return ScriptedTurn(reasoning=("r",), answer=("a ", "b ", "c"))


async def _agent_without_checkpoints(bridge: Any) -> str:
    return "answered without ever yielding"


async def test_cancel_reported_active_always_ends_cancelled(
    make_config: Callable[..., Config], autojump_clock: trio.testing.MockClock
) -> None:
    """Cancel after each event of a run: 'active' always ends agent_cancelled; after the terminal, not_found."""
    runtime = Runtime(
        make_config(),
        agents={"stream": tool_calling_agent(max_steps=2), "quick": _agent_without_checkpoints},
        llm=ScriptedLLMProvider(_stream_script),
    )
    broken: list[tuple[str, int, str]] = []
    with trio.fail_after(BOUND):
        async with runtime:
            for agent, length in (("stream", 6), ("quick", 2)):
                for cancel_after in range(1, length + 1):
                    for _ in range(5):
                        handle = await runtime.start_run("alice", "go", agent=agent)
                        run: list[Frame] = []
                        outcome = None
                        async for event in handle.events():
                            run += decode_events([event])
                            if len(run) == cancel_after:
                                outcome = await handle.cancel()
                        check_lifecycle(run)
                        assert outcome is not None, (agent, cancel_after, types_of(run))
                        if outcome.state == "active" and run[-1]["type"] != "agent_cancelled":
                            broken.append((agent, cancel_after, run[-1]["type"]))
                        if cancel_after == len(run) and outcome.state != "not_found":
                            broken.append((agent, cancel_after, f"after terminal: {outcome.state}"))
                        await trio.testing.wait_all_tasks_blocked()
    assert not broken, f"cancel answered 'active' but the run was not cancelled: {broken}"


async def _swallowing_agent(bridge: Any) -> str:
    try:
        await trio.sleep(10)
    except trio.Cancelled:
        return "pretending nothing happened"
    return "slept"  # pragma: no cover


async def test_agent_swallowing_the_cancel_is_still_reported_cancelled(
    make_config: Callable[..., Config], autojump_clock: trio.testing.MockClock
) -> None:
    """An 'active' cancel ends the run with agent_cancelled even if agent code swallows Cancelled."""
    runtime = Runtime(make_config(), agents={"swallow": _swallowing_agent})
    with trio.fail_after(BOUND):
        async with runtime:
            handle = await runtime.start_run("alice", "go")
            await trio.sleep(1)
            outcome = await handle.cancel()
            run = decode_events(await handle.collect())
    check_lifecycle(run)
    assert outcome.state == "active"
    assert run[-1]["type"] == "agent_cancelled"
