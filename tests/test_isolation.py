"""Isolation: sessions never see each other's events, connections of one user see the same
stream, a fault stays in its run, and nothing is left behind once everything has ended.

In-memory transports and virtual time; every stream goes through ``check_lifecycle``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import trio
import trio.testing
from strategies import Frame, MemoryClient, connect, decode_events, of_type, types_of

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


def assert_gap_free_from_one(client: MemoryClient) -> None:
    assert client.session_ready["last_seq"] == 0
    seqs = [f["seq"] for f in client.events]
    assert seqs == list(range(1, len(seqs) + 1)), seqs


async def _chat(client: MemoryClient, messages: list[tuple[str, str]]) -> list[str]:
    """Send every (thread, text) at once, then wait for all their terminal events."""
    run_ids = [await client.user_message(text, thread_id=thread) for thread, text in messages]
    for run_id in run_ids:
        await client.wait_terminal(run_id)
    return run_ids


async def test_concurrent_sessions_each_receive_only_their_own_events(
    make_config: Callable[..., Config], autojump_clock: trio.testing.MockClock
) -> None:
    """Two users at once: each connection gets only its user's runs, gap-free from 1, own session."""
    messages = [("a", "stream 20"), ("b", "what is 2+3*4?")]
    clients: dict[str, MemoryClient] = {}
    runs: dict[str, list[str]] = {}

    async def user(name: str) -> None:
        clients[name] = await connect(nursery, runtime, name)
        runs[name] = await _chat(clients[name], messages)

    with trio.fail_after(BOUND):
        async with Runtime(make_config()) as runtime, trio.open_nursery() as nursery:
            async with trio.open_nursery() as users:
                users.start_soon(user, "alice")
                users.start_soon(user, "bob")
            await trio.testing.wait_all_tasks_blocked()
            for client in clients.values():
                await client.close()

    assert (
        clients["alice"].session_ready["session_id"] != clients["bob"].session_ready["session_id"]
    )
    for name, client in clients.items():
        report = check_lifecycle(client.frames)
        assert_gap_free_from_one(client)
        assert set(report.runs) == set(runs[name])
        assert {f["run_id"] for f in client.events} == set(runs[name])
        assert {f["run_id"] for f in client.replies("run_accepted")} == set(runs[name])
        for started in of_type(client.events, "agent_started"):
            assert started["data"]["user_id"] == name
        stream_run, calc_run = (client.run_events(r) for r in runs[name])
        assert len(of_type(stream_run, "partial_result")) == 20
        assert stream_run[-1]["type"] == calc_run[-1]["type"] == "agent_completed"
        assert "14" in calc_run[-1]["data"]["final_response"]
    alice_traces = {f["trace_id"] for f in clients["alice"].events}
    bob_traces = {f["trace_id"] for f in clients["bob"].events}
    assert not alice_traces & bob_traces


async def test_connections_of_one_user_receive_identical_event_frames(
    make_config: Callable[..., Config], autojump_clock: trio.testing.MockClock
) -> None:
    """Two tabs of one user get the same events in the same order; replies go to the sender only."""
    with trio.fail_after(BOUND):
        async with Runtime(make_config()) as runtime, trio.open_nursery() as nursery:
            tab1 = await connect(nursery, runtime, "alice")
            tab2 = await connect(nursery, runtime, "alice")
            first = await _chat(tab1, [("a", "stream 20"), ("b", "what is 2+3*4?")])
            second = await _chat(tab2, [("a", "fail"), ("c", "crash")])
            await tab1.wait_terminal(second[-1])
            await tab2.wait_terminal(first[-1])
            # A tab that joins late gets only what follows its session_ready.last_seq.
            late = await connect(nursery, runtime, "alice")
            third = await _chat(tab1, [("a", "stream 3")])
            await tab2.wait_terminal(third[0])
            await late.wait_terminal(third[0])
            await trio.testing.wait_all_tasks_blocked()
            for tab in (tab1, tab2, late):
                await tab.close()

    for tab in (tab1, tab2, late):
        check_lifecycle(tab.frames)
    assert_gap_free_from_one(tab1)
    assert tab1.events == tab2.events
    assert len({t.session_ready["session_id"] for t in (tab1, tab2, late)}) == 1
    assert {f["run_id"] for f in tab1.replies("run_accepted")} == set(first + third)
    assert {f["run_id"] for f in tab2.replies("run_accepted")} == set(second)
    assert not late.replies("run_accepted")
    last_seq = late.session_ready["last_seq"]
    assert last_seq == len(tab1.events) - len(tab1.run_events(third[0]))
    assert late.events == [f for f in tab1.events if f["seq"] > last_seq]
    assert {f["run_id"] for f in late.events} == set(third)


async def test_a_fault_in_one_session_never_affects_another(
    make_config: Callable[..., Config], autojump_clock: trio.testing.MockClock
) -> None:
    """Alice's crashes, tool errors, LLM failures and cancels leave Bob's concurrent runs untouched."""
    with trio.fail_after(BOUND):
        async with Runtime(make_config()) as runtime, trio.open_nursery() as nursery:
            alice = await connect(nursery, runtime, "alice")
            bob = await connect(nursery, runtime, "bob")
            bob_runs = [
                await bob.user_message("sleep 5", thread_id="slow"),
                await bob.user_message("stream 20", thread_id="fast"),
            ]
            alice_runs = [
                await alice.user_message(text, thread_id=text)
                for text in ("crash", "fail", "llm fail", "sleep 30")
            ]
            await alice.wait_event(alice_runs[-1], "tool_executing")
            await alice.send(type="cancel", run_id=alice_runs[-1])
            for run_id in alice_runs:
                await alice.wait_terminal(run_id)
            for run_id in bob_runs:
                await bob.wait_terminal(run_id)
            await trio.testing.wait_all_tasks_blocked()
            for client in (alice, bob):
                await client.close()

    check_lifecycle(alice.frames)
    terminals = [alice.run_events(r)[-1]["type"] for r in alice_runs]
    assert terminals == ["agent_error", "agent_completed", "agent_error", "agent_cancelled"]

    check_lifecycle(bob.frames)
    assert_gap_free_from_one(bob)
    assert not bob.replies("error")
    assert {f["run_id"] for f in bob.events} == set(bob_runs)
    slow, fast = (bob.run_events(r) for r in bob_runs)
    assert slow[-1]["type"] == fast[-1]["type"] == "agent_completed"
    assert of_type(slow, "tool_completed")[0]["data"]["status"] == "ok"
    assert len(of_type(fast, "partial_result")) == 20
    assert types_of(fast)[0] == "agent_started"


async def test_statistics_return_to_zero_when_everything_has_ended(
    make_config: Callable[..., Config], autojump_clock: trio.testing.MockClock
) -> None:
    """Once runs end and connections close: 0 active runs, 0 queued runs, 0 connections."""
    with trio.fail_after(BOUND):
        async with Runtime(make_config()) as runtime, trio.open_nursery() as nursery:
            alice = await connect(nursery, runtime, "alice")
            alice2 = await connect(nursery, runtime, "alice")
            bob = await connect(nursery, runtime, "bob")
            sleeping = await alice.user_message("sleep 5")
            queued = await alice.user_message("sleep 5")
            cancelled = await bob.user_message("sleep 30")
            crashed = await bob.user_message("crash", thread_id="other")
            await bob.wait_event(cancelled, "tool_executing")
            await bob.wait_terminal(crashed)
            await trio.testing.wait_all_tasks_blocked()
            during = runtime.statistics()
            await bob.send(type="cancel", run_id=cancelled)
            for client, run_id in ((alice, sleeping), (alice, queued), (bob, cancelled)):
                await client.wait_terminal(run_id)
            await trio.testing.wait_all_tasks_blocked()
            for client in (alice, alice2, bob):
                await client.close()
            await trio.testing.wait_all_tasks_blocked()
            after = runtime.statistics()
            per_user = [runtime.session_statistics(u) for u in ("alice", "bob")]

    assert (during.sessions, during.connections) == (2, 3)
    assert (during.active_runs, during.queued_runs) == (2, 1)
    assert (after.active_runs, after.queued_runs, after.connections) == (0, 0, 0)
    for stats in per_user:
        assert stats is not None
        assert (stats.active_runs, stats.queued_runs, stats.connections) == (0, 0, 0)
    for client in (alice, alice2, bob):
        check_lifecycle(client.frames)
        assert client.close_code == 1000


# --- faults in agent code that must stay in their run -------------------------------------------


async def _emits_bytes(bridge: Any) -> str:
    await bridge.partial(b"bytes are not JSON")
    return "unreachable"


async def _thinks_an_object(bridge: Any) -> str:
    await bridge.thinking(object())
    return "unreachable"


async def _calls_a_tool_with_a_set(bridge: Any) -> str:
    result = await bridge.execute_tool("echo", {"value": {1, 2}})
    return f"tool said {result.status}"


async def _sleeps_then_answers(bridge: Any) -> str:
    await trio.sleep(5)
    await bridge.partial("fine")
    return "fine"


def _echo_tools() -> ToolRegistry:
    registry = ToolRegistry()

    @registry.tool()
    async def echo(value: Any) -> str:
        """Return the value's text."""
        await trio.lowlevel.checkpoint()
        return str(value)

    return registry


@pytest.mark.parametrize(
    "bad_agent",
    [_emits_bytes, _thinks_an_object, _calls_a_tool_with_a_set],
    ids=["partial-bytes", "thinking-object", "tool-parameters-set"],
)
async def test_agent_emitting_non_json_data_does_not_affect_other_sessions(
    bad_agent: Any, make_config: Callable[..., Config], autojump_clock: trio.testing.MockClock
) -> None:
    """A run emitting non-JSON data stays well-formed and alone; another user's run still completes."""
    runtime = Runtime(
        make_config(),
        agents={"good": _sleeps_then_answers, "bad": bad_agent},
        tools=_echo_tools(),
    )
    results: dict[str, list[Frame]] = {}
    failures: dict[str, BaseException] = {}

    async def collect(name: str, handle: Any) -> None:
        try:
            results[name] = decode_events(await handle.collect())
        except Exception as exc:
            failures[name] = exc

    try:
        with trio.fail_after(BOUND):
            async with runtime, trio.open_nursery() as nursery:
                bob = await runtime.start_run("bob", "hi", agent="good")
                nursery.start_soon(collect, "bob", bob)
                alice = await runtime.start_run("alice", "hi", agent="bad")
                nursery.start_soon(collect, "alice", alice)
                # Alice's session keeps serving runs afterwards.
                nursery.start_soon(
                    collect, "alice-next", await runtime.start_run("alice", "hi", agent="good")
                )
    except Exception as exc:
        failures["runtime"] = exc
    assert not failures, f"one run's non-JSON data broke other work: {failures!r}"
    check_lifecycle(results["bob"])
    assert results["bob"][-1]["type"] == "agent_completed"
    check_lifecycle(results["alice"] + results["alice-next"])
    assert results["alice-next"][-1]["type"] == "agent_completed"
    if bad_agent is _calls_a_tool_with_a_set:
        # The parameters went out as JSON text; the run carried on.
        (executing,) = of_type(results["alice"], "tool_executing")
        assert isinstance(executing["data"]["parameters"]["value"], str)
        assert results["alice"][-1]["type"] == "agent_completed"
    else:
        assert results["alice"][-1]["type"] == "agent_error"
        assert results["alice"][-1]["data"]["error"]["type"] == "agent_error"


def _hang_with_fixed_call_id(request: ChatRequest) -> ScriptedTurn:
    """A model whose call ids are only unique within a conversation (as some servers do)."""
    if not any(m.role == "tool" for m in request.messages):
        return ScriptedTurn(tool_calls=(ToolCall("call_0", "wait", {"seconds": 10.0}),))
    return ScriptedTurn(answer=("done",))


async def test_cancelling_one_run_never_touches_another_runs_tool_call(
    make_config: Callable[..., Config], autojump_clock: trio.testing.MockClock
) -> None:
    """Two threads' runs reuse call id 'call_0': cancelling one leaves the other's tool running."""
    registry = ToolRegistry()

    @registry.tool()
    async def wait(seconds: float) -> float:
        """Sleep, then return the seconds."""
        await trio.sleep(seconds)
        return seconds

    runtime = Runtime(
        make_config(),
        agents={"loop": tool_calling_agent(max_steps=3)},
        tools=registry,
        llm=ScriptedLLMProvider(_hang_with_fixed_call_id),
    )
    with trio.fail_after(BOUND):
        async with runtime, trio.open_nursery() as nursery:
            client = await connect(nursery, runtime, "alice")
            victim = await client.user_message("go", thread_id="t1")
            other = await client.user_message("go", thread_id="t2")
            await client.wait_event(victim, "tool_executing")
            await client.wait_event(other, "tool_executing")
            await trio.sleep(1)
            await client.send(type="cancel", run_id=victim)
            await client.wait_terminal(victim)
            await client.wait_terminal(other)
            await trio.sleep(20)
            await trio.testing.wait_all_tasks_blocked()
            await client.close()

    check_lifecycle(client.frames)
    other_run = client.run_events(other)
    assert other_run[-1]["type"] == "agent_completed"
    assert of_type(other_run, "tool_completed")[0]["data"]["status"] == "ok"
    assert client.run_events(victim)[-1]["type"] == "agent_cancelled"
