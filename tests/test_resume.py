"""Resuming a session's stream: reconnect with ``after_seq``, the ``resume`` frame,
``resume_gap`` when a resume cannot be exact, runs that go on with no connection
open, and idle sessions torn down after ``idle_session_grace``.

In-memory transports (``memory_transport_pair`` + ``Runtime.serve_connection``)
under virtual time: the ``autojump_clock`` fixture, or ``MockClock(autojump_threshold=0)``
in the hypothesis properties. Every received stream goes through ``check_lifecycle``;
a resumed stream is checked as the concatenation of its pieces de-duplicated by ``seq``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from functools import partial
from typing import Any

import attrs
import hypothesis
import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st
from strategies import (
    AgentScript,
    Frame,
    MemoryClient,
    ScriptBook,
    agent_scripts,
    is_event,
    is_terminal,
    of_type,
    script_tools,
)

from netra_actors import (
    AgentWebSocketBridge,
    ChatRequest,
    Config,
    Runtime,
    ScriptedLLMProvider,
    ScriptedTurn,
    TransportClosed,
    demo_agent,
    memory_transport_pair,
)
from netra_actors._agents import demo_llm, demo_script, demo_tools
from netra_actors.testing import check_lifecycle

#: Virtual seconds; every test here needs far less.
BOUND = 600

# --- helpers -------------------------------------------------------------------------------------


async def open_client(
    nursery: trio.Nursery,
    runtime: Runtime,
    user_id: str,
    *,
    after_seq: int | None = None,
    session_hint: str | None = None,
    capacity: int = 256,
) -> MemoryClient:
    """A connection of ``user_id`` (resuming when ``after_seq`` is given), after its ``session_ready``."""
    server_end, client_end = memory_transport_pair(capacity)
    client = MemoryClient(client_end, user_id)
    nursery.start_soon(
        partial(
            runtime.serve_connection,
            user_id,
            server_end,
            after_seq=after_seq,
            session_hint=session_hint,
        )
    )
    nursery.start_soon(client.read_forever)
    await client.wait_for(lambda f: True)
    assert client.session_ready["user_id"] == user_id
    return client


async def close_client(client: MemoryClient) -> None:
    await client.close()
    await client.closed.wait()


def seqs(frames: Iterable[Mapping[str, Any]]) -> list[int]:
    return [f["seq"] for f in frames if is_event(f)]


def merge_by_seq(*pieces: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The events of several received pieces, de-duplicated by ``seq``, in ``seq`` order.

    A ``seq`` received twice must carry the very same event both times.
    """
    merged: dict[int, Mapping[str, Any]] = {}
    for piece in pieces:
        for frame in piece:
            if not is_event(frame):
                continue
            seen = merged.setdefault(frame["seq"], frame)
            assert seen == frame, f"seq {frame['seq']} came twice with different content"
    return [merged[s] for s in sorted(merged)]


def check_resumed(ready: Mapping[str, Any], *pieces: Iterable[Mapping[str, Any]]) -> list[Any]:
    """``check_lifecycle`` over ``ready`` then the pieces' events de-duplicated by ``seq``."""
    events = merge_by_seq(*pieces)
    check_lifecycle([ready, *events])
    return events


def paced_demo_agent(delay: float = 0.01) -> Any:
    """The demo agent, but each streamed piece takes ``delay`` virtual seconds.

    "stream 500" then lasts 5 virtual seconds, so a test can disconnect and
    reconnect while the run is still emitting, deterministically.
    """
    demo = demo_agent()

    async def agent(bridge: AgentWebSocketBridge) -> str:
        emit_partial = bridge.partial

        async def partial_then_wait(text: str) -> None:
            await emit_partial(text)
            await trio.sleep(delay)

        bridge.partial = partial_then_wait  # type: ignore[method-assign]
        return await demo(bridge)

    return agent


def paced_runtime(config: Config) -> Runtime:
    return Runtime(config, agents={"demo": paced_demo_agent()}, tools=demo_tools(), llm=demo_llm())


def partial_texts(frames: Iterable[Mapping[str, Any]], run_id: str) -> list[str]:
    return [
        f["data"]["text"]
        for f in frames
        if f.get("type") == "partial_result" and f["run_id"] == run_id
    ]


# --- reconnect with after_seq --------------------------------------------------------------------


async def test_reconnect_mid_run_receives_exactly_the_missing_suffix(
    make_config: Callable[..., Config], autojump_clock: trio.testing.MockClock
) -> None:
    """Reconnecting with after_seq=last seen mid-run gives seq last+1.. in order, then live: no gap, no duplicate."""
    with trio.fail_after(BOUND):
        async with trio.open_nursery() as nursery, paced_runtime(make_config()) as runtime:
            reference = await open_client(nursery, runtime, "alice")
            first = await open_client(nursery, runtime, "alice")
            run_id = await first.user_message("stream 500")
            await first.wait_event(run_id, "partial_result", count=100)
            await close_client(first)
            last_seen = first.events[-1]["seq"]

            # The run keeps emitting while this client is away (1 virtual second: ~100 pieces).
            await trio.sleep(1)
            away = runtime.session_statistics("alice")
            assert away is not None
            assert away.active_runs == 1
            assert away.last_seq > last_seen + 50

            second = await open_client(nursery, runtime, "alice", after_seq=last_seen)
            await second.wait_terminal(run_id)
            await reference.wait_terminal(run_id)
            await trio.testing.wait_all_tasks_blocked()
            joined_at = second.session_ready["last_seq"]
            assert second.session_ready["session_id"] == first.session_ready["session_id"]
            await close_client(second)
            await close_client(reference)

    final = reference.events[-1]["seq"]
    assert final == 503  # agent_started, agent_thinking, 500 pieces, agent_completed
    assert seqs(first.frames) == list(range(1, last_seen + 1))
    # Exactly the missing suffix, in order: replayed up to joined_at, live after it.
    assert seqs(second.frames) == list(range(last_seen + 1, final + 1))
    assert last_seen < joined_at < final, "the reconnection was not in the middle of the run"
    assert not second.replies("resume_gap")
    assert "after_seq" not in first.session_ready
    assert second.session_ready["after_seq"] == last_seen
    assert first.events + second.events == reference.events
    check_lifecycle(reference.frames)
    events = check_resumed(first.session_ready, first.frames, second.frames)
    assert partial_texts(events, run_id) == [f"t{i} " for i in range(500)]


async def test_resume_frame_restarts_the_stream_after_n(
    make_config: Callable[..., Config], autojump_clock: trio.testing.MockClock
) -> None:
    """A resume frame mid-stream restarts at N+1 (events after N come again, in order); de-duplicated, each event once."""
    with trio.fail_after(BOUND):
        async with trio.open_nursery() as nursery, paced_runtime(make_config()) as runtime:
            client = await open_client(nursery, runtime, "alice")
            run_id = await client.user_message("stream 500")
            await client.wait_event(run_id, "partial_result", count=200)
            running = runtime.session_statistics("alice")
            assert running is not None
            assert running.active_runs == 1  # mid-stream
            resumed_at = len(client.frames)
            restart_after = 50
            await client.send(
                type="resume",
                after_seq=restart_after,
                session_id=client.session_ready["session_id"],
            )
            await client.wait_terminal(run_id)
            await trio.testing.wait_all_tasks_blocked()
            await close_client(client)

    received = seqs(client.frames)
    final = 503
    assert seqs(client.frames[:resumed_at]) == list(
        range(1, len(seqs(client.frames[:resumed_at])) + 1)
    )
    # One restart: what was already on its way may still arrive, then N+1 .. final.
    drops = [i for i in range(1, len(received)) if received[i] <= received[i - 1]]
    assert len(drops) == 1, drops
    before, after = received[: drops[0]], received[drops[0] :]
    assert before == list(range(1, before[-1] + 1))
    assert after == list(range(restart_after + 1, final + 1))
    assert not client.replies("resume_gap")
    assert not client.replies("error")
    events = check_resumed(client.session_ready, client.frames)
    assert seqs(events) == list(range(1, final + 1))
    assert partial_texts(events, run_id) == [f"t{i} " for i in range(500)]


@pytest.mark.parametrize("where", ["last_seq", "oldest_minus_one", "inside_window"])
async def test_exact_resume_frame_at_the_window_edges(
    where: str, make_config: Callable[..., Config], autojump_clock: trio.testing.MockClock
) -> None:
    """A resume frame with N = last_seq replays nothing; N = oldest-1 replays the whole window; no resume_gap."""
    config = make_config(window_events=20)
    with trio.fail_after(BOUND):
        async with trio.open_nursery() as nursery, Runtime(config) as runtime:
            client = await open_client(nursery, runtime, "alice")
            run_id = await client.user_message("stream 100")
            await client.wait_terminal(run_id)
            await trio.testing.wait_all_tasks_blocked()
            last = 103
            oldest = last - 20 + 1
            after = {"last_seq": last, "oldest_minus_one": oldest - 1, "inside_window": 95}[where]
            mark = len(client.frames)
            await client.send(
                type="resume", after_seq=after, session_id=client.session_ready["session_id"]
            )
            await trio.testing.wait_all_tasks_blocked()
            await close_client(client)

    first_pass = [f for f in client.frames[:mark] if is_event(f)]
    assert seqs(first_pass) == list(range(1, last + 1))
    # The replay is the very same events again, in order, and nothing else.
    assert client.frames[mark:] == [f for f in first_pass if f["seq"] > after]
    assert not client.replies("resume_gap")
    check_lifecycle(client.frames[:mark])


# --- resume_gap ----------------------------------------------------------------------------------


@attrs.frozen
class GapCase:
    after_seq: int
    session: str  # "current", "wrong" or "none"
    exact: bool


GAP_CASES = {
    "older_than_window": GapCase(10, "current", exact=False),
    "just_older_than_window": GapCase(82, "current", exact=False),
    "oldest_minus_one": GapCase(83, "current", exact=True),
    "inside_window": GapCase(90, "none", exact=True),
    "at_last_seq": GapCase(103, "current", exact=True),
    "beyond_last_seq": GapCase(104, "current", exact=False),
    "far_beyond_last_seq": GapCase(10_000, "none", exact=False),
    "wrong_session_id": GapCase(90, "wrong", exact=False),
    "wrong_session_id_at_last": GapCase(103, "wrong", exact=False),
}


@pytest.mark.parametrize(
    ("case", "via"),
    [
        pytest.param(case, via, id=f"{name}-{via}")
        for name, case in GAP_CASES.items()
        for via in ("connect", "resume_frame")
    ],
)
async def test_resume_is_exact_or_announces_a_gap(
    case: GapCase,
    via: str,
    make_config: Callable[..., Config],
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Inexact resume (too old, beyond last_seq, wrong session_id) → resume_gap{session_id, oldest_seq, last_seq} then events from oldest; never a silent skip."""
    config = make_config(window_events=20)
    with trio.fail_after(BOUND):
        async with trio.open_nursery() as nursery, Runtime(config) as runtime:
            producer = await open_client(nursery, runtime, "alice")
            run_id = await producer.user_message("stream 100")
            await producer.wait_terminal(run_id)
            await trio.testing.wait_all_tasks_blocked()
            session_id = producer.session_ready["session_id"]
            hint = {"current": session_id, "wrong": "sess_not_this_one", "none": None}[case.session]
            if via == "connect":
                client = await open_client(
                    nursery, runtime, "alice", after_seq=case.after_seq, session_hint=hint
                )
                mark = 1
            else:
                client = await open_client(nursery, runtime, "alice")
                mark = len(client.frames)
                frame: dict[str, Any] = {"type": "resume", "after_seq": case.after_seq}
                if hint is not None:
                    frame["session_id"] = hint
                await client.send(**frame)
            await trio.testing.wait_all_tasks_blocked()
            await close_client(client)
            await close_client(producer)

    last, oldest = 103, 84
    check_lifecycle(producer.frames)
    assert seqs(producer.frames) == list(range(1, last + 1))
    assert client.session_ready["last_seq"] == last
    assert client.session_ready["session_id"] == session_id
    # A resuming connection's session_ready says where its stream restarts.
    restart = case.after_seq if case.exact else oldest - 1
    assert client.session_ready.get("after_seq") == (restart if via == "connect" else None)
    after = client.frames[mark:]
    if case.exact:
        assert not client.replies("resume_gap")
        assert seqs(after) == list(range(max(case.after_seq, 0) + 1, last + 1))
        assert all(is_event(f) for f in after)
    else:
        assert after[0] == {
            "type": "resume_gap",
            "session_id": session_id,
            "oldest_seq": oldest,
            "last_seq": last,
        }
        assert seqs(after[1:]) == list(range(oldest, last + 1))
        assert all(is_event(f) for f in after[1:])
    # What follows is the stream itself from its first seq on (the same events, same content).
    replayed = [f for f in after if is_event(f)]
    start = replayed[0]["seq"] if replayed else last + 1
    assert replayed == [f for f in producer.events if f["seq"] >= start]


# --- property: any disconnect points ------------------------------------------------------------

#: Demo commands (the calculator, a failing tool, a streamed answer, agent and model failures).
demo_texts = st.one_of(
    st.integers(min_value=0, max_value=40).map(lambda n: f"stream {n}"),
    st.sampled_from(["what is 2+3*4?", "fail", "hello there", "crash", "llm fail"]),
)


@attrs.frozen
class Workload:
    """Messages (demo text or an agent script) on threads, and where the resuming client drops."""

    messages: tuple[tuple[str, str | AgentScript], ...]
    disconnects: tuple[int, ...]


@st.composite
def workloads(draw: st.DrawFn) -> Workload:
    item = st.one_of(demo_texts, agent_scripts(max_steps=3, cancel=False))
    messages = draw(
        st.lists(st.tuples(st.sampled_from(["main", "side"]), item), min_size=1, max_size=3)
    )
    disconnects = draw(st.lists(st.integers(min_value=1, max_value=15), min_size=1, max_size=3))
    return Workload(tuple(messages), tuple(disconnects))


def combined_runtime(book: ScriptBook, config: Config) -> Runtime:
    """The demo agent whose model plays a book script ("script KEY") or the demo script."""
    tools = script_tools()
    demo = demo_tools()
    for name in ("calculator", "sleep", "fail"):
        tool = demo.get(name)
        assert tool is not None
        tools.add(tool)

    def turn(request: ChatRequest) -> ScriptedTurn:
        # Runs of one thread share a conversation history: play the current run's part only.
        last_user = max(i for i, m in enumerate(request.messages) if m.role == "user")
        current = attrs.evolve(request, messages=request.messages[last_user:])
        if current.messages[0].content.startswith("script "):
            return book.turn(current)
        return demo_script(request)

    return Runtime(
        config,
        agents={"demo": demo_agent(16)},
        tools=tools,
        llm=ScriptedLLMProvider(turn),
    )


@attrs.define
class Segment:
    """What one connection of the resuming client received."""

    after_seq: int | None
    frames: list[Frame] = attrs.field(factory=list)
    close_code: int | None = None


async def read_segment(
    transport: Any, segment: Segment, limit: int | None, done: Callable[[], bool]
) -> None:
    """Read until ``limit`` frames arrived on this connection or ``done()``; then close it."""
    while (limit is None or len(segment.frames) < limit) and not (segment.frames and done()):
        try:
            raw = await transport.receive()
        except TransportClosed as exc:  # pragma: no cover - reported by the assertion
            segment.close_code = exc.code
            raise AssertionError(f"the server closed a resumed connection ({exc.code})") from None
        segment.frames.append(json.loads(raw))
    await transport.close(1000)


async def _resume_property(workload: Workload) -> None:
    book = ScriptBook()
    config = Config(store="memory", shutdown_grace=2.0)
    segments: list[Segment] = []
    with trio.fail_after(BOUND):
        async with trio.open_nursery() as nursery, combined_runtime(book, config) as runtime:
            reference = await open_client(nursery, runtime, "alice")
            server_end, client_end = memory_transport_pair()
            nursery.start_soon(runtime.serve_connection, "alice", server_end)
            # The resuming client's first connection is subscribed before any run starts.
            await trio.testing.wait_all_tasks_blocked()
            run_ids = []
            for index, (thread, item) in enumerate(workload.messages):
                text = item if isinstance(item, str) else book.add(f"s{index}", item)
                run_ids.append(await reference.user_message(text, thread_id=thread))

            def done() -> bool:
                got = {f["run_id"] for s in segments for f in s.frames if is_terminal(f)}
                return got >= set(run_ids)

            segment = Segment(after_seq=None)
            for limit in (*workload.disconnects, None):
                segments.append(segment)
                await read_segment(client_end, segment, limit, done)
                if done():
                    break
                seen = seqs(frame for s in segments for frame in s.frames)
                after_seq = max(seen, default=segments[0].frames[0]["last_seq"])
                segment = Segment(after_seq=after_seq)
                server_end, client_end = memory_transport_pair()
                nursery.start_soon(
                    partial(runtime.serve_connection, "alice", server_end, after_seq=after_seq)
                )
            for run_id in run_ids:
                await reference.wait_terminal(run_id)
            await trio.testing.wait_all_tasks_blocked()
            await close_client(reference)

    ready = segments[0].frames[0]
    assert ready["type"] == "session_ready"
    assert ready["last_seq"] == reference.session_ready["last_seq"] == 0
    for segment in segments:
        assert segment.frames[0]["type"] == "session_ready"
        got = seqs(segment.frames)
        assert got == list(range(got[0], got[0] + len(got))) if got else True
        assert segment.frames[0].get("after_seq") == segment.after_seq
        if segment.after_seq is not None:
            assert not of_type(segment.frames, "resume_gap")
            if got:
                assert got[0] == segment.after_seq + 1, (segment.after_seq, got[:3])
    hypothesis.event(f"connections: {len(segments)}")
    hypothesis.event(
        "resumed mid-run" if any(s.after_seq and seqs(s.frames) for s in segments) else "no replay"
    )
    check_lifecycle(reference.frames)
    resumed = check_resumed(ready, *(s.frames for s in segments))
    assert resumed == reference.events
    assert check_lifecycle(reference.frames).runs.keys() == set(run_ids)


@given(workload=workloads())
def test_resumed_stream_equals_an_uninterrupted_one(workload: Workload) -> None:
    """Any workload and 1-3 disconnects: the de-duplicated resumed stream equals a never-dropped connection's."""
    trio.run(_resume_property, workload, clock=trio.testing.MockClock(autojump_threshold=0))


# --- runs go on with no connection ---------------------------------------------------------------


async def test_runs_continue_with_no_connection_and_wait_in_the_window(
    make_config: Callable[..., Config], autojump_clock: trio.testing.MockClock
) -> None:
    """Runs go on while no connection is open; their events wait in the window and come on reconnect with after_seq."""
    texts = [("a", "stream 300"), ("b", "what is 2+3*4?"), ("c", "sleep 5")]
    with trio.fail_after(BOUND):
        async with trio.open_nursery() as nursery, Runtime(make_config()) as runtime:
            first = await open_client(nursery, runtime, "alice")
            run_ids = [await first.user_message(t, thread_id=th) for th, t in texts]
            await close_client(first)
            last_seen = max(seqs(first.frames), default=0)
            await trio.sleep(10)
            stats = runtime.session_statistics("alice")
            assert stats is not None
            assert (stats.connections, stats.active_runs, stats.queued_runs) == (0, 0, 0)
            second = await open_client(nursery, runtime, "alice", after_seq=last_seen)
            for run_id in run_ids:
                await second.wait_terminal(run_id)
            await trio.testing.wait_all_tasks_blocked()
            await close_client(second)

    assert second.session_ready["last_seq"] == stats.last_seq
    assert second.session_ready["after_seq"] == last_seen
    assert seqs(second.frames) == list(range(last_seen + 1, stats.last_seq + 1))
    assert not second.replies("resume_gap")
    events = check_resumed(first.session_ready, first.frames, second.frames)
    report = check_lifecycle([first.session_ready, *events])
    assert [report.runs[r].terminal for r in run_ids] == ["agent_completed"] * 3
    final = {f["run_id"]: f for f in events if is_terminal(f)}
    assert "14" in final[run_ids[1]]["data"]["final_response"]
    assert final[run_ids[2]]["data"]["final_response"] == "I slept for 5 seconds."
    assert partial_texts(events, run_ids[0]) == [f"t{i} " for i in range(300)]


# --- idle sessions -------------------------------------------------------------------------------


async def _finish_one_run(nursery: trio.Nursery, runtime: Runtime) -> MemoryClient:
    client = await open_client(nursery, runtime, "alice")
    run_id = await client.user_message("what is 2+3*4?")
    await client.wait_terminal(run_id)
    await close_client(client)
    return client


#: Idle teardown after 10 s (a shutdown_grace of its own, which the close must not wait out).
IDLE = {"idle_session_grace": 10.0, "shutdown_grace": 2.0}


async def test_idle_session_is_kept_for_the_grace_then_closed(
    make_config: Callable[..., Config], autojump_clock: trio.testing.MockClock
) -> None:
    """With no connection and no run, the session stays idle_session_grace s after the last close, then is closed."""
    with trio.fail_after(BOUND):
        async with trio.open_nursery() as nursery, Runtime(make_config(**IDLE)) as runtime:
            client = await _finish_one_run(nursery, runtime)
            await trio.sleep(9.99)
            assert runtime.statistics().sessions == 1
            assert runtime.session_statistics("alice") is not None
            await trio.sleep(0.02)
            assert runtime.statistics().sessions == 0
            assert runtime.session_statistics("alice") is None
    check_lifecycle(client.frames)


async def test_idle_session_is_closed_right_after_the_grace(
    make_config: Callable[..., Config], autojump_clock: trio.testing.MockClock
) -> None:
    """An idle session is gone right after idle_session_grace, even with a long shutdown_grace (it is not waited out)."""
    config = make_config(idle_session_grace=10, shutdown_grace=60)
    with trio.fail_after(BOUND):
        async with trio.open_nursery() as nursery, Runtime(config) as runtime:
            await _finish_one_run(nursery, runtime)
            await trio.sleep(10.01)
            assert runtime.statistics().sessions == 0


async def test_a_connection_during_the_grace_keeps_the_session(
    make_config: Callable[..., Config], autojump_clock: trio.testing.MockClock
) -> None:
    """A connection opened during the grace keeps the session; the grace restarts when it closes."""
    with trio.fail_after(BOUND):
        async with trio.open_nursery() as nursery, Runtime(make_config(**IDLE)) as runtime:
            first = await _finish_one_run(nursery, runtime)
            await trio.sleep(8)
            visitor = await open_client(nursery, runtime, "alice")
            await trio.sleep(5)  # 13 s after the first close, but a connection is open
            assert runtime.statistics().sessions == 1
            await close_client(visitor)
            await trio.sleep(9.99)
            assert runtime.statistics().sessions == 1
            await trio.sleep(0.02)
            assert runtime.statistics().sessions == 0
    assert visitor.session_ready["session_id"] == first.session_ready["session_id"]
    assert visitor.session_ready["last_seq"] == first.events[-1]["seq"]
    check_lifecycle(first.frames)
    check_lifecycle(visitor.frames)


async def test_an_active_run_keeps_the_session_without_connections(
    make_config: Callable[..., Config], autojump_clock: trio.testing.MockClock
) -> None:
    """A run in progress keeps a connection-less session; the grace starts when the run ends."""
    with trio.fail_after(BOUND):
        async with trio.open_nursery() as nursery, Runtime(make_config(**IDLE)) as runtime:
            client = await open_client(nursery, runtime, "alice")
            run_id = await client.user_message("sleep 30")
            await close_client(client)
            start = trio.current_time()
            await trio.sleep(29)
            assert runtime.statistics().sessions == 1
            await trio.sleep(1 + 9.99)  # the run ended at 30 s: 9.99 s into the grace
            assert runtime.statistics().sessions == 1
            later = await open_client(
                nursery,
                runtime,
                "alice",
                after_seq=max(seqs(client.frames), default=0),
                session_hint=client.session_ready["session_id"],
            )
            await later.wait_terminal(run_id)
            await close_client(later)
            await trio.sleep(10.01)
            assert runtime.statistics().sessions == 0
            assert trio.current_time() - start > 40
    assert not later.replies("resume_gap")
    events = check_resumed(client.session_ready, client.frames, later.frames)
    assert events[-1]["type"] == "agent_completed"


@pytest.mark.parametrize("via", ["connect", "resume_frame"])
async def test_after_idle_teardown_a_new_session_and_old_resumes_get_a_gap(
    via: str, make_config: Callable[..., Config], autojump_clock: trio.testing.MockClock
) -> None:
    """After idle teardown the next connection gets a new session_id; a resume naming the old one gets resume_gap."""
    with trio.fail_after(BOUND):
        async with trio.open_nursery() as nursery, Runtime(make_config(**IDLE)) as runtime:
            old = await _finish_one_run(nursery, runtime)
            old_id, old_last = old.session_ready["session_id"], old.events[-1]["seq"]
            await trio.sleep(10.01)
            assert runtime.statistics().sessions == 0
            if via == "connect":
                new = await open_client(
                    nursery, runtime, "alice", after_seq=old_last, session_hint=old_id
                )
                mark = 1
            else:
                new = await open_client(nursery, runtime, "alice")
                mark = len(new.frames)
                await new.send(type="resume", after_seq=old_last, session_id=old_id)
            await trio.testing.wait_all_tasks_blocked()
            assert runtime.statistics().sessions == 1
            run_id = await new.user_message("hello again")
            await new.wait_terminal(run_id)
            await close_client(new)

    new_id = new.session_ready["session_id"]
    assert new_id != old_id
    assert new.session_ready["last_seq"] == 0
    assert new.session_ready.get("after_seq") == (0 if via == "connect" else None)
    assert new.frames[mark] == {
        "type": "resume_gap",
        "session_id": new_id,
        "oldest_seq": 1,
        "last_seq": 0,
    }
    check_lifecycle(old.frames)
    report = check_lifecycle(new.frames)
    assert report.first_seq == 1
    assert report.runs[run_id].terminal == "agent_completed"
