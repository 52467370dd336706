"""The session's event stream (netra_actors._sequencer): replay window, sequencer actor, subscriptions.

The window is pure; the sequencer is a trio actor, fed here through a memory
channel under the ``autojump_clock`` fixture (no sockets, no real waiting).
"""

from __future__ import annotations

import gc
import json
from collections.abc import Sequence

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from netra_actors._messages import EmitEvent, Event
from netra_actors._sequencer import (
    ReplayWindow,
    SessionSequencer,
    Subscription,
    SubscriptionLagged,
    event_from_frame,
    stamp,
)
from netra_actors._trace import UnifiedTraceContext

ENVELOPE = {"type", "seq", "run_id", "thread_id", "ts", "trace_id", "span_id", "data"}


def _event(seq: int) -> Event:
    """Event number ``seq`` as the sequencer makes it (the window keeps its frame only)."""
    trace = UnifiedTraceContext("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7")
    return stamp(EmitEvent("agent_thinking", "r-1", "main", trace, {"step": seq}), seq, 0.0)


def _window(capacity: int, count: int) -> ReplayWindow:
    window = ReplayWindow(capacity)
    for seq in range(1, count + 1):
        window.append(_event(seq))
    return window


def _seqs(events: Sequence[Event | str]) -> list[int]:
    """The ``seq`` of each event (or event frame, as ``next_batch`` returns them)."""
    return [(event_from_frame(e) if isinstance(e, str) else e).seq for e in events]


# --- ReplayWindow ----------------------------------------------------------------------------------


@pytest.mark.parametrize("capacity", [0, -1])
def test_capacity_must_be_positive(capacity: int) -> None:
    """A window holds at least one event."""
    with pytest.raises(ValueError, match="max_events"):
        ReplayWindow(capacity)


def test_empty_window() -> None:
    """An empty window has ``last_seq`` 0, ``oldest_seq`` 1, no events, and nothing after 0."""
    window = ReplayWindow(5)
    assert (window.last_seq, window.oldest_seq, len(window)) == (0, 1, 0)
    assert window.after(0) == []


@pytest.mark.parametrize("first", [0, 2, -1, 5])
def test_first_append_must_be_seq_1(first: int) -> None:
    """The first event must have ``seq`` 1."""
    window = ReplayWindow(5)
    with pytest.raises(ValueError, match="does not follow"):
        window.append(_event(first))
    assert (window.last_seq, len(window)) == (0, 0)


@pytest.mark.parametrize("seq", [1, 2, 3, 5])
def test_append_must_be_last_seq_plus_one(seq: int) -> None:
    """Appending a repeated, older or skipped ``seq`` is refused and leaves the window unchanged."""
    window = _window(10, 3)
    with pytest.raises(ValueError, match="does not follow"):
        window.append(_event(seq))
    assert (window.last_seq, len(window)) == (3, 3)
    window.append(_event(4))
    assert window.last_seq == 4


def test_after_returns_exactly_the_suffix() -> None:
    """``after(seq)`` returns the events ``seq+1 .. last_seq`` in order, for every ``seq``."""
    window = _window(10, 6)
    for seq in range(7):
        assert _seqs(window.after(seq)) == list(range(seq + 1, 7))
    assert window.after(6) == []
    assert window.after(100) == []


def test_after_returns_the_appended_events_with_their_frames() -> None:
    """The window hands back equal events whose frames are the very strings appended
    (what connections send is never re-encoded)."""
    window = ReplayWindow(3)
    event = _event(1)
    window.append(event)
    (back,) = window.after(0)
    assert back == event
    assert back.frame is event.frame
    assert window.frames_after(0)[0] is event.frame


def test_a_full_window_gives_the_garbage_collector_nothing_to_track() -> None:
    """Thousands of events in a window add no objects the collector tracks (every full
    collection walks each tracked object: a window of ``Event`` objects per session
    made collections slower as windows filled)."""
    window = ReplayWindow(5_000, max_age=3600.0)
    window.append(_event(1))  # the window's own containers exist from here on
    gc.collect()
    before = len(gc.get_objects())
    for seq in range(2, 5_001):
        window.append(_event(seq))
    gc.collect()
    assert len(gc.get_objects()) - before < 50
    assert len(window) == 5_000


@pytest.mark.parametrize(
    ("seq", "limit", "expected"),
    [
        (0, 2, [1, 2]),
        (0, 0, []),
        (2, 1, [3]),
        (3, 10, [4, 5]),
        (0, None, [1, 2, 3, 4, 5]),
        (5, 3, []),
    ],
)
def test_after_limit(seq: int, limit: int | None, expected: list[int]) -> None:
    """``limit`` caps how many events ``after`` returns, oldest first."""
    assert _seqs(_window(10, 5).after(seq, limit)) == expected


def test_bounded_window_drops_the_oldest() -> None:
    """A full window drops its oldest events and refuses cursors that fell out."""
    window = _window(3, 5)
    assert (window.oldest_seq, window.last_seq, len(window)) == (3, 5, 3)
    assert _seqs(window.after(2)) == [3, 4, 5]
    assert _seqs(window.after(4)) == [5]
    assert window.after(5) == []
    for seq in (0, 1):
        with pytest.raises(LookupError):
            window.after(seq)


def test_window_of_one() -> None:
    """A window of capacity 1 holds only the newest event."""
    window = _window(1, 4)
    assert (window.oldest_seq, window.last_seq, len(window)) == (4, 4, 1)
    assert _seqs(window.after(3)) == [4]
    with pytest.raises(LookupError):
        window.after(2)


@given(
    capacity=st.integers(min_value=1, max_value=10),
    count=st.integers(min_value=0, max_value=30),
    data=st.data(),
)
def test_after_is_the_suffix_or_lookup_error(
    capacity: int, count: int, data: st.DataObject
) -> None:
    """For any capacity and appends, ``after(k)`` is the right suffix, or ``LookupError`` exactly when k+1 < oldest."""
    window = _window(capacity, count)
    oldest = max(1, count - capacity + 1)
    assert (window.oldest_seq, window.last_seq, len(window)) == (
        oldest,
        count,
        min(count, capacity),
    )
    k = data.draw(st.integers(min_value=0, max_value=count + 2), label="k")
    limit = data.draw(st.none() | st.integers(min_value=0, max_value=12), label="limit")
    if k < count and k + 1 < oldest:
        with pytest.raises(LookupError):
            window.after(k, limit)
    else:
        stop = count if limit is None else min(count, k + limit)
        assert _seqs(window.after(k, limit)) == list(range(k + 1, stop + 1))


def _timed_event(seq: int, ts: float) -> Event:
    trace = UnifiedTraceContext("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7")
    return stamp(EmitEvent("agent_thinking", "r-1", "main", trace, {"step": seq}), seq, ts)


@given(
    block=st.integers(min_value=1, max_value=5),
    capacity=st.integers(min_value=1, max_value=14),
    max_age=st.none() | st.floats(min_value=0.0, max_value=6.0),
    gaps=st.lists(st.sampled_from([0.0, 0.5, 1.0, 2.5, 7.0]), max_size=40),
    data=st.data(),
)
def test_window_matches_a_list_of_the_newest_events(
    block: int,
    capacity: int,
    max_age: float | None,
    gaps: list[float],
    data: st.DataObject,
) -> None:
    """Whatever the block size, capacity, ages and appends, the window holds exactly the
    newest events that fit the capacity and are at most ``max_age`` older than the newest,
    and ``frames_after`` reads any suffix of them (or raises ``LookupError`` for a cursor
    that fell out)."""
    window = ReplayWindow(capacity, max_age)
    window.BLOCK = block
    model: list[Event] = []
    ts = 0.0
    for seq, gap in enumerate(gaps, 1):
        ts += gap
        event = _timed_event(seq, ts)
        window.append(event)
        model = [e for e in [*model, event][-capacity:] if max_age is None or e.ts >= ts - max_age]
        oldest = model[0].seq
        assert (len(window), window.oldest_seq, window.last_seq) == (len(model), oldest, seq)
        k = data.draw(st.integers(min_value=0, max_value=seq + 1), label="k")
        limit = data.draw(st.none() | st.integers(min_value=0, max_value=16), label="limit")
        if k < seq and k + 1 < oldest:
            with pytest.raises(LookupError):
                window.frames_after(k, limit)
        else:
            expected = [e.frame for e in model if e.seq > k][:limit]
            assert window.frames_after(k, limit) == expected


# --- SessionSequencer and Subscription --------------------------------------------------------------


def _emit(i: int, run_id: str = "r-1", thread_id: str = "main") -> EmitEvent:
    return EmitEvent(
        type="agent_thinking",
        run_id=run_id,
        thread_id=thread_id,
        trace=UnifiedTraceContext.new_root(),
        data={"reasoning": f"step {i}", "step": i},
    )


async def _drain(sub: Subscription, limit: int = 256) -> tuple[list[str], list[Event]]:
    """Every direct frame and event until the stream ends (``next_batch`` returns ``None``)."""
    direct: list[str] = []
    events: list[Event] = []
    while (batch := await sub.next_batch(limit)) is not None:
        direct.extend(batch[0])
        events.extend(map(event_from_frame, batch[1]))
    return direct, events


async def _send_all(send: trio.MemorySendChannel[EmitEvent], messages: Sequence[EmitEvent]) -> None:
    """Send ``messages``, then close this sender."""
    async with send:
        for msg in messages:
            await send.send(msg)


def _inbox(
    nursery: trio.Nursery, sequencer: SessionSequencer, capacity: int = 1000
) -> trio.MemorySendChannel[EmitEvent]:
    """Start ``sequencer`` in ``nursery`` on a new inbox; return the inbox's sending end."""
    send, receive = trio.open_memory_channel[EmitEvent](capacity)
    nursery.start_soon(sequencer.run, receive)
    return send


async def _publish(send: trio.MemorySendChannel[EmitEvent], messages: Sequence[EmitEvent]) -> None:
    """Send ``messages`` and wait until the sequencer has published them."""
    for msg in messages:
        await send.send(msg)
    await trio.testing.wait_all_tasks_blocked()


async def test_events_arrive_in_order_with_gap_free_seq(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A subscriber reading while events stream in gets each once, in order, ``seq`` 1, 2, 3... without gaps."""
    sequencer = SessionSequencer("s-1", window_events=100)
    sub = sequencer.subscribe()
    messages = [_emit(i, run_id=f"r-{i % 3}") for i in range(40)]
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_send_all, _inbox(nursery, sequencer, capacity=5), messages)
            direct, events = await _drain(sub, limit=7)
    assert direct == []
    assert _seqs(events) == list(range(1, 41))
    assert [e.data["step"] for e in events] == list(range(40))
    assert [e.run_id for e in events] == [m.run_id for m in messages]
    assert sequencer.window.last_seq == 40


async def test_subscribers_get_identical_frames(autojump_clock: trio.testing.MockClock) -> None:
    """Two subscribers receive the very same events, with identical ``frame`` text."""
    sequencer = SessionSequencer("s-1", window_events=100)
    first, second = sequencer.subscribe(), sequencer.subscribe()
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await _send_all(_inbox(nursery, sequencer), [_emit(i) for i in range(10)])
            _, a = await _drain(first)
            _, b = await _drain(second)
    assert _seqs(a) == _seqs(b) == list(range(1, 11))
    assert [e.frame for e in a] == [e.frame for e in b]


async def test_frame_is_the_json_envelope(autojump_clock: trio.testing.MockClock) -> None:
    """Each ``frame`` is JSON with exactly the envelope fields, matching the event and its message."""
    sequencer = SessionSequencer("s-1", window_events=100)
    sub = sequencer.subscribe()
    messages = [_emit(0, run_id="r-a", thread_id="t-a"), _emit(1, run_id="r-b", thread_id="main")]
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await _send_all(_inbox(nursery, sequencer), messages)
            _, events = await _drain(sub)
    assert len(events) == 2
    for event, msg in zip(events, messages, strict=True):
        frame = json.loads(event.frame)
        assert set(frame) == ENVELOPE
        assert frame == {
            "type": msg.type,
            "seq": event.seq,
            "run_id": msg.run_id,
            "thread_id": msg.thread_id,
            "ts": event.ts,
            "trace_id": msg.trace.trace_id,
            "span_id": msg.trace.span_id,
            "data": dict(msg.data),
        }
        assert isinstance(frame["ts"], float)
        assert (event.type, event.run_id, event.thread_id) == (msg.type, msg.run_id, msg.thread_id)
        assert (event.trace_id, event.span_id) == (msg.trace.trace_id, msg.trace.span_id)


async def test_late_subscription_starts_after_the_newest_event(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A subscription made after some events receives only the events that follow it."""
    sequencer = SessionSequencer("s-1", window_events=100)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            send = _inbox(nursery, sequencer)
            await _publish(send, [_emit(i) for i in range(3)])
            late = sequencer.subscribe()
            assert late.cursor == 3
            await _send_all(send, [_emit(i) for i in range(3, 5)])
            _, events = await _drain(late)
    assert _seqs(events) == [4, 5]


async def test_subscription_after_seq_replays_from_the_window(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """``subscribe(after_seq=k)`` replays the held events after ``k`` before the new ones."""
    sequencer = SessionSequencer("s-1", window_events=100)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            send = _inbox(nursery, sequencer)
            await _publish(send, [_emit(i) for i in range(5)])
            sub = sequencer.subscribe(after_seq=2)
            await _send_all(send, [_emit(5)])
            _, events = await _drain(sub)
    assert _seqs(events) == [3, 4, 5, 6]


async def test_direct_frames_come_before_pending_events(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Direct frames are returned in push order, in the same batch as (and ahead of) pending events."""
    sequencer = SessionSequencer("s-1", window_events=100)
    sub = sequencer.subscribe()
    other = sequencer.subscribe()
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            send = _inbox(nursery, sequencer)
            await _publish(send, [_emit(0), _emit(1)])
            sub.push_direct('{"type":"pong"}')
            sub.push_direct('{"type":"run_accepted"}')
            batch = await sub.next_batch()
            assert batch is not None
            direct, events = batch
            assert direct == ['{"type":"pong"}', '{"type":"run_accepted"}']
            assert _seqs(events) == [1, 2]
            await send.aclose()
            assert await sub.next_batch() is None
            other_direct, other_events = await _drain(other)
    assert other_direct == []
    assert _seqs(other_events) == [1, 2]


async def test_direct_frame_wakes_a_waiting_reader(autojump_clock: trio.testing.MockClock) -> None:
    """A reader waiting for events wakes up for a direct frame alone."""
    sequencer = SessionSequencer("s-1", window_events=100)
    sub = sequencer.subscribe()
    batches: list[tuple[list[str], list[Event]] | None] = []

    async def read_one() -> None:
        batches.append(await sub.next_batch())

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            send = _inbox(nursery, sequencer)
            nursery.start_soon(read_one)
            await trio.testing.wait_all_tasks_blocked()
            assert batches == []
            sub.push_direct("hello")
            await trio.testing.wait_all_tasks_blocked()
            assert batches == [(["hello"], [])]
            await send.aclose()


async def test_closing_the_inbox_ends_the_stream_after_draining(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """After the inbox closes, readers still get every pending event, then ``None`` from then on."""
    sequencer = SessionSequencer("s-1", window_events=100)
    sub = sequencer.subscribe()
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await _send_all(_inbox(nursery, sequencer), [_emit(i) for i in range(5)])
        assert sequencer.ended
        batch = await sub.next_batch(limit=3)
        assert batch is not None
        assert _seqs(batch[1]) == [1, 2, 3]
        batch = await sub.next_batch(limit=3)
        assert batch is not None
        assert _seqs(batch[1]) == [4, 5]
        assert await sub.next_batch() is None
        assert await sub.next_batch() is None


async def test_waiting_reader_wakes_when_the_stream_ends(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A reader blocked in ``next_batch`` gets ``None`` when the inbox is closed."""
    sequencer = SessionSequencer("s-1", window_events=100)
    sub = sequencer.subscribe()
    results: list[object] = []

    async def read_one() -> None:
        results.append(await sub.next_batch())

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            send = _inbox(nursery, sequencer)
            nursery.start_soon(read_one)
            await trio.testing.wait_all_tasks_blocked()
            assert results == []
            await send.aclose()
    assert results == [None]


async def test_stream_ends_only_when_every_sender_is_closed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """With several senders (cloned channels), the stream ends after the last one closes."""
    sequencer = SessionSequencer("s-1", window_events=100)
    sub = sequencer.subscribe()
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            send = _inbox(nursery, sequencer)
            clone = send.clone()
            await _send_all(send, [_emit(0)])
            await trio.testing.wait_all_tasks_blocked()
            assert not sequencer.ended
            await _send_all(clone, [_emit(1)])
        assert sequencer.ended
        _, events = await _drain(sub)
    assert _seqs(events) == [1, 2]


async def test_subscription_after_the_end_is_closed(autojump_clock: trio.testing.MockClock) -> None:
    """Subscribing to an ended stream gives a closed subscription whose ``next_batch`` is ``None``."""
    sequencer = SessionSequencer("s-1", window_events=100)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await _send_all(_inbox(nursery, sequencer), [_emit(0)])
        sub = sequencer.subscribe(after_seq=0)
        assert sub.closed
        assert await sub.next_batch() is None
    assert sequencer.statistics().subscriptions == 0


async def test_lagging_subscription_raises(autojump_clock: trio.testing.MockClock) -> None:
    """A non-pacing subscription whose cursor fell out of a small window raises ``SubscriptionLagged``."""
    sequencer = SessionSequencer("s-1", window_events=3)
    sub = sequencer.subscribe(paces=False)
    keeping_up = sequencer.subscribe(paces=False)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            send = _inbox(nursery, sequencer)
            await _publish(send, [_emit(0), _emit(1)])
            batch = await keeping_up.next_batch()
            assert batch is not None
            assert _seqs(batch[1]) == [1, 2]
            await _publish(send, [_emit(i) for i in range(2, 10)])
            with pytest.raises(SubscriptionLagged):
                await sub.next_batch()
            with pytest.raises(SubscriptionLagged):
                await keeping_up.next_batch()
            fresh = sequencer.subscribe(paces=False)
            await _send_all(send, [_emit(10)])
            _, events = await _drain(fresh)
    assert _seqs(events) == [11]
    assert sequencer.window.oldest_seq == 9


async def test_closed_subscription_detaches(autojump_clock: trio.testing.MockClock) -> None:
    """Closing a subscription (twice is fine) detaches it and makes ``next_batch`` return ``None``."""
    sequencer = SessionSequencer("s-1", window_events=100)
    sub = sequencer.subscribe()
    other = sequencer.subscribe()
    assert sequencer.statistics().subscriptions == 2
    sub.close()
    sub.close()
    assert sub.closed
    assert sequencer.statistics().subscriptions == 1
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await _send_all(_inbox(nursery, sequencer), [_emit(0)])
        assert await sub.next_batch() is None
        _, events = await _drain(other)
    assert _seqs(events) == [1]


async def test_close_wakes_a_waiting_reader(autojump_clock: trio.testing.MockClock) -> None:
    """Closing a subscription while its owner waits in ``next_batch`` makes it return ``None``."""
    sequencer = SessionSequencer("s-1", window_events=100)
    sub = sequencer.subscribe()
    results: list[object] = []

    async def read_one() -> None:
        results.append(await sub.next_batch())

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            send = _inbox(nursery, sequencer)
            nursery.start_soon(read_one)
            await trio.testing.wait_all_tasks_blocked()
            sub.close()
            await trio.testing.wait_all_tasks_blocked()
            assert results == [None]
            await send.aclose()


async def test_sequencer_continues_from_last_seq(autojump_clock: trio.testing.MockClock) -> None:
    """A sequencer created with ``last_seq=n`` stamps its first event ``n+1``."""
    sequencer = SessionSequencer("s-1", window_events=100, last_seq=41)
    sub = sequencer.subscribe()
    assert sub.cursor == 41
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await _send_all(_inbox(nursery, sequencer), [_emit(0), _emit(1)])
        _, events = await _drain(sub)
    assert _seqs(events) == [42, 43]
    stats = sequencer.statistics()
    assert (stats.last_seq, stats.window_events) == (43, 2)


class _RecordingStore:
    """An event store that records each batch and how far the window was when it was called."""

    def __init__(self, sequencer: SessionSequencer | None = None) -> None:
        self.sequencer = sequencer
        self.batches: list[tuple[str, list[int], int]] = []

    async def append(self, session_id: str, events: Sequence[Event]) -> None:
        assert self.sequencer is not None
        self.batches.append((session_id, _seqs(events), self.sequencer.window.last_seq))
        await trio.sleep(1)  # a slow store (instant under the autojump clock)


async def test_store_persists_each_batch_before_readers_see_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Every event goes through the store once, in order, before it enters the window."""
    store = _RecordingStore()
    sequencer = SessionSequencer("s-9", window_events=100, store=store)
    store.sequencer = sequencer
    sub = sequencer.subscribe()
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                _send_all, _inbox(nursery, sequencer, capacity=2), [_emit(i) for i in range(9)]
            )
            _, events = await _drain(sub)
    persisted = [seq for _, seqs, _ in store.batches for seq in seqs]
    assert persisted == _seqs(events) == list(range(1, 10))
    for session_id, seqs, window_last in store.batches:
        assert session_id == "s-9"
        assert window_last == seqs[0] - 1


async def test_pacing_follows_the_fastest_reader_and_the_next_one_when_it_leaves(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Senders are held back only by the fastest pacing reader; when it closes, the next
    fastest holds them back at once (no event stamped past what that reader can keep)."""
    sequencer = SessionSequencer("s-1", window_events=5)
    slow = sequencer.subscribe()
    fast = sequencer.subscribe()
    send = sequencer.sender()
    for i in range(5):
        send.send_nowait(_emit(i))
    with pytest.raises(trio.WouldBlock):  # the window is full of events nobody took
        send.send_nowait(_emit(5))
    batch = await fast.next_batch()
    assert batch is not None
    assert _seqs(batch[1]) == [1, 2, 3, 4, 5]
    send.send_nowait(_emit(5))  # the fast reader made room
    fast.close()
    with pytest.raises(trio.WouldBlock):  # now the slow reader (at 0) sets the pace
        send.send_nowait(_emit(6))
    assert sequencer.window.last_seq == 6
    slow.close()  # no pacing reader left: nothing holds the sender back
    send.send_nowait(_emit(6))
    assert sequencer.window.last_seq == 7
    send.close()
