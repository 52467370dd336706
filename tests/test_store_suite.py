"""The ``RunStore`` contract, as one suite every store implementation must pass (issue #5).

Adding an implementation (PostgreSQL, ...) is one line in ``IMPLEMENTATIONS``: a name and a
factory ``(folder, max_messages) -> RunStore``. Every contract test below then runs against it,
and the model test checks, after each operation of random programs, that it agrees with
``MemoryStore`` (the reference). Tests of one engine's own promises (files, pragmas, group commit)
are in their own section at the end.

The contract
============

Lifecycle
    ``run`` is the store's actor: started with ``nursery.start``, it reports started once the
    store is ready (schema created or migrated). The other methods are called only after that;
    ``aclose`` commits what is pending, makes ``run`` return, and is idempotent.
Sessions
    One stored stream per user. ``create_session(session_id, user_id)`` records an empty stream
    (``first_seq`` 1, ``last_seq`` 0); a second one for the same user, or a session id already
    taken, raises ``StoreError``. ``session_for`` is None for a user who never had a stream.
Appending
    ``append(session_id, events)`` stores a batch whose ``seq`` are exactly ``last_seq + 1``,
    ``last_seq + 2``, ...: any other ``seq`` (a gap, a repeat, an older one reused, also after
    pruning) or an unknown session raises ``StoreError``, and then nothing of the batch is stored
    (no event, no run change, ``last_seq`` unchanged). An empty batch changes nothing. When
    ``append`` returns, its events are stored.
Reading events
    ``events_after(session_id, after_seq, limit)``: at most ``limit`` events with
    ``seq > after_seq``, oldest first, each with its ``frame`` byte for byte as appended (the
    frame is what clients receive on a resume). An unknown session has none.
Queued runs
    ``record_queued(run)`` records an accepted run before it has any event: the given
    ``StoredRun`` (state ``queued``, ``queued_at``, no ``first_seq``) is what ``get_run`` gives
    back; it is open (``open_runs``) until a terminal event. It is idempotent: a run already
    known (queued or with events) is left as it is.
Runs (derived from the events with ``state_after``, in the same step that stores them)
    A run not recorded as queued exists from its first event: ``thread_id`` and ``trace_id`` of
    that event, user and session of its stream, state ``running``. A run's ``first_seq`` is its
    first event's, queued or not. ``agent_started`` makes it ``running`` and sets
    ``started_at``, ``agent_name``, ``text`` and ``span_id``. The terminal events make it
    ``completed`` (``agent_completed``), ``failed`` (``agent_error``), ``timed_out``
    (``agent_error`` whose error type is ``timeout``) or ``cancelled`` (``agent_cancelled``) and
    set ``ended_at`` and the event's ``error`` and ``usage``; a lone ``agent_cancelled`` (a run
    cancelled while queued) is a ``cancelled`` run never started. A finished run never changes
    state again, nor its ``ended_at``, ``error`` or ``usage``. ``last_seq`` is its newest event's.
    Event data JSON cannot carry natively (the sequencer encodes it with ``str``) is stored
    like any other.
Querying runs
    ``get_run``: None for an unknown run. ``list_runs``: newest first -- by ``started_at``
    (else ``queued_at``, else ``ended_at``), then ``first_seq`` (none last), then ``run_id``, all
    descending -- filtered by user and by state, at most ``limit``. ``run_events``: the run's
    stored events in ``seq`` order ([] for an unknown run). ``open_runs``: every run without a
    terminal event, each with the tool calls announced (``tool_executing``) and never completed
    (``tool_completed``), in announcement order; finished runs never appear. Order (recovery
    closes them in it): runs with events by ``first_seq``, then queued runs without any by
    ``queued_at``; ties by ``queued_at``, then ``run_id``.
Pruning
    ``prune(max_age=, max_events=, now=)`` drops, in each session, a prefix of its stream:
    everything up to the newest event older than ``now - max_age`` and all but the newest
    ``max_events``, but never the first event of a run still open nor anything after it. The
    session's ``first_seq`` becomes the first kept ``seq`` (``events_after`` starts there: no hole
    ever appears); ``last_seq`` stays (a pruned ``seq`` is never reused); a finished run none of
    whose events is left is forgotten, a queued run never (it holds back no event either).
    Returns how many events went.
Conversations
    ``conversations.load/append`` keep each (user, thread)'s ``ChatMessage`` history, tool calls
    and tool messages included, oldest first: the newest ``max_messages`` at most, never starting
    with a ``tool`` message.
"""

from __future__ import annotations

import os
import sqlite3
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager, closing
from decimal import Decimal
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

import netra_actors._store as store_module
from netra_actors._llm import ChatMessage
from netra_actors._messages import EmitEvent, Event, ToolCall
from netra_actors._sequencer import stamp
from netra_actors._store import (
    DB_FILENAME,
    MIGRATIONS,
    SCHEMA_VERSION,
    MemoryStore,
    OpenToolCall,
    RunStore,
    SqliteStore,
    StoredRun,
    StoreError,
    open_store,
)
from netra_actors._trace import UnifiedTraceContext
from netra_actors._tracker import RUN_STATES

StoreFactory = Callable[[Path, int], RunStore]

#: Every implementation of the contract: ``name -> factory(folder, max_messages)``.
IMPLEMENTATIONS: dict[str, StoreFactory] = {
    "memory": lambda folder, max_messages: MemoryStore(max_messages=max_messages),
    "sqlite": lambda folder, max_messages: SqliteStore(
        folder / DB_FILENAME, max_messages=max_messages
    ),
}
#: The model the others are compared with in ``test_every_store_agrees_with_the_reference``.
REFERENCE = "memory"

BIG = 10**6


@asynccontextmanager
async def started(store: RunStore) -> AsyncIterator[RunStore]:
    """``store`` running in a nursery, closed on the way out."""
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        try:
            yield store
        finally:
            await store.aclose()


@pytest.fixture(params=list(IMPLEMENTATIONS))
def implementation(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def make_store(implementation: str, tmp_path: Path) -> Callable[..., RunStore]:
    """A fresh, unstarted store of the implementation under test."""

    def make(max_messages: int = 200) -> RunStore:
        return IMPLEMENTATIONS[implementation](tmp_path, max_messages)

    return make


@pytest.fixture
async def store(make_store: Callable[..., RunStore]) -> AsyncIterator[RunStore]:
    """A started store of the implementation under test."""
    async with trio.open_nursery() as nursery:
        fresh = make_store()
        await nursery.start(fresh.run)
        yield fresh
        await fresh.aclose()


def xfail_for(name: str, reason: str) -> pytest.MarkDecorator:
    """Run a contract test on every implementation, expecting ``name`` to fail it."""
    return pytest.mark.parametrize(
        "implementation",
        [
            pytest.param(impl, marks=pytest.mark.xfail(strict=True, reason=reason))
            if impl == name
            else impl
            for impl in IMPLEMENTATIONS
        ],
        indirect=True,
    )


# -- building events (as the sequencer stamps them) ------------------------------------------


def event(
    seq: int,
    type_: str,
    run_id: str,
    data: Mapping[str, Any] | None = None,
    *,
    thread_id: str = "main",
    ts: float = 1000.0,
    trace: UnifiedTraceContext | None = None,
) -> Event:
    msg = EmitEvent(type_, run_id, thread_id, trace or UnifiedTraceContext.new_root(), data or {})
    return stamp(msg, seq, ts)


@attrs.define
class Stream:
    """One session's events with consecutive ``seq`` and growing ``ts``."""

    session_id: str
    last_seq: int = 0
    clock: float = 1000.0

    def ev(
        self,
        type_: str,
        run_id: str,
        data: Mapping[str, Any] | None = None,
        *,
        thread_id: str = "main",
        trace: UnifiedTraceContext | None = None,
    ) -> Event:
        self.last_seq += 1
        self.clock += 1.0
        return event(
            self.last_seq, type_, run_id, data, thread_id=thread_id, ts=self.clock, trace=trace
        )

    def finished_run(
        self, run_id: str, terminal: str = "agent_completed", **data: Any
    ) -> list[Event]:
        return [
            self.ev("agent_started", run_id, {"agent_name": "echo", "text": f"hi {run_id}"}),
            self.ev("agent_thinking", run_id, {"reasoning": "..."}),
            self.ev(terminal, run_id, data),
        ]


async def new_stream(store: RunStore, user_id: str = "alice") -> Stream:
    session_id = f"s-{user_id}"
    await store.create_session(session_id, user_id)
    return Stream(session_id)


def frames(events: Sequence[Event]) -> list[str]:
    return [e.frame for e in events]


def seqs(events: Sequence[Event]) -> list[int]:
    return [e.seq for e in events]


# == the contract =============================================================================

# -- lifecycle and sessions -----------------------------------------------------------------


async def test_aclose_is_idempotent(make_store: Callable[..., RunStore]) -> None:
    fresh = make_store()
    async with trio.open_nursery() as nursery:
        await nursery.start(fresh.run)
        await fresh.create_session("s-1", "alice")
        with trio.fail_after(5):
            await fresh.aclose()
            await fresh.aclose()


async def test_a_user_without_a_stream_has_no_session(store: RunStore) -> None:
    assert await store.session_for("nobody") is None


async def test_create_session_records_an_empty_stream(store: RunStore) -> None:
    before = time.time()
    await store.create_session("s-1", "alice")
    session = await store.session_for("alice")
    assert session is not None
    assert (session.session_id, session.user_id, session.first_seq, session.last_seq) == (
        "s-1",
        "alice",
        1,
        0,
    )
    assert before - 1 <= session.created_at <= time.time() + 1
    assert await store.session_for("bob") is None
    assert await store.events_after("s-1", 0, BIG) == []


async def test_one_stream_per_user(store: RunStore) -> None:
    await store.create_session("s-1", "alice")
    with pytest.raises(StoreError):
        await store.create_session("s-2", "alice")
    with pytest.raises(StoreError):  # a session id is never given to a second user
        await store.create_session("s-1", "bob")
    session = await store.session_for("alice")
    assert session is not None
    assert session.session_id == "s-1"
    assert await store.session_for("bob") is None
    await store.create_session("s-2", "bob")
    bob = await store.session_for("bob")
    assert bob is not None
    assert bob.session_id == "s-2"


# -- append --------------------------------------------------------------------------------


async def test_append_advances_last_seq(store: RunStore) -> None:
    stream = await new_stream(store)
    await store.append(stream.session_id, [stream.ev("agent_started", "r-1")])
    await store.append(stream.session_id, [stream.ev("agent_thinking", "r-1") for _ in range(3)])
    await store.append(stream.session_id, [])
    session = await store.session_for("alice")
    assert session is not None
    assert (session.first_seq, session.last_seq) == (1, 4)


async def test_append_to_an_unknown_session_is_refused(store: RunStore) -> None:
    with pytest.raises(StoreError):
        await store.append("s-nobody", [event(1, "agent_started", "r-1")])
    assert await store.get_run("r-1") is None


@pytest.mark.parametrize(
    "bad_seqs",
    [
        pytest.param([5], id="gap"),
        pytest.param([3], id="repeat"),
        pytest.param([1], id="reuse"),
        pytest.param([0], id="zero"),
        pytest.param([4, 5, 7], id="gap-inside-batch"),
        pytest.param([4, 4], id="repeat-inside-batch"),
        pytest.param([4, 6, 5], id="out-of-order"),
    ],
)
async def test_append_refuses_a_seq_that_does_not_follow(
    store: RunStore, bad_seqs: list[int]
) -> None:
    stream = await new_stream(store)
    good = stream.finished_run("r-1")
    await store.append(stream.session_id, good)
    bad = [event(seq, "agent_started", f"r-bad-{seq}", ts=2000.0) for seq in bad_seqs]
    with pytest.raises(StoreError):
        await store.append(stream.session_id, bad)
    # Nothing of the refused batch was stored: no event, no run, no change to last_seq.
    assert frames(await store.events_after(stream.session_id, 0, BIG)) == frames(good)
    session = await store.session_for("alice")
    assert session is not None
    assert session.last_seq == 3
    for seq in bad_seqs:
        assert await store.get_run(f"r-bad-{seq}") is None
    assert [r.run_id for r in await store.list_runs()] == ["r-1"]
    # ... and the stream goes on from where it was.
    await store.append(stream.session_id, [stream.ev("agent_started", "r-2")])
    assert seqs(await store.events_after(stream.session_id, 0, BIG)) == [1, 2, 3, 4]


async def test_streams_are_independent(store: RunStore) -> None:
    alice, bob = await new_stream(store, "alice"), await new_stream(store, "bob")
    a = alice.finished_run("r-a")
    b = [*bob.finished_run("r-b"), bob.ev("agent_started", "r-b2")]
    await store.append(alice.session_id, a)
    await store.append(bob.session_id, b)
    assert frames(await store.events_after(alice.session_id, 0, BIG)) == frames(a)
    assert frames(await store.events_after(bob.session_id, 0, BIG)) == frames(b)
    alice_session, bob_session = await store.session_for("alice"), await store.session_for("bob")
    assert alice_session is not None
    assert bob_session is not None
    assert (alice_session.last_seq, bob_session.last_seq) == (3, 4)


# -- events_after ------------------------------------------------------------------------------


async def test_events_after_gives_back_the_frames_byte_for_byte(store: RunStore) -> None:
    stream = await new_stream(store)
    odd = {
        "text": 'h\u00e9llo \u2713 \u2028 \U0001f600 "quoted" \\ back\nslash',
        "numbers": [0, -1, 1.5, 1e-300, 2**63 - 1, 2**70],
        "nested": {"z": None, "a": [True, False, {}], "": ""},
        "object": object(),  # the sequencer encodes what JSON cannot carry as str
    }
    events = [
        stream.ev("agent_started", "r-1", {"agent_name": "echo", "text": odd["text"]}),
        stream.ev("agent_thinking", "r-1", odd),
        stream.ev("agent_completed", "r-1", {"usage": {"prompt_tokens": 3}}),
    ]
    await store.append(stream.session_id, events)
    got = await store.events_after(stream.session_id, 0, BIG)
    assert frames(got) == frames(events)
    assert [(e.seq, e.type, e.run_id, e.thread_id, e.ts, e.trace_id, e.span_id) for e in got] == [
        (e.seq, e.type, e.run_id, e.thread_id, e.ts, e.trace_id, e.span_id) for e in events
    ]


async def test_events_after_is_oldest_first_and_respects_the_limit(store: RunStore) -> None:
    stream = await new_stream(store)
    events = [stream.ev("agent_thinking", "r-1", {"step": i}) for i in range(10)]
    await store.append(stream.session_id, events[:4])
    await store.append(stream.session_id, events[4:])
    sid = stream.session_id
    assert frames(await store.events_after(sid, 0, BIG)) == frames(events)
    assert frames(await store.events_after(sid, 0, 3)) == frames(events[:3])
    assert frames(await store.events_after(sid, 4, 2)) == frames(events[4:6])
    assert frames(await store.events_after(sid, 8, 5)) == frames(events[8:])
    assert await store.events_after(sid, 10, 5) == []
    assert await store.events_after(sid, 3, 0) == []
    assert await store.events_after("s-unknown", 0, BIG) == []


@pytest.mark.parametrize("count", [255, 256, 257, 777])
async def test_a_large_append_keeps_every_event_in_order(store: RunStore, count: int) -> None:
    """One append of many events (around and past the sizes a store may split a batch into)
    stores each once, in order, byte for byte; the next append follows it."""
    stream = await new_stream(store)
    events = [stream.ev("partial_result", "r-1", {"text": f"t{i} "}) for i in range(count)]
    await store.append(stream.session_id, events)
    more = [stream.ev("partial_result", "r-1", {"text": "last"})]
    await store.append(stream.session_id, more)
    got = await store.events_after(stream.session_id, 0, BIG)
    assert frames(got) == frames(events + more)
    assert [e.seq for e in got] == list(range(1, count + 2))
    session = await store.session_for("alice")
    assert session is not None
    assert session.last_seq == count + 1


# -- runs ------------------------------------------------------------------------------------


async def test_agent_started_makes_a_running_run(store: RunStore) -> None:
    stream = await new_stream(store)
    trace = UnifiedTraceContext.new_root()
    await store.append(stream.session_id, [stream.ev("agent_thinking", "r-0")])
    started_event = stream.ev(
        "agent_started",
        "r-1",
        {"agent_name": "echo", "text": "hello"},
        thread_id="t-7",
        trace=trace,
    )
    thinking = stream.ev("agent_thinking", "r-1", {"reasoning": "..."}, thread_id="t-7")
    await store.append(stream.session_id, [started_event, thinking])
    run = await store.get_run("r-1")
    assert run == StoredRun(
        run_id="r-1",
        session_id=stream.session_id,
        user_id="alice",
        thread_id="t-7",
        state="running",
        agent_name="echo",
        text="hello",
        trace_id=trace.trace_id,
        span_id=trace.span_id,
        started_at=started_event.ts,
        ended_at=None,
        first_seq=2,
        last_seq=3,
        error=None,
        usage=None,
    )
    assert await store.get_run("r-unknown") is None


@pytest.mark.parametrize(
    ("terminal", "data", "state"),
    [
        ("agent_completed", {"usage": {"prompt_tokens": 7, "completion_tokens": 3}}, "completed"),
        (
            "agent_error",
            {"error": {"type": "llm_error", "message": "boom"}, "usage": {"prompt_tokens": 1}},
            "failed",
        ),
        ("agent_error", {"error": {"type": "timeout", "message": "too slow"}}, "timed_out"),
        ("agent_error", {"error": "not a mapping"}, "failed"),
        ("agent_cancelled", {"reason": "client"}, "cancelled"),
    ],
)
async def test_a_terminal_event_finishes_the_run(
    store: RunStore, terminal: str, data: dict[str, Any], state: str
) -> None:
    stream = await new_stream(store)
    started_event = stream.ev("agent_started", "r-1", {"agent_name": "echo", "text": "hi"})
    await store.append(stream.session_id, [started_event, stream.ev("agent_thinking", "r-1")])
    end = stream.ev(terminal, "r-1", data)
    await store.append(stream.session_id, [end])
    run = await store.get_run("r-1")
    assert run is not None
    assert run.state == state
    assert (run.started_at, run.ended_at) == (started_event.ts, end.ts)
    assert (run.first_seq, run.last_seq) == (1, 3)
    error, usage = data.get("error"), data.get("usage")
    assert run.error == (error if isinstance(error, Mapping) else None)
    assert run.usage == usage
    assert (run.agent_name, run.text, run.span_id) == ("echo", "hi", started_event.span_id)


async def test_a_run_cancelled_while_queued_is_cancelled(store: RunStore) -> None:
    stream = await new_stream(store)
    lone = stream.ev("agent_cancelled", "r-1", {"reason": "client"}, thread_id="t-2")
    await store.append(stream.session_id, [lone])
    run = await store.get_run("r-1")
    assert run is not None
    assert (run.state, run.started_at, run.ended_at, run.agent_name) == (
        "cancelled",
        None,
        lone.ts,
        None,
    )
    assert (run.first_seq, run.last_seq, run.thread_id, run.trace_id) == (
        1,
        1,
        "t-2",
        lone.trace_id,
    )
    assert await store.open_runs() == []
    assert [r.run_id for r in await store.list_runs(state="cancelled")] == ["r-1"]


@pytest.mark.parametrize(
    ("later", "data"),
    [
        ("agent_error", {"error": {"type": "interrupted", "message": "late"}}),
        ("agent_error", {"error": {"type": "timeout", "message": "late"}}),
        ("agent_cancelled", {"reason": "shutdown"}),
        ("agent_completed", {"usage": {"prompt_tokens": 99}}),
    ],
)
async def test_a_finished_run_never_changes_state(
    store: RunStore, later: str, data: dict[str, Any]
) -> None:
    stream = await new_stream(store)
    await store.append(stream.session_id, stream.finished_run("r-1", usage={"prompt_tokens": 1}))
    await store.append(stream.session_id, [stream.ev(later, "r-1", data)])
    await store.append(stream.session_id, [stream.ev("agent_started", "r-1")])
    run = await store.get_run("r-1")
    assert run is not None
    assert run.state == "completed"
    assert run.last_seq == 5
    assert await store.open_runs() == []


async def test_a_finished_run_keeps_its_end_error_and_usage(store: RunStore) -> None:
    stream = await new_stream(store)
    first = stream.finished_run("r-1", usage={"prompt_tokens": 1})
    await store.append(stream.session_id, first)
    late = {"error": {"type": "interrupted", "message": "late"}, "usage": {"prompt_tokens": 99}}
    await store.append(stream.session_id, [stream.ev("agent_error", "r-1", late)])
    run = await store.get_run("r-1")
    assert run is not None
    assert (run.state, run.ended_at, run.error, run.usage) == (
        "completed",
        first[-1].ts,
        None,
        {"prompt_tokens": 1},
    )


#: One stream's events (type, run, data): runs interleaved, a run queued first, a lone
#: ``agent_cancelled``, a run without ``agent_started``, and events after a run finished.
FOLD_SCRIPT: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("agent_started", "r1", {"agent_name": "echo", "text": "hi"}),
    ("agent_cancelled", "r3", {"reason": "client"}),
    ("agent_started", "rq", {"agent_name": "echo", "text": "queued"}),
    ("agent_thinking", "r1", {"reasoning": "..."}),
    ("tool_executing", "r2", {"call_id": "c-1", "tool_name": "calc"}),
    ("agent_completed", "r1", {"usage": {"prompt_tokens": 1}}),
    ("agent_error", "r1", {"error": {"type": "timeout", "message": "late"}, "usage": {"n": 9}}),
    ("agent_started", "r3", {"agent_name": "late", "text": "again"}),
    ("agent_error", "rq", {"error": {"type": "llm_error", "message": "x"}}),
    ("agent_started", "r1", {"agent_name": "late"}),
    ("agent_cancelled", "r1", {"reason": "late"}),
    ("agent_completed", "rq", {"usage": {"prompt_tokens": 2}}),
    ("tool_completed", "r2", {"call_id": "c-1", "status": "ok"}),
)


@pytest.mark.parametrize("batch", [1, 2, 5, BIG])
async def test_runs_are_the_same_whatever_the_batches(store: RunStore, batch: int) -> None:
    """The same events appended in batches of ``batch`` or one at a time leave the same runs
    (a store may write each run of a batch once: that must not change the outcome, also
    for events after a run finished within the batch)."""
    traces = {run: UnifiedTraceContext.new_root() for run in ("r1", "r2", "r3", "rq")}
    found: dict[str, dict[str, StoredRun]] = {}
    for user, size in (("alice", batch), ("bob", 1)):
        stream = await new_stream(store, user)
        await store.record_queued(queued_run(f"rq-{user}", user_id=user, trace=traces["rq"]))
        events = [
            stream.ev(type_, f"{run}-{user}", data, thread_id=f"t-{run}", trace=traces[run])
            for type_, run, data in FOLD_SCRIPT
        ]
        for start in range(0, len(events), size):
            await store.append(stream.session_id, events[start : start + size])
        found[user] = {}
        for run in traces:
            stored = await store.get_run(f"{run}-{user}")
            assert stored is not None
            found[user][run] = attrs.evolve(
                stored, run_id=run, session_id="s", user_id="u", queued_at=None
            )
    assert found["alice"] == found["bob"]
    runs, ts = found["alice"], 1000.0 + 1.0  # the stream's first ts
    assert (runs["r1"].state, runs["r1"].ended_at) == ("completed", ts + 5)
    assert (runs["r1"].error, runs["r1"].usage) == (None, {"prompt_tokens": 1})
    assert (runs["r1"].first_seq, runs["r1"].last_seq) == (1, 11)
    assert (runs["r2"].state, runs["r2"].first_seq, runs["r2"].last_seq) == ("running", 5, 13)
    assert (runs["r3"].state, runs["r3"].ended_at, runs["r3"].first_seq) == ("cancelled", ts + 1, 2)
    assert (runs["rq"].state, runs["rq"].ended_at, runs["rq"].usage) == ("failed", ts + 8, None)
    assert runs["rq"].error == {"type": "llm_error", "message": "x"}
    assert (runs["rq"].first_seq, runs["rq"].last_seq, runs["rq"].thread_id) == (3, 12, "main")
    assert [o.run.run_id for o in await store.open_runs()] == ["r2-alice", "r2-bob"]


async def test_event_data_json_cannot_carry_natively_is_stored(
    make_store: Callable[..., RunStore],
) -> None:
    with trio.fail_after(10):
        async with started(make_store()) as fresh:
            stream = await new_stream(fresh)
            odd = {"usage": {"cost": Decimal("0.10"), "tokens": 2**70}}
            events = stream.finished_run("r-1", **odd)
            await fresh.append(stream.session_id, events)
            assert frames(await fresh.events_after(stream.session_id, 0, BIG)) == frames(events)
            run = await fresh.get_run("r-1")
            assert run is not None
            assert run.state == "completed"
            more = stream.finished_run("r-2")
            await fresh.append(stream.session_id, more)
            assert seqs(await fresh.events_after(stream.session_id, 0, BIG)) == list(range(1, 7))


def queued_run(
    run_id: str,
    *,
    user_id: str = "alice",
    queued_at: float = 1000.5,
    thread_id: str = "main",
    trace: UnifiedTraceContext | None = None,
) -> StoredRun:
    """A run as the session records it when it accepts it (before any event)."""
    trace = trace or UnifiedTraceContext.new_root()
    return StoredRun(
        run_id,
        f"s-{user_id}",
        user_id,
        thread_id,
        "queued",
        agent_name="echo",
        text=f"text of {run_id}",
        trace_id=trace.trace_id,
        span_id=trace.span_id,
        queued_at=queued_at,
    )


async def test_record_queued_makes_an_open_queued_run(store: RunStore) -> None:
    stream = await new_stream(store)
    record = queued_run("r-q", thread_id="t-3")
    await store.record_queued(record)
    assert await store.get_run("r-q") == record
    assert await store.list_runs(state="queued") == [record]
    assert await store.list_runs(user_id="alice") == [record]
    assert await store.run_events("r-q") == []
    [open_run] = await store.open_runs()
    assert (open_run.run, open_run.open_calls) == (record, ())
    # Idempotent: recording it again (even differently) changes nothing.
    await store.record_queued(attrs.evolve(record, text="other", queued_at=2000.0))
    assert await store.get_run("r-q") == record
    session = await store.session_for("alice")
    assert session is not None
    assert (session.first_seq, session.last_seq) == (1, 0)
    assert await store.events_after(stream.session_id, 0, BIG) == []


async def test_a_queued_run_follows_its_events(store: RunStore) -> None:
    stream = await new_stream(store)
    trace = UnifiedTraceContext.new_root()
    record = queued_run("r-q", trace=trace, queued_at=1000.5)
    await store.record_queued(record)
    await store.append(stream.session_id, [stream.ev("agent_started", "r-other")])
    started_event = stream.ev(
        "agent_started", "r-q", {"agent_name": "echo", "text": "hello"}, trace=trace
    )
    await store.append(stream.session_id, [started_event, stream.ev("agent_thinking", "r-q")])
    run = await store.get_run("r-q")
    assert run is not None
    assert (run.state, run.first_seq, run.last_seq) == ("running", 2, 3)
    assert (run.queued_at, run.started_at, run.trace_id) == (
        1000.5,
        started_event.ts,
        trace.trace_id,
    )
    # Recording it again now changes nothing either.
    await store.record_queued(record)
    assert await store.get_run("r-q") == run
    end = stream.ev("agent_completed", "r-q", {"usage": {"prompt_tokens": 2}})
    await store.append(stream.session_id, [end])
    run = await store.get_run("r-q")
    assert run is not None
    assert (run.state, run.first_seq, run.last_seq, run.ended_at) == ("completed", 2, 4, end.ts)
    assert {o.run.run_id for o in await store.open_runs()} == {"r-other"}
    await store.record_queued(record)
    assert await store.get_run("r-q") == run


async def test_a_queued_run_cancelled_before_it_started(store: RunStore) -> None:
    stream = await new_stream(store)
    await store.record_queued(queued_run("r-q"))
    lone = stream.ev("agent_cancelled", "r-q", {"reason": "shutdown"})
    await store.append(stream.session_id, [lone])
    run = await store.get_run("r-q")
    assert run is not None
    assert (run.state, run.first_seq, run.last_seq, run.started_at, run.ended_at) == (
        "cancelled",
        1,
        1,
        None,
        lone.ts,
    )
    assert (run.agent_name, run.queued_at) == ("echo", 1000.5)
    assert await store.open_runs() == []


async def test_open_runs_order_events_first_then_queued(store: RunStore) -> None:
    alice, bob = await new_stream(store, "alice"), await new_stream(store, "bob")
    await store.record_queued(queued_run("q-late", queued_at=1500.0))
    await store.record_queued(queued_run("q-early", user_id="bob", queued_at=900.0))
    await store.record_queued(queued_run("q-tie-b", queued_at=1200.0))
    await store.record_queued(queued_run("q-tie-a", queued_at=1200.0))
    await store.append(alice.session_id, alice.finished_run("done"))
    await store.append(alice.session_id, [alice.ev("agent_started", "a-4")])  # first_seq 4
    await store.append(bob.session_id, [bob.ev("agent_thinking", "b-1")])  # first_seq 1
    await store.append(bob.session_id, [bob.ev("agent_started", "b-2")])  # first_seq 2
    assert [o.run.run_id for o in await store.open_runs()] == [
        "b-1",
        "b-2",
        "a-4",
        "q-early",
        "q-tie-a",
        "q-tie-b",
        "q-late",
    ]


async def test_list_runs_newest_first_filtered_and_limited(store: RunStore) -> None:
    alice, bob = await new_stream(store, "alice"), await new_stream(store, "bob")
    bob.clock = alice.clock = 1000.0
    # Interleave the two users' runs in time: a1 < b1 < a2 < b2(open) < a3(cancelled while queued)
    await store.append(alice.session_id, alice.finished_run("a1"))
    bob.clock = alice.clock
    await store.append(
        bob.session_id, bob.finished_run("b1", "agent_error", error={"type": "x", "message": "y"})
    )
    alice.clock = bob.clock
    await store.append(alice.session_id, alice.finished_run("a2", "agent_cancelled"))
    bob.clock = alice.clock
    await store.append(bob.session_id, [bob.ev("agent_started", "b2")])
    alice.clock = bob.clock
    await store.append(alice.session_id, [alice.ev("agent_cancelled", "a3")])

    assert [r.run_id for r in await store.list_runs()] == ["a3", "b2", "a2", "b1", "a1"]
    assert [r.run_id for r in await store.list_runs(limit=2)] == ["a3", "b2"]
    assert [r.run_id for r in await store.list_runs(user_id="alice")] == ["a3", "a2", "a1"]
    assert [r.run_id for r in await store.list_runs(user_id="alice", limit=1)] == ["a3"]
    assert [r.run_id for r in await store.list_runs(user_id="bob")] == ["b2", "b1"]
    assert [r.run_id for r in await store.list_runs(state="cancelled")] == ["a3", "a2"]
    assert [r.run_id for r in await store.list_runs(state="running")] == ["b2"]
    assert [r.run_id for r in await store.list_runs(state="failed", user_id="alice")] == []
    assert [r.run_id for r in await store.list_runs(state="completed", user_id="alice")] == ["a1"]
    assert await store.list_runs(user_id="nobody") == []
    assert await store.list_runs(state="queued") == []


async def test_list_runs_breaks_ties_by_first_seq_then_run_id(store: RunStore) -> None:
    stream = await new_stream(store)
    # One batch: the sequencer stamps every event of a batch with the same ts.
    batch = [
        event(1, "agent_started", "r-b", ts=5.0),
        event(2, "agent_started", "r-a", ts=5.0),
        event(3, "agent_started", "r-c", ts=5.0),
        event(4, "agent_thinking", "r-d", ts=5.0),  # never started: sorted after the others
    ]
    await store.append(stream.session_id, batch)
    assert [r.run_id for r in await store.list_runs()] == ["r-c", "r-a", "r-b", "r-d"]
    # A queued run (no event yet) sorts by queued_at, after runs of the same time.
    await store.record_queued(queued_run("r-q5", queued_at=5.0))
    await store.record_queued(queued_run("r-q6", queued_at=6.0))
    await store.record_queued(queued_run("r-q4", queued_at=4.0))
    assert [r.run_id for r in await store.list_runs()] == [
        "r-q6",
        "r-c",
        "r-a",
        "r-b",
        "r-q5",
        "r-q4",
        "r-d",
    ]


async def test_run_events_are_only_that_runs_in_seq_order(store: RunStore) -> None:
    alice, bob = await new_stream(store, "alice"), await new_stream(store, "bob")
    a = [
        alice.ev("agent_started", "r-1"),
        alice.ev("agent_started", "r-2"),
        alice.ev("agent_thinking", "r-1"),
        alice.ev("agent_thinking", "r-2"),
        alice.ev("agent_completed", "r-1"),
    ]
    await store.append(alice.session_id, a[:2])
    await store.append(alice.session_id, a[2:])
    await store.append(bob.session_id, [bob.ev("agent_started", "r-3")])
    assert frames(await store.run_events("r-1")) == frames([a[0], a[2], a[4]])
    assert frames(await store.run_events("r-2")) == frames([a[1], a[3]])
    assert seqs(await store.run_events("r-3")) == [1]
    assert await store.run_events("r-unknown") == []


async def test_open_runs_with_their_unfinished_tool_calls(store: RunStore) -> None:
    alice, bob = await new_stream(store, "alice"), await new_stream(store, "bob")
    trace = UnifiedTraceContext.new_root()
    spans = [trace.child() for _ in range(4)]

    def tool(kind: str, run_id: str, call: int, stream: Stream) -> Event:
        data = {"call_id": f"c-{call}", "tool_name": f"tool-{call}"}
        return stream.ev(kind, run_id, data, trace=spans[call])

    await store.append(
        alice.session_id,
        [
            alice.ev("agent_started", "open-1", trace=trace),
            tool("tool_executing", "open-1", 0, alice),
            tool("tool_executing", "open-1", 1, alice),
            tool("tool_executing", "open-1", 2, alice),
            tool("tool_completed", "open-1", 1, alice),
            alice.ev("agent_started", "done-1"),
            tool("tool_executing", "done-1", 3, alice),  # never completed, but the run finished
            alice.ev("agent_error", "done-1", {"error": {"type": "x", "message": "y"}}),
            alice.ev("agent_thinking", "bare-1"),  # running without agent_started
        ],
    )
    await store.append(bob.session_id, bob.finished_run("done-2"))
    await store.append(bob.session_id, [bob.ev("agent_started", "open-2")])
    got = {o.run.run_id: o for o in await store.open_runs()}
    assert set(got) == {"open-1", "bare-1", "open-2"}
    assert got["open-1"].open_calls == (
        OpenToolCall("c-0", "tool-0", spans[0].span_id),
        OpenToolCall("c-2", "tool-2", spans[2].span_id),
    )
    assert got["bare-1"].open_calls == ()
    assert got["open-2"].open_calls == ()
    for run_id, open_run in got.items():
        assert open_run.run == await store.get_run(run_id)
        assert open_run.run.state == "running"
    # Completing the calls and finishing the run closes it.
    await store.append(
        alice.session_id,
        [
            tool("tool_completed", "open-1", 0, alice),
            tool("tool_completed", "open-1", 2, alice),
        ],
    )
    got = {o.run.run_id: o for o in await store.open_runs()}
    assert got["open-1"].open_calls == ()
    await store.append(alice.session_id, [alice.ev("agent_completed", "open-1")])
    assert {o.run.run_id for o in await store.open_runs()} == {"bare-1", "open-2"}


# -- prune -----------------------------------------------------------------------------------


async def _stream_of_finished_runs(store: RunStore, user_id: str, runs: int) -> list[Event]:
    """``runs`` finished runs of 3 events each, ts 1001, 1002, ... (one per event)."""
    stream = await new_stream(store, user_id)
    events: list[Event] = []
    for i in range(runs):
        events += stream.finished_run(f"{user_id}-r{i}")
    await store.append(stream.session_id, events)
    return events


async def _check_stream(store: RunStore, user_id: str, first_seq: int, last_seq: int) -> None:
    """The session's bounds are ``first_seq``/``last_seq`` and every event between is there."""
    session = await store.session_for(user_id)
    assert session is not None
    assert (session.first_seq, session.last_seq) == (first_seq, last_seq)
    stored = await store.events_after(session.session_id, 0, BIG)
    assert seqs(stored) == list(range(first_seq, last_seq + 1))


async def test_prune_max_events_keeps_the_newest(store: RunStore) -> None:
    events = await _stream_of_finished_runs(store, "alice", 4)  # 12 events
    assert await store.prune(max_age=None, max_events=5, now=0.0) == 7
    await _check_stream(store, "alice", 8, 12)
    assert frames(await store.events_after("s-alice", 0, BIG)) == frames(events[7:])
    assert frames(await store.events_after("s-alice", 3, 2)) == frames(events[7:9])
    # The runs whose events are all gone are forgotten; a run cut in two stays.
    assert [r.run_id for r in await store.list_runs()] == ["alice-r3", "alice-r2"]
    assert seqs(await store.run_events("alice-r2")) == [8, 9]
    assert await store.get_run("alice-r0") is None
    assert await store.run_events("alice-r0") == []
    # Again: nothing more to drop.
    assert await store.prune(max_age=None, max_events=5, now=0.0) == 0
    assert await store.prune(max_age=None, max_events=None) == 0
    await _check_stream(store, "alice", 8, 12)


async def test_prune_max_age_drops_the_old_prefix(store: RunStore) -> None:
    await _stream_of_finished_runs(store, "alice", 3)  # ts 1001 .. 1009
    # Older than 1010 - 5.5 = 1004.5: ts 1001..1004, seq 1..4.
    assert await store.prune(max_age=5.5, max_events=None, now=1010.0) == 4
    await _check_stream(store, "alice", 5, 9)
    # An event exactly at the horizon stays.
    assert await store.prune(max_age=5.0, max_events=None, now=1010.0) == 0
    assert await store.prune(max_age=4.0, max_events=None, now=1010.0) == 1
    await _check_stream(store, "alice", 6, 9)
    # Both limits: the stricter one wins.
    assert await store.prune(max_age=100.0, max_events=2, now=1010.0) == 2
    await _check_stream(store, "alice", 8, 9)
    assert await store.prune(max_age=0.5, max_events=100, now=1010.0) == 2
    await _check_stream(store, "alice", 10, 9)
    assert await store.list_runs() == []


async def test_prune_never_makes_a_hole_even_if_ts_goes_back(store: RunStore) -> None:
    stream = await new_stream(store)
    # ts: 1001, 1002, 900 (a clock step back), 1004, 1005: an old event after newer ones.
    events = stream.finished_run("r-1") + stream.finished_run("r-2")
    events[2] = event(3, "agent_completed", "r-1", ts=900.0)
    await store.append(stream.session_id, events)
    dropped = await store.prune(max_age=50.0, max_events=None, now=1000.0)
    session = await store.session_for("alice")
    assert session is not None
    assert dropped == session.first_seq - 1
    await _check_stream(store, "alice", session.first_seq, 6)
    assert session.first_seq == 4  # the whole prefix up to the old event


async def test_prune_never_drops_an_event_of_an_open_run(store: RunStore) -> None:
    stream = await new_stream(store)
    await store.append(stream.session_id, stream.finished_run("r-1"))  # seq 1-3
    open_events = [
        stream.ev("agent_started", "r-open"),  # seq 4
        stream.ev("tool_executing", "r-open", {"call_id": "c-1", "tool_name": "slow"}),
    ]
    await store.append(stream.session_id, open_events)
    await store.append(stream.session_id, stream.finished_run("r-2"))  # seq 6-8
    assert await store.prune(max_age=None, max_events=1, now=0.0) == 3
    await _check_stream(store, "alice", 4, 8)
    assert await store.prune(max_age=0.0, max_events=0, now=10**9) == 0
    await _check_stream(store, "alice", 4, 8)
    [open_run] = await store.open_runs()
    assert open_run.run.run_id == "r-open"
    assert [c.call_id for c in open_run.open_calls] == ["c-1"]
    assert frames(await store.run_events("r-open")) == frames(open_events)
    assert await store.get_run("r-1") is None
    # Once the run ends, its events may go.
    await store.append(stream.session_id, [stream.ev("agent_cancelled", "r-open")])
    assert await store.prune(max_age=None, max_events=1, now=0.0) == 5
    await _check_stream(store, "alice", 9, 9)


async def test_prune_counts_every_session_and_never_reuses_a_seq(store: RunStore) -> None:
    await _stream_of_finished_runs(store, "alice", 2)  # 6 events
    await _stream_of_finished_runs(store, "bob", 1)  # 3 events
    await store.create_session("s-carol", "carol")  # empty
    assert await store.prune(max_age=None, max_events=0, now=0.0) == 9
    await _check_stream(store, "alice", 7, 6)
    await _check_stream(store, "bob", 4, 3)
    await _check_stream(store, "carol", 1, 0)
    assert await store.list_runs() == []
    # The stream goes on after its last seq; an old seq is still refused.
    with pytest.raises(StoreError):
        await store.append("s-alice", [event(1, "agent_started", "r-x")])
    await store.append("s-alice", [event(7, "agent_started", "r-x")])
    await _check_stream(store, "alice", 7, 7)
    assert seqs(await store.events_after("s-alice", 0, BIG)) == [7]


async def test_prune_keeps_a_queued_run_and_is_not_held_back_by_it(store: RunStore) -> None:
    record = queued_run("r-q")
    await store.record_queued(record)
    await _stream_of_finished_runs(store, "alice", 2)  # 6 events
    assert await store.prune(max_age=None, max_events=0, now=0.0) == 6
    assert await store.get_run("r-q") == record
    assert [o.run.run_id for o in await store.open_runs()] == ["r-q"]
    await store.append("s-alice", [event(7, "agent_started", "r-q")])
    run = await store.get_run("r-q")
    assert run is not None
    assert (run.state, run.first_seq) == ("running", 7)


# -- conversations -------------------------------------------------------------------------


def exchange(n: int) -> list[ChatMessage]:
    """One turn: a question, a tool call (two calls), their results, the answer."""
    calls = (
        ToolCall(f"call-{n}a", "calculator", {"expression": f"{n} + 1", "nested": {"x": [1, 2]}}),
        ToolCall(f"call-{n}b", "weather", {}, invalid_arguments="not json: {"),
    )
    return [
        ChatMessage("user", f"question {n} \u2713"),
        ChatMessage("assistant", "", tool_calls=calls),
        ChatMessage("tool", str(n + 1), tool_call_id=f"call-{n}a", name="calculator"),
        ChatMessage("tool", '{"error": "bad"}', tool_call_id=f"call-{n}b", name="weather"),
        ChatMessage("assistant", f"answer {n}"),
    ]


async def test_conversations_round_trip(store: RunStore) -> None:
    assert await store.conversations.load("alice", "main") == []
    await store.conversations.append("alice", "main", exchange(1))
    await store.conversations.append("alice", "main", exchange(2))
    await store.conversations.append("alice", "other", exchange(3))
    await store.conversations.append("bob", "main", exchange(4))
    assert await store.conversations.load("alice", "main") == exchange(1) + exchange(2)
    assert await store.conversations.load("alice", "other") == exchange(3)
    assert await store.conversations.load("bob", "main") == exchange(4)
    assert await store.conversations.load("bob", "other") == []


async def test_conversations_load_gives_a_list_of_its_own(store: RunStore) -> None:
    await store.conversations.append("alice", "main", exchange(1))
    loaded = await store.conversations.load("alice", "main")
    loaded.append(ChatMessage("user", "not stored"))
    del loaded[0]
    assert await store.conversations.load("alice", "main") == exchange(1)


async def test_conversations_keep_the_newest_and_never_start_with_a_tool_message(
    make_store: Callable[..., RunStore],
) -> None:
    async with started(make_store(max_messages=4)) as fresh:
        history = fresh.conversations
        await history.append("alice", "main", exchange(1))
        # The newest 4 are [assistant(calls), tool, tool, assistant].
        assert await history.load("alice", "main") == exchange(1)[1:]
        await history.append("alice", "main", exchange(2)[:1])
        # The newest 4 are [tool, tool, assistant, user]: the leading tool messages go.
        assert await history.load("alice", "main") == [exchange(1)[4], exchange(2)[0]]
        await history.append("alice", "main", exchange(2)[1:4])
        assert await history.load("alice", "main") == exchange(2)[:4]
        for n in range(4, 10):
            await history.append("alice", "main", exchange(n))
            loaded = await history.load("alice", "main")
            assert len(loaded) <= 4
            assert loaded
            assert loaded[0].role != "tool"
            assert loaded == exchange(n)[5 - len(loaded) :]


# == the model test: every implementation agrees with the reference ============================

USERS = 3
STEP_KINDS = (
    "start",
    "start_bare",
    "queued_cancel",
    "think",
    "tool",
    "tool_done",
    "complete",
    "fail",
    "timeout",
    "cancel",
)
#: What a batch's steps are drawn from: runs end about as often as they start.
STEP_CHOICES = (*STEP_KINDS, "complete", "fail", "cancel", "think")
MODEL_MAX_MESSAGES = 5
#: Where each example's files go: tmpfs when there is one (creating a database there costs no
#: fsync; the example checks answers, not durability), else the system's temporary folder.
SCRATCH = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None


@attrs.frozen
class Create:
    user: int


@attrs.frozen
class Emit:
    """One batch for the user's stream: each step is (kind, pick), interpreted against the
    user's open runs (``pick`` chooses one); an open-run step with none open starts a run."""

    user: int
    steps: tuple[tuple[str, int], ...]


@attrs.frozen
class Queue:
    """``record_queued`` of a new run of the user's (``again``: of the newest run known)."""

    user: int
    again: bool


@attrs.frozen
class BadAppend:
    """An append whose first ``seq`` is ``last_seq + 1 + offset`` (``offset`` != 0)."""

    user: int
    offset: int


@attrs.frozen
class Prune:
    max_age: float | None
    max_events: int | None
    later: float


@attrs.frozen
class Converse:
    user: int
    thread: int
    roles: tuple[str, ...]


Op = Create | Emit | Queue | BadAppend | Prune | Converse

_users = st.integers(0, USERS - 1)
#: Users 0 and 1 have a stream from the start; user 2 only once a ``Create(2)`` came.
_writers = st.sampled_from([0, 1, 0, 1, 2])
_steps = st.lists(
    st.tuples(st.sampled_from(STEP_CHOICES), st.integers(0, 7)), min_size=1, max_size=8
).map(tuple)
_emit = st.builds(Emit, _writers, _steps)
_ops = st.one_of(
    _emit,
    _emit,
    _emit,
    _emit,
    st.builds(Create, _users),
    st.builds(Queue, _writers, st.booleans()),
    st.builds(Queue, _writers, st.just(False)),
    st.builds(BadAppend, _writers, st.sampled_from([-3, -1, 1, 2])),
    st.builds(
        Prune,
        st.sampled_from([None, 0.5, 1.5, 3.0, 8.0]),
        st.sampled_from([None, 0, 1, 2, 3, 5]),
        st.sampled_from([0.0, 1.0, 2.5, 5.0]),
    ),
    st.builds(
        Converse,
        _users,
        st.integers(0, 1),
        st.lists(st.sampled_from(["user", "call", "tool", "answer"]), min_size=1, max_size=4).map(
            tuple
        ),
    ),
)


def _program(first: Emit, second: Emit, ops: list[Op]) -> list[Op]:
    """Users 0 and 1 start with a stream and a batch each; then anything, in any order."""
    return [Create(0), Create(1), first, second, *ops]


programs = st.builds(
    _program,
    st.builds(Emit, st.just(0), _steps),
    st.builds(Emit, st.just(1), _steps),
    st.lists(_ops, max_size=18),
)


@attrs.define
class Writer:
    """Turns the abstract operations into events (the same for every store)."""

    last_seq: dict[int, int] = attrs.field(factory=dict)
    open_runs: dict[int, list[str]] = attrs.field(factory=dict)
    queued: dict[int, list[str]] = attrs.field(factory=dict)
    records: dict[str, StoredRun] = attrs.field(factory=dict)
    open_calls: dict[str, list[tuple[str, UnifiedTraceContext]]] = attrs.field(factory=dict)
    run_thread: dict[str, str] = attrs.field(factory=dict)
    run_trace: dict[str, UnifiedTraceContext] = attrs.field(factory=dict)
    runs: list[str] = attrs.field(factory=list)
    clock: float = 1000.0
    counter: int = 0

    def _new_run(self, user: int, pick: int) -> str:
        self.counter += 1
        run_id = f"r{self.counter}"
        self.runs.append(run_id)
        self.run_thread[run_id] = f"t{pick % 2}"
        self.run_trace[run_id] = UnifiedTraceContext.new_root()
        return run_id

    def queue(self, op: Queue) -> StoredRun:
        """The record of a newly accepted run (or again the newest run's, changed)."""
        if op.again and self.runs:
            run_id = self.runs[-1]
            record = self.records.get(run_id) or StoredRun(
                run_id, f"s{op.user}", f"u{op.user}", "t0", "queued"
            )
            return attrs.evolve(record, text="again", queued_at=self.clock + 0.5)
        run_id = self._new_run(op.user, 0)
        trace = self.run_trace[run_id]
        record = StoredRun(
            run_id,
            f"s{op.user}",
            f"u{op.user}",
            self.run_thread[run_id],
            "queued",
            agent_name="echo",
            text=f"queued {run_id}",
            trace_id=trace.trace_id,
            span_id=trace.span_id,
            queued_at=self.clock,
        )
        self.records[run_id] = record
        self.queued.setdefault(op.user, []).append(run_id)
        return record

    def batch(self, op: Emit) -> list[Event]:
        """The events of ``op`` (the writer's state moves on only if ``commit`` is called)."""
        seq = self.last_seq[op.user]
        ts = self.clock
        out: list[Event] = []
        opened = self.open_runs[op.user]
        waiting = self.queued.setdefault(op.user, [])
        for kind, pick in op.steps:
            if not opened and kind not in ("start", "start_bare", "queued_cancel"):
                kind = "start"
            if kind == "tool_done" and not any(self.open_calls.get(r) for r in opened):
                kind = "tool"
            if kind in ("start", "queued_cancel") and waiting and pick % 2 == 0:
                # A queued run starts (the oldest, as a thread's queue does) or is cancelled.
                run_id = waiting.pop(0 if kind == "start" else pick % len(waiting))
                trace = self.run_trace[run_id]
                if kind == "start":
                    type_, data = "agent_started", {"agent_name": "echo", "text": "queued"}
                    opened.append(run_id)
                else:
                    type_, data = "agent_cancelled", {"reason": "client"}
            elif kind in ("start", "start_bare", "queued_cancel"):
                run_id = self._new_run(op.user, pick)
                trace = self.run_trace[run_id]
                if kind == "start":
                    type_, data = "agent_started", {"agent_name": "echo", "text": f"hi {run_id}"}
                elif kind == "start_bare":
                    type_, data = "agent_thinking", {"reasoning": "no start"}
                else:
                    type_, data = "agent_cancelled", {"reason": "client"}
                if kind != "queued_cancel":
                    opened.append(run_id)
            else:
                candidates = (
                    [r for r in opened if self.open_calls.get(r)] if kind == "tool_done" else opened
                )
                run_id = candidates[pick % len(candidates)]
                trace = self.run_trace[run_id]
                if kind == "think":
                    type_, data = "agent_thinking", {"reasoning": f"step {pick}"}
                elif kind == "tool":
                    self.counter += 1
                    call_id, span = f"c{self.counter}", trace.child()
                    self.open_calls.setdefault(run_id, []).append((call_id, span))
                    trace = span
                    type_, data = "tool_executing", {"call_id": call_id, "tool_name": f"tool{pick}"}
                elif kind == "tool_done":
                    calls = self.open_calls[run_id]
                    call_id, trace = calls.pop(pick % len(calls))
                    type_, data = "tool_completed", {"call_id": call_id, "status": "ok"}
                else:
                    opened.remove(run_id)
                    self.open_calls.pop(run_id, None)
                    type_, data = {
                        "complete": ("agent_completed", {"usage": {"prompt_tokens": pick}}),
                        "fail": ("agent_error", {"error": {"type": "llm_error", "message": "x"}}),
                        "timeout": ("agent_error", {"error": {"type": "timeout", "message": "t"}}),
                        "cancel": ("agent_cancelled", {"reason": "client"}),
                    }[kind]
            seq += 1
            msg = EmitEvent(type_, run_id, self.run_thread[run_id], trace, data)
            out.append(stamp(msg, seq, ts))
        self.last_seq[op.user] = seq
        self.clock += 1.0
        return out


def _message(role: str, n: int) -> ChatMessage:
    if role == "call":
        return ChatMessage("assistant", "", tool_calls=(ToolCall(f"k{n}", "calc", {"x": n}),))
    if role == "tool":
        return ChatMessage("tool", str(n), tool_call_id=f"k{n - 1}", name="calc")
    return ChatMessage(role, f"{role} {n}")  # type: ignore[arg-type]


async def _apply(store: RunStore, op: Op, payload: Any) -> Any:
    if isinstance(op, Create):
        return await store.create_session(f"s{op.user}", f"u{op.user}")
    if isinstance(op, Emit | BadAppend):
        return await store.append(f"s{op.user}", payload)
    if isinstance(op, Queue):
        return await store.record_queued(payload)
    if isinstance(op, Prune):
        return await store.prune(max_age=op.max_age, max_events=op.max_events, now=payload)
    return await store.conversations.append(f"u{op.user}", f"t{op.thread}", payload)


async def _outcome(store: RunStore, op: Op, payload: Any) -> tuple[str, Any]:
    """What the store answered: ``("ok", result)`` or ``("refused", None)`` (``StoreError``)."""
    try:
        return "ok", await _apply(store, op, payload)
    except StoreError:
        return "refused", None


async def _snapshot(store: RunStore, users: int, final: bool, runs: Sequence[str]) -> dict:
    """What the store answers (everything compared between implementations)."""
    snap: dict[Any, Any] = {}
    for user in range(users):
        session = await store.session_for(f"u{user}")
        if session is None:
            snap["session", user] = None
            continue
        snap["session", user] = (
            session.session_id,
            session.user_id,
            session.first_seq,
            session.last_seq,
        )
        stored = await store.events_after(session.session_id, 0, BIG)
        snap["events", user] = frames(stored)
        # The reference's own invariants: no hole, no open run cut.
        assert seqs(stored) == list(range(session.first_seq, session.last_seq + 1))
        if final:
            snap["window", user] = frames(
                await store.events_after(session.session_id, session.first_seq, 2)
            )
            snap["runs", user] = await store.list_runs(user_id=f"u{user}", limit=3)
    snap["runs"] = await store.list_runs(limit=BIG)
    snap["open"] = [(o.run, o.open_calls) for o in await store.open_runs()]
    for run, _ in snap["open"]:
        if run.first_seq is not None:  # else a queued run, which holds back no event
            _, _, first_seq, _ = snap["session", int(run.user_id[1:])]
            assert run.first_seq >= first_seq
    if final:
        for state in RUN_STATES:
            snap["state", state] = await store.list_runs(state=state)
        for run_id in runs:
            snap["run", run_id] = await store.get_run(run_id)
            snap["run_events", run_id] = frames(await store.run_events(run_id))
        for user in range(users):
            for thread in range(2):
                snap["conv", user, thread] = await store.conversations.load(
                    f"u{user}", f"t{thread}"
                )
    return snap


async def _check_program(program: Sequence[Op], folder: Path) -> None:
    names = [REFERENCE, *(name for name in IMPLEMENTATIONS if name != REFERENCE)]
    stores = {}
    for name in names:
        (folder / name).mkdir()
        stores[name] = IMPLEMENTATIONS[name](folder / name, MODEL_MAX_MESSAGES)
    writer = Writer()
    async with trio.open_nursery() as nursery:
        for fresh in stores.values():
            await nursery.start(fresh.run)
        for step, op in enumerate(program):
            payload: Any = None
            if isinstance(op, Emit):
                known = op.user in writer.last_seq
                payload = writer.batch(op) if known else [event(1, "agent_started", "r-orphan")]
            elif isinstance(op, BadAppend):
                first = writer.last_seq.get(op.user, 0) + 1 + op.offset
                payload = [event(first, "agent_started", "r-bad"), event(first + 1, "x", "r-bad")]
            elif isinstance(op, Queue):
                payload = writer.queue(op)
            elif isinstance(op, Prune):
                payload = writer.clock + op.later
            elif isinstance(op, Converse):
                payload = [_message(role, step * 10 + i) for i, role in enumerate(op.roles)]
            outcomes = {name: await _outcome(s, op, payload) for name, s in stores.items()}
            expected = outcomes[REFERENCE]
            if isinstance(op, BadAppend):
                assert expected[0] == "refused"
            if isinstance(op, Emit):
                assert expected[0] == ("ok" if op.user in writer.last_seq else "refused")
            if isinstance(op, Create) and expected[0] == "ok":
                writer.last_seq[op.user] = 0
                writer.open_runs[op.user] = []
            final = step == len(program) - 1
            model = await _snapshot(stores[REFERENCE], USERS, final, writer.runs)
            for name in names[1:]:
                assert outcomes[name] == expected, (step, op, name)
                got = await _snapshot(stores[name], USERS, final, writer.runs)
                for key in model:
                    assert got[key] == model[key], (step, op, name, key)
        for fresh in stores.values():
            await fresh.aclose()


@given(program=programs)
def test_every_store_agrees_with_the_reference(program: list[Op]) -> None:
    """Random streams (several users; runs with tool calls, finished or left open; refused
    appends; conversation turns) with random prunes in between: after every operation, every
    implementation gives the reference's answers (outcome, sessions, events, runs, open runs)."""
    with tempfile.TemporaryDirectory(dir=SCRATCH) as folder:
        trio.run(_check_program, program, Path(folder))


# == SQLite ===================================================================================


def _connect(path: Path) -> closing[sqlite3.Connection]:
    return closing(sqlite3.connect(path))


async def test_sqlite_data_survives_close_and_reopen(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "folder" / DB_FILENAME  # the folder is created
    first = SqliteStore(path)
    async with started(first):
        alice = await new_stream(first, "alice")
        events = alice.finished_run("r-1") + alice.finished_run("r-2")
        events += [
            alice.ev("agent_started", "r-open"),
            alice.ev("tool_executing", "r-open", {"call_id": "c-1", "tool_name": "slow"}),
        ]
        await first.append(alice.session_id, events)
        assert await first.prune(max_age=None, max_events=5, now=0.0) == 3
        await first.create_session("s-bob", "bob")
        await first.record_queued(queued_run("r-queued", queued_at=2000.0))
        await first.conversations.append("alice", "main", exchange(1))
        before = {
            "session": await first.session_for("alice"),
            "bob": await first.session_for("bob"),
            "events": frames(await first.events_after(alice.session_id, 0, BIG)),
            "runs": await first.list_runs(),
            "open": await first.open_runs(),
            "history": await first.conversations.load("alice", "main"),
        }
    second = SqliteStore(path)
    async with started(second):
        after = {
            "session": await second.session_for("alice"),
            "bob": await second.session_for("bob"),
            "events": frames(await second.events_after(alice.session_id, 0, BIG)),
            "runs": await second.list_runs(),
            "open": await second.open_runs(),
            "history": await second.conversations.load("alice", "main"),
        }
        assert after == before
        assert after["events"] == frames(events[3:])
        assert after["history"] == exchange(1)
        open_run, queued = after["open"]
        assert [c.call_id for c in open_run.open_calls] == ["c-1"]
        assert (queued.run.run_id, queued.run.state, queued.run.queued_at) == (
            "r-queued",
            "queued",
            2000.0,
        )
        # A seq is never reused across restarts; the stream goes on.
        with pytest.raises(StoreError):
            await second.append(alice.session_id, [event(8, "agent_started", "r-x")])
        with pytest.raises(StoreError):
            await second.create_session("s-2", "alice")
        await second.append(
            alice.session_id,
            [alice.ev("agent_completed", "r-open"), alice.ev("agent_cancelled", "r-queued")],
        )
        await second.conversations.append("alice", "main", exchange(2))
    async with started(SqliteStore(path)) as third:
        assert await third.open_runs() == []
        assert await third.conversations.load("alice", "main") == exchange(1) + exchange(2)
        session = await third.session_for("alice")
        assert session is not None
        assert (session.first_seq, session.last_seq) == (4, 10)
        run = await third.get_run("r-queued")
        assert run is not None
        assert (run.state, run.first_seq, run.queued_at) == ("cancelled", 10, 2000.0)


@pytest.mark.parametrize(("synchronous", "expected"), [(None, 1), ("NORMAL", 1), ("FULL", 2)])
async def test_sqlite_wal_and_synchronous(
    tmp_path: Path, synchronous: str | None, expected: int
) -> None:
    path = tmp_path / DB_FILENAME
    store = SqliteStore(path) if synchronous is None else SqliteStore(path, synchronous=synchronous)
    async with started(store):
        for db in (store._writer, store._reader):
            assert db is not None
            assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
            assert db.execute("PRAGMA synchronous").fetchone()[0] == expected
    with _connect(path) as db:  # WAL is a property of the file
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_sqlite_refuses_an_unknown_synchronous_and_open_store_uses_the_data_dir(
    tmp_path: Path,
) -> None:
    with pytest.raises(ValueError, match="synchronous"):
        SqliteStore(tmp_path / DB_FILENAME, synchronous="OFF")
    store = open_store(tmp_path, synchronous="FULL")
    assert (store.path, store.synchronous) == (tmp_path / DB_FILENAME, "FULL")
    assert open_store(tmp_path).synchronous == "NORMAL"


async def test_sqlite_schema_version(tmp_path: Path) -> None:
    path = tmp_path / DB_FILENAME
    async with started(SqliteStore(path)):
        pass
    with _connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS) == SCHEMA_VERSION
    # Starting again migrates nothing (and fails on nothing).
    async with started(SqliteStore(path)) as again:
        await again.create_session("s-1", "alice")


@pytest.mark.parametrize("version", range(len(MIGRATIONS)))
async def test_sqlite_migrates_an_older_schema(tmp_path: Path, version: int) -> None:
    """A database left at any older version is brought to the current one on start
    (a schema change is a new migration, never an edit of one already shipped)."""
    path = tmp_path / DB_FILENAME
    with _connect(path) as db:
        for script in MIGRATIONS[:version]:
            db.executescript(script)
        db.execute(f"PRAGMA user_version = {version}")
    async with started(SqliteStore(path)) as store:
        stream = await new_stream(store)
        await store.record_queued(queued_run("r-q"))
        await store.append(stream.session_id, stream.finished_run("r-1"))
        await store.conversations.append("alice", "main", exchange(1))
        assert [r.run_id for r in await store.list_runs()] == ["r-1", "r-q"]
        assert [o.run.run_id for o in await store.open_runs()] == ["r-q"]
    with _connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)


async def test_sqlite_refuses_a_newer_schema(tmp_path: Path) -> None:
    path = tmp_path / DB_FILENAME
    with _connect(path) as db:
        db.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    store = SqliteStore(path)
    with pytest.raises(StoreError, match="schema version"):
        await store.run()
    await store.aclose()
    with _connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS) + 1
        assert db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0


async def test_sqlite_group_commit(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / DB_FILENAME)
    async with started(store):
        async with trio.open_nursery() as nursery:
            for i in range(50):
                nursery.start_soon(store.create_session, f"s-{i}", f"u-{i}")
        commits, writes = store.commits, store.writes
        assert writes == 50
        assert commits < writes

        async def append(i: int) -> None:
            await store.append(f"s-{i}", [event(1, "agent_started", f"r-{i}")])
            await store.append(f"s-{i}", [event(2, "agent_completed", f"r-{i}")])

        async with trio.open_nursery() as nursery:
            for i in range(50):
                nursery.start_soon(append, i)
        assert store.writes - writes == 100
        assert store.commits - commits < 100
        assert store.commits < store.writes
        assert len(await store.list_runs(state="completed", limit=BIG)) == 50
        for i in range(50):
            assert seqs(await store.events_after(f"s-{i}", 0, BIG)) == [1, 2]


async def test_sqlite_linger_gathers_a_busy_moments_writes_into_one_commit(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """``linger``: a write that comes while the store is busy (its previous commit ended
    less than ten lingers ago) waits one linger, and the writes that arrive meanwhile
    share its commit; a write after a quiet spell is committed at once."""
    linger = 0.01
    store = SqliteStore(tmp_path / DB_FILENAME, linger=linger)
    async with started(store):
        for i in range(5):
            await store.create_session(f"s-{i}", f"u-{i}")
        await trio.sleep(1.0)  # quiet: more than ten lingers since the last commit
        began, commits = trio.current_time(), store.commits
        await store.append("s-0", [event(1, "agent_started", "r-0")])
        assert store.commits == commits + 1
        assert trio.current_time() == began  # committed at once, not a linger later

        # Busy now: four writes 2 ms apart, the first one a linger's wait.
        waited: list[float] = []

        async def append_later(i: int) -> None:
            await trio.sleep(0.002 * (i - 1))
            submitted = trio.current_time()
            await store.append(f"s-{i}", [event(1, "agent_started", f"r-{i}")])
            waited.append(trio.current_time() - submitted)

        commits = store.commits
        async with trio.open_nursery() as nursery:
            for i in range(1, 5):
                nursery.start_soon(append_later, i)
        assert store.commits == commits + 1  # four writes, one commit
        assert max(waited) == pytest.approx(linger)  # the first write waited one linger
        assert min(waited) == pytest.approx(linger - 0.006)
        for i in range(5):
            assert seqs(await store.events_after(f"s-{i}", 0, BIG)) == [1]


async def test_sqlite_checkpoints_off_the_commit_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Commits never checkpoint the WAL themselves (that would hold up every session
    waiting for the commit); the store checkpoints on the side, so committed events
    reach the database file while the store stays open and the WAL is reused."""
    monkeypatch.setattr(store_module, "CHECKPOINT_EVERY", 0.0)
    path = tmp_path / DB_FILENAME
    store = SqliteStore(path)
    async with started(store):
        assert store._writer is not None
        assert store._writer.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 0
        stream = await new_stream(store)
        with trio.fail_after(10):
            for i in range(5):
                checkpointed = store._checkpointed
                await store.append(stream.session_id, stream.finished_run(f"r-{i}"))
                await checkpointed.wait()
        assert store.checkpoints >= 5
        # The database file itself (the WAL ignored) holds every committed event.
        with closing(sqlite3.connect(f"file:{path}?mode=ro&immutable=1", uri=True)) as db:
            assert db.execute("SELECT count(*) FROM events").fetchone()[0] == 15
        assert seqs(await store.events_after(stream.session_id, 0, BIG)) == list(range(1, 16))


async def test_sqlite_a_refused_write_does_not_roll_back_its_batch(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / DB_FILENAME)
    async with started(store):
        for i in range(4):
            await store.create_session(f"s-{i}", f"u-{i}")
        refused: list[str] = []

        async def expect_refusal(name: str, call: Any) -> None:
            with pytest.raises(StoreError):
                await call
            refused.append(name)

        def half_done(db: sqlite3.Connection) -> None:
            # Changes something, then fails: the change must be undone, and only it.
            db.execute("UPDATE sessions SET last_seq = 99 WHERE session_id = 's-3'")
            db.execute(
                "INSERT INTO sessions (session_id, user_id, created_at) VALUES ('s-0', 'x', 0)"
            )

        commits = store.commits
        async with trio.open_nursery() as nursery:
            nursery.start_soon(store.append, "s-0", [event(1, "agent_started", "r-0")])
            nursery.start_soon(
                expect_refusal, "gap", store.append("s-1", [event(2, "agent_started", "r-1")])
            )
            nursery.start_soon(store.append, "s-2", [event(1, "agent_started", "r-2")])
            nursery.start_soon(expect_refusal, "duplicate", store.create_session("s-9", "u-0"))
            nursery.start_soon(expect_refusal, "half", store._write(half_done))
            nursery.start_soon(store.conversations.append, "u-0", "main", exchange(1))
        # All in one transaction (the writer took them together) ...
        assert store.commits - commits == 1
        assert sorted(refused) == ["duplicate", "gap", "half"]
        # ... which kept the good writes and none of the refused ones.
        assert seqs(await store.events_after("s-0", 0, BIG)) == [1]
        assert seqs(await store.events_after("s-2", 0, BIG)) == [1]
        assert await store.events_after("s-1", 0, BIG) == []
        assert await store.get_run("r-1") is None
        assert await store.session_for("u-9") is None
        s3 = await store.session_for("u-3")
        assert s3 is not None
        assert s3.last_seq == 0
        assert await store.conversations.load("u-0", "main") == exchange(1)


async def test_sqlite_a_write_after_aclose_is_refused(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / DB_FILENAME)
    async with started(store):
        await store.create_session("s-1", "alice")
    with trio.fail_after(5), pytest.raises(StoreError):
        await store.append("s-1", [event(1, "agent_started", "r-1")])


async def test_sqlite_closing_waits_for_a_read_in_progress(tmp_path: Path) -> None:
    """A read running in its worker thread when the store closes (the retention's prune at
    shutdown) finishes on an open connection: the store closes its files after it, and
    reads asked later are refused with ``StoreError``."""
    store = SqliteStore(tmp_path / DB_FILENAME)
    slow = (
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 2000000) "
        "SELECT count(*) FROM n"
    )
    results: list[Any] = []

    async def read() -> None:
        rows = await store._read(slow)
        results.append(rows[0][0])

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(store.run)
            nursery.start_soon(read)
            while not store._read_lock.locked():
                await trio.lowlevel.checkpoint()
            await store.aclose()  # while the query runs in its thread
        assert results == [2000000]
        with pytest.raises(StoreError):
            await store._read("SELECT 1")


async def test_sqlite_cancelling_run_fails_the_writes_it_did_not_commit(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / DB_FILENAME)
    scope = trio.CancelScope()

    async def serve(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with scope:
            await store.run(task_status=task_status)

    async with trio.open_nursery() as nursery:
        await nursery.start(serve)
        await store.create_session("s-1", "alice")
        scope.cancel()
        # The write is queued before the writer sees its cancellation.
        with trio.fail_after(0.5), pytest.raises(StoreError):
            await store.append("s-1", [event(1, "agent_started", "r-1")])


# -- the conversation cache ------------------------------------------------------------------


@asynccontextmanager
async def cached_and_file(
    path: Path, max_messages: int = 200, cached_threads: int = 1024
) -> AsyncIterator[tuple[SqliteStore, SqliteStore]]:
    """A store on ``path`` with its conversation cache, and one without (a view of what the
    file holds: every load reads it) on the same file."""
    cached = SqliteStore(path, max_messages=max_messages, cached_threads=cached_threads)
    plain = SqliteStore(path, max_messages=max_messages, cached_threads=0)
    async with started(cached), started(plain):
        yield cached, plain


def count_reads(store: SqliteStore, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The SQL of every read ``store`` makes from now on."""
    reads: list[str] = []
    read = store._read

    async def counted(sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        reads.append(sql)
        return await read(sql, params)

    monkeypatch.setattr(store, "_read", counted)
    return reads


async def test_sqlite_a_cached_history_costs_no_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with cached_and_file(tmp_path / DB_FILENAME, max_messages=8) as (store, file):
        await store.conversations.append("alice", "main", exchange(1))
        reads = count_reads(store, monkeypatch)
        assert await store.conversations.load("alice", "main") == exchange(1)
        assert len(reads) == 1  # the first load reads the file ...
        for n in range(2, 5):
            await store.conversations.append("alice", "main", exchange(n))
            loaded = await store.conversations.load("alice", "main")
            assert loaded == await file.conversations.load("alice", "main")
            # The newest 8 are 3 of the turn before (tool, tool, answer) and this turn.
            assert loaded == exchange(n - 1)[-1:] + exchange(n)
        assert await store.conversations.load("alice", "other") == []
        assert await store.conversations.load("alice", "other") == []
        assert len(reads) == 2  # ... and later ones of a cached thread do not
    async with started(SqliteStore(tmp_path / DB_FILENAME, max_messages=8)) as again:
        assert await again.conversations.load("alice", "main") == loaded


async def test_sqlite_the_cache_keeps_the_most_recently_used_threads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with cached_and_file(tmp_path / DB_FILENAME, cached_threads=2) as (store, _):
        for thread in ("a", "b", "c"):
            await store.conversations.append("alice", thread, exchange(ord(thread)))
        reads = count_reads(store, monkeypatch)
        for thread in ("a", "b", "a", "c", "a", "b"):  # c pushes b out, b pushes c out
            assert await store.conversations.load("alice", thread) == exchange(ord(thread))
        assert len(reads) == 4
        assert len(store._conversations._cache) == 2


async def test_sqlite_a_failed_history_write_is_forgotten(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A history append whose write fails (rolled back) raises, and the thread's next load
    reads the file again: the cache never holds what the file does not."""
    async with cached_and_file(tmp_path / DB_FILENAME) as (store, file):
        await store.conversations.append("alice", "main", exchange(1))
        assert await store.conversations.load("alice", "main") == exchange(1)
        submit = store._submit

        def failing(apply: Callable[[sqlite3.Connection], None]) -> Any:
            def fail(db: sqlite3.Connection) -> None:
                apply(db)
                raise sqlite3.OperationalError("disk I/O error")

            return submit(fail)

        monkeypatch.setattr(store, "_submit", failing)
        with pytest.raises(StoreError, match="disk I/O error"):
            await store.conversations.append("alice", "main", exchange(2))
        monkeypatch.setattr(store, "_submit", submit)
        reads = count_reads(store, monkeypatch)
        assert await store.conversations.load("alice", "main") == exchange(1)
        assert len(reads) == 1
        assert await file.conversations.load("alice", "main") == exchange(1)


async def test_sqlite_a_cancelled_history_append_is_not_lost_to_the_cache(
    tmp_path: Path,
) -> None:
    """An append cancelled while its write is queued still commits: the cache forgets the
    thread and caches nothing it reads before that write is done."""
    async with cached_and_file(tmp_path / DB_FILENAME) as (store, file):
        await store.conversations.append("alice", "main", exchange(1))
        assert await store.conversations.load("alice", "main") == exchange(1)
        with trio.CancelScope() as scope:
            scope.cancel()
            await store.conversations.append("alice", "main", exchange(2))
        assert ("alice", "main") not in store._conversations._cache
        # Read while the write may be pending: whatever it gives, nothing is cached.
        assert (await store.conversations.load("alice", "main"))[:5] == exchange(1)
        await store._write(lambda db: None)  # the cancelled append committed before
        assert await store.conversations.load("alice", "main") == exchange(1) + exchange(2)
        assert await store.conversations.load("alice", "main") == exchange(1) + exchange(2)
        assert await file.conversations.load("alice", "main") == exchange(1) + exchange(2)


#: One round of operations run at once: (kind, thread, size) with kind "append", "load",
#: "cancelled" (an append cancelled as it waits: its write still commits) or "failed".
_conversation_rounds = st.lists(
    st.lists(
        st.tuples(
            st.sampled_from(["append", "append", "load", "load", "cancelled", "failed"]),
            st.integers(0, 2),
            st.integers(1, 4),
        ),
        min_size=1,
        max_size=5,
    ),
    min_size=1,
    max_size=6,
)


async def _check_conversation_rounds(
    rounds: list[list[tuple[str, int, int]]], folder: Path
) -> None:
    async with cached_and_file(folder / DB_FILENAME, max_messages=5, cached_threads=2) as (
        store,
        file,
    ):
        history = store.conversations
        failing: list[bool] = []
        submit = store._submit

        def maybe_failing(apply: Callable[[sqlite3.Connection], None]) -> Any:
            if failing and failing.pop():

                def fail(db: sqlite3.Connection) -> None:
                    apply(db)
                    raise sqlite3.OperationalError("refused")

                return submit(fail)
            return submit(apply)

        store._submit = maybe_failing  # type: ignore[method-assign]
        counter = 0

        async def run(kind: str, thread: str, messages: list[ChatMessage]) -> None:
            if kind == "load":
                await history.load("u", thread)
            elif kind == "cancelled":
                with trio.CancelScope() as scope:
                    scope.cancel()
                    await history.append("u", thread, messages)
            else:
                failing.append(kind == "failed")  # _submit runs before append's first checkpoint
                try:
                    await history.append("u", thread, messages)
                except StoreError:
                    assert kind == "failed"

        for ops in rounds:
            async with trio.open_nursery() as nursery:
                for kind, thread, size in ops:
                    messages = [_message("user", counter + i) for i in range(size)]
                    counter += size
                    nursery.start_soon(run, kind, f"t{thread}", messages)
            await store._write(lambda db: None)  # every append of the round committed
            # The cached threads first, most recently used first: a check that reads the
            # file (and caches what it read) pushes out only threads already checked.
            cached = [thread for _, thread in reversed(store._conversations._cache)]
            for thread in cached + sorted({"t0", "t1", "t2"} - set(cached)):
                expected = await file.conversations.load("u", thread)
                assert await history.load("u", thread) == expected, (ops, thread)
                assert await history.load("u", thread) == expected, (ops, thread)


@given(rounds=_conversation_rounds)
def test_sqlite_the_conversation_cache_agrees_with_the_file(
    rounds: list[list[tuple[str, int, int]]],
) -> None:
    """Appends (some cancelled, some failing) and loads of three threads at once, through a
    cache of two threads: after each round, every load answers what the file holds."""
    with tempfile.TemporaryDirectory(dir=SCRATCH) as folder:
        trio.run(_check_conversation_rounds, rounds, Path(folder))
