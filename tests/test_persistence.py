"""The runtime on its SQLite store, in process: a user's stream keeps its ``session_id``
and ``seq`` across idle teardown and restarts, readers that fall behind the replay window
read from the store instead of being closed, runs left open by a dead process are closed
on the next start, and retention prunes a prefix answered by ``resume_gap``.

(The real crash -- SIGKILL of a server process -- is in ``test_kill_restart.py``.)

These tests run on the real clock: the store works in threads, and a ``MockClock``
with autojump would jump to the next timer while a thread runs, firing timeouts early.
The runs used here take milliseconds.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import trio
from strategies import connect

from netra_actors import Config, Runtime, UnifiedTraceContext
from netra_actors._messages import EmitEvent
from netra_actors._sequencer import stamp
from netra_actors._store import SqliteStore, StoredRun, open_store
from netra_actors.testing import check_lifecycle

BOUND = 30


def sqlite_config(make_config: Callable[..., Config], **overrides: object) -> Config:
    return make_config(store="sqlite", **overrides)


async def test_the_stream_goes_on_across_idle_teardown_and_restart(
    make_config: Callable[..., Config],
) -> None:
    """Same ``session_id``, ``seq`` continuing without a gap: after the idle session is torn
    down, and after the whole runtime is closed and opened again on the same folder."""
    config = sqlite_config(make_config, idle_session_grace=0.05)
    with trio.fail_after(BOUND):
        async with Runtime(config) as runtime:
            first = await runtime.start_run("alice", "calc 1+1")
            events = await first.collect()
            session_id = first.session.session_id
            await first.session.wait_closed()  # idle teardown after 0.05 s
            second = await runtime.start_run("alice", "calc 2+2")
            events += await second.collect()
            assert second.session is not first.session
            assert second.session.session_id == session_id
        async with Runtime(config) as runtime:
            third = await runtime.start_run("alice", "calc 3+3")
            events += await third.collect()
            assert third.session.session_id == session_id
            stored = await runtime.store.events_after(session_id, 0, 1000)  # type: ignore[union-attr]
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert [e.frame for e in stored] == [e.frame for e in events]
    check_lifecycle([e.frame for e in events])


async def test_a_reader_behind_the_window_reads_from_the_store(
    make_config: Callable[..., Config],
) -> None:
    """With a 4-event window, a connection resuming from ``after_seq=0`` gets the whole
    stream (no ``resume_gap``, no close 4008): the window's past comes from the store."""
    config = sqlite_config(make_config, window_events=4)
    with trio.fail_after(BOUND):
        async with Runtime(config) as runtime, trio.open_nursery() as nursery:
            handle = await runtime.start_run("alice", "stream 20")
            events = await handle.collect()
            assert len(events) > 4 * 3
            client = await connect(nursery, runtime, "alice")
            await client.send(type="resume", after_seq=0)
            await client.wait_for(lambda f: f.get("seq") == events[-1].seq)
            got = client.events
            assert not client.replies("resume_gap")
            assert [f["seq"] for f in got] == [e.seq for e in events]
            assert got == [json.loads(e.frame) for e in events]
            await client.close()
            nursery.cancel_scope.cancel()


async def test_without_a_store_the_same_reader_gets_resume_gap(
    make_config: Callable[..., Config],
) -> None:
    """The memory mode keeps only the window: the same resume is answered ``resume_gap``."""
    config = make_config(window_events=4)
    with trio.fail_after(BOUND):
        async with Runtime(config) as runtime, trio.open_nursery() as nursery:
            await (await runtime.start_run("alice", "stream 20")).collect()
            client = await connect(nursery, runtime, "alice")
            await client.send(type="resume", after_seq=0)
            gap = await client.wait_for(lambda f: f["type"] == "resume_gap")
            assert gap["oldest_seq"] > 1
            await client.close()
            nursery.cancel_scope.cancel()


async def _leave_open_run(path: Path, user_id: str) -> tuple[str, str, int]:
    """Write what a process that died mid-tool leaves behind: a stream whose last run has
    ``agent_started`` and ``tool_executing`` and nothing after. Returns (session, run, last seq)."""
    store = SqliteStore(path)
    trace = UnifiedTraceContext.new_root()
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        await store.create_session("sess_dead", user_id)
        messages = [
            EmitEvent(
                "agent_started",
                "run_dead",
                "main",
                trace,
                {"agent_name": "demo", "user_id": user_id, "text": "sleep 30"},
            ),
            EmitEvent("agent_thinking", "run_dead", "main", trace, {"reasoning": "r", "step": 1}),
            EmitEvent(
                "tool_executing",
                "run_dead",
                "main",
                trace.child(),
                {"call_id": "call_1", "tool_name": "sleep", "parameters": {"seconds": 30}},
            ),
        ]
        events = [stamp(m, seq, time.time()) for seq, m in enumerate(messages, 1)]
        await store.append("sess_dead", events)
        await store.aclose()
    return "sess_dead", "run_dead", len(events)


async def test_a_run_left_open_by_a_dead_process_is_closed_on_start(
    make_config: Callable[..., Config], tmp_path: Path
) -> None:
    """Its open tool call gets ``tool_completed`` cancelled, then the run ``agent_error``
    ``interrupted``, stored after the last seq; a client resuming receives them; the run's
    row says failed; new runs continue the stream."""
    config = sqlite_config(make_config)
    session_id, run_id, last = await _leave_open_run(tmp_path / "netra.sqlite3", "alice")
    with trio.fail_after(60):
        async with Runtime(config) as runtime, trio.open_nursery() as nursery:
            store = runtime.store
            assert store is not None
            assert await store.open_runs() == []
            run = await store.get_run(run_id)
            assert run is not None
            assert run.state == "failed"
            assert run.error == {
                "type": "interrupted",
                "message": "the server stopped while the run was active",
            }
            client = await connect(nursery, runtime, "alice")
            assert client.session_ready["session_id"] == session_id
            assert client.session_ready["last_seq"] == last + 2
            await client.send(type="resume", after_seq=last)
            terminal = await client.wait_terminal(run_id)
            closing = client.run_events(run_id)
            assert [f["type"] for f in closing] == ["tool_completed", "agent_error"]
            assert closing[0]["data"]["status"] == "cancelled"
            assert closing[0]["data"]["call_id"] == "call_1"
            assert terminal["data"]["error"]["type"] == "interrupted"
            new = await client.user_message("calc 1+1")
            await client.wait_terminal(new)
            assert client.run_events(new)[0]["seq"] == last + 3
            whole = await store.events_after(session_id, 0, 100)
            check_lifecycle([e.frame for e in whole])
            await client.close()
            nursery.cancel_scope.cancel()
    # A second start finds nothing more to close.
    async with Runtime(config) as runtime:
        assert await runtime.recover() == 0


async def test_a_run_accepted_but_still_queued_at_a_crash_is_cancelled_on_start(
    make_config: Callable[..., Config], tmp_path: Path
) -> None:
    """The store records a run when it is accepted (before its answer), so a run queued
    behind another when the process died ends with a lone ``agent_cancelled`` (reason
    ``shutdown``) on the next start, like queued runs at a graceful shutdown."""
    config = sqlite_config(make_config)
    session_id, run_id, last = await _leave_open_run(tmp_path / "netra.sqlite3", "alice")
    store = SqliteStore(tmp_path / "netra.sqlite3")
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        await store.record_queued(
            StoredRun(
                "run_queued",
                session_id,
                "alice",
                "main",
                "queued",
                agent_name="demo",
                trace_id="ab" * 16,
                span_id="cd" * 8,
                queued_at=time.time(),
            )
        )
        await store.aclose()
    with trio.fail_after(BOUND):
        async with Runtime(config) as runtime:
            assert runtime.store is not None
            assert await runtime.store.open_runs() == []
            tail = await runtime.store.events_after(session_id, last, 10)
            queued = await runtime.store.get_run("run_queued")
    assert [(e.type, e.run_id) for e in tail] == [
        ("tool_completed", run_id),
        ("agent_error", run_id),
        ("agent_cancelled", "run_queued"),
    ]
    assert tail[-1].data == {"reason": "shutdown"}
    assert tail[-1].trace_id == "ab" * 16
    assert queued is not None
    assert (queued.state, queued.first_seq, queued.agent_name) == ("cancelled", last + 3, "demo")


async def test_a_run_is_recorded_queued_before_it_is_answered(
    make_config: Callable[..., Config],
) -> None:
    """A run waiting behind another on its thread is in the store as ``queued``; once it
    runs, its row follows its events."""
    config = sqlite_config(make_config)
    with trio.fail_after(BOUND):
        async with Runtime(config) as runtime:
            assert runtime.store is not None
            first = await runtime.start_run("alice", "sleep 0.2")
            second = await runtime.start_run("alice", "calc 1+1")
            row = await runtime.store.get_run(second.run_id)
            assert row is not None
            assert (row.state, row.first_seq, row.text) == ("queued", None, "calc 1+1")
            await first.collect()
            events = await second.collect()
            row = await runtime.store.get_run(second.run_id)
    assert row is not None
    assert (row.state, row.first_seq, row.last_seq) == (
        "completed",
        events[0].seq,
        events[-1].seq,
    )
    assert row.queued_at is not None
    assert row.started_at is not None
    assert row.queued_at <= row.started_at


async def test_retention_prunes_a_prefix_and_older_resumes_get_resume_gap(
    make_config: Callable[..., Config],
) -> None:
    """Keep 10 events per session: pruning drops the oldest (a prefix), the session's
    readers learn the new start, and a resume from before it is answered ``resume_gap``."""
    config = sqlite_config(make_config, window_events=4, retention_max_events=10)
    with trio.fail_after(BOUND):
        async with Runtime(config) as runtime, trio.open_nursery() as nursery:
            events = await (await runtime.start_run("alice", "stream 20")).collect()
            dropped = await runtime.prune()
            last = events[-1].seq
            assert dropped == last - 10
            client = await connect(nursery, runtime, "alice")
            await client.send(type="resume", after_seq=0)
            gap = await client.wait_for(lambda f: f["type"] == "resume_gap")
            assert gap["oldest_seq"] == last - 9
            await client.wait_for(lambda f: f.get("seq") == last)
            assert [f["seq"] for f in client.events] == list(range(last - 9, last + 1))
            await client.close()
            nursery.cancel_scope.cancel()


async def test_conversation_history_survives_a_restart(
    make_config: Callable[..., Config],
) -> None:
    """The thread's turns are in the store: a new runtime on the same folder loads them."""
    config = sqlite_config(make_config)
    with trio.fail_after(BOUND):
        async with Runtime(config) as runtime:
            await (await runtime.start_run("alice", "calc 2+3", thread_id="t1")).collect()
            assert runtime.store is not None
            before = await runtime.store.conversations.load("alice", "t1")
        assert before
        async with Runtime(config) as runtime:
            assert runtime.store is not None
            after = await runtime.store.conversations.load("alice", "t1")
            assert after == before
            assert next(m.role for m in after) == "user"


def test_the_default_store_is_a_sqlite_file_in_the_data_folder(tmp_path: Path) -> None:
    """``Config()`` means SQLite in ``data_dir/netra.sqlite3``; ``store="memory"`` means none."""
    runtime = Runtime(Config(data_dir=tmp_path))
    assert isinstance(runtime.store, SqliteStore)
    assert runtime.store.path == tmp_path / "netra.sqlite3"
    assert Runtime(Config(data_dir=tmp_path, store="memory")).store is None
    assert open_store(tmp_path, synchronous="FULL").synchronous == "FULL"
