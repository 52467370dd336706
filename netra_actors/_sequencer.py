"""The session's event stream: the sequencer actor, its replay window and subscriptions.

One ``SessionSequencer`` per session stamps every event with a gap-free
``seq``, encodes it once, appends it to the ``ReplayWindow`` and wakes every
``Subscription``. A subscription is one reader's cursor into the window (a
connection actor's writer, or an in-process run handle): fan-out costs the
sequencer one append and one wake-up per reader, and a slow reader never blocks
the sequencer or another reader.
"""

from __future__ import annotations

import json
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
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
    """

    def __init__(self, max_events: int, max_age: float | None = None) -> None:
        if max_events < 1:
            raise ValueError("max_events must be at least 1")
        self.capacity = max_events
        self.max_age = max_age
        self._events: deque[Event] = deque(maxlen=max_events)
        self._last_seq = 0

    @property
    def last_seq(self) -> int:
        """The ``seq`` of the newest event ever appended (0 before the first)."""
        return self._last_seq

    @property
    def oldest_seq(self) -> int:
        """The ``seq`` of the oldest event still held (``last_seq + 1`` when empty)."""
        return self._events[0].seq if self._events else self._last_seq + 1

    def __len__(self) -> int:
        return len(self._events)

    def append(self, event: Event) -> None:
        """Append the next event; its ``seq`` must be ``last_seq + 1``."""
        if event.seq != self._last_seq + 1:
            raise ValueError(f"seq {event.seq} does not follow {self._last_seq}")
        self._events.append(event)
        self._last_seq = event.seq
        if self.max_age is not None:
            horizon = event.ts - self.max_age
            while self._events[0].ts < horizon:
                self._events.popleft()

    def after(self, seq: int, limit: int | None = None) -> list[Event]:
        """The events with ``seq`` greater than ``seq``, oldest first (at most ``limit``).

        Raises:
            LookupError: if some of those events have already fallen out of the window.
        """
        if seq >= self._last_seq:
            return []
        start = seq + 1 - self.oldest_seq
        if start < 0:
            raise LookupError(f"events after seq {seq} are no longer in the window")
        stop = len(self._events) if limit is None else min(len(self._events), start + limit)
        return [self._events[i] for i in range(start, stop)]


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


class EventStore(Protocol):
    """Where a session's stamped events are persisted before any reader sees them.

    The default runtime keeps events only in memory (no store). A store's
    ``append`` is awaited by the sequencer once per batch, so a slow store paces
    the session rather than losing events.
    """

    async def append(self, session_id: str, events: Sequence[Event]) -> None: ...


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
        self._direct: deque[str] = deque()
        self._wake = trio.Event()
        self._direct_wake = trio.Event()
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
        self._direct_wake = trio.Event()
        with trio.move_on_after(seconds):
            await self._direct_wake.wait()

    def take_direct(self) -> list[str]:
        """Remove and return the direct frames waiting now."""
        frames = list(self._direct)
        self._direct.clear()
        return frames

    def reposition(self, after_seq: int) -> None:
        """Restart the stream after ``after_seq`` (a client's ``resume``)."""
        self.cursor = after_seq
        self._sequencer._room_changed()
        self._wake.set()

    def close(self) -> None:
        """Detach from the sequencer; idempotent."""
        if not self.closed:
            self.closed = True
            self._sequencer._subscriptions.discard(self)
            self._sequencer._room_changed()
            self._wake.set()

    async def next_batch(self, limit: int = 256) -> tuple[list[str], list[Event]] | None:
        """Wait for direct frames or events past the cursor; advance the cursor over them.

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
                direct = list(self._direct)
                self._direct.clear()
            try:
                events = self._sequencer.window.after(self.cursor, limit)
            except LookupError:
                events = await self._sequencer.read_stored(self.cursor, limit)
            if events:
                self.cursor = events[-1].seq
                if self.paces:
                    self._sequencer._room_changed()
            if direct or events:
                return direct, events
            if self._sequencer.ended:
                return None
            await self._wake.wait()
            self._wake = trio.Event()


class SessionSequencer:
    """The sequencer actor of one session.

    Receives ``EmitEvent`` messages in arrival order, stamps ``seq`` (gap-free,
    from ``last_seq + 1``) and ``ts``, encodes each frame once, persists the
    batch (when a store is set), appends it to the window and wakes the
    subscriptions. Ends when every sender of its inbox is closed, after the last
    event has been appended; cancelling it loses only events not yet stamped.
    """

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
    ) -> None:
        self.session_id = session_id
        self.window = ReplayWindow(window_events, window_max_age)
        self.window._last_seq = last_seq
        self._store = store
        #: The oldest ``seq`` the store still holds (None: no readable store).
        self._reader = store if isinstance(store, EventReader) else None
        self.stored_from: int | None = stored_from if self._reader is not None else None
        #: Called with each batch once it is published (synchronously: keep them cheap).
        self._observers = tuple(observers)
        #: Seconds a busy stream waits to be published as one batch (0: never).
        self.linger = linger
        self._subscriptions: set[Subscription] = set()
        self.ended = False
        self._inbox: trio.MemoryReceiveChannel[EmitEvent] | None = None
        self._room = trio.Event()
        self.paced_waits = 0

    @property
    def oldest_seq(self) -> int:
        """The oldest ``seq`` a reader can still be given (window or store)."""
        oldest = self.window.oldest_seq
        return oldest if self.stored_from is None else min(oldest, self.stored_from)

    async def read_stored(self, after_seq: int, limit: int) -> list[Event]:
        """Events after ``after_seq`` from the store, for a reader behind the window.

        Raises:
            SubscriptionLagged: the store cannot serve them (none, or pruned).
        """
        reader = self._reader
        if reader is not None and self.stored_from is not None:
            # Never past the window's start: the window is served from memory.
            limit = min(limit, self.window.oldest_seq - 1 - after_seq)
            events = await reader.events_after(self.session_id, after_seq, limit)
            if events and events[0].seq == after_seq + 1:
                return events
        raise SubscriptionLagged(
            f"cursor {after_seq} is older than the window (oldest {self.window.oldest_seq})"
        )

    def subscribe(self, after_seq: int | None = None, *, paces: bool = True) -> Subscription:
        """A new reader whose cursor starts after ``after_seq`` (default: the newest event).

        A pacing reader (``paces``) holds the producer back when even the
        fastest pacing reader is a whole window behind (see ``run``).
        """
        sub = Subscription(
            self, self.window.last_seq if after_seq is None else after_seq, paces=paces
        )
        if self.ended:
            sub.closed = True
        else:
            self._subscriptions.add(sub)
        return sub

    def _room_changed(self) -> None:
        self._room.set()

    def room(self) -> int:
        """How many events may be appended before a pacing reader would lose one."""
        leads = [sub.cursor for sub in self._subscriptions if sub.paces]
        if not leads:
            return self.window.capacity
        return self.window.capacity - (self.window.last_seq - max(leads))

    async def _wait_for_room(self) -> int:
        while (room := self.room()) <= 0:
            self.paced_waits += 1
            self._room = trio.Event()
            await self._room.wait()
        return room

    def statistics(self) -> SequencerStatistics:
        return SequencerStatistics(
            last_seq=self.window.last_seq,
            window_events=len(self.window),
            subscriptions=len(self._subscriptions),
            backlog=self._inbox.statistics().current_buffer_used if self._inbox else 0,
        )

    async def run(self, inbox: trio.MemoryReceiveChannel[EmitEvent]) -> None:
        """Stamp and publish events until ``inbox`` is closed by all its senders.

        Pacing: the producer is held back only when the window is full of events
        that no pacing reader has taken yet, so it runs at the speed of the
        fastest reader, never of a slower one (which falls out of the window and
        is told so). With no pacing reader, nothing holds it back.
        """
        self._inbox = inbox
        try:
            previous = -math.inf
            async for first in inbox:
                room = await self._wait_for_room()
                if self.linger and trio.current_time() - previous < 10 * self.linger:
                    # A busy stream: let it accumulate, then publish it as one batch
                    # (one store write, one wake-up per reader).
                    await trio.sleep(self.linger)
                else:
                    # One more turn for the producers, for one reschedule.
                    await trio.lowlevel.cancel_shielded_checkpoint()
                batch = [first]
                # Drain what is already queued: one store write and one wake-up per batch.
                while len(batch) < min(room, 512):
                    try:
                        batch.append(inbox.receive_nowait())
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                ts = time.time()
                seq = self.window.last_seq
                events = []
                for msg in batch:
                    seq += 1
                    events.append(stamp(msg, seq, ts))
                if self._store is not None:
                    await self._store.append(self.session_id, events)
                for event in events:
                    self.window.append(event)
                for observe in self._observers:
                    observe(events)
                for sub in self._subscriptions:
                    sub.notify()
                previous = trio.current_time()
        finally:
            self.ended = True
            for sub in self._subscriptions:
                sub.notify()
