"""Property tests: drawn agent scripts (thinking, tool calls that succeed, fail or hang, parallel
calls, a streamed answer) and cancel points always give a well-formed, faithful event stream.

Each example runs a whole runtime in virtual time (``MockClock(autojump_threshold=0)``),
so a hanging tool's 5 s timeout costs no real time. Under hypothesis, trio's
scheduler is seeded by hypothesis, so every example replays deterministically.
"""

from __future__ import annotations

import itertools
import json
from typing import Any

import attrs
import hypothesis
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st
from strategies import (
    AgentScript,
    MemoryClient,
    ScriptBook,
    agent_scripts,
    check_cancel_timing,
    check_run_against_script,
    connect,
    script_runtime,
)

from netra_actors import Config, Runtime
from netra_actors.testing import check_lifecycle

CONFIG = Config(store="memory", shutdown_grace=2.0, write_linger=0.0)  # exact timing model
#: Virtual seconds; far more than any drawn script needs (a hang costs 5 s).
BOUND = 3600


def run_virtual(fn: Any, *args: Any) -> None:
    trio.run(fn, *args, clock=trio.testing.MockClock(autojump_threshold=0))


def tool_messages_per_turn(script: AgentScript, turns_seen: int) -> list[int]:
    """How many tool messages the model must see at each of its first ``turns_seen`` turns."""
    seen = list(itertools.accumulate((len(t.calls) for t in script.turns), initial=0))
    return seen[:turns_seen]


async def _one_scripted_run(script: AgentScript) -> None:
    book = ScriptBook()
    text = book.add("solo", script)
    events: list[dict[str, Any]] = []
    times: list[float] = []
    outcome: str | None = None
    cancel_time: float | None = None
    with trio.fail_after(BOUND):
        async with trio.open_nursery() as nursery, script_runtime(book, CONFIG) as runtime:
            observer = await connect(nursery, runtime, "alice")
            handle = await runtime.start_run("alice", text)
            async for event in handle.events():
                events.append(json.loads(event.frame))
                times.append(trio.current_time())
                if len(events) == script.cancel_after:
                    cancel_time = trio.current_time()
                    outcome = (await handle.cancel()).state
            await trio.testing.wait_all_tasks_blocked()
            seen_by_observer = list(observer.events)
            stats = runtime.statistics()

    # The handle saw exactly what a connected client saw, and nothing followed it
    # (leaving the runtime closed the observer's connection as a shutdown).
    assert seen_by_observer == events == observer.events
    assert observer.close_code == 1001
    check_lifecycle(observer.frames)
    check_run_against_script(script, events, outcome)
    check_cancel_timing(script, events, times, cancel_time)
    statuses = sorted({e["data"]["status"] for e in events if e["type"] == "tool_completed"})
    hypothesis.event(f"{events[-1]['type']}, cancel {outcome}, tool statuses {statuses}")
    seen = book.tool_messages_seen["solo"]
    assert seen == tool_messages_per_turn(script, len(seen))
    if events[-1]["type"] == "agent_completed":
        assert len(seen) == len(script.turns)
    assert (stats.active_runs, stats.queued_runs) == (0, 0)


@given(script=agent_scripts())
def test_scripted_run_follows_its_script(script: AgentScript) -> None:
    """Any script and cancel point: lifecycle holds, cancelled iff cancel was 'active', events match the script."""
    run_virtual(_one_scripted_run, script)


@attrs.define
class _User:
    """One user of the several-users property: its script, connection and run."""

    name: str
    script: AgentScript
    text: str
    client: MemoryClient | None = None
    run_id: str | None = None
    cancel_time: float | None = None


async def _user_flow(runtime: Runtime, nursery: trio.Nursery, user: _User) -> None:
    client = user.client = await connect(nursery, runtime, user.name)
    run_id = user.run_id = await client.user_message(user.text)
    if user.script.cancel_after is not None:
        await client.wait_event(run_id, count=user.script.cancel_after)
        user.cancel_time = trio.current_time()
        await client.send(type="cancel", run_id=run_id)
    await client.wait_terminal(run_id)


async def _several_users(scripts: list[AgentScript]) -> None:
    book = ScriptBook()
    users = [
        _User(f"user{i}", script, book.add(f"user{i}", script)) for i, script in enumerate(scripts)
    ]
    with trio.fail_after(BOUND):
        async with trio.open_nursery() as nursery, script_runtime(book, CONFIG) as runtime:
            async with trio.open_nursery() as flows:
                for user in users:
                    flows.start_soon(_user_flow, runtime, nursery, user)
            await trio.testing.wait_all_tasks_blocked()
            for user in users:
                assert user.client is not None
                await user.client.close()
            await trio.testing.wait_all_tasks_blocked()
            stats = runtime.statistics()

    assert (stats.active_runs, stats.queued_runs, stats.connections) == (0, 0, 0)
    sessions = set()
    for user in users:
        client, script = user.client, user.script
        assert client is not None
        assert user.run_id is not None
        sessions.add(client.session_ready["session_id"])
        check_lifecycle(client.frames)
        assert client.session_ready["last_seq"] == 0
        assert [f["seq"] for f in client.events] == list(range(1, len(client.events) + 1))
        assert {f["run_id"] for f in client.events} == {user.run_id}
        assert client.events[0]["data"]["user_id"] == user.name
        errors = client.replies("error")
        outcome = None
        if script.cancel_after is not None:
            # A cancel of a run that is no longer queued or active is answered not_found.
            assert all(e["code"] == "not_found" for e in errors), errors
            outcome = "not_found" if errors else "active"
        else:
            assert not errors
        check_run_against_script(script, client.events, outcome)
        check_cancel_timing(
            script, client.events, client.run_event_times(user.run_id), user.cancel_time
        )
    assert len(sessions) == len(users)


@given(scripts=st.lists(agent_scripts(max_steps=4), min_size=2, max_size=4))
def test_concurrent_users_each_see_only_their_own_run(scripts: list[AgentScript]) -> None:
    """2-4 users run drawn scripts at once: each connection sees only its user's run, gap-free and well-formed."""
    run_virtual(_several_users, scripts)
