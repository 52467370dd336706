"""The session's event stream: the sequencer actor, its replay window and subscriptions.

One ``SessionSequencer`` per session stamps every event with a gap-free
``seq``, encodes it once, appends it to the ``ReplayWindow`` and wakes every
``Subscription``. A subscription is one reader's cursor into the window (a
connection actor's writer, or an in-process run handle): fan-out costs the
sequencer one append and one wake-up per reader, and a slow reader never blocks
the sequencer or another reader.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from typing import Protocol

import attrs
import orjson
import trio

from ._messages import EmitEvent, Event


class ReplayWindow:
    """The most recent events of a session, by ``seq`` (no I/O).

    Holds at most ``max_events`` events; older ones fall out. Because ``seq`` is
    gap-free, lookup by ``seq`` is index arithmetic.
    """

    def __init__(self, max_events: int) -> None:
        if max_events < 1:
            raise ValueError("max_events must be at least 1")
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


class EventStore(Protocol):
    """Where a session's stamped events are persisted before any reader sees them.

    The default runtime keeps events only in memory (no store). A store's
    ``append`` is awaited by the sequencer once per batch, so a slow store paces
    the session rather than losing events.
    """

    async def append(self, session_id: str, events: Sequence[Event]) -> None: ...


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
    that are pending at the same time.
    """

    def __init__(self, sequencer: SessionSequencer, after_seq: int) -> None:
        self._sequencer = sequencer
        self.cursor = after_seq
        self._direct: deque[str] = deque()
        self._wake = trio.Event()
        self.closed = False

    def notify(self) -> None:
        """Wake the owner (new events, a direct frame, or the end of the stream)."""
        self._wake.set()

    def push_direct(self, frame: str) -> None:
        """Queue a frame for this reader only."""
        self._direct.append(frame)
        self._wake.set()

    def close(self) -> None:
        """Detach from the sequencer; idempotent."""
        if not self.closed:
            self.closed = True
            self._sequencer._subscriptions.discard(self)
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
            direct: list[str] = []
            if self._direct:
                direct = list(self._direct)
                self._direct.clear()
            try:
                events = self._sequencer.window.after(self.cursor, limit)
            except LookupError:
                raise SubscriptionLagged(
                    f"cursor {self.cursor} is older than the window "
                    f"(oldest {self._sequencer.window.oldest_seq})"
                ) from None
            if events:
                self.cursor = events[-1].seq
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
        store: EventStore | None = None,
        last_seq: int = 0,
    ) -> None:
        self.session_id = session_id
        self.window = ReplayWindow(window_events)
        self.window._last_seq = last_seq
        self._store = store
        self._subscriptions: set[Subscription] = set()
        self.ended = False
        self._backlog = 0

    def subscribe(self, after_seq: int | None = None) -> Subscription:
        """A new reader whose cursor starts after ``after_seq`` (default: the newest event)."""
        sub = Subscription(self, self.window.last_seq if after_seq is None else after_seq)
        if self.ended:
            sub.closed = True
        else:
            self._subscriptions.add(sub)
        return sub

    def statistics(self) -> SequencerStatistics:
        return SequencerStatistics(
            last_seq=self.window.last_seq,
            window_events=len(self.window),
            subscriptions=len(self._subscriptions),
            backlog=self._backlog,
        )

    def _stamp(self, msg: EmitEvent, seq: int, ts: float) -> Event:
        frame = orjson.dumps(
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
        ).decode()
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

    async def run(self, inbox: trio.MemoryReceiveChannel[EmitEvent]) -> None:
        """Stamp and publish events until ``inbox`` is closed by all its senders."""
        try:
            async for first in inbox:
                batch = [first]
                # Drain what is already queued: one store write and one wake-up per batch.
                while len(batch) < 512:
                    try:
                        batch.append(inbox.receive_nowait())
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                self._backlog = inbox.statistics().current_buffer_used
                ts = time.time()
                seq = self.window.last_seq
                events = []
                for msg in batch:
                    seq += 1
                    events.append(self._stamp(msg, seq, ts))
                if self._store is not None:
                    await self._store.append(self.session_id, events)
                for event in events:
                    self.window.append(event)
                for sub in self._subscriptions:
                    sub.notify()
        finally:
            self.ended = True
            for sub in self._subscriptions:
                sub.notify()
