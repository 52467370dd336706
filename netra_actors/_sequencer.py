"""The session's event stream: the sequencer actor, its replay window and subscriptions.

One ``SessionSequencer`` per session stamps every event with a gap-free
``seq``, encodes it once, appends it to the ``ReplayWindow`` and wakes every
``Subscription``. A subscription is one reader's cursor into the window (a
connection actor's writer, or an in-process run handle): fan-out costs the
sequencer one append and one wake-up per reader, and a slow reader never blocks
the sequencer or another reader.

Emitters (run tasks, the tool executor, the agent actor) hold ``EventSender``
handles. Sending stamps the event in the sender's own step, so an event costs
no task hop before the store: the order of ``send`` calls is the order of
``seq``, because all of them run in the session's one trio thread. With a store,
stamped events are handed to it as one batch at a time (what piles up while a
commit is in flight is the next batch: group commit without a timer) and reach
the window only once the store has them.
"""

from __future__ import annotations

import json
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, Protocol, runtime_checkable

import attrs
import orjson
import trio

from ._messages import EmitEvent, Event


class ReplayWindow:
    """The most recent events of a session, by ``seq`` (no I/O).

    Holds at most ``max_events`` events, none more than ``max_age`` seconds
    older than the newest (by their ``ts``); older ones fall out. Because
    ``seq`` is gap-free, lookup by ``seq`` is index arithmetic.

    Only each event's encoded frame and its ``ts`` are kept, in tuples of
    ``BLOCK`` events: tuples of strings and floats, which the garbage collector
    stops tracking. A full window of ``Event`` objects was as many tracked
    objects (10,000 a session by default), and even a deque of frames is one
    visit per frame in every full collection: with busy sessions, pauses of
    hundreds of milliseconds. Readers that want ``Event`` objects decode the
    frames (``after``).
    """

    #: Events per block (a block is two tuples, frames and times, once full).
    BLOCK = 64

    def __init__(self, max_events: int, max_age: float | None = None) -> None:
        if max_events < 1:
            raise ValueError("max_events must be at least 1")
        self.capacity = max_events
        self.max_age = max_age
        # Full blocks, oldest first, then the block being filled; ``_head`` events of
        # the first block have fallen out. Made by the first append (an idle session
        # holds none of them).
        self._frames: deque[tuple[str, ...]] | None = None
        self._times: deque[tuple[float, ...]] | None = None
        self._tail_frames: list[str] = []
        self._tail_times: list[float] = []
        self._head = 0
        self._len = 0
        self._last_seq = 0

    @property
    def last_seq(self) -> int:
        """The ``seq`` of the newest event ever appended (0 before the first)."""
        return self._last_seq

    @property
    def oldest_seq(self) -> int:
        """The ``seq`` of the oldest event still held (``last_seq + 1`` when empty)."""
        return self._last_seq + 1 - self._len

    def __len__(self) -> int:
        return self._len

    def append(self, event: Event) -> None:
        """Append the next event; its ``seq`` must be ``last_seq + 1``."""
        if event.seq != self._last_seq + 1:
            raise ValueError(f"seq {event.seq} does not follow {self._last_seq}")
        if self._frames is None or self._times is None:
            self._frames, self._times = deque(), deque()
        tail = self._tail_frames
        tail.append(event.frame)
        self._tail_times.append(event.ts)
        if len(tail) == self.BLOCK:
            self._frames.append(tuple(tail))
            self._times.append(tuple(self._tail_times))
            self._tail_frames, self._tail_times = [], []
        self._last_seq = event.seq
        self._len += 1
        if self._len > self.capacity:
            self._drop_oldest()
        if self.max_age is not None:
            horizon = event.ts - self.max_age
            while self._oldest_ts() < horizon:
                self._drop_oldest()

    def _oldest_ts(self) -> float:
        times = self._times
        if times:
            return times[0][self._head]
        return self._tail_times[self._head]

    def _drop_oldest(self) -> None:
        """Let the oldest event fall out (its block goes with the block's last event)."""
        self._len -= 1
        self._head += 1
        frames, times = self._frames, self._times
        assert frames is not None
        assert times is not None
        if frames and self._head == self.BLOCK:
            frames.popleft()
            times.popleft()
            self._head = 0

    def frames_after(self, seq: int, limit: int | None = None) -> list[str]:
        """The frames of the events with ``seq`` greater than ``seq``, oldest first (at
        most ``limit``): the first is number ``seq + 1``.

        Raises:
            LookupError: if some of those events have already fallen out of the window.
        """
        if seq >= self._last_seq:
            return []
        start = seq + 1 - self.oldest_seq
        if start < 0:
            raise LookupError(f"events after seq {seq} are no longer in the window")
        count = self._last_seq - seq if limit is None else min(limit, self._last_seq - seq)
        frames = self._frames
        assert frames is not None
        block, offset = divmod(self._head + start, self.BLOCK)
        out: list[str] = []
        while count > 0:
            source = frames[block] if block < len(frames) else self._tail_frames
            taken = source[offset : offset + count]
            out.extend(taken)
            count -= len(taken)
            block, offset = block + 1, 0
        return out

    def after(self, seq: int, limit: int | None = None) -> list[Event]:
        """``frames_after`` decoded: the events with ``seq`` greater than ``seq``.

        Raises:
            LookupError: if some of those events have already fallen out of the window.
        """
        return [event_from_frame(frame) for frame in self.frames_after(seq, limit)]


def encode_json(frame: Any) -> str:
    """The JSON text of event data. Never raises: values JSON cannot carry become strings.

    Event data comes partly from agent and tool code; a value orjson refuses
    (an object, a set, an integer beyond 64 bits, a non-string key) must not
    take the sequencer, and with it the session, down.
    """
    try:
        return orjson.dumps(frame, default=str, option=orjson.OPT_NON_STR_KEYS).decode()
    except TypeError:
        return json.dumps(frame, default=str, ensure_ascii=False)


def stamp(msg: EmitEvent, seq: int, ts: float) -> Event:
    """The event ``msg`` becomes as number ``seq`` of its stream, encoded once."""
    frame = encode_json(
        {
            "type": msg.type,
            "seq": seq,
            "run_id": msg.run_id,
            "thread_id": msg.thread_id,
            "ts": ts,
            "trace_id": msg.trace.trace_id,
            "span_id": msg.trace.span_id,
            "data": msg.data,
        }
    )
    return Event(
        seq=seq,
        type=msg.type,
        run_id=msg.run_id,
        thread_id=msg.thread_id,
        ts=ts,
        trace_id=msg.trace.trace_id,
        span_id=msg.trace.span_id,
        data=msg.data,
        frame=frame,
    )


def event_from_frame(frame: str) -> Event:
    """The ``Event`` a frame was encoded from (by ``stamp``); the frame is kept byte for
    byte. ``data`` is what JSON carried: lists for tuples, text for what JSON cannot
    hold."""
    obj = orjson.loads(frame)
    return Event(
        seq=obj["seq"],
        type=obj["type"],
        run_id=obj["run_id"],
        thread_id=obj["thread_id"],
        ts=obj["ts"],
        trace_id=obj["trace_id"],
        span_id=obj["span_id"],
        data=obj["data"],
        frame=frame,
    )


class EventStore(Protocol):
    """Where a session's stamped events are persisted before any reader sees them.

    The default runtime keeps events only in memory (no store). A store's
    ``append`` is awaited by the sequencer once per batch, so a slow store paces
    the session rather than losing events.
    """

    async def append(self, session_id: str, events: Sequence[Event]) -> None: ...


@runtime_checkable
class SoonEventStore(Protocol):
    """A store that can take a batch without a task waiting on it (``SqliteStore``,
    ``MemoryStore``): ``append_soon`` queues the write and calls ``done`` from the
    trio thread once the events are durable (``None``) or the write failed (the
    error). Batches of one session are committed, and ``done`` called, in the
    order they were queued. The sequencer then needs no task of its own per batch.
    """

    def append_soon(
        self,
        session_id: str,
        events: Sequence[Event],
        done: Callable[[BaseException | None], None],
    ) -> None: ...


@runtime_checkable
class EventReader(Protocol):
    """A store that can also give back what it holds (``RunStore`` is one)."""

    async def events_after(self, session_id: str, after_seq: int, limit: int) -> list[Event]: ...


class SubscriptionLagged(Exception):
    """The subscription's cursor fell out of the replay window: events were missed."""


@attrs.frozen
class SequencerStatistics:
    """A snapshot of one session's stream."""

    last_seq: int
    window_events: int
    subscriptions: int
    backlog: int


class Subscription:
    """One reader's cursor into a session's window, plus frames addressed to that reader only.

    Owned by a single task (a connection actor's writer, or a run handle). Direct
    frames (replies such as ``run_accepted``) are delivered before the events
    that are pending at the same time. A cursor that falls behind the window
    reads from the session's store when it has one that can be read
    (``EventReader``), and is told it lagged otherwise.
    """

    #: Direct frames that may wait for the writer; past this the reader is not reading.
    MAX_DIRECT = 256

    def __init__(self, sequencer: SessionSequencer, after_seq: int, *, paces: bool = True) -> None:
        self._sequencer = sequencer
        self.cursor = after_seq
        self.paces = paces
        self._direct: list[str] = []
        self._wake = trio.Event()
        self._direct_wake: trio.Event | None = None  # made by ``linger``
        self.closed = False
        self._overflowed = False

    def notify(self) -> None:
        """Wake the owner (new events, a direct frame, or the end of the stream)."""
        self._wake.set()

    def push_direct(self, frame: str) -> None:
        """Queue a frame for this reader only.

        Past ``MAX_DIRECT`` waiting frames the reader is not keeping up with its
        own replies: its next ``next_batch`` raises ``SubscriptionLagged``.
        """
        if len(self._direct) >= self.MAX_DIRECT:
            self._overflowed = True
        else:
            self._direct.append(frame)
        self._wake.set()
        if self._direct_wake is not None:
            self._direct_wake.set()

    @property
    def overflowed(self) -> bool:
        """More than ``MAX_DIRECT`` replies were waiting: the reader does not read."""
        return self._overflowed

    async def linger(self, seconds: float) -> None:
        """Sleep ``seconds``, or less if a direct frame arrives (replies never wait)."""
        if self._direct or self.closed:
            await trio.lowlevel.checkpoint()
            return
        wake = self._direct_wake = trio.Event()
        with trio.move_on_after(seconds):
            await wake.wait()
        self._direct_wake = None

    def take_direct(self) -> list[str]:
        """Remove and return the direct frames waiting now."""
        frames, self._direct = self._direct, []
        return frames

    def reposition(self, after_seq: int) -> None:
        """Restart the stream after ``after_seq`` (a client's ``resume``)."""
        self.cursor = after_seq
        self._sequencer._room_may_shrink()
        self._sequencer._room_changed()
        self._wake.set()

    def close(self) -> None:
        """Detach from the sequencer; idempotent."""
        if not self.closed:
            self.closed = True
            self._sequencer._subscriptions.discard(self)
            self._sequencer._room_may_shrink()  # it may have been the fastest reader
            self._sequencer._room_changed()
            self._wake.set()

    async def next_batch(self, limit: int = 256) -> tuple[list[str], list[str]] | None:
        """Wait for direct frames or events past the cursor; advance the cursor over them.

        Returns the direct frames, then the frames of the events numbered
        ``cursor + 1`` onwards (``event_from_frame`` decodes one).

        Returns ``None`` once the stream has ended (the session closed) and
        everything in it was returned, or the subscription was closed.

        Raises:
            SubscriptionLagged: the cursor fell out of the window.
        """
        while True:
            if self.closed:
                return None
            if self._overflowed:
                raise SubscriptionLagged(f"more than {self.MAX_DIRECT} replies waiting")
            direct: list[str] = []
            if self._direct:
                direct, self._direct = self._direct, []
            try:
                frames = self._sequencer.window.frames_after(self.cursor, limit)
            except LookupError:
                frames = await self._sequencer.read_stored(self.cursor, limit)
            if frames:
                self.cursor += len(frames)
                if self.paces:
                    self._sequencer._room_changed()
            if direct or frames:
                return direct, frames
            if self._sequencer.ended:
                return None
            await self._wake.wait()
            self._wake = trio.Event()


class SessionSequencer:
    """The sequencer of one session.

    ``publish`` (through an ``EventSender``) stamps ``seq`` (gap-free, from
    ``last_seq + 1``) and ``ts`` and encodes the frame once, in the caller's
    step. Without a store the event enters the window and wakes the
    subscriptions at once. With a store it waits for the store first: one batch
    in flight at a time, the events stamped meanwhile forming the next batch.
    The stream ends once every sender is closed (and the inbox given to ``run``,
    if any, is exhausted) and the last stamped event has been published.

    ``run`` is the sequencer's task, needed only for a store that has just
    ``append`` (``needs_task``) or to read an inbox channel: it drives them,
    waits for the end, and raises the store's error if a write fails.
    Cancelling it ends the stream; events stamped but not yet stored are lost
    to readers. Without a task (no store, or a ``SoonEventStore``) the stream
    ends in the step that closes the last sender or commits the last batch, and
    a failed write ends it at once and is reported to ``on_failure``.
    """

    #: Stamped events that may wait for the store before senders are held back.
    MAX_UNSTORED = 4096

    def __init__(
        self,
        session_id: str,
        *,
        window_events: int,
        window_max_age: float | None = None,
        store: EventStore | None = None,
        last_seq: int = 0,
        stored_from: int | None = None,
        observers: Sequence[Callable[[Sequence[Event]], None]] = (),
        linger: float = 0.0,
        on_end: Callable[[], None] | None = None,
        on_failure: Callable[[BaseException], None] | None = None,
    ) -> None:
        self.session_id = session_id
        self.window = ReplayWindow(window_events, window_max_age)
        self.window._last_seq = last_seq
        self._store = store
        #: The store's callback-style append, when it has one (checked once).
        self._append_soon = store.append_soon if isinstance(store, SoonEventStore) else None
        #: The oldest ``seq`` the store still holds (None: no readable store).
        self._reader = store if isinstance(store, EventReader) else None
        self.stored_from: int | None = stored_from if self._reader is not None else None
        #: Called with each batch once it is published (synchronously: keep them cheap).
        self._observers = tuple(observers)
        #: Seconds a busy stream waits to form a batch, for stores with only ``append``.
        self.linger = linger
        self._subscriptions: set[Subscription] = set()
        self.ended = False
        #: The ``seq`` of the newest stamped event (published or waiting for the store).
        self._stamped = last_seq
        #: Events up to this ``seq`` may be stamped without asking ``room`` again: room
        #: only grows as readers advance, so it is recomputed when this is reached, or
        #: when a reader is added, moved back or closed (``_room_may_shrink``).
        self._open_until = last_seq
        self._unstored: list[Event] = []  # stamped, not yet handed to the store
        self._in_flight = 0  # events handed to the store, not yet committed
        self._senders = 0
        self._inbox_open = False
        # Made when first needed (an idle session keeps none of them).
        self._room: trio.Event | None = None  # wakes senders waiting for room
        self._kick: trio.Event | None = None  # wakes ``run`` (a batch to store, or the end)
        self._finished: trio.Event | None = None
        self._failure: BaseException | None = None
        self._on_end = on_end
        self._on_failure = on_failure
        self._task_driven = False  # ``run`` is running: it ends the stream
        self.paced_waits = 0

    @property
    def needs_task(self) -> bool:
        """Whether ``run`` must run (a store with only ``append``)."""
        return self._store is not None and self._append_soon is None

    async def wait_finished(self) -> None:
        """Wait until the stream has ended."""
        if self.ended:
            await trio.lowlevel.checkpoint()
            return
        if self._finished is None:
            self._finished = trio.Event()
        await self._finished.wait()

    @property
    def oldest_seq(self) -> int:
        """The oldest ``seq`` a reader can still be given (window or store)."""
        oldest = self.window.oldest_seq
        return oldest if self.stored_from is None else min(oldest, self.stored_from)

    async def read_stored(self, after_seq: int, limit: int) -> list[str]:
        """The frames of the events after ``after_seq`` from the store, for a reader
        behind the window (consecutive from ``after_seq + 1``).

        Raises:
            SubscriptionLagged: the store cannot serve them (none, or pruned).
        """
        reader = self._reader
        if reader is not None and self.stored_from is not None:
            # Never past the window's start: the window is served from memory.
            limit = min(limit, self.window.oldest_seq - 1 - after_seq)
            events = await reader.events_after(self.session_id, after_seq, limit)
            if events and events[0].seq == after_seq + 1:
                # Gap-free by the store's key: ``seq`` follows from the position.
                return [event.frame for event in events]
        raise SubscriptionLagged(
            f"cursor {after_seq} is older than the window (oldest {self.window.oldest_seq})"
        )

    def subscribe(self, after_seq: int | None = None, *, paces: bool = True) -> Subscription:
        """A new reader whose cursor starts after ``after_seq`` (default: the newest event).

        A pacing reader (``paces``) holds the producers back when even the
        fastest pacing reader is a whole window behind (see ``room``).
        """
        sub = Subscription(
            self, self.window.last_seq if after_seq is None else after_seq, paces=paces
        )
        if self.ended:
            sub.closed = True
        else:
            self._subscriptions.add(sub)
            self._room_may_shrink()
        return sub

    def _room_changed(self) -> None:
        if self._room is not None:
            self._room.set()
            self._room = None

    def _wake_task(self) -> None:
        if self._kick is not None:
            self._kick.set()

    def room(self) -> int:
        """How many events may be stamped before a pacing reader would lose one.

        Pacing: producers are held back only when the window is full of events
        that no pacing reader has taken yet, so they run at the speed of the
        fastest reader, never of a slower one (which falls out of the window and
        is told so). With no pacing reader, nothing holds them back.
        """
        leads = [sub.cursor for sub in self._subscriptions if sub.paces]
        if not leads:
            return self.window.capacity
        return self.window.capacity - (self._stamped - max(leads))

    def accepting(self) -> bool:
        """Whether an event can be stamped now (room for readers, store keeping up).

        O(1) per event: ``room`` (which looks at every reader) is asked once per
        window's worth of events, not for each one.
        """
        if len(self._unstored) >= self.MAX_UNSTORED:
            return False
        if self._stamped < self._open_until:
            return True
        self._open_until = self._stamped + self.room()
        return self._stamped < self._open_until

    def _room_may_shrink(self) -> None:
        self._open_until = self._stamped

    def sender(self) -> EventSender:
        """A new open sending handle; the stream ends once every handle is closed."""
        if self.ended:
            raise trio.BrokenResourceError("the session's stream has ended")
        self._senders += 1
        return EventSender(self)

    async def wait_to_send(self) -> None:
        """Wait until ``accepting``.

        Raises:
            trio.BrokenResourceError: the stream ended meanwhile.
        """
        while not self.accepting():
            if self.ended:
                raise trio.BrokenResourceError("the session's stream has ended")
            self.paced_waits += 1
            if self._room is None:
                self._room = trio.Event()  # shared by every waiting sender until set
            await self._room.wait()
        if self.ended:
            raise trio.BrokenResourceError("the session's stream has ended")

    def publish(self, msg: EmitEvent) -> None:
        """Stamp ``msg`` as the next event and publish it (after the store, if any).

        Synchronous: callers check ``accepting`` (or ``wait_to_send``) first.
        """
        seq = self._stamped = self._stamped + 1
        event = stamp(msg, seq, time.time())
        if self._store is None:
            self._publish([event])
            return
        self._unstored.append(event)
        if not self._in_flight:
            self._submit()

    def _submit(self) -> None:
        """Hand the stamped events to the store as one batch."""
        append_soon = self._append_soon
        if append_soon is None:
            self._wake_task()  # ``run`` awaits the store's ``append``
            return
        batch, self._unstored = self._unstored, []
        self._in_flight = len(batch)
        append_soon(self.session_id, batch, partial(self._committed, batch))

    def _committed(self, batch: list[Event], error: BaseException | None) -> None:
        """The store has ``batch`` (or failed to take it): publish, then send the next."""
        self._in_flight = 0
        if error is not None:
            if self._failure is None:
                self._failure = error
            if self._task_driven:
                self._wake_task()
            else:
                self._end()
                if self._on_failure is not None:
                    self._on_failure(error)
            return
        if not self.ended:
            self._publish(batch)
        self._room_changed()
        if self._unstored:
            self._submit()
        else:
            self._maybe_end()

    def _publish(self, events: list[Event]) -> None:
        window = self.window
        for event in events:
            window.append(event)
        for observe in self._observers:
            observe(events)
        for sub in self._subscriptions:
            sub.notify()

    def _sender_closed(self) -> None:
        self._senders -= 1
        self._maybe_end()

    def _maybe_end(self) -> None:
        if self._senders or self._inbox_open or not self._drained or self.ended:
            return
        if self._task_driven:
            self._wake_task()  # ``run`` ends it
        else:
            self._end()

    def _end(self) -> None:
        if self.ended:
            return
        self.ended = True
        if self._finished is not None:
            self._finished.set()
        self._room_changed()
        for sub in self._subscriptions:
            sub.notify()
        if self._on_end is not None:
            self._on_end()

    @property
    def _drained(self) -> bool:
        return not self._unstored and not self._in_flight

    def statistics(self) -> SequencerStatistics:
        return SequencerStatistics(
            last_seq=self.window.last_seq,
            window_events=len(self.window),
            subscriptions=len(self._subscriptions),
            backlog=len(self._unstored) + self._in_flight,
        )

    async def run(self, inbox: trio.MemoryReceiveChannel[EmitEvent] | None = None) -> None:
        """The sequencer's task: runs until the stream has ended (see the class docstring).

        ``inbox``: optional messages to stamp besides the senders' (the stream
        does not end before it is exhausted).

        Raises:
            Exception: the store's error, if a write failed.
        """
        self._task_driven = True
        try:
            async with trio.open_nursery() as nursery:
                if inbox is not None:
                    self._inbox_open = True
                    nursery.start_soon(self._drain_inbox, inbox)
                await self._serve()
                nursery.cancel_scope.cancel()
        finally:
            self._end()

    async def _drain_inbox(self, inbox: trio.MemoryReceiveChannel[EmitEvent]) -> None:
        try:
            async for msg in inbox:
                await self.wait_to_send()
                self.publish(msg)
        finally:
            self._inbox_open = False
            self._maybe_end()

    async def _serve(self) -> None:
        previous = -math.inf
        while True:
            if self._failure is not None:
                raise self._failure
            if self._append_soon is None and self._unstored:
                assert self._store is not None
                if self.linger and trio.current_time() - previous < 10 * self.linger:
                    # A busy stream: let it accumulate, then store it as one batch.
                    await trio.sleep(self.linger)
                batch, self._unstored = self._unstored, []
                self._in_flight = len(batch)
                try:
                    await self._store.append(self.session_id, batch)
                except BaseException:
                    self._in_flight = 0
                    raise
                self._committed(batch, None)
                previous = trio.current_time()
                continue
            if self._senders == 0 and not self._inbox_open and self._drained:
                return
            kick = self._kick = trio.Event()
            await kick.wait()


class EventSender:
    """A handle emitters send a session's events with.

    It has the part of ``trio.MemorySendChannel``'s API that emitters use
    (``send``, ``send_nowait``, ``clone``, ``close``/``aclose``, context
    managers), so code written against a channel works unchanged. ``send`` is
    always a cancellation point (a cancelled send sends nothing) but a
    scheduling point only every ``YIELD_EVERY`` events, or when it waits: a
    streamed token then costs one task switch less, while a sender that never
    awaits anything else still lets the rest of the runtime run. It waits only
    while the session's pacing readers or its store are a full backlog behind.
    Owned by one task; clone it for another.
    """

    __slots__ = ("_closed", "_sends", "_sequencer")

    #: ``send`` lets other tasks run at least once every this many events.
    YIELD_EVERY = 8

    def __init__(self, sequencer: SessionSequencer) -> None:
        self._sequencer = sequencer
        self._closed = False
        self._sends = 0

    async def send(self, msg: EmitEvent) -> None:
        """Stamp and publish ``msg`` as the session's next event.

        Raises:
            trio.ClosedResourceError: this handle was closed.
            trio.BrokenResourceError: the session's stream has ended.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        if self._closed:
            raise trio.ClosedResourceError
        sequencer = self._sequencer
        if sequencer.ended or not sequencer.accepting():
            await sequencer.wait_to_send()
        sequencer.publish(msg)
        self._sends += 1
        if not self._sends % self.YIELD_EVERY:
            await trio.lowlevel.cancel_shielded_checkpoint()

    def send_nowait(self, msg: EmitEvent) -> None:
        """``send`` without waiting. Raises ``trio.WouldBlock`` when it would wait."""
        if self._closed:
            raise trio.ClosedResourceError
        sequencer = self._sequencer
        if sequencer.ended:
            raise trio.BrokenResourceError("the session's stream has ended")
        if not sequencer.accepting():
            raise trio.WouldBlock
        sequencer.publish(msg)

    def clone(self) -> EventSender:
        """Another open handle on the same stream."""
        if self._closed:
            raise trio.ClosedResourceError
        return self._sequencer.sender()

    def close(self) -> None:
        """Close this handle; idempotent."""
        if not self._closed:
            self._closed = True
            self._sequencer._sender_closed()

    async def aclose(self) -> None:
        self.close()
        await trio.lowlevel.checkpoint()

    def __enter__(self) -> EventSender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> EventSender:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


#: What emitters are given: the session's ``EventSender`` (or, in tests and for
#: code that drives a sequencer through ``run(inbox)``, a plain memory channel).
Emitter = EventSender | trio.MemorySendChannel[EmitEvent]
