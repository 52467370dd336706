"""Execution tracking: the run state machine, phases, run deadlines and stall detection,
and the in-process API over them (``run_state``, ``runs``, ``run_counts``).

Deadlines run on virtual time (``autojump_clock``): a 30 s tool meets a 5 s deadline in
microseconds of real time, and the test can say exactly when the run ended.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from netra_actors import AgentWebSocketBridge, Config, Runtime, ToolRegistry
from netra_actors._messages import Event
from netra_actors._tracker import (
    FINISHED_STATES,
    RUN_STATES,
    TRANSITIONS,
    ExecutionTracker,
    IllegalTransition,
    RunState,
    check_transition,
    state_after,
)
from netra_actors.testing import check_lifecycle

BOUND = 600


# --- the state machine ---------------------------------------------------------------------


def test_the_transition_table_is_the_documented_one() -> None:
    """queued -> running | cancelled; running -> any finished state; finished states are final."""
    assert TRANSITIONS["queued"] == {"running", "cancelled"}
    assert TRANSITIONS["running"] == FINISHED_STATES
    assert all(not TRANSITIONS[state] for state in FINISHED_STATES)
    assert set(TRANSITIONS) == set(RUN_STATES)


@pytest.mark.parametrize("current", RUN_STATES)
@pytest.mark.parametrize("target", RUN_STATES)
def test_check_transition_allows_exactly_the_table(current: RunState, target: RunState) -> None:
    """Every pair of states: allowed iff the table has the edge."""
    if target in TRANSITIONS[current]:
        check_transition(current, target)
    else:
        with pytest.raises(IllegalTransition):
            check_transition(current, target)


def _event(seq: int, kind: str, run_id: str = "r1", **data: Any) -> Event:
    return Event(seq, kind, run_id, "main", float(seq), "t" * 32, "s" * 16, data, frame="{}")


EVENT_KINDS = [
    "agent_started",
    "agent_thinking",
    "tool_executing",
    "tool_completed",
    "partial_result",
    "agent_completed",
    "agent_cancelled",
    "agent_error",
]


@given(st.lists(st.sampled_from([*EVENT_KINDS, "agent_error:timeout"]), max_size=12))
def test_the_tracker_never_leaves_the_state_machine(kinds: list[str]) -> None:
    """Any event sequence, lawful or not: every recorded transition is an edge of the table,
    a finished run never changes again, and an illegal event is dropped, never raised."""
    tracker = ExecutionTracker()
    tracker.admitted(
        "r1", session_id="s", user_id="u", thread_id="main", agent_name="a", trace_id="t"
    )
    finished_at: tuple[RunState, int] | None = None
    for seq, kind in enumerate(kinds, 1):
        name, _, error = kind.partition(":")
        data = {"error": {"type": error or "agent_error", "message": "x"}}
        data |= {"call_id": "c1", "tool_name": "calc"}
        tracker.observe("s", "u", [_event(seq, name, **data)])
        snapshot = tracker.run("r1")
        assert snapshot is not None
        if finished_at is not None:
            assert (snapshot.state, len(snapshot.transitions)) == finished_at
        elif snapshot.finished:
            finished_at = (snapshot.state, len(snapshot.transitions))
    snapshot = tracker.run("r1")
    assert snapshot is not None
    states = [state for state, _ in snapshot.transitions]
    assert states[0] == "queued"
    for before, after in itertools.pairwise(states):
        assert after in TRANSITIONS[before]
    assert tracker.events_published == len(kinds)


def test_state_after_reads_the_terminal_events() -> None:
    assert state_after("agent_started", {}) == "running"
    assert state_after("agent_completed", {}) == "completed"
    assert state_after("agent_cancelled", {"reason": "client"}) == "cancelled"
    assert state_after("agent_error", {"error": {"type": "timeout", "message": ""}}) == "timed_out"
    assert state_after("agent_error", {"error": {"type": "interrupted", "message": ""}}) == "failed"
    assert state_after("tool_executing", {}) is None


# --- the tracker in a runtime ----------------------------------------------------------------


async def test_a_run_is_tracked_through_its_states_and_phases(
    make_config: Callable[..., Config], autojump_clock: trio.testing.MockClock
) -> None:
    """A tool-using run: queued, running (phase ``tool:sleep`` while its tool runs), completed;
    transition times never go back; counts and per-session listings agree."""
    with trio.fail_after(BOUND):
        async with Runtime(make_config()) as runtime:
            handle = await runtime.start_run("alice", "sleep 3")
            events: list[Event] = []
            async for event in handle.events():
                events.append(event)
                state = runtime.run_state(handle.run_id)
                assert state is not None
                if event.type == "tool_executing":
                    assert (state.state, state.phase) == ("running", "tool:sleep")
                elif event.type == "agent_thinking":
                    assert state.phase in ("thinking", "started")
            check_lifecycle([e.frame for e in events])
            state = runtime.run_state(handle.run_id)
            assert state is not None
            assert [s for s, _ in state.transitions] == ["queued", "running", "completed"]
            times = [t for _, t in state.transitions]
            assert times == sorted(times)
            assert state.phase is None
            assert state.finished
            assert state.duration is not None
            assert state.duration >= 0
            assert state.session_id == handle.session.session_id
            assert [r.run_id for r in runtime.runs(session_id=handle.session.session_id)] == [
                handle.run_id
            ]
            assert runtime.run_counts()["completed"] == 1
            assert runtime.tracker.finished_totals["completed"] == 1
            assert runtime.tracker.events_published == len(events)


async def test_a_queued_run_cancelled_goes_from_queued_to_cancelled(
    make_config: Callable[..., Config], autojump_clock: trio.testing.MockClock
) -> None:
    """A second run on a busy thread waits as ``queued``; cancelled there, it never ran."""
    with trio.fail_after(BOUND):
        async with Runtime(make_config()) as runtime:
            first = await runtime.start_run("alice", "sleep 5")
            second = await runtime.start_run("alice", "calc 1+1")
            state = runtime.run_state(second.run_id)
            assert state is not None
            assert state.state == "queued"
            assert state.phase is None
            assert runtime.runs(user_id="alice", states=["queued"])[0].run_id == second.run_id
            outcome = await second.cancel()
            assert outcome.state == "queued"
            await second.collect()
            state = runtime.run_state(second.run_id)
            assert state is not None
            assert [s for s, _ in state.transitions] == ["queued", "cancelled"]
            assert state.entered("running") is None
            await first.collect()
            counts = runtime.run_counts()
            assert (counts["completed"], counts["cancelled"], counts["running"]) == (1, 1, 0)


# --- deadlines and stalls -------------------------------------------------------------------


async def test_a_run_past_its_deadline_ends_agent_error_timeout(
    make_config: Callable[..., Config], autojump_clock: trio.testing.MockClock
) -> None:
    """A 30 s tool under a 5 s run deadline: the tool is cancelled (``tool_completed``
    cancelled), then the run ends ``agent_error`` of type ``timeout`` at 5 s; the tracker
    says ``timed_out``."""
    config = make_config(run_timeout=5.0, stall_timeout=None)
    with trio.fail_after(BOUND):
        async with Runtime(config) as runtime:
            started = trio.current_time()
            handle = await runtime.start_run("alice", "sleep 30")
            events = await handle.collect()
            elapsed = trio.current_time() - started
    check_lifecycle([e.frame for e in events])
    assert [e.type for e in events][-2:] == ["tool_completed", "agent_error"]
    assert events[-2].data["status"] == "cancelled"
    assert events[-1].data["error"]["type"] == "timeout"
    assert "5 s deadline" in events[-1].data["error"]["message"]
    assert 5.0 <= elapsed < 5.0 + config.tool_cancel_grace
    state = runtime.run_state(handle.run_id)
    assert state is not None
    assert state.state == "timed_out"


async def test_a_per_agent_deadline_overrides_the_default(
    make_config: Callable[..., Config], autojump_clock: trio.testing.MockClock
) -> None:
    """``run_timeouts={"demo": None}`` lifts the default deadline for that agent only."""
    config = make_config(run_timeout=2.0, stall_timeout=None)
    with trio.fail_after(BOUND):
        async with Runtime(config, run_timeouts={"demo": None}) as runtime:
            events = await (await runtime.start_run("alice", "sleep 6")).collect()
    assert events[-1].type == "agent_completed"


def _stalling_agent(pauses: list[float]) -> Callable[[AgentWebSocketBridge], Any]:
    async def agent(bridge: AgentWebSocketBridge) -> str:
        for step, pause in enumerate(pauses):
            await bridge.thinking(f"step {step}")
            await trio.sleep(pause)
        return "done"

    return agent


@pytest.mark.parametrize(
    ("pauses", "outcome"),
    [
        pytest.param([1.0] * 20, "agent_completed", id="steady-progress-outlives-the-limit"),
        pytest.param([1.0, 1.0, 100.0], "agent_error", id="stalls-after-two-steps"),
    ],
)
async def test_a_run_without_progress_for_stall_timeout_ends_timeout(
    make_config: Callable[..., Config],
    autojump_clock: trio.testing.MockClock,
    pauses: list[float],
    outcome: str,
) -> None:
    """Progress (an event) every second keeps a run alive far past the 3 s stall limit;
    a run silent for 3 s ends ``agent_error`` timeout, 3 s after its last event."""
    config = make_config(run_timeout=None, stall_timeout=3.0)
    agents = {"stalling": _stalling_agent(pauses)}
    with trio.fail_after(BOUND):
        async with Runtime(config, agents=agents, tools=ToolRegistry()) as runtime:
            handle = await runtime.start_run("alice", "go")
            events = await handle.collect()
    check_lifecycle([e.frame for e in events])
    assert events[-1].type == outcome
    if outcome == "agent_error":
        assert events[-1].data["error"]["type"] == "timeout"
        assert "stalled" in events[-1].data["error"]["message"]
        assert events[-1].ts >= events[-2].ts
        state = runtime.run_state(handle.run_id)
        assert state is not None
        assert state.state == "timed_out"


STALL = 3.0


def _timed_agent(pauses: list[float], marks: list[float]) -> Callable[[AgentWebSocketBridge], Any]:
    """Emits an event, records when (virtual time), then pauses; for each pause."""

    async def agent(bridge: AgentWebSocketBridge) -> str:
        for step, pause in enumerate(pauses):
            await bridge.thinking(f"step {step}")
            marks.append(trio.current_time())
            await trio.sleep(pause)
        return "done"

    return agent


@given(
    runs=st.lists(
        st.tuples(
            st.floats(0.0, 2.0),  # when the run starts
            st.lists(st.sampled_from([0.5, 1.0, 2.9, 3.5, 50.0]), min_size=1, max_size=5),
        ),
        min_size=1,
        max_size=6,
    )
)
def test_concurrent_runs_each_stall_at_their_own_last_progress_plus_the_limit(
    runs: list[tuple[float, list[float]]],
) -> None:
    """Several users' runs at once, one stall watch for all: a run ends ``agent_error``
    timeout exactly ``stall_timeout`` after its last event if a pause of its reaches the
    limit, and completes otherwise, whatever the others do (virtual time)."""
    config = Config(store="memory", run_timeout=None, stall_timeout=STALL, write_linger=0.0)
    marks: list[list[float]] = [[] for _ in runs]
    agents = {f"a{i}": _timed_agent(pauses, marks[i]) for i, (_, pauses) in enumerate(runs)}
    ends: dict[int, tuple[float, Event]] = {}

    async def one(runtime: Runtime, i: int, delay: float) -> None:
        await trio.sleep(delay)
        handle = await runtime.start_run(f"user{i}", "go", agent=f"a{i}")
        async for event in handle.events():
            last = (trio.current_time(), event)
        ends[i] = last

    async def main() -> None:
        with trio.fail_after(BOUND):
            runtime = Runtime(config, agents=agents, tools=ToolRegistry())
            async with runtime, trio.open_nursery() as nursery:
                for i, (delay, _) in enumerate(runs):
                    nursery.start_soon(one, runtime, i, delay)

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    for i, (_, pauses) in enumerate(runs):
        at, terminal = ends[i]
        stall = next((k for k, pause in enumerate(pauses) if pause >= STALL), None)
        if stall is None:
            assert terminal.type == "agent_completed", (i, pauses)
        else:
            assert terminal.type == "agent_error", (i, pauses)
            assert terminal.data["error"]["type"] == "timeout"
            assert len(marks[i]) == stall + 1  # nothing ran after the stall
            assert at == pytest.approx(marks[i][stall] + STALL, abs=1e-6), (i, pauses)


async def test_a_cancel_racing_the_deadline_is_reported_as_cancelled(
    make_config: Callable[..., Config], autojump_clock: trio.testing.MockClock
) -> None:
    """A cancel answered ``active`` wins over a deadline that expires during the cancel."""
    config = make_config(run_timeout=5.0, stall_timeout=None, tool_cancel_grace=10.0)
    with trio.fail_after(BOUND):
        async with Runtime(config) as runtime:
            handle = await runtime.start_run("alice", "sleep 30")
            await trio.sleep(4.999)
            outcome = await handle.cancel()
            events = await handle.collect()
    assert outcome.state == "active"
    assert events[-1].type == "agent_cancelled"
